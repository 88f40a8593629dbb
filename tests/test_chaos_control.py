"""The control service, its scheduler and the retrain loop under faults (issue 19), on the session's serving cluster
(conftest's `project`): the real control service (a detached Ray actor), real Serve over HTTP, real MLflow on SQLite.

* the control service's process killed with SIGKILL while a client sends steady traffic, then again while the alias move
  it follows is being put into service: every request answered, the endpoint ends on the new version, the restarted
  service resumes its tasks with its own claim;
* the scheduler (a task of that service) killed between fires of an every-few-seconds schedule: every planned time is
  accounted for once in the schedule store (fired, skipped as an overlap, or folded into the next fire as APScheduler's
  coalescing does), and every fired time has exactly one MLflow run;
* a second control service on the same store refuses while the first holds the lease, and takes it over within the
  lease time when the first is killed (both as standalone processes: the actor's own restart adopts its claim);
* the loop's canary under replica kills: a challenger as good as the champion on live traffic is promoted, a worse one
  is rolled back; the kills fool neither verdict.

The client is open loop (arrivals at exponential intervals at a fixed rate), every request with its own `x-request-id`
and `x-attempt`, at most 2 retries after 0.2 s and 0.4 s; errors are counted on the first attempt and on the last.
Audit rows are read from the raw files (the open JSON-lines segments and the Parquet partitions the service's
`audit_upkeep` compacts them into when it restarts). `bench/chaos.py --control` runs the same scenarios longer and prints
the issue's table; this module asserts outcomes and generous liveness deadlines only.

Every test here deploys or kills processes of the shared cluster: one test session on the machine at a time (the shared cluster's fixed ports)."""
from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from conftest import HERE, cli, deploy, log_version, status, wait_for

pytestmark = pytest.mark.solo  # under load, zero errors: run while no other test of the run does

APP, ALIAS = "chaosctl", "chaosctl"
RATE = 20.0  # requests per second of the short form; bench/chaos.py --control uses 100
BACKOFF_S = (0.2, 0.4)
DEADLINE_S = 180  # liveness only (2 busy cores): a restart, a follow or a fire that has not happened by then is broken
rows_measured: list[dict] = []  # what each scenario measured (bench/chaos.py prints them as a table)


def measured(**row):
    "Keep and print what a scenario measured (pytest -s shows it)."
    rows_measured.append(row)
    print("\nmeasured:", json.dumps(row, default=str))


def settings():
    from ml_prod.settings import load_settings
    return load_settings()


def control_status() -> dict:
    from ml_prod.control.service import status as control
    return control(settings())


# ---- an open-loop client with request ids and at most 2 retries ------------------------------------------------------

@dataclass
class Req:
    "One request: its attempts (status or exception name, answer body, time received)."
    cid: str
    due: float
    attempts: list = field(default_factory=list)

    @property
    def first_ok(self) -> bool: return _ok(self.attempts[0][0]) if self.attempts else False
    @property
    def ok(self) -> bool: return bool(self.attempts) and _ok(self.attempts[-1][0])
    @property
    def answer(self) -> dict: return (self.attempts[-1][1] or {}) if self.ok else {}
    @property
    def answered_at(self) -> float | None: return self.attempts[-1][2] if self.ok else None


def _ok(code) -> bool: return isinstance(code, int) and 200 <= code < 300


async def _one(c, url: str, r: Req, body_of):
    for attempt in (1, 2, 3):
        try:
            resp = await c.post(url, json=body_of(r), headers={"x-request-id": r.cid, "x-attempt": str(attempt)}, timeout=10)
            try: body = resp.json()
            except ValueError: body = None
            r.attempts.append((resp.status_code, body, time.time()))
        except Exception as e:  # refused, reset, timed out: an error like a 5xx
            r.attempts.append((type(e).__name__, None, time.time()))
        if r.ok or attempt == 3: return
        await asyncio.sleep(BACKOFF_S[attempt - 1] * (1 + random.random() / 2))


class Load:
    """Open-loop Poisson arrivals at `rate` per second to `url`/predict in a thread of its own until the block ends; every
    request's outcome in `reqs`. `body_of(req)` makes each request's record (default the same row)."""
    def __init__(self, url: str, rate: float, prefix: str, body_of=None, seed: int = 0):
        self.url, self.rate, self.prefix, self.rng = f"{url}/predict", rate, prefix, random.Random(seed)
        self.body_of = body_of or (lambda r: {"amount": 250.0, "country": "US"})
        self.reqs: list[Req] = []
        self.stop = threading.Event()
        self.t = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self):
        import httpx
        tasks = []
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=256, max_keepalive_connections=32)) as c:
            due = time.time()
            while not self.stop.is_set():
                due += self.rng.expovariate(self.rate)
                if (wait := due - time.time()) > 0: await asyncio.sleep(wait)
                r = Req(f"{self.prefix}-{len(self.reqs)}", due)
                self.reqs.append(r)
                tasks.append(asyncio.create_task(_one(c, self.url, r, self.body_of)))
            await asyncio.gather(*tasks)

    def __enter__(self): self.t.start(); return self
    def __exit__(self, *exc): self.stop.set(); self.t.join(120)

    def answered_between(self, t0: float, t1: float) -> int:
        return sum(1 for r in list(self.reqs) if r.ok and t0 <= r.answered_at <= t1)

    def wait_for_version(self, version: int, since: float, timeout: float = DEADLINE_S) -> float:
        "When the first answer from `version` received after `since` came."
        def first():
            return min((r.answered_at for r in list(self.reqs) if r.ok and r.answered_at >= since and r.answer.get("version") == str(version)), default=None)
        return wait_for(first, timeout=timeout, every=0.2)


