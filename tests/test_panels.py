"""The panels' plain-Python states and widgets driven without a browser, on real components: the launcher panel
submits to the session's local Ray (conftest's `ray_local`), its job is tracked in MLflow on SQLite in a fresh
project, and its watcher thread follows it to the end while the caller's thread stays free. The deployments panel moves
traffic on the session's serving cluster, and promotes and rolls back through the one promotion guard (evaluations as jobs on
the local Ray, the aliases read from MLflow's SQLite tables); the loop panel approves a pending promotion and adds and removes
schedules in the project's store (read from its raw table).
"""
from __future__ import annotations

import hashlib
import html
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from conftest import RECORD, client, deploy, log_version, status, wait_for
from ml_prod.settings import load_settings

pytest.importorskip("ipywidgets")

PARAMS = ('steps: int = 3  # steps to take {min: 1, max: 20}\n'
          'pause_s: float = 0.5  # seconds per step {min: 0, max: 60}\n'
          'mode = "fast"  # {choices: [fast, careful]}\n'
          'token: str = ""  # api token {secret: true}\n')
BODY = ("import time, hashlib, mlflow\n"
        "for i in range(steps):\n    print('step', i, flush=True)\n    time.sleep(pause_s)\n"
        "mlflow.log_metric('steps_done', steps)\n"
        "mlflow.log_param('token_sha256', hashlib.sha256(token.encode()).hexdigest())\n")


