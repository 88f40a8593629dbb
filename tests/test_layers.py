"The layers (nbs/explanations/architecture.ipynb) only point downward, and light processes load nothing heavy: import-linter checks the contracts in pyproject.toml."
import shutil, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = str(Path(sys.executable).parent / "lint-imports")


def test_layers_point_downward():
    r = subprocess.run([LINT], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "5 kept, 0 broken" in r.stdout, r.stdout


def test_the_contracts_catch_an_upward_and_a_heavy_import(tmp_path):
    "On a copy of the package: an upward import and Ray or MLflow in a kernel-side module break their contracts."
    shutil.copytree(ROOT / "ml_prod", tmp_path / "ml_prod", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    with open(tmp_path / "ml_prod" / "tracking" / "tags.py", "a") as f: f.write("\nfrom ml_prod.serving import control\n")
    with open(tmp_path / "ml_prod" / "report.py", "a") as f: f.write("\nimport mlflow\n")
    with open(tmp_path / "ml_prod" / "audit" / "writer.py", "a") as f: f.write("\nimport pyarrow\n")
    r = subprocess.run([LINT], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode != 0 and "2 kept, 3 broken" in r.stdout, r.stdout
    assert "ml_prod.tracking.tags -> ml_prod.serving.control" in r.stdout and "ml_prod.report -> mlflow" in r.stdout, r.stdout