def counts(reqs: list[Req]) -> dict:
    "Requests, errors on the first attempt and after the last, by status."
    first = Counter(str(r.attempts[0][0]) for r in reqs if not r.first_ok)
    last = Counter(str(r.attempts[-1][0]) if r.attempts else "unsent" for r in reqs if not r.ok)
    return dict(n=len(reqs), err0=sum(first.values()), err2=sum(last.values()), first=dict(first), last=dict(last))


def raw_audit_rows(app: str) -> tuple[list[dict], list[dict]]:
    """Every primary audit row of `app` from the raw files: (the JSON lines of its request segments, the open one too; the
    rows of its Parquet day partitions). `audit_upkeep`, which the service runs when it (re)starts, compacts the open segment
    too and leaves it open: a request is then in both, once in each."""
    import pyarrow.parquet as pq
    root = Path(settings().audit_dir) / app
    segs, parts = [], []
    for p in sorted((root / "segments").glob("*.jsonl")):
        for line in p.read_bytes().split(b"\n"):
            if line.strip():
                try: segs.append(json.loads(line))
                except ValueError: pass  # a line being written
    for p in sorted((root / "requests").glob("date=*/*.parquet")):
        parts += pq.read_table(p, columns=["request_id", "client_request_id", "status", "shadow", "arm"]).to_pylist()
    return segs, parts


def audit_check(app: str, reqs: list[Req], prefix: str) -> dict:
    """Raw primary 200 rows of `app`'s requests with ids starting with `prefix` vs the answered ones: answered, rows (distinct
    request ids), missing (in neither file kind), duplicated (twice in the segments, or twice in the partitions)."""
    mine = lambda rows: [x for x in rows if x.get("status") == 200 and not x.get("shadow") and str(x.get("client_request_id") or "").startswith(prefix)]
    segs, parts = (Counter(x["request_id"] for x in mine(rows)) for rows in raw_audit_rows(app))
    answered = [r.answer.get("request_id") for r in reqs if r.ok]
    return dict(answered=len(answered), rows=len(set(segs) | set(parts)), missing=sum(1 for a in answered if not segs[a] and not parts[a]),
                duplicated=sum(1 for a in answered if segs[a] > 1 or parts[a] > 1))


def settle_audit(app: str, reqs: list[Req], prefix: str, timeout: float = 30) -> dict:
    "`audit_check` once no answered request is missing (the replicas flush their segments within a second or two), or after `timeout`."
    end = time.time() + timeout
    while True:
        au = audit_check(app, reqs, prefix)
        if not au["missing"] or time.time() > end: return au
        time.sleep(1)


# ---- the control service killed ---------------------------------------------------------------------------------------

def kill_service() -> tuple[dict, float]:
    "SIGKILL the control service actor's process; (its status before, the kill's time)."
    before = control_status()["instance"]
    assert before and before["active"], before
    os.kill(before["pid"], signal.SIGKILL)
    return before, time.time()


def service_back(old_pid: int) -> tuple[dict, float]:
    "Wait until Ray has restarted the actor in a new process that holds the lease again; (its status, when seen)."
    def back():
        st = control_status()
        inst = st["instance"]
        return inst if st["running"] and inst and inst["pid"] != old_pid and inst["active"] else None
    inst = wait_for(back, timeout=DEADLINE_S, every=0.5)
    return inst, time.time()


def raw_claims(holder_prefix: str = "") -> list[dict]:
    "The lease's claims straight from MLflow's SQLite tables: run status, start and end, last beat, and the JSON payload."
    from contextlib import closing
    with closing(sqlite3.connect(settings().tracking_uri.removeprefix("sqlite:///"))) as conn:
        ids = [r for (r,) in conn.execute("SELECT t1.run_uuid FROM tags t1 JOIN tags t2 ON t1.run_uuid = t2.run_uuid WHERE t1.key = 'ml_prod.stream' "
                                         "AND t1.value = 'control' AND t2.key = 'ml_prod.kind' AND t2.value = 'claim'")]
        out = []
        for rid in ids:
            st, start, end = conn.execute("SELECT status, start_time, end_time FROM runs WHERE run_uuid = ?", (rid,)).fetchone()
            tags = dict(conn.execute("SELECT key, value FROM tags WHERE run_uuid = ?", (rid,)).fetchall())
            beat = conn.execute("SELECT value FROM latest_metrics WHERE run_uuid = ? AND key = 'ml_prod.lease_beat'", (rid,)).fetchone()
            data = json.loads("".join(tags[f"ml_prod.payload.{i}"] for i in range(int(tags["ml_prod.payload_parts"]))))
            out.append(dict(id=rid, status=st, start=start / 1000, end=end and end / 1000, beat=beat and beat[0], **data))
    return [c for c in out if str(c.get("holder", "")).startswith(holder_prefix)]


