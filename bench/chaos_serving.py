#!/usr/bin/env python
"""Serving under faults (issue 19): an open-loop Poisson client against a real served app on the project's local Ray.

    .venv/bin/python bench/chaos_serving.py [--rate 100] [--ab-rate 200] [--ab-requests 20000]
        [--kill-rate 100] [--replicas 3] [--only update,ab,kill,controller,broken,overload] [--budget-s S]
        [--knee-rates 500,1000,...] [--knee-ms 10] [--step-s 5] [--overload-s 20] [--overload-connections 1024]
        [--probe-rate 20] [--max-ongoing 64] [--max-queued 256]

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

4. `controller`: R replicas behind the stable address; SIGKILL of the ServeController actor's process 5 s into the
   load, then, once `ml_prod serve status` works again, a v1 -> v2 update (`serve update`) and a second SIGKILL while
   the replicas load v2 (3 s load): errors, `serve update`'s exit, the time until `serve status` works again, the
   failed first tries per second of the load (the long form of tests/test_chaos_serving.py's controller test);
5. `broken`: R replicas serving v1 behind the stable address; three broken v3s tried in turn with `serve update`: its
   constructor fails, its health check fails (scoring its input example), only the replicas refuse it; each update
   must fail, `serve status` must say why, v1 must answer every request on the first try.
6. `overload`: 1 replica behind the stable address (the shared port), batching as by default, `--max-ongoing` and
   `--max-queued` as its `max_ongoing_requests` and `max_queued_requests`; load from wrk (C), paced: each connection waits an exponential gap before its next request.
   Steps of `--step-s` at the `--knee-rates` in turn until wrk's p99 passes `--knee-ms` (10 ms): the knee. Then 5x the
   knee for `--overload-s` over `--overload-connections`, then half the knee as long, while a Poisson probe client
   (`--probe-rate`, its own ids and retries) runs from 5 s before the overload to the end. Checked: every answer during
   the overload (wrk counts each status; the probe keeps its raw headers) 2xx, 429 or 503, every 429/503 with
   Retry-After, the probe's accepted requests' p50/p99 beside its own before the overload (printed), the recovery:
   seconds from the overload's end to the first 1 s window from which on no probe request is refused and its p99 is
   under 10 ms or under its own p99 before the overload, whichever is more (at most 10 s); the probe's audit rows
   exact. A step with a refusal is the knee too. Run only when named.

The `ab` and `overload` load is split over client processes of at most 80 req/s each (`load_procs`: one asyncio +
httpx client sends about 140/s on this machine); the others' comes from one client thread.

The client is tests/poisson_load.py (shared with the tests). Audit rows are read from the raw segment files (`<audit_dir>/<app>/segments/*.jsonl`, the open ones included), not
from compaction: for every answered request (its server id, `request_id` in the answer) exactly one primary 200 row;
"extra" rows are 200 rows of attempts the client never saw answered (a replica killed between its record and its
answer). The load average is printed before and after each scenario. Exits 1 if an expectation broke. CI does not run
this; run it with no other Ray on the machine (it uses the fixed ports above).
"""
from __future__ import annotations
import argparse, asyncio, json, os, random, shutil, signal, sys, tempfile, threading, time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
from poisson_load import Req, _ok, audit_check as _audit_check, counts, load as _load, load_avg as _load_avg, pct as _pct  # tests/poisson_load.py


def load_in_thread(url: str, rate: float, name: str, **kw):
    "Start the load in a thread of its own; returns (stop event, thread, box whose 'reqs' holds the outcome)."
    stop, box = threading.Event(), {}
    t = threading.Thread(target=lambda: box.update(reqs=asyncio.run(_load(url, rate, stop.is_set, name, **kw))), daemon=True)
    t.start()
    return stop, t, box


