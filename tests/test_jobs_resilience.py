"""Jobs that survive their tracking store and their reaper: real Ray (`ray_local`), real papermill kernels, MLflow on SQLite.

* A tracking-store hiccup (the SQLite file locked by another process for 30 s, longer than MLflow's 20 s
  busy timeout, so the supervisor's MLflow calls fail with "database is locked") does not kill a healthy job, and its final status is
  written once the store answers again.
* A tracking call that hangs does not stop the job's timeout from being enforced. Injected through the
  one function that makes the heartbeat call (`store.beat`), in a supervisor run in this process: the
  fake only blocks, everything else (kernel, notebook, MLflow) is real.
* An artifact upload that fails (injected at `MlflowClient.log_artifact`, the one call that uploads the
  executed notebook) still ends the run with a status and says why.
* The reaper goes by the job's own heartbeat, never fails a job queued behind others, and a reaped run
  that later ends keeps its status and records what it ended with.
* `submit_notebook(detach=True)` gives up (and fails the run) when its actor cannot start.
* A supervisor killed with SIGKILL leaves no kernel and no kernel child running when the retry starts.
"""
from __future__ import annotations
import json, os, signal, sqlite3, subprocess, sys, threading, time
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from ml_prod.jobs.submit import submit_notebook
from ml_prod.settings import load_settings
from ml_prod.tracking import store
from conftest import client, running_tag, wait_for  # the jobs modules' shared polling helpers