def served_history(app: str, since: float) -> list[dict]:
    from ml_prod.serving.control import history
    return [h for h in history(app, settings()) if h["time"] >= since]


def deploy_followed(project: Path) -> tuple[str, int, int]:
    "APP on models:/tiny@chaosctl (version 1 of the alias) behind Ray's proxy, and a spare version to move the alias to: (stable URL, v1, v2)."
    v1 = log_version(ALIAS)
    v2 = log_version("chaosctl-spare", offset=0.1)
    url = deploy(project, {"name": APP, "arms": {"main": {"model": f"models:/tiny@{ALIAS}", "weight": 1}}, "num_cpus": 0}, direct=False)
    return url, v1, v2


@pytest.fixture(scope="module")
def served(project):
    yield deploy_followed(project)
    cli("serve", "down", APP, check=False)


def kill_mid_load_and_mid_follow(url: str, v_new: int, rate: float, prefix: str, quiet_s: float = 3.0) -> dict:
    """The scenario: steady traffic; SIGKILL the service; once it is back, move the alias to `v_new` and SIGKILL the service
    as soon as its follower has noticed the move (the update is under way); then wait for the endpoint to serve `v_new`.
    Returns the raw facts and figures (the test asserts on them; bench/chaos.py prints them)."""
    from ml_prod.models.registry import set_alias
    s = settings()
    out = dict(kills=[])
    with Load(url, rate, prefix) as load:
        time.sleep(quiet_s)
        before, t_kill = kill_service()
        inst, t_back = service_back(before["pid"])
        out["kills"].append(dict(when="mid-load", pid=before["pid"], new_pid=inst["pid"], down_s=t_back - t_kill,
                                 answered_while_down=load.answered_between(t_kill, t_back), before=before, after=inst))
        time.sleep(quiet_s)
        t_move = time.time()
        set_alias(s, "tiny", ALIAS, v_new, reason="chaos: moved while the control service is killed")
        noticed = wait_for(lambda: next((h for h in served_history(APP, t_move) if h["event"] == "alias_moved"), None), timeout=DEADLINE_S, every=0.1)
        before2, t_kill2 = kill_service()
        inst2, t_back2 = service_back(before2["pid"])
        out["kills"].append(dict(when="mid-follow", pid=before2["pid"], new_pid=inst2["pid"], down_s=t_back2 - t_kill2,
                                 noticed_s=noticed["time"] - t_move, killed_after_move_s=t_kill2 - t_move,
                                 answered_while_down=load.answered_between(t_kill2, t_back2), before=before2, after=inst2))
        first_new = load.wait_for_version(v_new, t_move)
        out["served_new_after_s"] = first_new - t_move
        wait_for(lambda: next((h for h in served_history(APP, t_move) if h["event"] == "update"
                               and h["arms"]["main"]["pinned"] == f"models:/tiny/{v_new}"), None), timeout=DEADLINE_S, every=0.5)
        out["update_recorded_after_s"] = time.time() - t_move
        time.sleep(quiet_s)
    reqs = load.reqs
    out.update(reqs=reqs, counts=counts(reqs), audit=settle_audit(APP, reqs, prefix), t_move=t_move, first_new=first_new,
               history=served_history(APP, t_move), final=control_status())
    return out


def test_control_service_killed_mid_load_and_mid_follow(served):
    url, v1, v2 = served
    r = kill_mid_load_and_mid_follow(url, v2, RATE, "ctl")
    c, au, (k1, k2) = r["counts"], r["audit"], r["kills"]
    measured(**dict(scenario="control service kill -9 mid-load and mid-follow", requests=c["n"], errors_without_retries=c["err0"],
                              errors_after_retries=c["err2"], audit=au, recovery=[round(k["down_s"], 1) for k in r["kills"]],
                              served_new_after_s=round(r["served_new_after_s"], 1)))
    # traffic kept flowing: every request answered (the data plane does not need the control service), also while it was down
    assert c["n"] > 50 and c["err2"] == 0, c
    assert k1["answered_while_down"] > 0 and k2["answered_while_down"] > 0, r["kills"]
    assert au["missing"] == 0 and au["duplicated"] == 0 and au["rows"] == au["answered"] == c["n"], au  # raw rows: one per answered request
    # the update completed: the endpoint ends on the new version, and never went back to the old one once it served it
    answers = sorted((q.answered_at, q.answer.get("version")) for q in r["reqs"] if q.ok)
    assert {v for _, v in answers} <= {str(v1), str(v2)}, Counter(v for _, v in answers)
    assert [v for t, v in answers if t >= r["first_new"]] == [str(v2)] * sum(1 for t, _ in answers if t >= r["first_new"]), "an old answer after the new one"
    assert status(APP)["arms"]["main"]["pinned"] == f"models:/tiny/{v2}"
    updates = [h for h in r["history"] if h["event"] == "update"]
    assert [u["arms"]["main"]["pinned"] for u in updates] == [f"models:/tiny/{v2}"], r["history"]  # recorded once
    assert not [h for h in r["history"] if h["event"] in ("refused", "revert")], r["history"]
    # the service resumed: the same instance (its own claim adopted, renewed by the new process), its tasks running again
    final = r["final"]["instance"]
    assert final["holder"] == k1["before"]["holder"] and final["claim"] == k1["before"]["claim"], (final, k1["before"])
    (claim,) = [x for x in raw_claims() if x["id"] == final["claim"]]
    assert claim["status"] == "RUNNING" and claim["pid"] == final["pid"] == k2["new_pid"], claim
    assert claim["beat"] and claim["beat"] > r["t_move"], claim
    assert [x["id"] for x in raw_claims() if x["status"] == "RUNNING"] == [final["claim"]], raw_claims()  # no second holder appeared
    tasks = {t["name"]: t for t in final["tasks"]}
    for name in ("alias_follower", "scheduler", "lifecycle"):
        assert tasks[name]["runs"] > 0 and tasks[name]["last_start"] > k2["after"]["started"] - 1, (name, tasks[name])
    assert tasks["alias_follower"]["last_error"] is None, tasks["alias_follower"]


