#!/usr/bin/env python
"""Serving under faults (issue 19): an open-loop Poisson client against a real served app on the project's local Ray.

    flock /tmp/plan/serving.lock .venv/bin/python bench/chaos_serving.py [--rate 100] [--ab-rate 200] [--ab-requests 20000]
        [--kill-rate 100] [--replicas 3] [--only update,ab,kill] [--budget-s S]

A temporary project on the embedded profile; `ml_prod serve up` (conftest's `deploy`) starts its persistent local Ray
(127.0.0.1: GCS 6379, Serve's proxy 8000) and the tiny model of tests/tiny_model.py is registered as v1 and v2
(conftest's `log_version`). Requests arrive at exponential intervals at a fixed rate (open loop: a slow answer does not
delay the next arrival), each with its own id (`x-request-id`) and `x-attempt`; a request that gets no 2xx is retried
at most twice, after 0.2 s and 0.4 s (plus up to 50 % jitter). Errors are counted on the first attempt ("without
retries") and on the last ("after retries"). Scenarios, in order, each on its own application (stopped after it):

1. `update`: v1 -> v2 under load through the stable address (Ray's proxy): the alias moves, `ml_prod serve update`;
   non-2xx without retries, the versions answered, v1 answers received after the first v2 answer.
2. `ab`: arms a (v1, weight 0.9) and b (v2, weight 0.1) over N requests on the replica's own address (direct ingress,
   for the rate); a fifth of the requests carry one of 200 sticky keys (`x-sticky-key`): each arm's share (all
   requests and the unkeyed ones) and its distance from 90/10, keys seen on more than one arm, audit rows whose arm is
   not the answer's.
3. `kill`: R replicas (0.25 CPU each) behind the stable address; SIGKILL of a RUNNING replica (its pid from
   `ml_prod.serving.control.status`, polled back to back from this process: a CLI call took 14 s under this load) every
   10 s for 60 s, once R replicas run: eventual success, the time until R replicas run again after each kill, the
   failed first tries after each kill (the answers printed), audit rows vs answered.

Audit rows are read from the raw segment files (`<audit_dir>/<app>/segments/*.jsonl`, the open ones included), not
from compaction: for every answered request (its server id, `request_id` in the answer) exactly one primary 200 row;
"extra" rows are 200 rows of attempts the client never saw answered (a replica killed between its record and its
answer). The load average is printed before and after each scenario. Exits 1 if an expectation broke. CI does not run
this; run it under /tmp/plan/serving.lock on a shared machine (it uses the fixed ports above).
"""
from __future__ import annotations
import argparse, asyncio, json, os, random, signal, sys, tempfile, threading, time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
RECORD = {"amount": 250.0, "country": "US"}
BACKOFF_S = (0.2, 0.4)  # before the first and the second retry


@dataclass
class Req:
    "One client request: its attempts' (status or exception name, answer), when it was due and when it ended."
    cid: str
    due: float
    sticky: str | None = None
    attempts: list = field(default_factory=list)  # [(status|str, body dict|None, t_received)]
    lag: float = 0.0
    t: float = 0.0  # when it was due, on the monotonic clock

    @property
    def first_ok(self) -> bool: return _ok(self.attempts[0][0])
    @property
    def ok(self) -> bool: return bool(self.attempts) and _ok(self.attempts[-1][0])
    @property
    def answer(self) -> dict: return self.attempts[-1][1] if self.ok else {}


def _ok(code) -> bool: return isinstance(code, int) and 200 <= code < 300


async def _one(c, url: str, r: Req, timeout: float):
    for attempt in (1, 2, 3):
        h = {"x-request-id": r.cid, "x-attempt": str(attempt), **({"x-sticky-key": r.sticky} if r.sticky else {})}
        try:
            resp = await c.post(url, json=RECORD, headers=h, timeout=timeout)
            try: body = resp.json()
            except ValueError: body = None
            r.attempts.append((resp.status_code, body, time.monotonic()))
        except Exception as e:  # connection refused or reset, timeout: an error like a 5xx
            r.attempts.append((type(e).__name__, None, time.monotonic()))
        if r.ok or attempt == 3: return
        await asyncio.sleep(BACKOFF_S[attempt - 1] * (1 + random.random() / 2))


