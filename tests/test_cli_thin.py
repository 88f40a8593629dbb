"""`ml_prod jobs list` and `ml_prod jobs show` as thin clients of the project's control service (issue 15, part 1).

With the service up, the CLI asks it over its authenticated loopback API (handlers `jobs.list` and `jobs.show`, which
query MLflow inside the service) and imports neither Ray nor MLflow; without it, the CLI asks MLflow itself, as before.
The CLI runs in a subprocess (its own entry point, wrapped to write `sys.modules` at exit); the service is the
`ControlService` the control actor hosts, started in this process (no Ray).
`ml_prod run` goes to the service's warm job workers (`ml_prod.jobs.warm`).
Checked from raw facts: the runs, tags and metrics in MLflow's SQLite tables, the modules each process imported, the
job's processes (psutil) and Ray's own resource view."""
from __future__ import annotations

import json
import re
import signal
import time
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
            out.append(dict(run_id=run_id, status=status, duration_s=(end - start) / 1000 if end else None, error=error and error[0], metrics=metrics))
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


# ---- `ml_prod run` through the service: a real Ray (the session's), the service in this process submitting on it ---------

SLEEPER = "import os, subprocess, time\nchild = subprocess.Popen(['sleep', '300'])\nprint('child', child.pid, flush=True)\ntime.sleep(300)"
PREFIX = re.compile(r"^\x1b\[36m\(job:(?P<nb>[^ ]+) pid=(?P<pid>\d+)\)\x1b\[0m (?P<line>.*)$")