# ---- a second control service on the same store --------------------------------------------------------------------

SERVICE = '''
import sys, threading, time
from ml_prod.control.service import ControlError, ControlService
from ml_prod.settings import load_settings
holder, wait_s = sys.argv[1], float(sys.argv[2])
svc = ControlService(load_settings(), tasks=[], handlers={}, holder=holder)
try: svc.start(wait_s=wait_s)
except ControlError as e:
    print(f"REFUSED {e}", flush=True); sys.exit(1)
print(f"ACTIVE {time.time()}", flush=True)
threading.Event().wait()
'''


def lease_takeover(root: Path) -> dict:
    """Standalone instances on the store of the project in `root` (the working directory; no cluster): A holds the lease;
    B starts and is refused; A renews; C starts waiting for the lease, then A is SIGKILLed (it never releases its claim).
    The raw facts: B's exit status and output, the claims after B, A's last beat before the kill, when the kill was sent,
    when C became active."""
    from ml_prod.control.service import RENEW_S, TTL_S

    def start(holder: str, wait_s: float) -> tuple[subprocess.Popen, Path]:
        out = root / f"{holder}.out"
        with open(out, "w") as f:
            p = subprocess.Popen([sys.executable, "-c", SERVICE, holder, str(wait_s)], cwd=root, stdout=f, stderr=subprocess.STDOUT, text=True)
        procs.append(p)
        return p, out

    def active(p, out) -> float | None:
        text = out.read_text()
        assert p.poll() is None or "ACTIVE" in text, text[-3000:]
        return float(text.split("ACTIVE ")[1].split()[0]) if "ACTIVE " in text else None

    def claims() -> dict: return {c["holder"]: c for c in raw_claims("chaos-")}
    procs: list[subprocess.Popen] = []
    try:
        a, a_out = start("chaos-a", 0)
        wait_for(lambda: active(a, a_out), timeout=120, every=0.2)
        b, b_out = start("chaos-b", 0)
        b_rc = b.wait(120)
        after_b = claims()
        last_beat = wait_for(lambda: (x := claims()["chaos-a"]["beat"]) and x > after_b["chaos-a"]["beat"] and x, timeout=30, every=0.2)  # A renews
        c_proc, c_out = start("chaos-c", TTL_S + 4 * RENEW_S)  # C waits for the lease (A still holds it when C starts)
        time.sleep(3)  # C is up and waiting meanwhile
        kill_sent = time.time()
        a.send_signal(signal.SIGKILL); a.wait(30)
        killed_at = time.time()
        took = wait_for(lambda: active(c_proc, c_out), timeout=120, every=0.2)
        return dict(a_pid=a.pid, b_rc=b_rc, b_out=b_out.read_text(), after_b=after_b, last_beat=last_beat, kill_sent=kill_sent, killed_at=killed_at, took=took,
                    final=claims(), c_pid=c_proc.pid, ttl_s=TTL_S, renew_s=RENEW_S)
    finally:
        for p in procs:
            if p.poll() is None: p.kill(); p.wait(30)


def test_a_second_service_refuses_then_takes_over_within_the_lease_time(project_dir):
    """Standalone instances on one project's store (no cluster): A holds the lease; B refuses, naming A, and A keeps it;
    SIGKILL A (it never releases its claim); C takes the lease once A is gone, not before the kill: A ran on this
    machine, so C sees its process gone at once, without waiting for A's claim to expire (TTL_S)."""
    r = lease_takeover(project_dir)
    assert r["b_rc"] == 1, r["b_out"][-3000:]
    assert f"REFUSED another control service holds the lease: chaos-a (pid {r['a_pid']} on " in r["b_out"], r["b_out"]
    assert r["after_b"]["chaos-a"]["status"] == "RUNNING" and r["after_b"]["chaos-b"]["status"] == "KILLED", r["after_b"]
    a, c = r["final"]["chaos-a"], r["final"]["chaos-c"]
    assert a["beat"] >= r["last_beat"] and a["beat"] <= r["killed_at"] + 0.5, (a, r["killed_at"])
    assert a["status"] == "KILLED" and a["end"], a  # closed by C: it never renews again
    assert c["status"] == "RUNNING" and c["pid"] == r["c_pid"], c
    assert r["took"] >= r["kill_sent"], (r["took"], r["kill_sent"])  # never while A lived
    assert r["took"] - r["killed_at"] <= r["ttl_s"] + r["renew_s"] + 20, r["took"] - r["killed_at"]  # within the lease time (+ a margin for 2 busy cores)
    measured(**dict(scenario="second service on the same store", takeover_after_kill_s=round(r["took"] - r["killed_at"], 1), ttl_s=r["ttl_s"]))


