"""What serving trusts, and what it does when a version is bad.

* Only registry versions (`models:/`) are served unless an application opts in to other URIs.
* Each pinned version's content digest is recorded when the config is built or updated; a replica
  refuses a version whose files changed since (tampered on disk), and a replacement replica falls back
  to the arm's last good version instead of failing to start.
* The operator's CLI checks a new version in a child process (pre-flight with a timeout), never in its own.
* A model logged without an input example is scored on records synthesized from its signature before
  it takes traffic.
* `serve up` / `serve update` wait for every replica's verdict and re-apply the previous configuration
  when replicas refuse the new one: the command fails, the previous version keeps answering, and a
  replica started later serves the good version.

The first tests need no Ray (MLflow on SQLite in a fresh project, the replica's request path in
process); the last ones run on the session's shared serving cluster over HTTP (conftest's `project`;
its fixed ports allow one test session on the machine at a time)."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import HERE, ML_PROD, RECORD, cli, cluster_env, deploy, log_version, mlflow_at, status

X_COLUMNS = {"amount": [10.0, 250.0], "country": ["US", "FR"]}


# ---- helpers --------------------------------------------------------------------------------------

def log_tiny(alias: str, example: bool = True, name: str = "tiny", **model_config) -> int:
    "Register a tiny model (tests/tiny_model.py) with `model_config`, with or without an input example; its version."
    import mlflow
    import pandas as pd
    from mlflow.models import infer_signature
    from ml_prod.models.registry import register
    from ml_prod.settings import load_settings
    s = load_settings()
    X = pd.DataFrame(X_COLUMNS)
    with mlflow_at(s.tracking_uri):  # MLflow's global URI restored after: it would outlive this module
        mlflow.set_experiment("serving-safety")
        with mlflow.start_run() as run:
            mlflow.pyfunc.log_model(name="model", python_model=str(HERE / "tiny_model.py"), model_config=model_config or None,
                                    signature=infer_signature(X, pd.DataFrame({"score": [0.1, 0.9]})), input_example=X if example else None)
    return register(s, run.info.run_id, name, alias=alias)


def version_folder(version: int, name: str = "tiny") -> Path:
    "Where the registry's version `version` keeps its files on this machine (the embedded profile's local artifact store)."
    from mlflow import MlflowClient
    from ml_prod.settings import load_settings
    s = load_settings()
    uri = MlflowClient(s.tracking_uri, s.registry_uri or s.tracking_uri).get_model_version_download_uri(name, str(version))
    return Path(uri.removeprefix("file://"))


def sha256_of_files(folder: Path, skip: tuple = ("registered_model_meta",)) -> str:
    """The documented digest, computed here on its own: sha256 over 'relative/path\\0sha256(content)\\n' in sorted path order,
    without MLflow's `registered_model_meta` at the top (`skip=()`: over every file)."""
    h = hashlib.sha256()
    for p in sorted((p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() not in skip),
                    key=lambda p: p.relative_to(folder).as_posix()):
        h.update(f"{p.relative_to(folder).as_posix()}\0{hashlib.sha256(p.read_bytes()).hexdigest()}\n".encode())
    return h.hexdigest()


def tamper(version: int, marker: Path) -> Path:
    "Append code to the model file of `version` that would leave `marker` behind if it ever ran; the changed file."
    code = version_folder(version) / "tiny_model.py"
    assert code.is_file(), list(version_folder(version).iterdir())
    code.write_text(code.read_text() + f"\nopen({str(marker)!r}, 'w').write('the tampered code ran')\n")
    return code


def spec_of(name: str, alias: str, **extra) -> dict:
    return {"name": name, "arms": {"main": {"model": f"models:/tiny@{alias}", "weight": 1}}, "num_cpus": 0.25, **extra}


def built_arm(spec: dict, deployed: dict | None = None) -> tuple[dict, dict]:
    "(the app config `control.build` makes of `spec`, its arm 'main') on the active profile."
    from ml_prod.serving import control
    from ml_prod.serving.spec import spec_from_dict
    built = control.build(spec_from_dict({"applications": [spec]}), **({"deployed": deployed} if deployed else {}))
    cfg = built["applications"][0]
    return cfg, cfg["deployments"][0]["user_config"]["arms"]["main"]


def core_for(cfg: dict, replica: str):
    "The replica's request path (no Ray) for the app config `cfg`."
    from ml_prod.serving.replica import EndpointCore
    return EndpointCore(cfg["args"], replica)


_LOOP = None


def run(coro):
    "Run `coro` on this module's one event loop (a replica's batcher stays on the loop it started on)."
    import asyncio
    global _LOOP
    _LOOP = _LOOP or asyncio.new_event_loop()
    return _LOOP.run_until_complete(coro)


