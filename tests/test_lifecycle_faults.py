"""The retrain loop under faults, on the session's serving cluster and its control service: a paused loop holds; a
training job that fails is recorded and backed off, and the champion stays; the control service killed with SIGKILL
while the retrain it started is training comes back, adopts that retrain at the step it was in, and the training runs
once; a canary whose live error rate rises is rolled back and the traffic returns to the champion.

The loop's inputs are real: requests and their labels sent over HTTP to the served application (the rows it retrains
on and its holdout), and a drifted monitoring verdict on record as a monitoring job writes it (a finished run in the
monitoring experiment; no reference profile exists for the tiny model). Every assertion reads raw records: MLflow's
runs and the registry, the loop's events in the tracking store, and a file each training appends a line to."""
from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import httpx
import nbformat
import pytest
import yaml
from nbformat.v4 import new_code_cell, new_notebook

from conftest import HERE, cli, deploy, log_version, wait_for
from test_monitoring import EXAMPLE

APP, CHAMP, CHALL = "faults", "faults-champion", "faults-challenger"
COOLDOWN_S = 5.0


def phase() -> dict:
    return json.loads(cli("--json", "lifecycle", "status", APP).stdout)[0]


def service() -> dict:
    return json.loads(cli("control", "status", "--json").stdout)


def settings():
    from ml_prod.settings import load_settings
    return load_settings()


def write_training(project: Path) -> Path:
    """The retrain pipeline's training step: appends a line to trainings.txt, fails while `faults-fail` exists, waits
    while `faults-hold` exists, then logs the tiny model in its job's run: as it is, or, while `faults-better` exists,
    better calibrated (offset 0.2: right at the 0.5 threshold where the labels change) but failing in a replica on
    amounts above 260."""
    nb = new_notebook(cells=[
        new_code_cell('data_path: str = ""  # the frozen training rows', metadata={"tags": ["parameters"]}),
        new_code_cell(f"import os, time, mlflow, pandas as pd\nfrom pathlib import Path\nroot = Path({str(project)!r})\n"
                      "with open(root / 'trainings.txt', 'a') as f: f.write(f'{os.getpid()} {data_path}\\n')\n"
                      "if (root / 'faults-fail').exists(): raise RuntimeError('the training data is unreadable (the fault this test injects)')\n"
                      "while (root / 'faults-hold').exists(): time.sleep(0.2)\n"
                      "X = pd.read_parquet(data_path)[['amount', 'country']].head(2)\n"
                      "cfg = dict(offset=0.2, fail_above=260.0) if (root / 'faults-better').exists() else None\n"
                      f"with mlflow.start_run(): mlflow.pyfunc.log_model(name='model', python_model={str(HERE / 'tiny_model.py')!r}, input_example=X, model_config=cfg)"),
    ])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = project / "faults-train.ipynb"
    nbformat.write(nb, path)
    return path


def traffic_with_labels(url: str, n: int, seed: int) -> tuple[float, float, list[str]]:
    "`n` answered requests with their labels (the label: amount over 150); the window [t0, t1) and the request ids."
    rng, ids, t0 = random.Random(seed), [], time.time()
    with httpx.Client(base_url=url, timeout=30) as c:
        rows = [{"amount": rng.uniform(0, 300), "country": rng.choice(["US", "FR"])} for _ in range(n)]
        for row in rows:
            r = c.post("/predict", json=row)
            assert r.status_code == 200, r.text
            ids.append(r.json()["request_id"])
        stored = c.post("/feedback", json=[{"request_id": i, "label": int(row["amount"] > 150)} for i, row in zip(ids, rows)]).json()
        assert stored == {"stored": n}, stored
    return t0, time.time() + 0.001, ids