# ---- the scheduler killed between fires ------------------------------------------------------------------------------

SCHED_NOTEBOOK = {"cells": [{"cell_type": "code", "metadata": {"tags": ["parameters"]}, "source": "x: int = 1", "outputs": [], "execution_count": None},
                            {"cell_type": "code", "metadata": {}, "source": "print('fired', x)", "outputs": [], "execution_count": None}],
                  "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}, "nbformat": 4, "nbformat_minor": 5}


def schedule_rows(name: str) -> list[dict]:
    "The schedule's history rows straight from the schedule store's SQLite file."
    from contextlib import closing
    from ml_prod.control.scheduler import HISTORY_TABLE, store_url
    with closing(sqlite3.connect(store_url(settings()).removeprefix("sqlite:///"))) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute(f"SELECT * FROM {HISTORY_TABLE} WHERE schedule = ? ORDER BY planned, attempt", (name,))]


def schedule_runs(name: str) -> list[dict]:
    "The MLflow runs that carry the schedule's tag, straight from MLflow's SQLite tables: id, status, start, end, planned, attempt."
    from contextlib import closing
    from ml_prod.tracking import tags as keys
    with closing(sqlite3.connect(settings().tracking_uri.removeprefix("sqlite:///"))) as conn:
        ids = [r for (r,) in conn.execute("SELECT run_uuid FROM tags WHERE key = ? AND value = ?", (keys.SCHEDULE, name))]
        out = []
        for rid in ids:
            st, start, end = conn.execute("SELECT status, start_time, end_time FROM runs WHERE run_uuid = ?", (rid,)).fetchone()
            t = dict(conn.execute("SELECT key, value FROM tags WHERE run_uuid = ?", (rid,)).fetchall())
            out.append(dict(run_id=rid, status=st, start=start / 1000, end=end and end / 1000, planned=float(t[keys.SCHEDULE_PLANNED]),
                            attempt=int(t.get(keys.SCHEDULE_ATTEMPT, 1))))
    return sorted(out, key=lambda r: r["start"])


def scheduler_killed_between_fires(project: Path, name: str, every_s: float, kills: int, after_s: float = 1.0) -> dict:
    """An every-`every_s` notebook schedule fired by the control service; `kills` times, `after_s` after a fire of it was
    recorded (between two fires), SIGKILL the service and wait for it to come back; after the last restart wait for one
    more fire, pause the schedule and wait until every fired run has ended and the store knows. Returns the raw facts."""
    from ml_prod.control.scheduler import ACTIVE, ScheduleStore
    from ml_prod.flows.schedules import schedule
    s = settings()
    nb = project / f"{name}.ipynb"
    nb.write_text(json.dumps(SCHED_NOTEBOOK))
    fired_since = lambda t: [r for r in schedule_rows(name) if r["run_id"] and (r["started"] or 0) >= t]
    with ScheduleStore.of(s) as st: st.put(schedule(dict(name=name, every_s=every_s, notebook=str(nb), parameters={"x": 3})))
    t0, kill_log = time.time(), []
    try:
        for _ in range(kills):
            since = kill_log[-1]["back"] if kill_log else t0
            wait_for(lambda: fired_since(since), timeout=DEADLINE_S, every=0.3)
            time.sleep(after_s)
            before, t_kill = kill_service()
            inst, t_back = service_back(before["pid"])
            kill_log.append(dict(pid=before["pid"], new_pid=inst["pid"], kill=t_kill, back=t_back, down_s=t_back - t_kill))
        wait_for(lambda: fired_since(kill_log[-1]["back"]), timeout=DEADLINE_S, every=0.5)  # the restarted scheduler fires again
    finally:
        with ScheduleStore.of(s) as st: st.pause(name)
    t_pause = time.time()
    wait_for(lambda: (rs := schedule_runs(name)) and all(r["end"] for r in rs), timeout=DEADLINE_S, every=1)
    wait_for(lambda: not [r for r in schedule_rows(name) if r["outcome"] in ACTIVE], timeout=DEADLINE_S, every=1)  # the next ticks saw them end
    return dict(rows=schedule_rows(name), runs=schedule_runs(name), kills=kill_log, t0=t0, t_pause=t_pause, every_s=every_s)