def make_nb(path: Path, *cells: str, params: str = "x: int = 1  # a number") -> Path:
    nb = new_notebook(cells=[new_code_cell(params, metadata={"tags": ["parameters"]}), *map(new_code_cell, cells)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def settings(**env):
    "The project's settings with ML_PROD_* overrides `env`."
    return load_settings(env={**os.environ, **{f"ML_PROD_{k.upper()}": str(v) for k, v in env.items()}})


def db_path(s) -> str:
    assert s.tracking_uri.startswith("sqlite:///"), s.tracking_uri
    return s.tracking_uri.removeprefix("sqlite:///")


def lock_store(s, seconds: float):
    "Hold an exclusive lock on the SQLite tracking store for `seconds`, from another connection (as another process would)."
    conn = sqlite3.connect(db_path(s), timeout=60, isolation_level=None)
    conn.execute("BEGIN EXCLUSIVE")
    try: time.sleep(seconds)
    finally:
        conn.execute("ROLLBACK")
        conn.close()


def store_is_locked(s) -> bool:
    conn = sqlite3.connect(db_path(s), timeout=0, isolation_level=None)
    try: conn.execute("BEGIN IMMEDIATE"); conn.execute("ROLLBACK"); return False
    except sqlite3.OperationalError as e: return "locked" in str(e)
    finally: conn.close()


@pytest.fixture
def proj(ray_local, project_dir):
    return project_dir


# ---- defect 4: a tracking-store hiccup -------------------------------------------------------------

TICKS = ("import time, ml_prod\nfor i in range(12):\n    ml_prod.report(step=i, loss=1 / (i + 1))\n"
         "    print('tick', i, flush=True); time.sleep(0.5)\nprint('all done', flush=True)")


def test_locked_store_mid_job_does_not_kill_it(proj):
    s = settings(job_heartbeat_s=0.5)
    h = submit_notebook(make_nb(proj / "ticks.ipynb", TICKS), settings=s, cwd=proj)
    running_tag(s, h.run_id, "ml_prod.kernel_pgid")  # the supervisor is watching the notebook
    # locked from now until well after the notebook (6 s) has ended, longer than MLflow waits for a lock (20 s):
    # beats, reports and the final writes all fail with "database is locked" for a while
    lock_store(s, 30)
    r = h.wait(timeout=180)
    assert r.status == "FINISHED", r.error
    hist = client(s).get_metric_history(h.run_id, "loss")
    assert sorted(m.step for m in hist) == list(range(12))  # reports made while the store was locked were logged after
    saved = Path(client(s).download_artifacts(h.run_id, "ticks.ipynb")).read_text()
    assert "tick 11" in saved and "all done" in saved


def test_job_timeout_is_enforced_while_a_tracking_call_hangs(proj, monkeypatch):
    from ml_prod.jobs.supervisor import JobSpec, supervise
    s = settings(job_heartbeat_s=0.5)
    release = threading.Event()
    hung = []
    def hanging_beat(c, run_id, t=None):  # the test-only fault: an HTTP store retrying for minutes
        hung.append(time.time()); release.wait(600)
    monkeypatch.setattr(store, "beat", hanging_beat)
    nb = make_nb(proj / "slow.ipynb", "import time; time.sleep(120)")
    exp = store.ensure_experiment(s)
    run_id = store.create_job_run(s, exp, nb, nb.read_bytes(), {"x": 1})
    out = {}
    t = threading.Thread(target=lambda: out.update(supervise(JobSpec.of(s, run_id, nb, nb.read_bytes(), {"x": 1}, exp, str(proj), timeout=3),
                                                                boot_spare=False)), daemon=True)
    t.start()
    try:
        t.join(60)
        assert not t.is_alive(), "the supervisor did not end within 60 s of a 3 s job timeout while a heartbeat hung"
    finally:
        release.set(); t.join(120)
    assert hung  # the fault was met
    # the cell it was in depends on how far the kernel got in 3 s on a loaded machine; the reason does not
    assert out["status"] == "FAILED" and out["error"].startswith("slow.ipynb: cell "), out
    assert out["error"].endswith(": timed out after 3 s (job timeout)"), out
    assert client(s).get_run(run_id).info.status == "FAILED"


def test_failed_artifact_upload_still_ends_the_run_and_says_why(proj, monkeypatch):
    from mlflow.tracking import MlflowClient
    from ml_prod.jobs import supervisor
    from ml_prod.jobs.supervisor import JobSpec, supervise
    s = settings()
    def failing_upload(self, run_id, local_path, artifact_path=None):  # the test-only fault: the artifact store refuses
        raise OSError(28, "No space left on device (injected)")
    monkeypatch.setattr(MlflowClient, "log_artifact", failing_upload)
    monkeypatch.setattr(supervisor, "UPLOAD_S", 3)  # retried for 3 s, not minutes: the fault is permanent
    nb = make_nb(proj / "ok.ipynb", "print('fine')")
    exp = store.ensure_experiment(s)
    run_id = store.create_job_run(s, exp, nb, nb.read_bytes(), {"x": 1})
    res = supervise(JobSpec.of(s, run_id, nb, nb.read_bytes(), {"x": 1}, exp, str(proj)), boot_spare=False)
    run = client(s).get_run(run_id)
    assert run.info.status == "FAILED" and res["status"] == "FAILED"
    err = run.data.tags["ml_prod.error"]
    assert "could not be stored" in err and "No space left on device (injected)" in err, err
    assert "No space left on device (injected)" in run.data.tags["ml_prod.artifacts_error"]
    assert "fine" in Path(res["output_path"]).read_text()  # the executed notebook is kept on this node, where the error says
    assert res["output_path"] in err


# ---- defect 5: the reaper --------------------------------------------------------------------------

def test_reaper_spares_queued_jobs_and_goes_by_the_jobs_own_heartbeat(proj):
    s = settings(job_heartbeat_s=2)  # the jobs beat every 2 s: reaped after 12 s of silence
    reader = settings(job_heartbeat_s=0.2)  # a reader whose own setting would reap anything silent for 1.2 s
    nb = make_nb(proj / "sleep.ipynb", "import time; time.sleep(20)")
    # the session's Ray has 2 CPUs: the third job waits about 20 s for one, longer than its jobs' 12 s limit
    hs = [submit_notebook(nb, settings=s, cwd=proj, cpus=1) for _ in range(3)]
    reaped = []
    end = time.time() + 240
    while not all(h.done() for h in hs) and time.time() < end:
        reaped += store.reap_stale_jobs(reader)
        time.sleep(0.5)
    assert reaped == [], f"live jobs were reaped: {reaped} of {[h.run_id for h in hs]}"
    assert [h.wait(timeout=60).status for h in hs] == ["FINISHED"] * 3


def test_reaped_job_that_ends_later_keeps_its_status_and_records_the_outcome(proj):
    s = settings(job_heartbeat_s=1)
    h = submit_notebook(make_nb(proj / "late.ipynb", "import time; time.sleep(5)\nprint('ended well')"), settings=s, cwd=proj)
    running_tag(s, h.run_id, "ml_prod.kernel_pgid")
    assert store.reap_stale_jobs(s, now=time.time() + 3600) == [h.run_id]  # as a reader an hour later would
    r = h.wait(timeout=120)
    run = client(s).get_run(h.run_id)
    assert r.status == "FAILED" and run.info.status == "FAILED"
    assert run.data.tags["ml_prod.error"].startswith("reaped:"), run.data.tags["ml_prod.error"]
    assert run.data.tags["ml_prod.late_outcome"] == "FINISHED"
    assert "ended well" in Path(client(s).download_artifacts(h.run_id, "late.ipynb")).read_text()  # nothing lost


def test_detach_gives_up_when_its_actor_cannot_start(project_dir):
    from ml_prod.runtime.cluster import cluster_down, cluster_up
    from conftest import free_ports
    s = load_settings()
    nb = make_nb(project_dir / "big.ipynb", "print('never')")
    cluster_up(s, num_cpus=1, port=free_ports(1)[0])
    try:
        code = ("import sys, ml_prod.jobs.submit as m\nfrom ml_prod.settings import load_settings\nm.DETACH_START_TIMEOUT_S = 10\n"
                f"m.submit_notebook({str(nb)!r}, settings=load_settings(), detach=True, cpus=4)\n")
        p = subprocess.run([sys.executable, "-c", code], cwd=project_dir, capture_output=True, text=True, timeout=150)
        assert p.returncode == 1, p.stdout + p.stderr
        assert "did not start within 10 s" in p.stderr, p.stderr[-2000:]
        runs = client(s).search_runs([store.ensure_experiment(s)], "tags.`ml_prod.job` = 'true'")
        assert [r.info.status for r in runs] == ["FAILED"]
        assert "did not start within 10 s" in runs[0].data.tags["ml_prod.error"]
    finally:
        assert cluster_down(s)


# ---- defect 8: a killed supervisor ---------------------------------------------------------------

TWICE = """import json, os, pathlib, subprocess, time
first = pathlib.Path('first.json')
def alive(pid):
    try: return open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()[0] not in ('Z', 'X')
    except FileNotFoundError: return False
if not first.exists():
    child = subprocess.Popen(['sleep', '300'])
    first.write_text(json.dumps({'kernel': os.getpid(), 'child': child.pid}))
    time.sleep(300)
else:
    pids = json.loads(first.read_text())
    pathlib.Path('second.json').write_text(json.dumps({k: alive(p) for k, p in pids.items()}))
"""


def test_killed_supervisor_leaves_nothing_running_when_the_retry_starts(proj):
    s = load_settings()
    h = submit_notebook(make_nb(proj / "twice.ipynb", TWICE), settings=s, cwd=proj, max_retries=1)
    pid = int(running_tag(s, h.run_id, "ml_prod.supervisor_pid"))
    first = json.loads(wait_for(lambda: (proj / "first.json").exists() and (proj / "first.json").read_text()))
    try:
        os.kill(pid, signal.SIGKILL)
        r = h.wait(timeout=180)
        assert r.status == "FINISHED", r.error
        assert client(s).get_run(h.run_id).data.tags["ml_prod.attempts"] == "2"
        seen = json.loads((proj / "second.json").read_text())
        assert seen == {"kernel": False, "child": False}, f"alive when the retry's notebook started: {seen}"
    finally:
        for p in first.values():
            try: os.kill(p, signal.SIGKILL)
            except ProcessLookupError: pass
