"""A notebook job on a two-node Ray cluster, tracked by an MLflow tracking server with artifact proxying.

One module-scoped fixture starts, all on this machine and on free ports (Ray is given
`--node-ip-address 127.0.0.1`, which it resolves to this machine's own address for what it advertises):

* a PostgreSQL server of its own (Debian's `postgresql` package: `.ci/run` installs it; `initdb` in a
  tmp folder, password authentication, 127.0.0.1 only), holding MLflow's store and its users;
* an MLflow tracking server (`--serve-artifacts`) behind MLflow's basic-auth app, on that PostgreSQL:
  every call needs a user; `ml_prod` (jobs, the CLI) can write, `replica` only reads (serving replicas
  call it as `replica`, from the profile's `replica_tracking_credentials` file);
* a Ray head (1 CPU, no custom resources) and a Ray worker node (1 CPU, resource `trainer`), both
  started with `ray start` and Ray's token authentication (`RAY_AUTH_MODE=token`), in a dedicated
  `--temp-dir`;
* a `settings.ini` with a multi-node `[cluster]` profile pointing at both.

The job is submitted from a separate Python process: the pytest process may already run a local Ray
(conftest's `ray_local`), and `ray.init(address=...)` must not be mixed with it.

Teardown stops only what this module started (never `ray stop`, which would stop every Ray on the
machine): the processes whose command line names our temp dir or our GCS address, or that carry our
marker environment variable, and their descendants; SIGTERM, then SIGKILL after 10 s; the GCS last.
The whole module takes about 60-90 s on 2 cores.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import nbformat
import psutil
import pytest

from conftest import _alive, free_ports, stop_processes  # shared with the serving tests
from ml_prod.errors import ConfigError
from ml_prod.serving.spec import SERVE_ENV
from ml_prod.settings import load_settings

pytestmark = pytest.mark.slow
LONG = pytest.mark.long  # the two-node scenarios, about 10 min together: beyond CI's time limit, `make test LONG=1`

BIN = Path(sys.executable).parent
MARKER = "ML_PROD_MULTINODE_TEST"  # set in the environment of every process this module starts
START_TIMEOUT_S = 120     # one `ray start`
RAY_START_ATTEMPTS = 2
MLFLOW_START_TIMEOUT_S = 120
JOB_TIMEOUT_S = 180
OPERATOR, READER = "ml_prod", "replica"  # the tracking server's users: jobs and the CLI write, replicas only read


# ---- helpers -------------------------------------------------------------------------------------------

def free_port_range(size: int, avoid: set[int], lo: int = 20000, hi: int = 26000) -> tuple[int, int]:
    "A run of `size` consecutive ports, none in `avoid`, all bindable now (below the ephemeral range and `free_ports`' 26000-32000)."
    import random
    rng = random.Random()
    for _ in range(200):
        start = rng.randrange(lo, hi - size)
        ports = range(start, start + size)
        if avoid & set(ports): continue
        ok = True
        for p in ports:
            with socket.socket() as s:
                try: s.bind(("", p))
                except OSError: ok = False; break
        if ok:
            avoid.update(ports)
            return start, start + size - 1
    raise RuntimeError("no free port range found")


def wait_http(url: str, timeout: float, proc: subprocess.Popen, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200: return
        except OSError: pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {timeout} s:\n{log.read_text()[-3000:]}")


def clean_env(**extra) -> dict:
    "This process's environment without ML_PROD_*/MLFLOW_*/RAY_ADDRESS leaking in, plus `extra`."
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith("ML_PROD_") and k != "ML_PROD_TEST_SESSION")
           and not k.startswith("MLFLOW_") and k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    return {**env, **extra}


def run_cmd(cmd: list[str], env: dict, timeout: float = START_TIMEOUT_S) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def _has_marker(p: psutil.Process, marker: str) -> bool:
    try: return p.environ().get(MARKER) == marker
    except psutil.Error: return False


def our_processes(temp_dirs: list[str], gcs_addresses: list[str], marker: str) -> list[psutil.Process]:
    "Live processes this module started: named by our temp dirs or GCS addresses, or carrying our marker; and their descendants."
    me = os.getpid()
    # our GCS's port after any IPv4 address: Ray hands some processes (the client server) the resolved address
    gcs = [re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}:" + a.rsplit(":", 1)[1] + r"(?!\d)") for a in gcs_addresses]
    found: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["cmdline"]):
        if p.pid == me: continue
        args = p.info["cmdline"] or []
        if any(t in a for a in args for t in temp_dirs) or any(g.search(a) for a in args for g in gcs) or _has_marker(p, marker):
            found[p.pid] = p
    for p in list(found.values()):
        try:
            for c in p.children(recursive=True): found.setdefault(c.pid, c)
        except psutil.Error: pass
    found.pop(me, None)
    return [p for p in found.values() if _alive(p)]


def _name(p: psutil.Process) -> str:
    try: return p.name()
    except psutil.Error: return ""


def make_notebook(path: Path) -> Path:
    "A job notebook: a `greeting` parameter, a metric and a text artifact logged into the job's run."
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell('greeting: str = "hello"  # text written to hello.txt', metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell(textwrap.dedent("""\
            import os, socket, mlflow
            mlflow.log_metric("on_worker", 1)
            mlflow.log_text(greeting, "hello.txt")
            # mlflow removes MLFLOW_RUN_ID from the environment once it has resumed the run
            assert mlflow.active_run().info.run_id == os.environ["ML_PROD_RUN_ID"]
            print("kernel pid", os.getpid(), "on", socket.gethostname(), "run", os.environ["ML_PROD_RUN_ID"])""")),
    ])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


# Runs in its own Python process: connects to the cluster through ml_prod (never the pytest process's Ray).
DRIVER = '''
import json, sys, time
from ml_prod.settings import load_settings
from ml_prod.jobs.submit import run_notebook

settings_path, notebook, cwd = sys.argv[1:4]
s = load_settings("cluster", path=settings_path, env={})
result = run_notebook(notebook, {"greeting": "hello"}, settings=s, resources={"trainer": 1}, cwd=cwd, check=False)

import ray
nodes = [n for n in ray.nodes() if n["Alive"]]
print("RESULT " + json.dumps(dict(
    run_id=result.run_id, status=result.status, error=result.error,
    worker_nodes=[n["NodeID"] for n in nodes if n["Resources"].get("trainer")],
    other_nodes=[n["NodeID"] for n in nodes if not n["Resources"].get("trainer")],
    auth_mode=__import__("os").environ.get("RAY_AUTH_MODE"),
)), flush=True)
ray.shutdown()
'''


# ---- PostgreSQL and the authenticated tracking server ----------------------------------------------------

def postgres_bin() -> Path:
    "The folder of Debian's PostgreSQL server programs (newest version); skipped where it is not installed, except on CI."
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    if found: return found[-1].parent
    if os.environ.get("CI"): pytest.fail("PostgreSQL is not installed: .ci/run installs Debian's postgresql package")
    pytest.skip("PostgreSQL is not installed (apt install postgresql)")


class Postgres:
    "A private PostgreSQL server: its own data folder and port, password authentication, listening on 127.0.0.1 only."
    def __init__(self, port: int):
        self.bin, self.port, self.password = postgres_bin(), port, uuid.uuid4().hex
        self.dir = Path(tempfile.mkdtemp(prefix="pg_mn_", dir="/tmp"))  # readable by the postgres user, unlike pytest's tmp
        # initdb and the server refuse to run as root: as root, they run as Debian's `postgres` user
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user: shutil.chown(self.dir, "postgres")
        self.env = {k: v for k, v in os.environ.items() if k != MARKER}  # stopped by pg_ctl, not by the Ray teardown

    def uri(self, db: str) -> str: return f"postgresql+psycopg://postgres:{self.password}@127.0.0.1:{self.port}/{db}"

    def start(self, databases: list[str]):
        pw = self.dir / "pw"
        pw.write_text(self.password)
        if self.as_user: shutil.chown(pw, "postgres")
        run_cmd([*self.as_user, str(self.bin / "initdb"), "-D", str(self.dir / "data"), "-U", "postgres", "-E", "UTF8",
                 "--auth=scram-sha-256", f"--pwfile={pw}"], self.env)
        pw.unlink()
        run_cmd([*self.as_user, str(self.bin / "pg_ctl"), "-D", str(self.dir / "data"), "-l", str(self.dir / "server.log"), "-w",
                 "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1", "start"], self.env)
        for db in databases:
            run_cmd(["psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-c", f"CREATE DATABASE {db}"],
                    {**self.env, "PGPASSWORD": self.password})

    def stop(self):
        if (self.dir / "data" / "postmaster.pid").exists():
            subprocess.run([*self.as_user, str(self.bin / "pg_ctl"), "-D", str(self.dir / "data"), "-m", "fast", "-w", "stop"],
                           env=self.env, capture_output=True, timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)

    def processes(self) -> list[psutil.Process]:
        return [p for p in psutil.process_iter(["cmdline"]) if any(str(self.dir) in a for a in p.info["cmdline"] or [])]


def auth_config(path: Path, pg: Postgres, admin_password: str) -> Path:
    "MLflow's basic-auth settings: users in PostgreSQL, READ for every user unless granted more."
    path.write_text(textwrap.dedent(f"""\
        [mlflow]
        default_permission = READ
        database_uri = {pg.uri("mlflow_auth")}
        admin_username = admin
        admin_password = {admin_password}
        authorization_function = mlflow.server.auth:authenticate_request_basic_auth
        """))
    return path


def api(url: str, path: str, user: str | None = None, password: str = "", data: dict | None = None, method: str | None = None) -> tuple[int, str]:
    "Status and body of one call of the tracking server's REST API, as `user` (or anonymous)."
    import base64
    req = urllib.request.Request(url + path, data=json.dumps(data).encode() if data is not None else None,
                                 headers={"Content-Type": "application/json"}, method=method)
    if user: req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=30) as r: return r.status, r.read().decode()
    except urllib.error.HTTPError as e: return e.code, e.read().decode()


def create_user(url: str, admin_password: str, user: str, password: str):
    status, body = api(url, "/api/2.0/mlflow/users/create", "admin", admin_password, {"username": user, "password": password})
    assert status == 200, f"creating MLflow user {user}: {status} {body[:300]}"


# ---- the cluster ---------------------------------------------------------------------------------------

def write_credentials(path: Path, user: str, password: str) -> Path:
    "The replicas' tracking credentials file: one line `user:password`, owner-only."
    path.write_text(f"{user}:{password}\n")
    path.chmod(0o600)
    return path


def cluster_profile(ray_address: str, tracking_uri: str, tmp: Path, shared: bool = True, serve_port: int | None = None,
                    replica_credentials: Path | None = None) -> str:
    "settings.ini text with the multi-node `[cluster]` profile."
    text = textwrap.dedent(f"""\
        [DEFAULT]

        [cluster]
        ray_address = {ray_address}
        multi_node = true
        tracking_uri = {tracking_uri}
        artifact_location = mlflow-artifacts:/
        audit_dir = {tmp}/audit
        state_dir = {tmp}/.ml_prod
        """)
    if serve_port: text += f"serve_port = {serve_port}\n"
    if replica_credentials: text += f"replica_tracking_credentials = {replica_credentials}\n"
    if shared: text += textwrap.dedent("""\
        # Both nodes run on this one machine, so the local audit_dir, state_dir and outputs_dir
        # are on storage every node sees; a real multi-node cluster would need a shared mount.
        storage_is_shared = true
        """)
    return text


def ray_logs(temp_dir: str, chars: int = 1500) -> str:
    "The ends of the GCS's and raylets' logs of the sessions in `temp_dir`, for error messages."
    out = []
    for f in sorted(Path(temp_dir).glob("session_2*/logs/*")):
        if f.name.startswith(("gcs_server", "raylet")) and f.suffix in (".out", ".err") and f.stat().st_size:
            out.append(f"--- {f}:\n{f.read_text(errors='replace')[-chars:]}")
    return "\n".join(out)


class Started:
    "What this module started, so that teardown stops exactly that."
    def __init__(self):
        self.marker = uuid.uuid4().hex  # in the environment of everything we start
        self.temp_dirs: list[str] = []
        self.gcs_addresses: list[str] = []
        self.mlflow: subprocess.Popen | None = None
        self.postgres: Postgres | None = None

    def processes(self, ray_only: bool = False) -> list[psutil.Process]:
        procs = {p.pid: p for p in our_processes(self.temp_dirs, self.gcs_addresses, self.marker)}
        if ray_only and self.mlflow is not None:
            mlflow = {self.mlflow.pid, *(c.pid for c in _children(self.mlflow.pid))}
            procs = {pid: p for pid, p in procs.items() if pid not in mlflow}
        return list(procs.values())

    def stop_ray(self):
        "Stop our Ray processes: raylets, workers, agents and kernels first, the GCS last (as `ray stop` does)."
        procs = self.processes(ray_only=True)
        gcs = [p for p in procs if _name(p) == "gcs_server"]
        stop_processes([p for p in procs if p not in gcs])  # a GCS stopped before its raylets ignores SIGTERM
        stop_processes(gcs)

    def stop_mlflow(self, wait: bool = True):
        "SIGTERM the tracking server's process group (it and its uvicorn worker); with `wait`, SIGKILL it after 10 s."
        if self.mlflow is None: return
        try: os.killpg(self.mlflow.pid, signal.SIGTERM)
        except ProcessLookupError: pass
        if not wait: return
        try: self.mlflow.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.mlflow.pid, signal.SIGKILL); self.mlflow.wait(5)


def _children(pid: int) -> list[psutil.Process]:
    try: return psutil.Process(pid).children(recursive=True)
    except psutil.Error: return []


def start_ray(started: Started, env: dict) -> str:
    "A Ray head (1 CPU) and a worker node (1 CPU, resource `trainer`) in a fresh temp dir; returns the GCS address."
    # Ray's unix socket paths must stay short: a dedicated folder right under /tmp
    temp_dir = tempfile.mkdtemp(prefix="ray_mn_", dir="/tmp")
    started.temp_dirs.append(temp_dir)
    gcs_port, client_port, dashboard_port, *node_ports = free_ports(3 + 2 * 6)
    gcs_address = f"127.0.0.1:{gcs_port}"
    started.gcs_addresses.append(gcs_address)
    taken = {gcs_port, client_port, dashboard_port, *node_ports}

    def node_args(ports):
        nm, om, dal, dag, rea, met = ports
        lo, hi = free_port_range(40, taken)
        # Ray resolves 127.0.0.1 to this machine's own address for what it advertises: still this machine
        return ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats",
                "--object-store-memory", str(100 * 1024**2), f"--temp-dir={temp_dir}",
                "--node-manager-port", str(nm), "--object-manager-port", str(om),
                "--dashboard-agent-listen-port", str(dal), "--dashboard-agent-grpc-port", str(dag),
                "--runtime-env-agent-port", str(rea), "--metrics-export-port", str(met),
                "--min-worker-port", str(lo), "--max-worker-port", str(hi)]

    try:
        run_cmd([str(BIN / "ray"), "start", "--head", "--port", str(gcs_port), "--ray-client-server-port", str(client_port),
                 "--include-dashboard=false", "--dashboard-port", str(dashboard_port), *node_args(node_ports[:6])], env)
        run_cmd([str(BIN / "ray"), "start", "--address", gcs_address, "--resources", json.dumps({"trainer": 1}),
                 *node_args(node_ports[6:])], env)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"{e}\n{ray_logs(temp_dir)}") from None
    return gcs_address


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multinode")
    started = Started()
    # Ray Serve's fast-ingress flags (what `ml_prod serve build` says to set) must be in every node's `ray start` environment
    env = clean_env(**{MARKER: started.marker, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}, **SERVE_ENV)
    mlflow_log = open(tmp / "mlflow_server.log", "w")
    try:
        # 1. PostgreSQL, then the tracking server on it behind basic auth, proxying artifacts into
        # tmp/mlartifacts; it takes a while to create its tables, so Ray starts meanwhile
        mlflow_port, pg_port = free_ports(2)
        started.postgres = pg = Postgres(pg_port)
        pg.start(["mlflow", "mlflow_auth"])
        tracking_uri = f"http://127.0.0.1:{mlflow_port}"
        passwords = {"admin": uuid.uuid4().hex, OPERATOR: uuid.uuid4().hex, READER: uuid.uuid4().hex}
        server_env = {**env, "MLFLOW_AUTH_CONFIG_PATH": str(auth_config(tmp / "basic_auth.ini", pg, passwords["admin"])),
                      "MLFLOW_FLASK_SERVER_SECRET_KEY": uuid.uuid4().hex}
        started.mlflow = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--app-name", "basic-auth", "--host", "127.0.0.1", "--port", str(mlflow_port),
             "--backend-store-uri", pg.uri("mlflow"), "--serve-artifacts",
             "--artifacts-destination", str(tmp / "mlartifacts"), "--workers", "1"],
            env=server_env, cwd=tmp, stdout=mlflow_log, stderr=subprocess.STDOUT, start_new_session=True)
        # every process of the cluster (nodes, jobs, the driver, the CLI) calls the server as the operator
        env.update(MLFLOW_TRACKING_USERNAME=OPERATOR, MLFLOW_TRACKING_PASSWORD=passwords[OPERATOR])

        # 2. token authentication (~/.ray/auth_token is created only when missing, never replaced), then
        # the two nodes; on a loaded machine a raylet may miss Ray's fixed 30 s registration deadline:
        # one more try, from scratch
        run_cmd([str(BIN / "ray"), "get-auth-token", "--generate"], env)
        for attempt in range(RAY_START_ATTEMPTS):
            try:
                gcs_address = start_ray(started, env)
                break
            except RuntimeError as e:
                if attempt == RAY_START_ATTEMPTS - 1: raise
                print(f"\nthe Ray cluster did not start, trying again: {str(e)[:3000]}", file=sys.stderr)
                started.stop_ray()
        wait_http(f"{tracking_uri}/health", MLFLOW_START_TIMEOUT_S, started.mlflow, tmp / "mlflow_server.log")
        for user in (OPERATOR, READER): create_user(tracking_uri, passwords["admin"], user, passwords[user])

        # 3. the multi-node profile
        settings = tmp / "settings.ini"
        # (replicas call the tracking server as the read-only user of this file; jobs and the CLI stay the operator)
        replica_credentials = write_credentials(tmp / "replica_credentials", READER, passwords[READER])
        settings.write_text(cluster_profile(gcs_address, tracking_uri, tmp, serve_port=free_ports(1)[0], replica_credentials=replica_credentials))
        yield dict(tmp=tmp, settings=settings, tracking_uri=tracking_uri, artifacts=tmp / "mlartifacts", env=env, passwords=passwords, postgres=pg,
                   replica_credentials=replica_credentials, ray_temp_dirs=list(started.temp_dirs))
    finally:
        # 5. stop only what we started (never `ray stop`: it stops every Ray on the machine)
        started.stop_mlflow(wait=False)  # it takes a few seconds to shut down: meanwhile, Ray
        started.stop_ray()
        started.stop_mlflow()
        mlflow_log.close()
        left = started.processes()
        if started.postgres:
            started.postgres.stop()
            left += started.postgres.processes()
        for d in started.temp_dirs: shutil.rmtree(d, ignore_errors=True)
        assert not left, f"processes of the multi-node test outlived its teardown: {[p.pid for p in left]}"


@pytest.fixture(scope="module")
def job(cluster):
    "The notebook job, run on the cluster from a separate Python process; the driver's JSON report."
    tmp = cluster["tmp"]
    nb = make_notebook(tmp / "on_worker.ipynb")
    script = tmp / "driver.py"
    script.write_text(DRIVER)
    # no RAY_AUTH_MODE in the driver's environment: ml_prod.cluster.connect must set it
    env = {k: v for k, v in cluster["env"].items() if k != "RAY_AUTH_MODE"}
    r = subprocess.run([sys.executable, str(script), str(cluster["settings"]), str(nb), str(tmp)],
                       env=env, cwd=tmp, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    lines = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
    assert r.returncode == 0 and lines, f"driver failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULT "):])


# ---- tests ----------------------------------------------------------------------------------------------

def operator_client(cluster):
    "An MlflowClient of the tracking server, as the operator (MLflow reads the user from the environment)."
    from mlflow.tracking import MlflowClient
    os.environ.update(MLFLOW_TRACKING_USERNAME=OPERATOR, MLFLOW_TRACKING_PASSWORD=cluster["passwords"][OPERATOR])
    return MlflowClient(cluster["tracking_uri"])


@pytest.fixture(autouse=True)
def _no_tracking_user_left():
    "Each test that needs a tracking user sets it; none is left in this process's environment for the next module."
    yield
    for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"): os.environ.pop(k, None)


@LONG
def test_job_finishes_on_the_trainer_node(cluster, job):
    assert job["status"] == "FINISHED", job["error"]
    assert job["auth_mode"] == "token"
    assert len(job["worker_nodes"]) == 1 and len(job["other_nodes"]) == 1, job
    run = operator_client(cluster).get_run(job["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["ml_prod.ray_node"] == job["worker_nodes"][0]
    assert run.data.tags["ml_prod.ray_node"] != job["other_nodes"][0]
    assert run.data.tags["ml_prod.profile"] == "cluster"
    assert run.data.metrics["on_worker"] == 1


@LONG
def test_artifacts_go_through_the_proxy(cluster, job):
    c = operator_client(cluster)
    run = c.get_run(job["run_id"])
    assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri
    names = {a.path for a in c.list_artifacts(job["run_id"])}
    assert {"on_worker.ipynb", "hello.txt", "job.log", "provenance"} <= names, names
    stored = cluster["artifacts"] / run.info.experiment_id / job["run_id"] / "artifacts"
    assert (stored / "hello.txt").read_text() == "hello"
    executed = nbformat.read(stored / "on_worker.ipynb", as_version=4)
    assert any("kernel pid" in o.get("text", "") for cell in executed.cells for o in cell.get("outputs", []))
    assert (stored / "provenance" / "on_worker.ipynb").is_file()


# Runs in its own Python process: logs the tiny serving model (with the model_config of its third argument, JSON) to the
# tracking server and registers it as tiny@ALIAS (its fourth argument, default champion).
REGISTER = '''
import json, sys, mlflow, pandas as pd
from mlflow.models import infer_signature
from ml_prod.models.registry import register
from ml_prod.settings import load_settings
settings_path, model_code, config, alias = (sys.argv[1:] + ["null", "champion"])[:4]
s = load_settings("cluster", path=settings_path, env={})
mlflow.set_tracking_uri(s.tracking_uri)
mlflow.set_experiment("serving")
X = pd.DataFrame({"amount": [10.0, 250.0], "country": ["US", "FR"]})
with mlflow.start_run() as run:
    mlflow.pyfunc.log_model(name="model", python_model=model_code, model_config=json.loads(config), signature=infer_signature(X, pd.DataFrame({"score": [0.1, 0.9]})), input_example=X)
print("VERSION", register(s, run.info.run_id, "tiny", alias=alias))
'''


def cli(cluster):
    "`ml_prod ... --profile cluster` in the test's folder, as the operator (the nodes' environment); asserts it succeeds unless check=False."
    env = {k: v for k, v in cluster["env"].items() if k != "RAY_AUTH_MODE"}  # ml_prod sets it
    def ml_prod(*args, check=True):
        r = subprocess.run([str(BIN / "ml_prod"), *args, "--profile", "cluster"], cwd=cluster["tmp"], env=env, capture_output=True, text=True, timeout=300)
        assert not check or r.returncode == 0, f"ml_prod {' '.join(args)} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        return r
    return ml_prod


@pytest.fixture(scope="module")
def tiny(cluster):
    "The tiny serving model, logged by the operator and registered as tiny@champion (version 1)."
    tmp = cluster["tmp"]
    env = {k: v for k, v in cluster["env"].items() if k != "RAY_AUTH_MODE"}
    (tmp / "register.py").write_text(REGISTER)
    r = subprocess.run([sys.executable, str(tmp / "register.py"), str(cluster["settings"]), str(Path(__file__).parent / "tiny_model.py")],
                       cwd=tmp, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0 and "VERSION 1" in r.stdout, r.stderr[-3000:]
    return "models:/tiny@champion"


@LONG
def test_serving_on_two_nodes_audits_to_shared_storage(cluster, tiny):
    "Two replicas, one on each node, answer over HTTP; every answer has its audit record in the profile's shared audit_dir."
    import httpx
    import yaml
    from ml_prod.audit.store import compact
    from ml_prod.audit.query import query
    tmp = cluster["tmp"]
    ml_prod = cli(cluster)

    # 1 CPU a replica on nodes of 1 CPU each: one replica lands on each node
    spec = {"applications": [{"name": "mn", "arms": {"main": {"model": "models:/tiny@champion", "weight": 1}}, "replicas": 2, "num_cpus": 1}]}
    (tmp / "spec.yaml").write_text(yaml.safe_dump(spec))
    ml_prod("serve", "up", "spec.yaml")
    try:
        st = json.loads(ml_prod("serve", "status", "--json").stdout)[0]
        reps = [x for x in st["replicas"] if x["state"] == "RUNNING"]
        assert len(reps) == 2 and len({x["node_id"] for x in reps}) == 2, reps  # one on each node
        assert all(x["url"] for x in reps), reps  # direct ingress: the nodes were started with SERVE_ENV

        # requests straight to each replica, and through Ray's proxy
        answered = []
        for x in reps:
            with httpx.Client(base_url=x["url"], timeout=30) as c:
                assert c.get("/-/status").json()["replica"] == x["id"]
                for k in range(15):
                    r = c.post("/predict", json={"amount": 250.0, "country": "US"}, headers={"x-request-id": f"{x['id']}-{k}"})
                    assert r.status_code == 200, r.text
                    answered.append(r.json()["request_id"])
        with httpx.Client(base_url=st["url"], timeout=30) as c:
            proxied = [c.post("/predict", json={"amount": 1.0, "country": "FR"}, headers={"x-request-id": f"proxy-{k}"}) for k in range(10)]
        assert [r.status_code for r in proxied] == [200] * 10, [(r.status_code, r.text[:200]) for r in proxied]
        answered += [r.json()["request_id"] for r in proxied]

        # the audit log is in the profile's audit_dir, on storage both nodes share: one record per answered request, from both replicas
        audit_dir = load_settings("cluster", path=cluster["settings"], env={}).audit_dir
        assert Path(audit_dir) == tmp / "audit"
        compact(audit_dir, "mn")
        df = query(audit_dir, "mn", include_shadow=False)
        counts = df[df.status == 200].groupby("request_id").size()
        missing = set(answered) - set(counts.index)
        assert not missing, f"{len(missing)} answered requests have no audit record, e.g. {sorted(missing)[:5]}"
        assert (counts[answered] == 1).all(), counts[counts > 1]
        assert set(df[df.request_id.isin(answered)].replica) == {x["id"] for x in reps}
    finally:
        ml_prod("serve", "down", check=False)


# Runs in its own Python process: Ray Serve's own details of what is deployed (its controller's copy of each app's config).
SERVE_DETAILS = '''
import json, sys
from ml_prod.settings import load_settings
from ml_prod.serving.control import serve_client
s = load_settings("cluster", path=sys.argv[1], env={})
import ray.serve.context
serve_client(s, start=False)
print("DETAILS " + json.dumps(ray.serve.context._global_client.get_serve_details(), default=str))
'''


def files_holding(needles: list[str], folders: list[Path], skip: set[Path]) -> list[str]:
    "Files under `folders` (but not `skip`) whose bytes contain one of `needles`."
    found = []
    for folder in folders:
        for f in Path(folder).rglob("*"):
            try:
                if f in skip or not f.is_file() or f.stat().st_size > 200 * 1024**2: continue
                data = f.read_bytes()
            except OSError: continue
            if any(n.encode() in data for n in needles): found.append(str(f))
    return found


def wait_for(what: str, probe, timeout: float = 180, every: float = 2):
    "The first truthy result of `probe()`, polled every `every` s; fails after `timeout` s with the last result."
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        if last := probe(): return last
        time.sleep(every)
    pytest.fail(f"{what}: not within {timeout} s")


@LONG
def test_replicas_read_the_registry_as_the_read_only_user(cluster, tiny):
    """Replicas call the tracking server as `replica`, the user of the profile's replica_tracking_credentials file, not as the
    operator their nodes run as: once `replica`'s password changes on the server, a replica started afterwards cannot load its
    model with the old file (the server answers 401), and it can once the file holds the new password. No password of the
    file is in Ray's config of the app, `serve status`, the tracking store (the served history), Ray's logs or the audit log."""
    import httpx
    import yaml
    tmp, url, pw, creds = cluster["tmp"], cluster["tracking_uri"], cluster["passwords"], cluster["replica_credentials"]
    ml_prod = cli(cluster)
    env = {k: v for k, v in cluster["env"].items() if k != "RAY_AUTH_MODE"}
    spec = {"applications": [{"name": "ro", "arms": {"main": {"model": tiny, "weight": 1}}, "replicas": 1, "num_cpus": 1}]}
    (tmp / "ro.yaml").write_text(yaml.safe_dump(spec))
    status = lambda: json.loads(ml_prod("serve", "status", "--json").stdout)[0]
    def predict(st) -> int:
        try:
            with httpx.Client(base_url=st["url"], timeout=30) as c: return c.post("/predict", json={"amount": 250.0, "country": "US"}).status_code
        except httpx.HTTPError: return 0
    def details() -> str:
        r = subprocess.run([sys.executable, "-c", SERVE_DETAILS, str(cluster["settings"])], cwd=tmp, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout.split("DETAILS ", 1)[1]
    ml_prod("serve", "up", "ro.yaml")
    new_password = uuid.uuid4().hex
    try:
        st = status()
        (first,) = [x for x in st["replicas"] if x["state"] == "RUNNING"]
        assert predict(st) == 200
        # Ray's copy of the app's config names the file, and holds no password
        raw = details()
        app_args = json.loads(raw)["applications"]["ro"]["deployed_app_config"]["args"]
        assert app_args["settings"]["tracking_credentials_file"] == str(creds), app_args["settings"]
        assert pw[READER] not in raw and pw[OPERATOR] not in raw

        # the server changes `replica`'s password (as admin); the replica running keeps its model, the file still has the old one
        status_code, body = api(url, "/api/2.0/mlflow/users/update-password", "admin", pw["admin"],
                                {"username": READER, "password": new_password}, method="PATCH")
        assert status_code == 200, (status_code, body[:300])
        assert api(url, "/api/2.0/mlflow/registered-models/get?name=tiny", READER, pw[READER])[0] == 401
        assert api(url, "/api/2.0/mlflow/registered-models/get?name=tiny", READER, new_password)[0] == 200
        # a replica started now (Serve replaces the one killed) is refused by the server: it called it as `replica`,
        # although its node's environment holds the operator's user, whose password still works
        psutil.Process(first["pid"]).kill()
        def refused():  # Ray's message of the deployment: why its replica failed to start
            dep = json.loads(details())["applications"]["ro"]["deployments"]["Endpoint"]
            return dep if "401" in dep["message"] and not [x for x in dep["replicas"] if x["state"] == "RUNNING"] else None
        dep = wait_for("a replacement replica refused by the tracking server", refused, every=1)
        assert "cannot load models:/tiny/1" in dep["message"], dep["message"][:2000]
        assert predict(st) != 200

        # with the new password in the file, Serve's next try starts a replica that serves again
        write_credentials(creds, READER, new_password)
        def serving():
            s = status()
            running = [x for x in s["replicas"] if x["state"] == "RUNNING" and x["id"] != first["id"]]
            return s if running and predict(s) == 200 else None
        wait_for("a replacement replica with the new password", serving, timeout=240)

        # neither password is anywhere the deployment left anything: status, the tracking store, artifacts, Ray's logs, the audit log
        needles = [pw[READER], new_password]
        assert not any(n in ml_prod("serve", "status", "--json").stdout for n in needles)
        dump = subprocess.run([str(cluster["postgres"].bin / "pg_dump"), "-h", "127.0.0.1", "-p", str(cluster["postgres"].port), "-U", "postgres", "mlflow"],
                              env={**os.environ, "PGPASSWORD": cluster["postgres"].password}, capture_output=True, text=True, timeout=120)
        assert dump.returncode == 0 and "serving/ro" in dump.stdout, dump.stderr[-2000:]  # the served history is in it
        assert not any(n in dump.stdout for n in needles)
        hits = files_holding(needles, [tmp, *map(Path, cluster["ray_temp_dirs"])], skip={creds})
        assert not hits, hits
    finally:
        ml_prod("serve", "down", check=False)
        write_credentials(creds, READER, pw[READER])
        api(url, "/api/2.0/mlflow/users/update-password", "admin", pw["admin"], {"username": READER, "password": pw[READER]}, method="PATCH")


@LONG
def test_batch_scoring_spreads_over_both_nodes(cluster, job, tiny):
    """`ml_prod batch score` on the two-node cluster: its scoring actors run on both nodes (each model call writes its
    process's Ray node id to a file), and every input row is in the output once, scored by the version resolved."""
    import numpy as np
    import pandas as pd
    import pyarrow.parquet as pq
    tmp, ml_prod = cluster["tmp"], cli(cluster)
    env = {k: v for k, v in cluster["env"].items() if k != "RAY_AUTH_MODE"}
    nodes_file = tmp / "batch_nodes.txt"
    r = subprocess.run([sys.executable, str(tmp / "register.py"), str(cluster["settings"]), str(Path(__file__).parent / "tiny_model.py"),
                        json.dumps({"nodes_file": str(nodes_file), "delay": 0.2}), "batch"], cwd=tmp, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0 and "VERSION" in r.stdout, r.stderr[-3000:]
    version = r.stdout.split("VERSION")[1].split()[0]
    inp = tmp / "batch_in"; inp.mkdir()
    rng = np.random.default_rng(5)
    for i in range(8):  # 8 files of 500 rows, 100 a model call: 40 calls of 0.2 s to share
        pd.DataFrame({"id": np.arange(i * 500, (i + 1) * 500), "amount": rng.uniform(0, 400, 500),
                      "country": rng.choice(["US", "FR"], 500)}).to_parquet(inp / f"part-{i}.parquet")
    # actors of 0.75 CPU on nodes of 1 CPU each: one fits on a node, with room beside it for the reads (0.25 CPU)
    out = json.loads(ml_prod("--json", "batch", "score", "--model", "tiny@batch", "--input", str(inp), "--output", str(tmp / "batch_out"),
                             "--cpus", "0.75", "--actors", "2", "--batch-size", "100").stdout)
    assert (out["rows_scored"], out["model"]) == (4000, f"models:/tiny/{version}"), out
    nodes = [line.split()[0] for line in nodes_file.read_text().splitlines()]
    assert len(nodes) >= 40 and set(nodes) == {*job["worker_nodes"], *job["other_nodes"]}, (len(nodes), set(nodes), job)
    got = pd.concat([pq.read_table(f).to_pandas() for f in sorted((tmp / "batch_out").glob("*.parquet"))])
    assert sorted(got["id"]) == list(range(4000)) and set(got["model_version"]) == {version}


@LONG
def test_tracking_server_needs_a_user_and_the_reader_cannot_write(cluster, job):
    "The store lives in PostgreSQL; anonymous calls are refused; the read-only user reads the job's run and model but writes nothing."
    url, pw, run_id = cluster["tracking_uri"], cluster["passwords"], job["run_id"]
    status, body = api(url, f"/api/2.0/mlflow/runs/get?run_id={run_id}")
    assert status == 401, (status, body[:200])
    status, body = api(url, f"/api/2.0/mlflow/runs/get?run_id={run_id}", READER, "wrong password")
    assert status == 401, (status, body[:200])
    status, body = api(url, f"/api/2.0/mlflow/runs/get?run_id={run_id}", READER, pw[READER])
    assert status == 200 and json.loads(body)["run"]["info"]["status"] == "FINISHED", (status, body[:200])
    experiment = json.loads(body)["run"]["info"]["experiment_id"]
    for path, data in [("/api/2.0/mlflow/runs/create", {"experiment_id": experiment}),
                       ("/api/2.0/mlflow/runs/set-tag", {"run_id": run_id, "key": "forged", "value": "1"}),
                       ("/api/2.0/mlflow/runs/update", {"run_id": run_id, "status": "FAILED"})]:
        status, body = api(url, path, READER, pw[READER], data)
        assert status == 403, (path, status, body[:200])
    assert operator_client(cluster).get_run(run_id).info.status == "FINISHED" and "forged" not in operator_client(cluster).get_run(run_id).data.tags
    # the runs are rows of PostgreSQL, not of a SQLite file
    import psycopg
    with psycopg.connect(cluster["postgres"].uri("mlflow").replace("+psycopg", "")) as conn:
        rows = conn.execute("SELECT status FROM runs WHERE run_uuid = %s", (run_id,)).fetchall()
    assert rows == [("FINISHED",)], rows
    assert not list(cluster["tmp"].glob("*.db")), "a SQLite store appeared next to the tracking server"


# Runs in its own Python process, as a notebook's kernel on a laptop would: the panels' plain-Python states on the cluster profile
# (the Ray cluster and the tracking server both remote to this process). The launcher's state launches the job notebook on the
# trainer node and is refreshed until it ends; the runs panel's state then lists the job's experiment.
PANELS = '''
import json, sys, time
from ml_prod.settings import load_settings
from ml_prod.ui.launcher import LauncherState
from ml_prod.ui.runs import RunsState
settings_path, notebook, cwd = sys.argv[1:4]
s = load_settings("cluster", path=settings_path, env={})
st = LauncherState(notebook, s, resources={"trainer": 1}, cwd=cwd, run_name="from_the_launcher")
assert st.set("greeting", "from the panel") is None, st.errors
t0 = time.monotonic()
st.launch()
launch_s, seen = time.monotonic() - t0, set()
deadline = time.monotonic() + 150
while not st.refresh() and time.monotonic() < deadline:
    seen.add(st.status); time.sleep(0.5)
ended_s = time.monotonic() - t0
seen.add(st.status)
runs = RunsState(st.experiment_id, s)
rows = runs.refresh()
print("PANELS " + json.dumps(dict(
    run_id=st.handle.run_id, status=st.status, seen=sorted(seen), error=st.result and st.result.error, links=st.links(),
    log=st.log, experiment_id=st.experiment_id, launch_s=launch_s, ended_s=ended_s,
    rows=[dict(run_id=r["run_id"], name=r["name"], status=r["status"], metrics=r["metrics"]) for r in rows], columns=runs.columns,
)), flush=True)
import ray
print("TRAINER " + json.dumps([n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("trainer")]), flush=True)
ray.shutdown()
'''


@LONG
def test_panels_states_on_the_remote_cluster(cluster):
    """The launcher's and the runs panel's plain-Python states, from a driver on the cluster profile (Ray at the GCS address of
    `ray start`, MLflow the PostgreSQL-backed tracking server): the launched job ends FINISHED in the state and in PostgreSQL's
    runs table, its run links to the tracking server's UI, and the runs panel lists exactly the experiment's runs of PostgreSQL.
    (The module's fixture serves no application, so the deployments panel is not driven here.)"""
    import psycopg
    tmp = cluster["tmp"]
    nb = make_notebook(tmp / "from_panel.ipynb")
    (tmp / "panels.py").write_text(PANELS)
    env = {k: v for k, v in cluster["env"].items() if k != "RAY_AUTH_MODE"}  # ml_prod.cluster.connect sets it
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, str(tmp / "panels.py"), str(cluster["settings"]), str(nb), str(tmp)],
                       env=env, cwd=tmp, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    lines = [l for l in r.stdout.splitlines() if l.startswith("PANELS ")]
    assert r.returncode == 0 and lines, f"panels driver failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    got = json.loads(lines[-1][len("PANELS "):])
    print(f"driver {time.monotonic() - t0:.1f} s; launch returned in {got['launch_s']:.2f} s, FINISHED in the state after {got['ended_s']:.1f} s")
    assert got["status"] == "FINISHED", got["error"]
    run_id, exp = got["run_id"], got["experiment_id"]
    # the tracking server's store: PostgreSQL's own rows
    with psycopg.connect(cluster["postgres"].uri("mlflow").replace("+psycopg", "")) as conn:
        (status, name, exp_id), = conn.execute("SELECT status, name, experiment_id FROM runs WHERE run_uuid = %s", (run_id,)).fetchall()
        params = dict(conn.execute("SELECT key, value FROM params WHERE run_uuid = %s", (run_id,)).fetchall())
        node = conn.execute("SELECT value FROM tags WHERE run_uuid = %s AND key = 'ml_prod.ray_node'", (run_id,)).fetchall()
        in_exp = dict(conn.execute("SELECT run_uuid, status FROM runs WHERE experiment_id = %s AND lifecycle_stage = 'active'", (exp_id,)).fetchall())
    assert (status, name, str(exp_id)) == ("FINISHED", "from_the_launcher", exp) and params["greeting"] == "from the panel", (status, name, exp_id, params)
    trainer = json.loads(r.stdout.split("TRAINER ", 1)[1].splitlines()[0])
    assert node == [(trainer[0],)] and len(trainer) == 1, (node, trainer)  # the job ran on the node with the `trainer` resource
    # the run's link is the tracking server's UI page; the executed notebook and the job's output came back through the server
    assert got["links"]["run"] == f"{cluster['tracking_uri']}/#/experiments/{exp}/runs/{run_id}", got["links"]
    stored = cluster["artifacts"] / exp / run_id / "artifacts"
    assert (stored / "hello.txt").read_text() == "from the panel" and (stored / "job.log").read_text() == got["log"]
    assert f"run {run_id}" in got["log"], got["log"][-2000:]
    # the runs panel's state lists the experiment's runs, as PostgreSQL has them, the launcher's run among them
    rows = {x["run_id"]: x for x in got["rows"]}
    assert {k: x["status"] for k, x in rows.items()} == in_exp, (rows, in_exp)
    assert rows[run_id]["name"] == "from_the_launcher" and rows[run_id]["metrics"].get("on_worker") == 1.0
    assert "metrics.on_worker" in got["columns"], got["columns"]


def problems(e: ConfigError) -> set[str]:
    "The settings a node-local storage error lists, one per indented line."
    return {m.group(1) for m in re.finditer(r"^  (\w+) = ", str(e), re.M)}


def test_multi_node_profile_with_sqlite_is_refused(tmp_path):
    "The cluster profile with a SQLite tracking store is refused unless its storage is declared shared."
    ini = tmp_path / "settings.ini"
    sqlite = f"sqlite:///{tmp_path}/mlflow.db"
    ini.write_text(cluster_profile("127.0.0.1:6399", sqlite, tmp_path, shared=False))
    with pytest.raises(ConfigError, match="node-local storage") as e:
        load_settings("cluster", path=ini, env={})
    assert problems(e.value) == {"tracking_uri", "registry_uri", "audit_dir"}  # mlflow-artifacts:/ goes through the server
    # multi_node alone (no ray_address) is enough to be refused
    ini.write_text(cluster_profile("", sqlite, tmp_path, shared=False))
    with pytest.raises(ConfigError, match="node-local storage"):
        load_settings("cluster", path=ini, env={})
    # a tracking server: only the local audit_dir is left, which is why the cluster profile says storage_is_shared
    ini.write_text(cluster_profile("127.0.0.1:6399", "http://127.0.0.1:5000", tmp_path, shared=False))
    with pytest.raises(ConfigError, match="node-local storage") as e:
        load_settings("cluster", path=ini, env={})
    assert problems(e.value) == {"audit_dir"}
    ini.write_text(cluster_profile("127.0.0.1:6399", "http://127.0.0.1:5000", tmp_path, shared=True))
    s = load_settings("cluster", path=ini, env={})
    assert s.is_multi_node and s.storage_is_shared and s.artifact_location == "mlflow-artifacts:/"
    # SQLite stays refused when the storage is declared shared: its locks do not hold on network mounts
    ini.write_text(cluster_profile("127.0.0.1:6399", sqlite, tmp_path, shared=True))
    with pytest.raises(ConfigError, match="(?i)sqlite"):
        load_settings("cluster", path=ini, env={})


# ---- the control service on the two-node cluster ----------------------------------------------------------------

# Runs in its own Python process, from the second node's side (its own settings.ini and state folder, the same profile and
# store): one more instance of the control service (no tasks: only its lease), started with `start(wait_s)`. Exits 1 with
# the refusal on stderr, or prints ACTIVE and holds the lease (renewing it) until it is killed.
SECOND_SERVICE = '''
import sys, threading
from ml_prod.control.service import ControlError, ControlService
from ml_prod.settings import load_settings
settings_path, holder, wait_s = sys.argv[1], sys.argv[2], float(sys.argv[3])
svc = ControlService(load_settings("cluster", path=settings_path, env={}), tasks=[], handlers={}, holder=holder)
try: svc.start(wait_s=wait_s)
except ControlError as e:
    print(f"REFUSED {e}", file=sys.stderr, flush=True); sys.exit(1)
print("ACTIVE", flush=True)
threading.Event().wait()
'''


def control_records(cluster, stream: str = "control") -> dict[str, dict]:
    """The raw records of event stream `stream` (default the control service's), straight from the tracking server's PostgreSQL:
    one MLflow run an event, its tags (kind, the JSON payload in parts) and its last `ml_prod.lease_beat` metric. Keyed by run id."""
    import psycopg
    with psycopg.connect(cluster["postgres"].uri("mlflow").replace("+psycopg", "")) as conn:
        rows = conn.execute("""
            SELECT r.run_uuid, r.status, r.start_time, r.end_time, t.key, t.value FROM runs r
            JOIN experiments e ON e.experiment_id = r.experiment_id JOIN tags t ON t.run_uuid = r.run_uuid
            WHERE e.name = 'ml_prod.events'
              AND r.run_uuid IN (SELECT run_uuid FROM tags WHERE key = 'ml_prod.stream' AND value = %s)""", (stream,)).fetchall()
        beats = dict(conn.execute("SELECT run_uuid, value FROM latest_metrics WHERE key = 'ml_prod.lease_beat'").fetchall())
    runs: dict[str, dict] = {}
    for run_id, st, start, end, key, value in rows:
        r = runs.setdefault(run_id, dict(id=run_id, status=st, start=start / 1000, end=end and end / 1000, beat=beats.get(run_id), tags={}))
        r["tags"][key] = value
    for r in runs.values():
        t = r.pop("tags")
        r["kind"] = t["ml_prod.kind"]
        r["data"] = json.loads("".join(t[f"ml_prod.payload.{i}"] for i in range(int(t["ml_prod.payload_parts"]))))
    return runs


def open_claims(cluster) -> list[dict]:
    "The claims of the lease still open (their runs RUNNING), from the raw records."
    return [r for r in control_records(cluster).values() if r["kind"] == "claim" and r["status"] == "RUNNING"]


def sole_holder(cluster, holder_prefix: str, ttl_s: float):
    "The one open claim, if there is exactly one, its holder starts with `holder_prefix` and it was renewed within `ttl_s`."
    claims = open_claims(cluster)
    if len(claims) == 1 and claims[0]["data"]["holder"].startswith(holder_prefix) and claims[0]["beat"] and claims[0]["beat"] > time.time() - ttl_s:
        return claims[0]


FOLLOWED_APP, FOLLOWED_ALIAS = "mnctl", "mn_follow"  # part (d): an endpoint on an alias that is not guarded (not champion)
FOLLOW_DEADLINE_S = 180  # liveness only: the follower looks every second, the update starts a replica on 2 busy cores


@LONG
def test_control_service_lease_on_two_nodes(cluster):
    """The control service on the multi-node profile, its lease read from the raw records in PostgreSQL:
    (a) `ml_prod control start` runs it on the cluster, where it holds the lease and renews it;
    (b) from the second node's side (its own state folder, the same profile and store) `control start` answers with that same
        instance (one per cluster), and a second instance refuses (exit 1) naming the holder, which keeps the lease;
    (c) once `control stop` has freed the lease, that second instance takes it; `control start` then refuses (exit 1, the
        message names it); SIGKILL it, and `control start` takes over once its lease has expired, within TTL_S (+ margin),
        never before;
    (d) the new holder does the service's work: an endpoint on `tiny@mn_follow`, the alias moved with MLflow's raw
        `MlflowClient.set_registered_model_alias`, answers over HTTP from the new version within FOLLOW_DEADLINE_S, every
        request answered; the raw records show the follower's claim on the application taken by the new holder's process.
    About 130 s on 2 cores (measured 131 s alone, 64 s of it before (d)), plus the cluster fixture's 27-70 s when run alone."""
    from ml_prod.control.service import RENEW_S, TTL_S
    tmp, env = cluster["tmp"], {k: v for k, v in cluster["env"].items() if k != "RAY_AUTH_MODE"}
    other = tmp / "node2"; other.mkdir(exist_ok=True)  # the second node's side: its own state folder
    (other / "settings.ini").write_text(cluster["settings"].read_text().replace(f"state_dir = {tmp}/.ml_prod", f"state_dir = {other}/.ml_prod"))
    assert f"state_dir = {other}/.ml_prod" in (other / "settings.ini").read_text()

    def ml_prod(*args, cwd=tmp):
        return subprocess.run([str(BIN / "ml_prod"), *args, "--profile", "cluster"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)

    def second(holder: str, wait_s: float) -> tuple[subprocess.Popen, Path]:
        out = other / f"{holder}-{len(procs)}.out"
        with open(out, "w") as f:
            p = subprocess.Popen([sys.executable, "-c", SECOND_SERVICE, str(other / "settings.ini"), holder, str(wait_s)],
                                 cwd=other, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)
        procs.append(p)
        return p, out

    standby = f"standby-{uuid.uuid4().hex[:8]}"
    procs: list[subprocess.Popen] = []
    # (d)'s two model versions, registered meanwhile (two registrations of the tiny model: about 30 s on 2 cores)
    (tmp / "register.py").write_text(REGISTER)
    model, reg = Path(__file__).parent / "tiny_model.py", tmp / "register_follow.out"
    register = [f"{sys.executable} {tmp / 'register.py'} {cluster['settings']} {model} '{{\"offset\": {o}}}' {a}"
                for o, a in ((0.0, FOLLOWED_ALIAS), (0.5, "mn_spare"))]
    with open(reg, "w") as f:
        registering = subprocess.Popen(["bash", "-c", " && ".join(register)], cwd=tmp, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)
    procs.append(registering)
    try:
        # (a) the service starts on the cluster and holds the lease: one open claim, the actor's, renewed
        r = ml_prod("control", "start")
        assert r.returncode == 0 and "holds the lease: yes" in r.stdout, (r.returncode, r.stdout, r.stderr[-3000:])
        first = wait_for("the actor's claim, renewed", lambda: sole_holder(cluster, "actor-", TTL_S), timeout=30, every=0.5)
        assert first["data"]["holder"] in r.stdout and psutil.pid_exists(first["data"]["pid"]), (first, r.stdout)
        beat = first["beat"]
        wait_for("a renewal of the actor's claim", lambda: (open_claims(cluster) or [{}])[0].get("beat", 0) > beat, timeout=30, every=0.5)

        # (b) from the other side: `control start` finds the same instance; a second instance refuses and names it
        r = ml_prod("control", "start", cwd=other)
        assert r.returncode == 0 and f"control service {first['data']['holder']} running" in r.stdout, (r.stdout, r.stderr[-3000:])
        p, out = second(standby, wait_s=0)
        assert p.wait(120) == 1, out.read_text()[-3000:]
        assert f"another control service holds the lease: {first['data']['holder']} (pid {first['data']['pid']} on " in out.read_text(), out.read_text()
        records = control_records(cluster)
        refused = [x for x in records.values() if x["kind"] == "refused" and x["data"]["holder"] == standby]
        assert len(refused) == 1 and refused[0]["data"]["active"] == first["data"]["holder"], refused
        assert [x["status"] for x in records.values() if x["kind"] == "claim" and x["data"]["holder"] == standby] == ["KILLED"]
        assert [x["id"] for x in open_claims(cluster)] == [first["id"]]  # the holder keeps its lease

        # (c) the lease freed by `control stop`, the second instance takes it at once
        r = ml_prod("control", "stop")
        assert r.returncode == 0 and "control service stopped" in r.stdout, (r.stdout, r.stderr[-3000:])
        assert control_records(cluster)[first["id"]]["status"] == "FINISHED" and not open_claims(cluster)
        p, out = second(standby, wait_s=0)
        wait_for("the second instance active", lambda: "ACTIVE" in out.read_text() or p.poll() is not None, timeout=120, every=0.5)
        assert p.poll() is None, out.read_text()[-3000:]
        held = wait_for("the second instance's claim, renewed", lambda: sole_holder(cluster, standby, TTL_S), timeout=30, every=0.5)
        assert held["data"]["pid"] == p.pid, held

        # ... the cluster's service now refuses, naming it, and leaves no actor behind
        r = ml_prod("control", "start")
        assert r.returncode == 1, (r.returncode, r.stdout, r.stderr[-3000:])
        assert f"another control service holds the lease: {standby} (pid {p.pid} on " in r.stderr and "Stop it first" in r.stderr, r.stderr[-3000:]
        assert [x["id"] for x in open_claims(cluster)] == [held["id"]]

        # ... SIGKILL the holder: it never releases its lease; `control start` waits for it to expire, then takes it
        last_beat = control_records(cluster)[held["id"]]["beat"]
        killed_at = time.time()
        p.send_signal(signal.SIGKILL); p.wait(30)
        r = ml_prod("control", "start")
        took = time.time() - killed_at
        assert r.returncode == 0 and "holds the lease: yes" in r.stdout, (r.returncode, r.stdout, r.stderr[-3000:])
        new = wait_for("the new actor's claim, renewed", lambda: sole_holder(cluster, "actor-", TTL_S), timeout=30, every=0.5)
        gone = control_records(cluster)[held["id"]]
        assert gone["status"] == "KILLED" and gone["end"] is not None, gone  # closed by the new holder: its own never renews again
        final_beat = gone["beat"]
        assert final_beat >= last_beat and final_beat <= killed_at + 0.5, (final_beat, last_beat, killed_at)
        # not before the lease expired, and within TTL_S (+ one renewal, + a generous margin for 2 busy cores) of the kill
        assert gone["end"] >= final_beat + TTL_S - 0.5, (gone, TTL_S)
        assert gone["end"] - killed_at <= TTL_S + RENEW_S + 20, (gone["end"] - killed_at, gone)
        assert new["data"]["holder"] != first["data"]["holder"] and new["data"]["pid"] not in (first["data"]["pid"], p.pid), (new, first)
        assert psutil.pid_exists(new["data"]["pid"])
        print(f"\ncontrol service takeover after SIGKILL: lease closed {gone['end'] - killed_at:.1f} s after the kill "
              f"(TTL_S {TTL_S:g} s), `control start` returned after {took:.1f} s")

        # (d) the new holder follows aliases: an endpoint on tiny@mn_follow; the alias moved with MLflow's raw client
        assert registering.wait(240) == 0, reg.read_text()[-3000:]
        old_v, new_v = re.findall(r"^VERSION (\d+)$", reg.read_text(), re.M)
        spec = {"applications": [{"name": FOLLOWED_APP, "arms": {"main": {"model": f"models:/tiny@{FOLLOWED_ALIAS}", "weight": 1}}, "num_cpus": 0}]}
        (tmp / f"{FOLLOWED_APP}.yaml").write_text(json.dumps(spec))
        r = ml_prod("serve", "up", f"{FOLLOWED_APP}.yaml")
        assert r.returncode == 0, (r.stdout, r.stderr[-3000:])
        r = ml_prod("serve", "status", "--json")
        base = next(a for a in json.loads(r.stdout) if a["app"] == FOLLOWED_APP)["url"]
        import httpx
        answers = []
        def answer() -> str | None:
            try:
                with httpx.Client(base_url=base, timeout=30) as c: x = c.post("/predict", json={"amount": 250.0, "country": "US"})
            except httpx.HTTPError as e: answers.append((type(e).__name__, None)); return None
            answers.append((x.status_code, x.json().get("version") if x.status_code == 200 else x.text[:200]))
            return answers[-1][1]
        assert answer() == old_v, answers
        moved_at = time.time()
        operator_client(cluster).set_registered_model_alias("tiny", FOLLOWED_ALIAS, new_v)
        wait_for(f"an answer from version {new_v} after the raw alias move", lambda: answer() == new_v, timeout=FOLLOW_DEADLINE_S, every=0.2)
        served_after = time.time() - moved_at
        assert all(st == 200 for st, _ in answers), [a for a in answers if a[0] != 200][:5]
        versions = [v for _, v in answers]
        assert set(versions[versions.index(new_v):]) == {new_v}, versions  # no answer from the old version once the new one served
        # the raw records: the follower noticed the move, took the application's claim in the new holder's process, and
        # recorded the update once it had put the version into service (after the answers switched: wait for it)
        def history():
            h = sorted(control_records(cluster, f"serving/{FOLLOWED_APP}").values(), key=lambda x: x["start"])
            return h if any(x["kind"] == "update" and x["start"] >= moved_at for x in h) else None
        events = wait_for("the follower's update in the served history", history, timeout=60, every=1)
        moved = [x for x in events if x["start"] >= moved_at]
        assert [x["kind"] for x in moved] == ["alias_moved", "update"], [(x["kind"], x["data"]) for x in moved]
        assert moved[0]["data"]["target"] == {"main": f"models:/tiny/{new_v}"}, moved[0]
        claims = [x for x in control_records(cluster, f"serving/{FOLLOWED_APP}/claim").values()
                  if x["kind"] == "claim" and x["data"]["purpose"] == "alias follower" and x["start"] >= moved_at]
        assert claims and {x["data"]["pid"] for x in claims} == {new["data"]["pid"]}, (claims, new)
        print(f"alias moved with MlflowClient: noticed after {moved[0]['start'] - moved_at:.1f} s, the endpoint answered from "
              f"version {new_v} after {served_after:.1f} s; {len(answers)} requests, none failed")
    finally:
        ml_prod("serve", "down", FOLLOWED_APP)
        ml_prod("control", "stop")
        for p in procs:
            if p.poll() is None: p.kill(); p.wait(30)
