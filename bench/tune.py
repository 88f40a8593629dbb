#!/usr/bin/env python
"""Benchmark: per-trial overhead of a notebook trial (`ml_prod.flows.tune.tune_notebook`) vs. its Ray Tune function twin.

    .venv/bin/python bench/tune.py [--trials N] [--reports R] [--sleep S] [--rounds K] [--no-profile]

All sweeps run in this process on one warm local Ray (`ray.init(num_cpus=2)`, untimed warm-up sweeps first),
FIFO scheduler, one trial at a time (`max_concurrent=1`, 1 CPU per trial), N trials each doing the same work:
R reports with a sleep of S seconds before each. Per round, interleaved:

* `function`       - the twin: a Ray Tune function trainable that sleeps and calls `ray.tune.report`,
                     Tune's defaults (a fresh actor per trial);
* `function reuse` - the same twin with `reuse_actors=True`;
* `notebook`       - `tune_notebook` as shipped (actor reuse, kernel booted ahead): each trial also creates
                     its child MLflow run, runs the notebook with papermill and records the executed notebook;
* `notebook fresh` - `tune_notebook(..., reuse_actors=False)`: a fresh actor (and kernel) per trial.

Per-trial wall time = sweep wall time / N (actor start-up included). The target compares like with like:
a notebook trial adds no more than 1.5 s over its function twin run with the same actor policy
(`notebook` vs `function reuse`, `notebook fresh` vs `function`).

Then (unless --no-profile) Ray is restarted with a `worker_process_setup_hook` that wraps ml_prod's, MLflow's,
papermill's and Tune's functions with timers in every worker (and times the first import of the heavy modules),
and one more notebook sweep and one twin sweep are run: it prints, per phase, the time trial 1 (fresh actor)
and the later trials (median) spent, and the timeline of one steady-state trial. Nothing in ml_prod is changed:
the wrappers are installed at run time, in that second Ray only, so the timed rounds above run unwrapped.
"""
from __future__ import annotations
import argparse, contextlib, functools, inspect, json, os, statistics, sys, tempfile, threading, time, warnings
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


def function_sweep(trials: int, reports: int, sleep: float, storage: str, reuse: bool = False) -> float:
    from ray import tune

    def twin(config):
        for i in range(reports):
            time.sleep(sleep)
            tune.report({"epoch": i, "score": config["x"] + i})

    t0 = time.perf_counter()
    tune.Tuner(tune.with_resources(twin, {"cpu": 1}), param_space={"x": tune.grid_search(list(range(trials)))},
               tune_config=tune.TuneConfig(metric="score", mode="max", max_concurrent_trials=1, reuse_actors=reuse),
               run_config=tune.RunConfig(storage_path=storage, name=f"twin-{time.time_ns()}", verbose=0)).fit()
    return time.perf_counter() - t0


def notebook_sweep(nbp: Path, trials: int, s, cwd: Path, reuse: bool = True, progress=False) -> tuple[float, object]:
    from ml_prod.flows.tune import tune_notebook
    kw = {"reuse_actors": reuse} if "reuse_actors" in inspect.signature(tune_notebook).parameters else {}
    t0 = time.perf_counter()
    r = tune_notebook(nbp, {"x": {"grid": list(range(trials))}}, metric="score", scheduler="fifo", max_concurrent=1,
                      settings=s, cwd=cwd, progress=progress, **kw)
    t = time.perf_counter() - t0
    assert all(t_.status == "FINISHED" for t_ in r.trials), r.summary()
    return t, r