def make_nb(path: Path) -> Path:
    nb = new_notebook(cells=[new_code_cell(PARAMS, metadata={"tags": ["parameters"]}), new_code_cell(BODY)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


@pytest.fixture
def env(ray_local, project_dir):
    return load_settings(), make_nb(project_dir / "steps.ipynb")


def test_launch_from_the_panel_returns_at_once_and_the_watcher_follows_to_the_end(env):
    from ml_prod.ui.launcher import launcher
    s, nb = env
    panel = launcher(nb, settings=s, poll_s=0.2, cwd=nb.parent)
    panel.fields["steps"].value = 6
    panel.fields["token"].value = "hunter2"
    assert panel.fields["token"].value == "" and panel.state.errors == {}
    t0 = time.monotonic()
    panel.launch_button.click()
    launch_s = time.monotonic() - t0
    assert panel.launch_button.disabled is True and "submitting" in panel.message.value
    run_id = wait_for(lambda: panel.state.handle and panel.state.handle.run_id, timeout=60)
    # the job takes 6 x 0.5 s and more (a kernel starts): the caller had its thread back long before
    wait_for(lambda: "FINISHED" in panel.status.value, timeout=120)
    run = client(s).get_run(run_id)
    took_s = (run.info.end_time - run.info.start_time) / 1000
    print(f"launch returned in {launch_s:.2f} s; the job ran {took_s:.1f} s")
    assert launch_s < 0.5 and took_s > 3.0
    assert run.info.status == "FINISHED" and run.data.metrics["steps_done"] == 6.0
    assert run.data.params["steps"] == "6" and "token" not in run.data.params
    assert run.data.params["token_sha256"] == hashlib.sha256(b"hunter2").hexdigest()  # the secret reached the kernel
    assert "step 5" in panel.output.value and run_id in panel.links.value
    assert panel.state.result.output_notebook in panel.links.value
    assert panel.launch_button.disabled is False and panel.cancel_button.disabled is True
    wait_for(lambda: not panel._thread.is_alive(), timeout=10)


def test_cancel_from_the_panel_ends_the_run_killed(env):
    from ml_prod.ui.launcher import launcher
    s, nb = env
    panel = launcher(nb, settings=s, poll_s=0.2, cwd=nb.parent)
    panel.fields["steps"].value, panel.fields["pause_s"].value = 20, 30.0
    panel.launch()
    wait_for(lambda: "step 0" in panel.output.value, timeout=120)  # the kernel runs the loop
    assert panel.cancel_button.disabled is False and panel.launch_button.disabled is True
    with pytest.raises(Exception, match="still runs: cancel it or wait"):
        panel.state.launch()
    t0 = time.monotonic()
    panel.cancel_button.click()
    wait_for(lambda: "KILLED" in panel.status.value, timeout=60)
    print(f"KILLED {time.monotonic() - t0:.1f} s after cancel")
    assert client(s).get_run(panel.state.handle.run_id).info.status == "KILLED"


def test_a_field_in_error_stops_the_launch_before_anything_is_recorded(env):
    from ml_prod.ui.launcher import launcher
    s, nb = env
    panel = launcher(nb, settings=s)
    panel.fields["mode"].value = "careful"
    panel.state.set("steps", "40")  # past the slider's max: as a text value would be
    panel.launch()
    assert "fix the fields first: steps: out of range, allowed 1 &lt;= steps &lt;= 20" in panel.message.value  # HTML-escaped
    assert panel.state.handle is None
    assert client(s).search_runs([e.experiment_id for e in client(s).search_experiments()]) == []


# The deployments panel's state runs in a child process, as a notebook's kernel would: in the full suite this process
# is on the session's ray_local Ray, not the serving cluster (see test_lifecycle's note on conftest.status).
DEPLOYMENTS_CHILD = """
import json, sys
from ml_prod.ui.deployments import DeploymentsState
st = DeploymentsState(sys.argv[1])
st.refresh()
before = st.weights()
st.set_weights(json.loads(sys.argv[2]))
print(json.dumps(dict(before=before, after=st.weights())))
"""


def test_deployments_panel_moves_traffic_in_place_and_the_answers_follow(project):
    import httpx
    log_version("panel_a"), log_version("panel_b", offset=0.5)
    url = deploy(project, {"name": "panels", "arms": {"a": {"model": "models:/tiny@panel_a", "weight": 1},
                                                      "b": {"model": "models:/tiny@panel_b", "weight": 0}}})
    c = httpx.Client(base_url=url, timeout=10)
    arms = lambda: [c.post("/predict", json=RECORD).json()["arm"] for _ in range(30)]
    assert set(arms()) == {"a"}
    pid = status("panels")["replicas"][0]["pid"]
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", DEPLOYMENTS_CHILD, "panels", json.dumps({"a": 0, "b": 1})],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    print(f"weights applied through the panel's state in {time.monotonic() - t0:.1f} s: {r.stdout.strip()}")
    assert set(arms()) == {"b"}  # the endpoint's own answers: every request now goes to b
    st = status("panels")  # `ml_prod serve status`: the deployed config, and the same replica process (no restart)
    assert {n: a["weight"] for n, a in st["arms"].items()} == {"a": 0, "b": 1} and st["replicas"][0]["pid"] == pid
    r = subprocess.run([sys.executable, "-c", DEPLOYMENTS_CHILD, "panels", json.dumps({"nope": 1})], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "panels has no arm 'nope'" in r.stderr  # the same check as `ml_prod serve update`


def test_loop_panel_approves_a_pending_promotion_through_the_guard(project_dir):
    from ml_prod.lifecycle.state import move
    from ml_prod.tracking import tags as keys
    from ml_prod.ui.loop import loop
    s = load_settings()  # the fresh project: events on MLflow's SQLite store in its state folder
    move(s, "fraud", "retraining", "drift", retrain_run="p1", last_retrain=time.time())
    move(s, "fraud", "evaluating", "retrain pipeline p1 FINISHED", challenger=7)
    move(s, "fraud", "awaiting_approval", "challenger 7 better")
    panel = loop(s)
    panel.app.value, panel.by.value = "fraud", "ana@laptop"
    panel.approve_button.click()  # no reason: refused by decide's guard, nothing recorded
    assert "--reason: say why" in panel.message.value
    panel.reason.value = "holdout AUC +0.02, drift report checked"
    panel.approve_button.click()
    c = client(s)
    exp = c.get_experiment_by_name(keys.EVENTS_EXPERIMENT)
    runs = c.search_runs([exp.experiment_id], f"tags.`{keys.KIND}` = 'approval'")
    assert len(runs) == 1, [r.data.tags for r in runs]
    t = runs[0].data.tags
    assert t[keys.STREAM] == "lifecycle/fraud" and t[keys.ACTOR] == "ana@laptop"
    data = json.loads(t[keys.payload_key(0)])  # one part: the decision is short
    assert t[keys.PAYLOAD_PARTS] == "1" and data["approved"] is True and data["challenger"] == 7
    assert data["reason"] == "holdout AUC +0.02, drift report checked"
    move(s, "fraud", "canary", "approved by ana@laptop", canary_since=time.time())  # the engine's next step (test_lifecycle runs it for real)
    panel.state.refresh(); panel._draw()
    panel.reject_button.click()  # nothing pending now: decide's guard refuses, nothing recorded
    assert "no promotion is pending (the loop is canary)" in panel.message.value
    assert len(c.search_runs([exp.experiment_id], f"tags.`{keys.KIND}` = 'approval'")) == 1


# ---- promote and rollback from the deployments panel: the one guard, evaluations on Ray, MLflow on SQLite ----------

def _column_model(column: str):
    "A pyfunc whose score is one column of its input (a local class: cloudpickle carries it by value into the evaluation kernel)."
    import mlflow
    import pandas as pd

    class Column(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return pd.DataFrame({"score": model_input[column].astype(float).to_numpy()})
    return Column()


def _aliases(s) -> dict:
    "The registry's aliases of model fraud, read from MLflow's SQLite tables."
    import sqlite3
    with sqlite3.connect(s.tracking_uri.removeprefix("sqlite:///")) as db:
        return dict(db.execute("select alias, version from registered_model_aliases where name = 'fraud'").fetchall())


def _refusals(s) -> list:
    "The refused promotions on record: (from, to) versions of each run tagged ml_prod.event = promotion_refused, from the raw tags."
    import sqlite3
    q = ("select f.value, t.value from tags e join tags f on f.run_uuid = e.run_uuid and f.key = 'ml_prod.from_version' "
         "join tags t on t.run_uuid = e.run_uuid and t.key = 'ml_prod.to_version' where e.key = 'ml_prod.event' and e.value = 'promotion_refused'")
    with sqlite3.connect(s.tracking_uri.removeprefix("sqlite:///")) as db: return db.execute(q).fetchall()


def test_deployments_panel_promotes_through_the_guard_and_rolls_back(ray_local, project_dir):
    import mlflow
    import numpy as np
    import pandas as pd
    from ml_prod.models.registry import register
    from ml_prod.tracking import store
    from ml_prod.ui.deployments import DeploymentsPanel, DeploymentsState
    s = load_settings()
    rng = np.random.default_rng(0)
    x = rng.uniform(size=300)  # fraud when x > 0.7: the column x separates perfectly, weak is x blurred, noise knows nothing
    holdout = project_dir / "holdout.parquet"
    pd.DataFrame(dict(x=x, weak=x + rng.normal(0, 0.4, 300), noise=rng.uniform(size=300), is_fraud=(x > 0.7).astype(int))).to_parquet(holdout)
    c, exp = store.client(s), store.ensure_experiment(s)

    def version(column, alias, **kw):
        mlflow.pyfunc.save_model(project_dir / column, python_model=_column_model(column), pip_requirements=["mlflow"])
        rid = c.create_run(exp).info.run_id
        c.log_artifacts(rid, str(project_dir / column), "model"); c.set_terminated(rid)
        return register(s, rid, "fraud", alias=alias, **kw)
    assert (version("weak", "champion"), version("x", "challenger")) == (1, 2)

    panel = DeploymentsPanel(DeploymentsState("fraud", s))
    panel.model.value, panel.data_path.value, panel.promote_reason.value = "fraud", str(holdout), "the column model"
    t0 = time.monotonic()
    panel.promote_button.click()
    assert panel._thread.is_alive() and panel.promote_button.disabled  # the click returned while both evaluations run
    wait_for(lambda: not panel._thread.is_alive(), timeout=300)
    print(f"promotion through the panel: {time.monotonic() - t0:.1f} s; {panel.state.verdict['verdict']}")
    assert panel.state.error is None and panel.state.verdict["decision"] == "promoted", panel.message.value
    assert "promoted: fraud@champion version 1 -&gt; 2" in panel.verdict.value and "interval [+" in panel.verdict.value
    assert _aliases(s) == {"champion": 2, "challenger": 2}  # the guard moved champion, in MLflow's own table

    assert version("noise", "challenger") == 3  # worse than the champion on every resample: the guard refuses
    t0 = time.monotonic()
    panel.promote_button.click()
    wait_for(lambda: not panel._thread.is_alive(), timeout=300)
    v = panel.state.verdict
    print(f"refusal through the panel: {time.monotonic() - t0:.1f} s; {v['verdict']}")
    assert v["decision"] == "refused" and v["difference"] < 0 and v["high"] < 0 and v["margin"] == 0.0
    assert "refused: fraud@champion stays version 2 (challenger version 3)" in panel.verdict.value
    assert f"difference {v['difference']:+.4f}" in panel.verdict.value and "margin 0" in panel.verdict.value
    assert _aliases(s) == {"champion": 2, "challenger": 3} and _refusals(s) == [("2", "3")]  # no alias moved; the refusal on record

    panel.rollback_button.click()
    wait_for(lambda: not panel._thread.is_alive(), timeout=60)
    assert "rolled back: fraud@champion version 2 -&gt; 1" in panel.verdict.value
    assert _aliases(s)["champion"] == 1
    panel.rollback_button.click()  # champion is back at its first version: the registry's refusal is shown, not raised
    wait_for(lambda: not panel._thread.is_alive(), timeout=60)
    assert "RegistryError: fraud@champion has no earlier version to roll back to" in panel.message.value
    assert _aliases(s)["champion"] == 1


# ---- schedules created and removed from the loop panel: the CLI's checks, the store's raw table ----------------------

def _stored_schedules(s) -> dict:
    "APScheduler's raw rows in the project's schedule store: {id: (next_run_time, the job's kwargs)}, unpickled from job_state."
    import pickle
    import sqlite3
    with sqlite3.connect(Path(s.state_dir) / "schedules.db") as db:
        rows = db.execute("select id, next_run_time, job_state from ml_prod_schedules").fetchall()
    return {i: (t, pickle.loads(state)["kwargs"]) for i, t, state in rows}


def test_loop_panel_adds_a_schedule_to_the_store_and_refuses_bad_fields(project_dir):
    from ml_prod.ui.loop import loop
    s = load_settings()
    (project_dir / "flows").mkdir()
    (project_dir / "flows" / "train.ipynb").write_text("{}")
    panel = loop(s)
    f = panel.new
    f["name"].value, f["cron"].value, f["timezone"].value, f["target"].value = "nightly", "0 2 * * sun", "Europe/Paris", "flows/train.ipynb"
    t0 = time.time()
    panel.add_button.click()
    assert "schedule nightly added, next fire" in panel.message.value, {k: h.value for k, h in panel.new_errors.items()}
    rows = _stored_schedules(s)
    assert list(rows) == ["nightly"]
    nxt, kw = rows["nightly"]
    assert (kw["cron"], kw["timezone"], kw["notebook"], kw["pipeline"], kw["monitor"]) == ("0 2 * * sun", "Europe/Paris", "flows/train.ipynb", None, None)
    from datetime import datetime
    from zoneinfo import ZoneInfo
    when = datetime.fromtimestamp(nxt, ZoneInfo("Europe/Paris"))
    assert (when.hour, when.minute, when.isoweekday()) == (2, 0, 7) and t0 < nxt <= t0 + 7 * 86400  # the next Sunday 02:00 in Paris
    print(f"stored: next fire {when.isoformat()}")

    # a bad cron, an unknown timezone, an empty name, a missing file: each message beside its field, nothing stored
    cases = [(dict(name="hourly", cron="0 25 * * *", kind="monitor", target="fraud"), "cron", "cron = '0 25 * * *': not a five-field crontab"),
             (dict(name="hourly", cron="0 * * * *", timezone="Europe/Atlantis", kind="monitor", target="fraud"), "timezone",
              "timezone = 'Europe/Atlantis': unknown timezone: use an IANA name"),
             (dict(name="  ", cron="0 * * * *", kind="monitor", target="fraud"), "name", "name = '': give the schedule a name"),
             (dict(name="hourly", cron="0 * * * *", kind="pipeline", target="flows/nope.yaml"), "target", "pipeline = 'flows/nope.yaml': no such file")]
    for values, field, message in cases:
        for k, v in dict(dict(timezone="UTC"), **values).items(): f[k].value = v
        panel.add_button.click()
        shown = {k: h.value for k, h in panel.new_errors.items() if h.value}
        assert list(shown) == [field] and html.escape(message) in shown[field], shown  # the widget holds HTML
        assert list(_stored_schedules(s)) == ["nightly"]

    for k, v in dict(name="hourly", cron="0 * * * *", timezone="UTC", kind="monitor", target="fraud").items(): f[k].value = v
    panel.add_button.click()
    assert panel.new_errors["cron"].value == "" and _stored_schedules(s)["hourly"][1]["monitor"] == "fraud"
    panel.schedule.value = "nightly"
    panel.sched_buttons["remove"].click()  # as `ml_prod schedule remove`
    assert list(_stored_schedules(s)) == ["hourly"] and [r["name"] for r in panel.state.schedules] == ["hourly"]
