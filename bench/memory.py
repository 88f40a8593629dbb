#!/usr/bin/env python
"""Memory of a one-replica ml_prod endpoint beside uvicorn serving the same model, and of the control service.

    .venv/bin/python bench/memory.py [--requests 500] [--only NAME[,NAME]]

Each target of `bench/serving.py` named here starts in a fresh process group of its own, exactly as that
benchmark starts it (the same torch MLP, the same request): `fastapi` (the model in a FastAPI app under uvicorn,
no Ray), `ray_direct` (the same app as a plain Ray Serve deployment, one replica) and `ml_prod` (`ml_prod.deploy`
of a one-arm spec on the embedded profile: its persistent local Ray, API key, validation, audit, batching). Each
answers `--requests` requests (untimed), then every process it started is measured: the processes whose
environment carries this run's marker variable (every process a target starts inherits it, Ray's daemons and
workers included). For `ml_prod`, the project's control service is then started (`ml_prod control start` in the
target's project, same environment) and everything is measured again.

Memory is the proportional set size (PSS, from /proc/PID/smaps_rollup through psutil): a page shared by k
processes counts 1/k in each, so the sum over processes is what they take together (RSS would count shared
libraries once per process). USS (pages of that process alone) and RSS are printed beside it. Processes are
grouped by what they are (Ray's process titles, e.g. `ray::ServeReplica:...`, `raylet`, `gcs_server`).

CI does not run this. Memory does not depend on the machine's load, but the number of idle Ray workers does
(Ray starts and ends them on demand): the table lists them as their own group.
"""
import argparse, os, subprocess, sys, tempfile, time, uuid
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serving as sb  # the targets, their processes and their clean shutdown

MARKER = "ML_PROD_BENCH_MEMORY"
TARGETS = ["fastapi", "ray_direct", "ml_prod"]
MIB = 2 ** 20
DRIVER = "target driver (bench/serving.py --_serve)"


def marked_processes(marker: str) -> list:
    """Every live process whose environment has MARKER=marker, and their descendants (Ray's agents clear their
    environment, but they are children of the raylet)."""
    import psutil
    out = {}
    for p in psutil.process_iter():
        try:
            if p.environ().get(MARKER) == marker:
                out[p.pid] = p
                out.update((c.pid, c) for c in p.children(recursive=True))
        except (psutil.Error, OSError): continue
    return list(out.values())


def role(p) -> str:
    "What a process is, from its command line (Ray sets the titles of its workers: `ray::ServeReplica:app:dep`)."
    try: cmd = p.cmdline()
    except Exception: return "?"
    if not cmd: return p.name()
    first = cmd[0]
    if first.startswith("ray::"):
        title = first.split()[0]
        if title.startswith("ray::ServeReplica"): return "ray::ServeReplica (the model)"
        return title
    base = os.path.basename(first)
    if base in ("raylet", "gcs_server"): return base  # (the raylet's own arguments name the agents' scripts)
    joined = " ".join(cmd[:3])
    for key, name in (("ray.util.client.server", "Ray Client server"), ("log_monitor.py", "log monitor"), ("dashboard/dashboard.py", "dashboard"),
                      ("monitor.py", "autoscaler monitor"), ("default_worker.py", "ray worker (starting)"),
                      ("bench/serving.py", DRIVER),
                      ("ml_prod control", "ml_prod CLI")):
        if key in joined: return name
    return base


def measure(marker: str) -> dict:
    "{role: [processes, pss, uss, rss]} over the marked processes, in bytes."
    import psutil
    groups = defaultdict(lambda: [0, 0, 0, 0])
    for p in marked_processes(marker):
        try: m = p.memory_full_info()
        except (psutil.Error, OSError) as e:
            print(f"  not measured: {p.pid} {role(p)}: {e!r}"); continue
        g = groups[role(p)]
        g[0] += 1; g[1] += m.pss; g[2] += m.uss; g[3] += m.rss
    return dict(groups)