async def _load(url: str, rate: float, stop, name: str, sticky_share=0.0, n_max=None, timeout=5.0, seed=0) -> list[Req]:
    """Open-loop Poisson arrivals at `rate` per second until `stop()` is true (or `n_max` requests); every request's outcome."""
    import httpx
    rng, reqs, tasks = random.Random(seed), [], []
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=512, max_keepalive_connections=64)) as c:
        t0 = due = time.monotonic()
        while not stop() and (n_max is None or len(reqs) < n_max):
            due += rng.expovariate(rate)
            if (wait := due - time.monotonic()) > 0: await asyncio.sleep(wait)
            key = f"key-{rng.randrange(200)}" if rng.random() < sticky_share else None
            r = Req(f"{name}-{len(reqs)}", due - t0, key, lag=max(0.0, -wait), t=due)
            reqs.append(r)
            tasks.append(asyncio.create_task(_one(c, url, r, timeout)))
        await asyncio.gather(*tasks)
    return reqs


def load_in_thread(url: str, rate: float, name: str, **kw):
    "Start the load in a thread of its own; returns (stop event, thread, box whose 'reqs' holds the outcome)."
    stop, box = threading.Event(), {}
    t = threading.Thread(target=lambda: box.update(reqs=asyncio.run(_load(url, rate, stop.is_set, name, **kw))), daemon=True)
    t.start()
    return stop, t, box


def audit_check(app: str, reqs: list[Req], prefix: str) -> dict:
    "Raw primary 200 rows of `app` vs the answered requests: answered, rows, missing, duplicated, extra, rows by server id."
    from test_serving import raw_records  # every whole line of the segment files
    from ml_prod.settings import load_settings
    rows = [x for x in raw_records(load_settings().audit_dir, app)
            if x.get("status") == 200 and not x.get("shadow") and str(x.get("client_request_id") or "").startswith(prefix)]
    n = Counter(x["request_id"] for x in rows)
    answered = [r.answer.get("request_id") for r in reqs if r.ok]
    return dict(answered=len(answered), rows=len(rows), missing=sum(1 for a in answered if n[a] == 0),
                duplicated=sum(1 for a in answered if n[a] > 1), extra=len(set(n) - set(answered)), by_id={x["request_id"]: x for x in rows})


def counts(reqs: list[Req]) -> dict:
    first = Counter(str(r.attempts[0][0]) for r in reqs if not r.first_ok)
    last = Counter(str(r.attempts[-1][0]) for r in reqs if not r.ok)
    span = max(r.due for r in reqs) if reqs else 0
    return dict(n=len(reqs), err0=sum(first.values()), err2=sum(last.values()), first=dict(first), last=dict(last),
                achieved=len(reqs) / span if span else 0, lag_p99=sorted(r.lag for r in reqs)[int(0.99 * (len(reqs) - 1))] if reqs else 0)


def _load_avg() -> str: return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


# ---------------------------------------------------------------------------------------------------------- scenarios

