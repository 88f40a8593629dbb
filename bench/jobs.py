#!/usr/bin/env python
"""Benchmark: a trivial notebook run by plain papermill vs. as an ml_prod job on a warm local Ray.

    .venv/bin/python bench/jobs.py [--reps N]

Measured in one run, on the same two-cell notebook (`x: int = 1` tagged `parameters`; `y = x + 1`):

1. papermill in-process (`papermill.execute_notebook`, kernel `python3`): sequential, then 2-way concurrent
   (a 2-thread pool over 2*N notebooks);
2. `ml_prod.jobs.run_notebook`-equivalent (`submit_notebook` + `JobHandle.wait`) on a warm Ray
   (`ray.init(num_cpus=2)`, warm-up jobs first, untimed): sequential, then 2-way concurrent
   (2*N jobs, two handles in flight at a time, `cpus=1` each).

Sequential reps are interleaved (papermill, ml_prod, papermill, ...) so drift hits both alike.
Afterwards one extra papermill run and one extra ml_prod job are profiled (functions wrapped with timers,
in the driver and, for the job, inside the Ray worker) to show where ml_prod's time goes. The profiled
runs are not part of the table.

Nothing in ml_prod is changed: the profile wraps functions at run time and puts them back afterwards.
"""
from __future__ import annotations
import argparse, contextlib, functools, inspect, os, statistics, sys, tempfile, threading, time, warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

warnings.filterwarnings("ignore")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

# ---------------------------------------------------------------------------------------------- helpers

def make_notebook(path:Path):
    import nbformat
    nb = nbformat.v4.new_notebook()
    p = nbformat.v4.new_code_cell("x: int = 1")
    p.metadata["tags"] = ["parameters"]
    nb.cells = [p, nbformat.v4.new_code_cell("y = x + 1")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nbformat.write(nb, str(path))

def pctl(xs, q):
    "Percentile `q` (0-100) of `xs` with linear interpolation (numpy's default)."
    xs = sorted(xs)
    if len(xs) == 1: return xs[0]
    k = (len(xs) - 1) * q / 100
    lo = int(k); hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)

