"""The control service on the embedded profile's persistent cluster (the session's shared serving cluster, conftest's
`project`): one detached actor with a lease in the tracking store, an API that needs its token, and the alias follower,
which moves endpoints to the version their alias points to however the alias was moved, over HTTP under load with no
failed request. The served history is events in the tracking store: the same from two state folders.

Every test here deploys or starts `ray start` processes: one test session on the machine at a time (the shared cluster's fixed ports)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import RECORD, cli, deploy, free_ports, log_version, status

APP, ALIAS = "follower", "follow"
FOLLOW_DEADLINE_S = 180  # liveness only: the follower polls every second; this bounds a hung follower, not its speed (2 busy cores)
moves: list[dict] = []  # what each way of moving the alias measured, printed at the end of the module


def control_status() -> dict:
    return json.loads(cli("control", "status", "--json").stdout)


def settings():
    from ml_prod.settings import load_settings
    return load_settings()


class Load:
    "A client thread sending requests to `url` until stopped; every answer kept as (time, status, version)."
    def __init__(self, url: str):
        self.url, self.answers, self.stop = url, [], threading.Event()
        self.t = threading.Thread(target=self.run, daemon=True)

    def run(self):
        with httpx.Client(base_url=self.url, timeout=30) as c:
            while not self.stop.is_set():
                try:
                    r = c.post("/predict", json=RECORD)
                    self.answers.append((time.time(), r.status_code, r.json().get("version") if r.status_code == 200 else r.text[:200]))
                except httpx.HTTPError as e: self.answers.append((time.time(), type(e).__name__, None))
                time.sleep(0.02)

    def __enter__(self): self.t.start(); return self
    def __exit__(self, *exc): self.stop.set(); self.t.join(60)

    def wait_for(self, version: int, since: float) -> float:
        "Seconds from `since` to the first answer from `version`; fails after FOLLOW_DEADLINE_S."
        deadline = time.time() + FOLLOW_DEADLINE_S
        while time.time() < deadline:
            hit = next((t for t, st, v in list(self.answers) if t >= since and v == str(version)), None)
            if hit: return hit - since
            time.sleep(0.1)
        raise AssertionError(f"the endpoint did not serve version {version} within {FOLLOW_DEADLINE_S} s of the alias move; "
                             f"last answers: {self.answers[-3:]}; follower: {control_status()['instance']}")


@pytest.fixture(scope="module")
def served(project):
    "The application `follower` on `models:/tiny@follow` (version 1 of the alias), deployed with `serve up`: (stable URL, version)."
    v = log_version(ALIAS)
    url = deploy(project, {"name": APP, "arms": {"main": {"model": f"models:/tiny@{ALIAS}", "weight": 1}}, "num_cpus": 0,
                           "audit": {"retention_days": 30}}, direct=False)
    yield url, v
    cli("serve", "down", APP, check=False)
    print("\nalias moves measured (way: seconds from the move to the follower noticing it / to the first answer from the new version; requests sent/failed):")
    for m in moves: print(f"  {m['way']}: noticed {m['noticed']:.2f} s, served {m['seconds']:.2f} s; {m['sent']} requests, {m['failed']} failed")


def test_service_runs_with_its_lease_after_serve_up(served):
    st = control_status()
    assert st["running"] and st["instance"]["active"], st
    assert st["lease"]["holder"] == st["instance"]["holder"] and st["lease"]["holder"].startswith("actor-"), st
    assert st["lease"]["expires"] > time.time(), st
    tasks = {t["name"]: t for t in st["instance"]["tasks"]}
    assert tasks["alias_follower"]["runs"] > 0 and tasks["alias_follower"]["last_error"] is None, tasks
    out = cli("control", "status").stdout
    assert "lease: held by actor-" in out and "task alias_follower every 1 s" in out, out
    cluster = json.loads(cli("--json", "cluster", "status").stdout)  # `cluster status` shows the service too
    assert cluster["control"]["lease"]["holder"] == st["lease"]["holder"] and cluster["control"]["running"], cluster
    assert "lease: held by actor-" in cli("cluster", "status").stdout


def run_task(name: str) -> dict:
    "Run the control service's task `name` now, through its API (as the CLI would); the task's state after the run."
    d = Path(settings().state_dir) / "control"
    url, token = json.loads((d / "api.json").read_text())["url"], (d / "token").read_text().strip()
    r = httpx.post(f"{url}/v1/tasks/{name}/run", headers={"Authorization": f"Bearer {token}"}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_audit_upkeep_compacts_and_applies_retention(served):
    "The hourly audit task, run now: the application's segments become Parquet, and a day older than its retention_days goes."
    url, _ = served
    with httpx.Client(base_url=url, timeout=30) as c:
        ids = [c.post("/predict", json=RECORD).json()["request_id"] for _ in range(5)]
    requests = Path(settings().audit_dir) / APP / "requests"
    assert run_task("audit_upkeep")["last_error"] is None
    import pyarrow.parquet as pq
    rows = set(pq.ParquetDataset(requests).read(columns=["request_id"]).column("request_id").to_pylist())
    assert set(ids) <= rows, f"answered requests missing from the compacted log: {set(ids) - rows}"
    old = requests / "date=2000-01-01"  # far older than the 30 days the spec keeps
    shutil.copytree(next(requests.glob("date=*")), old)
    assert run_task("audit_upkeep")["last_error"] is None
    assert not old.exists() and list(requests.glob("date=*/*.parquet"))


def test_api_refuses_requests_without_its_token(served):
    s = settings()
    d = Path(s.state_dir) / "control"
    url, token = json.loads((d / "api.json").read_text())["url"], (d / "token").read_text().strip()
    assert (d / "token").stat().st_mode & 0o777 == 0o600
    assert url.startswith("http://127.0.0.1:")
    assert httpx.get(f"{url}/v1/status").status_code == 401
    assert httpx.get(f"{url}/v1/status", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.post(f"{url}/v1/tasks/alias_follower/run", headers={"Authorization": f"Bearer {token[:-1]}"}).status_code == 401
    r = httpx.get(f"{url}/v1/status", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200 and r.json()["active"] is True
    r = httpx.post(f"{url}/v1/tasks/alias_follower/run", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200 and r.json()["last_error"] is None, r.text


def test_a_second_instance_refuses_and_names_the_active_one(served):
    from ml_prod.control.service import ControlError, ControlService
    holder = control_status()["lease"]["holder"]
    with pytest.raises(ControlError, match=f"another control service holds the lease: {holder}"):
        ControlService(settings(), tasks=[], handlers={}, holder="a-second-one").start()
    assert control_status()["lease"]["holder"] == holder  # the active one keeps it


def settled(version: int) -> None:
    "Wait until the served history records `version` put into service (the follower's update has returned: none is in flight)."
    from ml_prod.serving.control import history
    deadline = time.time() + FOLLOW_DEADLINE_S
    while time.time() < deadline:
        done = [h for h in history(APP, settings()) if h["event"] in ("update", "refused", "revert", "deploy")]
        if done and done[-1]["event"] == "update" and done[-1]["arms"]["main"]["pinned"] == f"models:/tiny/{version}": return
        time.sleep(0.5)
    raise AssertionError(f"no update to version {version} in the history: {history(APP, settings())[-3:]}")


def noticed(version: int, since: float) -> float:
    "Seconds from `since` to the follower's `alias_moved` event for `version` (when it noticed the move)."
    from ml_prod.serving.control import history
    return next(h["time"] for h in history(APP, settings()) if h["event"] == "alias_moved" and h["moves"][0]["now"] == f"models:/tiny/{version}") - since


def move_and_measure(way: str, url: str, version: int, move) -> None:
    "Move the alias with `move()` while a client sends requests; the endpoint serves `version` soon after, no request fails."
    with Load(url) as load:
        time.sleep(1)
        t0 = time.time()
        move()
        took = load.wait_for(version, t0)
        settled(version)
    during = [a for a in load.answers if a[0] >= t0 - 1]
    failed = [a for a in load.answers if a[1] != 200]
    moves.append(dict(way=way, seconds=took, noticed=noticed(version, t0), sent=len(during), failed=len(failed)))
    assert len(during) > 20 and not failed, failed[:5]
    versions = [v for _, _, v in load.answers]
    assert versions[-1] == str(version) and str(version) in versions
    first = versions.index(str(version))
    assert set(versions[first:]) == {str(version)}, "an answer from the old version after the new one served"  # no flapping back


def test_python_api_move_is_followed(served):
    from ml_prod.models.registry import set_alias
    url, _ = served
    v = log_version("spare", offset=0.1)
    move_and_measure("ml_prod.models.registry.set_alias", url, v, lambda: set_alias(settings(), "tiny", ALIAS, v, reason="test"))
    assert status(APP)["arms"]["main"]["pinned"] == f"models:/tiny/{v}"


def test_register_with_alias_is_followed(served):
    url, _ = served
    box = {}
    def register(): box["v"] = log_version(ALIAS, offset=0.15)  # registry.register(alias=...)
    with Load(url) as load:
        time.sleep(1)
        t0 = time.time()
        register()
        took = load.wait_for(box["v"], t0)
        settled(box["v"])
    failed = [a for a in load.answers if a[1] != 200]
    moves.append(dict(way="registry.register(alias=)", seconds=took, noticed=noticed(box["v"], t0), sent=len([a for a in load.answers if a[0] >= t0]),
                      failed=len(failed)))
    assert not failed, failed[:5]


@pytest.mark.long  # beyond CI's time limit: `make test LONG=1`
def test_raw_mlflow_client_move_is_followed(served):
    from mlflow import MlflowClient
    url, _ = served
    s = settings()
    v = log_version("spare", offset=0.2)
    move_and_measure("MlflowClient.set_registered_model_alias", url, v,
                     lambda: MlflowClient(s.tracking_uri, s.registry_uri).set_registered_model_alias("tiny", ALIAS, str(v)))


def test_job_notebook_move_is_followed(served, project):
    import nbformat
    url, _ = served
    v = log_version("spare", offset=0.25)
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("version = 0  # the version to point the alias at", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell(
                    "import os\nfrom ml_prod.settings import load_settings\nfrom ml_prod.models.registry import set_alias\n"
                    "s = load_settings(env={**os.environ, 'ML_PROD_TRACKING_URI': os.environ['MLFLOW_TRACKING_URI'], "
                    "'ML_PROD_REGISTRY_URI': os.environ['MLFLOW_REGISTRY_URI']})\n"
                    f"set_alias(s, 'tiny', '{ALIAS}', version, reason='moved by a job')")]
    path = project / "move_alias.ipynb"
    nbformat.write(nb, path)
    move_and_measure("a job notebook (`ml_prod run`)", url, v, lambda: cli("run", str(path), "-p", "version", str(v), "--cpus", "0"))


@pytest.mark.long  # beyond CI's time limit: `make test LONG=1`
def test_rest_api_move_is_followed(served, project):
    "The MLflow UI moves an alias through MLflow's REST API: here that API, on `mlflow server` over the project's store."
    url, _ = served
    s = settings()
    v = log_version("spare", offset=0.3)
    (port,) = free_ports(1)
    mlflow_bin = str(Path(sys.executable).parent / "mlflow")
    server = subprocess.Popen([mlflow_bin, "server", "--backend-store-uri", s.tracking_uri, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        base, deadline = f"http://127.0.0.1:{port}", time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200: break
            except httpx.HTTPError: pass
            assert server.poll() is None, server.stderr.read()[-2000:]
            time.sleep(0.5)
        def move():
            r = httpx.post(f"{base}/api/2.0/mlflow/registered-models/alias", json={"name": "tiny", "alias": ALIAS, "version": str(v)}, timeout=30)
            assert r.status_code == 200, r.text
        move_and_measure("MLflow REST API (what the MLflow UI calls)", url, v, move)
    finally:
        server.terminate()
        try: server.wait(30)
        except subprocess.TimeoutExpired: server.kill()


def test_revert_pins_until_follow(served):
    from ml_prod.models.registry import set_alias
    url, _ = served
    c = httpx.Client(base_url=url, timeout=30)
    before = status(APP)["arms"]["main"]["pinned"]
    out = cli("serve", "revert", APP).stdout
    assert "reverted and pinned" in out, out
    reverted = status(APP)["arms"]["main"]["pinned"]
    assert reverted != before
    # a later alias move is reported, not applied
    v = log_version("spare", offset=0.35)
    set_alias(settings(), "tiny", ALIAS, v, reason="while pinned")
    time.sleep(6)  # several follower passes
    st = status(APP)
    assert st["pinned"] is True and st["arms"]["main"]["pinned"] == reverted, st
    assert [m["now"] for m in st["pending"]] == [f"models:/tiny/{v}"], st["pending"]
    assert c.post("/predict", json=RECORD).json()["version"] == reverted.rsplit("/", 1)[1]
    text = cli("serve", "status").stdout
    assert f"alias moved, not applied (pinned): main models:/tiny@{ALIAS} -> models:/tiny/{v}" in text, text
    assert "alias_held" in text and "revert by" in text, text
    # the old name says what to use instead
    r = cli("serve", "rollback", APP, check=False)
    assert r.returncode == 2 and "serve revert" in r.stderr and "models rollback" in r.stderr, r.stderr
    # follow: the alias's version goes into service, and later moves are followed again
    with Load(url) as load:
        t0 = time.time()
        cli("serve", "follow", APP)
        load.wait_for(v, t0)
        settled(v)
    assert not [a for a in load.answers if a[1] != 200]
    assert status(APP)["pinned"] is False
    w = log_version("spare", offset=0.4)
    with Load(url) as load:
        t0 = time.time()
        set_alias(settings(), "tiny", ALIAS, w, reason="after follow")
        load.wait_for(w, t0)
        settled(w)


def test_history_is_the_same_from_two_state_folders(served, project, tmp_path):
    "Two operators: two settings.ini with their own state folders, one tracking store (and one cluster): one history."
    other = tmp_path / "operator2"
    other.mkdir()
    s = settings()
    (other / "settings.ini").write_text(f"[DEFAULT]\nstate_dir = {other / 'state'}\ntracking_uri = {s.tracking_uri}\n")
    (other / "state").mkdir()
    shutil.copy(Path(s.state_dir) / "cluster.json", other / "state")  # the second operator joins the same cluster (its address, nothing else)
    mine = cli("serve", "status", "--json").stdout
    cwd = os.getcwd()
    os.chdir(other)
    try: theirs = cli("serve", "status", "--json").stdout
    finally: os.chdir(cwd)
    h1 = next(a for a in json.loads(mine) if a["app"] == APP)["history"]
    h2 = next(a for a in json.loads(theirs) if a["app"] == APP)["history"]
    assert h1 == h2 and len(h1) == 10, (h1, h2)  # `serve status` shows the last 10 events
    from ml_prod.serving.control import history
    from ml_prod.settings import load_settings
    full = history(APP, s)
    assert history(APP, load_settings(path=other / "settings.ini")) == full
    assert [h["event"] for h in full][0] == "deploy", full
    assert {"alias_moved", "update", "revert", "alias_held", "follow"} <= {h["event"] for h in full}, [h["event"] for h in full]
    assert full[0]["arms"]["main"]["pinned"].startswith("models:/tiny/")
    assert not (other / "state" / "serving").exists() and not (Path(s.state_dir) / "serving").exists()  # no history file on either disk


def raw_claim(claim_id: str) -> dict:
    "The lease's claim `claim_id` straight from the project's SQLite store: its run's status and its JSON payload (holder, pid, host)."
    import sqlite3
    from contextlib import closing
    with closing(sqlite3.connect(settings().tracking_uri.removeprefix("sqlite:///"))) as conn:
        (st,) = conn.execute("SELECT status FROM runs WHERE run_uuid = ?", (claim_id,)).fetchone()
        tags = dict(conn.execute("SELECT key, value FROM tags WHERE run_uuid = ?", (claim_id,)).fetchall())
    assert (tags["ml_prod.stream"], tags["ml_prod.kind"]) == ("control", "claim"), tags
    return dict(status=st, **json.loads("".join(tags[f"ml_prod.payload.{i}"] for i in range(int(tags["ml_prod.payload_parts"])))))


def listening_pid(url: str) -> int | None:
    "The process that listens on `url`'s port, from the OS's socket table."
    import psutil
    port = int(url.rsplit(":", 1)[1])
    return next((c.pid for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.laddr.port == port), None)


def test_service_restarts_when_its_process_dies(served):
    """SIGKILL the actor's process: Ray restarts it, the same instance adopts its own claim, and the lease record in the store
    names the new process (the one listening on the API's port), not the dead one; the endpoint follows an alias again."""
    import psutil
    from ml_prod.models.registry import set_alias
    url, _ = served
    before = control_status()["instance"]
    assert raw_claim(before["claim"])["pid"] == before["pid"] == listening_pid(before["url"])
    os.kill(before["pid"], signal.SIGKILL)
    deadline, st = time.time() + 120, None
    while time.time() < deadline:
        r = cli("control", "status", "--json", check=False)
        st = json.loads(r.stdout) if r.returncode == 0 else None
        if st and st["running"] and st["instance"]["pid"] != before["pid"] and st["instance"]["active"]: break
        time.sleep(1)
    assert st and st["instance"]["pid"] != before["pid"] and st["instance"]["active"], st
    assert st["instance"]["holder"] == before["holder"] and st["instance"]["claim"] == before["claim"]  # the same instance, its own claim adopted
    # the lease record names the process that holds it now (what `control status` and a refused instance print)
    pid = listening_pid(st["instance"]["url"])
    assert pid and pid != before["pid"] and not psutil.pid_exists(before["pid"]), (pid, before["pid"])
    claim = raw_claim(before["claim"])
    assert claim["status"] == "RUNNING" and claim["holder"] == before["holder"], claim
    assert claim["pid"] == pid, f"the lease record names pid {claim['pid']}, the restarted actor's process is {pid} (killed: {before['pid']})"
    v = log_version("spare", offset=0.45)
    with Load(url) as load:
        t0 = time.time()
        set_alias(settings(), "tiny", ALIAS, v, reason="after a restart")
        load.wait_for(v, t0)
        settled(v)
    assert not [a for a in load.answers if a[1] != 200]