def schedule_accounting(r: dict) -> dict:
    """What the raw facts say: planned times fired (with runs), skipped as overlaps, folded into a later fire, missed or lost;
    runs per planned time; runs that overlapped."""
    rows, runs, every = [x for x in r["rows"] if x["attempt"] == 1], r["runs"], r["every_s"]
    lost = 0
    for a, b in zip(rows, rows[1:]):  # every planned time between two recorded fires was folded into the later one
        lost += round((b["planned"] - a["planned"]) / every) - 1 - b["coalesced"]
    per_planned = Counter(x["planned"] for x in runs)
    starts = sorted((x["start"], x["end"]) for x in runs)
    return dict(planned=sum(1 + x["coalesced"] for x in rows[1:]) + 1 if rows else 0, rows=len(rows), lost=lost,
                fired=sum(1 for x in rows if x["run_id"]), runs=len(runs), doubled=sum(n - 1 for n in per_planned.values() if n > 1),
                outcomes=dict(Counter(x["outcome"] for x in rows)), folded=sum(x["coalesced"] for x in rows),
                overlapping=sum(1 for (s0, e0), (s1, _) in zip(starts, starts[1:]) if e0 and s1 < e0),
                off_grid=sum(1 for x in rows if abs(x["planned"] / every - round(x["planned"] / every)) > 1e-6))


@pytest.mark.timeout(900)
def test_the_scheduler_killed_between_fires_loses_no_run_and_doubles_none(project, served):
    "About 20 s on 2 busy cores (30 s with two kills); bench/chaos.py --control kills it three times."
    r = scheduler_killed_between_fires(project, "chaos-every-5s", every_s=5, kills=1)
    a = schedule_accounting(r)
    measured(**dict(scenario="scheduler killed between fires", **a, recovery=[round(k["down_s"], 1) for k in r["kills"]]))
    rows, runs = [x for x in r["rows"] if x["attempt"] == 1], r["runs"]
    assert a["lost"] == 0 and a["off_grid"] == 0, (a, rows)  # every planned time accounted for once: fired, skipped or folded
    assert set(a["outcomes"]) <= {"FINISHED", "skipped"}, rows  # nothing missed (misfire_grace_hours = 6 covers seconds down), nothing failed
    assert all("overlap" in x["detail"] for x in rows if x["outcome"] == "skipped"), rows  # skipped only because a run had not ended
    assert a["doubled"] == 0 and a["overlapping"] == 0, (a, runs)  # one run per planned time; never two at once
    # the rows and the runs agree: each fire's run carries its planned time, and no run exists without its row
    assert sorted((x["planned"], x["run_id"]) for x in rows if x["run_id"]) == sorted((x["planned"], x["run_id"]) for x in runs), (rows, runs)
    assert all(x["status"] == "FINISHED" for x in runs), runs
    for k in r["kills"]:  # it fired after each restart
        assert any((x["started"] or 0) >= k["back"] and x["run_id"] for x in rows), (k, rows)


# ---- the loop's canary under replica kills ---------------------------------------------------------------------------

CAN_APP, CHAMP, CHALL = "chaoscan", "chaoscan-champion", "chaoscan-challenger"
CAN_REPLICAS = 2


def loop_moves(app: str, since: float = 0) -> list[dict]:
    "The loop's moves of `app` from the raw events in the tracking store, oldest first."
    from ml_prod.lifecycle.state import stream
    from ml_prod.tracking import events
    return [{**e.data, "time": e.time} for e in events.read(settings(), stream(app), kinds=("move",)) if e.time >= since]


def champion_version() -> int:
    from mlflow.tracking import MlflowClient
    return int(MlflowClient(settings().tracking_uri).get_model_version_by_alias("tiny", CHAMP).version)


def deploy_canary(project: Path) -> str:
    """CAN_APP on tiny@chaoscan-champion with a challenger arm (weight 0) on tiny@chaoscan-challenger, CAN_REPLICAS replicas
    behind Ray's proxy, and a lifecycle: section whose canary takes half the traffic for at least `hold_s`."""
    import yaml
    from ml_prod.models.registry import set_alias
    v1 = log_version(CHAMP)
    set_alias(settings(), "tiny", CHALL, v1, reason="the canary arm needs a version to resolve until a retrain registers one")
    train = project / "chaoscan-train.ipynb"
    train.write_text(json.dumps({**SCHED_NOTEBOOK, "cells": [{**SCHED_NOTEBOOK["cells"][0], "source": 'data_path: str = ""'}]}))
    (project / "chaoscan-retrain.yaml").write_text(yaml.safe_dump(dict(name="chaoscan-retrain", experiment="chaoscan-retrain",
                                                                      steps=dict(train=dict(notebook=str(train), parameters=dict(data_path="x.parquet"))))))
    url = deploy(project, {"name": CAN_APP, "num_cpus": 0, "replicas": CAN_REPLICAS, "decision": {"threshold": 0.5, "positive": "fraud", "negative": "legit"},
                           "arms": {"main": {"model": f"models:/tiny@{CHAMP}", "weight": 100}, "challenger": {"model": f"models:/tiny@{CHALL}", "weight": 0}},
                           "lifecycle": {"retrain": "chaoscan-retrain.yaml", "label": "y", "challenger_alias": CHALL,
                                         "trigger": {"windows": 1, "min_rows": 100, "min_labels": 0, "cooldown_s": 3},
                                         "promotion": {"metric": "accuracy", "min_holdout_rows": 20, "resamples": 200},
                                         "canary": {"weight": 0.5, "min_requests": 60, "hold_s": 25, "timeout_s": 300}}}, direct=False)
    return url


