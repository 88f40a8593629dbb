"""The audit log's guarantees, checked on raw files: schema version 2 keys every record by the server's
id (the client's id is its own column), so no client (with or without a key) replaces the record of an
answered request; `x-attempt` is bounded; compaction never deletes a segment holding a record it
skipped (it goes to a quarantine file first); version 1 logs (`tests/fixtures/audit_v1`, written by
the version 1 code) stay readable; memory stays bounded with many segments; rejected requests cannot
grow the log at request rate; feedback batches are written whole or not at all; retention is applied;
a low disk is reported before it is full; API-key digests are salted.

The replica's request path runs in-process (`EndpointCore` with a real MLflow model saved to a
folder); no Ray, no port. Counts are taken from the segment files themselves, not from `query`."""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ml_prod.audit.writer import AuditWriter, FeedbackWriter, AuditError
from ml_prod.audit.store import compact
from ml_prod.audit.query import query, read_feedback, join_feedback

from conftest import raw_records

HERE = Path(__file__).parent
ONE = b'{"amount": 250.0, "country": "US"}'
T = 1735689600.0  # 2025-01-01T00:00:00Z


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import mlflow
    import pandas as pd
    from mlflow.models import infer_signature
    d = tmp_path_factory.mktemp("model") / "tiny"
    X = pd.DataFrame({"amount": [10.0, 250.0], "country": ["US", "FR"]})
    mlflow.pyfunc.save_model(d, python_model=str(HERE / "tiny_model.py"), signature=infer_signature(X, pd.DataFrame({"score": [0.1, 0.9]})),
                             input_example=X)
    return str(d)


def run(coro):
    return asyncio.get_event_loop_policy().get_event_loop().run_until_complete(coro)


def make_core(model_dir: str, audit_dir: Path, auth: dict | None = None, settings: dict | None = None, **audit):
    from ml_prod.serving.replica import EndpointCore
    audit = dict(dict(drop=[], hash=[]), **audit)
    args = dict(name="shop", limits=dict(max_records=10, max_body_bytes=4000, timeout_s=5), audit=audit,
                settings=dict(settings or {}, audit_dir=str(audit_dir)))
    core = EndpointCore(args, "r1")
    cfg = dict(arms={"main": dict(model=model_dir, pinned=model_dir, weight=1, shadow=False)}, sticky_key=None,
               decision=dict(threshold=0.5, positive="fraud", negative="legit", score=None),
               batching=dict(enabled=False), auth=auth or dict(required=False, digests=[]))
    run(core.reconfigure(cfg))
    return core


def close(core):
    core.batcher.close(); core.audit.close(); core.feedback_log.close()


# ---- defect 1: the server's id is the key ---------------------------------------------------------------------

def test_unauthenticated_attempt_never_replaces_answered_record(model_dir, tmp_path):
    from ml_prod.serving.replica import key_digest
    salt = "per-deployment-salt"
    core = make_core(model_dir, tmp_path, auth=dict(required=True, salt=salt, digests=[key_digest("s3cret", salt)]))
    st, body, _ = run(core.predict(ONE, {"x-api-key": "s3cret", "x-request-id": "victim"}))
    assert st == 200
    server_id = body["request_id"]
    assert server_id != "victim" and body["client_request_id"] == "victim", body
    # an attacker without a key replays the echoed id with a huge attempt number, then an in-range one
    st_big, _, _ = run(core.predict(ONE, {"x-request-id": "victim", "x-attempt": "9" * 30}))
    st_forged, _, _ = run(core.predict(ONE, {"x-request-id": "victim", "x-attempt": "99"}))
    st_server, _, _ = run(core.predict(ONE, {"x-request-id": server_id, "x-attempt": "99"}))
    assert (st_big, st_forged, st_server) == (400, 401, 401)
    close(core)
    raw = raw_records(tmp_path, "shop")
    answered = [r for r in raw if r["status"] == 200]
    assert len(answered) == 1 and answered[0]["request_id"] == server_id and answered[0]["schema_version"] == 2
    assert all(r["request_id"] != server_id for r in raw if r["status"] != 200), raw  # every attempt has its own server id
    assert len({r["request_id"] for r in raw}) == len(raw) == 4
    compact(tmp_path)
    df = query(tmp_path, "shop")
    assert df.set_index("request_id").loc[server_id, "status"] == 200
    assert sorted(df[df.client_request_id == "victim"].status) == [200, 400, 401]


