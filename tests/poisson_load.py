"""An open-loop Poisson client for serving under faults, shared by tests/test_chaos_serving.py and bench/chaos_serving.py.

Requests arrive at exponential intervals at a fixed rate (open loop: a slow answer does not delay the next arrival),
each with its own id (`x-request-id`) and `x-attempt`; a request that gets no 2xx is retried at most twice, after
0.2 s and 0.4 s (plus up to 50 % jitter). Errors are counted on the first attempt ("without retries") and on the
last ("after retries"). `audit_check` counts the audit rows from the raw segment files on disk, never through
ml_prod's own query (which deduplicates)."""
from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from conftest import RECORD, raw_records

BACKOFF_S = (0.2, 0.4)  # before the first and the second retry


@dataclass
class Req:
    "One client request: its attempts' (status or exception name, answer, time received, headers of a non-2xx), when it was due and sent."
    cid: str
    due: float
    sticky: str | None = None
    attempts: list = field(default_factory=list)  # [(status|str, body dict|None, t_received, headers dict|None)]
    lag: float = 0.0
    t: float = 0.0  # when it was due, on the monotonic clock
    sent: float = 0.0  # when its first attempt was sent, on the monotonic clock

    @property
    def first_ok(self) -> bool: return _ok(self.attempts[0][0])
    @property
    def ok(self) -> bool: return bool(self.attempts) and _ok(self.attempts[-1][0])
    @property
    def answer(self) -> dict: return self.attempts[-1][1] if self.ok else {}


def _ok(code) -> bool: return isinstance(code, int) and 200 <= code < 300


async def _one(c, url: str, r: Req, timeout: float, record: dict):
    for attempt in (1, 2, 3):
        h = {"x-request-id": r.cid, "x-attempt": str(attempt), **({"x-sticky-key": r.sticky} if r.sticky else {})}
        if attempt == 1: r.sent = time.monotonic()
        try:
            resp = await c.post(url, json=record, headers=h, timeout=timeout)
            try: body = resp.json()
            except ValueError: body = None
            # the raw headers of a refusal (Retry-After); none kept for a 2xx, which 100,000-request runs are made of
            r.attempts.append((resp.status_code, body, time.monotonic(), None if _ok(resp.status_code) else dict(resp.headers)))
        except Exception as e:  # connection refused or reset, timeout: an error like a 5xx
            r.attempts.append((type(e).__name__, None, time.monotonic(), None))
        if r.ok or attempt == 3: return
        await asyncio.sleep(BACKOFF_S[attempt - 1] * (1 + random.random() / 2))


async def load(url: str, rate: float, stop, name: str, sticky_share=0.0, n_max=None, timeout=5.0, seed=0, record=RECORD,
               max_connections=512, max_pending=None) -> list[Req]:
    """Open-loop Poisson arrivals at `rate` per second to `url` until `stop()` is true (or `n_max` requests); every request's outcome.
    With `max_pending`, an arrival while that many requests are unfinished is not sent (its one attempt 'not sent'):
    a client that cannot keep up then sheds load instead of queueing it without end."""
    import httpx
    rng, reqs, tasks, pending = random.Random(seed), [], [], [0]
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=min(64, max_connections))) as c:
        t0 = due = time.monotonic()
        while not stop() and (n_max is None or len(reqs) < n_max):
            due += rng.expovariate(rate)
            if (wait := due - time.monotonic()) > 0: await asyncio.sleep(wait)
            key = f"key-{rng.randrange(200)}" if rng.random() < sticky_share else None
            r = Req(f"{name}-{len(reqs)}", due - t0, key, lag=max(0.0, -wait), t=due)
            reqs.append(r)
            if max_pending is not None and pending[0] >= max_pending:
                r.attempts.append(("not sent", None, time.monotonic(), None)); continue
            pending[0] += 1
            tasks.append(task := asyncio.create_task(_one(c, url, r, timeout, record)))
            task.add_done_callback(lambda _: pending.__setitem__(0, pending[0] - 1))
        await asyncio.gather(*tasks)
    return reqs


class Load:
    "`load` in a thread of its own: `with Load(url, rate, name) as l: ...`; `l.reqs` once the block ends (all answers in)."
    def __init__(self, url: str, rate: float, name: str, **kw):
        self.stop, self.reqs = threading.Event(), None
        self.thread = threading.Thread(target=self._run, args=(url, rate, name, kw), daemon=True)
        self.t0 = None

    def _run(self, url, rate, name, kw):
        self.reqs = asyncio.run(load(url, rate, self.stop.is_set, name, **kw))

    def __enter__(self):
        self.t0 = time.monotonic()
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(120)
        assert not self.thread.is_alive(), "the load's requests did not all end within 120 s"


def audit_check(audit_dir, app: str, reqs: list[Req], prefix: str) -> dict:
    """Raw primary 200 rows of `app` (client ids starting with `prefix`) vs the answered requests: answered, rows,
    missing, duplicated, extra (200 rows of attempts the client never saw answered), rows by server id."""
    rows = [x for x in raw_records(audit_dir, app)
            if x.get("status") == 200 and not x.get("shadow") and str(x.get("client_request_id") or "").startswith(prefix)]
    n = Counter(x["request_id"] for x in rows)
    answered = [r.answer.get("request_id") for r in reqs if r.ok]
    return dict(answered=len(answered), rows=len(rows), missing=sum(1 for a in answered if n[a] == 0),
                duplicated=sum(1 for a in answered if n[a] > 1), extra=len(set(n) - set(answered)), by_id={x["request_id"]: x for x in rows})


def pct(xs: list[float], q: float) -> float:
    "The `q` quantile of `xs` (the nearest rank below), NaN when empty."
    xs = sorted(xs)
    return xs[int(q * (len(xs) - 1))] if xs else float("nan")


def counts(reqs: list[Req]) -> dict:
    "Requests, errors on the first try (err0) and after the retries (err2) with their statuses, achieved rate, client lag p99."
    first = Counter(str(r.attempts[0][0]) for r in reqs if not r.first_ok)
    last = Counter(str(r.attempts[-1][0]) for r in reqs if not r.ok)
    span = max(r.due for r in reqs) if reqs else 0
    return dict(n=len(reqs), err0=sum(first.values()), err2=sum(last.values()), first=dict(first), last=dict(last),
                achieved=len(reqs) / span if span else 0, lag_p99=pct([r.lag for r in reqs], 0.99) if reqs else 0)


def load_avg() -> str: return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
