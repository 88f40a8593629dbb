"""`ml_prod init NAME` scaffolds a project from the package's template and the fraud example's job notebooks, refuses
an existing folder unless `--force`, and the scaffolded project's own tests pass in a fresh virtualenv that has
ml_prod installed from a wheel of this checkout (slow: conftest's `fresh_venv`, shared with test_install)."""
import configparser
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import clean_env, sh

ROOT = Path(__file__).resolve().parents[1]
ML_PROD = str(Path(sys.executable).parent / "ml_prod")
FILES = {".gitignore", "README.md", "pipeline.yaml", "pyproject.toml", "ray_cluster.yaml", "retrain.yaml", "schedules.yaml", "serve.yaml",
         "settings.ini", "tests/test_project.py", "jobs/data.ipynb", "jobs/train.ipynb", "jobs/evaluate.ipynb", "jobs/register.ipynb"}


def init(cwd: Path, *args: str, ml_prod: str = ML_PROD, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([ml_prod, "init", *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env=env or {**os.environ, "COLUMNS": "200"})


def files(root: Path) -> set[str]: return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_init_scaffolds_a_project(tmp_path):
    r = init(tmp_path, "fraud-watch")
    assert r.returncode == 0 and "created fraud-watch (14 files)" in r.stdout, r.stdout + r.stderr
    proj = tmp_path / "fraud-watch"
    assert files(proj) == FILES
    for job in ("data", "train", "evaluate", "register"):  # copied from the example, as they are
        assert (proj / "jobs" / f"{job}.ipynb").read_bytes() == (ROOT / "ml_prod/examples/fraud" / f"{job}.ipynb").read_bytes()
    assert (proj / "ray_cluster.yaml").read_text() == (ROOT / "ray_cluster.yaml").read_text()  # the one test_ray_cluster_yaml checks
    ini = configparser.ConfigParser()
    ini.read(proj / "settings.ini")
    assert ini.sections() == [] and "# [cluster]" in (proj / "settings.ini").read_text()  # embedded; the cluster one commented
    assert 'allowed_cell_metadata_keys = ["tags"]' in (proj / "pyproject.toml").read_text()
    assert ".ml_prod/" in (proj / ".gitignore").read_text().splitlines()
    assert "{{" not in "".join(p.read_text() for p in proj.rglob("*") if p.suffix != ".ipynb" and p.is_file())


def test_init_refuses_an_existing_folder(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    r = init(tmp_path, "taken")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "taken already exists: choose another NAME, or pass --force" in " ".join(r.stderr.split()), r.stderr
    assert files(tmp_path / "taken") == {"notes.txt"} and "Traceback" not in r.stderr


def test_force_writes_into_an_existing_folder(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    r = init(tmp_path, "taken", "--force")
    assert r.returncode == 0, r.stdout + r.stderr
    assert files(tmp_path / "taken") == FILES | {"notes.txt"} and (tmp_path / "taken" / "notes.txt").read_text() == "mine"


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_the_scaffolded_projects_tests_pass_in_a_fresh_virtualenv(tmp_path, fresh_venv):
    "The project is scaffolded by the installed wheel's `ml_prod init` (its template is package data), then its tests run."
    env = clean_env(fresh_venv)
    sh(fresh_venv / "bin" / "python", "-m", "pip", "install", "--quiet", "pytest", env=env)
    r = init(tmp_path, "fraud-watch", ml_prod=str(fresh_venv / "bin" / "ml_prod"), env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    t0 = time.monotonic()
    r = subprocess.run([fresh_venv / "bin" / "python", "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=tmp_path / "fraud-watch",
                       capture_output=True, text=True, timeout=900, env=env)
    print(f"the scaffolded project's tests: {time.monotonic() - t0:.0f} s\n{r.stdout[-2000:]}")
    n = (tmp_path / "fraud-watch" / "tests" / "test_project.py").read_text().count("\ndef test_")  # every test the template ships ran
    assert r.returncode == 0 and f"{n} passed" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


@pytest.mark.long  # beyond CI's time limit: `make test LONG=1`
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_the_scaffolded_pipeline_runs(tmp_path):
    "The README's first command: the training pipeline, with the example's packages (this checkout's .venv has them)."
    assert init(tmp_path, "fraud-watch").returncode == 0
    proj = tmp_path / "fraud-watch"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ML_PROD_", "RAY_ADDRESS", "MLFLOW_"))}
    t0 = time.monotonic()
    r = subprocess.run([ML_PROD, "pipeline", "run", "pipeline.yaml"], cwd=proj, capture_output=True, text=True, timeout=1100,
                       env={**env, "RAY_USAGE_STATS_ENABLED": "0", "COLUMNS": "200"})
    print(f"ml_prod pipeline run in the scaffolded project: {time.monotonic() - t0:.0f} s")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = subprocess.run([ML_PROD, "--json", "models", "show", "fraud-watch"], cwd=proj, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0 and "challenger" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
