"""Schedules: the scheduler's rules through restarts, crashes, overlaps and failures with a clock the test moves
(the real SQLite store, a launcher that records what it starts), then real notebook jobs fired by the control service
on the session's cluster."""
from __future__ import annotations

import json
import sqlite3
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from conftest import cli, cluster_env, wait_for

H = 3600.0


def hour(h: float) -> float: return datetime(2026, 3, 1, tzinfo=timezone.utc).timestamp() + h * H


class Crash(BaseException):
    "The scheduler's process dying mid-tick (not an error it could handle)."


class Launcher:
    """Records each run it starts in `runs` (the stand-in for the tracking store's run records, shared across
    "restarts"); `crash_before`/`crash_after` make the next launch die before or after its run exists."""
    def __init__(self, runs: list):
        self.started, self.crash_before, self.crash_after = runs, False, False

    def launch(self, spec, planned, attempt, window=None):
        if self.crash_before: self.crash_before = False; raise Crash()
        self.started.append(dict(run_id=f"r{len(self.started)}", status="RUNNING", planned=planned, attempt=attempt, ended=None,
                                 schedule=spec.name, window=window))
        if self.crash_after: self.crash_after = False; raise Crash()
        return self.started[-1]["run_id"]

    def runs(self, name): return [dict(r) for r in self.started if r["schedule"] == name]

    def end(self, status="FINISHED", at=None):
        for r in self.started:
            if r["status"] == "RUNNING": r.update(status=status, ended=at)


def per_planned(runs: list) -> dict:
    out = {}
    for r in runs: out[(r["schedule"], r["planned"], r["attempt"])] = out.get((r["schedule"], r["planned"], r["attempt"]), 0) + 1
    return out


def store(tmp_path):
    from ml_prod.control.scheduler import ScheduleStore
    return ScheduleStore(f"sqlite:///{tmp_path}/schedules.db")


def add(st, now, **d):
    from ml_prod.flows.schedules import schedule
    st.put(schedule({"name": "hourly", "cron": "0 * * * *", "notebook": "train.ipynb", **d}), now=now)


def test_restart_mid_schedule_loses_no_run_and_doubles_none(tmp_path):
    from ml_prod.control.scheduler import LOST_AFTER_S, tick
    runs = []
    st, L = store(tmp_path), Launcher(runs)
    add(st, hour(0) + 10)
    tick(now=hour(1) + 2, store=st, launcher=L); L.end(at=hour(1) + 60)
    # the process dies inside the 02:00 tick after recording the fire and before its launch: no run exists
    L.crash_before = True
    with pytest.raises(Crash): tick(now=hour(2) + 2, store=st, launcher=L)
    st.close()
    # restarted at once (a fresh store object and launcher on the same database and run records)
    st, L = store(tmp_path), Launcher(runs)
    tick(now=hour(2) + 30, store=st, launcher=L)  # the 02:00 fire is recorded and younger than LOST_AFTER_S: not doubled
    assert (("hourly", hour(2), 1) not in per_planned(runs)), runs
    tick(now=hour(2) + 30 + LOST_AFTER_S + 1, store=st, launcher=L)  # now it is lost: started once
    L.end(at=hour(2) + 300)
    # the process dies inside the 03:00 tick after the run started and before the history knew: adopted, not doubled
    L.crash_after = True
    with pytest.raises(Crash): tick(now=hour(3) + 2, store=st, launcher=L)
    st.close()
    st, L = store(tmp_path), Launcher(runs)
    for t in (hour(3) + 10, hour(3) + 10 + LOST_AFTER_S + 1): tick(now=t, store=st, launcher=L)
    L.end(at=hour(3) + 400)
    tick(now=hour(4) + 2, store=st, launcher=L)
    # raw run records: exactly one run per planned hour, 01:00 to 04:00
    assert per_planned(runs) == {("hourly", hour(h), 1): 1 for h in (1, 2, 3, 4)}, runs
    # raw history rows: one per planned hour, each with the run that carries that planned time
    rows = sqlite3.connect(tmp_path / "schedules.db").execute(
        "select planned, attempt, run_id from ml_prod_schedule_runs order by planned").fetchall()
    by_run = {r["run_id"]: r["planned"] for r in runs}
    assert [(p, a) for p, a, _ in rows] == [(hour(h), 1) for h in (1, 2, 3, 4)], rows
    assert all(by_run[rid] == p for p, _, rid in rows), (rows, runs)
    st.close()