# ---------------------------------------------------------------------------------------------- profiling
# What the worker-side profiler wraps: module -> [(attribute path, label)]. Missing attributes are skipped,
# so the benchmark runs against older and newer versions of ml_prod alike.
WORKER_PATCHES = {
    "ml_prod.flows.tune": [("_run_trial", "tune._run_trial (one trial, Tune's thread)"),
                     ("_trial_run", "tune._trial_run (create the child run)"),
                     ("_Bridge.supervise", "tune._Bridge.supervise (supervisor thread)"),
                     ("_Bridge.__call__", "tune._Bridge: queue a report for Tune"),
                     ("_end_trials", "tune._end_trials (reset/stop: end this actor's trial)")],
    "ray.tune": [("report", "ray.tune.report (waits for the driver)")],
    # a function is patched where its caller looks it up: the supervisor imports the kernel's functions by name
    "ml_prod.jobs.supervisor": [("supervise", "jobs.supervise"), ("_start_attempt", "jobs._start_attempt (MLflow get_run + tags)"),
                     ("acquire_kernel", "jobs.acquire_kernel (spare kernel, or boot one)"),
                     ("Kernel.start", "Kernel.start (boot a kernel)"), ("Kernel.prepare", "Kernel.prepare (env + cwd of a spare)"),
                     ("Kernel.__exit__", "Kernel.__exit__ (shutdown + kill group)"),
                     ("_execute", "jobs._execute (papermill thread)"), ("_watch", "jobs._watch (supervisor loop)"),
                     ("_finish", "jobs._finish (banner, artifacts, status)")],
    "ml_prod.jobs.kernel": [("_boot_spare", "jobs._boot_spare (start a thread)")],
    "ml_prod.tracking.store": [("create_job_run", "tracking.create_job_run"), ("git_state", "tracking.git_state (git x3)"),
                         ("package_versions", "tracking.package_versions"), ("environment_freeze", "tracking.environment_freeze"),
                         ("_log_provenance", "tracking._log_provenance (artifacts)"), ("client", "tracking.client")],
    "mlflow.tracking.client": [(f"MlflowClient.{m}", f"MlflowClient.{m}") for m in
                               ("create_run", "log_batch", "log_artifacts", "log_artifact", "log_text", "get_run",
                                "set_tag", "set_terminated", "log_metric")],
    "papermill": [("execute_notebook", "papermill.execute_notebook")],
    "ray.tune.trainable.trainable": [("Trainable.__init__", "Trainable.__init__ (setup)"), ("Trainable.reset", "Trainable.reset (reuse)"),
                                     ("Trainable.stop", "Trainable.stop (cleanup)")],
}
TIMED_IMPORTS = ("ray.tune", "ml_prod.flows.tune", "ml_prod.jobs.supervisor", "ml_prod.params", "mlflow", "papermill", "nbformat", "jupyter_client")


def _install_profiler(out_dir: str):
    "Runs in every Ray worker of the profiling Ray: wrap WORKER_PATCHES, time TIMED_IMPORTS, append events to a file."
    import importlib.abc, psutil
    pid = os.getpid()
    f = open(os.path.join(out_dir, f"{pid}.jsonl"), "a", buffering=1)
    lock, local = threading.Lock(), threading.local()

    def emit(label, depth, t0, t1):
        with lock: f.write(json.dumps([label, depth, t0, t1, pid]) + "\n")

    def wrap(label, fn):
        @functools.wraps(fn)
        def w(*a, **kw):
            d = getattr(local, "depth", 0); local.depth = d + 1; t0 = time.time()
            try: return fn(*a, **kw)
            finally: local.depth = d; emit(label, d, t0, time.time())
        return w

    def patch(mod):
        for path, label in WORKER_PATCHES.get(mod.__name__, []):
            *owner, name = path.split(".")
            obj = mod
            for o in owner: obj = getattr(obj, o, None)
            if obj is None or not hasattr(obj, name) or getattr(getattr(obj, name), "_bench", False): continue
            w = wrap(label, getattr(obj, name)); w._bench = True
            setattr(obj, name, w)

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name not in WORKER_PATCHES and name not in TIMED_IMPORTS: return None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"): continue
                spec = finder.find_spec(name, path, target)
                if spec is not None: break
            else: return None
            if spec.loader is None or not hasattr(spec.loader, "exec_module"): return spec
            orig = spec.loader.exec_module
            def exec_module(module):
                d = getattr(local, "depth", 0); local.depth = d + 1; t0 = time.time()
                try: orig(module)
                finally:
                    local.depth = d
                    if name in TIMED_IMPORTS: emit(f"import {name}", d, t0, time.time())
                patch(module)
            spec.loader.exec_module = exec_module
            return spec

    emit("worker process: spawn -> setup hook (python + ray)", 0, psutil.Process().create_time(), time.time())
    for name in WORKER_PATCHES:
        if name in sys.modules: patch(sys.modules[name])
    sys.meta_path.insert(0, Finder())