# ---- only registry versions -----------------------------------------------------------------------

@pytest.mark.parametrize("uri", ["runs:/0a1b2c/model", "/srv/models/fraud", "http://models.example.com/fraud.tar",
                                 "s3://bucket/fraud", "models://scope:prefix@databricks/fraud/3", "models:/fraud/latest"])
def test_spec_serves_only_registered_model_versions(uri):
    from ml_prod.errors import ConfigError
    from ml_prod.serving.spec import spec_from_dict
    with pytest.raises(ConfigError) as e:
        spec_from_dict({"applications": [{"name": "a", "arms": {"x": {"model": uri, "weight": 1}}}]})
    assert f"model {uri!r} is not a registered model version" in str(e.value) and "allow_unregistered_models: true" in str(e.value), e.value
    opted_in = spec_from_dict({"applications": [{"name": "a", "allow_unregistered_models": True, "arms": {"x": {"model": uri, "weight": 1}}}]})
    assert opted_in.app("a").arms["x"].model == uri
    for ok in ("models:/fraud@champion", "models:/fraud/3"):
        assert spec_from_dict({"applications": [{"name": "a", "arms": {"x": {"model": ok, "weight": 1}}}]}).app("a").arms["x"].model == ok


# ---- content digests ------------------------------------------------------------------------------

def test_build_records_the_digest_of_each_pinned_versions_files(project_dir):
    v1 = log_tiny("champion")
    _, arm = built_arm(spec_of("digests", "champion"))
    assert arm["pinned"] == f"models:/tiny/{v1}"
    assert arm["digest"] == sha256_of_files(version_folder(v1)), arm
    # a version pinned before keeps the digest recorded then: files changed since do not get a new one
    deployed, _ = built_arm(spec_of("digests", "champion"))
    tamper(v1, project_dir / "never")
    _, again = built_arm(spec_of("digests", "champion"), deployed={"digests": deployed})
    assert again["digest"] == arm["digest"] != sha256_of_files(version_folder(v1))


def test_a_models_uri_load_elsewhere_leaves_the_pinned_version_servable(project_dir):
    """A notebook loading `models:/tiny/N` through MLflow, on the embedded profile's local store, writes MLflow's
    `registered_model_meta` into the version's stored folder; a replica started afterwards still serves the version."""
    import mlflow
    import pandas as pd
    from ml_prod.serving.model import load_model
    from ml_prod.settings import load_settings
    v1 = log_tiny("champion")
    _, arm = built_arm(spec_of("meta", "champion"))
    folder = version_folder(v1)
    every_file = sha256_of_files(folder, skip=())
    with mlflow_at(load_settings().tracking_uri): mlflow.pyfunc.load_model(f"models:/tiny/{v1}")  # what a user's notebook does
    assert (folder / "registered_model_meta").is_file() and sha256_of_files(folder, skip=()) != every_file  # the stored files changed
    with mlflow_at(load_settings().tracking_uri): m = load_model(arm["pinned"], digest=arm["digest"])  # what a replica does
    assert len(m.frame_scores(pd.DataFrame(X_COLUMNS))) == 2


def test_replica_refuses_a_version_whose_files_changed_and_keeps_serving(project_dir):
    v1, v2 = log_tiny("champion"), log_tiny("candidate", offset=0.5)
    cfg1, arm1 = built_arm(spec_of("tamper", "champion"))
    cfg2, arm2 = built_arm(spec_of("tamper", "candidate"))
    marker = project_dir / "tampered-code-ran"
    tamper(v2, marker)
    now = sha256_of_files(version_folder(v2))

    core = core_for(cfg1, "r1")
    run(core.reconfigure(cfg1["deployments"][0]["user_config"]))
    assert core.update_error is None and core.status()["arms"]["main"]["version"] == str(v1)
    # the update to the changed version is refused with the version and both digests; the replica keeps serving v1
    run(core.reconfigure(cfg2["deployments"][0]["user_config"]))
    err = core.update_error or ""
    assert f"model 'tiny' version {v2}" in err and arm2.get("digest", "(no digest recorded)") in err and now in err, err
    code, body, _ = run(core.predict(json.dumps(RECORD).encode(), {}))
    assert (code, body["version"]) == (200, str(v1)), body
    assert not marker.exists(), "the tampered model's code ran"

    # a replica with nothing to serve yet: fails to start on the changed version...
    fresh = core_for(cfg2, "r2")
    with pytest.raises(Exception) as e:
        run(fresh.reconfigure(cfg2["deployments"][0]["user_config"]))
    assert f"model 'tiny' version {v2}" in str(e.value) and now in str(e.value), e.value
    # ...unless the arm has a last good version (the one deployed before): then it serves that and says why
    _, arm2_after_v1 = built_arm(spec_of("tamper", "candidate"), deployed={"tamper": cfg1})
    assert arm2_after_v1["last_good"] == {"pinned": f"models:/tiny/{v1}", "digest": arm1["digest"]}, arm2_after_v1
    uc = dict(cfg2["deployments"][0]["user_config"], arms={"main": dict(arm2, last_good=arm2_after_v1["last_good"])})
    fallback = core_for(cfg2, "r3")
    run(fallback.reconfigure(uc))
    assert fallback.status()["arms"]["main"]["version"] == str(v1)
    assert f"serves its last good version models:/tiny/{v1}" in fallback.update_error and now in fallback.update_error, fallback.update_error
    code, body, _ = run(fallback.predict(json.dumps(RECORD).encode(), {}))
    assert (code, body["version"]) == (200, str(v1)), body
    assert not marker.exists(), "the tampered model's code ran"
    for c in (core, fresh, fallback): c.audit.close(); c.feedback_log.close()