def drifted_verdict(t0: float, t1: float, rows: int) -> str:
    "A finished monitoring run judging [t0, t1) drifted, with the tags a monitoring job writes; its run id."
    from mlflow.tracking import MlflowClient
    from ml_prod.tracking import tags
    c = MlflowClient(settings().tracking_uri)
    exp = c.get_experiment_by_name(tags.MONITOR_EXPERIMENT)
    exp_id = exp.experiment_id if exp else c.create_experiment(tags.MONITOR_EXPERIMENT)
    reasons = [{"check": "data_drift", "feature": "amount", "metric": "psi", "value": 0.9, "threshold": 0.2, "n": rows}]
    run = c.create_run(exp_id, tags={tags.MONITOR_APP: APP, tags.MONITOR_STATUS: "data_drift", tags.MONITOR_START: str(t0),
                                     tags.MONITOR_END: str(t1), tags.MONITOR_RESULT: json.dumps({"reasons": reasons})})
    c.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def retrain_runs(retrain_id: str) -> list:
    from mlflow.tracking import MlflowClient
    from ml_prod.tracking import tags
    c = MlflowClient(settings().tracking_uri)
    return c.search_runs([e.experiment_id for e in c.search_experiments()], f"tags.`{tags.LIFECYCLE_RETRAIN}` = '{retrain_id}'")


def moves() -> list[dict]:
    "The loop's moves of APP, oldest first, from the raw events in the tracking store."
    from ml_prod.lifecycle.state import stream
    from ml_prod.tracking import events
    return [{**e.data, "time": e.time} for e in events.read(settings(), stream(APP), kinds=("move",))]


def lifecycle_runs() -> int:
    return next(t["runs"] for t in service()["instance"]["tasks"] if t["name"] == "lifecycle")


@pytest.fixture(scope="module")
def loop_app(project):
    "APP served on tiny@faults-champion with a lifecycle: section whose retrain pipeline runs faults-train.ipynb, then registers."
    from ml_prod.models.registry import set_alias
    v1 = log_version(CHAMP)
    set_alias(settings(), "tiny", CHALL, v1, reason="the canary arm needs a version to resolve until a retrain registers one")
    (project / "faults-retrain.yaml").write_text(yaml.safe_dump(dict(name="faults-retrain", experiment="faults-retrain", steps=dict(
        train=dict(notebook=str(write_training(project)), parameters=dict(data_path="x.parquet"), timeout=600),
        register=dict(notebook=str(EXAMPLE / "register.ipynb"), parameters=dict(run_id="${steps.train.run_id}", model_name="tiny", alias=CHALL), timeout=300)))))
    url = deploy(project, {"name": APP, "num_cpus": 0, "decision": {"threshold": 0.5, "positive": "fraud", "negative": "legit"},
                           "arms": {"main": {"model": f"models:/tiny@{CHAMP}", "weight": 100}, "challenger": {"model": f"models:/tiny@{CHALL}", "weight": 0}},
                           "lifecycle": {"retrain": "faults-retrain.yaml", "label": "y", "challenger_alias": CHALL,
                                         "trigger": {"windows": 1, "min_rows": 100, "min_labels": 0, "cooldown_s": COOLDOWN_S},
                                         "promotion": {"metric": "accuracy", "min_holdout_rows": 20, "resamples": 200},
                                         "canary": {"weight": 0.25, "min_requests": 40, "hold_s": 120, "timeout_s": 600}}}, direct=False)
    assert phase()["phase"] == "watching"
    yield url, v1
    cli("serve", "down", APP, check=False)
    for f in ("faults-fail", "faults-hold", "faults-better"): (project / f).unlink(missing_ok=True)


