"""Separate steps against the real thing: a spec whose pre/post steps are objects runs them as
deployments of their own, next to `Endpoint`, on the project's persistent local Ray (`ml_prod serve
up`) and under Ray's own `serve deploy`. Requests go over HTTP; the steps (tests/step_functions.py)
note the process they ran in, so the tests see that a separate step runs in another replica.

Helpers and the `project` fixture (the session's shared cluster) come from conftest.py."""
from __future__ import annotations

import math
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import HERE, RECORD, cli, deploy, log_version, ray_deployed, raw_project, status, step_log

TIMEOUT_S = 2


def app_spec(name: str) -> dict:
    "A fused pre step, then a separate one; a separate post step. Small CPU shares: the local cluster has 2 CPUs."
    return {"name": name, "arms": {"main": {"model": "models:/tiny@champion", "weight": 1}}, "num_cpus": 0.5,
            "preprocess": ["step_functions:double", {"step": "step_functions:enrich", "num_cpus": 0.25, "replicas": 1, "max_ongoing_requests": 16}],
            "postprocess": [{"step": "step_functions:halve", "num_cpus": 0.25}],
            "limits": {"timeout_s": TIMEOUT_S}}


def expected_score(amount: float) -> float:
    "tiny's score after double, then enrich (+100), then halve."
    return 1 / (1 + math.exp(-((amount * 2 + 100) / 100 - 1))) / 2


def pids(folder: Path, step: str) -> set[int]:
    "The processes that ran `step` (from the files the steps leave)."
    return {int(p.name.rsplit("-", 1)[1]) for p in folder.glob(f"{step}-*")}


@pytest.fixture
def step_env(serving_project, monkeypatch):
    """tests/ importable by the cluster's processes, and an empty folder where the steps note their pid; both set before the
    cluster starts. The session's shared cluster was started with both (conftest's `cluster_env`, the same folder); a cluster
    a test starts itself (`ray_deployed`) gets them from this environment. Emptied here: the tests run one after the other."""
    log = step_log(serving_project)
    for f in log.iterdir(): f.unlink()
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])]))
    monkeypatch.setenv("STEP_TEST_LOG", str(log))
    return log


@pytest.mark.slow
@pytest.mark.long  # beyond CI's time limit: `make test LONG=1`
def test_separate_step_runs_under_rays_own_serve_deploy(tmp_path, monkeypatch, step_env):
    "`ml_prod serve build` of a spec with separate steps: Ray's `serve deploy` runs the step deployments, and the answer is right."
    root, gcs, dashboard = raw_project(tmp_path, monkeypatch)
    log_version("champion")
    spec = root / "spec.yaml"
    spec.write_text(yaml.safe_dump({"applications": [app_spec("built-steps")]}))
    cli("serve", "build", str(spec), "-o", "serve_config.yaml")
    built = yaml.safe_load((root / "serve_config.yaml").read_text())["applications"][0]
    assert [d["name"] for d in built["deployments"]] == ["Endpoint", "pre_enrich", "post_halve"]

    with ray_deployed(gcs, dashboard, num_cpus=2) as st:
        step_pids = {x["deployment"]: {r["pid"] for r in x["replicas"]} for x in st["steps"]}
        assert {n: len(p) for n, p in step_pids.items()} == {"pre_enrich": 1, "post_halve": 1}, st["steps"]
        body = httpx.post(f"{st['replica_urls'][0]}/predict", json=RECORD, timeout=30).json()
        assert math.isclose(body["score"], expected_score(RECORD["amount"]), rel_tol=1e-6), body
        assert pids(step_env, "enrich") == step_pids["pre_enrich"] and pids(step_env, "halve") == step_pids["post_halve"]
        assert st["replicas"][0]["pid"] not in step_pids["pre_enrich"]