def scenario_update(a, project, v1, v2, problems) -> dict:
    from conftest import cli, deploy
    from test_serving import set_alias
    set_alias("upd", v1)
    base = deploy(project, {"name": "upd", "arms": {"main": {"model": "models:/tiny@upd", "weight": 1}}, "num_cpus": 0.25}, direct=False)
    stop, t, box = load_in_thread(f"{base}/predict", a.rate, "upd")
    time.sleep(5)
    t_up = time.monotonic()
    set_alias("upd", v2)
    r = cli("serve", "update", "upd", check=False)
    t_done = time.monotonic()
    if r.returncode != 0: problems.append(f"update: `ml_prod serve update upd` exited {r.returncode}: {r.stderr[-500:]}")
    time.sleep(5)
    stop.set(); t.join()
    reqs = box["reqs"]
    answers = sorted((at[2], (at[1] or {}).get("version")) for r_ in reqs if r_.ok for at in r_.attempts[-1:])
    versions = Counter(v for _, v in answers)
    first_v2 = next((tm for tm, v in answers if v == str(v2)), None)
    back = sum(1 for tm, v in answers if first_v2 is not None and tm > first_v2 and v == str(v1))
    last_v1 = max((tm for tm, v in answers if v == str(v1)), default=None)
    c, au = counts(reqs), audit_check("upd", reqs, "upd-")
    if c["err0"]: problems.append(f"update: {c['err0']} requests without a 2xx on the first try: {c['first']}")
    if set(versions) - {str(v1), str(v2)}: problems.append(f"update: versions answered {dict(versions)}, not only v{v1}/v{v2}")
    if back: problems.append(f"update: {back} v{v1} answers received after the first v{v2} answer")
    if first_v2 is None: problems.append(f"update: no v{v2} answer")
    note = (f"versions {dict(versions)}; update took {t_done - t_up:.1f} s; first v{v2} {first_v2 - t_up:.1f} s after it began"
            if first_v2 else f"versions {dict(versions)}") + (f", last v{v1} {last_v1 - t_up:.1f} s" if last_v1 else "") + f"; v{v1} after first v{v2}: {back}"
    cli("serve", "down", "upd", check=False)
    return dict(name="update v1 -> v2 (stable address)", rate=a.rate, c=c, au=au, recovery=note)


def scenario_ab(a, project, v1, v2, problems) -> dict:
    from conftest import cli, deploy
    from test_serving import set_alias
    set_alias("ab-a", v1); set_alias("ab-b", v2)
    url = deploy(project, {"name": "ab", "num_cpus": 0.25, "arms": {"a": {"model": "models:/tiny@ab-a", "weight": 0.9},
                                                                    "b": {"model": "models:/tiny@ab-b", "weight": 0.1}}})
    box = {"reqs": asyncio.run(_load(f"{url}/predict", a.ab_rate, lambda: False, "ab", sticky_share=0.2, n_max=a.ab_requests, seed=1))}
    reqs = box["reqs"]
    ok = [r for r in reqs if r.ok]
    share = lambda rs: (sum(1 for r in rs if r.answer.get("arm") == "a") / len(rs)) if rs else float("nan")
    unkeyed = [r for r in ok if not r.sticky]
    arms_of = {}
    for r in ok:
        if r.sticky: arms_of.setdefault(r.sticky, set()).add(r.answer.get("arm"))
    split = [k for k, s in arms_of.items() if len(s) > 1]
    c, au = counts(reqs), audit_check("ab", reqs, "ab-")
    wrong_arm = sum(1 for r in ok if (row := au["by_id"].get(r.answer.get("request_id"))) and row.get("arm") != r.answer.get("arm"))
    no_arm = sum(1 for row in au["by_id"].values() if not row.get("arm"))
    sa, su = share(ok), share(unkeyed)
    if split: problems.append(f"ab: {len(split)} sticky keys answered by more than one arm, e.g. {split[:3]}")
    if wrong_arm or no_arm: problems.append(f"ab: {wrong_arm} audit rows with another arm than the answer's, {no_arm} without an arm")
    if abs(su - 0.9) > 0.005: problems.append(f"ab: arm a took {100 * su:.2f} % of the unkeyed requests, more than 0.5 points from 90")
    note = (f"a {100 * sa:.2f} % / b {100 * (1 - sa):.2f} % of {len(ok)} (|a - 90| = {100 * abs(sa - 0.9):.2f} pts); unkeyed {len(unkeyed)}: "
            f"a {100 * su:.2f} % (|a - 90| = {100 * abs(su - 0.9):.2f} pts); {len(arms_of)} sticky keys, {len(split)} on 2 arms; "
            f"audit rows with a wrong arm {wrong_arm}, without {no_arm}")
    cli("serve", "down", "ab", check=False)
    return dict(name=f"A/B 90/10 over {a.ab_requests} (replica address)", rate=a.ab_rate, c=c, au=au, recovery=note)


