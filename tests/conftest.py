"""Shared fixtures: one local Ray per test session, a throwaway ml_prod project, and a guard that fails
the session when a test leaves a Jupyter kernel running.

* `ray_local`: `ray.init` once per session (2 CPUs, no dashboard), `ray.shutdown()` at the end.
* `project_dir`: a fresh project folder (a `settings.ini` with only `[DEFAULT]`) as the working
  directory, so `ml_prod.settings.load_settings` finds it and ml_prod's embedded state
  (`.ml_prod/`: MLflow's SQLite store, artifacts, outputs) is written there, not into the repository.
* Stray kernels: every process this session starts inherits `ML_PROD_TEST_SESSION`; at the end the
  session waits up to 10 s for kernels (`ipykernel_launcher`) that are its descendants or carry that
  marker (a kernel orphaned by a killed Ray worker is no longer a descendant), then reports the ones
  left, kills them and fails the session. Kernels of other sessions on the machine are not touched.
* `fresh_venv`: one fresh virtualenv per session with ml_prod installed, without extras, from a wheel built from
  this checkout (test_install, test_init; the install takes minutes, so it is done once), and `sh`/`clean_env`
  to run commands in it.
* Serving: one persistent local cluster for the whole session (`serving_project`, `project`) and the
  helpers the serving tests share (`cli`, `log_version`, `deploy`, `status`, `raw_project`,
  `ray_deployed`, ...); test modules import them from here (`from conftest import ...`), never from
  each other. See "one persistent serving cluster" below.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

SESSION_MARKER = "ML_PROD_TEST_SESSION"
KERNEL_WAIT_S = 10.0

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


# ---- one local Ray for the session ---------------------------------------------------------------

@pytest.fixture(scope="session")
def ray_local():
    "A local Ray (2 CPUs, no dashboard) shared by the whole session; yields the `ray` module."
    import ray
    if not ray.is_initialized():  # a test may already have connected through ml_prod
        # address="local": always a fresh Ray, never a cluster that happens to run on this machine
        ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="ml_prod",
                 log_to_driver=False, configure_logging=True, logging_level="warning")
    yield ray
    ray.shutdown()


# ---- a throwaway project ---------------------------------------------------------------------------

@pytest.fixture
def project_dir(tmp_path, monkeypatch):
    "A fresh project folder with a minimal settings.ini, made the working directory; yields its path."
    root = tmp_path / "project"
    root.mkdir()
    (root / "settings.ini").write_text("[DEFAULT]\n")
    # the developer's shell must not leak into the project: profile and overrides, a Ray address, an MLflow run
    for var in [v for v in os.environ if v.startswith("ML_PROD_") and v != SESSION_MARKER]:
        monkeypatch.delenv(var)
    for var in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(root)
    return root


# ---- a fresh virtualenv with ml_prod from a wheel of this checkout ----------------------------------

REPO = Path(__file__).resolve().parent.parent


def sh(*cmd, cwd=None, env=None, timeout=1200) -> subprocess.CompletedProcess:
    "Run `cmd`; fail with its output unless it exits 0."
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def clean_env(venv: Path) -> dict:
    "The environment of a shell in `venv`: nothing of this test session's Python, ml_prod, Ray or MLflow settings."
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ML_PROD_", "RAY_ADDRESS", "MLFLOW_", "PYTHON", "VIRTUAL_ENV"))}
    return {**env, "PATH": f"{venv / 'bin'}:{env.get('PATH', '')}", "VIRTUAL_ENV": str(venv), "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture(scope="session")
def fresh_venv(tmp_path_factory) -> Path:
    """A fresh virtualenv with `pip install ml_prod-*.whl` (no extras), the wheel built from a copy of this checkout's
    sources (the build leaves nothing in the checkout); the dependencies come from the package index (pip's cache
    makes it quicker). One per session: the tests that use it may add packages (test_init adds pytest)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(REPO / "ml_prod", src / "ml_prod", ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("pyproject.toml", "README.md"): shutil.copy(REPO / f, src / f)
    sh(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", tmp / "dist", src)
    wheel = next((tmp / "dist").glob("ml_prod-*.whl"))
    venv = tmp / "venv"
    sh(sys.executable, "-m", "venv", venv)
    t0 = time.monotonic()
    sh(venv / "bin" / "python", "-m", "pip", "install", "--quiet", wheel, env=clean_env(venv))
    print(f"pip install {wheel.name} (no extras): {time.monotonic() - t0:.0f} s")
    return venv


# ---- one persistent serving cluster for the session ------------------------------------------------
#
# `ml_prod serve up` starts the project's persistent local Ray (`ray start` with all the machine's CPUs, GCS
# on the project's ray_port, Serve's proxy on its serve_port, direct ingress) on first use. `make test` runs pytest
# in workers (pytest-xdist; see "parallel workers" below), all serving modules on one of them; its serving project
# uses ports of the worker's own (`SERVING_PORTS`: Ray's and ml_prod's defaults, 6379 and 8000, on the first worker,
# 100 more per worker after it), so a serving cluster never meets another worker's cluster on a port. Every serving test module (test_loopback, test_serving,
# test_serving_ops, test_serving_steps) works in ONE project, `serving_project`, through the module
# fixture `project`, so the cluster is started once per session by the first `deploy` and reused.
#
# * Everything the modules need at `ray start` (Ray reads it when its processes start, so it cannot be
#   set later) is in `cluster_env`, passed by `deploy` to every `ml_prod serve up`: it only counts for
#   the call that starts the cluster. None of it changes what the other modules' tests see.
# * Each module leaves no application behind (`serve down` when it ends): every replica reserves CPUs
#   of the 2, and application names stay distinct anyway. The registry, the audit log and Ray's logs
#   are shared; the tests look only at their own model versions, applications and request ids.
# * The cluster goes down after the last test that uses it (or at the end of the session); a later
#   `deploy` would start it again. A test that needs other `ray start` flags starts its own cluster
#   (`ray_deployed`, test_multinode), on other ports.
# * The pytest process never connects to this cluster: tests drive it with the `ml_prod` CLI in
#   subprocesses, so conftest's in-process `ray_local` (test_jobs, test_tune, ...) can live beside it.

ML_PROD = str(Path(sys.executable).parent / "ml_prod")
HERE = Path(__file__).parent
WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))  # pytest-xdist's worker number; 0 without it
SERVING_PORTS = {"ray_port": 6379 + 100 * WORKER, "serve_port": 8000 + 100 * WORKER}  # the serving project's GCS and Serve proxy
RECORD = {"amount": 250.0, "country": "US"}
# Ray's replicas and handles report their load to the autoscaler every 10 s by default; every second on
# the shared cluster, so that test_serving_ops's autoscaling test (5 s look-back window) sees the load
# change within seconds. Only deployments with autoscaling push these metrics, so nothing else changes.
FAST_METRICS = {"RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1", "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1"}


