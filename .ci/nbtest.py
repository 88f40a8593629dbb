#!/usr/bin/env python3
"""`make test`'s notebook half: what `nbdev-test` runs, each notebook in a process of its own.

The same notebooks (nbdev's own file selection: `nbglob`, siblings of `.notest` left out), the same
cells (nbdev's `test_nb` with the project's `tst_flags`; `--flags slow` also runs the slow ones) and
its cell timeout. The one difference: `nbdev-test` runs several notebooks one after the other in each
worker process, so a notebook inherits the modules the previous one changed (a CLI notebook that
re-registers a command group on the shared Typer app hides another notebook's commands: it failed CI
depending on which notebooks a worker drew). Here every notebook starts from a fresh interpreter, as a
kernel would, two at a time.

    .ci/nbtest.py [--flags "slow"] [--workers N]
"""
from __future__ import annotations
import argparse, multiprocessing, os, sys, time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path


def one(path: str, skip: list[str], force: list[str], basepath: str, timeout) -> tuple[bool, float]:
    from nbdev.test import test_nb
    return test_nb(path, skip_flags=skip, force_flags=force, basepath=basepath, cell_timeout=timeout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flags", default="", help="space-separated test flags to run too (e.g. slow)")
    ap.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8), help="notebooks at a time")
    a = ap.parse_args()
    from nbdev.config import get_config
    from nbdev.doclinks import nbglob
    from nbdev.test import _keep_file
    cfg = get_config()
    skip = cfg.tst_flags.split() if isinstance(cfg.tst_flags, str) else list(cfg.tst_flags)
    files = [f.absolute() for f in sorted(nbglob(None, as_path=True)) if _keep_file(f, ".notest")]
    t0 = time.monotonic()
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=a.workers, mp_context=ctx, max_tasks_per_child=1) as pool:
        futures = {pool.submit(one, str(f), skip, a.flags.split(), str(cfg.config_path), cfg.cell_timeout or None): f for f in files}
        results = {}
        for fut in as_completed(futures):
            f = futures[fut]
            try: results[f] = fut.result()
            except Exception as e: results[f] = (False, time.monotonic() - t0); print(f"{f.name}: its process died ({type(e).__name__})", flush=True)
            print(f"{'ok    ' if results[f][0] else 'FAILED'} {results[f][1]:6.1f} s  {f.relative_to(Path.cwd()) if f.is_relative_to(Path.cwd()) else f}", flush=True)
    slowest = sorted(results.items(), key=lambda kv: -kv[1][1])[:10]
    print("slowest notebooks: " + ", ".join(f"{f.name} {t:.0f} s" for f, (_, t) in slowest))
    failed = [f.name for f, (ok, _) in results.items() if not ok]
    if failed:
        sys.stderr.write("\nnotebook tests failed:\n\t" + "\n\t".join(failed) + "\n")
        return 1
    print(f"Success: {len(files)} notebooks, each in its own process, in {time.monotonic() - t0:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