def test_down_for_hours_coalesces_into_one_fire_and_past_grace_is_missed(tmp_path):
    from ml_prod.control.scheduler import tick
    from ml_prod.flows.schedules import schedule
    runs = []
    st, L = store(tmp_path), Launcher(runs)
    add(st, hour(0) + 10)
    st.put(schedule(dict(name="nightly", cron="0 3 * * *", notebook="n.ipynb", misfire_grace_hours=2)), now=hour(0) + 10)
    out = tick(now=hour(5) + 60, store=st, launcher=L)  # down from 00:00:10 to 05:01
    assert [(r["schedule"], r["planned"]) for r in out["fired"]] == [("hourly", hour(5))], out
    assert [(r["schedule"], r["planned"], r["outcome"]) for r in out["skipped"]] == [("nightly", hour(3), "missed")], out
    rows = sqlite3.connect(tmp_path / "schedules.db").execute(
        "select schedule, planned, coalesced, outcome from ml_prod_schedule_runs order by schedule").fetchall()
    assert rows == [("hourly", hour(5), 4, "submitted"), ("nightly", hour(3), 0, "missed")], rows
    assert [r["planned"] for r in runs] == [hour(5)], runs
    st.close()


def test_a_run_longer_than_its_interval_never_overlaps_itself(tmp_path):
    from ml_prod.control.scheduler import tick
    runs = []
    st, L = store(tmp_path), Launcher(runs)
    add(st, hour(0) + 10)
    for h in range(1, 7):  # the run fired at 01:00 lasts until 03:30; one at 04:00 lasts until 04:10
        tick(now=hour(h) + 1, store=st, launcher=L)
        if h == 3: L.end(at=hour(3.5))
        if h == 4: L.end(at=hour(4) + 600)
        # raw run records, at every tick: never two RUNNING
        assert sum(r["status"] == "RUNNING" for r in runs) <= 1, runs
    assert [r["planned"] for r in runs] == [hour(1), hour(4), hour(5)], runs
    hist = {h["planned"]: h for h in st.history("hourly")}
    assert hist[hour(2)]["outcome"] == hist[hour(3)]["outcome"] == "skipped" and "overlap" in hist[hour(2)]["detail"], hist
    st.close()


def test_failed_runs_are_retried_with_backoff_then_given_up(tmp_path):
    from ml_prod.control.scheduler import tick
    runs = []
    st, L = store(tmp_path), Launcher(runs)
    add(st, hour(0) + 10, retries=2, backoff_s=100)
    tick(now=hour(1), store=st, launcher=L)
    L.end("FAILED", at=hour(1) + 10)
    tick(now=hour(1) + 60, store=st, launcher=L)   # backoff 100 s not passed since the failure at +10
    assert len(runs) == 1
    tick(now=hour(1) + 111, store=st, launcher=L)  # attempt 2
    L.end("FAILED", at=hour(1) + 120)
    tick(now=hour(1) + 250, store=st, launcher=L)  # second backoff is 200 s: not yet
    tick(now=hour(1) + 321, store=st, launcher=L)  # attempt 3
    L.end("FAILED", at=hour(1) + 330)
    tick(now=hour(1) + 2000, store=st, launcher=L)  # retries spent: nothing more
    assert [(r["planned"], r["attempt"]) for r in runs] == [(hour(1), 1), (hour(1), 2), (hour(1), 3)], runs
    st.close()


def test_monitor_windows_leave_no_gap_and_no_overlap(tmp_path):
    from ml_prod.control.scheduler import tick
    from ml_prod.flows.schedules import schedule
    runs = []
    st, L = store(tmp_path), Launcher(runs)
    st.put(schedule(dict(name="drift", cron="0 * * * *", monitor="fraud")), now=hour(0) + 10)
    tick(now=hour(1) + 1, store=st, launcher=L); L.end(at=hour(1) + 60)
    tick(now=hour(2) + 1, store=st, launcher=L); L.end("FAILED", at=hour(2) + 60)   # this window's run failed
    tick(now=hour(5) + 1, store=st, launcher=L); L.end(at=hour(5) + 60)             # down 2 h, then coalesced
    windows = [r["window"] for r in runs]
    assert windows == [(hour(0), hour(1)), (hour(1), hour(2)), (hour(1), hour(5))], windows  # the failed one is covered again
    st.close()


