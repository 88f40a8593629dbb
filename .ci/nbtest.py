#!/usr/bin/env python3
"""`make test`'s notebook half: what `nbdev-test` runs, each notebook in a process of its own.

The same notebooks (nbdev's own file selection: `nbglob`, siblings of `.notest` left out), the same
cells (nbdev's `test_nb` with the project's `tst_flags`; `--flags slow` also runs the slow ones) and
its cell timeout. The one difference: `nbdev-test` runs several notebooks one after the other in each
worker process, so a notebook inherits the modules the previous one changed (a CLI notebook that
re-registers a command group on the shared Typer app hides another notebook's commands: it failed CI
depending on which notebooks a worker drew). Here every notebook starts from a fresh interpreter, as a
kernel would, two at a time, and a process that dies (Ray ends one that calls into it after
`ray.shutdown()`) fails its own notebook only. Each notebook's time is printed as it ends, then the
ten slowest.

    .ci/nbtest.py [--flags "slow"] [--workers N]
"""
from __future__ import annotations
import argparse, os, subprocess, sys, time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path


def one(path: str, flags: str) -> int:
    "Test one notebook in this process: exit status 0 when it passes."
    from nbdev.config import get_config
    from nbdev.test import test_nb
    cfg = get_config()
    skip = cfg.tst_flags.split() if isinstance(cfg.tst_flags, str) else list(cfg.tst_flags)
    ok, _ = test_nb(path, skip_flags=skip, force_flags=flags.split(), basepath=str(cfg.config_path), cell_timeout=cfg.cell_timeout or None)
    return 0 if ok else 1


def run(path: Path, flags: str) -> tuple[int, float]:
    "Test `path` in a new interpreter: (its exit status, seconds)."
    t0 = time.monotonic()
    rc = subprocess.run([sys.executable, __file__, "--one", str(path), "--flags", flags]).returncode
    return rc, time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flags", default="", help="space-separated test flags to run too (e.g. slow)")
    ap.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8), help="notebooks at a time")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # the child: test this notebook only
    a = ap.parse_args()
    if a.one: return one(a.one, a.flags)
    from nbdev.doclinks import nbglob
    from nbdev.test import _keep_file
    files = [f.absolute() for f in sorted(nbglob(None, as_path=True)) if _keep_file(f, ".notest")]
    t0, results = time.monotonic(), {}
    with ThreadPoolExecutor(max_workers=a.workers) as pool:
        futures = {pool.submit(run, f, a.flags): f for f in files}
        for fut in as_completed(futures):
            f = futures[fut]
            rc, took = results[f] = fut.result()
            how = "ok    " if rc == 0 else f"FAILED (exit status {rc}{', its process was killed' if rc < 0 else ''})"
            print(f"{how} {took:6.1f} s  {os.path.relpath(f)}", flush=True)
    slowest = sorted(results.items(), key=lambda kv: -kv[1][1])[:10]
    print("slowest notebooks: " + ", ".join(f"{f.name} {t:.0f} s" for f, (_, t) in slowest))
    if failed := [f.name for f, (rc, _) in results.items() if rc != 0]:
        sys.stderr.write("\nnotebook tests failed:\n\t" + "\n\t".join(failed) + "\n")
        return 1
    print(f"Success: {len(files)} notebooks, each in its own process, in {time.monotonic() - t0:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