def champion() -> int:
    from mlflow.tracking import MlflowClient
    return int(MlflowClient(settings().tracking_uri).get_model_version_by_alias("tiny", CHAMP).version)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_pause_holds_then_a_failing_training_is_recorded_and_backed_off(loop_app, project):
    url, v1 = loop_app
    (project / "faults-fail").touch()
    cli("lifecycle", "pause", APP, "--reason", "holding the loop for a data fix", "--by", "ana")
    t0, t1, _ = traffic_with_labels(url, 150, seed=1)
    verdict = drifted_verdict(t0, t1, 150)
    retrain_id = f"{APP}-{verdict[:12]}"
    # paused: a retrain is due, but however many steps the loop takes, none starts
    n = lifecycle_runs()
    wait_for(lambda: lifecycle_runs() >= n + 3, timeout=120, every=1)
    assert phase()["phase"] == "paused" and retrain_runs(retrain_id) == [] and not (project / "trainings.txt").exists()
    cli("lifecycle", "resume", APP, "--reason", "data fixed", "--by", "ana")
    # the control service's loop retrains on that verdict; the training fails; the loop cools down, then watches again
    wait_for(lambda: phase()["phase"] == "watching" and any(m["phase"] == "cooling_down" for m in moves()), timeout=600, every=2)
    (run,) = retrain_runs(retrain_id)  # one retrain, and it FAILED
    assert run.info.status == "FAILED", run.info
    failed = next(m for m in moves() if m["phase"] == "cooling_down")
    assert run.info.run_id in failed["reason"] and "FAILED" in failed["reason"] and "champion stays" in failed["reason"], failed
    print("moves:", [(m["phase"], m["reason"][:120]) for m in moves()])
    assert [m["phase"] for m in moves()][-5:] == ["paused", "watching", "retraining", "cooling_down", "watching"], moves()
    assert champion() == v1
    lines = (project / "trainings.txt").read_text().splitlines()
    assert len(lines) == 1, lines  # the training ran once
    # backed off: the same verdict never starts another retrain, however many steps the loop takes
    n = lifecycle_runs()
    wait_for(lambda: lifecycle_runs() >= n + 3, timeout=120, every=1)
    assert len(retrain_runs(retrain_id)) == 1 and phase()["phase"] == "watching" and champion() == v1
    assert len((project / "trainings.txt").read_text().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_service_killed_during_a_retrain_resumes_it_once(loop_app, project):
    from mlflow.tracking import MlflowClient
    from ml_prod.tracking import tags
    url, v1 = loop_app
    (project / "faults-fail").unlink(missing_ok=True)
    (project / "faults-hold").touch()
    before = len((project / "trainings.txt").read_text().splitlines()) if (project / "trainings.txt").exists() else 0
    t0, t1, _ = traffic_with_labels(url, 150, seed=2)
    verdict = drifted_verdict(t0, t1, 150)
    retrain_id = f"{APP}-{verdict[:12]}"
    # the training the loop started is running (held): kill the service's process
    wait_for(lambda: len((project / "trainings.txt").read_text().splitlines()) > before, timeout=300, every=1)
    old = service()["instance"]
    os.kill(old["pid"], signal.SIGKILL)

    def back():
        r = cli("control", "status", "--json", check=False)
        st = json.loads(r.stdout) if r.returncode == 0 else None
        return st if st and st["running"] and st["instance"]["pid"] != old["pid"] and st["instance"]["active"] else None
    wait_for(back, timeout=180, every=1)
    assert phase()["phase"] == "retraining"  # the restarted service took the loop up where it was
    (project / "faults-hold").unlink()
    wait_for(lambda: phase()["phase"] in ("cooling_down", "watching") and moves()[-1]["previous"] != "retraining", timeout=600, every=2)
    # raw facts: one retrain run, FINISHED; one training; one new version, trained by that run; the moves in order
    (run,) = retrain_runs(retrain_id)
    assert run.info.status == "FINISHED", run.info
    lines = (project / "trainings.txt").read_text().splitlines()
    assert len(lines) == before + 1, lines
    c = MlflowClient(settings().tracking_uri)
    made = [v for v in c.search_model_versions("name = 'tiny'") if c.get_run(v.run_id).data.tags.get(tags.PIPELINE_RUN) == run.info.run_id]
    assert len(made) == 1 and int(c.get_model_version_by_alias("tiny", CHALL).version) == int(made[0].version), made
    ms = moves()
    print(f"service pid {old['pid']} killed, back as {service()['instance']['pid']}; moves:", [(m["phase"], m["reason"][:120]) for m in ms])
    i = max(k for k, m in enumerate(ms) if m["phase"] == "retraining")
    assert ms[i + 1]["phase"] == "evaluating" and run.info.run_id in ms[i + 1]["reason"], ms[i:]
    # the challenger scores exactly as the champion (the same tiny model): the guard refuses it and the champion stays
    assert ms[i + 2]["phase"] == "cooling_down" and "not promoted" in ms[i + 2]["reason"], ms[i:]
    assert champion() == v1


class Client:
    "Requests sent without retries until stopped, every answer kept as (time, status, version or error text)."
    def __init__(self, url: str):
        self.url, self.answers, self.stop, self.rng = url, [], __import__("threading").Event(), random.Random(7)
        self.t = __import__("threading").Thread(target=self.run, daemon=True)

    def run(self):
        with httpx.Client(base_url=self.url, timeout=30) as c:
            while not self.stop.is_set():
                try:
                    r = c.post("/predict", json={"amount": self.rng.uniform(0, 300), "country": "US"})
                    self.answers.append((time.time(), r.status_code, r.json().get("version") if r.status_code == 200 else r.text[:200]))
                except httpx.HTTPError as e: self.answers.append((time.time(), type(e).__name__, None))
                time.sleep(0.02)

    def __enter__(self): self.t.start(); return self
    def __exit__(self, *exc): self.stop.set(); self.t.join(60)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_canary_whose_error_rate_rises_is_rolled_back(loop_app, project):
    from ml_prod.audit.query import query
    from conftest import status
    url, v1 = loop_app
    for f in ("faults-fail", "faults-hold"): (project / f).unlink(missing_ok=True)
    (project / "faults-better").touch()
    t0, t1, _ = traffic_with_labels(url, 150, seed=3)
    verdict = drifted_verdict(t0, t1, 150)
    with Client(url) as client:
        # the retrained challenger is better on the holdout (accuracy), so it goes to a canary, where it fails on large amounts
        wait_for(lambda: any(m["phase"] == "rolled_back" for m in moves()) and phase()["phase"] in ("cooling_down", "watching"), timeout=600, every=2)
        back = next(m for m in moves() if m["phase"] == "rolled_back")["time"]
        wait_for(lambda: sum(1 for a in client.answers if a[0] > back + 2) >= 50, timeout=120, every=0.5)  # traffic after the rollback
    ms = moves()
    print("moves:", [(m["phase"], m["reason"][:140]) for m in ms])
    i = max(k for k, m in enumerate(ms) if m["phase"] == "retraining")
    assert [m["phase"] for m in ms[i:]][:5] == ["retraining", "evaluating", "canary", "rolled_back", "cooling_down"], ms[i:]
    assert "canary error rate" in ms[i + 3]["reason"], ms[i + 3]
    assert champion() == v1 and status(APP)["arms"]["challenger"]["weight"] == 0, status(APP)
    # raw facts: the audit records hold errors only on the canary's arm; the champion's arm answered every request
    live = query(settings().audit_dir, APP, start=ms[i + 2]["time"], include_shadow=False)  # since the canary started
    assert (live[live["arm"] == "challenger"]["status"] >= 500).sum() > 0 and (live[live["arm"] == "main"]["status"] >= 500).sum() == 0
    failed = [a for a in client.answers if a[1] != 200]
    assert failed and all(a[0] <= back + 2 for a in failed), failed[-5:]  # the canary's errors, none once the rollback is in place
    after = [a for a in client.answers if a[0] > back + 2]
    assert after and {a[2] for a in after} == {str(v1)}, after[-5:]
    print(f"{len(client.answers)} requests, {len(failed)} failed (all on the canary, before its rollback), {len(after)} after it, all from version {v1}")