def scenario_kill(a, project, v1, problems) -> dict:
    from conftest import cli, deploy
    from test_serving import set_alias
    set_alias("kill", v1)
    base = deploy(project, {"name": "kill", "arms": {"main": {"model": "models:/tiny@kill", "weight": 1}}, "num_cpus": 0.25,
                            "replicas": a.replicas}, direct=False)
    from ml_prod.serving.control import status as serving_status  # in this process: a CLI call takes seconds under load
    from ml_prod.settings import load_settings
    s = load_settings()
    snaps, done = [], threading.Event()  # (time the status call began, [(pid, state)])
    def poll():
        while not done.is_set():
            t = time.monotonic()
            try: snaps.append((t, [(x["pid"], x["state"]) for x in next(x for x in serving_status(s) if x["app"] == "kill")["replicas"]]))
            except Exception as e: snaps.append((t, None)); print("status failed:", type(e).__name__, str(e)[:200])
            time.sleep(0.2)
    poller = threading.Thread(target=poll, daemon=True); poller.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not _back(snaps, 0, a.replicas, None): time.sleep(0.5)  # the driver connects first
    stop, t, box = load_in_thread(f"{base}/predict", a.kill_rate, "kill")
    t0, kills = time.monotonic(), []
    for k in range(6):  # every 10 s for 60 s
        time.sleep(max(0.0, t0 + 5 + 10 * k - time.monotonic()))
        running = [p for p, st in (next((s for _, s in reversed(snaps) if s), []) or []) if st == "RUNNING" and p]
        alive = [p for p in running if _pid_alive(p)]
        if not alive: kills.append((time.monotonic(), None)); print(f"kill {k + 1}: no RUNNING replica to kill"); continue
        victim = random.choice(alive)
        os.kill(victim, signal.SIGKILL)
        kills.append((time.monotonic(), victim))
    t_last = kills[-1][0]
    while time.monotonic() - t_last < 35 and not _back(snaps, t_last, a.replicas, kills[-1][1]): time.sleep(0.5)
    time.sleep(3)
    stop.set(); t.join(); done.set(); poller.join(timeout=30)
    rec = []
    for i, (tk, pid) in enumerate(kills):
        nxt = kills[i + 1][0] if i + 1 < len(kills) else float("inf")
        back = _back(snaps, tk, a.replicas, pid)
        rec.append(None if back is None or back > nxt else back - tk)
    reqs = box["reqs"]
    c, au = counts(reqs), audit_check("kill", reqs, "kill-")
    for r in reqs:
        if not r.first_ok: print(f"  {r.cid} first try: {r.attempts[0][0]} {json.dumps(r.attempts[0][1])[:300]}; then {[x[0] for x in r.attempts[1:]]}")
    final = next((x for _, x in reversed(snaps) if x), [])
    n_running = sum(1 for _, st in final if st == "RUNNING")
    if c["err2"]: problems.append(f"kill: {c['err2']} requests failed after 2 retries: {c['last']}")
    if n_running != a.replicas: problems.append(f"kill: {n_running} replicas RUNNING at the end, not {a.replicas}")
    if any(r is None or r > 30 for r in rec): problems.append(f"kill: replica count not back within 30 s (or before the next kill) after some kills: {rec}")
    if au["missing"] or au["duplicated"]: problems.append(f"kill: audit rows missing {au['missing']}, duplicated {au['duplicated']}")
    killed = sum(1 for _, p in kills if p)
    note = (f"{killed} kills; {a.replicas} RUNNING again after " + ", ".join("n/a" if r is None else f"{r:.1f}" for r in rec)
            + f" s (status polled every {_poll_period(snaps):.1f} s); at the end {n_running} RUNNING; failed first tries per kill "
            + ", ".join(_window(reqs, tk, kills, i) for i, (tk, _) in enumerate(kills)))
    cli("serve", "down", "kill", check=False)
    import ray
    ray.shutdown()  # the status poller's driver
    return dict(name=f"kill -9 a replica every 10 s for 60 s, {a.replicas} replicas (stable address)", rate=a.kill_rate, c=c, au=au, recovery=note)


def _pid_alive(pid: int) -> bool:
    try: os.kill(pid, 0); return True
    except OSError: return False


