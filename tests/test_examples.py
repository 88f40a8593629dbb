"""The fraud example's job notebooks run end to end with plain papermill (no Ray, no ml_prod jobs).

One module-scoped pipeline runs data -> train -> evaluate in real kernels against a throwaway
SQLite MLflow store; the tests then check what it wrote.
"""

import hashlib
import json
from importlib.resources import files
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pandas as pd
import papermill as pm
import pytest
from mlflow.tracking import MlflowClient

EXAMPLE = Path(str(files("ml_prod") / "examples" / "fraud"))
COLUMNS = ["amount", "merchant_category", "hour", "device", "country", "distance_from_home_km",
           "txn_count_1h", "txn_count_24h", "amount_to_avg_ratio", "is_foreign", "is_fraud"]
ROWS = 4000


def canonical_fingerprint(frame: pd.DataFrame) -> str:
    """The fingerprint as the README documents it, written independently of the notebooks."""
    def kind(dtype):
        if pd.api.types.is_bool_dtype(dtype):
            return "bool"
        if pd.api.types.is_integer_dtype(dtype):
            return "int64"
        if pd.api.types.is_float_dtype(dtype):
            return "float64"
        return "string"

    header = [[str(c), kind(frame[c].dtype)] for c in frame.columns]
    canon = pd.DataFrame({name: frame[c].astype(object if k == "string" else k)
                          for (name, k), c in zip(header, frame.columns)})
    digest = hashlib.sha256(json.dumps(header, separators=(",", ":")).encode())
    digest.update(pd.util.hash_pandas_object(canon, index=False).to_numpy().tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fraud")
    uri = f"sqlite:///{tmp}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
            mp.delenv(var, raising=False)
        mp.chdir(tmp)

        def run(notebook, label, **parameters):
            executed = tmp / f"{notebook}-{label}.ipynb"
            pm.execute_notebook(str(EXAMPLE / f"{notebook}.ipynb"), str(executed), parameters=parameters,
                                kernel_name="python3", cwd=str(tmp), progress_bar=False)
            return executed

        client = MlflowClient(tracking_uri=uri)
        for label, params in {
            "clean": dict(seed=0),
            "again": dict(seed=0),
            "drifted": dict(seed=2, concept_drift=1.0),
        }.items():
            run("data", label, rows=ROWS, output_path=f"{label}/transactions.parquet", **params)

        # as under an ml_prod job: the run is handed to the kernel through MLFLOW_RUN_ID
        data_run_id = client.create_run(client.get_experiment_by_name("Default").experiment_id).info.run_id
        mp.setenv("MLFLOW_RUN_ID", data_run_id)
        run("data", "other", rows=ROWS, seed=1, output_path="other/transactions.parquet")
        mp.delenv("MLFLOW_RUN_ID")

        run("train", "clean", data_path="clean/transactions.parquet", epochs=2, lr=0.01, batch_size=64,
            output_dir="model_out")
        experiments = [e.experiment_id for e in client.search_experiments()]
        train_run = client.search_runs(experiments, order_by=["attributes.start_time DESC"], max_results=1)[0]
        model_uri = f"runs:/{train_run.info.run_id}/model"

        evaluations = {}
        for label in ("clean", "drifted"):
            executed = run("evaluate", label, model_uri=model_uri, data_path=f"{label}/transactions.parquet",
                           output_dir=f"eval_{label}")
            evaluations[label] = json.loads((tmp / f"eval_{label}" / "evaluation.json").read_text())
            evaluations[label]["executed"] = executed

        yield SimpleNamespace(tmp=tmp, uri=uri, client=client, train_run=train_run, model_uri=model_uri,
                              evaluations=evaluations, data_run_id=data_run_id)


def test_notebooks_have_tagged_parameters_and_no_outputs():
    import nbformat

    for name in ("data", "train", "evaluate"):
        nb = nbformat.read(EXAMPLE / f"{name}.ipynb", as_version=4)
        assert nb.metadata["kernelspec"]["name"] == "python3"
        assert nb.cells[0].cell_type == "markdown"
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, name
        for line in tagged[0].source.splitlines():
            assert ": " in line and " = " in line and "  # " in line, f"{name}: {line!r}"
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")


def test_parameters_follow_the_notebook_schema():
    params = pytest.importorskip("ml_prod.params")
    expected = {
        "data": ["rows", "fraud_rate", "seed", "data_drift", "concept_drift", "output_path"],
        "train": ["data_path", "lr", "epochs", "hidden_size", "batch_size", "val_fraction", "seed",
                  "pos_weight", "precision_target", "registered_model_name", "output_dir"],
        "evaluate": ["model_uri", "data_path", "precision_target", "threshold", "output_dir"],
    }
    for name, names in expected.items():
        assert params.notebook_schema(EXAMPLE / f"{name}.ipynb").names == names


def test_data_writes_parquet_and_fingerprint(pipeline):
    df = pd.read_parquet(pipeline.tmp / "clean" / "transactions.parquet")
    assert list(df.columns) == COLUMNS
    assert len(df) == ROWS
    assert df["is_fraud"].mean() == pytest.approx(0.02, abs=0.005)
    assert set(df["device"]) == {"mobile", "web", "pos"}
    assert df["hour"].between(0, 23).all()

    def info(label):
        return json.loads((pipeline.tmp / label / "transactions.parquet.fingerprint.json").read_text())

    clean = info("clean")
    assert clean["sha256"] == canonical_fingerprint(df)
    assert clean["rows"] == ROWS and clean["columns"] == COLUMNS
    assert clean["fraud_rate"] == pytest.approx(df["is_fraud"].mean())
    assert info("again")["sha256"] == clean["sha256"]
    assert info("other")["sha256"] != clean["sha256"]


def test_data_logs_only_inside_a_run(pipeline):
    other = json.loads((pipeline.tmp / "other" / "transactions.parquet.fingerprint.json").read_text())
    data_run = pipeline.client.get_run(pipeline.data_run_id)
    assert data_run.data.tags["data_fingerprint"] == other["sha256"]
    assert data_run.data.metrics["rows"] == ROWS
    assert data_run.data.metrics["fraud_share"] == pytest.approx(other["fraud_rate"])
    assert [a.path for a in pipeline.client.list_artifacts(pipeline.data_run_id)] == [
        "transactions.parquet.fingerprint.json"]
    # the runs without MLFLOW_RUN_ID logged nothing: only the data run, the training and two evaluations
    experiment = data_run.info.experiment_id
    assert len(pipeline.client.search_runs([experiment])) == 4


def test_train_logs_metrics_model_and_reference(pipeline, tmp_path):
    run = pipeline.train_run
    assert run.info.status == "FINISHED"
    assert run.data.metrics["val_roc_auc"] > 0.8
    for key in ("val_pr_auc", "val_recall_at_precision_0.9", "train_loss"):
        assert key in run.data.metrics
    history = pipeline.client.get_metric_history(run.info.run_id, "val_roc_auc")
    assert sorted(m.step for m in history) == [1, 2]
    clean_fp = json.loads((pipeline.tmp / "clean" / "transactions.parquet.fingerprint.json").read_text())
    assert run.data.tags["data_fingerprint"] == clean_fp["sha256"]
    assert run.data.params["epochs"] == "2"

    local = mlflow.artifacts.download_artifacts(artifact_uri=pipeline.model_uri, dst_path=str(tmp_path / "m"),
                                                tracking_uri=pipeline.uri)
    model = mlflow.pyfunc.load_model(local)
    raw = pd.read_parquet(pipeline.tmp / "clean" / "transactions.parquet").drop(columns="is_fraud").head(3)
    scores = model.predict(raw)
    assert list(scores.columns) == ["score"] and len(scores) == 3
    assert scores["score"].between(0, 1).all()
    assert model.metadata.get_input_schema().input_names() == COLUMNS[:-1]
    example = model.metadata.load_input_example(local)
    assert len(example) >= 2

    reference_path = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="reference_profile.json", dst_path=str(tmp_path / "ref"),
        tracking_uri=pipeline.uri)
    reference = json.loads(Path(reference_path).read_text())
    assert reference == json.loads((pipeline.tmp / "model_out" / "reference_profile.json").read_text())
    assert reference["format_version"] == 1
    data = pd.read_parquet(pipeline.tmp / "clean" / "transactions.parquet")
    n_val = round(len(data) * 0.2)  # train.ipynb's default val_fraction
    assert reference["n_rows"] == len(data) - n_val and set(reference["features"]) == set(COLUMNS[:-1])
    amount = reference["features"]["amount"]
    assert amount["kind"] == "numeric" and sum(amount["counts"]) == reference["n_rows"]  # every training row in one bin
    assert amount["edges"][0] == "-inf" and amount["edges"][-1] == "inf" and len(amount["edges"]) == len(amount["counts"]) + 1
    assert amount["min"] >= data["amount"].min() and amount["max"] <= data["amount"].max()
    device = reference["features"]["device"]
    assert device["kind"] == "categorical" and set(device["categories"]) <= set(data["device"].astype(str))
    assert sum(device["counts"]) == reference["n_rows"]
    assert reference["features"]["is_foreign"]["kind"] == "categorical"
    pairs = reference["scores"]
    assert pairs["n"] == n_val and len(pairs["score"]) == len(pairs["label"]) == n_val  # validation rows, not training rows
    assert sum(pairs["label"]) == pytest.approx(data["is_fraud"].mean() * n_val, abs=2)  # stratified split
    assert reference["metrics"]["val_roc_auc"] == pytest.approx(run.data.metrics["val_roc_auc"])