def test_apply_twice_keeps_one_row_per_schedule_and_its_next_fire(tmp_path):
    add(st := store(tmp_path), hour(0) + 10)
    add(st, hour(0) + 2000)
    add(st, hour(0) + 3000, cron="30 * * * *")  # a new cron: the next fire moves
    rows = sqlite3.connect(tmp_path / "schedules.db").execute("select id, next_run_time from ml_prod_schedules").fetchall()
    assert rows == [("hourly", hour(1.5))], rows
    st.close()


def test_a_failed_run_and_a_missed_fire_are_notified_signed(tmp_path, monkeypatch):
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer
    from ml_prod.control.scheduler import tick
    from ml_prod.flows.schedules import schedule
    from ml_prod.notify import verify
    from ml_prod.settings import load_settings
    got = []

    class Receiver(BaseHTTPRequestHandler):
        def log_message(self, *a): pass
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            got.append((verify("k3y", dict(self.headers), body), json.loads(body)))
            self.send_response(204); self.end_headers()
    srv = HTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    (tmp_path / "settings.ini").write_text(f"[DEFAULT]\nnotify_url = http://127.0.0.1:{srv.server_port}/hook\n")
    monkeypatch.setenv("ML_PROD_NOTIFY_SECRET", "k3y")
    runs = []
    st, L = store(tmp_path), Launcher(runs)
    L.s = load_settings(path=tmp_path / "settings.ini", env={"ML_PROD_NOTIFY_SECRET": "k3y"})
    add(st, hour(0) + 10)
    st.put(schedule(dict(name="nightly", cron="0 3 * * *", notebook="n.ipynb", misfire_grace_hours=1)), now=hour(0) + 10)
    tick(now=hour(1) + 1, store=st, launcher=L)
    L.end("FAILED", at=hour(1) + 30)
    tick(now=hour(5) + 1, store=st, launcher=L)  # the 01:00 run failed; the 03:00 nightly fire is 2 h late: missed
    srv.shutdown()
    kinds = sorted((ok, m["kind"], m.get("schedule")) for ok, m in got)
    assert kinds == [(True, "schedule.failed", "hourly"), (True, "schedule.missed", "nightly")], got
    st.close()


def test_a_fire_whose_job_died_is_reaped_by_the_service_and_the_schedule_fires_again(project_dir):
    """The job of a fire lost its Ray (the demo's `cluster down`, a lost node): its run stays RUNNING and silent, and
    the schedule, never two at once, skips every later fire until the control service's job_reaper fails that run."""
    from ml_prod.control.scheduler import Launcher as RealLauncher, ScheduleStore, tick
    from ml_prod.control.service import TASKS, load_function
    from ml_prod.settings import load_settings
    from ml_prod.tracking import tags as keys
    from ml_prod.tracking.store import client, create_job_run, ensure_experiment
    s = load_settings()
    nb = project_dir / "train.ipynb"
    nb.write_text(json.dumps(NOTEBOOK))
    exp = ensure_experiment(s, "scheduled")

    class DiesAtOnce(RealLauncher):
        "The run of each fire is created as the real launcher's job would create it, and its job never beats: its node is gone."
        def launch(self, spec, planned, attempt, window=None):
            run_id = create_job_run(s, exp, nb, nb.read_bytes(), {"x": 1}, {keys.SCHEDULE: spec.name, keys.SCHEDULE_PLANNED: keys.seconds(planned),
                                                                          keys.SCHEDULE_ATTEMPT: str(attempt)}, project_dir)
            client(s).log_metric(run_id, keys.HEARTBEAT, time.time() - 600)  # its last beat, ten minutes ago (60 s of silence gets a job reaped)
            return run_id

    st, L = ScheduleStore.of(s), DiesAtOnce(s)
    try:
        add(st, hour(0) + 10)
        assert len(tick(now=hour(1) + 2, store=st, launcher=L)["fired"]) == 1
        (dead,) = [r["run_id"] for r in L.runs("hourly")]
        assert tick(now=hour(2) + 2, store=st, launcher=L)["skipped"][0]["detail"].startswith("overlap"), "the dead run blocks the 02:00 fire"
        (reaper,) = [t for t in TASKS if t.name == "job_reaper"]  # what the service runs every every_s while it holds the lease
        assert reaper.every_s <= 60 and load_function(reaper.fn)(s) == [dead]
        with sqlite3.connect(s.tracking_uri[len("sqlite:///"):]) as db:  # MLflow's own runs table
            assert db.execute("select status from runs where run_uuid = ?", (dead,)).fetchone() == ("FAILED",)
        assert [f["planned"] for f in tick(now=hour(3) + 2, store=st, launcher=L)["fired"]] == [hour(3)]
    finally:
        st.close()


