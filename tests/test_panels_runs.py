"""The runs, sweep and monitoring panels' plain-Python states (and their widgets, clicked from Python) on real MLflow on
SQLite in a fresh project, no Ray: runs logged with MLflow's own client, a sweep's parent and trial runs written by
`ml_prod.flows.tune`'s own run functions, monitoring runs logged by `ml_prod.monitoring.job`'s own functions on a real
audit window. Expectations are the values put in, read back from MLflow's SQLite database where it matters.
"""
from __future__ import annotations

import sqlite3
import time

import pytest

from conftest import client, open_sweep, wait_for
from ml_prod.settings import load_settings

pytest.importorskip("ipywidgets")
pytest.importorskip("matplotlib")


def db(s) -> sqlite3.Connection:
    "MLflow's SQLite database of the profile, read directly."
    return sqlite3.connect(s.tracking_uri.removeprefix("sqlite:///"))


def log_run(c, exp: str, name: str, params: dict, history: dict, status: str = "FINISHED") -> str:
    "One run with `params` and, per metric, its values at steps 0, 1, ...; ended with `status` (RUNNING: left open)."
    r = c.create_run(exp, run_name=name)
    for k, v in params.items(): c.log_param(r.info.run_id, k, v)
    for k, vals in history.items():
        for step, v in enumerate(vals): c.log_metric(r.info.run_id, k, v, step=step)
    if status != "RUNNING": c.set_terminated(r.info.run_id, status)
    return r.info.run_id


# ---- runs ---------------------------------------------------------------------------------------------------------------

def test_runs_panel_sorts_compares_and_plots_what_mlflow_holds(project_dir):
    from ml_prod.tracking import store
    from ml_prod.ui.runs import RunsState, runs
    s = load_settings()
    c = client(s)
    exp = store.ensure_experiment(s, "panels")
    ids = {"a": log_run(c, exp, "a", {"lr": 0.1, "batch": 32}, {"loss": [0.9, 0.5, 0.3], "accuracy": [0.7, 0.8, 0.81]}),
           "b": log_run(c, exp, "b", {"lr": 0.01, "batch": 32}, {"loss": [1.0, 0.6, 0.4, 0.2], "accuracy": [0.6, 0.9, 0.93, 0.95]}, "FAILED"),
           "c": log_run(c, exp, "c", {"lr": 0.5, "batch": 32}, {"loss": [2.0]}, "RUNNING")}  # no accuracy yet
    st = RunsState("panels", s)
    rows = {r["name"]: r for r in st.refresh()}
    raw = {n: st for n, st in db(s).execute("select name, status from runs")}
    assert {n: r["status"] for n, r in rows.items()} == raw == {"a": "FINISHED", "b": "FAILED", "c": "RUNNING"}
    for n, (t0, t1) in {n: (a, b) for n, a, b in db(s).execute("select name, start_time, end_time from runs where end_time is not null")}.items():
        assert rows[n]["duration_s"] == pytest.approx((t1 - t0) / 1000) and rows[n]["start"] == t0 / 1000
    assert [r["name"] for r in st.rows] == ["c", "b", "a"]  # newest first
    assert "params.lr" in st.columns and "params.batch" not in st.columns and {"metrics.loss", "metrics.accuracy"} <= set(st.columns)
    assert [r["name"] for r in st.sort("metrics.accuracy", descending=False)] == ["a", "b", "c"]  # c has none: last
    assert [r["name"] for r in st.sort("metrics.accuracy")] == ["b", "a", "c"]                   # still last
    assert [r["name"] for r in st.sort("params.lr")] == ["c", "a", "b"]                          # 0.5, 0.1, 0.01 as numbers

    cmp = st.compare([ids["a"], ids["b"], ids["c"]])
    assert cmp.loc[("params", "lr")].tolist()[:3] == ["0.1", "0.01", "0.5"] and cmp.loc[("params", "lr"), "differs"]
    assert not cmp.loc[("params", "batch"), "differs"]
    assert cmp.loc[("metrics", "accuracy"), "differs"] and cmp.loc[("metrics", "accuracy"), ids["a"]] == 0.81  # last value; c lacks it

    hist = st.history("loss", [ids["b"]])[ids["b"]]
    raw_hist = list(db(s).execute("select step, value from metrics where run_uuid = ? and key = 'loss' order by step", (ids["b"],)))
    assert hist == raw_hist == [(0, 1.0), (1, 0.6), (2, 0.4), (3, 0.2)]
    fig = st.plot_steps("loss", [ids["a"], ids["b"]])
    assert [(list(l.get_xdata()), list(l.get_ydata()), l.get_label()) for l in fig.axes[0].lines] == \
        [([0, 1, 2], [0.9, 0.5, 0.3], "a"), ([0, 1, 2, 3], [1.0, 0.6, 0.4, 0.2], "b")]
    bars = st.plot_across("accuracy").axes[0]
    assert [p.get_height() for p in bars.patches] == [0.81, 0.95] and [t.get_text() for t in bars.get_xticklabels()] == ["a", "b"]  # in lr order

    with pytest.raises(Exception, match="experiment = 'nope': no such experiment .*panels"): RunsState("nope", s).refresh()
    with pytest.raises(Exception, match="run_ids: 'x1' not among the 3 runs"): st.compare(["x1"])

    p = runs("panels", s)  # the widgets, clicked from Python
    p.selected.value = (ids["a"], ids["b"])
    p.buttons["compare"].click()
    assert p.comparison.value.count("ml-prod-differs") == 3  # lr, accuracy, loss; batch is 32 in both
    p.metric.value = "loss"
    p.buttons["steps"].click()
    assert bytes(p.plot.value).startswith(b"\x89PNG") and p.message.value == ""
    p.by.value = "status"
    assert [r["status"] for r in p.state.rows] == ["RUNNING", "FINISHED", "FAILED"] and p.table.value.index(">c<") < p.table.value.index(">b<")