def cli(*args, check=True, env=None, timeout=300):
    r = subprocess.run([ML_PROD, *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    if check and r.returncode != 0: raise AssertionError(f"ml_prod {' '.join(args)} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def step_log(project: Path) -> Path:
    "The folder where the steps of tests/step_functions.py note the process they ran in (`$STEP_TEST_LOG`)."
    return project / "step_log"


def cluster_env(project: Path) -> dict:
    """Environment for `ray start` of the shared cluster: fast autoscaling metrics (test_serving_ops), tests/
    importable by its processes and the steps' pid folder (test_serving_steps)."""
    return {**FAST_METRICS, "PYTHONPATH": os.pathsep.join([str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])]),
            "STEP_TEST_LOG": str(step_log(project)), "ML_PROD_CLUSTER_ENV": "STEP_TEST_LOG"}  # not on `cluster_up`'s allow-list


@contextmanager
def in_project(root: Path):
    "`root` as the working directory, without the developer's ML_PROD_* settings; both restored after."
    old = Path.cwd()
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("ML_PROD_") and k != SESSION_MARKER}
    os.chdir(root)
    try: yield root
    finally:
        os.chdir(old)
        os.environ.update(saved)


def _cluster_is_up() -> bool:
    "Whether the persistent local cluster of the project in the working directory is up (without connecting to it)."
    from ml_prod.runtime.cluster import local_cluster
    from ml_prod.settings import load_settings
    return local_cluster(load_settings()) is not None