@pytest.fixture(scope="module")
def canary_app(project):
    yield deploy_canary(project)
    cli("serve", "down", CAN_APP, check=False)


def retrained(project: Path, label: str, challenger_cfg: dict) -> tuple[str, int]:
    """What a retrain of CAN_APP leaves behind, written as its pipeline writes it (the training itself is test_lifecycle's):
    a FINISHED pipeline run tagged with the retrain's id, a new version trained by it and registered under the challenger
    alias, and the frozen training rows and holdout (labels: amount over 200, which offset 0.3 gets nearly right at the
    decision's 0.5 threshold and the tiny model's own scores get wrong from 100 to 200). Then the loop is moved to `retraining` for it; the service's engine does the rest."""
    import numpy as np
    import pandas as pd
    from mlflow.tracking import MlflowClient
    from ml_prod.lifecycle import engine, state
    from ml_prod.tracking import tags as keys
    s = settings()
    c = MlflowClient(s.tracking_uri)
    exp = c.get_experiment_by_name("chaoscan-retrain")
    retrain_id = f"{CAN_APP}-{label}-{int(time.time())}"
    run = c.create_run(exp.experiment_id if exp else c.create_experiment("chaoscan-retrain"),
                       tags={keys.LIFECYCLE_APP: CAN_APP, keys.LIFECYCLE_RETRAIN: retrain_id})
    v = log_version(CHALL, **challenger_cfg)
    c.set_tag(c.get_model_version("tiny", str(v)).run_id, keys.PIPELINE_RUN, run.info.run_id)
    c.set_terminated(run.info.run_id, "FINISHED")
    rng = np.random.default_rng(len(label))
    amount = rng.uniform(0, 300, 400)
    rows = pd.DataFrame({"amount": amount, "country": rng.choice(["US", "FR"], 400), "y": (amount > 200).astype(int),
                         "request_id": [f"{label}-{i}" for i in range(400)], "time": time.time() - 3600 + np.arange(400.0)})
    fz = engine.freeze(rows, Path(s.state_dir) / "lifecycle" / CAN_APP / retrain_id, 0.2, 20, "y")
    state.move(s, CAN_APP, "retraining", f"chaos test: retrain {label}", expect="watching", by="chaos test",
               retrain_id=retrain_id, last_retrain=time.time(), champion=champion_version(), **fz)
    return retrain_id, v


def replica_pids(app: str) -> list[int]:
    return [r["pid"] for r in status(app)["replicas"] if r["state"] == "RUNNING" and r["pid"]]


def canary_under_kills(project: Path, url: str, label: str, challenger_cfg: dict, rate: float, kill_every_s: float, prefix: str) -> dict:
    """Steady traffic (amounts drawn from 0-300) on CAN_APP; a retrain of `challenger_cfg` handed to the loop; from the moment
    the canary starts, SIGKILL a RUNNING replica every `kill_every_s` until the verdict. Returns the raw facts."""
    wait_for(lambda: (m := loop_moves(CAN_APP)) == [] or m[-1]["phase"] == "watching", timeout=DEADLINE_S, every=0.5)
    rng = random.Random(len(label))
    t0, kills = time.time(), []
    with Load(url, rate, prefix, body_of=lambda r: {"amount": rng.uniform(0, 300), "country": "US"}, seed=len(label)) as load:
        retrain_id, v = retrained(project, label, challenger_cfg)
        ready = replica_pids(CAN_APP)  # looked up before the canary: a worse one is judged within seconds, a CLI call takes some
        canary = wait_for(lambda: next((m for m in loop_moves(CAN_APP, t0) if m["phase"] in ("canary", "cooling_down")), None), timeout=DEADLINE_S, every=0.2)
        assert canary["phase"] == "canary", f"the challenger never reached its canary: {loop_moves(CAN_APP, t0)}"
        verdict = lambda: next((m for m in loop_moves(CAN_APP, t0) if m["phase"] in ("promoted", "rolled_back", "cooling_down")), None)
        while not verdict() and time.time() - canary["time"] < DEADLINE_S:
            pids = [p for p in ready if psutil.pid_exists(p)] if not kills else replica_pids(CAN_APP)
            if pids:
                victim = random.choice(pids)
                try: os.kill(victim, signal.SIGKILL); kills.append((time.time(), victim))
                except ProcessLookupError: pass
            end = time.time() + kill_every_s
            while time.time() < end and not verdict(): time.sleep(0.2)
        done = wait_for(verdict, timeout=DEADLINE_S, every=0.5)
        settled = wait_for(lambda: next((m for m in loop_moves(CAN_APP, t0) if m["phase"] == "cooling_down"), None), timeout=DEADLINE_S, every=0.5)
        back = wait_for(lambda: len(replica_pids(CAN_APP)) == CAN_REPLICAS and {p for _, p in kills}.isdisjoint(replica_pids(CAN_APP)),
                        timeout=DEADLINE_S, every=1)
        time.sleep(2)
    from ml_prod.audit.query import query
    live = query(settings().audit_dir, CAN_APP, start=canary["time"], end=done["time"], include_shadow=False)
    arm_errors = {arm: int((live[live["arm"] == arm]["status"] >= 500).sum()) for arm in ("main", "challenger")}
    arm_rows = {arm: int((live["arm"] == arm).sum()) for arm in ("main", "challenger")}
    return dict(version=v, retrain_id=retrain_id, canary=canary, verdict=done, settled_after_s=settled["time"] - done["time"], moves=loop_moves(CAN_APP, t0), kills=kills,
                kills_in_canary=sum(1 for t, _ in kills if canary["time"] <= t <= done["time"]), reqs=load.reqs, counts=counts(load.reqs),
                arm_errors=arm_errors, arm_rows=arm_rows, champion=champion_version(), replicas_back=bool(back))


