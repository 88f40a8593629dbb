"""Monitoring as a job: the shipped monitoring notebook judges audit windows against a model version's reference profile.

* `test_monitor_notebook_judges_written_windows` runs the notebook with plain papermill (no Ray) on an audit log
  written with the replicas' own writer: a window like the reference is healthy, a window whose `amount` was
  shifted by the generator is data drift naming `amount` and not `country`, and a window whose labels
  contradict the scores is a quality drop. What MLflow holds afterwards is checked: tags, metrics, artifacts.
* `test_monitor_the_served_fraud_model` serves the fraud model on the session's cluster and runs `ml_prod monitor`
  (the notebook as a tracked job on Ray) on the windows of real HTTP traffic: exit 0 healthy, then 3.
"""
from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

import numpy as np
import pandas as pd
import papermill as pm
import pytest

from conftest import HERE, mlflow_at

EXAMPLE = Path(str(files("ml_prod") / "examples" / "fraud"))
T0 = 1_750_000_000.0  # the first window's start (2025-06-15)
HOUR = 3600.0


def tiny_version_with_profile(s, rng) -> tuple[str, pd.DataFrame]:
    "Log tests/tiny_model.py with a reference profile of generated rows in one run, register it: (models:/ URI, reference rows)."
    import mlflow
    from mlflow.models import infer_signature
    from ml_prod.models.registry import register
    from ml_prod.monitoring.profile import build_profile, log_profile
    ref = pd.DataFrame({"amount": rng.lognormal(4.5, 0.6, 5000), "country": rng.choice(["US", "FR", "DE"], 5000, p=[0.6, 0.3, 0.1])})
    score = 1 / (1 + np.exp(-(ref["amount"].to_numpy() / 100 - 1)))  # what tiny_model.py scores
    label = (rng.uniform(size=len(ref)) < score).astype(int)
    with mlflow_at(s.tracking_uri):
        mlflow.set_experiment("monitoring-tests")
        with mlflow.start_run() as run:
            X = ref.head(2)
            mlflow.pyfunc.log_model(name="model", python_model=str(HERE / "tiny_model.py"), input_example=X,
                                    signature=infer_signature(X, pd.DataFrame({"score": [0.1, 0.9]})))
            from sklearn.metrics import roc_auc_score  # the training-time figure, computed independently of ml_prod
            log_profile(build_profile(ref, scores=score, labels=label, metrics={"val_roc_auc": roc_auc_score(label, score)}))
    version = register(s, run.info.run_id, "tiny-monitored")
    return f"models:/tiny-monitored/{version}", ref


def write_window(audit_dir: Path, rng, t0: float, n: int, amount_shift: float = 0.0, labels: str = "honest", version: str = "1"):
    "n answered requests of one record each over [t0, t0 + 1 h), scored as tiny_model.py scores them, with a label each."
    from ml_prod.audit.writer import AuditWriter, FeedbackWriter
    amount = rng.lognormal(4.5 + amount_shift, 0.6, n)
    country = rng.choice(["US", "FR", "DE"], n, p=[0.6, 0.3, 0.1])
    score = 1 / (1 + np.exp(-(amount / 100 - 1)))
    truth = rng.uniform(size=n) < (score if labels == "honest" else 1 - score)  # "inverted": the model is now wrong
    ids = [f"w{int(t0)}-{i}" for i in range(n)]
    with AuditWriter(audit_dir, "shop", "r1") as w, FeedbackWriter(audit_dir, "shop", "r1") as fw:
        for i in range(n):
            s = float(score[i])
            w.write(request_id=ids[i], ts=t0 + i * HOUR / n, status=200, outcome="ok", arm="main", model_name="tiny-monitored",
                    model_version=version, inputs=[{"amount": float(amount[i]), "country": str(country[i])}],
                    outputs={"scores": [s], "decisions": ["fraud" if s >= 0.5 else "legit"]}, latency_ms=3.0)
            fw.write(ids[i], int(truth[i]), ts=t0 + HOUR + 60)


