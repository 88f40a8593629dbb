#!/usr/bin/env python
"""Benchmark: `ml_prod run` from a terminal vs. the papermill CLI, and `ml_prod jobs list` / `jobs show`.

    .venv/bin/python bench/cli.py [--reps N] [--warm-driver]

In a temporary project (`settings.ini` with just `[DEFAULT]`, SQLite MLflow) it starts a persistent local Ray and
the control service, as `ml_prod cluster up` does (on a free GCS port, so another project's cluster on 6379 is left
alone), runs one untimed warm-up of each command, then N interleaved repetitions of:

1. `papermill IN OUT -k python3`
2. `ml_prod run IN`
3. `ml_prod jobs list`
4. `ml_prod jobs show RUN` (RUN: the job of step 2)

and, with `--warm-driver`, the same notebook run by `ml_prod.jobs.run_notebook` in one process connected to the cluster
once (a worker and its spare kernel already up; off by default since its idle worker is one process more on the node,
and Ray kills idle workers beyond num_cpus: the thin run's worker among them),
each command a new process on a pseudo-terminal (what a user's shell gives it: rich draws its tables for a terminal),
the wall time measured from here. IN is papermill's own test notebook `simple_execute.ipynb` (a parameters cell
`msg = None` and `print(msg)`), or an equivalent written here if papermill's tests are not installed.

With the control service up, `ml_prod run` is its thin client (the service's driver submits the job and the command
follows its output over the service's API). Then the control service is stopped (`ml_prod control stop`) and
papermill, `ml_prod run`, `jobs list` and `jobs show` are timed again, N interleaved times: the path without the
service (the CLI is its job's Ray driver; `jobs list` / `show` straight to MLflow), with papermill beside it. Last, where the CLI's time goes: Python's start,
`python -X importtime` of each command (the cumulative import time of ml_prod's CLI, typer, rich, pydantic, MLflow,
Ray, papermill) and, for `ml_prod run`, the job's own duration (from its summary) against the wall time.

Every ratio is printed with the machine's load average and the baseline's absolute time beside it; the last line is
`ml_prod run / papermill CLI = N.NNx`. The cluster is stopped at the end, and no kernel it started is left.
Run it with no other Ray on the machine.
"""
from __future__ import annotations
import argparse, json, os, pty, re, select, shutil, socket, statistics, subprocess, sys, tempfile, time
from pathlib import Path

BIN = Path(sys.executable).parent
ML_PROD, PAPERMILL = str(BIN/"ml_prod"), str(BIN/"papermill")
PM_NOTEBOOK = Path(sys.prefix)/"lib"/f"python{sys.version_info.major}.{sys.version_info.minor}"/"site-packages"/"papermill"/"tests"/"notebooks"/"simple_execute.ipynb"
RUN_ID = re.compile(r"\(run ([0-9a-f]{32})\)")
JOB_S = re.compile(r": FINISHED in ([0-9.]+) s")
SUPERVISOR = re.compile(r"\(job:\S+ pid=(\d+)\)")
SETTLE_S = 3.0  # pause after the connected driver's job, while its worker boots a spare kernel

# ---------------------------------------------------------------------------------------------- helpers

