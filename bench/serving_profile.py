#!/usr/bin/env python
"""Where a served request's CPU goes: py-spy and /proc on the server process under wrk load, ml_prod beside bare FastAPI.

    .venv/bin/python bench/serving_profile.py [--only fastapi,ml_prod_shared] [--connections 8] [--duration 20] [--rate 100]

Each target starts exactly as `bench/serving.py` starts it (the same torch MLP, the same request, the same wrk Lua
script), gets a 3 s warm-up, then `--duration` seconds of wrk load at `--connections` while two things watch the
server process (bare FastAPI: the uvicorn process; ml_prod: the Serve replica, `ray::ServeReplica:bench:...`):

- /proc: the CPU time (user + system) of the process and of each of its threads, read before and after, divided
  by the requests wrk counted in the window: CPU microseconds per request, in all and per thread;
- py-spy (`pip install py-spy`; `record --nonblocking --threads --format raw`: the process is never paused) samples
  the Python stack of every thread it finds running, at `--rate` Hz. Each sample is put in one part of the request
  path by the innermost frame that names one (the rules in `PARTS`: a frame of `ml_prod/audit/` is the audit record,
  one of `torch/` the model's forward, and so on; a JSON encoder called from the audit writer counts as the audit
  record; `LEAVES` names the native code below two frames).

Each thread's CPU (from /proc, exact) is split over the parts in the proportions of that thread's samples. py-spy's
own idea of how long a thread ran is not used: it finds a thread pool's worker "running" inside its queue's wait far
more often than /proc says it runs (twice, and three times with `--blocking`), while the share of the samples within
one thread is what a sampling profiler is good for.

The wrk figures here run with py-spy attached (it takes about a tenth of a core at 100 Hz), so they are a little
below `bench/serving.py`'s. CI does not run this; check the printed load average.
"""
import argparse, collections, os, re, shutil, subprocess, sys, tempfile, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serving as sb  # the targets, their processes, wrk and its Lua script

TICK = os.sysconf("SC_CLK_TCK")

