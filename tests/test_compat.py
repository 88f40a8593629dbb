"""Every hook of `ml_prod.runtime._compat` against the Ray that is installed (the pinned 2.60).

Each test proves that what a hook reads, calls or patches still exists in Ray and does what ml_prod
relies on, and, for the patches, that applying the patch really changes the target. Most need no
Ray: they import Ray's modules and look at them. Those that change process-wide state Ray keeps
(its cached config, a module imported once) run in a fresh interpreter; patches applied in this
process are undone by `monkeypatch`. Only the node reads and the actor wait use the session's
`ray_local`, since they need a running node.
"""
from __future__ import annotations

import importlib
import inspect
import ipaddress
import json
import re
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ml_prod.errors import MlProdError
from ml_prod.runtime import _compat

ROOT = Path(__file__).resolve().parents[1]


def fresh(code: str) -> dict:
    "Run `code` in a new interpreter (this one's environment); it prints one JSON line, returned parsed."
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def resolve(target: str):
    "The object a `module:attr.path` target of a hook names (imports the module)."
    module, _, path = target.partition(":")
    obj = importlib.import_module(module)
    for name in path.split("."): obj = getattr(obj, name)
    return obj


# ---- the version check ---------------------------------------------------------------------------

def test_supported_ray_is_the_installed_and_pinned_one():
    import ray
    assert ray.__version__ == _compat.SUPPORTED_RAY
    assert re.search(rf'"ray\[[a-z,]+\]=={re.escape(_compat.SUPPORTED_RAY)}"', (ROOT / "pyproject.toml").read_text())  # pinned, whatever the extras
    assert _compat.version_problem() is None


def test_another_ray_warns_or_raises_when_strict():
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        _compat.check_ray_version("2.61.0")
    assert [x.category for x in w] == [_compat.RayVersionWarning]
    assert "Ray 2.61.0 is installed" in str(w[0].message) and f"=={_compat.SUPPORTED_RAY}" in str(w[0].message)
    with pytest.raises(MlProdError, match="supports Ray 2.60.0, but Ray 2.61.0"):
        _compat.check_ray_version("2.61.0", strict=True)


# ---- every target a hook names exists ----------------------------------------------------------

@pytest.mark.parametrize("target", sorted({t for h in _compat.HOOKS.values() for t in h.targets}))
def test_every_hook_target_exists(target):
    resolve(target)  # raises ImportError/AttributeError when Ray moved or removed it


def test_the_patches_are_named():
    assert [h.name for h in _compat.PATCHES] == ["ray_cluster_disabled", "patch_grpc_add_port", "patch_haproxy_binds"]
    lines = _compat.describe()
    assert lines[0] == f"Ray {_compat.SUPPORTED_RAY} (ml_prod supports {_compat.SUPPORTED_RAY})"
    assert len(lines) == 1 + len(_compat.HOOKS)


# ---- reads of the node ---------------------------------------------------------------------------

def test_node_reads_on_a_live_ray(ray_local):
    ray = ray_local
    ip = _compat.node_ip_address()
    ipaddress.ip_address(ip)
    assert ip == ray.util.get_node_ip_address()  # the public answer, for the driver's node
    logs = _compat.logs_dir()
    assert logs.is_dir() and logs.name == "logs" and logs.parent.name.startswith("session_")
    # tests/test_loopback.py reads the GCS address through the public runtime context: the same value
    assert ray.get_runtime_context().gcs_address == _compat._node().gcs_address



def test_kv_round_trip_on_a_live_ray(ray_local):
    "Replicas publish their status in the GCS key-value store; a reader lists, reads and deletes by prefix."
    assert _compat.kv_put("test/kv/a", b"1") and _compat.kv_put("test/kv/b", "2") and _compat.kv_put("test/other", b"3")
    assert _compat.kv_items("test/kv/") == {"test/kv/a": b"1", "test/kv/b": b"2"}
    assert _compat.kv_delete("test/kv/a") == 1 and _compat.kv_items("test/kv/") == {"test/kv/b": b"2"}
    assert _compat.kv_delete("test/", prefix=True) == 2 and _compat.kv_items("test/") == {}
    # what a replica publishes is read back by the driver's replica_states
    from ml_prod.serving.control import forget_replicas, replica_states
    from ml_prod.serving.replica import state_key
    for r in ("r1", "r2"): _compat.kv_put(state_key("kvapp", r), json.dumps({"replica": r, "arms": {}}))
    assert [x["replica"] for x in replica_states(None, "kvapp", ["r2"])] == ["r2"]
    assert forget_replicas("kvapp", keep=["r2"]) == 1 and [x["replica"] for x in replica_states(None, "kvapp")] == ["r2"]
    assert forget_replicas("kvapp") == 1 and replica_states(None, "kvapp") == []

