"""Serving against the real thing: `ml_prod serve up` starts the project's persistent local Ray with
direct ingress, deploys a spec, and requests go over HTTP to the application's stable address (its shared
port) or to a replica's own port. The cluster is the
session's shared one (conftest's `project`); each test deploys its own application.

Models are tiny MLflow models logged from code (`tiny_model.py`) and registered in the project's
SQLite registry, so aliases, versions and the promotion path are the real ones."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import RECORD, cli, deploy, log_version, ray_deployed, raw_project, raw_records, status, wait_for


def answered_once(raw: list[dict], answered: list[str]) -> dict:
    "The answered request ids whose number of raw primary 200 records is not exactly 1, with that number."
    from collections import Counter
    n = Counter(r["request_id"] for r in raw if r["status"] == 200 and not r["shadow"])
    return {a: n[a] for a in answered if n[a] != 1}


def set_alias(alias: str, version: int):
    from ml_prod.models.registry import set_alias as move
    from ml_prod.settings import load_settings
    move(load_settings(), "tiny", alias, version, reason="test")


@pytest.mark.solo  # zero errors or exact figures under load: run while no other test does
def test_request_path_update_and_audit(project):
    v1 = log_version("champion")
    v2 = log_version("candidate", offset=0.5)
    url = deploy(project, {"name": "fraud", "arms": {"champion": {"model": "models:/tiny@champion", "weight": 1},
                                                     "canary": {"model": "models:/tiny@candidate", "weight": 0},
                                                     "shadow": {"model": "models:/tiny@candidate", "shadow": True}},
                           "decision": {"threshold": 0.5, "positive": "fraud", "negative": "legit"},
                           "limits": {"max_records": 5, "max_body_bytes": 2000, "timeout_s": 5}}, direct=False)
    assert url.startswith("http://127.0.0.1:") and url == status("fraud")["url"] != status("fraud")["replica_urls"][0]  # the stable address
    c = httpx.Client(base_url=url, timeout=10)

    # one record, a list, the request id echoed
    r = c.post("/predict", json=RECORD, headers={"x-request-id": "first-request"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["decision"], body["version"], body["arm"], body["model"]) == ("fraud", str(v1), "champion", "tiny")
    assert r.headers["x-request-id"] == "first-request" and body["client_request_id"] == "first-request"
    first = body["request_id"]  # the server's id of this attempt: the audit record's key
    assert len(first) == 32 and first != "first-request"
    r = c.post("/predict", json=[RECORD, {"amount": 1.0, "country": "FR"}])
    assert r.json()["decisions"] == ["fraud", "legit"]

    # bad input: 4xx naming the field, never a 500, never the model
    cases = [(b'{"amount": 1', 400), (b'"text"', 400), (b'{"amount": "lots", "country": "US"}', 422), (b'{"amount": 1.0}', 422),
             (b'{"amount": 1.0, "country": "US", "extra": 1}', 422), (b'{"amount": NaN, "country": "US"}', 422),
             (b'{"amount": Infinity, "country": "US"}', 422), (b'[]', 422), (json.dumps([RECORD] * 6).encode(), 413),
             (json.dumps({"amount": 1.0, "country": "x" * 3000}).encode(), 413)]
    for body_bytes, want in cases:
        r = c.post("/predict", content=body_bytes, headers={"content-type": "application/json"})
        assert r.status_code == want, (body_bytes[:60], r.status_code, r.text)
    r = c.post("/predict", json={"amount": "lots", "country": "US", "extra": 1})
    assert sorted(e["loc"][0] for e in r.json()["errors"]) == ["amount", "extra"]

    # OpenAPI carries the record schema of the model's signature
    schema = c.get("/openapi.json").json()["components"]["schemas"]["Record"]
    assert set(schema["properties"]) == {"amount", "country"} and schema["additionalProperties"] is False

    # zero-downtime update: load never stops while the alias moves to v2
    answers, answered_ids, stop = [], [], threading.Event()
    def load():
        with httpx.Client(base_url=url, timeout=10) as lc:
            while not stop.is_set():
                try:
                    r = lc.post("/predict", json=RECORD)
                    answers.append((r.status_code, r.json().get("version")))
                    if r.status_code == 200: answered_ids.append(r.json()["request_id"])
                except httpx.HTTPError as e: answers.append((type(e).__name__, None))
    t = threading.Thread(target=load); t.start()
    time.sleep(1)
    set_alias("champion", v2)
    cli("serve", "update", "fraud")
    time.sleep(1)
    stop.set(); t.join()
    assert len(answers) > 50 and {s for s, _ in answers} == {200}, {s for s, _ in answers}
    versions = [v for _, v in answers]
    assert set(versions) == {str(v1), str(v2)} and versions[-1] == str(v2)
    assert versions.index(str(v2)) > 0 and str(v1) not in versions[versions.index(str(v2)):]  # no flapping back

    # a version that fails its health check never takes traffic
    v3 = log_version("champion", broken=True)
    r = cli("serve", "update", "fraud", check=False)
    assert r.returncode != 0 and "failed its health check" in r.stderr, r.stderr
    assert c.post("/predict", json=RECORD).json()["version"] == str(v2)
    st = status("fraud")
    assert st["last_refusal"] is not None and st["serving"][0]["arms"]["champion"]["version"] == str(v2)

    # weights change in place; the canary takes a share
    set_alias("champion", v1)
    cli("serve", "update", "fraud", "--weight", "canary=1")
    arms = {c.post("/predict", json=RECORD).json()["arm"] for _ in range(60)}
    assert arms == {"champion", "canary"}
    assert cli("serve", "update", "fraud", "--weight", "nope=1", check=False).returncode != 0

    # API keys: configured keys are required from the next update on
    cli("serve", "update", "fraud", env={"ML_PROD_API_KEY": "k-123"})
    assert c.post("/predict", json=RECORD).status_code == 401
    assert c.post("/predict", json=RECORD, headers={"x-api-key": "k-123"}).status_code == 200

    # revert returns to the previous versions and pins them; auth stays on although this shell has no keys
    cli("serve", "revert", "fraud")
    st = status("fraud")
    assert st["arms"]["champion"]["pinned"] == f"models:/tiny/{v2}" and st["pinned"] is True
    assert c.post("/predict", json=RECORD).status_code == 401

    # an alias move (here back to the broken v3) waits while the application is pinned; `serve follow` then tries it, and it is refused
    r = cli("models", "rollback", "tiny", "--alias", "champion")
    assert f"-> {v3}" in r.stdout, r.stdout
    assert [m["now"] for m in status("fraud")["pending"]] == [f"models:/tiny/{v3}"]
    r = cli("serve", "follow", "fraud", check=False)
    assert r.returncode == 1 and "failed its health check" in r.stderr, r.stderr
    assert c.post("/predict", json=RECORD, headers={"x-api-key": "k-123"}).json()["version"] == str(v2)
    r = cli("models", "rollback", "tiny", "--alias", "champion")  # undoes the move to v3: back to v2, which is served
    assert f"-> {v2}" in r.stdout and status("fraud")["pending"] == [], r.stdout

    # with keys required, the status and OpenAPI pages need one too; /healthz says only whether a model is loaded
    assert [c.get(p).status_code for p in ("/-/status", "/docs", "/openapi.json")] == [401] * 3
    assert c.get("/-/status", headers={"x-api-key": "k-123"}).status_code == 200 and c.get("/healthz").status_code == 200

    # feedback, then the audit log: every answered request once, shadow answers recorded apart
    ok = c.post("/predict", json=RECORD, headers={"x-api-key": "k-123", "x-request-id": "labelled"})
    assert ok.status_code == 200
    labelled = ok.json()["request_id"]
    # someone without a key replays the echoed ids with a high attempt: its own records, never a replacement
    for rid in ("labelled", labelled):
        assert c.post("/predict", json=RECORD, headers={"x-request-id": rid, "x-attempt": "99"}).status_code == 401
    assert c.post("/predict", json=RECORD, headers={"x-api-key": "k-123", "x-attempt": "9" * 30}).status_code == 400
    assert c.post("/feedback", json={"request_id": "labelled", "label": 1}, headers={"x-api-key": "k-123"}).json() == {"stored": 1}
    from ml_prod.audit.query import join_feedback, query, read_feedback
    from ml_prod.settings import load_settings
    s = load_settings()
    raw = raw_records(s.audit_dir, "fraud")  # the segment files, before compaction: one raw record per answered request
    answered_ids += [first, labelled]
    assert len(answered_ids) > 50 and not answered_once(raw, answered_ids), answered_once(raw, answered_ids)
    assert len({r["request_id"] for r in raw if not r["shadow"]}) == len([r for r in raw if not r["shadow"]])  # one key per attempt
    assert [r["status"] for r in raw if r["client_request_id"] == "labelled" and not r["shadow"]] == [200, 401]
    assert len([r for r in raw if r["status"] == 413]) == 2  # too many records, and a body over max_body_bytes (refused before reading it)
    cli("audit", "compact")
    df = query(s.audit_dir, "fraud", include_shadow=False)
    assert {first, labelled} <= set(df.request_id) and df.set_index("request_id").loc[labelled, "status"] == 200
    assert {"first-request", "labelled"} <= set(df.client_request_id)
    assert set(df[df.status == 200].request_id) >= set(answered_ids)
    assert set(df.outcome) >= {"ok", "invalid", "unauthorized"}
    j = join_feedback(s.audit_dir, "fraud", include_shadow=False)
    assert j.set_index("request_id").loc[labelled, "label"] == "1"  # the label sent with the client's id joins its answered attempt, not the 401s
    shadows = query(s.audit_dir, "fraud", include_shadow=True).query("shadow")
    assert len(shadows) > 0 and set(shadows.arm) == {"shadow"}
    assert "labelled" in set(read_feedback(s.audit_dir, "fraud").request_id)
    assert "k-123" not in "".join(p.read_text(errors="ignore") for p in Path(s.audit_dir).rglob("*.jsonl"))


@pytest.mark.solo  # zero errors or exact figures under load: run while no other test does
def test_overload_is_503_and_recovers(project):
    v = log_version("slow", delay=0.2)
    url = deploy(project, {"name": "slow", "arms": {"main": {"model": "models:/tiny@slow", "weight": 1}},
                           "max_ongoing_requests": 2, "max_queued_requests": 2, "batching": {"enabled": False}})
    def hit(_):
        try: return httpx.post(f"{url}/predict", json=RECORD, timeout=30)
        except httpx.HTTPError as e: return e
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(24) as ex: results = list(ex.map(hit, range(24)))
    codes = sorted(r.status_code if isinstance(r, httpx.Response) else type(r).__name__ for r in results)
    assert 200 in codes and (503 in codes or 429 in codes) and 500 not in codes, codes
    assert all(r.headers.get("retry-after") for r in results if isinstance(r, httpx.Response) and r.status_code in (429, 503)), codes
    time.sleep(1)
    assert httpx.post(f"{url}/predict", json=RECORD, timeout=30).status_code == 200  # recovered by itself
    cli("serve", "down", "slow")


@pytest.mark.solo  # zero errors or exact figures under load: run while no other test does
def test_killed_replica_loses_no_answered_record(project):
    """Two replicas behind the stable address (their shared port), one killed with kill -9 under load: every request is
    answered within 2 retries, the replacement listens on the same port, and every answered request has exactly one raw
    audit record."""
    log_version("steady")
    url = deploy(project, {"name": "steady", "arms": {"main": {"model": "models:/tiny@steady", "weight": 1}}, "replicas": 2, "num_cpus": 0.25},
                 direct=False)
    def spread() -> set:  # replicas answering on the shared port, a new connection each time: the kernel spreads connections
        return {httpx.get(f"{url}/-/status", timeout=30).json()["replica"] for _ in range(40)}
    before = status("steady")["replicas"]
    assert spread() == {r["id"] for r in before}, before
    answered, failed, errors, stop = [], [], [], threading.Event()
    def load():
        with httpx.Client(base_url=url, timeout=5) as c:
            i = 0
            while not stop.is_set():
                i += 1
                for attempt in range(3):  # the first try and at most 2 retries, with backoff
                    try:
                        r = c.post("/predict", json=RECORD, headers={"x-request-id": f"k-{threading.get_ident()}-{i}", "x-attempt": str(attempt + 1)})
                        if r.status_code == 200: answered.append(r.json()["request_id"]); break  # the server's id
                        errors.append(r.status_code)
                    except httpx.HTTPError as e: errors.append(type(e).__name__)
                    time.sleep(0.05 * 2 ** attempt)
                else: failed.append(i)
    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads: t.start()
    time.sleep(2)
    killed = before[0]
    os.kill(killed["pid"], signal.SIGKILL)
    time.sleep(3)
    stop.set()
    for t in threads: t.join()
    print(f"\n{len(answered)} answered, {len(failed)} failed after 2 retries; first-try errors (connection resets included): {errors}")
    assert len(answered) > 20 and not failed, (len(answered), failed, errors)
    # the replacement binds the same port and takes its share of new connections
    after = wait_for(lambda: (r := [x for x in status("steady")["replicas"] if x["state"] == "RUNNING"]) and len(r) == 2 and r, timeout=90, every=1)
    assert killed["id"] not in {r["id"] for r in after}
    assert wait_for(lambda: spread() == {r["id"] for r in after}, timeout=30, every=1)
    from ml_prod.audit.query import query
    from ml_prod.settings import load_settings
    raw = raw_records(load_settings().audit_dir, "steady")  # before compaction: every answered request has exactly one raw record
    wrong = answered_once(raw, answered)
    assert not wrong, f"{len(wrong)} answered requests have not exactly one raw audit record, e.g. {sorted(wrong.items())[:5]}"
    cli("audit", "compact")
    df = query(load_settings().audit_dir, "steady", include_shadow=False)
    ok = df[df.status == 200]
    missing = set(answered) - set(ok.request_id)
    assert not missing, f"{len(missing)} answered requests have no audit record, e.g. {sorted(missing)[:5]}"
    cli("serve", "down", "steady")


def test_oversized_feedback_is_audited(project):
    "A `/feedback` body over max_body_bytes, declared or streamed, is answered 413 with a rejected record like a prediction's, and no label."
    log_version("labels")
    url = deploy(project, {"name": "labels", "arms": {"main": {"model": "models:/tiny@labels", "weight": 1}},
                           "num_cpus": 0, "limits": {"max_body_bytes": 2000}})  # no CPU reserved: the module's earlier apps hold both
    big = json.dumps([{"request_id": f"r{i}", "label": 1} for i in range(200)]).encode()
    def streamed():  # no content-length: chunked, so the replica finds out only while it reads
        for i in range(0, len(big), 500): yield big[i:i + 500]
    with httpx.Client(base_url=url, timeout=30) as c:
        declared = c.post("/feedback", content=big, headers={"content-type": "application/json", "x-request-id": "fb-declared"})
        chunked = c.post("/feedback", content=streamed(), headers={"content-type": "application/json", "x-request-id": "fb-streamed"})
        small = c.post("/feedback", json={"request_id": "r0", "label": 1}, headers={"x-request-id": "fb-small"})
        too_big = c.post("/predict", content=b" " * 3000, headers={"content-type": "application/json", "x-request-id": "pr-big"})
    assert "content-length" not in chunked.request.headers and chunked.request.headers.get("transfer-encoding") == "chunked"
    assert [declared.status_code, chunked.status_code, small.status_code, too_big.status_code] == [413, 413, 200, 413], declared.text
    from ml_prod.settings import load_settings
    audit_dir = Path(load_settings().audit_dir)
    raw = {r["client_request_id"]: r for r in raw_records(audit_dir, "labels")}  # the segment files themselves
    assert sorted(raw) == ["fb-declared", "fb-streamed", "pr-big"], sorted(raw)
    shape = lambda r: sorted(k for k, v in r.items() if v not in (None, False))  # the fields a rejected record fills in
    for cid in ("fb-declared", "fb-streamed"):
        r = raw[cid]
        assert (r["status"], r["outcome"], r["app"], r["schema_version"]) == (413, "invalid", "labels", 2), r
        assert "/feedback" in r["error"] and r["request_id"] != cid and len(r["request_id"]) == 32, r
        assert shape(r) == shape(raw["pr-big"]) and r.keys() == raw["pr-big"].keys(), (r, raw["pr-big"])
    labels = [json.loads(l) for p in (audit_dir / "labels" / "feedback-segments").glob("*.jsonl") for l in p.read_text().splitlines() if l]
    assert [x["request_id"] for x in labels] == ["r0"]  # none of the oversized batches was stored
    cli("serve", "down", "labels")


def test_audit_salt_from_the_serve_up_environment(project):
    """$ML_PROD_AUDIT_SALT in the environment of `ml_prod serve up` (not listed in ML_PROD_CLUSTER_ENV) is the salt the
    replicas hash audit fields with; the state folder holds it in one owner-only file, Ray's Serve config nowhere."""
    import hashlib, hmac, secrets
    from ml_prod.settings import load_settings
    salt = secrets.token_hex(16)
    log_version("salted")
    url = deploy(project, {"name": "salted", "arms": {"main": {"model": "models:/tiny@salted", "weight": 1}}, "num_cpus": 0,
                           "audit": {"hash": ["country"]}}, env={"ML_PROD_AUDIT_SALT": salt})
    r = httpx.post(f"{url}/predict", json=RECORD, headers={"x-request-id": "salted-1"}, timeout=30)
    assert r.status_code == 200, r.text
    s = load_settings()
    [rec] = [x for x in raw_records(s.audit_dir, "salted") if x["client_request_id"] == "salted-1"]
    want = "hmac-sha256:" + hmac.new(salt.encode(), json.dumps("US").encode(), hashlib.sha256).hexdigest()
    assert rec["inputs"] == [{"amount": 250.0, "country": want}], rec["inputs"]
    from ml_prod.runtime.cluster import _temp_dir
    def holding(root):
        out = []
        for p in Path(root).rglob("*"):
            try:
                if p.is_file() and not p.is_symlink() and salt.encode() in p.read_bytes(): out.append(p)
            except OSError: pass
        return out
    in_state = holding(s.state_dir)  # MLflow's database (the served history holds each applied config), the salt files
    assert len(in_state) == 1 and in_state[0].stat().st_mode & 0o777 == 0o600, in_state
    assert holding(_temp_dir(s)) == []  # Ray's session folder: the Serve config in its logs, the processes' logs
    cli("serve", "down", "salted")