def make_notebook(path:Path) -> str:
    "papermill's own simple_execute.ipynb, or an equivalent (parameters cell, a print); where it came from."
    if PM_NOTEBOOK.is_file(): shutil.copy(PM_NOTEBOOK, path); return str(PM_NOTEBOOK)
    import nbformat
    p = nbformat.v4.new_code_cell("msg = None"); p.metadata["tags"] = ["parameters"]
    nb = nbformat.v4.new_notebook(cells=[p, nbformat.v4.new_code_cell("print(msg)")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(path))
    return "written here (papermill's test notebook is not installed)"

def terminal_env() -> dict:
    "A user's shell: this environment without the test session's ML_PROD_*/MLFLOW_*/RAY_ADDRESS, a terminal, the venv on PATH."
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ML_PROD_", "MLFLOW_", "RAY_ADDRESS", "PYTEST"))}
    return {**env, "TERM": env.get("TERM", "xterm-256color"), "COLUMNS": "160", "LINES": "50", "PATH": f"{BIN}:{env.get('PATH', '')}"}

def on_tty(cmd:list[str], cwd:Path, env:dict, timeout:float=600) -> tuple[float, int, str]:
    "Run `cmd` with stdin, stdout and stderr on a new pseudo-terminal; (wall seconds, exit code, what it printed)."
    master, slave = pty.openpty()
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    out, deadline = bytearray(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        r, _, _ = select.select([master], [], [], 0.05)
        if r:
            try: chunk = os.read(master, 65536)
            except OSError: chunk = b""  # the child closed the terminal
            if chunk: out += chunk; continue
        if p.poll() is not None and not r: break
        if r and not chunk: break
    rc = p.wait(timeout=max(1, deadline - time.monotonic()))
    wall = time.perf_counter() - t0
    os.close(master)
    return wall, rc, out.decode(errors="replace").replace("\r\n", "\n")

def plain(cmd:list[str], cwd:Path, env:dict, timeout:float=600) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0: raise RuntimeError(f"`{' '.join(cmd)}` exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return r

def free_port(lo:int=26000, hi:int=32000) -> int:
    "A port free now, below the ephemeral range (one from bind(0) may be taken by Ray's own outgoing connections meanwhile)."
    import random
    for p in random.sample(range(lo, hi), 200):
        with socket.socket() as s:
            try: s.bind(("127.0.0.1", p)); return p
            except OSError: continue
    raise RuntimeError(f"no free port in {lo}-{hi}")

def load() -> str: return "/".join(f"{x:.2f}" for x in os.getloadavg())

def med(xs): return statistics.median(xs) if xs else float("nan")

def own_kernels(root:Path) -> list[int]:
    "ipykernel processes of this benchmark's project (the tracking URI in their environment names it)."
    import psutil
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any("ipykernel_launcher" in a for a in (p.info["cmdline"] or [])) and str(root) in json.dumps(p.environ()): found.append(p.pid)
        except Exception: pass
    return found

# ---------------------------------------------------------------------------------------------- where the time goes

CLI_MAIN = "import sys; sys.argv[0] = 'ml_prod'; from ml_prod.cli.main import main; main()"  # what the console script runs
WATCH = ("ml_prod.cli.main", "typer", "rich.console", "pydantic", "yaml", "ml_prod.control.service", "mlflow", "ray", "papermill",
         "ml_prod.jobs.submit", "ml_prod.tracking.store")

def import_times(args:list[str], cwd:Path, env:dict) -> tuple[float, dict[str, float]]:
    "`python -X importtime` of the CLI running `args`: (wall s, cumulative import seconds of each WATCH module imported)."
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-X", "importtime", "-c", CLI_MAIN, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    cum, total = {}, 0.0
    for line in r.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( +)(\S+)", line)
        if not m: continue
        name, us = m.group(4), int(m.group(2))
        cum.setdefault(name, us / 1e6)
        if len(m.group(3)) == 1: total += us / 1e6  # a top-level import: its cumulative time holds its children's
    return wall, {"all imports": total, **{k: cum[k] for k in WATCH if k in cum}}

def startup(cwd:Path, env:dict, reps:int) -> dict[str, float]:
    "Median wall of a bare Python, and of one importing the CLI (what every `ml_prod` call pays before its command runs)."
    out = {}
    for label, code in (("python -c pass", "pass"), ("python -c 'import ml_prod.cli.main'", "import ml_prod.cli.main")):
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter(); plain([sys.executable, "-c", code], cwd, env); ts.append(time.perf_counter() - t0)
        out[label] = med(ts)
    return out

# ---------------------------------------------------------------------------------------------- the run

def cluster_up(root:Path, env:dict) -> dict:
    "What `ml_prod cluster up` does (persistent local Ray, then the control service), on a free GCS port."
    code = ("import json; from ml_prod.settings import load_settings; from ml_prod.runtime.cluster import cluster_up; "
            "from ml_prod.control import service; s = load_settings(); info = cluster_up(s, port=%d); st = service.start(s); "
            "print(json.dumps(dict(address=info['address'], url=st['url'])))" % free_port())
    return json.loads(plain([sys.executable, "-c", code], root, env).stdout.strip().splitlines()[-1])

WARM_DRIVER = """
import json, sys, time
from ml_prod.jobs.submit import run_notebook
from ml_prod.runtime.cluster import connect
from ml_prod.settings import load_settings
s = load_settings(); connect(s)
print("BENCH ready", flush=True)
for line in sys.stdin:
    t0 = time.perf_counter(); r = run_notebook(sys.argv[1], check=False, settings=s)
    print("BENCH " + json.dumps(dict(wall=time.perf_counter() - t0, job=r.duration_s, status=r.status)), flush=True)
"""

class WarmDriver:
    "One process connected to the cluster once, running the notebook as a job on request: what a control service's driver would do."
    def __init__(self, nb:Path, root:Path, env:dict):
        self.p = subprocess.Popen([sys.executable, "-c", WARM_DRIVER, str(nb)], cwd=root, env=env, text=True,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self._line()
    def _line(self) -> str:
        for line in self.p.stdout:
            if line.startswith("BENCH "): return line[6:]
        raise RuntimeError(f"the warm driver ended (exit code {self.p.wait()})")
    def run(self) -> dict:
        self.p.stdin.write("go\n"); self.p.stdin.flush()
        d = json.loads(self._line())
        if d["status"] != "FINISHED": raise RuntimeError(f"the warm driver's job ended {d['status']}")
        return d
    def close(self):
        self.p.stdin.close()
        try: self.p.wait(timeout=60)
        except subprocess.TimeoutExpired: self.p.kill(); self.p.wait()

def timed(label:str, cmd:list[str], root:Path, env:dict, rows:dict, loads:dict) -> str:
    loads.setdefault(label, []).append(os.getloadavg()[0])
    wall, rc, out = on_tty(cmd, root, env)
    if rc != 0: raise RuntimeError(f"`{' '.join(cmd)}` exited {rc}:\n{out[-3000:]}")
    rows.setdefault(label, []).append(wall)
    return out

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5, help="interleaved repetitions of each command")
    ap.add_argument("--warm-driver", action="store_true", help="also time run_notebook from a driver connected once (its idle "
                    "worker is one more process on the node: Ray kills idle workers beyond num_cpus, the thin run's among them)")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ml_prod_bench_cli_"))
    root = tmp/"project"; root.mkdir()
    (root/"settings.ini").write_text("[DEFAULT]\n")
    nb = root/"simple_execute.ipynb"
    source = make_notebook(nb)
    env = terminal_env()
    rows, loads, job_s, warm_job_s, notes = {}, {}, [], [], []
    rows0, loads0, job0_s = {}, {}, []  # papermill again beside the runs without the service
    pids = []  # the worker (supervisor pid) of each timed `ml_prod run` through the service
    L_PM, L_RUN, L_LIST, L_SHOW = "papermill IN OUT -k python3", "ml_prod run IN", "ml_prod jobs list", "ml_prod jobs show RUN"
    L_WARM = "run_notebook from a connected driver (in-process)"
    L_LIST0, L_SHOW0 = "ml_prod jobs list (no control service)", "ml_prod jobs show RUN (no control service)"
    L_RUN0 = "ml_prod run IN (no control service)"
    where = plain([sys.executable, "-c", "import ml_prod; print(ml_prod.__file__)"], root, env).stdout.strip()
    print(f"notebook: {source}\nproject: {root}\nml_prod: {where}\nload average before: {load()}   cores: {os.cpu_count()}", flush=True)
    try:
        t0 = time.perf_counter(); info = cluster_up(root, env)
        print(f"cluster up (Ray at {info['address']}, control service at {info['url']}): {time.perf_counter() - t0:.1f} s", flush=True)
        run_cmd = [ML_PROD, "run", str(nb)]
        out = on_tty(run_cmd, root, env)[2]  # warm-up, untimed: the first job on a new cluster starts its first worker
        run_id = RUN_ID.search(out).group(1)
        for cmd in ([PAPERMILL, str(nb), str(root/"out.ipynb"), "-k", "python3"], [ML_PROD, "jobs", "list"], [ML_PROD, "jobs", "show", run_id]):
            on_tty(cmd, root, env)
        warm = None
        if a.warm_driver:
            try: warm = WarmDriver(nb, root, env); warm.run(); time.sleep(SETTLE_S)  # its first job, untimed, starts its worker
            except Exception as e: warm = None; notes.append(f"the connected driver's row is missing: {e}")
        for i in range(a.reps):
            timed(L_PM, [PAPERMILL, str(nb), str(root/f"out-{i}.ipynb"), "-k", "python3"], root, env, rows, loads)
            out = timed(L_RUN, run_cmd, root, env, rows, loads)
            run_id = RUN_ID.search(out).group(1)
            job_s.append(float(JOB_S.search(out).group(1)))
            pids.append(",".join(sorted(set(SUPERVISOR.findall(out)))) or "-")  # Ray's prefix of its output lines: the supervisor's worker
            timed(L_LIST, [ML_PROD, "jobs", "list"], root, env, rows, loads)
            timed(L_SHOW, [ML_PROD, "jobs", "show", run_id], root, env, rows, loads)
            if warm:
                try:
                    load1 = os.getloadavg()[0]; d = warm.run()
                    loads.setdefault(L_WARM, []).append(load1); rows.setdefault(L_WARM, []).append(d["wall"]); warm_job_s.append(d["job"])
                except Exception as e: notes.append(f"the connected driver failed: {e}"); warm = None
                time.sleep(SETTLE_S)  # its worker boots the next job's kernel now: not while the next papermill runs
            print(f"rep {i + 1}: " + ", ".join(f"{k.split(' IN')[0].split(' RUN')[0]} {v[-1]:.2f} s" for k, v in rows.items()) + f"   load {load()}", flush=True)
        if warm: warm.close()
        imports = {f"{L_RUN}": import_times(["run", str(nb)], root, env), f"{L_LIST}": import_times(["jobs", "list"], root, env),
                   f"{L_SHOW}": import_times(["jobs", "show", run_id], root, env)}
        plain([ML_PROD, "control", "stop"], root, env)
        for i in range(a.reps):
            timed(L_PM, [PAPERMILL, str(nb), str(root/f"out0-{i}.ipynb"), "-k", "python3"], root, env, rows0, loads0)
            out = timed(L_RUN0, run_cmd, root, env, rows, loads)  # the CLI is the job's driver, as before the thin client
            job0_s.append(float(JOB_S.search(out).group(1)))
            timed(L_LIST0, [ML_PROD, "jobs", "list"], root, env, rows, loads)
            timed(L_SHOW0, [ML_PROD, "jobs", "show", run_id], root, env, rows, loads)
            print(f"rep {i + 1} without the service: papermill {rows0[L_PM][-1]:.2f} s, ml_prod run {rows[L_RUN0][-1]:.2f} s   load {load()}", flush=True)
        imports[L_RUN0] = import_times(["run", str(nb)], root, env)
        imports[L_LIST0] = import_times(["jobs", "list"], root, env)
        imports[L_SHOW0] = import_times(["jobs", "show", run_id], root, env)
        starts = startup(root, env, a.reps)
    finally:
        subprocess.run([ML_PROD, "cluster", "down"], cwd=root, env=env, capture_output=True, timeout=300)
        left = own_kernels(root)
        if left: notes.append(f"kernels left running: {left}")
        shutil.rmtree(tmp, ignore_errors=True)
    notes.append(f"the workers of the {len(pids)} timed ml_prod run jobs (supervisor pids): {' '.join(pids)}: {len(set(pids))} distinct")
    report(a.reps, rows, loads, job_s, warm_job_s, imports, starts, notes, rows0, loads0, job0_s)

def report(reps, rows, loads, job_s, warm_job_s, imports, starts, notes, rows0, loads0, job0_s):
    pm = med(rows["papermill IN OUT -k python3"])
    print(f"\n## wall time from a terminal, median of {reps} interleaved repetitions (seconds)\n")
    print(f"| {'command':44} | median | min | max | load average (1 min) at its runs |")
    print(f"|{'-' * 46}|---:|---:|---:|---|")
    for k, v in rows.items():
        print(f"| {k:44} | {med(v):.2f} | {min(v):.2f} | {max(v):.2f} | {med(loads[k]):.2f} (median), {min(loads[k]):.2f}-{max(loads[k]):.2f} |")
    for k, v in rows0.items():
        print(f"| {k + ' (beside those)':44} | {med(v):.2f} | {min(v):.2f} | {max(v):.2f} | {med(loads0[k]):.2f} (median), {min(loads0[k]):.2f}-{max(loads0[k]):.2f} |")
    run = med(rows["ml_prod run IN"])
    print(f"\nml_prod run: the job itself reports {med(job_s):.2f} s (median); {run - med(job_s):.2f} s of the wall time is before it starts and after it ends")
    warm = med(rows.get("run_notebook from a connected driver (in-process)", []))
    if warm == warm: print(f"run_notebook from a driver connected once (what the control service would run for a thin `ml_prod run`): {warm:.2f} s, "
          f"the job itself {med(warm_job_s):.2f} s (median)")
    print("\n## where the CLI's time goes: `python -X importtime` of each command (cumulative seconds; one run each, imports cost more under -X importtime)\n")
    for label, code_s in starts.items(): print(f"{label}: {code_s:.3f} s wall (median of {reps})")
    for k, (wall, cum) in imports.items():
        print(f"{k}: {wall:.2f} s wall; " + ", ".join(f"{m} {s:.3f}" for m, s in cum.items())
              + f"; imports ray: {'yes' if 'ray' in cum else 'no'}, mlflow: {'yes' if 'mlflow' in cum else 'no'}")
    for n in notes: print(f"note: {n}")
    now = load()
    print(f"\nload average now: {now}")
    for k in rows:
        if k.startswith("ml_prod jobs"):
            print(f"{k} / papermill CLI = {med(rows[k]) / pm:.2f}x   ({k} {med(rows[k]):.2f} s, target under 1 s; papermill CLI {pm:.2f} s; load average {now})")
    if warm == warm:
        print(f"run_notebook from a connected driver / papermill CLI = {warm / pm:.2f}x   (what a thin ml_prod run would wait for: {warm:.2f} s; "
              f"papermill CLI {pm:.2f} s; load average {now})")
    if rows0:
        run0, pm0 = med(rows["ml_prod run IN (no control service)"]), med(rows0["papermill IN OUT -k python3"])
        print(f"ml_prod run without the control service (the CLI its job's driver, as before) / papermill CLI beside it = {run0 / pm0:.2f}x   "
              f"(ml_prod run {run0:.2f} s, the job itself {med(job0_s):.2f} s; papermill CLI {pm0:.2f} s)")
    print(f"ml_prod run / papermill CLI = {run / pm:.2f}x   (ml_prod run {run:.2f} s, papermill CLI {pm:.2f} s; load average {now})")

if __name__ == "__main__": main()