def print_groups(title: str, groups: dict):
    total = [sum(g[i] for g in groups.values()) for i in range(4)]
    print(f"\n{title}: {total[0]} processes, PSS {total[1] / MIB:.0f} MiB (USS {total[2] / MIB:.0f}, RSS summed {total[3] / MIB:.0f})")
    print(f"  {'process':48} {'n':>3} {'PSS MiB':>8} {'USS MiB':>8} {'RSS MiB':>8}")
    for name, g in sorted(groups.items(), key=lambda kv: -kv[1][1]):
        print(f"  {name[:48]:48} {g[0]:>3} {g[1] / MIB:8.1f} {g[2] / MIB:8.1f} {g[3] / MIB:8.1f}")
    return total


def answer(url: str, headers: dict, n: int):
    "n requests, one connection, each must be 200."
    import httpx
    body = {"features": sb.request_features()}
    with httpx.Client(timeout=30) as c:
        for i in range(n):
            r = c.post(url, json=body, headers=headers)
            if r.status_code != 200: raise RuntimeError(f"request {i}: {r.status_code} {r.text[:200]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=500, help="requests each target answers before it is measured")
    ap.add_argument("--only", default="", help=f"comma-separated targets (default: all of {TARGETS})")
    ap.add_argument("--settle", type=float, default=5, help="seconds to wait after the requests before measuring")
    a = ap.parse_args()
    names = [n for n in TARGETS if n in (a.only.split(",") if a.only else TARGETS)]
    workdir = Path(tempfile.mkdtemp(prefix="ml_prod-bench-memory-"))
    print(f"targets {names}; {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f}; work dir {workdir}", flush=True)
    totals = {}
    model_dir = sb.save_model_dir(workdir / "model") if "ml_prod" in names else workdir / "model"
    for name in names:
        marker = f"{name}-{uuid.uuid4().hex}"
        os.environ[MARKER] = marker  # Target.start passes os.environ on
        t = sb.Target(name, workdir, model_dir)
        try:
            info = t.start()
            answer(info["url"], info.get("headers") or {}, a.requests)
            time.sleep(a.settle)
            g = measure(marker)
            totals[name] = g, print_groups(f"{name} after {a.requests} requests (up in {info['start_s']:.1f} s)", g)
            if name == "ml_prod":
                # the target's own environment: its Serve port and API key are chosen in Target.start
                r = subprocess.run([str(Path(sys.executable).parent / "ml_prod"), "control", "start"], cwd=workdir / "ml_prod_project",
                                   env=_target_env(t), capture_output=True, text=True, timeout=180)
                if r.returncode != 0: raise RuntimeError(f"ml_prod control start exited {r.returncode}: {r.stdout[-2000:]}{r.stderr[-2000:]}")
                time.sleep(a.settle)
                answer(info["url"], info.get("headers") or {}, 10)
                g = measure(marker)
                totals["ml_prod + control service"] = g, print_groups("ml_prod with its control service started", g)
        except RuntimeError as e:
            print(f"  {name}: FAILED: {e}\n{t.tail()}", flush=True)
        finally:
            t.stop()
            left = marked_processes(marker)
            if left: print(f"  {name}: {len(left)} processes left after stop: {[p.pid for p in left]}", flush=True)
    base = totals.get("fastapi", (None, None))[1]
    print(f"\nsummary (PSS, MiB; load average {os.getloadavg()[0]:.2f}). 'served' leaves out the target's driver: the process that"
          f"\nstarted Serve and stays connected (for fastapi it is the server itself; `ml_prod serve up` exits once deployed):")
    for name, (groups, tot) in totals.items():
        served = tot[1] - (groups.get(DRIVER, [0, 0])[1] if name != "fastapi" else 0)
        ratio = f"  {served / base[1]:.1f}x of uvicorn's {base[1] / MIB:.0f} MiB" if base and name != "fastapi" else ""
        print(f"  {name:28} {tot[0]:>3} processes  all {tot[1] / MIB:6.0f} MiB  served {served / MIB:6.0f} MiB{ratio}")


def _target_env(t) -> dict:
    "The environment the target process runs with (its ML_PROD_SERVE_PORT and API key are chosen in Target.start)."
    import psutil
    return psutil.Process(t.proc.pid).environ()


if __name__ == "__main__":
    main()