def _stop_cluster():
    "Stop the applications and the persistent cluster of the project in the working directory, if it is up."
    if _cluster_is_up():
        cli("serve", "down", check=False)
        cli("cluster", "down", check=False)


@pytest.fixture(scope="session")
def serving_project(tmp_path_factory):
    "The one serving project of the session (a registry of tiny-model versions); its cluster is stopped at the end."
    root = tmp_path_factory.mktemp("serving")
    (root / "settings.ini").write_text("[DEFAULT]\n" + "".join(f"{k} = {v}\n" for k, v in SERVING_PORTS.items()))
    step_log(root).mkdir()
    yield root
    with in_project(root): _stop_cluster()


def _used_later(request, fixture: str) -> bool:
    "Whether a test after this module (in run order) uses `fixture`."
    items, module = request.session.items, request.node
    mine = [i for i, item in enumerate(items) if item.getparent(pytest.Module) is module]
    return any(fixture in item.fixturenames for item in items[max(mine, default=len(items)) + 1:])


@pytest.fixture(scope="module")
def project(serving_project, request):
    "The session's serving project as the working directory for this module; no application of the module outlives it."
    with in_project(serving_project):
        try: yield serving_project
        finally:
            if not _used_later(request, "project"): _stop_cluster()
            elif _cluster_is_up(): cli("serve", "down", check=False)  # the applications' replicas hold the cluster's CPUs


@contextmanager
def mlflow_at(tracking_uri: str):
    """MLflow's process-wide tracking URI (and `$MLFLOW_TRACKING_URI`) set to `tracking_uri`, and its active experiment,
    both restored after: left behind, they would outlive the module (MLflow resolves `runs:/` downloads through the
    global URI even when given another `tracking_uri`, which broke test_examples after test_control)."""
    from mlflow.tracking import fluent
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri
    experiment = fluent._active_experiment_id
    try:
        with _use_tracking_uri(tracking_uri): yield
    finally: fluent._active_experiment_id = experiment


def log_version(alias: str, **model_config) -> int:
    "Log a tiny model with `model_config` and register it as a new version of `tiny` under `alias`."
    import mlflow
    import pandas as pd
    from mlflow.models import infer_signature
    from ml_prod.models.registry import register
    from ml_prod.settings import load_settings
    s = load_settings()
    X = pd.DataFrame({"amount": [10.0, 250.0], "country": ["US", "FR"]})
    sig = infer_signature(X, pd.DataFrame({"score": [0.1, 0.9]}))
    with mlflow_at(s.tracking_uri):
        mlflow.set_experiment("serving-tests")
        with mlflow.start_run() as run:
            mlflow.pyfunc.log_model(name="model", python_model=str(HERE / "tiny_model.py"), model_config=model_config or None,
                                    signature=sig, input_example=X)
    return register(s, run.info.run_id, "tiny", alias=alias, force=True)  # tests point aliases (champion too) at what they log


