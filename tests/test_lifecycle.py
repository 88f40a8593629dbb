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

from conftest import cli, deploy, status, wait_for
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


def champion(project, s, monkeypatch, label: str, seed: int, model: str) -> int:
    """A champion trained on normal traffic in this process (as test_monitoring does), registered as `model`@champion;
    @challenger points at it too until a retrain registers a new version (the canary arm must resolve)."""
    import mlflow
    from ml_prod.models.registry import register, set_alias
    work = project / "monitoring-e2e"
    work.mkdir(exist_ok=True)
    fraud_rows(project, f"{label}-train", rows=6000, seed=seed, fraud_rate=0.05)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", s.tracking_uri)
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"): monkeypatch.delenv(var, raising=False)
    pm.execute_notebook(str(EXAMPLE / "train.ipynb"), str(work / f"{label}-train-run.ipynb"), kernel_name="python3", cwd=str(project), progress_bar=False,
                        parameters=dict(data_path=str(work / f"{label}-train.parquet"), epochs=2, seed=seed, output_dir=str(work / f"{label}-champion")))
    c = mlflow.tracking.MlflowClient(s.tracking_uri)
    run = c.search_runs([e.experiment_id for e in c.search_experiments()], f"params.seed = '{seed}'", order_by=["attributes.start_time DESC"], max_results=1)[0]
    v1 = register(s, run.info.run_id, model, alias="champion", force=True)
    set_alias(s, model, "challenger", v1, reason="the canary arm needs a version to resolve until a retrain registers one")
    return v1


@pytest.mark.slow
@pytest.mark.solo  # the canary is judged from live traffic: run while no other test does
@pytest.mark.timeout(2400)
def test_the_loop_retrains_evaluates_canaries_and_promotes(project, monkeypatch):
    import mlflow
    from ml_prod.audit.query import query
    from ml_prod.settings import load_settings
    s = load_settings()
    v1 = champion(project, s, monkeypatch, "loop", 10, MODEL)
    c = mlflow.tracking.MlflowClient(s.tracking_uri)

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
    mv = c.get_model_version(MODEL, str(v2))  # the MLflow UI tells the same story: the version's description and tags
    assert retrains[0].info.run_id in mv.description and mv.tags["ml_prod.lifecycle.retrain_run"] == retrains[0].info.run_id, mv

    # the frozen rows: production requests this test sent, split by time, no request in both parts
    folder = next((project / ".ml_prod" / "lifecycle" / APP).iterdir())
    parts = pd.read_parquet(folder / "rows.parquet")
    train_ids, holdout_ids = set(parts[parts.part == "train"].request_id), set(parts[parts.part == "holdout"].request_id)
    assert train_ids and holdout_ids and not train_ids & holdout_ids and (train_ids | holdout_ids) <= set(ids)
    assert parts[parts.part == "train"].time.max() <= parts[parts.part == "holdout"].time.min()
    assert list(pd.read_parquet(folder / "train.parquet").columns) == list(drifted.columns)  # features and label, as train.ipynb reads them
    import hashlib
    assert mv.tags["ml_prod.lifecycle.holdout_sha256"] == hashlib.sha256((folder / "holdout.parquet").read_bytes()).hexdigest()

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