# ---- no model unscored ----------------------------------------------------------------------------

def test_model_logged_without_an_example_is_scored_before_it_serves(project_dir):
    from ml_prod.errors import MlProdError
    from ml_prod.serving.model import load_model
    calls = project_dir / "calls"
    good = log_tiny("good", example=False, calls_file=str(calls))
    bad = log_tiny("bad", example=False, broken=True)
    # the replica's warm-up: a replica with nothing to serve refuses to start on the model that fails
    cfg, bad_arm = built_arm(spec_of("noexample", "bad"))
    with pytest.raises(Exception) as e:
        run(core_for(cfg, "r1").reconfigure(cfg["deployments"][0]["user_config"]))
    assert "failed its health check (scoring an example synthesized from its signature" in str(e.value) and "weights are corrupt" in str(e.value), e.value
    # the good one is scored once, on 2 synthesized records, before it serves
    cfg, good_arm = built_arm(spec_of("noexample", "good"))
    core = core_for(cfg, "r2")
    run(core.reconfigure(cfg["deployments"][0]["user_config"]))
    assert core.status()["arms"]["main"]["version"] == str(good) and calls.read_text().split() == ["2"], calls.read_text()
    # the same check in the pre-flight's `load_model`
    with pytest.raises(MlProdError) as e:
        load_model(bad_arm["pinned"], digest=bad_arm["digest"])
    assert "synthesized from its signature" in str(e.value), e.value
    assert bad


# ---- the pre-flight check runs in a child process -------------------------------------------------

def test_preflight_loads_the_model_in_a_child_process_with_a_timeout(project_dir):
    from ml_prod.errors import MlProdError
    from ml_prod.serving.model import preflight
    from ml_prod.settings import load_settings
    s = load_settings()
    pids = project_dir / "pids"
    log_tiny("ok", pid_file=str(pids))
    pids.unlink()  # MLflow loaded it here to check its input example while logging it
    _, arm = built_arm(spec_of("pre", "ok"))
    verdict = preflight(arm["pinned"], arm["digest"], tracking_uri=s.tracking_uri, registry_uri=s.registry_uri)
    assert verdict["ok"] and verdict["version"] == arm["pinned"].rsplit("/", 1)[1]
    pid, parent = map(int, pids.read_text().split())
    assert pid != os.getpid() and parent == os.getpid(), (pid, parent, os.getpid())  # loaded in a child of this process, not in it
    log_tiny("slow", load_delay=60, logged_by=os.getpid())  # MLflow loads it while logging it: not slow here
    _, slow = built_arm(spec_of("pre", "slow"))
    t0 = time.monotonic()
    with pytest.raises(MlProdError) as e:
        preflight(slow["pinned"], slow["digest"], tracking_uri=s.tracking_uri, registry_uri=s.registry_uri, timeout_s=5)
    assert "took longer than 5 s" in str(e.value) and time.monotonic() - t0 < 40, e.value


# ---- over HTTP: a refused version never stays pinned ----------------------------------------------