@pytest.mark.long  # beyond CI's time limit: `make test LONG=1`
def test_separate_steps_run_in_their_own_replicas(project, step_env):
    version = log_version("champion")
    url = deploy(project, app_spec("stepped"))
    c = httpx.Client(base_url=url, timeout=30)
    st = status("stepped")
    step_pids = {x["deployment"]: {r["pid"] for r in x["replicas"]} for x in st["steps"]}
    endpoint_pid = st["replicas"][0]["pid"]
    assert set(step_pids) == {"pre_enrich", "post_halve"} and all(len(p) == 1 for p in step_pids.values()), st["steps"]
    assert "step pre_enrich" in cli("serve", "status").stdout
    logs = cli("serve", "logs", "stepped", env={"COLUMNS": "1000"}).stdout  # no wrapped paths
    assert "replica_stepped_pre_enrich_" in logs and "replica_stepped_Endpoint_" in logs  # the steps' replica logs too

    # the right answer, steps in spec order: double (fused), enrich (+100, own replica), model, halve (own replica)
    r = c.post("/predict", json=RECORD, headers={"x-request-id": "step-ok"})
    assert r.status_code == 200, r.text
    assert math.isclose(r.json()["score"], expected_score(RECORD["amount"]), rel_tol=1e-6) and r.json()["version"] == str(version)
    r = c.post("/predict", json=[RECORD, {"amount": 1.0, "country": "FR"}])
    assert all(math.isclose(s, expected_score(a), rel_tol=1e-6) for s, a in zip(r.json()["scores"], [RECORD["amount"], 1.0]))

    # each step ran where `serve status` says its replica is, not in the endpoint's process; the fused one did
    assert pids(step_env, "enrich") == step_pids["pre_enrich"] and pids(step_env, "halve") == step_pids["post_halve"]
    assert pids(step_env, "double") == {endpoint_pid} and endpoint_pid not in step_pids["pre_enrich"] | step_pids["post_halve"]

    # a failing step: 502 naming it; the endpoint lives on
    r = c.post("/predict", json={"amount": 1.0, "country": "FAIL"}, headers={"x-request-id": "step-broken"})
    assert r.status_code == 502 and "step step_functions:enrich (deployment pre_enrich) failed: ValueError: enrich refuses country FAIL" in r.json()["error"], r.text

    # a slow step: 504 at timeout_s, while the step's replica keeps answering others (the step runs in a thread, off its event loop)
    slow: list = []
    t = threading.Thread(target=lambda: slow.append(httpx.post(f"{url}/predict", json={"amount": 1.0, "country": "SLOW"},
                                                               headers={"x-request-id": "step-slow"}, timeout=30)))
    t0 = time.time(); t.start()
    time.sleep(0.3)
    fast_t = time.time()
    fast = c.post("/predict", json=RECORD)
    fast_s = time.time() - fast_t
    t.join()
    assert fast.status_code == 200 and fast_s < 1.5, (fast.status_code, fast_s)
    assert slow[0].status_code == 504 and "did not answer within this endpoint's timeout of 2" in slow[0].json()["error"], slow[0].text
    assert TIMEOUT_S - 0.1 < time.time() - t0 < TIMEOUT_S + 2.5
    assert status("stepped")["replicas"][0]["pid"] == endpoint_pid  # no failure took the endpoint down

    # the step's replica dies: defined answers (503/504) until Ray has replaced it, then 200 again; never a 500 or a dropped connection
    os.kill(next(iter(step_pids["pre_enrich"])), signal.SIGKILL)
    codes, deadline = [], time.time() + 90
    while time.time() < deadline:
        codes.append(c.post("/predict", json=RECORD).status_code)
        if codes[-1] == 200: break
        time.sleep(0.2)
    print("answers while the step's replica was replaced:", {c: codes.count(c) for c in set(codes)})
    assert codes[-1] == 200 and set(codes) <= {200, 503, 504}, codes
    new = {x["deployment"]: {r["pid"] for r in x["replicas"]} for x in status("stepped")["steps"]}["pre_enrich"]
    assert new and not new & step_pids["pre_enrich"]

    # an in-place update (new weights) leaves the step deployments as they are
    cli("serve", "update", "stepped", "--weight", "main=2")
    after = status("stepped")
    assert {x["deployment"]: {r["pid"] for r in x["replicas"]} for x in after["steps"]}["post_halve"] == step_pids["post_halve"]
    assert after["arms"]["main"]["weight"] == 2 and c.post("/predict", json=RECORD).status_code == 200

    # every attempt has its audit record, with the outcome of its answer
    cli("audit", "compact")
    from ml_prod.audit.query import query
    from ml_prod.settings import load_settings
    df = query(load_settings().audit_dir, "stepped", include_shadow=False).set_index("client_request_id")  # the ids these requests were sent with (the key is the server's own)
    assert (df.loc["step-ok", "status"], df.loc["step-broken", "outcome"], df.loc["step-slow", "outcome"]) == (200, "error", "timeout")
    assert "enrich refuses country FAIL" in df.loc["step-broken", "error"]
    assert len(df) >= 6 + len(codes)
    cli("serve", "down", "stepped")