def deploy(project: Path, app: dict, env=None, direct: bool = True) -> str:
    """Deploy one application with `ml_prod serve up` (which starts the shared cluster with `cluster_env` if it is not up);
    the base URL of its replica (`direct`) or its stable one (the application's shared port)."""
    import yaml
    spec = project / f"{app['name']}.yaml"
    spec.write_text(yaml.safe_dump({"applications": [app]}))
    out = cli("serve", "up", str(spec), env={**cluster_env(project), **(env or {})}).stdout
    stable = out.split(" serving at ")[1].split()[0]
    port = int(stable.split(":")[2].split("/")[0])  # the shared port: the first free ones after the worker's Serve proxy
    assert stable.startswith("http://127.0.0.1:") and 0 < port - SERVING_PORTS["serve_port"] < 100, out
    assert f"through Ray's proxy: http://127.0.0.1:{SERVING_PORTS['serve_port']}/{app['name']}/predict" in out, out
    return status(app["name"])["replica_urls"][0] if direct else stable.removesuffix("/predict")


def status(app: str) -> dict:
    return next(a for a in json.loads(cli("serve", "status", "--json").stdout) if a["app"] == app)


# ---- clusters of their own: `ray start` with Serve's flags, then Ray's own `serve deploy` -------------------

RAY_MARKER = "ML_PROD_RAY_DEPLOYED_TEST"  # set in the environment of every process `ray_deployed` starts



def open_sweep(s, root: Path, samples: int):
    """A sweep of 'score' (max, ASHA) over `lr`, opened by flows.tune's own functions with no Ray, of a one-cell notebook
    `root/train.ipynb` in experiment 'tuning': its `_Sweep` (`sweep_run_id`), ready for `tune._trial_run`."""
    import nbformat
    from ml_prod.flows import tune
    from ml_prod.tracking import store
    nb = root / "train.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("lr = 0.1", metadata={"tags": ["parameters"]})]), nb)
    exp = store.ensure_experiment(s, "tuning")
    record = dict(notebook=str(nb), notebook_sha256="0" * 64, space={"lr": {"loguniform": [1e-4, 1]}}, fixed={}, metric="score",
                  mode="max", samples=samples, scheduler="asha")
    sweep_id = tune._open_sweep(s, exp, nb, nb.read_bytes(), root / "tune" / "train-1", record, False, {})
    return tune._Sweep(s, sweep_id, exp, str(nb), nb.read_bytes(), {}, [], "score", "asha", 3, str(root),
                       run_tags=tune._trial_tags(s, nb, nb.read_bytes(), {}, sweep_id))


def raw_records(audit_dir, app: str, folder: str = "segments") -> list[dict]:
    "Every whole JSON line of every segment of `app` (`folder`: 'segments' or 'feedback-segments'), read from the files themselves, before any compaction (no ml_prod code)."
    out = []
    for p in sorted((Path(audit_dir) / app / folder).glob("*.jsonl")):
        for line in p.read_bytes().split(b"\n"):
            if line.strip():
                try: out.append(json.loads(line))
                except ValueError: pass
    return out


def free_ports(n: int, lo: int = 26000, hi: int = 32000) -> list[int]:
    """`n` distinct ports that are free right now, drawn from below the ephemeral range (32768-60999 here).

    A port the kernel handed out for `bind(0)` is an ephemeral one: between choosing it and the server's bind,
    any of the many outgoing connections Ray opens meanwhile may take it as its local port (CI once failed so:
    Serve's proxy could not bind 127.0.0.1:40729). Ray's own fixed ranges (6379, 8265, 10001, workers'
    10002-19999) are below `lo`; test_multinode's port ranges come from 20000-26000."""
    rng, ports = random.Random(), []
    for _ in range(50 * n):
        p = rng.randrange(lo, hi)
        if p in ports: continue
        with socket.socket() as s:
            try: s.bind(("", p))
            except OSError: continue
        ports.append(p)
        if len(ports) == n: return ports
    raise RuntimeError(f"no {n} free ports in {lo}-{hi}")