# ---- token authentication ------------------------------------------------------------------------

def test_reinit_auth_config_rereads_ray_auth_mode():
    out = fresh("""
import json, os
os.environ["RAY_AUTH_MODE"] = "disabled"
import ray
from ray._raylet import AuthenticationMode, get_authentication_mode
from ml_prod.runtime import _compat
os.environ["RAY_AUTH_MODE"] = "token"
before = get_authentication_mode() == AuthenticationMode.TOKEN
_compat.reinit_auth_config()
print(json.dumps(dict(before=before, after=get_authentication_mode() == AuthenticationMode.TOKEN)))
""")
    assert out == {"before": False, "after": True}  # without the hook Ray keeps the mode it read at import


# ---- the node address flag -----------------------------------------------------------------------

def test_ray_cluster_disabled_makes_the_node_address_loopback():
    out = fresh("""
import json
from ray._private import ray_constants, services
from ml_prod.runtime import _compat
before = ray_constants.ENABLE_RAY_CLUSTER
with _compat.ray_cluster_disabled():
    inside = (ray_constants.ENABLE_RAY_CLUSTER, services.get_node_ip_address())
print(json.dumps(dict(before=before, inside=inside, after=ray_constants.ENABLE_RAY_CLUSTER,
                      var=ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR)))
""")
    assert out["inside"] == [False, "127.0.0.1"] and out["after"] == out["before"]
    from ml_prod.runtime.cluster import LOOPBACK_FLAG
    assert out["var"] == LOOPBACK_FLAG  # the variable runtime.cluster sets for the processes Ray starts is the one Ray reads


def test_ray_cluster_disabled_names_a_missing_flag(monkeypatch):
    from ray._private import ray_constants
    monkeypatch.delattr(ray_constants, "ENABLE_RAY_CLUSTER")
    with pytest.raises(MlProdError, match="has no ray._private.ray_constants.ENABLE_RAY_CLUSTER"):
        with _compat.ray_cluster_disabled(): pass


# ---- Serve's listeners ---------------------------------------------------------------------------

def _listen_ips(port: int) -> set[str]:
    import psutil
    return {c.laddr.ip for c in psutil.Process().net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == port}


def _grpc_listen_ips(add) -> set[str]:
    "Where a gRPC server that `add` binds to `[::]:0`, as a Serve replica does, listens."
    import grpc
    server = grpc.server(ThreadPoolExecutor(1))
    try:
        port = add(server, "[::]:0")
        server.start()
        return _listen_ips(port)
    finally: server.stop(0)


def test_patch_grpc_add_port_moves_a_replicas_grpc_server_to_loopback(monkeypatch):
    import ray._common.tls_utils as tls
    import ray.serve._private.replica as replica
    from ml_prod.runtime.cluster import _loopback_address, is_loopback_ip
    if getattr(tls.add_port_to_grpc_server, "ml_prod_loopback", False): pytest.skip("this process is patched already")
    # what the patch relies on: the replica binds all interfaces through the name it imported from tls_utils
    assert 'add_port_to_grpc_server(self._server, "[::]:0")' in inspect.getsource(replica)
    assert replica.add_port_to_grpc_server is tls.add_port_to_grpc_server
    assert not all(map(is_loopback_ip, _grpc_listen_ips(tls.add_port_to_grpc_server)))  # the control: unpatched
    monkeypatch.setattr(tls, "add_port_to_grpc_server", tls.add_port_to_grpc_server)  # undone after the test
    monkeypatch.setattr(replica, "add_port_to_grpc_server", replica.add_port_to_grpc_server)
    assert _compat.patch_grpc_add_port(_loopback_address) and not _compat.patch_grpc_add_port(_loopback_address)
    assert replica.add_port_to_grpc_server is tls.add_port_to_grpc_server  # the imported name is rebound too
    ips = _grpc_listen_ips(replica.add_port_to_grpc_server)
    assert ips and all(map(is_loopback_ip, ips)), ips


