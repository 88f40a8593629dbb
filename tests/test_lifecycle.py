"""The retrain-evaluate-canary-promote loop end to end on the fraud example, on the session's cluster: a champion
trained on normal traffic is served with a `lifecycle:` section; drifted traffic (a new fraud pattern) arrives with
its labels; monitoring judges the window; the control service's loop retrains on the labelled production rows,
scores champion and challenger on its frozen holdout, canaries the challenger under live traffic and promotes it.
Every assertion reads raw records: the registry's aliases, MLflow runs and tags, the frozen files, the audit log and
the answers a client got."""
from __future__ import annotations

import json
import threading
import time

import httpx
import pandas as pd
import papermill as pm
import pytest
import yaml

from conftest import cli, deploy, wait_for
from test_monitoring import EXAMPLE, fraud_rows, label, send

MODEL, APP = "fraud-loop", "loop"


class Traffic:
    "A client sending the rows of `frame` round and round to `url` until stopped, without retries; every answer kept."
    def __init__(self, url: str, frame: pd.DataFrame):
        self.url, self.recs, self.answers, self.stop = url, frame.drop(columns="is_fraud").to_dict("records"), [], threading.Event()
        self.t = threading.Thread(target=self.run, daemon=True)

    def run(self):
        with httpx.Client(base_url=self.url, timeout=30) as c:
            i = 0
            while not self.stop.is_set():
                try:
                    r = c.post("/predict", json=self.recs[i % len(self.recs)])
                    self.answers.append((time.time(), r.status_code, r.json().get("version") if r.status_code == 200 else r.text[:200]))
                except httpx.HTTPError as e: self.answers.append((time.time(), type(e).__name__, None))
                i += 1
                time.sleep(0.03)

    def __enter__(self): self.t.start(); return self
    def __exit__(self, *exc): self.stop.set(); self.t.join(60)