def raw_project(tmp_path, monkeypatch) -> tuple[Path, int, int]:
    "A project in `tmp_path/p` whose `[raw]` profile joins a `ray start` cluster on free ports: (root, GCS port, dashboard port)."
    root = tmp_path / "p"
    root.mkdir()
    gcs, dashboard = free_ports(2)
    (root / "settings.ini").write_text(f"[DEFAULT]\n\n[raw]\nray_address = 127.0.0.1:{gcs}\nstorage_is_shared = true  # one machine\n")
    for k in [k for k in os.environ if k.startswith("ML_PROD_") and k != SESSION_MARKER]: monkeypatch.delenv(k)
    monkeypatch.chdir(root)
    return root, gcs, dashboard


def _ray_start_env(**extra) -> dict:
    "This process's environment without ML_PROD_*/MLFLOW_*/RAY_ADDRESS/RAY_AUTH_MODE leaking in, plus `extra`."
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith("ML_PROD_") and k != SESSION_MARKER) and not k.startswith("MLFLOW_") and k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    return {**env, **extra}


def _run(cmd: list[str], env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0: raise RuntimeError(f"`{' '.join(cmd)}` failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def _alive(p: psutil.Process) -> bool:
    "Running and not a zombie (a zombie is dead, only not yet reaped by its parent)."
    try: return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error: return False


def _started_by(temp_dir: str, gcs_port: int, marker: str) -> list[psutil.Process]:
    "Live processes naming `temp_dir` or the GCS port, or carrying `marker` in `RAY_MARKER`; and their descendants."
    me = os.getpid()
    # the GCS's port after any IPv4 address: Ray hands some processes (the client server) the resolved address
    gcs = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}:" + str(gcs_port) + r"(?!\d)")
    found: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["cmdline"]):
        if p.pid == me: continue
        args = p.info["cmdline"] or []
        try: marked = p.environ().get(RAY_MARKER) == marker
        except psutil.Error: marked = False
        if marked or any(temp_dir in a or gcs.search(a) for a in args): found[p.pid] = p
    for p in list(found.values()):
        try: found.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.Error: pass
    found.pop(me, None)
    return [p for p in found.values() if _alive(p)]


def stop_processes(procs: list[psutil.Process], grace_s: float = 10.0) -> list[psutil.Process]:
    "SIGTERM `procs`, SIGKILL those still alive after `grace_s`; returns the ones that had to be killed."
    for p in procs:
        try: p.terminate()
        except psutil.Error: pass
    deadline = time.monotonic() + grace_s
    while (alive := [p for p in procs if _alive(p)]) and time.monotonic() < deadline:
        psutil.wait_procs(alive, timeout=0.2)  # also reaps those that are our children
    for p in alive:
        try: p.kill()
        except psutil.Error: pass
    psutil.wait_procs(alive, timeout=5)
    return alive


@contextmanager
def ray_deployed(gcs: int, dashboard: int, num_cpus: int, config: str = "serve_config.yaml"):
    """A `ray start` head with Serve's flags runs Ray's own `serve deploy CONFIG`; yields the first application's
    `ml_prod serve status --profile raw` once RUNNING, and stops only what it started."""
    from ml_prod.serving.spec import SERVE_ENV
    bin_dir = Path(sys.executable).parent
    marker, temp = uuid.uuid4().hex, f"/tmp/ray_sd_{uuid.uuid4().hex[:6]}"
    env = _ray_start_env(RAY_AUTH_MODE="token", **SERVE_ENV, **{RAY_MARKER: marker})
    try:
        _run([str(bin_dir / "ray"), "start", "--head", f"--port={gcs}", "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
              "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--temp-dir={temp}",
              "--disable-usage-stats"], env)
        _run([str(bin_dir / "serve"), "deploy", config, "-a", f"http://127.0.0.1:{dashboard}"], env)
        deadline, st, r = time.time() + 180, None, None
        while time.time() < deadline:
            r = cli("serve", "status", "--profile", "raw", "--json", check=False, env={"RAY_AUTH_MODE": "token"})
            apps = json.loads(r.stdout) if r.returncode == 0 else []
            if apps and apps[0]["status"] == "RUNNING": st = apps[0]; break
            assert r.returncode == 0 or "Ray Serve is not running" in r.stderr, r.stderr[-2000:]  # not yet, or a real error
            assert not apps or apps[0]["status"] not in ("DEPLOY_FAILED", "UNHEALTHY"), apps[0]["message"]
            time.sleep(2)
        assert st, f"not RUNNING under `serve deploy`: {r.stdout[-2000:]} {r.stderr[-2000:]}"
        yield st
    finally:
        stop_processes(_started_by(temp, gcs, marker))


