"""Serving under faults (issue 19), short forms for CI: each scenario under steady open-loop Poisson load
(tests/poisson_load.py: every request its own `x-request-id` and `x-attempt`, at most 2 retries with backoff),
errors counted without and with the retries, audit rows counted from the raw segment files on disk.

* a model call slower than the endpoint's timeout;
* a broken v3 while v1 serves: only the replicas refuse it (CI); its constructor fails, its health check fails (both
  refused by the operator's pre-flight before any replica sees them; long tier, and bench/chaos_serving.py);
* the Serve controller SIGKILLed mid-load and again mid-update (v1 -> v2): long tier (~70 s);
* a model call that never returns: its replica fails its health check and is replaced: long tier (~60 s).

CI runs the first two (`-m "not long"`); `make test LONG=1` all. The tests share one application (the module's `app`, deployed once: a deployment costs CI ~20 s), in that order; each
test reads what the application serves when it starts.

Overload (429/503 with Retry-After, never 500) is tests/test_serving.py::test_overload_is_503_and_recovers; a replica
killed under load is test_serving.py::test_killed_replica_loses_no_answered_record; the long forms, with the table
of figures, are bench/chaos_serving.py. Runs on the session's shared serving cluster (conftest's `project`), one
test session on the machine at a time. No latency is asserted, only outcomes and generous liveness deadlines."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import psutil
import pytest

from conftest import ML_PROD, RECORD, cli, deploy, log_version, raw_records, status
from poisson_load import Load, audit_check, counts, load_avg

pytestmark = pytest.mark.solo  # under load, zero errors: run while no other test of the run does

RATE = 50  # requests a second in these short forms (bench/chaos_serving.py runs them at 100)


def set_alias(alias: str, version: int):
    from ml_prod.models.registry import set_alias as move
    from ml_prod.settings import load_settings
    move(load_settings(), "tiny", alias, version, reason="test")


def audit_dir() -> Path:
    from ml_prod.settings import load_settings
    return Path(load_settings().audit_dir)


def row(name: str, reqs, au: dict, recovery: str, load_before: str) -> str:
    "One row of the issue's table, printed (seen with `pytest -s`, or in the report of a failure)."
    c = counts(reqs)
    line = (f"| {name} | {RATE}/s ({c['achieved']:.0f}) | {c['n']} | {c['err0']} {c['first'] or ''} | {c['err2']} {c['last'] or ''} | "
            f"{au['rows']} rows / {au['answered']} answered: {au['missing']} missing, {au['duplicated']} duplicated, {au['extra']} extra | "
            f"{recovery} | load {load_before} -> {load_avg()} |")
    print(line)
    return line


def serve_controller() -> psutil.Process:
    "The ServeController actor's process of the project's own cluster (a descendant of the raylet started with its temp dir)."
    from ml_prod.runtime.cluster import _temp_dir
    from ml_prod.settings import load_settings
    temp = _temp_dir(load_settings())
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if not (p.info["cmdline"] or [""])[0].startswith("ray::ServeController"): continue
        try: ancestors = p.parents()
        except psutil.Error: continue
        if any(temp in " ".join(a.cmdline()) for a in ancestors if a.is_running()): found.append(p)
    assert len(found) == 1, f"{len(found)} ServeController processes of the cluster at {temp}"
    return found[0]


def kill_controller() -> int:
    p = serve_controller()
    p.send_signal(signal.SIGKILL)
    p.wait(10)
    return p.pid


def status_back(app: str, deadline_s: float = 90) -> float:
    "Seconds until `ml_prod serve status --json` succeeds again and shows `app` RUNNING; fails after `deadline_s`."
    t0, last = time.monotonic(), None
    while time.monotonic() - t0 < deadline_s:
        last = cli("serve", "status", "--json", check=False, timeout=deadline_s)
        if last.returncode == 0 and any(a["app"] == app and a["status"] == "RUNNING" for a in json.loads(last.stdout)):
            return time.monotonic() - t0
        time.sleep(0.5)
    raise AssertionError(f"`ml_prod serve status` not back within {deadline_s} s: {last.returncode} {last.stdout[-800:]} {last.stderr[-1500:]}")


def timeline(reqs, t0: float, marks: dict):
    "Print the failed first tries per second of the load, beside the events in `marks` (seconds from the load's start)."
    from collections import Counter
    bad = Counter(int(r.t - t0) for r in reqs if not r.first_ok)
    print("events:", {k: round(v, 1) for k, v in marks.items()}, "failed first tries by second:", dict(sorted(bad.items())))
    for r in [r for r in reqs if not r.first_ok][:3]: print("  e.g.", r.cid, round(r.t - t0, 1), [(a[0], str(a[1])[:200]) for a in r.attempts])


def wait_file_line(path: Path, pred, deadline_s: float = 60) -> str:
    t0 = time.monotonic()
    while time.monotonic() - t0 < deadline_s:
        if path.exists():
            for line in path.read_text().splitlines():
                if pred(line): return line
        time.sleep(0.05)
    raise AssertionError(f"no line of {path} matched within {deadline_s} s: {path.read_text() if path.exists() else '(none)'}")


# ---- one application for the module ---------------------------------------------------------------------------

TIMEOUT_S = 2.0  # the endpoint's limits.timeout_s (the default)


@pytest.fixture(scope="module")
def app(project):
    """The application `chaos` (1 replica, 0.25 CPU) serving v1 of `tiny@chaos` through the stable address (Ray's
    proxy). Every good version holds a call for a record of country XX while `hold` exists and notes each call's
    size in `calls`."""
    hold, calls = project / "chaos-hold", project / "chaos-calls"
    good = dict(hold_file=str(hold), hold_country="XX", calls_file=str(calls))
    v1 = log_version("chaos", **good)
    url = deploy(project, {"name": "chaos", "arms": {"main": {"model": "models:/tiny@chaos", "weight": 1}}, "num_cpus": 0.25,
                           "limits": {"timeout_s": TIMEOUT_S}}, direct=False)
    yield dict(url=url, v1=v1, good=good, hold=hold, calls=calls)
    cli("serve", "down", "chaos", check=False)


def serving_version() -> str:
    "The version the application's one replica reports serving."
    [x] = status("chaos")["serving"]
    return x["arms"]["main"]["version"]


# ---- a model slower than its timeout --------------------------------------------------------------------------

def test_slow_model_call_is_408_within_the_timeout(app, project):
    """A model call held past the endpoint's `limits.timeout_s`: 408 within timeout + 1 s, its raw audit record marked
    timeout; the requests queued behind it time out too and are never scored afterwards; the replica's in-flight count
    is 0 once they are answered. The held call itself runs on in the replica's model thread until it returns (a Python
    thread cannot be stopped): here until the test lets it go."""
    url, hold, calls = app["url"], app["hold"], app["calls"]
    with httpx.Client(base_url=url, timeout=30) as c:
        assert c.post("/predict", json=RECORD).status_code == 200
        calls.unlink(missing_ok=True)
        hold.touch()
        try:
            t0 = time.monotonic()
            r = c.post("/predict", json={"amount": 1.0, "country": "XX"}, headers={"x-request-id": "held"})
            took = time.monotonic() - t0
            assert r.status_code == 408 and took < TIMEOUT_S + 1, (r.status_code, took, r.text)
            assert f"timeout of {TIMEOUT_S} s" in r.json()["error"], r.text
            from concurrent.futures import ThreadPoolExecutor
            def queued(i):
                t = time.monotonic()
                resp = httpx.post(f"{url}/predict", json=RECORD, headers={"x-request-id": f"queued-{i}"}, timeout=30)
                return resp.status_code, time.monotonic() - t
            with ThreadPoolExecutor(3) as ex: behind = list(ex.map(queued, range(3)))
            assert all(code == 408 and t < TIMEOUT_S + 1 for code, t in behind), behind
            [replica] = status("chaos")["replicas"]
            inflight = httpx.get(f"{replica['url']}/-/status", timeout=30).json()["inflight"]
        finally: hold.unlink(missing_ok=True)  # the held call returns
        time.sleep(0.5)
        assert c.post("/predict", json=RECORD, headers={"x-request-id": "after"}).status_code == 200
    assert inflight == 0, inflight
    scored = calls.read_text().split()
    assert scored == ["1", "1"], scored  # the held call and the one after: the queued ones were never scored
    raw = {x["client_request_id"]: x for x in raw_records(audit_dir(), "chaos") if x["client_request_id"]}
    for cid in ("held", "queued-0", "queued-1", "queued-2"):
        assert (raw[cid]["status"], raw[cid]["outcome"]) == (408, "timeout") and "timeout" in raw[cid]["error"], raw[cid]
    assert raw["after"]["status"] == 200


# ---- a broken v3 ----------------------------------------------------------------------------------------------

BROKEN = {  # model_config of the broken v3, what the refusal must say
    "replicas only": ({"broken_in_replica": True}, "a dependency this model needs is missing on the cluster's nodes"),
    "constructor": ({"load_error": "cannot open weights.bin: truncated", "logged_by": os.getpid()}, "cannot open weights.bin: truncated"),
    "health check": ({"broken": True}, "weights are corrupt")}


@pytest.mark.parametrize("kind", ["replicas only",  # the pre-flight passes, the replica refuses it: in CI
                                  # refused by the operator's pre-flight, before any replica sees them (test_serving.py checks the
                                  # health check's refusal without load): long tier, ~25 s each
                                  pytest.param("constructor", marks=pytest.mark.long), pytest.param("health check", marks=pytest.mark.long)])
def test_broken_v3_is_refused_while_v1_serves_without_an_error(app, kind):
    """A broken v3 tried under load while v1 serves: one that only the replicas refuse (a dependency missing on the
    cluster's nodes: the operator's pre-flight passes, the replica refuses it, the previous configuration is
    re-applied), one whose constructor (load) fails, one that fails its health check (scoring its input example).
    `serve update` fails; `serve status` says why; v1 answers every request on the first try throughout; one raw
    audit row per answered request."""
    v1 = app["v1"]
    assert serving_version() == str(v1)
    cfg, why = BROKEN[kind]
    prefix = f"v3{kind[0]}-"
    before = load_avg()
    with Load(f"{app['url']}/predict", RATE, prefix.rstrip("-")) as l:
        time.sleep(1)
        v3 = log_version("chaos", **cfg)
        try:
            r = cli("serve", "update", "chaos", check=False)
            st = status("chaos")
        finally: set_alias("chaos", v1)  # the operator moves the alias back
        time.sleep(1)
    assert r.returncode != 0 and why in r.stderr and f"models:/tiny/{v3}" in r.stderr, (kind, r.returncode, r.stderr[-2000:])
    assert st["last_refusal"] and why in st["last_refusal"]["error"], st["last_refusal"]
    assert st["arms"]["main"]["pinned"] == f"models:/tiny/{v1}", st["arms"]
    reqs = l.reqs
    au = audit_check(audit_dir(), "chaos", reqs, prefix)
    c = counts(reqs)
    row(f"broken v3 ({kind}) while v1 serves (stable address)", reqs, au, f"`serve status`: {st['last_refusal']['error'][:120]!r}", before)
    assert c["n"] > 5 * RATE and c["err0"] == 0, c  # not one error, even without retries
    assert {r.answer["version"] for r in reqs} == {str(v1)}
    assert au["missing"] == 0 and au["duplicated"] == 0 and au["extra"] == 0, {k: v for k, v in au.items() if k != "by_id"}
    assert serving_version() == str(v1)


# ---- the Serve controller killed ------------------------------------------------------------------------------

@pytest.mark.long  # ~70 s, beyond this module's CI share; bench/chaos_serving.py --only controller is its long form
def test_serve_controller_killed_mid_load_and_mid_update(app, project):
    """SIGKILL of the ServeController under load through the stable address (the shared port), then again while a v1 -> v2
    update is being applied (v2 loading in the replica): traffic keeps flowing, every request answered within 2
    retries, the update completes, `serve status` works again, the audit has one raw row per answered request."""
    pids = project / "ctl-loads"
    v1 = app["v1"]
    assert serving_version() == str(v1)
    [replica] = status("chaos")["replicas"]
    v2 = log_version("chaos-next", offset=0.5, load_delay=3, pid_file=str(pids), logged_by=os.getpid(), **app["good"])
    before = load_avg()
    with Load(f"{app['url']}/predict", RATE, "ctl") as l:
        time.sleep(2)
        t_kill1 = time.monotonic()
        kill_controller()
        back1 = status_back("chaos")
        # mid-update: the CLI has checked v2 (pre-flight) and applied it; the replica is loading it when the controller dies
        set_alias("chaos", v2)
        upd = subprocess.Popen([ML_PROD, "serve", "update", "chaos"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_file_line(pids, lambda line: line.split()[0] == str(replica["pid"]))
        t_kill2 = time.monotonic()
        kill_controller()
        out, err = upd.communicate(timeout=300)
        updated = time.monotonic() - t_kill2
        back2 = status_back("chaos")
        time.sleep(1)
    reqs = l.reqs
    marks = dict(kill1=t_kill1 - l.t0, kill2=t_kill2 - l.t0, update_done=t_kill2 + updated - l.t0)
    timeline(reqs, l.t0, marks)
    print("replicas before", replica["id"], replica["pid"], "after", [(x["id"], x["pid"]) for x in status("chaos")["replicas"]])
    au = audit_check(audit_dir(), "chaos", reqs, "ctl-")
    c = counts(reqs)
    row("Serve controller SIGKILLed mid-load, then mid-update v1 -> v2 (stable address)", reqs, au,
        f"`serve status` back {back1:.1f} s after the first kill; `serve update` exited {upd.returncode} {updated:.1f} s after the "
        f"second kill, `serve status` fine {back2:.1f} s later", before)
    assert upd.returncode == 0, f"`ml_prod serve update` exited {upd.returncode} after the controller was killed:\n{out[-2000:]}\n{err[-3000:]}"
    assert c["n"] > 10 * RATE and c["err2"] == 0, c  # every request answered within 2 retries
    versions = [r.answer["version"] for r in sorted(reqs, key=lambda r: r.attempts[-1][2])]
    assert set(versions) <= {str(v1), str(v2)} and versions[-1] == str(v2), set(versions)
    st = status("chaos")
    assert st["arms"]["main"]["pinned"] == f"models:/tiny/{v2}" and serving_version() == str(v2), st
    assert au["missing"] == 0 and au["duplicated"] == 0, {k: v for k, v in au.items() if k != "by_id"}


# ---- a model call that never returns ---------------------------------------------------------------------------

@pytest.mark.long  # ~60 s: the call must run 30 s before the replica's health check fails, then Ray replaces it
def test_hung_model_call_gets_its_replica_replaced(app):
    """A model call that never returns holds the replica's one model thread (every later request would get 408):
    once it has run 10 x timeout_s (at least 30 s) the replica fails its health check and Ray replaces it, which is
    what stops the call (its process ends); the application answers 200 again, from a new replica."""
    hold = app["hold"]
    [old] = status("chaos")["replicas"]
    hold.touch()
    try:
        r = httpx.post(f"{app['url']}/predict", json={"amount": 1.0, "country": "XX"}, timeout=30)
        assert r.status_code == 408, r.text
        t0 = time.monotonic()
        while time.monotonic() - t0 < 150 and psutil.pid_exists(old["pid"]): time.sleep(1)
        gone = time.monotonic() - t0
        assert not psutil.pid_exists(old["pid"]), f"the replica holding the hung call still runs after {gone:.0f} s"
    finally: hold.unlink(missing_ok=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        st = status("chaos")
        if st["status"] == "RUNNING" and [x["state"] for x in st["replicas"]] == ["RUNNING"] and st["serving"]: break
        time.sleep(1)
    assert httpx.post(f"{app['url']}/predict", json=RECORD, timeout=30).status_code == 200
    print(f"hung call: replica {old['id']} (pid {old['pid']}) gone {gone:.0f} s after the 408, replaced by {st['replicas'][0]['id']}")
