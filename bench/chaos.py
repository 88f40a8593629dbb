#!/usr/bin/env python
"""Long form of tests/test_chaos_jobs.py (issue 19, jobs under faults): the same scenarios at the issue's size.

    .venv/bin/python bench/chaos.py [--jobs N] [--in-flight K] [--cpus C]

N short notebook jobs (default 120, every scenario about equally often, shuffled) go through `submit_notebook` on a
fresh local Ray (`ray.init(num_cpus=2)`), at most K at once (default 4, 0.5 CPU each), each with its fault injected for
real: a cell exception; SIGKILL of the kernel mid-cell; an infinite loop stopped by a 6 s job timeout; SIGKILL of the Ray
worker running the supervisor, with one retry and without; a healthy job while the SQLite tracking store is locked by
an exclusive transaction for 20 s (one lock covers every such job then running). The outcomes are read from MLflow's
SQLite tables, the stored executed notebooks and psutil, as the test reads them, and printed as one table: scenario,
jobs, final statuses, ended within deadline + 60 s, left RUNNING, orphaned processes, seconds per job (submission to
end, median / max), and every broken expectation below it. It uses a temporary project and exits 1 when anything
broke. Run it under /tmp/plan/serving.lock on a shared machine; the load average is printed with the table.
"""
from __future__ import annotations
import argparse, os, sys, tempfile, time, uuid, warnings
from pathlib import Path

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=120)
    ap.add_argument("--in-flight", type=int, default=4)
    ap.add_argument("--cpus", type=float, default=0.5)
    a = ap.parse_args()
    import test_chaos_jobs as chaos  # the scenarios, the driver and the raw checks of the short form
    marker = os.environ.setdefault(chaos.SESSION_MARKER, f"bench-chaos-{uuid.uuid4().hex}")  # inherited by Ray and kernels
    with tempfile.TemporaryDirectory(prefix="ml_prod-chaos-") as tmp:
        root = Path(tmp) / "project"
        root.mkdir()
        (root / "settings.ini").write_text("[DEFAULT]\n")
        for v in [v for v in os.environ if v.startswith("ML_PROD_") and v != chaos.SESSION_MARKER]: os.environ.pop(v)
        for v in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_RUN_ID"): os.environ.pop(v, None)
        os.chdir(root)
        import ray
        from ml_prod.settings import load_settings
        ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="ml_prod", log_to_driver=False,
                 configure_logging=True, logging_level="warning")
        try:
            s = load_settings()
            before = chaos.outside_tree(marker)
            load0 = os.getloadavg()
            print(f"{a.jobs} jobs, {a.in_flight} in flight, {a.cpus:g} CPU each; load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")
            m = chaos.run_mix(s, root, chaos.mix(a.jobs), in_flight=a.in_flight, cpus=a.cpus, log=print)
            m.orphans = chaos.check_orphans(marker, m.pid_files, before)
            rows = chaos.judge(s, m)
            load1 = os.getloadavg()
        finally:
            ray.shutdown()
    print()
    print(chaos.table(rows, m))
    print(f"\nstore locks: {len(m.locks)} of {', '.join(f'{b - t:.1f}' for t, b in m.locks)} s; {len(m.pid_files)} kernels recorded "
          f"their pids; load average at the end {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f} ({os.cpu_count()} cores)")
    problems = [p for r in rows.values() for p in r.problems] + [f"orphan: {o}" for o in m.orphans]
    if len(m.jobs) < a.jobs: problems.append(f"only {len(m.jobs)} of {a.jobs} jobs were submitted before the driver's limit")
    for p in problems: print("BROKEN:", p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
