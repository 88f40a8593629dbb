"""Operating a served application, live: autoscaling under load and back, and `ml_prod serve logs`.

Same set-up as `test_serving.py` (conftest's `project`: the session's shared persistent local Ray with
direct ingress, a SQLite registry of tiny models), here with replicas of 0.25 CPU so that two of them
fit on a 2-core machine. The load is driven at 127.0.0.1 only, by threads of this process; the tiny
model's `delay` keeps requests in flight without burning CPU. Ray's processes report autoscaling metrics
every second (conftest's `FAST_METRICS`, set when the shared cluster starts), not every 10 s."""
from __future__ import annotations

import json
import threading
import time
from collections import Counter

import httpx
import pytest

from conftest import RECORD, cli, deploy, log_version, status

UPSCALE_DEADLINE_S = 60    # sustained load -> 2 replicas RUNNING
DOWNSCALE_DEADLINE_S = 60  # load stopped -> back to 1


def running(st: dict) -> list[dict]:
    return [r for r in st["replicas"] if r["state"] == "RUNNING"]


def wait_for(what: str, cond, deadline_s: float, every_s: float = 1.0):
    "Poll `cond()` until it returns something truthy; fail naming `what` and the last value after `deadline_s`."
    t0 = time.monotonic()
    while True:
        last = cond()
        if last and last[0]: return last, time.monotonic() - t0
        if time.monotonic() - t0 > deadline_s: raise AssertionError(f"{what}: not after {deadline_s:.0f} s; last seen: {last[1:]}")
        time.sleep(every_s)


class Load:
    "`n` threads posting records to `url` until stopped; counts the answers by status (or exception name)."
    def __init__(self, url: str, n: int):
        self.url, self.codes, self.stop, self.lock = url, Counter(), threading.Event(), threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(n)]

    def _run(self, i: int):
        with httpx.Client(base_url=self.url, timeout=30) as c:
            k = 0
            while not self.stop.is_set():
                k += 1
                try: code = c.post("/predict", json=RECORD, headers={"x-request-id": f"load-{i}-{k}"}).status_code
                except httpx.HTTPError as e: code = type(e).__name__
                with self.lock: self.codes[code] += 1
                if code != 200: time.sleep(0.1)  # a 503 asks us to back off

    def __enter__(self):
        for t in self.threads: t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads: t.join(60)


