"""`ml_prod jobs list` and `ml_prod jobs show` as thin clients of the project's control service (issue 15, part 1).

With the service up, the CLI asks it over its authenticated loopback API (handlers `jobs.list` and `jobs.show`, which
query MLflow inside the service) and imports neither Ray nor MLflow; without it, the CLI asks MLflow itself, as before.
The CLI runs in a subprocess (its own entry point, wrapped to write `sys.modules` at exit); the service is the
`ControlService` the control actor hosts, started in this process (no Ray: nothing here needs the serving lock).
Checked from raw facts: the runs, tags and metrics in MLflow's SQLite tables, and the modules each process imported."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

# the console script's own entry point, and the modules it imported written to $THIN_TEST_MODULES at exit
PROBE = ("import atexit, json, os, sys\n"
         "atexit.register(lambda: open(os.environ['THIN_TEST_MODULES'], 'w').write(json.dumps(sorted(sys.modules))))\n"
         "sys.argv[0] = 'ml_prod'\n"
         "from ml_prod.cli.main import main\n"
         "main()\n")
HEAVY = ("ray", "mlflow")


def ml_prod(project: Path, *args: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    "`ml_prod ARGS` in `project`, in a new process: its result and the top-level packages it imported."
    modules = project / "modules.json"
    modules.unlink(missing_ok=True)
    r = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=project, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "THIN_TEST_MODULES": str(modules), "COLUMNS": "200"})
    return r, {m.split(".")[0] for m in json.loads(modules.read_text())}


def raw_jobs(tracking_uri: str) -> list[dict]:
    "The job runs in MLflow's SQLite tables, newest first: id, status, duration, error tag, metrics (heartbeat aside)."
    from ml_prod.tracking import tags as keys
    db = sqlite3.connect(tracking_uri.removeprefix("sqlite:///"))
    try:
        runs = db.execute("SELECT r.run_uuid, r.status, r.start_time, r.end_time FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                          "WHERE t.key = ? AND t.value = 'true' ORDER BY r.start_time DESC", (keys.JOB,)).fetchall()
        out = []
        for run_id, status, start, end in runs:
            error = db.execute("SELECT value FROM tags WHERE run_uuid = ? AND key = ?", (run_id, keys.ERROR)).fetchone()
            metrics = dict(db.execute("SELECT key, value FROM latest_metrics WHERE run_uuid = ? AND key != ?", (run_id, keys.HEARTBEAT)))
            out.append(dict(run_id=run_id, status=status, duration_s=(end - start) / 1000, error=error and error[0], metrics=metrics))
        return out
    finally: db.close()


@pytest.fixture
def jobs(project_dir):
    "Three ended job runs (FINISHED with a metric, FAILED with its error, KILLED) in the project's store: (settings, run ids)."
    from ml_prod.settings import load_settings
    from ml_prod.tracking import store
    (project_dir / "settings.ini").write_text("[DEFAULT]\n\n[other]\njob_heartbeat_s = 7\n")
    s = load_settings()
    exp, c, ids = store.ensure_experiment(s), store.client(s), []
    for name, status in (("ok", "FINISHED"), ("bad", "FAILED"), ("stopped", "KILLED")):
        nb = project_dir / f"{name}.ipynb"
        nb.write_text("{}")
        run_id = store.create_job_run(s, exp, nb, b"{}", {"lr": 0.1}, cwd=project_dir)
        if status == "FINISHED":
            c.log_metric(run_id, "accuracy", 0.875)
            c.set_terminated(run_id, "FINISHED")
        else: store.fail_run(c, run_id, f"{name}.ipynb: cell 2: ValueError: {name}" if status == "FAILED" else "cancelled", status)
        ids.append(run_id)
    return s, ids


@pytest.fixture
def service(jobs):
    "The control service's instance (default handlers, no periodic tasks) serving the project's API."
    from ml_prod.control.service import ControlService, api_dir
    s, _ = jobs
    svc = ControlService(s, tasks=[], holder="test-thin").start()
    assert (api_dir(s) / "api.json").is_file()
    try: yield svc
    finally: svc.stop()


def test_jobs_list_and_show_ask_the_service_without_ray_or_mlflow(project_dir, jobs, service):
    s, (ok, bad, stopped) = jobs
    raw = raw_jobs(s.tracking_uri)
    assert [j["run_id"] for j in raw] == [stopped, bad, ok]  # newest first
    commands = [("--json", "jobs", "list"), ("jobs", "list"), ("--json", "jobs", "list", "--status", "failed", "--limit", "1"),
                *[("--json", "jobs", "show", r) for r in (ok, bad, stopped)], ("jobs", "show", ok), ("jobs", "show", bad),
                ("jobs", "show", "0" * 32), ("--json", "jobs", "list", "--status", "done")]
    thin = {}
    for args in commands:
        r, imported = ml_prod(project_dir, *args)
        assert not imported & set(HEAVY), (args, sorted(imported & set(HEAVY)))
        thin[args] = (r.returncode, r.stdout, r.stderr)

    # what it printed is what MLflow's tables hold
    listed = json.loads(thin[("--json", "jobs", "list")][1])
    assert [{k: j[k] for k in ("run_id", "status", "duration_s", "error", "metrics")} for j in listed] == raw
    assert [j["notebook"] for j in listed] == ["stopped.ipynb", "bad.ipynb", "ok.ipynb"]
    assert [j["run_id"] for j in json.loads(thin[("--json", "jobs", "list", "--status", "failed", "--limit", "1")][1])] == [bad]
    for r, row in zip((ok, bad, stopped), reversed(raw)):
        shown = json.loads(thin[("--json", "jobs", "show", r)][1])
        assert {k: shown[k] for k in row} == row
    assert f"ok.ipynb: FINISHED in {raw[2]['duration_s']:.1f} s (run {ok})" in thin[("jobs", "show", ok)][1]
    assert "metrics: accuracy=0.875" in thin[("jobs", "show", ok)][1]
    assert all(r in thin[("jobs", "list")][1] for r in (ok, bad, stopped))
    code, _, err = thin[("jobs", "show", "0" * 32)]
    assert code == 2 and f"no job with run id '{'0' * 32}'" in err
    assert thin[("--json", "jobs", "list", "--status", "done")][0] == 2

    # without the service: MLflow asked in the process, the same output
    service.stop()
    for args in commands:
        r, imported = ml_prod(project_dir, *args)
        if r.returncode == 0 or "jobs show" in " ".join(args): assert "mlflow" in imported, args  # the fallback path it is
        assert (r.returncode, r.stdout, r.stderr) == thin[args], args


def test_a_service_of_another_profile_is_not_asked(project_dir, jobs, service):
    "Profile `other` (its own heartbeat interval) shares the state folder but not the service's settings: the CLI asks MLflow itself."
    s, ids = jobs
    r, imported = ml_prod(project_dir, "--json", "--profile", "other", "jobs", "list")
    assert r.returncode == 0, r.stderr
    assert "mlflow" in imported
    assert [j["run_id"] for j in json.loads(r.stdout)] == [j["run_id"] for j in raw_jobs(s.tracking_uri)]