# ---- parallel workers: who runs where, and tests that run alone ------------------------------------------
#
# `make test` runs pytest in workers (pytest-xdist). Each test module is one unit of work, except that the modules
# using the serving project (a function of theirs takes `project`) are one unit, "serving", so that one worker runs
# them in order on one serving cluster, and the modules using `fresh_venv` share one install. A test marked `solo`
# (zero errors or a figure under load) runs while no other test of the run does: the workers share a lock file.

def pytest_configure(config):
    config.addinivalue_line("markers", "solo: runs while no other test of the run does (pytest-xdist workers wait)")


def _unit(path: str) -> str:
    """The unit of work of the test module at `path` (relative to the repository): 'serving', 'fresh_venv' or the path,
    by the fixtures its tests and fixtures ask for (a helper's argument named `project` is not the fixture)."""
    import ast
    asks = lambda f: f.name.startswith("test_") or any("fixture" in ast.unparse(d) for d in f.decorator_list)
    args = {a.arg for f in ast.walk(ast.parse((REPO / path).read_text())) if isinstance(f, ast.FunctionDef) and asks(f) for a in f.args.args}
    return "serving" if "project" in args else "fresh_venv" if "fresh_venv" in args else path


def pytest_xdist_make_scheduler(config, log):
    "pytest-xdist's scheduling by scope, with `_unit`'s scopes (its `xdist_group` marks are not seen under pytest 9)."
    from functools import cache
    from xdist.scheduler import LoadScopeScheduling

    class ByUnit(LoadScopeScheduling):
        _split_scope = staticmethod(cache(lambda nodeid: _unit(nodeid.split("::", 1)[0])))
    return ByUnit(config, log)


@contextmanager
def _turn(base: Path, solo: bool):
    """A readers-writer lock shared by the run's workers (files `base`.gate and `base`.lock): a `solo` test holds it
    alone, others share it. A solo test waiting for it holds the gate, so no other test starts meanwhile (it is not
    starved)."""
    import fcntl
    with open(f"{base}.gate", "a") as gate, open(f"{base}.lock", "a") as lock:
        fcntl.flock(gate, fcntl.LOCK_EX)
        try: fcntl.flock(lock, fcntl.LOCK_EX if solo else fcntl.LOCK_SH)
        finally: fcntl.flock(gate, fcntl.LOCK_UN)
        try: yield
        finally: fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    "Each test (its set-up, call and tear-down) under the workers' shared lock; alone if it is marked `solo`."
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        yield
        return
    # a worker's temporary folder is its own folder in the run's (pytest keeps the last few runs' and removes the rest)
    with _turn(Path(item.config.option.basetemp).parent / "solo", item.get_closest_marker("solo") is not None): yield


# ---- MLflow's process-wide URIs do not leak from one test into the next ---------------------------------------

def _mlflow_uri_modules() -> tuple:
    "MLflow's modules holding the process-wide tracking and registry URIs (`_tracking_uri`, `_registry_uri`)."
    from mlflow.tracking._model_registry import utils as registry
    from mlflow.tracking._tracking_service import utils as tracking
    return tracking, registry