# (part, test on a frame's file path and function name); the innermost frame that passes a test names the sample's part
PARTS = [
    ("audit record (encode, write)", lambda f, fn: "ml_prod/audit/" in f),
    ("model: torch forward", lambda f, fn: "/torch/" in f),
    ("model: MLflow pyfunc, pandas frame", lambda f, fn: any(p in f for p in ("/mlflow/", "/pandas/", "ml_prod/serving/model.py"))),
    ("batching, model-thread hand-over", lambda f, fn: "ml_prod/serving/replica.py" in f and ("Batcher" in fn or "score" in fn)),
    ("API key check", lambda f, fn: "ml_prod/serving/replica.py" in f and fn.split(".")[-1] in ("authorized", "key_digest")),
    ("validation (parse, check the body)", lambda f, fn: "ml_prod/serving/request.py" in f or "/pydantic" in f),
    ("request path (ids, arm, decision, answer)", lambda f, fn: "ml_prod/serving/replica.py" in f),
    ("shared-port front (limit, ids, age)", lambda f, fn: "ml_prod/serving/app.py" in f and "_SharedPort" in fn),
    ("ASGI front (body, JSON answer, send)", lambda f, fn: "ml_prod/serving/app.py" in f or "bench/serving.py" in f),
    ("FastAPI, Starlette (routing, dependencies)", lambda f, fn: "/fastapi/" in f or "/starlette/" in f),
    ("HTTP server (uvicorn, httptools)", lambda f, fn: "/uvicorn/" in f or "httptools" in f or "/h11/" in f),
    ("asyncio event loop", lambda f, fn: "/asyncio/" in f or "uvloop" in f),
    ("Ray's replica runtime (metrics, health, control)", lambda f, fn: "/ray/" in f),
]
OTHER = "other Python"
FRAME = re.compile(r"^(?P<fn>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


LEAVES = {  # a sample whose innermost Python frame is one of these is in native code that frame called: work, or a wait
    # for the GIL that the non-blocking sampler takes for running (see bench/README.md: with two busy threads it is mostly that)
    "Thread.run": "event loop in C: no Python frame (uvloop's own work, GIL waits)",  # the replica's loop thread in uvloop's run_forever
    "_worker": "thread pool: its queue's wait and wake-up",  # concurrent.futures' worker in SimpleQueue.get
}


def part_of(stack: list[str]) -> str:
    "The part of the innermost frame of `stack` (outermost first, py-spy's raw order) that a rule in PARTS names."
    if stack and (m := FRAME.match(stack[-1])) and m["fn"] in LEAVES: return LEAVES[m["fn"]]
    for frame in reversed(stack):
        m = FRAME.match(frame)
        fn, f = (m["fn"], m["file"]) if m else (frame, "")
        for name, test in PARTS:
            if test(f, fn): return name
    return OTHER


def read_samples(path: Path) -> tuple[dict, collections.Counter]:
    """py-spy's raw (collapsed) output with `--threads`, one 'thread (TID): NAME;frame;...;frame COUNT' line per distinct
    stack: {OS thread id: (thread name, samples per part)}, and the innermost frames of the samples no rule names."""
    threads, other = {}, collections.Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not (stack and n.isdigit()): continue
        head, *frames = stack.split(";")
        m = re.match(r"thread \((\d+)\): ?(.*)", head) or re.match(r"()(.*)", "")
        if not m[1]: frames = [head, *frames]
        name, parts = threads.setdefault(int(m[1] or 0), (m[2], collections.Counter()))
        parts[part := part_of(frames)] += int(n)
        if part == OTHER: other[re.sub(r":\d+\)$", ")", frames[-1]) if frames else "(no Python frame)"] += int(n)
    return threads, other


def cpu_s(pid: int) -> tuple[float, dict]:
    "CPU seconds (user + system) of process `pid`, and per thread: {OS thread id: (name, seconds)}."
    def ticks(stat: str) -> int:
        fields = stat.rpartition(")")[2].split()
        return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
    total = ticks(Path(f"/proc/{pid}/stat").read_text()) / TICK
    threads = {}
    for t in Path(f"/proc/{pid}/task").iterdir():
        try: threads[int(t.name)] = ((t/"comm").read_text().strip(), ticks((t/"stat").read_text()) / TICK)
        except OSError: pass  # a thread that ended meanwhile
    return total, threads


def server_pid(name: str, t: sb.Target) -> int:
    "The process that answers the requests: uvicorn in the target itself, or the Serve replica of the app `bench`."
    if name == "fastapi": return t.proc.pid
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try: cmd = (p/"cmdline").read_bytes()
            except OSError: continue
            if cmd.startswith(b"ray::ServeReplica:bench:"): return int(p.name)
    raise RuntimeError("no ray::ServeReplica:bench:... process found")


def profile(name: str, workdir: Path, model_dir: Path, a) -> dict:
    t = sb.Target(name, workdir, model_dir)
    try:
        info = t.start()
        url, headers = info["url"], info.get("headers") or {}
        print(f"\n== {name}: up in {info['start_s']:.1f} s at {url}; check: {sb.check_once(url, headers)}", flush=True)
        script = sb.lua_script(workdir/f"{name}.lua", headers)
        sb.run_wrk(url, script, a.connections, 3)  # warm-up
        pid, raw = server_pid(name, t), workdir/f"{name}.pyspy.txt"
        c0, th0 = cpu_s(pid)
        spy = subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--rate", str(a.rate), "--duration", str(round(a.duration)),
                                *(["--native"] if a.native else [] if a.blocking else ["--nonblocking"]), "--full-filenames", "--threads", "--format", "raw", "--output", str(raw)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        r = sb.run_wrk(url, script, a.connections, a.duration)
        c1, th1 = cpu_s(pid)
        _, err = spy.communicate(timeout=60)
        if not raw.exists(): raise RuntimeError(f"py-spy wrote nothing (rc {spy.returncode}): {err[-500:]}")
        return dict(target=name, pid=pid, connections=a.connections, rps=r["rps"], p99_us=r["p99_us"], requests=r["requests"], non2xx=r["non2xx"],
                    cpu_s=c1 - c0, threads={k: (v[0], v[1] - th0.get(k, ("", 0.0))[1]) for k, v in th1.items()}, spied=(rs := read_samples(raw))[0], other=rs[1],
                    rate=a.rate, load=os.getloadavg())
    finally:
        t.stop()


def report(p: dict):
    """Each thread's CPU from /proc, split over the parts in the proportions of that thread's py-spy samples; a thread
    py-spy saw no Python in is native (Ray's core worker, gRPC)."""
    us = 1e6 / p["requests"]
    print(f"\n{p['target']} (pid {p['pid']}): {p['rps']:.0f} req/s at {p['connections']} connections, p99 {p['p99_us'] / 1000:.2f} ms, "
          f"{p['requests']} requests ({p['non2xx']} non-2xx); load average {' / '.join(f'{x:.2f}' for x in p['load'])}")
    print(f"  process CPU {p['cpu_s']:.2f} s = {p['cpu_s'] * us:.0f} us per request")
    split = collections.Counter()
    for tid, (comm, cpu) in sorted(p["threads"].items(), key=lambda kv: -kv[1][1]):
        name, parts = p["spied"].get(tid, ("", collections.Counter()))
        if sum(parts.values()): split.update({k: cpu * v / sum(parts.values()) for k, v in parts.items()})
        else: split["native threads (no Python seen: Ray's core worker, gRPC, ...)"] += cpu
        if cpu * us >= 1: print(f"    thread {tid} ({comm}; {name or 'no Python seen'}): {cpu * us:.0f} us per request, {sum(parts.values())} py-spy samples")
    print(f"  {'part':<62} {'us per request':>14} {'share':>6}")
    for k, v in split.most_common(): print(f"    {k:<60} {v * us:14.1f} {100 * v / p['cpu_s']:5.1f}%")
    for k, v in p["other"].most_common(3): print(f"      other Python, innermost frame {k[:80]}: {v} samples")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="fastapi,ml_prod_shared", help="targets of bench/serving.py to profile (default fastapi,ml_prod_shared)")
    ap.add_argument("--connections", type=int, default=8, help="wrk connections while profiling (default 8)")
    ap.add_argument("--duration", type=float, default=20, help="seconds of profiled load (default 20)")
    ap.add_argument("--rate", type=int, default=100, help="py-spy samples per second (default 100)")
    ap.add_argument("--blocking", action="store_true", help="let py-spy pause the process for each sample (its default; more exact idle detection)")
    ap.add_argument("--native", action="store_true", help="also sample native frames (py-spy --native; pauses the process): for reading the kept stacks")
    ap.add_argument("--keep", default="", help="copy py-spy's raw stacks (NAME.pyspy.txt) into this folder")
    a = ap.parse_args()
    for tool in ("wrk", "py-spy"):
        if shutil.which(tool) is None: sys.exit(f"{tool} is needed: apt-get install -y wrk; pip install py-spy")
    names = [n.strip() for n in a.only.split(",") if n.strip()]
    if bad := [n for n in names if n not in sb.TARGETS]: sys.exit(f"unknown target(s) {bad}; choose from {sb.TARGETS}")
    workdir = Path(tempfile.mkdtemp(prefix="ml_prod-bench-profile-"))
    print(f"targets {names}, {a.connections} connections, {a.duration:g} s, py-spy at {a.rate} Hz; {os.cpu_count()} cores", flush=True)
    try:
        model_dir = sb.save_model_dir(workdir/"model")
        for p in [profile(n, workdir, model_dir, a) for n in names]: report(p)
    finally:
        if a.keep: [shutil.copy(f, a.keep) for f in workdir.glob("*.pyspy.txt")]
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