# ---- sweep ----------------------------------------------------------------------------------------------------------------

@pytest.fixture
def a_sweep(project_dir):
    "A running sweep of 'score' (max) written by flows.tune's own functions (`_open_sweep`, `_trial_run`), no Ray: (settings, sweep run id, trial())."
    from mlflow.entities import Metric
    from ml_prod.flows import tune
    from ml_prod.tracking import store
    s = load_settings()
    c = client(s)
    sw = open_sweep(s, project_dir, samples=4)
    sweep_id = sw.sweep_run_id

    def trial(tid: str, lr: float, scores: list, end: str | None = None, error: str | None = None) -> str:
        "A trial's child run as `_run_trial` creates it, its reports logged as the supervisor logs them, ended as it ends them."
        run_id, _ = tune._trial_run(sw, {"lr": lr}, tid)
        now = int(time.time() * 1000)
        if scores: c.log_batch(run_id, metrics=[Metric("score", v, now + i, i) for i, v in enumerate(scores)])
        if end == "FINISHED": c.set_terminated(run_id, end)
        elif end: store.fail_run(c, run_id, error, end)
        return run_id
    return s, sweep_id, trial


def test_sweep_monitor_marks_stopped_and_failed_trials_and_follows_the_sweep_to_its_end(a_sweep):
    from ml_prod.flows import tune
    from ml_prod.ui.sweep import SweepState, sweep
    s, sweep_id, trial = a_sweep
    ids = {"t1": trial("abc_00001", 0.1, [0.60, 0.75, 0.82], "FINISHED"),
           "t2": trial("abc_00002", 0.5, [0.40], "KILLED", "train.ipynb: cell 2: stopped by asha after 1 report(s) of score"),
           "t3": trial("abc_00003", 1e-3, [], "FAILED", "train.ipynb: cell 2: ValueError: diverged"),
           "t4": trial("abc_00004", 0.2, [0.50, 0.85])}  # still running, best so far
    st = SweepState(ids["t3"], s)  # a trial's run id finds its sweep
    trials = {t["run_id"]: t for t in st.refresh()}
    raw = dict(db(s).execute("select run_uuid, status from runs where run_uuid != ?", (sweep_id,)))
    assert {i: t["status"] for i, t in trials.items()} == raw
    assert [trials[ids[k]]["state"] for k in ("t1", "t2", "t3", "t4")] == ["finished", "stopped", "failed", "running"]
    assert trials[ids["t3"]]["error"].endswith("ValueError: diverged") and trials[ids["t2"]]["params"] == {"lr": "0.5"}
    assert (st.sweep_run_id, st.metric, st.mode, st.running) == (sweep_id, "score", "max", True)
    assert st.best == ids["t4"]  # 0.85 > 0.82 (the last values); no best_run_id tag while it runs
    assert st.history[ids["t1"]] == list(db(s).execute("select step, value from metrics where run_uuid = ? and key = 'score' order by step", (ids["t1"],)))
    lines = {l.get_label(): l for l in st.plot().axes[0].lines}
    assert set(lines) == {"abc_00001", "abc_00002 (stopped)", "abc_00004 (best)"}  # the failed trial reported nothing
    assert list(lines["abc_00004 (best)"].get_ydata()) == [0.50, 0.85] and lines["abc_00004 (best)"].get_linewidth() == 3.0
    assert lines["abc_00002 (stopped)"].get_linestyle() == "--"

    with pytest.raises(Exception, match="run_id_or_experiment = 'nope': no run has that id, and experiment = 'nope'"): SweepState("nope", s).refresh()
    plain = client(s).create_run(st.sweep.info.experiment_id, run_name="plain").info.run_id
    with pytest.raises(Exception, match=f"run {plain} is neither a sweep nor a trial of one"): SweepState(plain, s).refresh()
    assert len(SweepState("tuning", s).refresh()) == 4  # an experiment: its newest sweep

    t0 = time.monotonic()
    p = sweep(sweep_id, s, every_s=0.2)  # running: it follows the sweep from a thread
    assert time.monotonic() - t0 < 5 and p._thread.is_alive()
    assert p.table.value.count("ml-prod-best") == 1 and f'data-run="{ids["t4"]}"' in p.table.value.split("ml-prod-best")[1][:60]
    ids["t5"] = trial("abc_00005", 0.3, [0.70, 0.80, 0.95], "FINISHED")
    wait_for(lambda: "abc_00005" in p.table.value, timeout=20)
    c = client(s)
    c.set_terminated(ids["t4"], "FINISHED")
    best = tune.TrialResult(ids["t5"], "train.ipynb", "FINISHED", params={"lr": 0.3}, metric=0.95)
    tune._close_sweep(s, sweep_id, best, "score", False)  # as tune_notebook ends it
    wait_for(lambda: not p._thread.is_alive(), timeout=20)
    tags = dict(db(s).execute("select key, value from tags where run_uuid = ?", (sweep_id,)))
    assert p.state.status == "FINISHED" == dict(db(s).execute("select run_uuid, status from runs"))[sweep_id]
    assert p.state.best == tags["ml_prod.best_run_id"] == ids["t5"] and "FINISHED" in p.summary.value and "abc_00005" in p.summary.value