def _hook(out_dir: str):
    def bench_profiler(): _install_profiler(out_dir)
    return bench_profiler


class DriverTimeline:
    "Driver-side events: wrapped functions and Tune callback instants."
    def __init__(self): self.events, self._undo = [], []

    def patch(self, obj, name, label):
        orig = obj.__dict__[name] if isinstance(obj, type) else getattr(obj, name)
        tl = self
        @functools.wraps(orig)
        def w(*a, **kw):
            t0 = time.time()
            try: return orig(*a, **kw)
            finally: tl.events.append((label, 0, t0, time.time(), "driver"))
        setattr(obj, name, w)
        self._undo.append((obj, name, orig))

    def mark(self, label, t=None):
        t = time.time() if t is None else t
        self.events.append((label, 0, t, t, "driver"))

    def undo(self):
        for obj, name, orig in reversed(self._undo): setattr(obj, name, orig)
        self._undo.clear()


def _recording_progress(tl: DriverTimeline):
    "A stand-in for ml_prod.flows.tune.ProgressTable that records when Tune starts and completes trials (driver clock)."
    from ray.tune import Callback
    class Recorder(Callback):
        def __init__(self, *a, **kw): pass
        def on_trial_start(self, iteration, trials, trial, **info): tl.mark(f"driver: trial {trial.trial_id} started")
        def on_trial_complete(self, iteration, trials, trial, **info): tl.mark(f"driver: trial {trial.trial_id} complete")
        def on_trial_error(self, iteration, trials, trial, **info): tl.mark(f"driver: trial {trial.trial_id} error")
    return Recorder


def _read_worker_events(out_dir: Path) -> list:
    ev = []
    for p in out_dir.glob("*.jsonl"):
        for line in p.read_text().splitlines():
            with contextlib.suppress(ValueError): ev.append(tuple(json.loads(line)))
    return ev


def profile(args, tmp: Path, nbp: Path, s) -> None:
    "Restart Ray with the worker profiler, run one notebook sweep and one twin sweep, print where the time goes."
    import ray
    import ml_prod.flows.tune as mt
    from ray.tune.execution.tune_controller import TuneController
    prof = tmp / "profile"; prof.mkdir()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=True, logging_level="error",
             runtime_env={"worker_process_setup_hook": _hook(str(prof))})
    try:
        notebook_sweep(nbp, 1, s, tmp)  # warm-up, as in the timed rounds
        function_sweep(1, 1, 0.0, str(tmp / "ray"), reuse=True)
        for p in prof.glob("*.jsonl"): p.write_text("")
        tl = DriverTimeline()
        tl.patch(mt, "ProgressTable", "ProgressTable"); mt.ProgressTable = _recording_progress(tl)
        import ml_prod.tracking.store as T, ml_prod.runtime.cluster as C
        from ray import tune
        for name, label in (("_open_sweep", "driver: _open_sweep (parent run, provenance)"), ("_trial_results", "driver: _trial_results"),
                            ("_close_sweep", "driver: _close_sweep"), ("make_trainable", "driver: make_trainable"),
                            ("_trials_done", "driver: _trials_done (read Tune's saved state)")):
            if hasattr(mt, name): tl.patch(mt, name, label)
        for obj, name, label in ((T, "git_state", "driver: tracking.git_state"), (T, "ensure_experiment", "driver: tracking.ensure_experiment"),
                                 (T, "environment_freeze", "driver: tracking.environment_freeze"), (C, "connect", "driver: cluster.connect"),
                                 (tune.Tuner, "fit", "driver: Tuner.fit")):
            tl.patch(obj, name, label)
        tl.patch(TuneController, "_schedule_trial_actor", "driver: Tune schedules an actor (new or cached)")
        tl.patch(TuneController, "_schedule_trial_reset", "driver: Tune asks a cached actor to reset")
        t0 = time.time()
        try: wall, r = notebook_sweep(nbp, args.trials, s, tmp, progress=True)
        finally: tl.undo()
        t_end = time.time()
        tl.events.append(("driver: tune_notebook (total)", 0, t0, t_end, "driver"))
        time.sleep(1.0)  # let the stopped actors flush their last events
        events = [e for e in _read_worker_events(prof) if e[2] >= t0 - 1] + tl.events
        _print_profile(events, t0, t_end, wall, args.trials, r)
    finally:
        ray.shutdown()