def test_patch_haproxy_binds_patches_both_modules(monkeypatch):
    from ray.serve._private import haproxy, haproxy_templates
    template = haproxy_templates.HAPROXY_CONFIG_TEMPLATE
    assert all(old in template for old in _compat._HAPROXY_BINDS)  # else the patch would silently change nothing
    monkeypatch.setattr(haproxy_templates, "HAPROXY_CONFIG_TEMPLATE", template)  # undone after the test
    monkeypatch.setattr(haproxy, "HAPROXY_CONFIG_TEMPLATE", haproxy.HAPROXY_CONFIG_TEMPLATE)
    _compat.patch_haproxy_binds()  # both imported: patched now
    for t in (haproxy_templates.HAPROXY_CONFIG_TEMPLATE, haproxy.HAPROXY_CONFIG_TEMPLATE):
        binds = re.findall(r"^\s*bind (\S+)", t, re.M)
        assert [b for b in binds if b.startswith("127.0.0.1:")] == ["127.0.0.1:{{", "127.0.0.1:{{"], binds
        assert not [b for b in binds if b.startswith((":", "*:"))], binds


def test_loopback_serve_listeners_before_serve_is_imported():
    "As the worker setup hook runs it: first thing in a worker, before Serve's modules are loaded."
    out = fresh("""
import json, sys
from ml_prod.runtime import _compat
from ml_prod.runtime.cluster import _loopback_address
first, again = _compat.loopback_serve_listeners(_loopback_address), _compat.loopback_serve_listeners(_loopback_address)
loaded = "ray.serve._private.haproxy_templates" in sys.modules
from ray.serve._private import haproxy, haproxy_templates, replica
print(json.dumps(dict(first=first, again=again, loaded=loaded, same=haproxy.HAPROXY_CONFIG_TEMPLATE == haproxy_templates.HAPROXY_CONFIG_TEMPLATE,
                      binds=haproxy.HAPROXY_CONFIG_TEMPLATE.count("bind 127.0.0.1:"), patched=getattr(replica.add_port_to_grpc_server, "ml_prod_loopback", False))))
""")
    assert out == dict(first=True, again=False, loaded=False, same=True, binds=2, patched=True)


# ---- Serve's controller client -------------------------------------------------------------------

def test_serve_client_signature():
    from ray.serve import context
    p = inspect.signature(context._connect).parameters
    assert list(p) == ["raise_if_no_controller_running"] and p["raise_if_no_controller_running"].default is True


def test_serve_client_methods():
    from ray.serve._private.client import ServeControllerClient as C
    assert list(inspect.signature(C.get_serve_details).parameters) == ["self"]
    deploy = inspect.signature(C.deploy_apps).parameters
    assert list(deploy)[:2] == ["self", "config"] and "ServeDeploySchema" in str(deploy["config"].annotation)
    delete = inspect.signature(C.delete_apps).parameters
    assert list(delete)[:2] == ["self", "names"] and delete["blocking"].default is True


# ---- actors and Tune -----------------------------------------------------------------------------

def test_wait_actor_ready(ray_local):
    from ray.actor import _modify_class
    assert _modify_class(type("A", (), {}))().__ray_ready__() is True  # the method Ray adds to every actor class
    class Idle:
        def ping(self): return "pong"
    actor = ray_local.remote(num_cpus=0)(Idle).remote()
    try:
        assert _compat.wait_actor_ready(actor) is None
        assert ray_local.get(actor.ping.remote(), timeout=30) == "pong"
    finally: ray_local.kill(actor)


def test_function_trainable():
    from ray.tune.trainable.function_trainable import FunctionTrainable
    cls = _compat.function_trainable(lambda config: None)
    assert issubclass(cls, FunctionTrainable)
    # flows.tune overrides these two and calls super(): they must be FunctionTrainable's own
    assert {"reset_config", "cleanup"} <= set(vars(FunctionTrainable))


# ---- the cluster launcher config ---------------------------------------------------------------

def test_prepare_cluster_config():
    import jsonschema
    config = {"cluster_name": "t", "provider": {"type": "local", "head_ip": "10.0.0.1", "worker_ips": ["10.0.0.2"]}, "auth": {"ssh_user": "u"}}
    prepared = _compat.prepare_cluster_config(config)
    node = prepared["available_node_types"][prepared["head_node_type"]]
    assert node["min_workers"] == node["max_workers"] == 1 and "available_node_types" not in config
    with pytest.raises(jsonschema.ValidationError, match="bogus"):
        _compat.prepare_cluster_config({**config, "bogus": 1})


# ---- importing ml_prod does not import Ray -------------------------------------------------------

def test_modules_that_use_compat_import_it_lazily():
    "`connect` must see whether *the user* imported ray, and set RAY_AUTH_MODE before Ray reads it."
    out = fresh("""
import json, sys
import ml_prod.runtime.cluster, ml_prod.serving.control, ml_prod.jobs.submit, ml_prod.cli.main
print(json.dumps(dict(ray="ray" in sys.modules)))
""")
    assert out == {"ray": False}
