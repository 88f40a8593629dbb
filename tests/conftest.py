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
"""
from __future__ import annotations

import os
import time
import uuid

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