def test_attempt_is_bounded(model_dir, tmp_path):
    from ml_prod.audit.writer import MAX_ATTEMPT
    core = make_core(model_dir, tmp_path)
    for bad in ["9" * 30, "0", "-1", "two", str(MAX_ATTEMPT + 1)]:
        st, body, _ = run(core.predict(ONE, {"x-attempt": bad}))
        assert st == 400 and f"x-attempt = {bad!r}" in body["error"], (bad, st, body)
    st, body, _ = run(core.predict(ONE, {"x-attempt": str(MAX_ATTEMPT), "x-request-id": "retry"}))
    assert st == 200
    close(core)
    raw = raw_records(tmp_path, "shop")
    assert [r["attempt"] for r in raw if r["status"] == 200] == [MAX_ATTEMPT]
    assert all(r["attempt"] == 1 for r in raw if r["status"] == 400)  # the bad header is not copied into the record
    with pytest.raises(AuditError, match="attempt"):
        AuditWriter(tmp_path, "w").write(request_id="x", status=200, attempt=2**63)


def test_raw_records_per_answered_request(model_dir, tmp_path):
    "Exactly one raw 200 record per answered request, before any compaction, also when clients reuse their ids."
    core = make_core(model_dir, tmp_path)
    answered = []
    for i in range(30):
        st, body, _ = run(core.predict(ONE, {"x-request-id": f"c-{i % 3}", "x-attempt": str(1 + i % 4)}))
        assert st == 200
        answered.append(body["request_id"])
    close(core)
    raw = [r for r in raw_records(tmp_path, "shop") if r["status"] == 200 and not r["shadow"]]
    from collections import Counter
    n = Counter(r["request_id"] for r in raw)
    assert len(answered) == len(set(answered)) == 30
    assert all(n[a] == 1 for a in answered) and set(n) == set(answered), n