@pytest.mark.slow
@pytest.mark.long  # beyond CI's time limit: `make test LONG=1`
def test_autoscaling_up_under_load_and_back_down(project):
    t_start = time.monotonic()
    log_version("auto", delay=0.3)
    app = {"name": "auto", "arms": {"main": {"model": "models:/tiny@auto", "weight": 1}}, "num_cpus": 0.25,
           "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2, "upscale_delay_s": 1, "downscale_delay_s": 2,
                           "look_back_period_s": 5},
           "limits": {"timeout_s": 10}}
    stable = deploy(project, app, direct=False)
    print(f"\nautoscaling: model logged and application deployed in {time.monotonic() - t_start:.1f} s")
    st = status("auto")
    assert len(running(st)) == 1 and len(st["replica_urls"]) == 1, st

    # 8 requests always in flight through Ray's proxy (it spreads them over the replicas), against a target of 2 a replica
    t0 = time.monotonic()
    with Load(stable, 8) as load:
        st, up_s = wait_for("scale up to 2 replicas", lambda: (len(running(s := status("auto"))) == 2, s["replicas"], dict(load.codes)),
                            UPSCALE_DEADLINE_S)
        st = status("auto")
        # both replicas are reported in full: id, pid, node, their own URL, and what each serves
        reps = running(st)
        assert len({r["id"] for r in reps}) == 2 and len({r["pid"] for r in reps}) == 2 and all(r["node"] for r in reps), reps
        assert len(st["replica_urls"]) == 2 and len(set(st["replica_urls"])) == 2, st["replica_urls"]
        served = wait_for("both replicas report what they serve", lambda: (len(x := status("auto")["serving"]) == 2, x), 15)[0][1]
        assert {x["replica"] for x in served} == {r["id"] for r in reps}
        assert all(x["arms"]["main"]["version"] for x in served), served
        assert {r["url"] for r in reps} == set(st["replica_urls"]), (reps, st["replica_urls"])
        for rep in reps:  # each replica answers on its own URL, and it is the replica status says it is
            assert httpx.get(f"{rep['url']}/-/status", timeout=30).json()["replica"] == rep["id"], rep
            r = httpx.post(f"{rep['url']}/predict", json=RECORD, headers={"x-request-id": f"direct-{rep['id']}"}, timeout=30)
            assert r.status_code == 200, (rep, r.status_code, r.text)
        time.sleep(1)
        loaded_s = time.monotonic() - t0
    codes = dict(load.codes)
    print(f"autoscaling: 2 replicas after {up_s:.1f} s of load; {sum(codes.values())} requests in {loaded_s:.1f} s: {codes}")
    assert codes.get(200, 0) > 50, codes
    assert set(codes) <= {200, 503}, codes  # only answers, or Ray's defined backpressure
    # Ray's proxy sent part of the load to the new replica: the audit log has load answers from both
    cli("audit", "compact")
    from ml_prod.audit.query import query
    from ml_prod.settings import load_settings
    df = query(load_settings().audit_dir, "auto", include_shadow=False)
    load_ok = df[(df.status == 200) & df.client_request_id.fillna("").str.startswith("load-")]  # the ids the load sent (schema 2)
    assert len(load_ok) == codes[200] and load_ok.replica.nunique() == 2, df.replica.value_counts()

    # no load: back to one replica
    st, down_s = wait_for("scale back down to 1 replica", lambda: (len((s := status("auto"))["replicas"]) == 1 and len(running(s)) == 1, s["replicas"]),
                          DOWNSCALE_DEADLINE_S, every_s=2)
    print(f"autoscaling: back to 1 replica {down_s:.1f} s after the load stopped")
    st = status("auto")
    assert len(st["replica_urls"]) == 1 and len(st["serving"]) == 1, st
    assert httpx.post(f"{st['replica_urls'][0]}/predict", json=RECORD, timeout=30).status_code == 200
    cli("serve", "down", "auto")


@pytest.mark.long  # beyond CI's time limit: `make test LONG=1`
def test_logs_prints_the_replicas_logs(project):
    log_version("logged")
    url = deploy(project, {"name": "logged", "arms": {"main": {"model": "models:/tiny@logged", "weight": 1}}, "num_cpus": 0.25,
                           "access_log": True})  # Ray's access line per request is off by default
    rid = "find-me-in-the-log"
    assert httpx.post(f"{url}/predict", json=RECORD, headers={"x-request-id": rid}, timeout=30).status_code == 200
    replica = status("logged")["replicas"][0]["id"]
    deadline, out = time.monotonic() + 20, ""
    while time.monotonic() < deadline and rid not in out:  # Ray's log handler writes the access line a moment later
        out = cli("serve", "logs", "logged").stdout
        time.sleep(1)
    assert rid in out, out[-3000:]
    assert replica in out, out[-3000:]  # the log file of the running replica
    assert "models:/tiny/" in out, out[-3000:]  # what the replica loaded, logged at start-up
    assert len(cli("serve", "logs", "logged", "-n", "3").stdout.splitlines()) == 4  # a header and 3 lines
    as_json = json.loads(cli("--json", "serve", "logs", "logged", "-n", "3").stdout)  # log file -> its last lines
    assert any(replica in path for path in as_json) and all(len(text.splitlines()) <= 3 for text in as_json.values()), as_json

    r = cli("serve", "logs", "nope", check=False)
    assert r.returncode != 0 and "No application 'nope' is deployed" in r.stderr and "logged" in r.stderr, (r.stdout, r.stderr)
    cli("serve", "down", "logged")