SCRAMBLE = {"cells": [
    {"cell_type": "code", "metadata": {"tags": ["parameters"]}, "execution_count": None, "outputs": [],
     "source": "data_path: str = 'x.parquet'  # the loop's training rows\noutput_path: str = 'scrambled.parquet'"},
    {"cell_type": "code", "metadata": {}, "execution_count": None, "outputs": [],
     "source": "import numpy as np, pandas as pd\ndf = pd.read_parquet(data_path)\n"
               "df['is_fraud'] = np.random.default_rng(0).permutation(df['is_fraud'].to_numpy())  # labels no longer match\n"
               "df.to_parquet(output_path, index=False)"}],
    "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}, "nbformat": 4, "nbformat_minor": 5}


@pytest.mark.long  # beyond CI's time limit: `make test LONG=1`
@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_approval_waits_and_a_rejection_or_a_worse_challenger_changes_nothing(project, monkeypatch):
    """Approval mode: the loop waits at a pending promotion; `lifecycle reject` sends it to cooling down, the champion
    stays and the canary never gets traffic. Then, in automatic mode, a retrain whose labels were scrambled gives a
    worse challenger: refused on the holdout, no canary, the champion stays."""
    import mlflow
    from ml_prod.settings import load_settings
    s = load_settings()
    app, model = "loop2", "fraud-loop2"
    v1 = champion(project, s, monkeypatch, "loop2", 20, model)
    c = mlflow.tracking.MlflowClient(s.tracking_uri)
    register_step = dict(notebook=str(EXAMPLE / "register.ipynb"), parameters=dict(run_id="${steps.train.run_id}", model_name=model, alias="challenger"), timeout=600)
    train_step = lambda data: dict(notebook=str(EXAMPLE / "train.ipynb"), parameters=dict(data_path=data, epochs=3, hidden_size=16, output_dir="loop2-model"), timeout=900)
    (project / "loop2-good.yaml").write_text(yaml.safe_dump(dict(name="loop2-good", experiment="loop2", steps=dict(train=train_step("x.parquet"), register=register_step))))
    (project / "scramble.ipynb").write_text(json.dumps(SCRAMBLE))
    (project / "loop2-worse.yaml").write_text(yaml.safe_dump(dict(name="loop2-worse", experiment="loop2", steps=dict(
        scramble=dict(notebook="scramble.ipynb", parameters=dict(data_path="x.parquet", output_path="loop2-scrambled.parquet")),
        train=train_step("${steps.scramble.params.output_path}"), register=register_step))))
    spec = lambda mode, retrain, data: {"name": app, "num_cpus": 0.5, "decision": {"threshold": 0.5, "positive": "fraud", "negative": "legit"},
        "arms": {"main": {"model": f"models:/{model}@champion", "weight": 100}, "challenger": {"model": f"models:/{model}@challenger", "weight": 0}},
        "lifecycle": {"mode": mode, "retrain": retrain, "data_parameter": data, "label": "is_fraud",
                      "trigger": {"windows": 1, "min_rows": 200, "min_labels": 0, "cooldown_s": 0},
                      "promotion": {"min_holdout_rows": 100, "resamples": 300}, "canary": {"weight": 0.25, "min_requests": 40, "hold_s": 10}}}
    phase2 = lambda: json.loads(cli("--json", "lifecycle", "status", app).stdout)[0]
    canary_weight = lambda: status(app)["arms"]["challenger"]["weight"]  # through the CLI: this process may be on the session's other Ray (ray_local)

    def drift_and_judge(seed: int):
        drifted = fraud_rows(project, f"loop2-drifted-{seed}", rows=2500, seed=seed, data_drift=1.0, concept_drift=1.0, fraud_rate=0.1)
        ids, t0, t1 = send(url, drifted)
        label(url, ids, drifted["is_fraud"])
        r = cli("--json", "monitor", app, "--since", str(t0), "--until", str(t1), "--cpus", "0.5", check=False, timeout=900)
        assert r.returncode == 3, r.stdout[-2000:] + r.stderr[-2000:]

    # approval mode: waits, then a rejection
    url = deploy(project, spec("approval", "loop2-good.yaml", "train.data_path"), direct=False)
    drift_and_judge(21)
    wait_for(lambda: phase2()["phase"] == "awaiting_approval", timeout=900, every=3)
    time.sleep(12)  # two more steps of the loop: still waiting, nothing served differently
    assert phase2()["phase"] == "awaiting_approval" and canary_weight() == 0
    assert int(c.get_model_version_by_alias(model, "champion").version) == v1
    out = cli("lifecycle", "reject", app, "--reason", "checked by hand: not this week", "--by", "ana@test").stdout
    assert "rejected by ana@test" in out, out
    wait_for(lambda: phase2()["phase"] in ("cooling_down", "watching"), timeout=120, every=2)
    assert int(c.get_model_version_by_alias(model, "champion").version) == v1 and canary_weight() == 0
    assert "rejected by ana@test: checked by hand: not this week" in cli("lifecycle", "explain", app).stdout

    # automatic mode with scrambled labels: a worse challenger, refused on the holdout
    (project / "loop2.yaml").write_text(yaml.safe_dump({"applications": [spec("automatic", "loop2-worse.yaml", "scramble.data_path")]}))
    cli("serve", "up", str(project / "loop2.yaml"))
    drift_and_judge(22)
    def refused():
        moves = [l for l in cli("lifecycle", "explain", app).stdout.splitlines() if "not promoted" in l]
        return moves or None
    moves = wait_for(refused, timeout=900, every=3)
    print(moves)
    assert "the interval includes zero" in moves[-1] or "not better by the margin" in moves[-1], moves
    assert int(c.get_model_version_by_alias(model, "champion").version) == v1 and canary_weight() == 0
    explain = cli("lifecycle", "explain", app).stdout
    assert "-> canary" not in explain, explain  # no canary in either retrain