@pytest.mark.long  # about 2.5 min on 2 busy cores: `make test LONG=1`; bench/chaos.py --control runs it at 100 req/s
@pytest.mark.timeout(900)
def test_the_canary_verdict_is_not_fooled_by_replica_kills(project, canary_app):
    """A worse challenger is rolled back on its error rate and an as-good one promoted, while replicas of the app are
    SIGKILLed during the canary. It found that the latency rule judged p95 as soon as min_requests had come: an as-good
    canary was rolled back on "canary p95 12.8 ms is 1.56x the champion's 8.2 ms" over 77 vs 98 requests, 0 errors,
    after one kill (a replaced replica's first answers are slow); latency is now judged at the end of the hold."""
    url = canary_app
    v1 = champion_version()
    # a worse challenger (better on the holdout, but it fails on amounts above 260 in a replica): rolled back on its error
    # rate, though replicas died meanwhile; the champion stays
    bad = canary_under_kills(project, url, "bad", {"offset": 0.3, "fail_above": 260.0}, RATE, 8, "canb")
    measured(**dict(scenario="canary (worse) under replica kills", verdict=bad["verdict"]["phase"], kills=bad["kills_in_canary"],
                    settled_after_s=round(bad["settled_after_s"], 1), **bad["counts"], arm_errors=bad["arm_errors"], arm_rows=bad["arm_rows"]))
    phases = [m["phase"] for m in bad["moves"]]
    assert phases[:5] == ["retraining", "evaluating", "canary", "rolled_back", "cooling_down"], bad["moves"]
    assert "canary error rate" in bad["moves"][3]["reason"], bad["moves"][3]
    assert bad["kills_in_canary"] >= 1, (bad["kills"], bad["canary"]["time"], bad["verdict"]["time"])
    assert bad["champion"] == v1, bad["champion"]  # not promoted
    assert bad["arm_errors"]["challenger"] > 0 and bad["arm_errors"]["main"] == 0, bad["arm_errors"]
    # a challenger as good as the champion on live traffic (and better on the holdout): promoted, though replicas died under it
    good = canary_under_kills(project, url, "good", {"offset": 0.3}, RATE, 8, "cang")
    measured(**dict(scenario="canary (as good) under replica kills", verdict=good["verdict"]["phase"], kills=good["kills_in_canary"],
                    settled_after_s=round(good["settled_after_s"], 1), **good["counts"], arm_errors=good["arm_errors"], arm_rows=good["arm_rows"]))
    phases = [m["phase"] for m in good["moves"]]
    assert phases[:5] == ["retraining", "evaluating", "canary", "promoted", "cooling_down"], good["moves"]
    assert good["kills_in_canary"] >= 1, (good["kills"], good["canary"]["time"], good["verdict"]["time"])
    assert good["champion"] == good["version"] != v1 and good["arm_errors"] == {"main": 0, "challenger": 0}, good
    assert good["counts"]["err2"] == 0, good["counts"]  # every request answered within 2 retries, through the kills
    assert good["replicas_back"] and bad["replicas_back"]


def test_evaluating_a_version_leaves_its_registry_files_unchanged(project_dir):
    """The loop scores champion and challenger on the holdout. Loaded with `mlflow.pyfunc.load_model("models:/...")` from a
    local store, MLflow wrote `registered_model_meta` (and the model code's __pycache__) into the version's own files: every
    replica started afterwards (after a replica kill) refused both versions as changed since pinned, and the promotion could
    never be put into service. The version's files, downloaded as a replica does, have the same digest before and after."""
    import pandas as pd
    from ml_prod.lifecycle import engine
    from ml_prod.serving.model import model_digest
    from ml_prod.serving.spec import Application
    s = settings()
    v = log_version("chaos-eval", offset=0.3)
    digest = lambda: model_digest(f"models:/tiny/{v}", s.tracking_uri, s.registry_uri or s.tracking_uri)
    before = digest()
    a = Application(name="shop", arms={"main": {"model": "models:/tiny@chaos-eval", "weight": 1}})
    out = engine.scores(s, "tiny", v, pd.DataFrame({"amount": [50.0, 250.0], "country": ["US", "FR"]}), a)
    assert len(out) == 2 and out[1] > out[0]
    assert digest() == before, "scoring the version changed its files in the registry"
