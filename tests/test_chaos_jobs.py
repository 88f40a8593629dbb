"""Jobs under faults, mixed (issue 19, "Jobs and the control service under faults", first bullet): short notebook
jobs submitted through `submit_notebook` on the session's real local Ray (`ray_local`), a few in flight at once,
each with a fault injected for real:

* `exception`: a cell raises;
* `kernel_kill`: the job's kernel (its pid is the run's `ml_prod.kernel_pgid` tag) gets SIGKILL mid-cell;
* `loop`: an infinite loop, stopped by the job's timeout;
* `worker_kill`: the Ray worker running the supervisor (`ml_prod.supervisor_pid`) gets SIGKILL mid-cell, with one
  retry configured (`worker_kill`, retried then FINISHED) or none (`worker_kill_noretry`, FAILED);
* `store_down`: a healthy job while the SQLite tracking store is locked by an exclusive transaction for ~20 s.

Every job's kernel starts a `sleep 300` child (as a job's subprocess would) and writes its own and the child's pid
to a file. The facts checked come from the raw records, never from ml_prod's answers: MLflow's SQLite `runs` and
`tags` tables (status, start and end times, error, attempts), the executed notebook in the run's artifact folder on
disk, psutil (the recorded pids, and processes of this session no longer under this process: orphans).

Every job ends FAILED, KILLED or (with a retry) FINISHED after 2 attempts, within its deadline + 60 s; no run is left
RUNNING; no kernel, kernel child or watchdog is orphaned; every job that did not finish has its executed notebook
stored with an error banner (papermill's for a raised exception, ml_prod's for a kill, a timeout, a lost worker).
The long form, with the same scenarios at 100+ jobs, is `bench/chaos.py`; it prints the figures as one table.
"""
from __future__ import annotations
import json, os, random, signal, sqlite3, threading, time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
import psutil
from nbformat.v4 import new_code_cell, new_notebook

SESSION_MARKER = "ML_PROD_TEST_SESSION"
LOCK_S = 20.0  # how long the store is unavailable: as long as MLflow's SQLite busy timeout
GRACE_S = 60.0  # every job ends within its deadline + this

# ---- the notebook every job runs -----------------------------------------------------------------------------

PARAMS = 'kind: str = "ok"  # the fault\nname: str = "j"  # the job\'s file prefix\nsecs: float = 4.0  # how long a healthy job runs'
BODY = """import json, os, pathlib, subprocess, time
started = pathlib.Path(f'{name}.started')
first = not started.exists()
child = subprocess.Popen(['sleep', '300'])
pathlib.Path(f'{name}.{os.getpid()}.pids').write_text(json.dumps([os.getpid(), child.pid]))
started.touch()"""
FAULT = """if kind == 'exception': raise ValueError(f'injected fault in {name}')
if kind == 'loop':
    while True: pass
if kind == 'kernel_kill' or (kind.startswith('worker_kill') and first):
    pathlib.Path(f'{name}.waiting').touch()
    time.sleep(300)
for i in range(int(secs * 2)): time.sleep(0.5)
child.kill(); child.wait()
print('done', name)"""


