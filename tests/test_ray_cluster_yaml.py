"""`ray_cluster.yaml` is a config `ray up` accepts, and it matches the `[cluster]` profile of settings.ini.

Validation uses Ray's own cluster-launcher code, in the order `ray up` runs it: the file against
`ray/autoscaler/ray-schema.json`, then `prepare_config` (the local provider's node type, the
defaults) and `validate_config` on the result.
"""
import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml

from ml_prod.runtime._compat import prepare_cluster_config
from ml_prod.settings import load_settings

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())


def ray_schema() -> dict:
    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_valid_for_ray_up(config):
    # the file as written: no unknown or mistyped field. Only `min_workers` is outside the schema: the
    # local provider's prepare step (below, as in `ray up`) moves it into the node type.
    jsonschema.validate({k: v for k, v in config.items() if k != "min_workers"}, ray_schema())
    prepared = prepare_cluster_config(config)
    node_type = prepared["available_node_types"][prepared["head_node_type"]]
    assert node_type["min_workers"] == node_type["max_workers"] == len(config["provider"]["worker_ips"])


def test_a_misspelled_field_is_refused(config):
    "The control: Ray's schema does reject what it does not know, so the test above means something."
    bad = {**config, "worker_start_ray_command": config["worker_start_ray_commands"]}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, ray_schema())


def test_local_provider_with_placeholders(config):
    p = config["provider"]
    assert p["type"] == "local" and p["head_ip"] and p["worker_ips"]
    assert config["auth"]["ssh_user"]


def test_ports_match_the_cluster_profile(config):
    "Ray client port and MLflow server port are the ones the [cluster] profile connects to."
    s = load_settings("cluster", path=ROOT / "settings.ini", env={})
    head = " ".join(config["head_start_ray_commands"])
    ray_port = re.fullmatch(r"ray://[^:/]+:(\d+)", s.ray_address).group(1)
    mlflow_port = re.fullmatch(r"https?://[^:/]+:(\d+)/?", s.tracking_uri).group(1)
    assert f"--ray-client-server-port={ray_port}" in head
    assert "RAY_AUTH_MODE=token" in head and "--head --port=6379" in head
    assert re.search(rf"mlflow server( --app-name basic-auth)? --host 0\.0\.0\.0 --port {mlflow_port}\b", head)
    assert "--serve-artifacts" in head and "--artifacts-destination" in head
    assert s.artifact_location.startswith("mlflow-artifacts:")  # needs the --serve-artifacts above
    host = re.fullmatch(r"ray://([^:/]+):\d+", s.ray_address).group(1)
    assert host in head.split("--allowed-hosts", 1)[1], "MLflow must accept requests addressed to the head's name"
    workers = " ".join(config["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in workers and "--address=$RAY_HEAD_IP:6379" in workers


def test_token_is_copied_to_every_node(config):
    "With token auth, workers and ray:// clients need the head's token: the file mount carries it."
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"


def test_tracking_server_needs_a_user_and_keeps_its_store_in_postgresql(config):
    "The head's MLflow server runs MLflow's basic-auth app on PostgreSQL; no secret is written in the file itself."
    head = " ".join(config["head_start_ray_commands"])
    server = head[head.index("mlflow server"):]
    assert "--app-name basic-auth" in server
    assert re.search(r"--backend-store-uri postgresql\+psycopg://mlflow:\$\(cat [^)]+\)@127\.0\.0\.1:5432/mlflow\b", server), server
    assert "MLFLOW_AUTH_CONFIG_PATH=" in head and "MLFLOW_FLASK_SERVER_SECRET_KEY=$(cat" in head
    assert "sqlite" not in head
    setup = " ".join(config["head_setup_commands"])
    assert "apt-get install" in setup and "postgresql" in setup and "createdb -O mlflow" in setup
    assert config["file_mounts"]["~/.mlflow/credentials"].startswith("~/.ml_prod/")  # jobs' user, outside the project copy
    assert not re.search(r"password\s*[=:]\s*\w", yaml.safe_dump(config), re.I), "a password written into ray_cluster.yaml"
    installs = " ".join(config["setup_commands"])
    assert "mlflow[auth]" in installs and "psycopg[binary]" in installs