def _trial_windows(events, t0: float) -> list[tuple[str, float, float]]:
    "(trial id, start, end) per trial: from the previous trial's completion (or the sweep's start) to its own, driver clock."
    done = sorted((e[2], e[0].split()[2]) for e in events if e[0].startswith("driver: trial ") and e[0].endswith("complete"))
    out, prev = [], t0
    for t, tid in done:
        out.append((tid, prev, t)); prev = t
    return out


def _print_profile(events, t0, t_end, wall, trials, r):
    wins = _trial_windows(events, t0)
    if not wins: print("profile: no trial completed"); return
    def in_win(e, w): return w[1] <= e[2] < w[2]
    labels, seen = [], set()
    for e in sorted(events, key=lambda e: e[2]):
        if e[4] != "driver" and e[0] not in seen: labels.append((e[0], e[1])); seen.add(e[0])  # one row per phase, at its first depth
    per = [{} for _ in wins]
    for e in events:
        if e[4] == "driver": continue
        for i, w in enumerate(wins):
            if in_win(e, w): per[i][e[0]] = per[i].get(e[0], 0.0) + e[3] - e[2]; break
    print(f"\nPROFILE: notebook sweep of {trials} trials in {wall:.2f} s ({wall / trials:.2f} s per trial). A trial's window runs "
          "from the previous trial's completion (driver clock) to its own; phases are summed per window, nested ones "
          "are included in their parents, and work in other threads (papermill, kernel boot ahead) overlaps.")
    print(f"  {'phase (worker side; nested calls indented)':86}{'trial 1':>9}{'later (median)':>16}")
    for label, depth in labels:
        first = per[0].get(label, 0.0)
        later = statistics.median(p.get(label, 0.0) for p in per[1:]) if len(per) > 1 else float("nan")
        if first < 0.0005 and not later >= 0.0005: continue
        print(f"  {('  ' * depth + label)[:86]:86}{first:9.3f}{later:16.3f}")
    win = [w[2] - w[1] for w in wins]
    print(f"  {'trial window (wall, driver)':86}{win[0]:9.3f}{statistics.median(win[1:]) if len(win) > 1 else float('nan'):16.3f}")
    pre = min(w[1] for w in wins)
    first_start = min((e[2] for e in events if e[0].startswith("driver: trial ") and e[0].endswith("started")), default=pre)
    print(f"  sweep set-up before the first trial started: {first_start - t0:.3f} s; after the last trial: {t_end - wins[-1][2]:.3f} s")
    print("\n  driver side (offset from the call, duration):")
    for e in sorted((e for e in events if e[4] == "driver" and e[3] > e[2]), key=lambda e: e[2]):
        print(f"  {e[2] - t0:7.3f} {e[3] - e[2]:7.3f}  {e[0]}")
    w = wins[min(2, len(wins) - 1)]
    print(f"\nTIMELINE of trial {w[0]} (a steady-state trial; seconds from the previous trial's completion):")
    for e in sorted((e for e in events if in_win(e, w) or (e[4] == "driver" and w[1] <= e[2] <= w[2])), key=lambda e: (e[2], e[1])):
        who = "driver" if e[4] == "driver" else f"pid {e[4]}"
        print(f"  {e[2] - w[1]:7.3f} {e[3] - e[2]:7.3f}  {who:>10}  {'  ' * max(e[1], 0)}{e[0]}")