class Client:
    "One thread posting to `url` until stopped; records (status or exception name, version) of every answer."
    def __init__(self, url: str):
        self.url, self.answers, self.stop = url, [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        with httpx.Client(base_url=self.url, timeout=30) as c:
            while not self.stop.is_set():
                try:
                    r = c.post("/predict", json=RECORD)
                    self.answers.append((r.status_code, r.json().get("version")))
                except httpx.HTTPError as e: self.answers.append((type(e).__name__, None))
                time.sleep(0.05)  # light load

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(60)


def set_alias(alias: str, version: int):
    from ml_prod.models.registry import set_alias as move
    from ml_prod.settings import load_settings
    move(load_settings(), "tiny", alias, version, reason="test")


def kill_replica_and_wait(app: str, deadline_s: float = 120) -> dict:
    "SIGKILL the one replica of `app`; wait for Ray's replacement to run and report what it serves; its status entry."
    old = status(app)["replicas"][0]
    os.kill(old["pid"], signal.SIGKILL)
    t0 = time.monotonic()
    while time.monotonic() - t0 < deadline_s:
        st = status(app)
        new = [r for r in st["replicas"] if r["state"] == "RUNNING" and r["id"] != old["id"]]
        serving = [x for x in st["serving"] if new and x["replica"] == new[0]["id"]]
        if serving: return dict(replica=new[0], serving=serving[0], url=new[0]["url"])
        time.sleep(1)
    raise AssertionError(f"no replacement replica of {app} reported what it serves after {deadline_s} s: {status(app)}")


@pytest.mark.long  # beyond CI's time limit: `make test LONG=1`
def test_refused_version_is_never_left_pinned(project):
    v1 = log_version("refuse")
    app = spec_of("refuse", "refuse")
    url = deploy(project, app)
    assert httpx.post(f"{url}/predict", json=RECORD, timeout=30).json()["version"] == str(v1)

    # a version that passes the check on the operator's machine but that the replicas refuse
    pids = project / "refuse-pids"
    v2 = log_tiny("refuse", broken_in_replica=True, pid_file=str(pids))
    pids.unlink()  # MLflow loaded it in this process to check its input example while logging it
    p = subprocess.Popen([ML_PROD, "serve", "update", "refuse"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=300)
    assert p.returncode != 0, (out, err)
    assert f"models:/tiny/{v2}" in err and "refused" in err and f"Re-applied the previous configuration, which serves main=models:/tiny/{v1}" in err, err
    loads = [tuple(map(int, line.split())) for line in pids.read_text().splitlines()]
    assert p.pid not in {pid for pid, _ in loads}, (p.pid, loads)  # the CLI never loaded the model itself...
    assert any(parent == p.pid for _, parent in loads), (p.pid, loads)  # ...a child of it did (the pre-flight)
    st = status("refuse")
    assert st["arms"]["main"]["pinned"] == f"models:/tiny/{v1}", st["arms"]  # the deployed config names the good version
    # a replica started after the refusal (Ray replaces a killed one) serves the good version
    new = kill_replica_and_wait("refuse")
    assert new["serving"]["arms"]["main"]["version"] == str(v1) and not new["serving"]["update_error"], new
    assert httpx.post(f"{new['url']}/predict", json=RECORD, timeout=30).json()["version"] == str(v1)

    # `serve up` of the same spec on the running application: refused too, and not one request fails meanwhile
    url = new["url"]
    spec = project / "refuse.yaml"
    with Client(url) as load:
        time.sleep(1)
        r = cli("serve", "up", str(spec), check=False, env=cluster_env(project))
        time.sleep(1)
    assert r.returncode != 0 and "refused" in r.stderr and f"models:/tiny/{v1}" in r.stderr, (r.stdout, r.stderr)
    assert len(load.answers) > 10 and set(load.answers) == {(200, str(v1))}, set(load.answers)
    assert status("refuse")["arms"]["main"]["pinned"] == f"models:/tiny/{v1}"
    assert httpx.post(f"{url}/predict", json=RECORD, timeout=30).json()["version"] == str(v1)
    cli("serve", "down", "refuse")


@pytest.mark.long  # beyond CI's time limit: `make test LONG=1`
def test_replacement_replica_falls_back_to_the_last_good_version(project):
    v1 = log_version("fallback")
    url = deploy(project, spec_of("fallback", "fallback"))
    v2 = log_version("fallback", offset=0.5)
    cli("serve", "update", "fallback")
    assert httpx.post(f"{url}/predict", json=RECORD, timeout=30).json()["version"] == str(v2)
    st = status("fallback")
    arm = st["arms"]["main"]
    assert arm["digest"] == sha256_of_files(version_folder(v2)) and arm["last_good"]["pinned"] == f"models:/tiny/{v1}", arm

    # v2's files change on disk after it was pinned; the replica that runs keeps the copy it checked
    marker = project / "fallback-tampered-code-ran"
    tamper(v2, marker)
    now = sha256_of_files(version_folder(v2))
    new = kill_replica_and_wait("fallback")
    served, why = new["serving"]["arms"]["main"], new["serving"]["update_error"] or ""
    assert served["version"] == str(v1), new  # the replacement refused v2 and serves the last good version
    assert f"model 'tiny' version {v2}" in why and arm["digest"] in why and now in why, why
    r = httpx.post(f"{new['url']}/predict", json=RECORD, timeout=30)
    assert (r.status_code, r.json()["version"]) == (200, str(v1)), r.text
    assert not marker.exists(), "the tampered model's code ran"
    cli("serve", "down", "fallback")