@pytest.mark.slow
def test_built_config_runs_under_rays_own_serve_deploy(tmp_path, monkeypatch):
    "`ml_prod serve build` writes a Ray Serve config that Ray's own `serve deploy` runs, answering like `serve up`."
    import math
    root, gcs, dashboard = raw_project(tmp_path, monkeypatch)
    version = log_version("champion")
    spec = root / "spec.yaml"
    spec.write_text(yaml.safe_dump({"applications": [{"name": "built", "arms": {"main": {"model": "models:/tiny@champion", "weight": 1}}}]}))
    r = cli("serve", "build", str(spec), "-o", "serve_config.yaml")
    assert "RAY_SERVE_THROUGHPUT_OPTIMIZED=1" in r.stderr  # says what the cluster's processes need
    built = yaml.safe_load((root / "serve_config.yaml").read_text())
    assert built["applications"][0]["deployments"][0]["user_config"]["arms"]["main"]["pinned"] == f"models:/tiny/{version}"

    with ray_deployed(gcs, dashboard, num_cpus=1) as st:
        url = st["replica_urls"][0]
        body = httpx.post(f"{url}/predict", json=RECORD, timeout=30).json()
        assert body["version"] == str(version) and body["decision"] == "positive"
        assert math.isclose(body["score"], 1 / (1 + math.exp(-1.5)), rel_tol=1e-6)
        assert httpx.post(f"{url}/predict", json={"amount": "x", "country": "US"}, timeout=30).status_code == 422