def run_monitor(project: Path, out: Path, start: float, end: float, tracking_uri: str):
    from ml_prod.monitoring.job import monitor_notebook
    pm.execute_notebook(str(monitor_notebook()), str(out), kernel_name="python3", cwd=str(project), progress_bar=False,
                        parameters=dict(app="shop", start=start, end=end, windows=1))
    import mlflow
    c = mlflow.tracking.MlflowClient(tracking_uri)
    runs = c.search_runs([e.experiment_id for e in c.search_experiments()], order_by=["attributes.start_time DESC"], max_results=1)
    return c, runs[0]


def test_monitor_notebook_judges_written_windows(project_dir, monkeypatch):
    from ml_prod.settings import load_settings
    from ml_prod.tracking import tags as keys
    s = load_settings()
    rng = np.random.default_rng(7)
    model, _ = tiny_version_with_profile(s, rng)
    audit = Path(s.audit_dir)
    write_window(audit, rng, T0, 3000)                                        # like the reference
    write_window(audit, rng, T0 + HOUR, 3000)                                 # like it again: the healthy window
    write_window(audit, rng, T0 + 2 * HOUR, 3000, amount_shift=0.5)          # amounts up (the generator's shift)
    write_window(audit, rng, T0 + 3 * HOUR, 3000, labels="inverted")         # inputs as before, the labels contradict the scores
    monkeypatch.setenv("MLFLOW_TRACKING_URI", s.tracking_uri)

    verdicts = {}
    for name, k in [("healthy", 1), ("drifted", 2), ("wrong", 3)]:
        c, run = run_monitor(project_dir, project_dir / f"monitor-{name}.ipynb", T0 + k * HOUR, T0 + (k + 1) * HOUR, s.tracking_uri)
        t = run.data.tags
        assert t[keys.MONITOR_MODEL] == model, t
        verdicts[name] = json.loads(t[keys.MONITOR_RESULT])
        assert verdicts[name]["status"] == t[keys.MONITOR_STATUS]
        arts = {a.path for a in c.list_artifacts(run.info.run_id, "monitoring")}
        assert {"monitoring/table.csv", "monitoring/result.json"} <= arts, arts
        table = pd.read_csv(c.download_artifacts(run.info.run_id, "monitoring/table.csv", str(project_dir)))
        assert set(table["check"]) >= {"data_drift", "integrity", "quality", "service"}, set(table["check"])
        assert {"monitor.data_drift.amount.psi", "monitor.service.request_rate", "monitor.service.latency_p95_ms"} <= set(run.data.metrics), sorted(run.data.metrics)[:20]

    assert verdicts["healthy"]["status"] == "healthy", verdicts["healthy"]
    drifted = {(r["check"], r["feature"]) for r in verdicts["drifted"]["reasons"]}
    assert verdicts["drifted"]["status"] == "data_drift" and ("data_drift", "amount") in drifted, verdicts["drifted"]
    assert ("data_drift", "country") not in drifted, verdicts["drifted"]
    assert verdicts["wrong"]["status"] == "quality_drop", verdicts["wrong"]
    assert any(r["check"] == "quality" and r["metric"] == "roc_auc" for r in verdicts["wrong"]["reasons"]), verdicts["wrong"]


# ---- end to end: the fraud model served over HTTP, `ml_prod monitor` on its traffic ---------------------------------

def fraud_rows(project: Path, label: str, **params) -> pd.DataFrame:
    "Transactions from the fraud example's generator (data.ipynb under papermill)."
    out = project / "monitoring-e2e" / f"{label}.parquet"
    pm.execute_notebook(str(EXAMPLE / "data.ipynb"), str(project / "monitoring-e2e" / f"data-{label}.ipynb"), kernel_name="python3",
                        parameters=dict(output_path=str(out), **params), cwd=str(project), progress_bar=False)
    return pd.read_parquet(out)