def audit_check(app: str, reqs: list[Req], prefix: str) -> dict:
    "Raw primary 200 rows of `app` vs the answered requests (tests/poisson_load.py's `audit_check` on this project's audit folder)."
    from ml_prod.settings import load_settings
    return _audit_check(load_settings().audit_dir, app, reqs, prefix)


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
    reqs = load_procs(f"{url}/predict", a.ab_rate, "ab", time.monotonic() + 0.5, n_max=a.ab_requests, sticky_share=0.2, seed=1)
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


def scenario_controller(a, project, v1, problems) -> dict:
    "The ServeController SIGKILLed under load, then again while a v1 -> v2 update is loading v2 in the replicas."
    from conftest import cli, deploy, log_version, status
    from test_chaos_serving import kill_controller, status_back, timeline, wait_file_line
    from test_serving import set_alias
    set_alias("ctl", v1)
    base = deploy(project, {"name": "ctl", "arms": {"main": {"model": "models:/tiny@ctl", "weight": 1}}, "num_cpus": 0.25,
                            "replicas": a.replicas}, direct=False)
    pids = project / "ctl-loads"
    v2 = log_version("ctl-next", offset=0.5, load_delay=3, pid_file=str(pids), logged_by=os.getpid())
    replicas = {str(x["pid"]) for x in status("ctl")["replicas"]}
    stop, t, box = load_in_thread(f"{base}/predict", a.rate, "ctl")
    t0 = time.monotonic()
    time.sleep(5)
    t_kill1 = time.monotonic(); kill_controller()
    back1 = status_back("ctl", 180)
    set_alias("ctl", v2)
    import subprocess
    from conftest import ML_PROD
    upd = subprocess.Popen([ML_PROD, "serve", "update", "ctl"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_file_line(pids, lambda line: line.split()[0] in replicas, 120)
    t_kill2 = time.monotonic(); kill_controller()
    out, err = upd.communicate(timeout=600)
    t_upd = time.monotonic() - t_kill2
    back2 = status_back("ctl", 180)
    time.sleep(5)
    stop.set(); t.join()
    reqs = box["reqs"]
    timeline(reqs, t0, dict(kill1=t_kill1 - t0, kill2=t_kill2 - t0, update_done=t_kill2 + t_upd - t0))
    c, au = counts(reqs), audit_check("ctl", reqs, "ctl-")
    st = status("ctl")
    served = {x["arms"]["main"]["version"] for x in st["serving"]}
    if upd.returncode != 0: problems.append(f"controller: `serve update` exited {upd.returncode}: {err[-800:]}")
    if c["err2"]: problems.append(f"controller: {c['err2']} requests failed after 2 retries: {c['last']}")
    if served != {str(v2)}: problems.append(f"controller: replicas serve {served} after the update, not v{v2}")
    if au["missing"] or au["duplicated"]: problems.append(f"controller: audit rows missing {au['missing']}, duplicated {au['duplicated']}")
    note = (f"`serve status` back {back1:.1f} s after the first kill; `serve update` exited {upd.returncode} {t_upd:.1f} s after the second "
            f"kill (status fine {back2:.1f} s later); replicas serve {sorted(served)}")
    cli("serve", "down", "ctl", check=False)
    return dict(name=f"Serve controller SIGKILLed mid-load, then mid-update v1 -> v2, {a.replicas} replica(s) (stable address)",
                rate=a.rate, c=c, au=au, recovery=note)


def scenario_broken(a, project, v1, problems) -> dict:
    "Broken v3s tried in turn under load while v1 serves: constructor fails, health check fails, only the replicas refuse it."
    from conftest import cli, deploy, log_version, status
    from test_serving import set_alias
    set_alias("brk", v1)
    base = deploy(project, {"name": "brk", "arms": {"main": {"model": "models:/tiny@brk", "weight": 1}}, "num_cpus": 0.25,
                            "replicas": a.replicas}, direct=False)
    kinds = {"constructor": ({"load_error": "cannot open weights.bin: truncated", "logged_by": os.getpid()}, "cannot open weights.bin"),
             "health check": ({"broken": True}, "weights are corrupt"),
             "replicas only": ({"broken_in_replica": True}, "a dependency this model needs is missing")}
    stop, t, box = load_in_thread(f"{base}/predict", a.rate, "brk")
    time.sleep(3)
    said = {}
    for kind, (cfg, why) in kinds.items():
        v3 = log_version("brk", **cfg)
        t_k = time.monotonic()
        r = cli("serve", "update", "brk", check=False)
        took = time.monotonic() - t_k
        refusal = status("brk")["last_refusal"] or {}
        said[kind] = f"{took:.0f} s, status: {(refusal.get('error') or '')[:80]!r}"
        if r.returncode == 0 or why not in r.stderr: problems.append(f"broken {kind}: `serve update` exited {r.returncode}: {r.stderr[-500:]}")
        if why not in (refusal.get("error") or ""): problems.append(f"broken {kind}: `serve status` does not say why v{v3} was refused: {refusal}")
        set_alias("brk", v1)
    time.sleep(3)
    stop.set(); t.join()
    reqs = box["reqs"]
    c, au = counts(reqs), audit_check("brk", reqs, "brk-")
    versions = Counter(r.answer.get("version") for r in reqs if r.ok)
    if c["err0"]: problems.append(f"broken: {c['err0']} requests without a 2xx on the first try: {c['first']}")
    if set(versions) != {str(v1)}: problems.append(f"broken: versions answered {dict(versions)}, not only v{v1}")
    if au["missing"] or au["duplicated"]: problems.append(f"broken: audit rows missing {au['missing']}, duplicated {au['duplicated']}")
    cli("serve", "down", "brk", check=False)
    return dict(name=f"broken v3 (constructor, health check, replicas only) while v1 serves, {a.replicas} replica(s) (stable address)",
                rate=a.rate, c=c, au=au, recovery="; ".join(f"{k}: {v}" for k, v in said.items()) + f"; versions answered {dict(versions)}")


def _latency_ms(reqs: list[Req]) -> list[float]:
    "Milliseconds from sending to the answer of the requests answered 2xx on their first try."
    return [1000 * (r.attempts[0][2] - r.sent) for r in reqs if r.first_ok]


def _refusals(reqs: list[Req]) -> tuple[Counter, list]:
    "Every attempt's status that is not 2xx (Counter), and the 429/503 attempts without a Retry-After header."
    codes, bare = Counter(), []
    for r in reqs:
        for at in r.attempts:
            if _ok(at[0]): continue
            codes[str(at[0])] += 1
            if at[0] in (429, 503) and not (at[3] or {}).get("retry-after"): bare.append((r.cid, at[0], at[3]))
    return codes, bare


def _recovery(reqs: list[Req], t_end: float, limit_ms: float, window_s: float = 1.0) -> float | None:
    """Seconds from `t_end` to the start of the first `window_s` window (by the time requests were sent) from which on
    every window has no refused first try and a first-try p99 under `limit_ms`; None when not even the last one is."""
    after = [r for r in reqs if r.sent >= t_end]
    if not after: return None
    wins = [[] for _ in range(int((max(r.sent for r in after) - t_end) // window_s) + 1)]
    for r in after: wins[int((r.sent - t_end) // window_s)].append(r)
    normal = [all(r.first_ok for r in w) and (not w or _pct(_latency_ms(w), 0.99) < limit_ms) for w in wins]
    return next((k * window_s for k in range(len(wins)) if all(normal[k:])), None)


def _proc_load(url: str, rate: float, name: str, start_at: float, stop_at: float, kw: dict) -> list[Req]:
    "One client process's share: `load` at `rate` from `start_at` to `stop_at` (the monotonic clock is the machine's)."
    time.sleep(max(0.0, start_at - time.monotonic()))
    return asyncio.run(_load(url, rate, lambda: time.monotonic() > stop_at, name, **kw))


def load_procs(url: str, rate: float, name: str, start_at: float, stop_at: float = float("inf"), per_proc: float = 80,
               n_max: int | None = None, max_procs: int = 6, **kw) -> list[Req]:
    """`rate` split over ceil(rate / per_proc) client processes, at most `max_procs` (forked: one asyncio + httpx client
    sends about 140/s on this machine, two loops in one process starve each other, and 13 processes of 512 connections
    each swamped the 2 cores and Ray's proxy), from `start_at` to `stop_at` (or `n_max` requests in all); all their
    requests, client ids `{name}-p{i}-{n}`."""
    import math, multiprocessing
    n = max(1, min(max_procs, math.ceil(rate / per_proc)))
    share = [None] * n if n_max is None else [n_max // n + (i < n_max % n) for i in range(n)]
    with multiprocessing.get_context("fork").Pool(n) as pool:
        parts = pool.starmap(_proc_load, [(url, rate / n, f"{name}-p{i}", start_at, stop_at, dict(kw, n_max=share[i], seed=kw.get("seed", 0) + 1000 * i))
                                          for i in range(n)])
    return [r for part in parts for r in part]


WRK_LUA = r"""
wrk.method = "POST"
wrk.body = [[%(body)s]]
wrk.headers["Content-Type"] = "application/json"
local mean_ms, threads = %(mean_ms)f, {}
counts, bare = {}, 0  -- globals: done() reads each thread's with thread:get
function setup(thread) table.insert(threads, thread); thread:set("id", #threads) end
function init(args) math.randomseed(os.time() * 100 + id) end
function delay() return -math.log(1 - math.random()) * mean_ms end  -- exponential gaps: Poisson arrivals per connection
function response(status, headers, body)
  counts[tostring(status)] = (counts[tostring(status)] or 0) + 1
  if (status == 429 or status == 503) and headers["retry-after"] == nil and headers["Retry-After"] == nil then bare = bare + 1 end
end
function done(summary, latency, requests)
  local all, nbare = {}, 0
  for _, t in ipairs(threads) do
    for k, v in pairs(t:get("counts")) do all[k] = (all[k] or 0) + v end
    nbare = nbare + t:get("bare")
  end
  local parts = {}
  for k, v in pairs(all) do table.insert(parts, string.format('"%%s":%%d', k, v)) end
  local e = summary.errors
  io.write(string.format('WRK_JSON {"requests":%%d,"duration_us":%%d,"p50_us":%%d,"p99_us":%%d,"socket_errors":%%d,"timeouts":%%d,"bare":%%d,"status":{%%s}}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), e.connect + e.read + e.write, e.timeout, nbare, table.concat(parts, ",")))
end
"""


def wrk_paced(url: str, rate: float, seconds: float, connections: int, workdir: Path) -> dict:
    """wrk (C; `apt-get install -y wrk`) at about `rate` req/s: `connections` connections, each waiting an exponential
    gap of mean connections / rate before its next request (wrk's `delay()`), so the arrivals are Poisson while answers
    come faster than the gaps (a connection whose answer is slow falls behind: the achieved rate is printed). Counts every
    answer's status and the 429/503 answers without Retry-After; latencies are wrk's, over all answers."""
    import subprocess
    from conftest import RECORD
    body = json.dumps(RECORD)  # the record every client of this script sends
    script = workdir / f"paced-{rate:g}.lua"
    script.write_text(WRK_LUA % {"body": body, "mean_ms": 1000 * connections / rate})
    cmd = ["wrk", "-t2", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "5s", "-s", str(script), url]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    line = next((l for l in p.stdout.splitlines() if l.startswith("WRK_JSON ")), None)
    if line is None: raise RuntimeError(f"wrk gave no result (rc {p.returncode}):\n{p.stdout[-1500:]}\n{p.stderr[-1500:]}")
    r = json.loads(line[len("WRK_JSON "):])
    r["achieved"] = r["requests"] / (r["duration_us"] / 1e6)
    return r


def scenario_overload(a, project, v1, problems) -> dict:
    """Paced wrk steps at rising rates against 1 replica (its stable address, the shared port; default batching) until
    wrk's p99 passes `a.knee_ms`: the knee. Then 5x the knee for `a.overload_s`, then half the knee for as long, while
    a Poisson probe client (`a.probe_rate`, its own ids, retries) runs from 5 s before the overload to the end: only 2xx,
    429 or 503 (with Retry-After) during the overload (wrk's and the probe's answers), the probe's accepted requests'
    latency beside its own before the overload, normal again (no refused probe, its p99 under the knee's limit) within
    10 s after, the probe's audit rows exact."""
    from conftest import cli, deploy
    from test_serving import set_alias
    if shutil.which("wrk") is None:
        raise RuntimeError("the overload scenario needs wrk: apt-get install -y wrk (Debian/Ubuntu), brew install wrk (macOS)")
    set_alias("ovl", v1)
    spec = {"name": "ovl", "arms": {"main": {"model": "models:/tiny@ovl", "weight": 1}}, "num_cpus": 0.25,
            "max_ongoing_requests": a.max_ongoing, "max_queued_requests": a.max_queued}
    base = deploy(project, spec, direct=False)
    url, work = f"{base}/predict", Path(tempfile.mkdtemp(prefix="ml_prod-overload-"))
    wrk_paced(url, a.knee_rates[0], 3, 64, work)  # warm-up
    steps, knee = [], None
    for rate in a.knee_rates:
        w = wrk_paced(url, rate, a.step_s, 64, work)
        non2xx = sum(v for k, v in w["status"].items() if not k.startswith("2"))
        steps.append(f"{rate:g}/s: achieved {w['achieved']:.0f}/s, p50 {w['p50_us'] / 1000:.2f} ms, p99 {w['p99_us'] / 1000:.2f} ms, non-2xx {non2xx}")
        print("  knee step", steps[-1], f"(load {_load_avg()})", flush=True)
        if w["p99_us"] / 1000 > a.knee_ms or non2xx: knee = rate; break
        time.sleep(1)
    if knee is None:
        problems.append(f"overload: wrk's p99 stayed under {a.knee_ms:g} ms without a refusal up to {a.knee_rates[-1]:g}/s; no knee found")
        cli("serve", "down", "ovl", check=False)
        return dict(name="overload (no knee found)", rate=a.knee_rates[-1], c=counts([]), au=dict(rows=0, answered=0, missing=0, duplicated=0, extra=0),
                    recovery="; ".join(steps))
    time.sleep(2)
    over_rate, normal_rate = 5 * knee, knee / 2
    t_start = time.monotonic() + 5.5
    t_end = t_start + a.overload_s
    box = {}
    probe = threading.Thread(target=lambda: box.update(reqs=load_procs(url, a.probe_rate, "ovl-probe", t_start - 5, t_end + a.overload_s,
                                                                        max_connections=64)), daemon=True)
    probe.start()
    time.sleep(max(0.0, t_start - time.monotonic()))
    over = wrk_paced(url, over_rate, a.overload_s, a.overload_connections, work)
    after = wrk_paced(url, normal_rate, max(1.0, t_end + a.overload_s - time.monotonic()), 64, work)
    probe.join()
    reqs = box["reqs"]
    before = [r for r in reqs if r.sent < t_start]
    during = [r for r in reqs if t_start <= r.sent < t_end]
    codes_over, bare_probe = _refusals(during)
    codes_after, bare_after = _refusals([r for r in reqs if r.sent >= t_end])
    wrong = {k: v for k, v in over["status"].items() if not k.startswith("2") and k not in ("429", "503")}
    wrong.update({k: v for k, v in codes_over.items() if k.isdigit() and k not in ("429", "503")})
    refused = sum(over["status"].get(k, 0) for k in ("429", "503"))
    b_lat, acc = _latency_ms(before), _latency_ms(during)
    limit = max(a.knee_ms, _pct(b_lat, 0.99))  # normal: as before the overload (the probe's own p99 can pass 10 ms on 2 cores)
    rec = _recovery(reqs, t_end, limit)
    c, au = counts(reqs), audit_check("ovl", reqs, "ovl-")
    print(f"  overload {over_rate:g}/s for {a.overload_s:g} s, {a.overload_connections} connections: wrk achieved {over['achieved']:.0f}/s, "
          f"statuses {over['status']}, without Retry-After {over['bare']}, socket errors {over['socket_errors']}, timeouts {over['timeouts']}; "
          f"probe accepted {len(acc)} of {len(during)}: p50 {_pct(acc, 0.5):.1f} / p99 {_pct(acc, 0.99):.1f} ms (before: {_pct(b_lat, 0.5):.1f} / "
          f"{_pct(b_lat, 0.99):.1f} ms), its refusals {dict(codes_over)} (load {_load_avg()})", flush=True)
    print(f"  after, {normal_rate:g}/s: wrk achieved {after['achieved']:.0f}/s, statuses {after['status']}; probe refusals {dict(codes_after)}; "
          f"normal again {'never' if rec is None else f'{rec:.1f} s'} after the overload ended", flush=True)
    if wrong: problems.append(f"overload: answers other than 2xx/429/503 during the overload: {wrong}")
    if over["bare"] or bare_probe or bare_after:
        problems.append(f"overload: 429/503 answers without Retry-After: wrk {over['bare']}, probe {len(bare_probe) + len(bare_after)}")
    if rec is None or rec > 10: problems.append(f"overload: not normal (no refused probe, p99 < {limit:.1f} ms) within 10 s after the overload: {rec}")
    if not refused: problems.append(f"overload: no request refused at {over_rate:g}/s (achieved {over['achieved']:.0f}/s): not an overload")
    if au["missing"] or au["duplicated"]: problems.append(f"overload: audit rows missing {au['missing']}, duplicated {au['duplicated']}")
    note = (f"knee {knee:g}/s (the first step whose wrk p99 passed {a.knee_ms:g} ms or that had a refusal; steps: " + "; ".join(steps) + f"); overload {over_rate:g}/s for {a.overload_s:g} s "
            f"over {a.overload_connections} connections (achieved {over['achieved']:.0f}/s, {over['requests']} answers): statuses {over['status']}, "
            f"{over['bare']} 429/503 without Retry-After, {over['socket_errors']} socket errors, {over['timeouts']} timeouts; probe at {a.probe_rate:g}/s: "
            f"accepted first tries {len(acc)} of {len(during)} p50 {_pct(acc, 0.5):.1f} / p99 {_pct(acc, 0.99):.1f} ms vs {_pct(b_lat, 0.5):.1f} / "
            f"{_pct(b_lat, 0.99):.1f} ms before; after, {normal_rate:g}/s (achieved {after['achieved']:.0f}/s): statuses {after['status']}, "
            f"normal again after {'never' if rec is None else f'{rec:.1f} s'} (no refused probe, its p99 under {limit:.1f} ms: {a.knee_ms:g} ms or its own before the overload)")
    cli("serve", "down", "ovl", check=False)
    shutil.rmtree(work, ignore_errors=True)
    return dict(name=f"overload at 5x the p99 knee, 1 replica (stable address), max_ongoing_requests {a.max_ongoing}, max_queued_requests {a.max_queued}", rate=over_rate, c=c, au=au,
                recovery=note)


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
    ap.add_argument("--knee-rates", default="500,1000,1500,2000,2500,3000,3500,4000,5000,6000", help="overload: the knee search's rates (req/s), paced wrk")
    ap.add_argument("--probe-rate", type=float, default=20, help="overload: the Poisson probe client's rate (req/s)")
    ap.add_argument("--max-ongoing", type=int, default=64, help="overload: the application's max_ongoing_requests")
    ap.add_argument("--max-queued", type=int, default=256, help="overload: the application's max_queued_requests (refused beyond max_ongoing + this)")
    ap.add_argument("--overload-connections", type=int, default=1024, help="overload: wrk's connections at 5x the knee")
    ap.add_argument("--knee-ms", type=float, default=10, help="overload: the knee is the rate whose p99 passes this")
    ap.add_argument("--step-s", type=float, default=5, help="overload: seconds of each knee step")
    ap.add_argument("--overload-s", type=float, default=20, help="overload: seconds at 5x the knee, then as many at half the knee")
    ap.add_argument("--only", default="update,ab,kill,controller,broken",
                    help="scenarios in order; `overload` only when named (wrk at 5x the knee takes the machine's cores for --overload-s)")
    ap.add_argument("--budget-s", type=float, default=1800, help="no scenario starts after this many seconds")
    a = ap.parse_args()
    a.knee_rates = [float(x) for x in a.knee_rates.split(",")]
    from conftest import log_version
    versions = {}
    def setup(_root):
        versions["v1"], versions["v2"] = log_version("bench-v1"), log_version("bench-v2", offset=0.5)
    scenarios = dict(update=lambda a, root, problems: [scenario_update(a, root, versions["v1"], versions["v2"], problems)],
                     ab=lambda a, root, problems: [scenario_ab(a, root, versions["v1"], versions["v2"], problems)],
                     kill=lambda a, root, problems: [scenario_kill(a, root, versions["v1"], problems)],
                     controller=lambda a, root, problems: [scenario_controller(a, root, versions["v1"], problems)],
                     broken=lambda a, root, problems: [scenario_broken(a, root, versions["v1"], problems)],
                     overload=lambda a, root, problems: [scenario_overload(a, root, versions["v1"], problems)])
    return run_scenarios(a, "ml_prod-chaos-serving-", scenarios, table, setup=setup, budget_s=a.budget_s)


def run_scenarios(a, prefix: str, scenarios: dict, table, setup=None, budget_s: float | None = None) -> int:
    """Run the scenarios `a.only` names, in that order, in one fresh project (`settings.ini` with just [DEFAULT]), each
    `scenarios[name](a, root, problems) -> rows`; print each one's rows with the load average before and after, then
    all of them as one `table`, and every broken expectation. 1 when anything broke. The project's Ray is stopped at the end."""
    from conftest import _stop_cluster, in_project
    t_start, rows, problems = time.monotonic(), [], []
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        root = Path(tmp) / "project"
        root.mkdir()
        (root / "settings.ini").write_text("[DEFAULT]\n")
        for v in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_RUN_ID"): os.environ.pop(v, None)
        with in_project(root):
            try:
                print(f"load average {_load_avg()} ({os.cpu_count()} cores) at the start", flush=True)
                if setup: setup(root)
                for name in a.only.split(","):
                    if name not in scenarios: raise SystemExit(f"--only: unknown scenario {name!r} ({', '.join(scenarios)})")
                    if budget_s is not None and time.monotonic() - t_start > budget_s: print(f"{name}: not run, out of time"); continue
                    before, t = _load_avg(), time.monotonic()
                    print(f"{name}: start, load average {before}", flush=True)
                    try: got = scenarios[name](a, root, problems)
                    except Exception as e:
                        problems.append(f"{name}: {type(e).__name__}: {str(e)[:800]}"); print("FAILED:", problems[-1], flush=True); continue
                    for r in got: r["load"] = f"{before} -> {_load_avg()}"
                    rows += got
                    print(f"{name}: {time.monotonic() - t:.0f} s, load average {_load_avg()}", flush=True)
                    print(table(got), flush=True)
            finally:
                _stop_cluster()
    print()
    print(table(rows))
    for r in rows: print(f"load average (1, 5, 15 min) before -> after {r['name'][:60]}: {r['load']}")
    print(f"total {time.monotonic() - t_start:.0f} s; load average at the end {_load_avg()} ({os.cpu_count()} cores)")
    for p in problems: print("BROKEN:", p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