def _back(snaps, since: float, want: int, killed) -> float | None:
    "When the first status call begun after `since` saw `want` RUNNING replicas, `killed` not among them."
    for t, s in list(snaps):
        if t > since and s and sum(1 for p, st in s if st == "RUNNING") == want and killed not in [p for p, _ in s]: return t
    return None


def _poll_period(snaps) -> float:
    ts = [t for t, _ in snaps]
    return (ts[-1] - ts[0]) / (len(ts) - 1) if len(ts) > 1 else float("nan")


def _window(reqs, tk, kills, i) -> str:
    "Failed first tries whose answer came after kill `i` and before the next, and seconds from the kill to the last of them."
    end = kills[i + 1][0] if i + 1 < len(kills) else float("inf")
    bad = [r.attempts[0][2] for r in reqs if not r.first_ok and tk <= r.attempts[0][2] < end]
    return f"{len(bad)} in {max(bad) - tk:.1f} s" if bad else "0"


# ---------------------------------------------------------------------------------------------------------- the table

def table(rows: list[dict]) -> str:
    out = ["| scenario | rate req/s (achieved) | requests | errors without retries | errors after 2 retries | audit rows vs answered | recovery |",
           "|---|---|---:|---:|---:|---|---|"]
    for r in rows:
        c, au = r["c"], r["au"]
        out.append(f"| {r['name']} | {r['rate']:g} ({c['achieved']:.0f}; client lag p99 {c['lag_p99'] * 1000:.0f} ms) | {c['n']} | "
                   f"{c['err0']} {c['first'] or ''} | {c['err2']} {c['last'] or ''} | {au['rows']} rows / {au['answered']} answered: "
                   f"{au['missing']} missing, {au['duplicated']} duplicated, {au['extra']} extra | {r['recovery']} |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=100, help="update scenario's rate (req/s)")
    ap.add_argument("--ab-rate", type=float, default=200)
    ap.add_argument("--ab-requests", type=int, default=20_000, help="the issue's 100,000 with --ab-requests 100000")
    ap.add_argument("--kill-rate", type=float, default=100)
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--only", default="update,ab,kill")
    ap.add_argument("--budget-s", type=float, default=1800, help="no scenario starts after this many seconds")
    a = ap.parse_args()
    from conftest import _stop_cluster, in_project, log_version
    t_start, rows, problems = time.monotonic(), [], []
    with tempfile.TemporaryDirectory(prefix="ml_prod-chaos-serving-") as tmp:
        root = Path(tmp) / "project"
        root.mkdir()
        (root / "settings.ini").write_text("[DEFAULT]\n")
        for v in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_RUN_ID"): os.environ.pop(v, None)
        with in_project(root):
            try:
                print(f"load average {_load_avg()} ({os.cpu_count()} cores) at the start", flush=True)
                v1, v2 = log_version("bench-v1"), log_version("bench-v2", offset=0.5)
                for name in a.only.split(","):
                    if time.monotonic() - t_start > a.budget_s: print(f"{name}: not run, out of time"); continue
                    before = _load_avg()
                    t = time.monotonic()
                    print(f"{name}: start, load average {before}", flush=True)
                    try:
                        if name == "update": row = scenario_update(a, root, v1, v2, problems)
                        elif name == "ab": row = scenario_ab(a, root, v1, v2, problems)
                        elif name == "kill": row = scenario_kill(a, root, v1, problems)
                        else: raise SystemExit(f"--only: unknown scenario {name!r} (update, ab, kill)")
                    except Exception as e:
                        problems.append(f"{name}: {type(e).__name__}: {str(e)[:800]}"); print("FAILED:", problems[-1], flush=True); continue
                    row["load"] = f"{before} -> {_load_avg()}"
                    rows.append(row)
                    print(f"{name}: {time.monotonic() - t:.0f} s, load average {row['load']}", flush=True)
                    print(table([row]), flush=True)
            finally:
                _stop_cluster()
    print()
    print(table(rows))
    for r in rows: print(f"load average (1, 5, 15 min) before -> after {r['name']}: {r['load']}")
    print(f"total {time.monotonic() - t_start:.0f} s; load average at the end {_load_avg()}")
    for p in problems: print("BROKEN:", p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
