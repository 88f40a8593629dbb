"""One random secret through every path that takes one: a job (that prints it, and in another run raises an
exception quoting it), a two-step pipeline given it through the environment, a two-trial sweep given it as a
fixed secret parameter, and an endpoint serving with it as its API key. Afterwards no byte of it may be left in
the project's state folder (MLflow's SQLite database, artifacts, executed notebooks, logs, the audit log, Tune's
state), in Ray's session folder of the cluster that ran it all, or in the environment of any process still running.

Everything runs on one persistent local cluster of its own (GCS and Serve on free ports), started the way
`ml_prod serve up` starts one (`cluster_up` with Serve's flags) from a shell that holds the API key, and is
driven through the CLI. It runs `ray start`: one test session on the machine at a time."""
from __future__ import annotations

import json
import uuid
from pathlib import Path

import httpx
import nbformat
import psutil
import pytest
from nbformat.v4 import new_code_cell, new_notebook

import os
import subprocess
import sys

from conftest import RECORD, cli, free_ports, in_project, log_version

pytestmark = pytest.mark.slow


def make_job(path: Path) -> Path:
    "A job with a secret parameter that prints it, reports `score`, and with fail=True raises an error quoting it."
    params = new_code_cell('token: str = ""  # the key {secret: true}\nlr: float = 0.1\nfail: bool = False',
                           metadata={"tags": ["parameters"]})
    body = new_code_cell("import ml_prod\nprint('the token is', token)\nml_prod.report(score=lr)\n"
                         "if fail: raise ValueError(f'the service rejected token {token}')")
    nb = new_notebook(cells=[params, body])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def files_holding(root: Path, secret: bytes) -> list[str]:
    "Every file under `root` whose bytes contain `secret`."
    out = []
    for p in root.rglob("*"):
        try:
            if p.is_file() and not p.is_symlink() and secret in p.read_bytes(): out.append(str(p))
        except OSError: pass
    return out


def processes_holding(secret: bytes) -> list[str]:
    "The live processes (that this user may inspect) with `secret` in their environment or command line."
    out = []
    for p in psutil.process_iter(["pid", "name"]):
        try:
            raw = Path(f"/proc/{p.pid}/environ").read_bytes() + Path(f"/proc/{p.pid}/cmdline").read_bytes()
            if secret in raw: out.append(f"{p.pid} {p.info['name']}")
        except (OSError, psutil.Error): pass
    return out


def start_cluster(root: Path, gcs: int, env: dict):
    "The project's persistent local cluster, started as `ml_prod serve up` starts it, from a shell with `env`."
    code = ("from ml_prod.runtime.cluster import cluster_up\nfrom ml_prod.serving.spec import SERVE_ENV\n"
            f"from ml_prod.settings import load_settings\ncluster_up(load_settings(), port={gcs}, env=SERVE_ENV)\n")
    subprocess.run([sys.executable, "-c", code], cwd=root, env={**os.environ, **env}, check=True, timeout=300)


@pytest.fixture
def secret_project(tmp_path):
    "A project with its own Serve port, as the working directory; its cluster is stopped at the end."
    root = tmp_path / "secretive"
    root.mkdir()
    gcs, serve = free_ports(2)
    (root / "settings.ini").write_text(f"[DEFAULT]\nserve_port = {serve}\n")
    with in_project(root):
        try: yield root, gcs
        finally:
            cli("serve", "down", check=False)
            cli("cluster", "down", check=False)


def test_one_secret_leaves_no_trace(secret_project):
    from ml_prod.runtime.cluster import _temp_dir
    from ml_prod.settings import load_settings
    from ml_prod.tracking import store
    from ml_prod.tracking import tags as keys
    project, gcs = secret_project
    secret = uuid.uuid4().hex
    s = load_settings()

    # an endpoint whose API key is the secret, on a cluster started from a shell that holds it
    start_cluster(project, gcs, {"ML_PROD_API_KEY": secret})
    log_version("champion")
    (project / "secretive.yaml").write_text(json.dumps({"applications": [
        {"name": "secretive", "arms": {"champion": {"model": "models:/tiny@champion", "weight": 1}}}]}))
    cli("serve", "up", str(project / "secretive.yaml"), env={"ML_PROD_API_KEY": secret})
    url = next(a for a in json.loads(cli("serve", "status", "--json").stdout) if a["app"] == "secretive")["replica_urls"][0]
    c = httpx.Client(base_url=url, timeout=30)
    assert c.post("/predict", json=RECORD).status_code == 401
    assert c.post("/predict", json=RECORD, headers={"x-api-key": secret}).status_code == 200
    cli("serve", "down", "secretive")  # its replica holds a CPU the jobs need

    # a job that prints the secret (given in $ML_PROD_SECRET_TOKEN), and one whose exception quotes it (given with -p)
    job = make_job(project / "secret_job.ipynb")
    cli("run", str(job), env={"ML_PROD_SECRET_TOKEN": secret})
    failed = cli("run", str(job), "-p", "token", secret, "-p", "fail", "true", check=False)
    assert failed.returncode != 0 and "rejected token ***" in failed.stderr + failed.stdout, failed.stderr[-2000:]

    # a two-step pipeline that takes the secret from the command line (for its {env: NAME}), never from its file
    (project / "secret_pipeline.yaml").write_text(
        "name: secretive\nsteps:\n"
        "  first: {notebook: secret_job.ipynb, parameters: {token: {env: SECRETS_TEST_TOKEN}, lr: 0.2}}\n"
        "  second: {notebook: secret_job.ipynb, parameters: {token: {env: SECRETS_TEST_TOKEN}, lr: 0.3}, depends_on: [first]}\n")
    cli("pipeline", "run", str(project / "secret_pipeline.yaml"), "-s", "SECRETS_TEST_TOKEN", secret)

    # a two-trial sweep with the secret as a fixed parameter (from $ML_PROD_SECRET_TOKEN)
    (project / "secret_space.yaml").write_text("lr: {grid: [0.1, 0.2]}\n")
    cli("tune", str(job), "--space", str(project / "secret_space.yaml"), "--metric", "score", "--scheduler", "fifo",
        "--max-concurrent", "1", env={"ML_PROD_SECRET_TOKEN": secret})

    # the jobs ran with it: 1 + 1 + 2 + 2 runs of secret_job, one FAILED with its error masked
    runs = [r for r in store.client(s).search_runs([e.experiment_id for e in store.client(s).search_experiments()],
                                                   max_results=1000)
            if r.data.tags.get(keys.NOTEBOOK, "").endswith("secret_job.ipynb") and r.data.tags.get(keys.SWEEP) != "true"]
    assert len(runs) == 6, [r.info.status for r in runs]
    errors = [r.data.tags.get(keys.ERROR, "") for r in runs if r.info.status == "FAILED"]
    assert len(errors) == 1 and "rejected token ***" in errors[0], errors
    for r in runs:  # each kernel had the secret itself: what it printed is exactly the value masked
        saved = Path(store.client(s).download_artifacts(r.info.run_id, "secret_job.ipynb", str(project / "downloads" / r.info.run_id)))
        assert "the token is ***" in saved.read_text(), r.info.run_id

    raw = secret.encode()
    leaks = {"state folder": files_holding(Path(s.state_dir), raw),
             "project files": [f for f in files_holding(project, raw) if not f.startswith(str(s.state_dir))],
             "Ray's session folder": files_holding(Path(_temp_dir(s)), raw),
             "process environments": processes_holding(raw)}
    assert not any(leaks.values()), json.dumps(leaks, indent=1)
