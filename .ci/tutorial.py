#!/usr/bin/env python3
"""`make tutorial`: run `ml_prod demo` in a fresh project and save the executed tutorial, with its
outputs, as the package's tutorial (`ml_prod/examples/fraud/tutorial.ipynb`, which
`nbs/tutorials/fraud_end_to_end.ipynb` links to), so the docs show what a real run printed.

papermill's injected-parameters cell is dropped (the demo's defaults are the notebook's own), and
the notebook is normalised with nbdev-clean like every other."""
from __future__ import annotations
import json, shutil, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TUTORIAL = ROOT / "ml_prod" / "examples" / "fraud" / "tutorial.ipynb"
PROJECT = Path("/tmp/ml_prod-tutorial")  # a fixed place: the saved outputs name it


def main() -> None:
    shutil.rmtree(PROJECT, ignore_errors=True)
    PROJECT.mkdir()
    (PROJECT / "settings.ini").write_text("[DEFAULT]\n")
    subprocess.run([str(BIN / "ml_prod"), "demo"], cwd=PROJECT, check=True)
    nb = json.loads((PROJECT / ".ml_prod" / "demo" / "fraud_end_to_end.ipynb").read_text())
    nb["cells"] = [c for c in nb["cells"] if "injected-parameters" not in c.get("metadata", {}).get("tags", [])]
    TUTORIAL.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    subprocess.run([str(BIN / "nbdev-clean"), "--fname", str(TUTORIAL)], cwd=ROOT, check=True)
    shutil.rmtree(PROJECT)
    print(f"saved the executed tutorial: {TUTORIAL.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