def test_evaluate_scores_and_concept_drift_hurts(pipeline):
    clean, drifted = pipeline.evaluations["clean"], pipeline.evaluations["drifted"]
    for evaluation in (clean, drifted):
        assert evaluation["model_uri"] == pipeline.model_uri
        cm = evaluation["confusion_matrix"]
        assert sum(cm.values()) == ROWS
        assert {"roc_auc", "pr_auc", "recall_at_precision_0.9", "precision_at_threshold",
                "recall_at_threshold"} <= evaluation["metrics"].keys()
    assert clean["metrics"]["roc_auc"] > 0.8
    assert drifted["metrics"]["roc_auc"] < clean["metrics"]["roc_auc"] - 0.1

    runs = pipeline.client.search_runs([pipeline.train_run.info.experiment_id],
                                       filter_string=f"tags.evaluated_model_uri = '{pipeline.model_uri}'")
    assert len(runs) == 2
    assert {round(r.data.metrics["roc_auc"], 6) for r in runs} == {
        round(clean["metrics"]["roc_auc"], 6), round(drifted["metrics"]["roc_auc"], 6)}


def test_evaluate_without_model_uri_fails_clearly(tmp_path):
    with pytest.raises(pm.PapermillExecutionError, match="model_uri is required"):
        pm.execute_notebook(str(EXAMPLE / "evaluate.ipynb"), str(tmp_path / "out.ipynb"),
                            kernel_name="python3", cwd=str(tmp_path), progress_bar=False)