# ---------------------------------------------------------------------------------------------- main

def own_kernels(tmp: Path) -> list[int]:
    import psutil
    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(Exception):
            if any("ipykernel_launcher" in a for a in (p.info["cmdline"] or [])) and str(tmp) in p.environ().get("MLFLOW_TRACKING_URI", ""):
                out.append(p.info["pid"])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--reports", type=int, default=3)
    ap.add_argument("--sleep", type=float, default=0.2)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the four interleaved sweeps")
    ap.add_argument("--no-profile", action="store_true", help="skip the per-phase profile")
    a = ap.parse_args()
    import ray
    from ml_prod.settings import load_settings
    tmp = Path(tempfile.mkdtemp(prefix="ml_prod-bench-tune-"))
    (tmp / "settings.ini").write_text("[DEFAULT]\n")
    os.chdir(tmp)
    s = load_settings()
    nbp = make_notebook(tmp / "trial.ipynb", a.reports, a.sleep)
    t_begin, load0 = time.perf_counter(), os.getloadavg()
    print(f"load average before: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} on {os.cpu_count()} cores; temp project {tmp}", flush=True)
    kinds = ("function", "function reuse", "notebook", "notebook fresh")
    res = {k: [] for k in kinds}
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=True, logging_level="error")
        function_sweep(1, 1, 0.0, str(tmp / "ray"))  # warm-up, untimed
        function_sweep(1, 1, 0.0, str(tmp / "ray"), reuse=True)
        notebook_sweep(nbp, 1, s, tmp)
        notebook_sweep(nbp, 1, s, tmp, reuse=False)
        for i in range(a.rounds):
            res["function"].append(function_sweep(a.trials, a.reports, a.sleep, str(tmp / "ray")) / a.trials)
            res["function reuse"].append(function_sweep(a.trials, a.reports, a.sleep, str(tmp / "ray"), reuse=True) / a.trials)
            res["notebook"].append(notebook_sweep(nbp, a.trials, s, tmp)[0] / a.trials)
            res["notebook fresh"].append(notebook_sweep(nbp, a.trials, s, tmp, reuse=False)[0] / a.trials)
            print(f"round {i + 1}: " + ", ".join(f"{k} {res[k][-1]:.2f} s" for k in kinds) + f"  (load {os.getloadavg()[0]:.2f})", flush=True)
        ray.shutdown()
        if not a.no_profile: profile(a, tmp, nbp, s)
    finally:
        with contextlib.suppress(Exception): ray.shutdown()
        time.sleep(0.5)
        if left := own_kernels(tmp):
            print(f"WARNING: {len(left)} kernel(s) of this benchmark still alive, killing them: {left}")
            import psutil
            for pid in left:
                with contextlib.suppress(Exception): psutil.Process(pid).kill()
    if not a.rounds: return
    med = {k: statistics.median(v) for k, v in res.items()}
    work = a.reports * a.sleep
    print(f"\n{a.trials} trials x {a.rounds} rounds, {a.reports} reports, {a.sleep} s sleep each ({work:.1f} s of work per trial), "
          f"max_concurrent=1, Ray num_cpus=2, {os.cpu_count()} cores")
    print(f"{'per trial':26}{'median':>9}{'min':>8}{'max':>8}   samples")
    for k in kinds:
        print(f"{k:26}{med[k]:8.2f}s{min(res[k]):7.2f}s{max(res[k]):7.2f}s   {' '.join(f'{x:.2f}' for x in res[k])}")
    for nb, fn in (("notebook", "function reuse"), ("notebook fresh", "function")):
        d = med[nb] - med[fn]
        print(f"{nb + ' - ' + fn:34}{d:+8.2f} s   (target: <= +1.50 s) {'OK' if d <= 1.5 else 'MISSED'}")
    print(f"{'notebook - function':34}{med['notebook'] - med['function']:+8.2f} s   (reused notebook actors vs. the twin without reuse)")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; bench wall time {time.perf_counter() - t_begin:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
