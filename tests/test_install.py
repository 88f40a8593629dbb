"""`pip install ml_prod` without extras gives a working `ml_prod run`.

The wheel is built from this checkout and installed, with no extra, into a fresh virtualenv; the dependencies
come from the package index (pip's cache makes a second run quicker). Slow: the install takes minutes."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

REPO = Path(__file__).resolve().parent.parent


def sh(*cmd, cwd=None, env=None, timeout=1200) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def clean_env(venv: Path) -> dict:
    "The environment of a shell in `venv`: nothing of this test session's Python, ml_prod, Ray or MLflow settings."
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ML_PROD_", "RAY_ADDRESS", "MLFLOW_", "PYTHON", "VIRTUAL_ENV"))}
    return {**env, "PATH": f"{venv / 'bin'}:{env.get('PATH', '')}", "VIRTUAL_ENV": str(venv), "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_wheel_without_extras_runs_a_notebook(tmp_path):
    # the wheel, built from a copy of the sources (the build leaves nothing in the checkout)
    src = tmp_path / "src"
    shutil.copytree(REPO / "ml_prod", src / "ml_prod", ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("pyproject.toml", "README.md"): shutil.copy(REPO / f, src / f)
    sh(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", src)
    wheel = next((tmp_path / "dist").glob("ml_prod-*.whl"))

    venv = tmp_path / "venv"
    sh(sys.executable, "-m", "venv", venv)
    env = clean_env(venv)
    t0 = time.monotonic()
    sh(venv / "bin" / "python", "-m", "pip", "install", "--quiet", wheel, env=env)
    print(f"pip install {wheel.name} (no extras): {time.monotonic() - t0:.0f} s")

    # what the extras and the dev tools hold is not there (scikit-learn is: MLflow requires it), so the core needs none of it
    present = sh(venv / "bin" / "python", "-c", "import importlib.util as u, json; print(json.dumps([m for m in "
                 "('torch', 'jupyterlab', 'ipywidgets', 'fastcore', 'nbdev') if u.find_spec(m)]))", env=env).stdout
    assert json.loads(present) == [], present

    ml_prod = venv / "bin" / "ml_prod"
    assert "run" in sh(ml_prod, "--help", env=env).stdout

    project = tmp_path / "project"
    project.mkdir()
    (project / "settings.ini").write_text("[DEFAULT]\n")
    nb = new_notebook(cells=[new_code_cell("x: int = 1  # a number", metadata={"tags": ["parameters"]}),
                             new_code_cell("import mlflow\nprint('x is', x)\nmlflow.log_metric('doubled', 2 * x)")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, project / "double.ipynb")
    t0 = time.monotonic()
    r = sh(ml_prod, "run", "double.ipynb", "-p", "x", "7", cwd=project, env=env, timeout=600)
    print(f"ml_prod run in the fresh virtualenv: {time.monotonic() - t0:.0f} s")
    assert "x is 7" in r.stdout and "FINISHED" in r.stdout + r.stderr, r.stdout[-3000:] + r.stderr[-3000:]

    jobs = json.loads(sh(ml_prod, "--json", "jobs", "list", cwd=project, env=env).stdout)
    assert [(j["notebook"], j["status"]) for j in jobs] == [("double.ipynb", "FINISHED")], jobs
    assert jobs[0]["metrics"] == {"doubled": 14.0}, jobs
    # the parameter, as MLflow recorded it, read with the installed package
    params = sh(venv / "bin" / "python", "-c", "from ml_prod.settings import load_settings; from ml_prod.tracking.store import client; "
                f"print(client(load_settings()).get_run({jobs[0]['run_id']!r}).data.params.get('x'))", cwd=project, env=env).stdout
    assert params.strip() == "7", params
    log = json.loads(sh(ml_prod, "--json", "jobs", "logs", jobs[0]["run_id"], cwd=project, env=env).stdout)
    assert log["run_id"] == jobs[0]["run_id"] and "x is 7" in log["log"], log