def phase() -> dict:
    rows = json.loads(cli("--json", "lifecycle", "status", APP).stdout)
    return rows[0]


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_the_loop_retrains_evaluates_canaries_and_promotes(project, monkeypatch):
    import mlflow
    from ml_prod.audit.query import query
    from ml_prod.models.registry import register, set_alias
    from ml_prod.settings import load_settings
    s = load_settings()
    work = project / "monitoring-e2e"
    work.mkdir(exist_ok=True)
    # the champion: trained on normal traffic, in this process (as test_monitoring does)
    fraud_rows(project, "loop-train", rows=6000, seed=10, fraud_rate=0.05)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", s.tracking_uri)
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"): monkeypatch.delenv(var, raising=False)
    pm.execute_notebook(str(EXAMPLE / "train.ipynb"), str(work / "loop-train-run.ipynb"), kernel_name="python3", cwd=str(project), progress_bar=False,
                        parameters=dict(data_path=str(work / "loop-train.parquet"), epochs=2, seed=10, output_dir=str(work / "loop-champion")))
    c = mlflow.tracking.MlflowClient(s.tracking_uri)
    run = c.search_runs([e.experiment_id for e in c.search_experiments()], "params.seed = '10'", order_by=["attributes.start_time DESC"], max_results=1)[0]
    v1 = register(s, run.info.run_id, MODEL, alias="champion", force=True)
    set_alias(s, MODEL, "challenger", v1, reason="the canary arm needs a version to resolve until a retrain registers one")

    # the application, its loop and its retrain pipeline (the example's notebooks, registering under this test's model name)
    (project / "loop-retrain.yaml").write_text(yaml.safe_dump(dict(name="loop-retrain", experiment="loop-retrain", steps=dict(
        train=dict(notebook=str(EXAMPLE / "train.ipynb"), parameters=dict(data_path="x.parquet", epochs=3, hidden_size=16, output_dir="loop-retrain-model"), timeout=900),
        register=dict(notebook=str(EXAMPLE / "register.ipynb"), parameters=dict(run_id="${steps.train.run_id}", model_name=MODEL, alias="challenger"), timeout=600)))))
    url = deploy(project, {"name": APP, "num_cpus": 0.5, "decision": {"threshold": 0.5, "positive": "fraud", "negative": "legit"},
                           "arms": {"main": {"model": f"models:/{MODEL}@champion", "weight": 100}, "challenger": {"model": f"models:/{MODEL}@challenger", "weight": 0}},
                           "lifecycle": {"retrain": "loop-retrain.yaml", "label": "is_fraud",
                                         "trigger": {"windows": 1, "min_rows": 200, "min_labels": 0, "cooldown_s": 0},
                                         "promotion": {"min_holdout_rows": 100, "resamples": 300},
                                         "canary": {"weight": 0.25, "min_requests": 40, "hold_s": 10, "timeout_s": 900}}}, direct=False)
    assert phase()["phase"] == "watching"

    # drifted traffic with its labels, judged by monitoring
    drifted = fraud_rows(project, "loop-drifted", rows=2500, seed=11, data_drift=1.0, concept_drift=1.0, fraud_rate=0.1)
    ids, t0, t1 = send(url, drifted)
    label(url, ids, drifted["is_fraud"])
    r = cli("--json", "monitor", APP, "--since", str(t0), "--until", str(t1), "--cpus", "0.5", check=False, timeout=900)
    assert r.returncode == 3, r.stdout[-2000:] + r.stderr[-2000:]

    # the loop, with a client sending throughout
    seen = []
    with Traffic(url, drifted) as traffic:
        def settled():
            p = phase()
            if not seen or seen[-1] != p["phase"]: seen.append(p["phase"])
            return p if "canary" in seen and p["phase"] in ("cooling_down", "watching") else None
        final = wait_for(settled, timeout=1500, every=3)
        time.sleep(3)  # answers after the canary's share went back
    print("phases seen:", seen, "final:", final)
    explain = cli("lifecycle", "explain", APP).stdout
    print(explain)

    # raw facts: the registry moved champion to the retrained version, trained by the one retrain pipeline run the loop started
    v2 = int(c.get_model_version_by_alias(MODEL, "champion").version)
    assert v2 != v1 and int(c.get_model_version_by_alias(MODEL, "challenger").version) == v2, (v1, v2)
    retrains = c.search_runs([e.experiment_id for e in c.search_experiments()], f"tags.`ml_prod.lifecycle.app` = '{APP}'")
    assert len(retrains) == 1 and retrains[0].info.status == "FINISHED", [(x.info.run_id, x.info.status) for x in retrains]
    trained_by = c.get_run(c.get_model_version(MODEL, str(v2)).run_id).data.tags["ml_prod.pipeline_run"]
    assert trained_by == retrains[0].info.run_id
    assert retrains[0].info.run_id in explain and "promoted" in explain

    # the frozen rows: production requests this test sent, split by time, no request in both parts
    folder = next((project / ".ml_prod" / "lifecycle" / APP).iterdir())
    parts = pd.read_parquet(folder / "rows.parquet")
    train_ids, holdout_ids = set(parts[parts.part == "train"].request_id), set(parts[parts.part == "holdout"].request_id)
    assert train_ids and holdout_ids and not train_ids & holdout_ids and (train_ids | holdout_ids) <= set(ids)
    assert parts[parts.part == "train"].time.max() <= parts[parts.part == "holdout"].time.min()
    assert list(pd.read_parquet(folder / "train.parquet").columns) == list(drifted.columns)  # features and label, as train.ipynb reads them

    # the client: no failed request throughout; answers from both versions, the last ones from the new champion
    codes = [st for _, st, _ in traffic.answers]
    assert codes and all(st == 200 for st in codes), [a for a in traffic.answers if a[1] != 200][:5]
    versions = [v for _, _, v in traffic.answers]
    assert str(v1) in versions and str(v2) in versions and versions[-1] == str(v2), versions[-20:]
    # the audit log: the canary arm answered with the challenger version while the loop measured it
    audit = query(s.audit_dir, APP, include_shadow=False)
    canary = audit[(audit["arm"] == "challenger") & (audit["status"] == 200)]
    assert len(canary) >= 40 and set(canary["model_version"].astype(str)) == {str(v2)}, canary[["arm", "model_version"]].value_counts()
    print(f"answers: {len(codes)}, failed: 0; canary answers {len(canary)}; versions {v1} -> {v2}")
