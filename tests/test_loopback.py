"""The embedded profile opens no port beyond 127.0.0.1: every LISTENING TCP socket of the cluster's
processes (GCS, raylet, agents, every worker, the Serve controller, proxy and replicas, the driver) is on
a loopback address, and Serve still answers through its proxy (proxy -> replica over gRPC) and on the
replica's own port.

* `test_in_process_ray_of_connect`: a driver process imports `ray` first (as a notebook or MLflow may),
  then `ml_prod.cluster.connect` starts an in-process local Ray for an embedded project; it runs a small
  two-deployment Serve app (ingress -> handle -> downstream, so the replicas' gRPC servers are used),
  lists the sockets of itself, its descendants and every process naming its Ray session folder, and stops.
* `test_serve_up_persistent_cluster`: `ml_prod serve up` of a one-model spec (tiny MLflow model in the
  project's SQLite registry, conftest's serving helpers) on the embedded profile's persistent cluster,
  the session's shared one (conftest's `project`); then a driver that imported `ray` first joins that
  cluster through `connect` (it must not hang).

The serving cluster's fixed ports (conftest's `SERVING_PORTS`) apply: run under the machine-wide Ray lock."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import httpx
import psutil

from ml_prod.runtime.cluster import _cluster_processes, _stop, _temp_dir, is_loopback_ip
from ml_prod.serving.spec import SERVE_ENV

from conftest import RECORD, deploy, free_ports, log_version, status


def listeners(procs) -> list[tuple[str, int, str, int]]:
    "(process, pid, ip, port) of every listening TCP socket of `procs`; the process as its command line shows it (Ray's titles)."
    out = set()
    for p in procs:
        try: conns, cmd = p.net_connections("tcp"), p.cmdline()
        except psutil.Error: continue
        name = " ".join([Path(cmd[0]).name, *cmd[1:2]])[:90] if cmd else p.name()
        out |= {(name, p.pid, c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN}
    return sorted(out)


def assert_loopback_only(rows, what: str):
    "Every listener on a loopback address; the offenders (process, address) in the message otherwise."
    assert len(rows) >= 5, f"{what}: too few listeners to be Ray's ({rows}): the process listing is wrong"
    print(f"{what}: {len(rows)} listening sockets", *(f"  {ip}:{port}  {name} (pid {pid})" for name, pid, ip, port in rows), sep="\n")
    off = [f"  {name} (pid {pid}) on {ip}:{port}" for name, pid, ip, port in rows if not is_loopback_ip(ip)]
    assert not off, f"{what}: {len(off)} of {len(rows)} listening sockets are not on 127.0.0.1/::1:\n" + "\n".join(off)


def assert_ray_and_serve(rows):
    "The listing holds the GCS, the raylet, the Serve proxy and a replica: it is the cluster's."
    names = " | ".join(sorted({row[0] for row in rows}))
    for part in ("gcs_server", "raylet", "ProxyActor", "ServeReplica"): assert part in names, f"no {part} listening in: {names}"


def clean_env(**extra) -> dict:
    "This environment without ML_PROD_*/RAY_ADDRESS/the loopback flag leaking in, plus Serve's flags and `extra`."
    env = {k: v for k, v in os.environ.items() if not (k.startswith("ML_PROD_") and k != "ML_PROD_TEST_SESSION")
           and k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    return {**env, **SERVE_ENV, **extra}


IN_PROCESS = textwrap.dedent("""
    import json, os, sys, urllib.request
    import ray                                          # before ml_prod, on purpose
    import psutil
    from ray import serve
    from ml_prod.runtime.cluster import connect, _cluster_processes
    from ml_prod.settings import load_settings
    from test_loopback import listeners

    temp_dir, http_port = sys.argv[1], int(sys.argv[2])
    connect(load_settings(), serving=True, _temp_dir=temp_dir, log_to_driver=False)
    out = dict(flag_left=os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"), node_ip=ray.util.get_node_ip_address())
    try:
        @serve.deployment
        class Down:
            def __call__(self, x): return x + 1

        @serve.deployment
        class Ingress:
            def __init__(self, down): self.down = down
            async def __call__(self, request): return {"answer": await self.down.remote(41)}

        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        serve.run(Ingress.bind(Down.bind()), name="lb", route_prefix="/lb")
        me = psutil.Process()
        gcs_port = ray._private.worker.global_worker.node.gcs_address.rsplit(":", 1)[1]
        procs = {p.pid: p for p in [me, *me.children(recursive=True), *_cluster_processes(temp_dir, gcs_port)]}
        out["listeners"] = listeners(procs.values())
        def get(url):
            try:
                with urllib.request.urlopen(url, timeout=30) as r: return r.status, json.loads(r.read())
            except Exception as e: return f"{url}: {e!r}", None
        out["proxy"] = get(f"http://127.0.0.1:{http_port}/lb")
        details = serve.context._get_global_client().get_serve_details()
        out["direct"] = [get(f"http://{t['ip']}:{t['port']}/lb") for g in details["target_groups"]
                         if g["protocol"] == "HTTP" and g["app_name"] == "lb" for t in g["targets"]]
    finally:
        serve.shutdown()
        ray.shutdown()
    print("RESULT " + json.dumps(out))
""")


def test_in_process_ray_of_connect(tmp_path):
    root = tmp_path / "embedded"
    root.mkdir()
    (root / "settings.ini").write_text("[DEFAULT]\nray_num_cpus = 2\n")
    temp_dir = tempfile.mkdtemp(prefix="ray_lb_", dir="/tmp")  # Ray's socket paths must stay short
    (http_port,) = free_ports(1)
    try:
        r = subprocess.run([sys.executable, "-c", IN_PROCESS, temp_dir, str(http_port)], cwd=root, capture_output=True, text=True,
                           timeout=300, env=clean_env(PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])))
        lines = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
        assert r.returncode == 0 and lines, f"driver exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
        out = json.loads(lines[-1].removeprefix("RESULT "))
    finally:
        _stop(_cluster_processes(temp_dir, "0"))  # whatever of this Ray outlived its driver
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert_ray_and_serve(out["listeners"])
    assert_loopback_only(out["listeners"], "in-process Ray of connect()")
    assert out["node_ip"] == "127.0.0.1"
    assert out["flag_left"] is None, "connect must not leave the flag in the driver's environment (child processes would inherit it)"
    assert out["proxy"] == [200, {"answer": 42}], out["proxy"]  # Serve's proxy -> ingress replica -> downstream replica, over gRPC
    assert out["direct"] and all(d == [200, {"answer": 42}] for d in out["direct"]), out["direct"]


JOIN = textwrap.dedent("""
    import json, ray                                    # before ml_prod, on purpose
    import psutil
    from ml_prod.runtime.cluster import connect
    from ml_prod.settings import load_settings
    from test_loopback import listeners
    connect(load_settings(), log_to_driver=False)
    print("RESULT " + json.dumps(dict(node_ip=ray.util.get_node_ip_address(), cpus=ray.cluster_resources().get("CPU"),
                                      listeners=listeners([psutil.Process()]))))
""")


def test_serve_up_persistent_cluster(project):
    from ml_prod.settings import load_settings
    log_version("loopback")
    direct = deploy(project, {"name": "lb", "arms": {"main": {"model": "models:/tiny@loopback", "weight": 1}}})
    st = status("lb")
    r = httpx.post(f"{direct}/predict", json=RECORD, timeout=30)
    assert r.status_code == 200, r.text
    r = httpx.post(f"{st['url']}/predict", json=RECORD, timeout=30)  # the shared port, on loopback
    assert r.status_code == 200 and st["url"].startswith("http://127.0.0.1:"), (st["url"], r.text)
    r = httpx.post(f"{st['proxy_url']}/predict", json=RECORD, timeout=30)  # Ray's proxy -> replica, over gRPC
    assert r.status_code == 200, r.text

    s = load_settings()
    info = json.loads((Path(s.state_dir) / "cluster.json").read_text())
    procs = _cluster_processes(_temp_dir(s), info["address"].rsplit(":", 1)[1])
    rows = listeners(procs)
    assert_ray_and_serve(rows)
    assert_loopback_only(rows, "`ml_prod serve up` cluster")
    assert info["loopback"] is True, info

    # a driver that imported ray before ml_prod joins it (without the flag it would look for its raylet on the external IP and hang)
    j = subprocess.run([sys.executable, "-c", JOIN], cwd=project, capture_output=True, text=True, timeout=120,
                       env=clean_env(PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])))
    lines = [l for l in j.stdout.splitlines() if l.startswith("RESULT ")]
    assert j.returncode == 0 and lines, f"joining driver exited {j.returncode}:\n{j.stdout[-3000:]}\n{j.stderr[-5000:]}"
    out = json.loads(lines[-1].removeprefix("RESULT "))
    assert out["node_ip"] == "127.0.0.1" and out["cpus"], out
    assert out["listeners"] and all(is_loopback_ip(ip) for _, _, ip, _ in out["listeners"]), out["listeners"]


def test_loopback_rule():
    "Serving without API keys is allowed only on a loopback bind address, given as an address or `localhost`."
    from ml_prod.serving.replica import is_loopback
    assert all(map(is_loopback, ["127.0.0.1", "127.0.0.2", "127.255.255.254", "::1", "[::1]", "localhost", "LOCALHOST", " 127.0.0.1 "]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "", "10.0.0.1", "192.168.1.5", "::ffff:10.0.0.1", "localhost.example.com",
                                     "127.0.0.1.nip.io", "128.0.0.1", "[::2]"]))


def test_auth_required_on_loopback_closes_every_route(project):
    "With API keys configured, an endpoint on 127.0.0.1 answers nothing but /healthz without a key, over real HTTP."
    log_version("lbauth")
    url = deploy(project, {"name": "lbauth", "arms": {"main": {"model": "models:/tiny@lbauth", "weight": 1}}},
                 env={"ML_PROD_API_KEY": "lb-key-1"})
    assert url.startswith("http://127.0.0.1:"), url
    key = {"x-api-key": "lb-key-1"}
    with httpx.Client(base_url=url, timeout=30) as c:
        assert c.post("/predict", json=RECORD).status_code == 401
        assert c.post("/predict", json=RECORD, headers={"x-api-key": "wrong"}).status_code == 401
        assert c.post("/predict", json=RECORD, headers=key).status_code == 200
        assert c.post("/feedback", json={"request_id": "x", "label": 1}).status_code == 401
        closed = {p: c.get(p).status_code for p in ("/-/status", "/docs", "/openapi.json")}
        assert closed == dict.fromkeys(closed, 401), closed
        opened = {p: c.get(p, headers=key).status_code for p in ("/-/status", "/docs", "/openapi.json")}
        assert opened == dict.fromkeys(opened, 200), opened
        assert c.get("/healthz").json() == {"ok": True}  # says only that a model is loaded
    st = status("lbauth")
    for stable in (st["url"], st["proxy_url"]):  # on the shared port and through Ray's proxy too
        assert httpx.get(f"{stable}/-/status", timeout=30).status_code == 401
        assert httpx.get(f"{stable}/-/status", headers=key, timeout=30).status_code == 200
