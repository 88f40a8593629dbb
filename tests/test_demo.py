"""`ml_prod demo`, the README's first command, end to end in a throwaway project: the fraud tutorial
runs as papermill on this machine, its jobs on a local Ray, the model is served over HTTP, and the
executed tutorial is saved. Facts are read from the raw stores: MLflow's database, the registry,
the audit segments on disk."""
import json, os, socket, subprocess, sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

ML_PROD = str(Path(sys.executable).parent / "ml_prod")
ROWS, REQUESTS = 2000, 25


@pytest.mark.slow
def test_demo_runs_the_tutorial_end_to_end(project_dir):
    with socket.socket() as sock:  # Serve's HTTP port: a free one, not the default 8000 another Ray may hold
        sock.bind(("127.0.0.1", 0)); port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "ML_PROD_SERVE_PORT": str(port)}
    p = subprocess.run([ML_PROD, "demo", "--rows", str(ROWS), "--epochs", "1", "--requests", str(REQUESTS)],
                       cwd=project_dir, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    state = project_dir / ".ml_prod"
    # the executed tutorial is kept, with the outputs of every code cell
    executed = json.loads((state / "demo" / "fraud_end_to_end.ipynb").read_text())
    code = [c for c in executed["cells"] if c["cell_type"] == "code"]
    assert not [o for c in code for o in c.get("outputs", []) if o["output_type"] == "error"]
    printed = "".join("".join(o.get("text", "")) for c in code for o in c.get("outputs", []))  # nbformat: a string or a list of lines
    assert f"{REQUESTS} transactions scored by version 1" in printed, printed[-2000:]
    # two FINISHED job runs in the demo's experiment, and version 1 of the model behind @champion
    c = MlflowClient(tracking_uri=f"sqlite:///{state}/mlflow.db")
    runs = c.search_runs([c.get_experiment_by_name("fraud-demo").experiment_id])
    assert sorted((r.data.tags["mlflow.runName"], r.info.status) for r in runs) == [("data", "FINISHED"), ("train", "FINISHED")]
    assert int(c.get_model_version_by_alias("fraud-detector", "champion").version) == 1
    # the raw audit records: one 200 per request sent and one 422 for the malformed record
    lines = [json.loads(l) for f in (state / "audit" / "fraud" / "segments").glob("*.jsonl") for l in f.read_text().splitlines() if l]
    assert sorted(r["status"] for r in lines).count(200) == REQUESTS and [r["status"] for r in lines].count(422) == 1
    # batch scoring of the same transactions: one output row each, by version 1, with the endpoint's decisions and scores
    import pyarrow.parquet as pq
    from ml_prod.tracking import tags
    batch = pq.read_table(state / "demo" / "batch_out" / "sample.parquet").to_pandas()
    answered = [r for r in lines if r["status"] == 200]
    assert len(batch) == REQUESTS and set(batch["model_version"]) == {"1"}
    assert sorted(batch["decision"]) == sorted(r["outputs"]["decisions"][0] for r in answered)
    assert sorted(batch["score"]) == pytest.approx(sorted(r["outputs"]["scores"][0] for r in answered), abs=1e-6)
    (run,) = c.search_runs([c.get_experiment_by_name(tags.BATCH_EXPERIMENT).experiment_id])
    assert run.info.status == "FINISHED" and run.data.metrics[tags.BATCH_ROWS_SCORED] == REQUESTS
    assert "The executed tutorial:" in p.stdout and f"127.0.0.1:{port}/fraud" in printed
