#!/usr/bin/env python
"""Benchmark: per-trial overhead of a notebook trial (`ml_prod.tune.tune_notebook`) vs. its Ray Tune function twin.

    .venv/bin/python bench/tune.py [--trials N] [--reports R] [--sleep S]

Both sweeps run in this process on one warm local Ray (`ray.init(num_cpus=2)`, an untimed warm-up sweep
first), FIFO scheduler, one trial at a time (`max_concurrent=1`, 1 CPU per trial), N trials each doing the
same work: R reports with a sleep of S seconds before each. The notebook trial also creates its child MLflow
run, starts a kernel, runs papermill and records the executed notebook; the function twin only sleeps and
calls `ray.tune.report`. Per-trial wall time = sweep wall time / N (actor start-up included for both).
Target: a notebook trial adds no more than 1.5 s over its function twin.
"""
from __future__ import annotations
import argparse, os, statistics, sys, tempfile, time, warnings
from pathlib import Path

warnings.filterwarnings("ignore")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def make_notebook(path: Path, reports: int, sleep: float) -> Path:
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook
    nb = new_notebook(cells=[new_code_cell("x: int = 0", metadata={"tags": ["parameters"]}),
                             new_code_cell(f"import time, ml_prod\nfor i in range({reports}):\n    time.sleep({sleep})\n"
                                           "    ml_prod.report(epoch=i, score=x + i)")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def function_sweep(trials: int, reports: int, sleep: float, storage: str) -> float:
    from ray import tune

    def twin(config):
        for i in range(reports):
            time.sleep(sleep)
            tune.report({"epoch": i, "score": config["x"] + i})

    t0 = time.perf_counter()
    tune.Tuner(tune.with_resources(twin, {"cpu": 1}), param_space={"x": tune.grid_search(list(range(trials)))},
               tune_config=tune.TuneConfig(metric="score", mode="max", max_concurrent_trials=1),
               run_config=tune.RunConfig(storage_path=storage, name=f"twin-{time.time_ns()}", verbose=0)).fit()
    return time.perf_counter() - t0


def notebook_sweep(nbp: Path, trials: int, s, cwd: Path) -> tuple[float, object]:
    from ml_prod.tune import tune_notebook
    t0 = time.perf_counter()
    r = tune_notebook(nbp, {"x": {"grid": list(range(trials))}}, metric="score", scheduler="fifo", max_concurrent=1,
                      settings=s, cwd=cwd, progress=False)
    return time.perf_counter() - t0, r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--reports", type=int, default=3)
    ap.add_argument("--sleep", type=float, default=0.2)
    ap.add_argument("--rounds", type=int, default=2, help="alternating function / notebook sweeps")
    a = ap.parse_args()
    import ray
    from ml_prod.settings import load_settings
    tmp = Path(tempfile.mkdtemp(prefix="ml_prod-bench-tune-"))
    (tmp / "settings.ini").write_text("[DEFAULT]\n")
    os.chdir(tmp)
    s = load_settings()
    nbp = make_notebook(tmp / "trial.ipynb", a.reports, a.sleep)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=True, logging_level="error")
    print(f"load average before: {os.getloadavg()}", flush=True)
    function_sweep(1, 1, 0.0, str(tmp / "ray"))  # warm-up, untimed
    notebook_sweep(nbp, 1, s, tmp)
    fn, nb = [], []
    for i in range(a.rounds):
        fn.append(function_sweep(a.trials, a.reports, a.sleep, str(tmp / "ray")) / a.trials)
        t, r = notebook_sweep(nbp, a.trials, s, tmp)
        assert all(t_.status == "FINISHED" for t_ in r.trials), r.summary()
        nb.append(t / a.trials)
        print(f"round {i + 1}: function trial {fn[-1]:.2f} s, notebook trial {nb[-1]:.2f} s, difference {nb[-1] - fn[-1]:+.2f} s", flush=True)
    f, n = statistics.median(fn), statistics.median(nb)
    work = a.reports * a.sleep
    print(f"\n{a.trials} trials x {a.rounds} rounds, {a.reports} reports, {a.sleep} s sleep each ({work:.1f} s of work per trial)")
    print(f"{'':24}{'per trial (median)':>20}")
    print(f"{'function trainable':24}{f:>18.2f} s")
    print(f"{'notebook trial':24}{n:>18.2f} s")
    print(f"{'difference':24}{n - f:>+18.2f} s   (target: <= +1.50 s) {'OK' if n - f <= 1.5 else 'MISSED'}")
    print(f"load average after: {os.getloadavg()}")
    ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
