"""The runs, sweep and monitoring panels' plain-Python states (and their widgets, clicked from Python) on real MLflow on
SQLite in a fresh project, no Ray: runs logged with MLflow's own client, a sweep's parent and trial runs written by
`ml_prod.flows.tune`'s own run functions, monitoring runs logged by `ml_prod.monitoring.job`'s own functions on a real
audit window. Expectations are the values put in, read back from MLflow's SQLite database where it matters.
"""
from __future__ import annotations

import sqlite3
import time

import pytest

from conftest import client, wait_for
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