# ---- real jobs fired by the control service -------------------------------------------------------

NOTEBOOK = {"cells": [{"cell_type": "code", "metadata": {"tags": ["parameters"]}, "source": "x: int = 1", "outputs": [], "execution_count": None},
                      {"cell_type": "code", "metadata": {}, "source": "print('scheduled', x)", "outputs": [], "execution_count": None}],
            "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}, "nbformat": 4, "nbformat_minor": 5}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_control_service_fires_real_jobs(project):
    from ml_prod.settings import load_settings
    from ml_prod.tracking.store import client
    (project / "sched_job.ipynb").write_text(json.dumps(NOTEBOOK))
    cli("cluster", "up", env=cluster_env(project))
    cli("control", "start")
    try:
        cli("schedule", "add", "every-minute", "--cron", "* * * * *", "--notebook", "sched_job.ipynb", "-p", "x", "7")
        fired = cli("--json", "schedule", "run-now", "every-minute")
        now_run = json.loads(fired.stdout)["run_id"]
        s = load_settings()

        def finished():
            hist = json.loads(cli("--json", "schedule", "show", "every-minute").stdout)["history"]
            done = [h for h in hist if h["outcome"] == "FINISHED"]
            return hist if len(done) >= 2 else None
        hist = wait_for(finished, timeout=420, every=5)  # run-now's, and one the cron fired (within a minute)
        cli("schedule", "pause", "every-minute")
        c = client(s)
        for h in [h for h in hist if h["outcome"] == "FINISHED"]:
            run = c.get_run(h["run_id"])  # raw MLflow records
            assert run.info.status == "FINISHED" and run.data.params["x"] == "7", run
            assert run.data.tags["ml_prod.schedule"] == "every-minute" and float(run.data.tags["ml_prod.schedule.planned"]) == h["planned"], run.data.tags
        cron_fired = [h for h in hist if h["run_id"] != now_run and h["outcome"] == "FINISHED"]
        assert cron_fired and all(h["planned"] % 60 == 0 for h in cron_fired), hist  # planned on the minute
        runs = c.search_runs([e.experiment_id for e in c.search_experiments()], "tags.`ml_prod.schedule` = 'every-minute'")
        assert len({r.data.tags["ml_prod.schedule.planned"] for r in runs}) == len(runs), "a planned time fired twice"
    finally:
        cli("schedule", "remove", "every-minute", check=False)


def _open_store(url: str, start: float) -> str:
    from ml_prod.control.scheduler import ScheduleStore
    time.sleep(max(0.0, start - time.time()))
    ScheduleStore(url).close()
    return "ok"


def test_a_fresh_store_opened_by_two_processes_at_once(tmp_path):
    """The control service's first tick and the demo's notebook open a new schedule store at the same moment: both see no
    table, and the one whose CREATE TABLE comes second must not fail ('table ml_prod_schedules already exists')."""
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(4) as pool:
        for i in range(8):
            url, start = f"sqlite:///{tmp_path}/race-{i}.db", time.time() + 1.5
            assert [f.result() for f in [pool.submit(_open_store, url, start) for _ in range(4)]] == ["ok"] * 4
            tables = {n for n, in sqlite3.connect(tmp_path / f"race-{i}.db").execute("select name from sqlite_master where type = 'table'")}
            assert {"ml_prod_schedules", "ml_prod_schedule_runs"} <= tables, tables