def send(url: str, rows: pd.DataFrame) -> tuple[list[str], float, float]:
    "One request per transaction (labels held back); the server's request ids and the window [t0, t1) they fall in."
    import time
    import httpx
    ids, t0 = [], time.time()
    with httpx.Client(base_url=url, timeout=30) as c:
        for rec in rows.drop(columns="is_fraud").to_dict("records"):
            r = c.post("/predict", json=rec)
            assert r.status_code == 200, r.text
            ids.append(r.json()["request_id"])
    return ids, t0, time.time() + 0.001


def label(url: str, ids: list[str], truth):
    import httpx
    with httpx.Client(base_url=url, timeout=30) as c:
        for i in range(0, len(ids), 200):
            batch = [{"request_id": r, "label": int(y)} for r, y in zip(ids[i:i + 200], truth[i:i + 200])]
            assert c.post("/feedback", json=batch).json() == {"stored": len(batch)}


@pytest.mark.slow
@pytest.mark.long  # beyond CI's time limit: `make test LONG=1`
def test_monitor_the_served_fraud_model(project, monkeypatch):
    """Serve the fraud model, send normal traffic with labels, then drifted traffic (inputs shifted and a new fraud
    pattern); `ml_prod monitor` on each window: healthy first (exit 0), data drift naming the shifted features
    second (exit 3), a quality drop once the drifted traffic's labels arrive (exit 3)."""
    import mlflow
    from conftest import cli, deploy
    from ml_prod.models.registry import register
    from ml_prod.settings import load_settings
    s = load_settings()
    (project / "monitoring-e2e").mkdir(exist_ok=True)
    train_rows = fraud_rows(project, "train", rows=8000, seed=0)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", s.tracking_uri)  # train.ipynb logs to the project's store, as under a job
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"): monkeypatch.delenv(var, raising=False)
    pm.execute_notebook(str(EXAMPLE / "train.ipynb"), str(project / "monitoring-e2e" / "train.ipynb"), kernel_name="python3",
                        cwd=str(project), progress_bar=False,
                        parameters=dict(data_path=str(project / "monitoring-e2e" / "train.parquet"), epochs=3, output_dir=str(project / "monitoring-e2e")))
    c = mlflow.tracking.MlflowClient(s.tracking_uri)
    run = c.search_runs([e.experiment_id for e in c.search_experiments()], "params.epochs = '3'", order_by=["attributes.start_time DESC"], max_results=1)[0]
    register(s, run.info.run_id, "fraud-monitored", alias="champion", force=True)
    url = deploy(project, {"name": "monitored", "arms": {"main": {"model": "models:/fraud-monitored@champion", "weight": 100}}, "num_cpus": 0.5,
                           "decision": {"threshold": 0.5, "positive": "fraud", "negative": "legit"}})
    assert len(train_rows) == 8000

    normal = fraud_rows(project, "normal", rows=1500, seed=1)
    ids_a, a0, a1 = send(url, normal)
    label(url, ids_a, normal["is_fraud"])
    drifted = fraud_rows(project, "drifted", rows=1500, seed=2, data_drift=1.0, concept_drift=1.0)
    ids_b, b0, b1 = send(url, drifted)

    def monitor(t0, t1):
        r = cli("--json", "monitor", "monitored", "--since", str(t0), "--until", str(t1), "--cpus", "0.5", check=False, timeout=600)
        assert r.returncode in (0, 3), r.stdout[-3000:] + r.stderr[-3000:]
        return r.returncode, json.loads(r.stdout)

    rc, v = monitor(a0, a1)
    assert (rc, v["status"]) == (0, "healthy"), v
    rc, v = monitor(b0, b1)
    flagged = {r["feature"] for r in v["reasons"] if r["check"] == "data_drift"}
    assert (rc, v["status"]) == (3, "data_drift") and {"amount", "hour", "device"} <= flagged, v
    label(url, ids_b, drifted["is_fraud"])
    rc, v = monitor(b0, b1)
    assert (rc, v["status"]) == (3, "quality_drop"), v
    assert any(r["check"] == "quality" and r["slice"] == "all" for r in v["reasons"]), v