def test_compaction_quarantines_what_it_skips(tmp_path):
    seg = tmp_path / "fraud" / "segments"
    seg.mkdir(parents=True)
    good = dict(schema_version=1, request_id="ok-1", attempt=1, ts=T, app="fraud", status=200, outcome="ok", shadow=False, replica="r0")
    huge = dict(good, request_id="huge-attempt", attempt=2**70)  # what a version 1 writer took from `x-attempt`
    far = dict(good, request_id="far-future", ts=1e11)
    lines = [json.dumps(good), json.dumps(huge), "{not json", json.dumps(far)]
    (seg / "r0-1.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning):
        s = compact(tmp_path)
    assert s.quarantined == 3, s
    q = b"".join(p.read_bytes() for p in (tmp_path / "fraud" / "quarantine").glob("*"))
    assert b"huge-attempt" in q and b"{not json" in q and b"far-future" in q
    assert not (seg / "r0-1.jsonl").exists()  # deleted only once its skipped lines are safe in the quarantine
    assert list(query(tmp_path, "fraud").request_id) == ["ok-1"]
    assert compact(tmp_path).quarantined == 0  # nothing quarantined twice


def test_version_1_log_stays_readable(tmp_path):
    ad = tmp_path / "audit"
    shutil.copytree(HERE / "fixtures" / "audit_v1", ad)
    assert {r["schema_version"] for r in raw_records(ad, "fraud")} == {1}
    def check():
        df = query(ad, "fraud").set_index("request_id")
        assert sorted(df.index) == ["v1-answered", "v1-compacted", "v1-compacted-2", "v1-other"], df
        assert df.loc["v1-answered", "status"] == 200  # the forged 401 (attempt 5) of version 1 does not win
        assert set(df.schema_version) == {1} and (df.client_request_id == df.index).all()
        j = join_feedback(ad, "fraud").set_index("request_id")
        assert j.loc["v1-compacted", "label"] == "1" and j.loc["v1-answered", "label"] == "0"
    check()
    s = compact(ad)
    assert s.records_read == 3 and s.quarantined == 0
    check()


# ---- defect 8: feedback -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [b'NaN', b'-1', b'1e11', b'"soon"'])
def test_feedback_batch_validated_before_writing(model_dir, tmp_path, bad):
    core = make_core(model_dir, tmp_path)
    body = b'[{"request_id": "a", "label": 1}, {"request_id": "b", "label": 0, "ts": ' + bad + b'}]'
    st, out, _ = run(core.feedback(body, {}))
    assert st == 422 and out["errors"][0]["loc"][:2] == [1, "ts"], out
    assert raw_records(tmp_path, "shop", "feedback-segments") == []  # not half-written
    assert run(core.feedback(b'[{"request_id": "a", "label": 1, "ts": %d}]' % int(time.time()), {}))[:2] == (200, {"stored": 1})
    close(core)
    read_feedback(tmp_path, "shop")  # reads still work
    compact(tmp_path)


def test_feedback_on_a_failing_disk_stores_nothing(tmp_path):
    "A write that fails part-way (here: the file size limit, as a full disk) leaves none of the batch."
    script = textwrap.dedent("""
        import resource, signal, sys, json
        from ml_prod.audit.writer import FeedbackWriter
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
        fw = FeedbackWriter(sys.argv[1], "shop", "r0")
        fw.write_batch([dict(request_id="first", label=1)])
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
        try: fw.write_batch([dict(request_id=f"b{i}", label=i) for i in range(100)]); print("WROTE")
        except OSError as e: print("FAILED", e.errno)
    """)
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert "FAILED" in r.stdout, r.stdout + r.stderr
    data = b"".join(p.read_bytes() for p in (tmp_path / "shop" / "feedback-segments").glob("*.jsonl"))
    assert data.count(b"\n") == 1 and data.endswith(b"\n") and b'"first"' in data and b'"b0"' not in data, data[-200:]


def test_feedback_answers_503_when_the_log_fails(model_dir, tmp_path):
    core = make_core(model_dir, tmp_path)
    assert run(core.feedback(b'{"request_id": "a", "label": 1}', {}))[0] == 200
    os.close(core.feedback_log._fd)  # what a failing disk looks like to the writer: os.write raises OSError
    st, out, headers = run(core.feedback(b'[{"request_id": "b", "label": 1}, {"request_id": "c", "label": 0}]', {}))
    assert st == 503 and "none of the 2 labels" in out["error"] and headers.get("retry-after"), out
    core.feedback_log._fd = None
    close(core)
    assert [r["request_id"] for r in raw_records(tmp_path, "shop", "feedback-segments")] == ["a"]


def test_oversized_body_is_audited(model_dir, tmp_path):
    from ml_prod.serving.app import _answer
    core = make_core(model_dir, tmp_path)
    sent = []
    async def send(m): sent.append(m)
    def receiver(chunks):
        it = iter(chunks)
        async def receive():
            c = next(it)
            return {"type": "http.request", "body": c, "more_body": c is not chunks[-1]}
        return receive
    run(_answer(receiver([b"x" * 3000, b"y" * 3000]), send, {}, 4000, core.predict, core.reject))                         # streamed
    run(_answer(receiver([b""]), send, {"content-length": "999999", "x-request-id": "big"}, 4000, core.predict, core.reject))  # declared
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [413, 413]
    close(core)
    raw = raw_records(tmp_path, "shop")
    assert [(r["status"], r["outcome"]) for r in raw] == [(413, "invalid")] * 2 and raw[1]["client_request_id"] == "big", raw


def test_oversized_feedback_is_audited_and_rate_limited(model_dir, tmp_path):
    "A /feedback body over max_body_bytes (declared or streamed) gets a rejected record, counted against the same rate limit."
    from ml_prod.serving.app import _answer
    core = make_core(model_dir, tmp_path, rejected_per_s=1, rejected_burst=5)
    sent = []
    async def send(m): sent.append(m)
    async def streamed():
        return {"type": "http.request", "body": b"[" + b" " * 5000, "more_body": True}  # never more than one chunk over the limit is read
    t0 = time.monotonic()
    for i in range(20):
        headers = {"content-length": "999999"} if i % 2 else {}
        run(_answer(streamed, send, {**headers, "x-request-id": f"fb-{i}"}, 4000, core.feedback, core.reject_feedback))
    elapsed = time.monotonic() - t0
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [413] * 20
    dropped = core.status()["audit"]["rejected_dropped"]
    close(core)
    raw = raw_records(tmp_path, "shop")
    assert all((r["status"], r["outcome"]) == (413, "invalid") and r["error"].startswith("/feedback:") for r in raw), raw
    assert 5 <= len(raw) <= 5 + elapsed + 1 and len(raw) + dropped == 20, (len(raw), dropped, elapsed)
    assert [r["client_request_id"] for r in raw[:5]] == [f"fb-{i}" for i in range(5)]
    assert raw_records(tmp_path, "shop", "feedback-segments") == []


# ---- defect 3: bounded growth, memory and disk --------------------------------------------------------------------

def test_rejected_requests_are_rate_limited(model_dir, tmp_path):
    from ml_prod.serving.replica import key_digest
    core = make_core(model_dir, tmp_path, auth=dict(required=True, salt="s", digests=[key_digest("k", "s")]),
                     rejected_per_s=5, rejected_burst=20)
    t0 = time.monotonic()
    codes = [run(core.predict(ONE, {"x-request-id": f"spam-{i}"}))[0] for i in range(500)]
    elapsed = time.monotonic() - t0
    assert set(codes) == {401}
    assert run(core.predict(ONE, {"x-api-key": "k"}))[0] == 200  # answered requests are always recorded
    dropped = core.status()["audit"]["rejected_dropped"]
    close(core)
    raw = raw_records(tmp_path, "shop")
    rejected = [r for r in raw if r["status"] == 401]
    assert len(rejected) <= 20 + 5 * elapsed + 1, (len(rejected), elapsed)
    assert len(rejected) + dropped == 500 and dropped > 0
    assert [r["status"] for r in raw if r["status"] == 200] == [200]


def test_rejected_records_name_their_fields_for_monitoring(model_dir, tmp_path):
    "A 422's record keeps the model's fields its errors name; monitoring's integrity counts them per feature, compacted or not."
    import pandas as pd
    from ml_prod.monitoring.drift import rejected_rows
    from ml_prod.monitoring.profile import build_profile
    from ml_prod.monitoring.window import read_window
    core = make_core(model_dir, tmp_path, rejected_per_s=1000, rejected_burst=1000)
    bad_amount, no_country = b'{"amount": "a lot", "country": "US"}', b'{"amount": 10.0}'
    both = b'[{"amount": 1.0, "country": "US"}, {"amount": null, "country": 7, "colour": "red"}]'
    sent = [ONE] * 150 + [bad_amount] * 6 + [no_country] * 3 + [both] * 2
    codes = [run(core.predict(b, {}))[0] for b in sent]
    close(core)
    assert codes.count(200) == 150 and codes.count(422) == 11
    raw = [r for r in raw_records(tmp_path, "shop") if r["status"] == 422]  # the files themselves
    assert sorted(tuple(r["outputs"]["rejected_fields"]) for r in raw) == [("amount",)] * 6 + [("amount", "country")] * 2 + [("country",)] * 3
    profile = build_profile(pd.DataFrame({"amount": [10.0, 250.0, 40.0] * 100, "country": ["US", "FR", "US"] * 100}))
    for compacted in (False, True):
        if compacted: compact(tmp_path)
        win = read_window(tmp_path, "shop")
        assert len(win.requests) == 161
        rows = rejected_rows(win.requests, profile).set_index("feature")
        assert rows.loc["amount", "value"] == pytest.approx(8 / 161) and rows.loc["country", "value"] == pytest.approx(5 / 161)
        assert rows.flagged.tolist() == [True, True]  # over 1% of 161 requests each


MEMORY = textwrap.dedent("""
    import json, sys, tracemalloc
    import pyarrow as pa
    from ml_prod.audit import store
    from ml_prod.audit.query import query
    root, what, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    store._BATCH_BYTES = 1  # one segment per batch: memory must not depend on how many there are
    T = 1735689600.0
    seg = f"{root}/fraud/segments"
    import os; os.makedirs(seg, exist_ok=True)
    pad = "x" * 200
    for i in range(n):  # one segment per day, 2000 records each
        with open(f"{seg}/r{i:04d}-1.jsonl", "w") as f:
            for j in range(2000):
                f.write(json.dumps(dict(schema_version=store.AUDIT_SCHEMA_VERSION, request_id=f"{i}-{j}", client_request_id=None, attempt=1, ts=T + i * 86400 + j,
                                        app="fraud", status=200, outcome="ok", shadow=False, replica="r", inputs={"p": pad})) + "\\n")
    if what == "compact-then-query":  # in another process: only the query is measured here
        import subprocess
        subprocess.run([sys.executable, "-c", f"from ml_prod.audit.store import compact; compact({root!r})"], check=True)
    tracemalloc.start()
    if what == "compact": store.compact(root)
    else: df = query(root, "fraud", start=T, end=T + 86400)
    py = tracemalloc.get_traced_memory()[1]
    print("PEAK", py + pa.default_memory_pool().max_memory())
""")


def peak(tmp_path, what: str, n: int) -> int:
    d = tmp_path / f"{what}-{n}"
    r = subprocess.run([sys.executable, "-c", MEMORY, str(d), what, str(n)], capture_output=True, text=True, timeout=600)
    lines = [l for l in r.stdout.splitlines() if l.startswith("PEAK ")]
    assert lines, r.stdout + r.stderr
    return int(lines[-1].split()[1])


@pytest.mark.parametrize("what", ["compact", "query", "compact-then-query"])
def test_memory_does_not_grow_with_segments(tmp_path, what):
    few, many = peak(tmp_path, what, 4), peak(tmp_path, what, 24)
    print(f"{what}: peak {few / 2**20:.1f} MiB with 4 segments, {many / 2**20:.1f} MiB with 24")
    assert many < 2 * few, (few, many)  # reading everything at once would take about 6 times as much


def test_apply_retention(tmp_path):
    from ml_prod.audit.store import apply_retention
    now = T + 40 * 86400
    with AuditWriter(tmp_path, "fraud", "r0") as w:
        for d in range(40): w.write(request_id=f"d{d}", status=200, ts=T + d * 86400 + 60)
    with AuditWriter(tmp_path, "keep", "r0") as w: w.write(request_id="old", status=200, ts=T)
    with FeedbackWriter(tmp_path, "fraud", "r0") as fw: fw.write("d0", 1, ts=T + 100); fw.write("d39", 1, ts=T + 39 * 86400)
    compact(tmp_path, now=now)
    with AuditWriter(tmp_path, "fraud", "r1") as w: w.write(request_id="late-old", status=200, ts=T + 60)  # a closed segment, not compacted
    os.utime(next((tmp_path / "fraud" / "segments").glob("r1-*.jsonl")), (T + 120, T + 120))
    days = lambda app, f="requests": sorted(p.name for p in (tmp_path / app / f).glob("date=*"))
    assert len(days("fraud")) == 40
    s = apply_retention(tmp_path, {"fraud": 30, "keep": None}, now=now)
    assert days("fraud") == [f"date={time.strftime('%Y-%m-%d', time.gmtime(T + d * 86400))}" for d in range(10, 40)], days("fraud")
    assert days("fraud", "feedback") == [f"date={time.strftime('%Y-%m-%d', time.gmtime(T + 39 * 86400))}"]
    assert len(days("keep")) == 1 and s.partitions_deleted == 10 + 1 and s.segments_deleted == 1
    assert not list((tmp_path / "fraud" / "segments").glob("*.jsonl"))
    assert sorted(query(tmp_path, "fraud").request_id)[:2] == ["d10", "d11"]
    with pytest.raises(AuditError, match="retention_days"):
        apply_retention(tmp_path, {"fraud": -1})


def test_low_disk_is_reported_before_it_is_full(model_dir, tmp_path):
    free = shutil.disk_usage(tmp_path).free
    with pytest.warns(UserWarning, match="free"):
        w = AuditWriter(tmp_path, "w", "r0", min_free_bytes=free * 2)
        w.write(request_id="a", status=200)
    assert "free" in w.space_warning and w.write(request_id="b", status=200)  # still writes: a warning, not a failure
    w.close()
    assert AuditWriter(tmp_path, "w2", "r0", min_free_bytes=1).space_warning is None
    core = make_core(model_dir, tmp_path, min_free_bytes=free * 2)
    with pytest.warns(UserWarning): run(core.predict(ONE, {}))
    assert "free" in core.status()["audit"]["space_warning"]
    close(core)


# ---- defect 8: salted key digests ----------------------------------------------------------------------------------

def test_api_key_digests_are_salted():
    from ml_prod.serving.replica import authorized, key_digest
    plain = hashlib.sha256(b"k1").hexdigest()
    a, b = key_digest("k1", "salt-a"), key_digest("k1", "salt-b")
    assert plain not in (a, b) and a != b
    assert authorized({"x-api-key": "k1"}, [a], "salt-a") and not authorized({"x-api-key": "k1"}, [a], "salt-b")
    assert authorized({"authorization": "Bearer k1"}, [b], "salt-b") and not authorized({"x-api-key": "k2"}, [a], "salt-a")
    assert authorized({"x-api-key": "k1"}, [plain], "")  # a config built before salting (no salt) still works until its next update


# ---- the audit salt of the embedded profile -------------------------------------------------------------------------

def hmac_of(salt: str, value) -> str:
    "The hashed field's value as written by an HMAC-SHA256 of the value's canonical JSON under `salt` (computed here, not by ml_prod)."
    import hmac
    return "hmac-sha256:" + hmac.new(salt.encode(), json.dumps(value, sort_keys=True, separators=(",", ":")).encode(), hashlib.sha256).hexdigest()


def test_audit_salt_from_the_serve_up_environment(model_dir, project_dir, tmp_path, monkeypatch):
    """$ML_PROD_AUDIT_SALT set where `serve up` runs on the embedded profile, and not listed in $ML_PROD_CLUSTER_ENV, is the salt
    the replicas hash with: they get it as an owner-only file in the state folder (as they get the default salt), never its
    value in the Serve config, nor in the environment `cluster up` hands Ray."""
    import secrets
    from ml_prod.runtime.cluster import cluster_env
    from ml_prod.serving.control import replica_settings
    from ml_prod.settings import load_settings
    salt = secrets.token_hex(16)
    monkeypatch.setenv("ML_PROD_AUDIT_SALT", salt)
    s = load_settings()
    settings = replica_settings(s)  # what `serve up` puts into the Serve config for the replicas
    assert salt not in json.dumps(settings) and "ML_PROD_AUDIT_SALT" not in cluster_env(s)
    monkeypatch.delenv("ML_PROD_AUDIT_SALT")  # the replica's process: its cluster was started without the salt
    core = make_core(model_dir, tmp_path / "audit", settings={k: v for k, v in settings.items() if k.startswith("audit_salt")},
                     hash=["country"])
    st, body, _ = run(core.predict(ONE, {}))
    assert st == 200, body
    close(core)
    [rec] = raw_records(tmp_path / "audit", "shop")
    assert rec["inputs"][0]["country"] == hmac_of(salt, "US"), rec["inputs"]
    holding = [p for p in Path(s.state_dir).rglob("*") if p.is_file() and salt.encode() in p.read_bytes()]
    assert len(holding) == 1 and holding[0].stat().st_mode & 0o777 == 0o600, holding  # one owner-only file holds it