def make_nb(path: Path, *cells: str) -> Path:
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook
    nb = new_notebook(cells=[new_code_cell("x: int = 1  # a number", metadata={"tags": ["parameters"]}), *map(new_code_cell, cells)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def raw_run(tracking_uri: str, run_id: str) -> dict:
    "One run's row and tags in MLflow's SQLite tables, and its artifact folder on disk."
    db = sqlite3.connect(tracking_uri.removeprefix("sqlite:///"))
    try:
        status, start, end, uri = db.execute("SELECT status, start_time, end_time, artifact_uri FROM runs WHERE run_uuid = ?", (run_id,)).fetchone()
        tags = dict(db.execute("SELECT key, value FROM tags WHERE run_uuid = ?", (run_id,)))
        params = dict(db.execute("SELECT key, value FROM params WHERE run_uuid = ?", (run_id,)))
    finally: db.close()
    return dict(status=status, duration_s=(end - start) / 1000 if end else None, tags=tags, params=params, artifact_uri=uri,
                artifacts=Path(uri.removeprefix("file://")))


@pytest.fixture
def run_service(ray_local, project_dir):
    "The control service's instance (default handlers, no periodic tasks) in this process, submitting jobs on the session's Ray."
    from ml_prod.control.service import ControlService
    from ml_prod.settings import load_settings
    s = load_settings()
    svc = ControlService(s, tasks=[], holder="test-thin-run").start()
    try: yield s
    finally:
        svc.stop()
        from ml_prod.jobs import warm
        warm.shutdown()  # this process's warm job workers (the service's, here)


def test_run_through_the_service_prints_what_run_prints_without_ray_or_mlflow(project_dir, run_service):
    s = run_service
    nb = make_nb(project_dir / "ok.ipynb", "import os\nprint('x is', x, 'kernel', os.getpid(), 'leftover' in globals())\nleftover = 1")
    outs = []
    for x in (7, 8):  # the second job on the same worker: a kernel of its own, which has run nothing else
        r, imported = ml_prod(project_dir, "run", str(nb), "-p", "x", str(x))
        assert r.returncode == 0 and not imported & set(HEAVY), (r.returncode, r.stdout, r.stderr, sorted(imported & set(HEAVY)))
        outs.append(r.stdout)
    kernels = []
    for x, out in zip((7, 8), outs):
        run_id = re.search(r"\(run ([0-9a-f]{32})\)", out).group(1)
        raw = raw_run(s.tracking_uri, run_id)
        assert raw["status"] == "FINISHED" and raw["params"] == {"x": str(x)}, raw
        # each output line is the job's log line with Ray's prefix (notebook, supervisor pid); then run's summary
        *lines, summary_head, nb_line = out.splitlines()
        got = [PREFIX.match(l) for l in lines]
        assert all(got) and {(m["nb"], m["pid"]) for m in got} == {("ok.ipynb", raw["tags"]["ml_prod.supervisor_pid"])}, out
        assert [m["line"] for m in got] == (raw["artifacts"] / "job.log").read_text().splitlines(), out
        assert summary_head == f"ok.ipynb: FINISHED in {raw['duration_s']:.1f} s (run {run_id})", out
        assert nb_line == f"  executed notebook: {raw['artifact_uri']}/ok.ipynb", out
        word = got[0]["line"].split()
        assert word[:3] == ["x", "is", str(x)] and word[5] == "False", out  # no variable left by another job
        kernels.append(word[4])
    assert kernels[0] != kernels[1]

    # a failing job: exit 1, the summary on stderr naming the cell and exception, as MLflow's tables hold it
    r, imported = ml_prod(project_dir, "run", str(make_nb(project_dir / "boom.ipynb", "1/0")))
    run_id = re.search(r"\(run ([0-9a-f]{32})\)", r.stderr).group(1)
    raw = raw_run(s.tracking_uri, run_id)
    assert (r.returncode, raw["status"]) == (1, "FAILED") and not imported & set(HEAVY), (r.stdout, r.stderr)
    assert f"  error: {raw['tags']['ml_prod.error']}" in r.stderr.splitlines() and "ZeroDivisionError" in raw["tags"]["ml_prod.error"]
    # bad input is refused in the client before anything is asked (exit 2); an error of the service's submission is the old path's
    r, _ = ml_prod(project_dir, "run", str(nb), "-p", "y", "1")
    assert r.returncode == 2 and "unknown parameter 'y'" in r.stderr, r.stderr
    r, imported = ml_prod(project_dir, "run", "--detach", str(nb))  # the session's Ray is not a persistent cluster
    assert r.returncode == 1 and "ml_prod cluster up" in r.stderr and not imported & set(HEAVY), r.stderr
    assert [j["status"] for j in raw_jobs(s.tracking_uri)] == ["FAILED", "FINISHED", "FINISHED"]  # nothing recorded for the refused ones


def _wait(pred, timeout: float, every: float = 0.2):
    end = time.time() + timeout
    while time.time() < end:
        if v := pred(): return v
        time.sleep(every)
    raise AssertionError(f"condition not met within {timeout} s")


def _gone(pid: int) -> bool:
    import psutil
    try: return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess: return True


def _job_of(s, p: subprocess.Popen) -> str:
    "The run id of client `p`'s job, the only RUNNING one."
    return _wait(lambda: (jobs := [j for j in raw_jobs(s.tracking_uri) if j["status"] == "RUNNING"]) and jobs[0]["run_id"], 90)


def _running(s, run_id: str, attempt: str = "1") -> dict:
    "The tags of job `run_id` once attempt `attempt` has its kernel."
    return _wait(lambda: (t := raw_run(s.tracking_uri, run_id)["tags"]).get("ml_prod.attempts") == attempt and "ml_prod.kernel_pgid" in t and t, 90)


def _started(s, p: subprocess.Popen) -> tuple[str, int, int]:
    "The RUNNING job of client `p` once its kernel runs the sleeper: run id, kernel pgid, the kernel's child."
    run_id = _job_of(s, p)
    tags = _running(s, run_id)
    log = Path(tags["ml_prod.output_dir"]) / "job.log"
    child = _wait(lambda: log.is_file() and re.search(r"child (\d+)", log.read_text()), 60)
    return run_id, int(tags["ml_prod.kernel_pgid"]), int(child.group(1))


def test_ctrl_c_and_a_killed_client_cancel_the_job(project_dir, run_service):
    s = run_service
    nb = make_nb(project_dir / "sleep.ipynb", SLEEPER)
    env = {**os.environ, "THIN_TEST_MODULES": str(project_dir / "modules.json")}
    _warm_worker_ready(s)  # both jobs on the warm worker: it stops a job when told to, as a task is interrupted
    # Ctrl-C: exit 130, the run KILLED in MLflow's tables, its kernel and the kernel's child gone
    p = subprocess.Popen([sys.executable, "-c", PROBE, "run", str(nb)], cwd=project_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_id, pgid, child = _started(s, p)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=90)
    assert p.returncode == 130 and "interrupted: the job was cancelled" in err, (out, err)
    assert raw_run(s.tracking_uri, run_id)["status"] == "KILLED"
    _wait(lambda: _gone(pgid) and _gone(child), 15)
    assert not {m.split(".")[0] for m in json.loads((project_dir / "modules.json").read_text())} & set(HEAVY)
    # the client killed (-9): the service stops hearing from it and cancels its job
    p = subprocess.Popen([sys.executable, "-c", PROBE, "run", str(nb)], cwd=project_dir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_id, pgid, child = _started(s, p)
    p.kill(); p.wait()
    _wait(lambda: raw_run(s.tracking_uri, run_id)["status"] != "RUNNING", 60, every=0.5)
    raw = raw_run(s.tracking_uri, run_id)
    assert raw["status"] == "KILLED" and raw["tags"]["ml_prod.error"].endswith(": cancelled"), raw
    _wait(lambda: _gone(pgid) and _gone(child), 15)


def _warm_worker_ready(s):
    from ml_prod.jobs import warm
    _wait(lambda: warm.keep_warm(s)["idle"] >= 1, 120, every=0.5)


def test_thin_runs_go_to_a_warm_worker_which_holds_their_cpus(project_dir, run_service, ray_local):
    import psutil
    s = run_service
    nb = make_nb(project_dir / "hold.ipynb", "import time; time.sleep(3)")
    _warm_worker_ready(s)
    _wait(lambda: ray_local.available_resources().get("CPU") == 2.0, 30)
    env = {**os.environ, "THIN_TEST_MODULES": str(project_dir / "modules.json")}
    sups, kernels = [], []
    for _ in range(2):
        submitted = time.time()
        p = subprocess.Popen([sys.executable, "-c", PROBE, "run", str(nb)], cwd=project_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        tags = _running(s, _job_of(s, p))
        held = ray_local.available_resources().get("CPU")
        sup = psutil.Process(int(tags["ml_prod.supervisor_pid"]))
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0 and "FINISHED" in out, (out, err)
        assert held == 1.0  # the job's CPU, held for it while it ran (the worker itself holds none)
        # its supervisor is a warm worker: a Ray actor process that was up before the job was submitted
        assert sup.create_time() < submitted and "JobWorker" in " ".join(sup.cmdline()), (sup.cmdline(), sup.create_time(), submitted)
        sups.append(sup.pid); kernels.append(tags["ml_prod.kernel_pgid"])
        _wait(lambda: ray_local.available_resources().get("CPU") == 2.0, 30)  # freed when it ended
    assert sups[0] == sups[1] and kernels[0] != kernels[1]  # the same worker, each job a kernel of its own


def test_a_warm_worker_killed_mid_job_runs_it_again_as_a_task(project_dir, run_service):
    import psutil
    s = run_service
    nb = make_nb(project_dir / "twice.ipynb", "import time; time.sleep(4); print('slept', flush=True)")
    _warm_worker_ready(s)
    env = {**os.environ, "THIN_TEST_MODULES": str(project_dir / "modules.json")}
    p = subprocess.Popen([sys.executable, "-c", PROBE, "run", str(nb)], cwd=project_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_id = _job_of(s, p)
    first = _running(s, run_id)
    assert "JobWorker" in " ".join(psutil.Process(int(first["ml_prod.supervisor_pid"])).cmdline())  # on the warm worker
    os.kill(int(first["ml_prod.supervisor_pid"]), signal.SIGKILL)
    out, err = p.communicate(timeout=180)
    raw = raw_run(s.tracking_uri, run_id)
    assert p.returncode == 0 and raw["status"] == "FINISHED" and raw["tags"]["ml_prod.attempts"] == "2", (out, err, raw["tags"])
    assert raw["tags"]["ml_prod.supervisor_pid"] != first["ml_prod.supervisor_pid"]
    assert "slept" in (raw["artifacts"] / "job.log").read_text()
    _wait(lambda: _gone(int(first["ml_prod.kernel_pgid"])), 15)  # the killed attempt's kernel went with it
