"The layers (nbs/explanations/architecture.ipynb) only point downward, and light processes load nothing heavy: import-linter checks the contracts in pyproject.toml."
import subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_layers_point_downward():
    r = subprocess.run([str(Path(sys.executable).parent / "lint-imports")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "4 kept, 0 broken" in r.stdout, r.stdout