@pytest.fixture(autouse=True)
def _mlflow_uris_restored():
    """MLflow's process-wide tracking and registry URIs, and $MLFLOW_TRACKING_URI/$MLFLOW_REGISTRY_URI, as they were
    before each test. A replica's set-up run in this process (`EndpointCore` in test_audit, test_serving_safety) sets
    them; left behind, a later test's `MlflowClient(tracking_uri)` would read that project's registry, which one
    depending on what this worker ran before."""
    env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    before = (None, None)  # MLflow's defaults, if this test is the first to import it
    if "mlflow" in sys.modules:
        tracking, registry = _mlflow_uri_modules()
        before = tracking._tracking_uri, registry._registry_uri
    yield
    for k, v in env.items():
        if v is None: os.environ.pop(k, None)
        else: os.environ[k] = v
    if "mlflow" in sys.modules:
        tracking, registry = _mlflow_uri_modules()
        tracking._tracking_uri, registry._registry_uri = before


# ---- no kernel may outlive the session ---------------------------------------------------------------

def pytest_sessionstart(session):
    os.environ[SESSION_MARKER] = uuid.uuid4().hex


def _is_kernel(p: psutil.Process) -> bool:
    try: return any("ipykernel_launcher" in a for a in p.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess): return False


def _ours(p: psutil.Process, marker: str, descendants: set[int]) -> bool:
    if p.pid in descendants: return True
    try: return p.environ().get(SESSION_MARKER) == marker
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess): return False


def stray_kernels(marker: str | None = None) -> list[psutil.Process]:
    "Kernel processes started by this session (descendants of this process, or carrying its marker)."
    marker = marker or os.environ.get(SESSION_MARKER, "")
    try: descendants = {c.pid for c in psutil.Process().children(recursive=True)}
    except psutil.NoSuchProcess: descendants = set()
    return [p for p in psutil.process_iter() if p.pid != os.getpid() and _is_kernel(p) and _ours(p, marker, descendants)]


def _describe(p: psutil.Process) -> str:
    try: return f"pid {p.pid} (parent {p.ppid()}, up {time.time() - p.create_time():.0f}s): {' '.join(p.cmdline())[:200]}"
    except psutil.Error: return f"pid {p.pid} (gone)"


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    if not os.environ.get(SESSION_MARKER): return
    deadline = time.monotonic() + KERNEL_WAIT_S
    while (left := stray_kernels()) and time.monotonic() < deadline: time.sleep(0.25)
    if not left: return
    lines = [f"{len(left)} Jupyter kernel process(es) outlived the test session (waited {KERNEL_WAIT_S:.0f} s):",
             *(f"  {_describe(p)}" for p in left),
             "A job or test that starts a kernel must stop it, also when it fails or times out. Killing them now."]
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter: reporter.ensure_newline(); reporter.write_sep("=", "stray kernels", red=True)
    for line in lines: reporter.write_line(line) if reporter else print(line)
    for p in left:
        try: p.kill()
        except psutil.Error: pass
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


# ---- polling helpers of the jobs modules (test_jobs, test_jobs_resilience) ----------------------------------------

def client(s):
    "The profile's MLflow client."
    from ml_prod.tracking import store
    return store.client(s)


def wait_for(pred, timeout=60, every=0.2):
    "`pred()`'s first truthy value, polled every `every` s; fails after `timeout` s."
    end = time.time() + timeout
    while time.time() < end:
        if v := pred(): return v
        time.sleep(every)
    raise AssertionError(f"condition not met within {timeout} s")


def running_tag(s, run_id, tag):
    "Value of `tag` once the run has it."
    return wait_for(lambda: client(s).get_run(run_id).data.tags.get(tag))


# ---- a real browser: Debian's Chromium driven by Playwright (no browser download) ----------------------------------

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update"]


@pytest.fixture(scope="module")
def browser():
    "A headless Chromium (Playwright); skipped without /usr/bin/chromium, except in CI (`CI` set), where that fails."
    if not CHROMIUM.exists():
        msg = f"{CHROMIUM} is missing: install Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)"
        if os.environ.get("CI"): pytest.fail(msg)
        pytest.skip(msg)
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()