def chaos_notebook(path: Path) -> Path:
    nb = new_notebook(cells=[new_code_cell(PARAMS, metadata={"tags": ["parameters"]}), new_code_cell(BODY), new_code_cell(FAULT)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


# ---- the scenarios --------------------------------------------------------------------------------------------

# kind -> (submit arguments, expected final status, attempts, first words of the error)
SCENARIOS = {
    "exception": (dict(timeout=90), "FAILED", 1, "chaos.ipynb: cell 3: ValueError: injected fault"),
    "kernel_kill": (dict(timeout=90), "FAILED", 1, "chaos.ipynb: cell 3: the kernel died"),
    "loop": (dict(timeout=6), "FAILED", 1, "chaos.ipynb: cell 3: timed out after 6 s (job timeout)"),
    "worker_kill": (dict(timeout=90, max_retries=1), "FINISHED", 2, None),
    "worker_kill_noretry": (dict(timeout=90, max_retries=0), "FAILED", 1, "the job's Ray worker was lost"),
    "store_down": (dict(timeout=120, parameters={"secs": 10.0}), "FINISHED", 1, None),
}


def deadline_s(kind: str) -> float:
    "A job's deadline from its submission: its timeout per attempt it may make."
    opts = SCENARIOS[kind][0]
    return opts["timeout"] * (1 + opts.get("max_retries", 0))


def mix(n: int, seed: int = 19) -> list[str]:
    "`n` jobs' kinds, every scenario about equally often, in a shuffled (reproducible) order."
    kinds = [k for _, k in zip(range(n), [k for _ in range(n) for k in SCENARIOS])]
    random.Random(seed).shuffle(kinds)
    return kinds


# ---- raw facts ----------------------------------------------------------------------------------------------

def db_path(s) -> str:
    assert s.tracking_uri.startswith("sqlite:///"), s.tracking_uri
    return s.tracking_uri.removeprefix("sqlite:///")


def raw_tag(s, run_id: str, key: str) -> str | None:
    "A run's tag read from MLflow's SQLite `tags` table; None while unset or while the store is locked."
    try:
        with sqlite3.connect(f"file:{db_path(s)}?mode=ro", uri=True, timeout=0.5) as conn:
            row = conn.execute("SELECT value FROM tags WHERE run_uuid = ? AND key = ?", (run_id, key)).fetchone()
        return row[0] if row else None
    except sqlite3.OperationalError: return None


def raw_runs(s, run_ids: list[str]) -> dict[str, dict]:
    "Status, start/end times (s), artifact folder and the ml_prod tags of `run_ids`, from the SQLite tables themselves."
    out = {}
    with sqlite3.connect(f"file:{db_path(s)}?mode=ro", uri=True, timeout=60) as conn:
        for rid in run_ids:
            status, start, end, art = conn.execute("SELECT status, start_time, end_time, artifact_uri FROM runs WHERE run_uuid = ?", (rid,)).fetchone()
            tags = dict(conn.execute("SELECT key, value FROM tags WHERE run_uuid = ? AND key LIKE 'ml_prod.%'", (rid,)).fetchall())
            out[rid] = dict(status=status, start=start / 1000, end=end / 1000 if end else None, artifacts=art, tags=tags)
    return out


def artifact_dir(uri: str) -> Path:
    return Path(uri.removeprefix("file://"))


def banner(nb_path: Path) -> str | None:
    "Which error banner the stored notebook carries: 'papermill' (an exception's), 'ml_prod' (a kill's, a timeout's), or None."
    nb = nbformat.read(nb_path, as_version=4)
    tags = {t for c in nb.cells for t in c.get("metadata", {}).get("tags", [])}
    if "ml_prod-error" in tags: return "ml_prod"
    if "papermill-error-cell-tag" in tags: return "papermill"
    return None


def alive(pid: int) -> bool:
    try: return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess: return False


def outside_tree(marker: str) -> set[int]:
    "Live processes carrying this session's marker that are not descendants of this process: orphans (a killed parent's)."
    try: mine = {c.pid for c in psutil.Process().children(recursive=True)}
    except psutil.NoSuchProcess: mine = set()
    found = set()
    for p in psutil.process_iter():
        if p.pid == os.getpid() or p.pid in mine: continue
        try:
            if p.environ().get(SESSION_MARKER) == marker and p.status() != psutil.STATUS_ZOMBIE: found.add(p.pid)
        except psutil.Error: pass
    return found


def describe(pid: int) -> str:
    try:
        p = psutil.Process(pid)
        return f"{pid} (parent {p.ppid()}): {' '.join(p.cmdline())[:160]}"
    except psutil.Error: return f"{pid} (gone)"


# ---- the driver: submit, inject, collect ----------------------------------------------------------------------

@dataclass
class Job:
    kind: str
    name: str
    handle: object
    submitted: float
    injected: bool = False
    done_at: float | None = None
    covered: bool = False  # a store_down job that ran through a lock


@dataclass
class Mix:
    jobs: list[Job] = field(default_factory=list)
    locks: list[tuple[float, float]] = field(default_factory=list)
    wall_s: float = 0.0
    orphans: list[str] = field(default_factory=list)
    pid_files: list[Path] = field(default_factory=list)


def _inject(s, d: Path, j: Job):
    "Inject `j`'s fault once it is mid-cell (its marker file exists and the run names the process)."
    if j.injected or j.kind not in ("kernel_kill", "worker_kill", "worker_kill_noretry"): return
    if not (d / f"{j.name}.waiting").exists(): return
    tag = "ml_prod.kernel_pgid" if j.kind == "kernel_kill" else "ml_prod.supervisor_pid"
    if (pid := raw_tag(s, j.handle.run_id, tag)) is None: return
    try: os.kill(int(pid), signal.SIGKILL)
    except ProcessLookupError: pass
    j.injected = True


def _hold_lock(s, seconds: float, held: threading.Event, out: list):
    "An exclusive transaction on the SQLite store for `seconds`, from another connection, as another process would hold it."
    conn = sqlite3.connect(db_path(s), timeout=60, isolation_level=None)
    conn.execute("BEGIN EXCLUSIVE")
    t0 = time.time()
    held.set()
    try: time.sleep(seconds)
    finally:
        conn.execute("ROLLBACK")
        conn.close()
        out.append((t0, time.time()))
        held.clear()


def run_mix(s, d: Path, kinds: list[str], in_flight: int = 4, cpus: float = 0.5, log=print) -> Mix:
    """Submit a job per kind in `kinds` through `submit_notebook`, at most `in_flight` at once, inject each one's fault,
    lock the store while store_down jobs run (one lock covers all those running); wait for all to end."""
    from ml_prod.jobs.submit import submit_notebook
    nb = chaos_notebook(d / "chaos.ipynb")
    m, pending, running = Mix(), list(enumerate(kinds)), []
    held, lock_thread = threading.Event(), None
    t0 = time.time()
    hard_end = t0 + 120 + sum(deadline_s(k) for k in kinds) / max(1, in_flight) * 2
    while (pending or running) and time.time() < hard_end:
        while pending and len(running) < in_flight and not held.is_set():  # submitting needs the store too
            i, kind = pending.pop(0)
            opts = dict(SCENARIOS[kind][0])
            params = {"kind": kind, "name": f"j{i:03d}", **opts.pop("parameters", {})}
            j = Job(kind, params["name"], submit_notebook(nb, params, settings=s, cwd=d, cpus=cpus, **opts), time.time())
            m.jobs.append(j); running.append(j)
        for j in running: _inject(s, d, j)
        # the store goes away while store_down jobs run: once one is mid-notebook, all running ones are covered
        starters = [j for j in running if j.kind == "store_down" and not j.covered and (d / f"{j.name}.started").exists()]
        if starters and not held.is_set() and (lock_thread is None or not lock_thread.is_alive()):
            for j in running:
                if j.kind == "store_down" and (d / f"{j.name}.started").exists(): j.covered = True
            lock_thread = threading.Thread(target=_hold_lock, args=(s, LOCK_S, held, m.locks), daemon=True)
            lock_thread.start(); held.wait(10)
            log(f"  store locked for {LOCK_S:g} s at +{time.time() - t0:.0f} s ({len(running)} jobs in flight)")
        if not held.is_set():  # JobHandle.wait reads the store
            for j in [j for j in running if j.handle.done()]:
                j.handle.wait(timeout=60)
                j.done_at = time.time()
                running.remove(j)
        time.sleep(0.2)
    if lock_thread: lock_thread.join(LOCK_S + 30)
    m.wall_s = time.time() - t0
    m.pid_files = sorted(d.glob("*.pids"))
    return m


def check_orphans(marker: str, pid_files: list[Path], before: set[int], wait_s: float = 30) -> list[str]:
    "Recorded kernel and child pids still alive, and processes of this session that left this process's tree, after `wait_s`."
    recorded = {p for f in pid_files for p in json.loads(f.read_text())}
    end = time.time() + wait_s
    while True:
        left = {p for p in recorded if alive(p)} | (outside_tree(marker) - before)
        if not left or time.time() > end: return [describe(p) for p in sorted(left)]
        time.sleep(0.5)


@dataclass
class Row:
    scenario: str
    jobs: int = 0
    statuses: Counter = field(default_factory=Counter)
    within: int = 0
    left_running: int = 0
    durations: list = field(default_factory=list)
    problems: list = field(default_factory=list)


def judge(s, m: Mix) -> dict[str, Row]:
    "Each scenario's outcomes from the raw records, and every broken expectation as a line in its row's `problems`."
    runs = raw_runs(s, [j.handle.run_id for j in m.jobs])
    rows = {k: Row(k) for k in SCENARIOS}
    for j in m.jobs:
        r, row = runs[j.handle.run_id], rows[j.kind]
        _, want, attempts, error = SCENARIOS[j.kind]
        row.jobs += 1; row.statuses[r["status"]] += 1
        who = f"{j.name} ({j.kind}, run {j.handle.run_id})"
        if r["status"] == "RUNNING" or r["end"] is None:
            row.left_running += 1; row.problems.append(f"{who}: left {r['status']}"); continue
        took = r["end"] - r["start"]
        row.durations.append(took)
        if took <= deadline_s(j.kind) + GRACE_S: row.within += 1
        else: row.problems.append(f"{who}: ended {took:.0f} s after submission, deadline {deadline_s(j.kind):g} s + {GRACE_S:g}")
        if r["status"] != want: row.problems.append(f"{who}: {r['status']} ({r['tags'].get('ml_prod.error')}), expected {want}")
        if r["tags"].get("ml_prod.attempts") != str(attempts):
            row.problems.append(f"{who}: {r['tags'].get('ml_prod.attempts')} attempt(s), expected {attempts}")
        err = r["tags"].get("ml_prod.error")
        if error and not (err or "").startswith(error) and error not in (err or ""):
            row.problems.append(f"{who}: error {err!r}, expected {error!r}")
        if r["status"] != "FINISHED":
            saved = artifact_dir(r["artifacts"]) / "chaos.ipynb"
            if not saved.exists(): row.problems.append(f"{who}: {r['status']} without its executed notebook in {saved.parent}")
            elif banner(saved) is None: row.problems.append(f"{who}: its stored notebook {saved} has no error banner")
        if j.kind == "store_down" and not j.covered: row.problems.append(f"{who}: never ran while the store was locked")
    return rows


def table(rows: dict[str, Row], m: Mix) -> str:
    head = ("scenario", "jobs", "outcomes", "within deadline", "left RUNNING", "orphaned", "seconds (median/max)")
    lines = []
    for r in rows.values():
        ds = sorted(r.durations)
        secs = f"{ds[len(ds) // 2]:.1f} / {ds[-1]:.1f}" if ds else "-"
        lines.append((r.scenario, str(r.jobs), " ".join(f"{k} {v}" for k, v in sorted(r.statuses.items())), f"{r.within}/{r.jobs}",
                      str(r.left_running), "", secs))
    tot = Counter(); [tot.update(r.statuses) for r in rows.values()]
    lines.append(("all", str(len(m.jobs)), " ".join(f"{k} {v}" for k, v in sorted(tot.items())),
                  f"{sum(r.within for r in rows.values())}/{len(m.jobs)}", str(sum(r.left_running for r in rows.values())),
                  str(len(m.orphans)), f"{m.wall_s:.1f} wall"))
    w = [max(len(x[i]) for x in [head, *lines]) for i in range(len(head))]
    fmt = lambda x: " | ".join(c.ljust(w[i]) for i, c in enumerate(x))
    return "\n".join([fmt(head), "-+-".join("-" * n for n in w), *map(fmt, lines)])


# ---- the short form -----------------------------------------------------------------------------------------

N_JOBS = 24  # 4 of each scenario


def test_mixed_faults_over_many_jobs_end_on_time_leaving_nothing_running(ray_local, project_dir):
    from ml_prod.settings import load_settings
    s = load_settings()
    marker = os.environ.get(SESSION_MARKER, "")
    before = outside_tree(marker)
    m = run_mix(s, project_dir, mix(N_JOBS))
    m.orphans = check_orphans(marker, m.pid_files, before)
    rows = judge(s, m)
    print("\n" + table(rows, m))
    print(f"store locks: {[(round(b - a, 1)) for a, b in m.locks]} s; {len(m.pid_files)} kernels recorded their pids")
    problems = [p for r in rows.values() for p in r.problems]
    assert len(m.jobs) == N_JOBS, f"only {len(m.jobs)} of {N_JOBS} jobs were submitted before the driver's limit"
    assert m.locks, "the store was never locked"
    assert not m.orphans, "processes outlived their job:\n" + "\n".join(m.orphans)
    assert not problems, f"{len(problems)} broken expectation(s):\n" + "\n".join(problems)
