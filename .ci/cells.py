#!/usr/bin/env python3
"""Count the notebook cells `nbdev-test` executes: `.ci/cells.py [--flags "slow"]`.

The same selection nbdev-test makes: notebooks under nbs/ (not in `_`/`.` folders, not beside a
`.notest` file, not symlinks), code cells other than those marked `#| eval: false`, and cells marked
with a test flag (`tst_flags` in pyproject.toml) only when that flag is given. Standard library only;
nbdev's own directive parser is the README renderer's (`readme.py`).
"""
from __future__ import annotations
import argparse, json, sys, tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from readme import directives, text  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def notebooks(nbs: Path) -> list[Path]:
    return sorted(p for p in nbs.rglob("*.ipynb") if not p.is_symlink() and not (p.parent / ".notest").exists()
                  and not any(part.startswith(("_", ".")) for part in p.relative_to(nbs).parts))


def runs(cell: dict, skipped_flags: set[str]) -> bool:
    if cell["cell_type"] != "code": return False
    d = directives(text(cell["source"]))
    return d.get("eval") != "false" and not (skipped_flags & d.keys())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flags", default="", help="test flags nbdev-test was given, space-separated")
    args = ap.parse_args()
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["nbdev"]
    skipped = set(cfg.get("tst_flags", "").split()) - set(args.flags.split())
    nbs = notebooks(ROOT / cfg.get("nbs_path", "nbs"))
    n = sum(runs(c, skipped) for p in nbs for c in json.loads(p.read_text())["cells"])
    print(f"nbdev-test executed {n} notebook cells in {len(nbs)} notebooks (flags: {args.flags or 'none'})")


if __name__ == "__main__":
    main()