def own_kernels(tmp:Path) -> dict[int, str]:
    "ipykernel processes this benchmark started: descendants of this process, or kernels of our temp project."
    import psutil
    me, out = os.getpid(), {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if not any("ipykernel_launcher" in a for a in (p.info["cmdline"] or [])): continue
            mine = any(a.pid == me for a in p.parents())
            if not mine:
                with contextlib.suppress(Exception): mine = str(tmp) in p.environ().get("MLFLOW_TRACKING_URI", "")
            if mine: out[p.info["pid"]] = " ".join(p.info["cmdline"])
        except Exception: pass
    return out

# ---------------------------------------------------------------------------------------------- profiling

class Timeline:
    "Records (label, thread depth, start, end) of wrapped calls; `patch` wraps attributes and undoes on exit."
    def __init__(self): self.events, self.local, self._undo = [], threading.local(), []

    def _wrap(self, label, f):
        tl = self
        if inspect.iscoroutinefunction(f):
            @functools.wraps(f)
            async def w(*a, **kw):
                d = getattr(tl.local, "depth", 0); tl.local.depth = d + 1; t0 = time.time()
                try: return await f(*a, **kw)
                finally: tl.local.depth = d; tl.events.append((label, d, t0, time.time()))
        else:
            @functools.wraps(f)
            def w(*a, **kw):
                d = getattr(tl.local, "depth", 0); tl.local.depth = d + 1; t0 = time.time()
                try: return f(*a, **kw)
                finally: tl.local.depth = d; tl.events.append((label, d, t0, time.time()))
        return w

    def patch(self, obj, name, label=None):
        own = not isinstance(obj, type) or name in obj.__dict__
        orig = obj.__dict__[name] if isinstance(obj, type) and own else getattr(obj, name)
        setattr(obj, name, self._wrap(label or name, orig))
        self._undo.append((obj, name, orig if own else None))

    def mark(self, label, t0, t1=None, depth=0): self.events.append((label, depth, t0, t1 if t1 is not None else t0))

    def undo(self):
        for obj, name, orig in reversed(self._undo):
            if orig is None: delattr(obj, name)   # it was inherited
            else: setattr(obj, name, orig)
        self._undo.clear()

def _patch_kernel_and_papermill(tl:Timeline):
    "Wrap the kernel start/stop and papermill/nbclient phases (shared by both profiles)."
    import papermill.execute as pe, nbclient.client as nc
    from jupyter_client.manager import AsyncKernelManager
    tl.patch(AsyncKernelManager, "start_kernel", "km.start_kernel (spawn ipykernel)")
    tl.patch(AsyncKernelManager, "shutdown_kernel", "km.shutdown_kernel")
    import papermill, papermill.engines as pen
    # papermill calls nbclient's sync aliases (made with run_sync at class creation), so wrap those
    tl.patch(nc.NotebookClient, "start_new_kernel_client", "nbclient: connect + wait_for_ready (kernel boot)")
    tl.patch(nc.NotebookClient, "execute_cell", "nbclient: execute cell")
    tl.patch(papermill, "execute_notebook", "papermill.execute_notebook")
    tl.patch(pe, "write_ipynb", "papermill: write output .ipynb (final)")
    tl.patch(pen, "write_ipynb", "papermill: save .ipynb (per cell)")

def _profiled_supervise(spec):
    "Runs in the Ray worker in place of `supervise`: the same call, with its phases timed."
    t_start = time.time()
    import ml_prod.jobs.supervisor as J, ml_prod.tracking.store as T, ml_prod.params as P
    from mlflow.tracking import MlflowClient
    tl = Timeline()
    tl.mark("worker: task starts", t_start)
    try:
        tl.patch(T, "client", "tracking.client (MlflowClient())")
        tl.patch(T, "beat", "tracking.beat (log_metric heartbeat)")
        tl.patch(J, "_start_attempt", "_start_attempt")
        tl.patch(P, "notebook_schema", "params.notebook_schema")
        tl.patch(P, "inject_parameters", "params.inject_parameters")
        tl.patch(J.Kernel, "__enter__", "Kernel.__enter__ (start kernel)")
        tl.patch(J.Kernel, "__exit__", "Kernel.__exit__ (shutdown + kill)")
        tl.patch(J, "_watch", "_watch (heartbeat loop, joins papermill thread)")
        tl.patch(J, "_execute", "_execute (papermill thread)")
        tl.patch(J, "_finish", "_finish")
        for m in ("get_run", "set_tag", "log_batch", "log_metric", "log_artifact", "set_terminated"):
            tl.patch(MlflowClient, m, f"MlflowClient.{m}")
        _patch_kernel_and_papermill(tl)
        t0 = time.time()
        out = J.supervise(spec)
        tl.mark("supervise (total)", t0, time.time(), -1)
    finally:
        tl.undo()
    tl.mark("worker: task returns", time.time())
    return dict(out, events=tl.events)

class _Shim:
    "Stands in for `_remote_supervise()`: sends `_profiled_supervise` instead, timing `.remote()`."
    def __init__(self, tl, rf): self.tl, self.rf = tl, rf
    def options(self, **opts): return _Shim(self.tl, self.rf.options(**opts))
    def remote(self, spec):
        t0 = time.time(); ref = self.rf.remote(spec); self.tl.mark("driver: ray .remote() (submit task)", t0, time.time(), 1)
        return ref

def print_timeline(title, events, t0):
    print(f"\n{title}  (offsets from t0, seconds; nested calls indented)")
    print(f"  {'start':>7} {'dur':>7}  what")
    for label, depth, a, b in sorted(events, key=lambda e: (e[2], e[1])):
        print(f"  {a - t0:7.3f} {b - a:7.3f}  {'  ' * max(depth, 0)}{label}")

# ---------------------------------------------------------------------------------------------- runs

def papermill_one(nb:Path, out_dir:Path, i:int) -> float:
    import papermill as pm
    t0 = time.perf_counter()
    pm.execute_notebook(str(nb), str(out_dir/f"pm_{i}.ipynb"), kernel_name="python3", parameters={"x": i}, progress_bar=False)
    return time.perf_counter() - t0

def ml_prod_one(nb:Path, s, cwd:Path, i:int) -> dict:
    import ray
    from ml_prod.jobs.submit import submit_notebook
    t0 = time.perf_counter()
    h = submit_notebook(nb, {"x": i}, settings=s, cwd=cwd, cpus=1)
    t1 = time.perf_counter()
    ray.get(h.ref)
    t2 = time.perf_counter()
    r = h.wait()
    t3 = time.perf_counter()
    if not r.ok: raise RuntimeError(f"ml_prod job did not finish: {r.summary()}")
    return dict(total=t3 - t0, submit=t1 - t0, ray_get=t2 - t1, result=t3 - t2, mlflow_duration=r.duration_s)

def ml_prod_concurrent(nb:Path, s, cwd:Path, n:int, width:int=2) -> float:
    "Run `n` jobs keeping `width` submitted handles in flight; returns the wall time."
    import ray
    from ml_prod.jobs.submit import submit_notebook
    t0 = time.perf_counter()
    todo, inflight, results = list(range(n)), [], []
    while todo or inflight:
        while todo and len(inflight) < width:
            inflight.append(submit_notebook(nb, {"x": todo.pop(0)}, settings=s, cwd=cwd, cpus=1))
        done, _ = ray.wait([h.ref for h in inflight], num_returns=1)
        for h in [h for h in inflight if h.ref in done]:
            inflight.remove(h); results.append(h.wait())
    wall = time.perf_counter() - t0
    bad = [r for r in results if not r.ok]
    if bad: raise RuntimeError(f"{len(bad)} ml_prod jobs did not finish: {bad[0].summary()}")
    return wall

# ---------------------------------------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5, help="sequential reps per runner; concurrent runs 2*reps notebooks")
    ap.add_argument("--no-profile", action="store_true", help="skip the per-phase profile of one job")
    args = ap.parse_args()
    reps = max(args.reps, 1)

    import ray
    import ml_prod.jobs.submit as J  # submit_notebook, _load_notebook, _remote_supervise and job_result are looked up here
    from ml_prod.settings import load_settings

    tmp_ctx = tempfile.TemporaryDirectory(prefix="ml_prod-bench-")
    tmp = Path(tmp_ctx.name)
    (tmp/"settings.ini").write_text("[DEFAULT]\n")
    nb = tmp/"bench.ipynb"; make_notebook(nb)
    out_dir = tmp/"pm_out"; out_dir.mkdir()
    s = load_settings(path=tmp/"settings.ini", env={})
    t_begin, load0 = time.perf_counter(), os.getloadavg()[0]

    try:
        print(f"ray.init(num_cpus=2) ... (tmp project {tmp})", flush=True)
        t = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        print(f"  ray up in {time.perf_counter() - t:.1f} s", flush=True)

        # ---- warm-up (untimed): papermill imports + a kernel; ml_prod: MLflow DB creation, both Ray workers
        t = time.perf_counter()
        papermill_one(nb, out_dir, -1)
        ml_prod_one(nb, s, tmp, -1)                          # creates the MLflow DB/experiment, starts a worker
        ml_prod_concurrent(nb, s, tmp, 2)                    # makes sure both Ray workers are up and warm
        with ThreadPoolExecutor(2) as ex: list(ex.map(lambda i: papermill_one(nb, out_dir, -10 - i), range(2)))
        print(f"  warm-up done in {time.perf_counter() - t:.1f} s", flush=True)

        # ---- sequential, interleaved
        pm_seq, ml_seq = [], []
        for i in range(reps):
            pm_seq.append(papermill_one(nb, out_dir, i))
            ml_seq.append(ml_prod_one(nb, s, tmp, i))
            print(f"  seq {i + 1}/{reps}: papermill {pm_seq[-1]:.3f} s, ml_prod {ml_seq[-1]['total']:.3f} s "
                  f"(submit {ml_seq[-1]['submit']:.3f} + ray.get {ml_seq[-1]['ray_get']:.3f} + result {ml_seq[-1]['result']:.3f})",
                  flush=True)

        # ---- 2-way concurrent
        n = 2 * reps
        t = time.perf_counter()
        with ThreadPoolExecutor(2) as ex: list(ex.map(lambda i: papermill_one(nb, out_dir, 100 + i), range(n)))
        pm_conc = time.perf_counter() - t
        print(f"  papermill 2-way: {n} notebooks in {pm_conc:.2f} s", flush=True)
        ml_conc = ml_prod_concurrent(nb, s, tmp, n)
        print(f"  ml_prod   2-way: {n} jobs in {ml_conc:.2f} s", flush=True)

        # ---- profile one papermill run and one ml_prod job (not part of the table)
        if not args.no_profile:
            tl = Timeline(); _patch_kernel_and_papermill(tl)
            t0 = time.time()
            try: papermill_one(nb, out_dir, 999)
            finally: tl.undo()
            tl.mark("papermill (total)", t0, time.time(), -1)
            print_timeline("PROFILE papermill in-process", tl.events, t0)

            import ml_prod.params as P, ml_prod.tracking.store as T, ml_prod.runtime.cluster as C  # store holds the provenance functions it calls
            from mlflow.tracking import MlflowClient
            tl = Timeline()
            for mod, name in ((J, "_load_notebook"), (P, "notebook_schema"), (P.ParamSchema, "validate"),
                              (T, "ensure_experiment"), (T, "create_job_run"), (T, "git_state"), (T, "package_versions"),
                              (T, "input_fingerprints"), (T, "_log_provenance"), (T, "environment_freeze"),
                              (C, "connect"), (J, "job_result")):
                tl.patch(mod, name, f"{getattr(mod, '__name__', mod)}.{name}")
            for m in ("get_experiment_by_name", "create_run", "log_batch", "log_artifacts", "get_run"):
                tl.patch(MlflowClient, m, f"MlflowClient.{m}")
            shim = _Shim(tl, ray.remote(_profiled_supervise))
            tl.patch(J, "_remote_supervise", "_remote_supervise"); J._remote_supervise = lambda: shim
            try:
                t0 = time.time()
                h = J.submit_notebook(nb, {"x": 7}, settings=s, cwd=tmp, cpus=1)
                t1 = time.time(); tl.mark("driver: submit_notebook (total)", t0, t1, 0)
                worker = ray.get(h.ref)
                t2 = time.time(); tl.mark("driver: ray.get returns", t2)
                r = h.wait()
                t3 = time.time(); tl.mark("driver: h.wait() -> JobResult (total)", t2, t3, 0)
            finally: tl.undo()
            print_timeline(f"PROFILE ml_prod job ({r.status}, MLflow duration {r.duration_s:.3f} s); driver + Ray worker",
                           tl.events + worker["events"], t0)
            ev = {e[0]: e for e in worker["events"]}
            print(f"  -> driver submit {t1 - t0:.3f} s | submit->worker start {ev['worker: task starts'][2] - t1:.3f} s | "
                  f"worker {ev['worker: task returns'][2] - ev['worker: task starts'][2]:.3f} s | "
                  f"worker return->ray.get {t2 - ev['worker: task returns'][2]:.3f} s | job_result {t3 - t2:.3f} s | "
                  f"total {t3 - t0:.3f} s")

        # ---- report
        pm_med, pm_p90 = statistics.median(pm_seq), pctl(pm_seq, 90)
        tot = [m["total"] for m in ml_seq]
        ml_med, ml_p90 = statistics.median(tot), pctl(tot, 90)
        pm_tp, ml_tp = n / pm_conc, n / ml_conc
        med = lambda k: statistics.median(m[k] for m in ml_seq)
        print(f"\nml_prod sequential breakdown (median of {reps}): submit_notebook {med('submit'):.3f} s | "
              f"ray.get {med('ray_get'):.3f} s | h.wait()/job_result {med('result'):.3f} s | "
              f"MLflow run start->end {med('mlflow_duration'):.3f} s")
        print(f"papermill sequential samples: {' '.join(f'{x:.3f}' for x in pm_seq)}")
        print(f"ml_prod   sequential samples: {' '.join(f'{x:.3f}' for x in tot)}")
        print()
        print(f"{'':28}{'papermill':>10}{'ml_prod':>10}{'ratio':>9}")
        print(f"{'sequential median (s)':28}{pm_med:10.3f}{ml_med:10.3f}{ml_med / pm_med:8.2f}x")
        print(f"{'sequential p90 (s)':28}{pm_p90:10.3f}{ml_p90:10.3f}{ml_p90 / pm_p90:8.2f}x")
        print(f"{'2-way concurrent (s/nb)':28}{pm_conc / n:10.3f}{ml_conc / n:10.3f}{ml_conc / pm_conc:8.2f}x")
        print(f"{'2-way concurrent (nb/s)':28}{pm_tp:10.3f}{ml_tp:10.3f}{pm_tp / ml_tp:8.2f}x")
        print(f"load average (1 min) at start {load0:.2f}, at end {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores "
              "(other processes on the machine skew both columns)")
        print(f"ratio = ml_prod time / papermill time (nb/s row: papermill rate / ml_prod rate); target <= 1.20x. "
              f"reps={reps}, concurrent n={n}, Ray num_cpus=2, {os.cpu_count()} cores.")
    finally:
        left = own_kernels(tmp)                     # before shutdown, while Ray workers are still our descendants
        with contextlib.suppress(Exception): ray.shutdown()
        time.sleep(0.5)
        left.update(own_kernels(tmp))
        import psutil
        left = {pid: c for pid, c in left.items() if psutil.pid_exists(pid)}
        if left:
            print(f"WARNING: {len(left)} kernel(s) this benchmark started are still alive; killing them: {left}")
            for pid in left:
                with contextlib.suppress(Exception): psutil.Process(pid).kill()
        else: print("no kernels left behind; Ray shut down.")
        tmp_ctx.cleanup()
        print(f"bench wall time {time.perf_counter() - t_begin:.1f} s")

if __name__ == "__main__":
    main()
