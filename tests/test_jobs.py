"""Notebook jobs against a real local Ray, real papermill kernels and real MLflow (SQLite).

Every failure mode of the jobs issue has a test here: cell exception, dead kernel, cell and job
timeouts, sys.exit, cancellation (API, `jobs cancel`, Ctrl-C), a lost Ray worker (retried, and
FAILED when retries run out), a vanished caller (reaped), and 8 concurrent jobs on one SQLite store.
"""
from __future__ import annotations
import json, os, signal, subprocess, sys, time
from pathlib import Path

import nbformat
import psutil
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from ml_prod.errors import JobFailed, ParameterError
from ml_prod.jobs.query import cancel_job, job_log, list_jobs
from ml_prod.jobs.submit import run_notebook, run_notebooks, submit_notebook
from ml_prod.settings import load_settings
from ml_prod.tracking import provenance, store
from conftest import client, free_ports, running_tag, wait_for  # the jobs modules' shared polling helpers

ML_PROD = str(Path(sys.executable).parent / "ml_prod")


def make_nb(path: Path, *cells: str, params: str = "x: int = 1  # a number") -> Path:
    nb = new_notebook(cells=[new_code_cell(params, metadata={"tags": ["parameters"]}), *map(new_code_cell, cells)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


@pytest.fixture
def env(ray_local, project_dir):
    "Settings of a fresh project on the session's Ray, and the project folder."
    return load_settings(), project_dir


def gone(pid: int) -> bool:
    try: return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess: return True


# ---- success ---------------------------------------------------------------------------------------

def test_job_tracks_params_metrics_provenance_and_hides_secrets(env):
    s, d = env
    (d / "data.csv").write_text("a\n1\n")
    nb = make_nb(d / "ok.ipynb",
                 "import mlflow, os\nmlflow.log_metric('double', 2 * x)\nmlflow.log_param('inside', 'yes')\n"
                 "import hashlib\nassert hashlib.sha256(token.encode()).hexdigest() == '" + provenance.sha256_bytes(b"hunter2") + "'\nprint('token length', len(token), 'data', open(data).read().strip())",
                 params='x: int = 1  # a number\ntoken: str = ""  # api token {secret: true}\ndata: str = "data.csv"  # input file')
    r = run_notebook(nb, {"x": 21, "token": "hunter2"}, settings=s, cwd=d)
    assert r.ok and r.metrics["double"] == 42.0
    run = client(s).get_run(r.run_id)
    assert run.data.params["x"] == "21" and run.data.params["inside"] == "yes"
    assert "token" not in run.data.params and run.data.tags["ml_prod.secret_params"] == "token"
    t = run.data.tags
    assert t["ml_prod.notebook_sha256"] == provenance.sha256_bytes(nb.read_bytes())
    assert json.loads(t["ml_prod.versions"])["papermill"]
    assert t["ml_prod.input.data.sha256"] == provenance.sha256_bytes(b"a\n1\n")
    arts = {a.path for a in client(s).list_artifacts(r.run_id)}
    assert {"ok.ipynb", "job.log", "provenance"} <= arts
    saved = Path(client(s).download_artifacts(r.run_id, "ok.ipynb")).read_text()
    assert "hunter2" not in saved and "token length 7" in saved
    assert "token length 7" in job_log(s, r.run_id)


def test_unknown_parameter_is_refused_before_anything_runs(env):
    s, d = env
    nb = make_nb(d / "p.ipynb", "pass")
    before = len(list_jobs(s, limit=100))
    with pytest.raises(ParameterError, match=r"unknown parameter 'lr'.*valid parameters: x"):
        run_notebook(nb, {"lr": 0.1}, settings=s)
    assert len(list_jobs(s, limit=100)) == before


# ---- failing loudly -------------------------------------------------------------------------------

def test_cell_exception_fails_with_cell_and_banner(env):
    s, d = env
    nb = make_nb(d / "boom.ipynb", "print('before')", "raise ValueError(f'bad x={x}')")
    with pytest.raises(JobFailed) as e:
        run_notebook(nb, {"x": 5}, settings=s, cwd=d)
    r = e.value.result
    assert r.status == "FAILED"
    assert r.error == "boom.ipynb: cell 3: ValueError: bad x=5"
    assert "boom.ipynb: cell 3: ValueError: bad x=5" in str(e.value) and r.output_notebook in str(e.value)
    saved = Path(client(s).download_artifacts(r.run_id, "boom.ipynb")).read_text()
    assert "An Exception was encountered at" in saved  # papermill's error banner


@pytest.mark.parametrize("code", ["import os; os._exit(3)", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
def test_dead_kernel_fails_quickly(env, code):
    s, d = env
    nb = make_nb(d / "die.ipynb", code, "print('never')")
    t = time.time()
    r = run_notebook(nb, settings=s, cwd=d, check=False)
    assert r.status == "FAILED" and r.error.startswith("die.ipynb: cell 2: the kernel died"), r.error
    assert time.time() - t < 60


def test_cell_timeout_and_job_timeout(env):
    s, d = env
    nb = make_nb(d / "slow.ipynb", "import time; time.sleep(60)")
    r = run_notebook(nb, settings=s, cwd=d, cell_timeout=2, check=False)
    assert r.status == "FAILED" and "cell timeout" in r.error
    t = time.time()
    r = run_notebook(nb, settings=s, cwd=d, timeout=3, check=False)
    assert r.status == "FAILED" and r.error == "slow.ipynb: cell 2: timed out after 3 s (job timeout)", r.error
    assert time.time() - t < 30


def test_sys_exit(env):
    s, d = env
    r = run_notebook(make_nb(d / "exit1.ipynb", "import sys; sys.exit(1)"), settings=s, cwd=d, check=False)
    assert r.status == "FAILED" and "SystemExit" in r.error
    r = run_notebook(make_nb(d / "exit0.ipynb", "import sys; sys.exit(0)"), settings=s, cwd=d, check=False)
    assert r.status == "FINISHED"  # papermill treats exit code 0 as success


# ---- cancelling -----------------------------------------------------------------------------------

SLEEPER = "import subprocess, time\nchild = subprocess.Popen(['sleep', '300'])\nprint('child', child.pid, flush=True)\ntime.sleep(300)"


def _kernel_and_child(s, run_id):
    pgid = int(running_tag(s, run_id, "ml_prod.kernel_pgid"))
    child = wait_for(lambda: [p for p in psutil.Process(pgid).children() if p.name() == "sleep"] if not gone(pgid) else None)
    return pgid, child[0].pid


def test_cancel_kills_kernel_process_group(env):
    s, d = env
    h = submit_notebook(make_nb(d / "sleep.ipynb", SLEEPER), settings=s, cwd=d)
    pgid, child = _kernel_and_child(s, h.run_id)
    h.cancel()
    r = h.wait(timeout=60)
    assert r.status == "KILLED"
    wait_for(lambda: gone(pgid) and gone(child), timeout=15)


def test_jobs_cancel_by_run_id(env):
    s, d = env
    h = submit_notebook(make_nb(d / "sleep.ipynb", SLEEPER), settings=s, cwd=d)
    pgid, child = _kernel_and_child(s, h.run_id)
    assert cancel_job(s, h.run_id)
    r = h.wait(timeout=60)
    assert r.status == "KILLED" and "cancelled" in r.error
    wait_for(lambda: gone(pgid) and gone(child), timeout=15)
    assert not cancel_job(s, h.run_id)  # no longer running


# ---- lost workers and callers ------------------------------------------------------------------------

ONCE = ("import os, time, pathlib\nm = pathlib.Path('attempted')\n"
        "if not m.exists():\n    m.touch(); time.sleep(120)\nprint('second attempt')")


def test_lost_worker_is_retried(env):
    s, d = env
    h = submit_notebook(make_nb(d / "once.ipynb", ONCE), settings=s, cwd=d, max_retries=1)
    pid = int(running_tag(s, h.run_id, "ml_prod.supervisor_pid"))
    pgid = int(running_tag(s, h.run_id, "ml_prod.kernel_pgid"))
    wait_for(lambda: (d / "attempted").exists())
    os.kill(pid, signal.SIGKILL)
    r = h.wait(timeout=120)
    assert r.status == "FINISHED"
    assert client(s).get_run(r.run_id).data.tags["ml_prod.attempts"] == "2"
    wait_for(lambda: gone(pgid), timeout=30)  # the first attempt's kernel followed its supervisor


def test_lost_worker_without_retries_fails(env):
    s, d = env
    h = submit_notebook(make_nb(d / "once.ipynb", ONCE), settings=s, cwd=d, max_retries=0)
    pid = int(running_tag(s, h.run_id, "ml_prod.supervisor_pid"))
    wait_for(lambda: (d / "attempted").exists())
    os.kill(pid, signal.SIGKILL)
    r = h.wait(timeout=120)
    assert r.status == "FAILED" and "Ray worker was lost" in r.error


def _cli(args, d, **kw):
    env = {**os.environ, "ML_PROD_JOB_HEARTBEAT_S": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.Popen([ML_PROD, *args], cwd=d, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_caller_killed_is_reaped(env):
    s, d = env
    nb = make_nb(d / "sleep.ipynb", SLEEPER)
    p = _cli(["run", str(nb)], d)
    run_id = wait_for(lambda: next((j.run_id for j in list_jobs(s) if j.status == "RUNNING"), None), timeout=90)
    pgid = int(running_tag(s, run_id, "ml_prod.kernel_pgid"))
    p.kill(); p.wait()
    s1 = load_settings(env={**os.environ, "ML_PROD_JOB_HEARTBEAT_S": "1"})
    wait_for(lambda: run_id in store.reap_stale_jobs(s1), timeout=60, every=1)
    run = client(s).get_run(run_id)
    assert run.info.status == "FAILED" and "reaped" in run.data.tags["ml_prod.error"]
    wait_for(lambda: gone(pgid), timeout=30)


# ---- the CLI ---------------------------------------------------------------------------------------

def _cli_in_process(args):
    """`ml_prod ARGS` in this process (its stdout and stderr together, as `_cli` gives them), on the session's Ray:
    the command's code and exit code as in a subprocess, without starting another Python and another Ray."""
    from typer.testing import CliRunner
    from ml_prod.cli.main import app
    return CliRunner().invoke(app, args, prog_name="ml_prod",
                              env={"ML_PROD_JOB_HEARTBEAT_S": "1", "RAY_USAGE_STATS_ENABLED": "0"})


@pytest.mark.long  # beyond CI's time limit: `make test LONG=1`
def test_cli_exit_codes_and_ctrl_c(env):
    s, d = env
    ok = make_nb(d / "ok.ipynb", "print('x is', x)")
    # a real process: the cell output streams to the caller's terminal through its own Ray driver
    p = _cli(["run", str(ok), "-p", "x", "7"], d); out = p.communicate(timeout=120)[0]
    assert p.returncode == 0, out
    assert "x is 7" in out and "FINISHED" in out
    # exit codes 2 and 1 come from the command itself (refused parameter; the job's summary): in-process is the same
    r = _cli_in_process(["run", str(ok), "-p", "y", "7"]); out = r.output
    assert r.exit_code == 2 and "unknown parameter 'y'" in out
    r = _cli_in_process(["run", str(make_nb(d / "boom.ipynb", "1/0"))]); out = r.output
    assert r.exit_code == 1 and "ZeroDivisionError" in out
    # Ctrl-C: a signal to a real process
    p = _cli(["run", str(make_nb(d / "sleep.ipynb", SLEEPER))], d)
    run_id = wait_for(lambda: next((j.run_id for j in list_jobs(s) if j.status == "RUNNING"), None), timeout=90)
    pgid, child = _kernel_and_child(s, run_id)
    p.send_signal(signal.SIGINT)
    out = p.communicate(timeout=90)[0]
    assert p.returncode == 130, out
    assert client(s).get_run(run_id).info.status == "KILLED"
    wait_for(lambda: gone(pgid) and gone(child), timeout=15)


# ---- concurrency and runtime environments -------------------------------------------------------------

def test_eight_concurrent_jobs_share_one_sqlite_store(env):
    s, d = env
    nb = make_nb(d / "many.ipynb", "import mlflow\nfor i in range(20): mlflow.log_metric('m', x * i, step=i)\nmlflow.log_param('p', x)")
    rs = run_notebooks([{"notebook": nb, "parameters": {"x": i}} for i in range(8)], settings=s, cwd=d, cpus=0.25)
    assert [r.status for r in rs] == ["FINISHED"] * 8, [r.error for r in rs]
    assert [r.metrics["m"] for r in rs] == [19.0 * i for i in range(8)]


def test_runtime_env_reaches_the_kernel(env):
    s, d = env
    nb = make_nb(d / "renv.ipynb", "import os, sys\nassert os.environ['GREETING'] == 'hej', os.environ.get('GREETING')")
    r = run_notebook(nb, settings=s, cwd=d, runtime_env={"env_vars": {"GREETING": "hej"}})
    assert r.ok
    assert json.loads(client(s).get_run(r.run_id).data.tags["ml_prod.runtime_env"]) == {"env_vars": {"GREETING": "hej"}}


# ---- detached jobs on a persistent local cluster ------------------------------------------------------

def test_detached_job_outlives_its_caller(project_dir):
    "A detached job on the project's persistent cluster, which listens on the project's `ray_port`."
    import socket
    from ml_prod.runtime.cluster import cluster_down, cluster_up
    (port,) = free_ports(1)
    (project_dir / "settings.ini").write_text(f"[DEFAULT]\nray_port = {port}\n")
    s = load_settings()
    p = _cli(["run", "--detach", str(make_nb(project_dir / "d.ipynb", "print('detached')"))], project_dir)
    out = p.communicate(timeout=60)[0]
    assert p.returncode == 1 and "ml_prod cluster up" in out  # no persistent cluster yet
    cluster_up(s, num_cpus=1)  # on settings.ini's ray_port
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()  # the GCS listens there
        p = _cli(["run", "--detach", str(make_nb(project_dir / "slow.ipynb", "import time; time.sleep(3)\nprint('done')"))], project_dir)
        out = p.communicate(timeout=120)[0]
        assert p.returncode == 0, out
        run_id = out.split(" as run ")[1].split(";")[0]
        assert client(s).get_run(run_id).info.status == "RUNNING"  # the caller has exited, the job goes on
        wait_for(lambda: client(s).get_run(run_id).info.status == "FINISHED", timeout=90, every=1)
        assert "done" in job_log(s, run_id)
    finally:
        assert cluster_down(s)
