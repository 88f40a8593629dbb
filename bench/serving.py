#!/usr/bin/env python
"""Benchmark: one tiny model served by bare FastAPI, by Ray Serve (proxy, direct ingress, HAProxy) and by ml_prod.

    .venv/bin/python bench/serving.py [--duration 15] [--connections 1,8,32] [--only NAME[,NAME]] [--warmup 3] [--rounds 3]

Targets, each started in turn in a fresh process of its own (so Ray's environment flags apply to a fresh
cluster), all serving the same model: a torch MLP (30 float features -> 32 -> ReLU -> 1 -> sigmoid, weights
from a fixed seed, `torch.set_num_threads(1)`, inference under `torch.inference_mode`). The request is
`POST /predict` with the JSON body `{"features": [30 floats]}`, validated by a pydantic model; the answer is
`{"score": float}`.

- `fastapi`    the baseline: the FastAPI app under uvicorn (1 worker, access log off), no Ray;
- `ray_proxy`  the same FastAPI app as a `serve.ingress` deployment (1 replica, `max_ongoing_requests=64`),
               called through Serve's HTTP proxy;
- `ray_direct` the same deployment with `RAY_SERVE_ENABLE_DIRECT_INGRESS=1` and `RAY_SERVE_THROUGHPUT_OPTIMIZED=1`
               (the replica serves HTTP on its own port, user code on the replica's event loop), called on the
               replica's port, which is read from the Serve controller's target groups;
- `ray_haproxy` the same again behind Ray's HAProxy mode (`RAY_SERVE_ENABLE_HA_PROXY=1`, which implies direct
               ingress; `nbthread 1`, server/client timeouts): one stable port in front of the replica ports;
- `ml_prod`    ml_prod's full request path: `ml_prod.deploy` of a one-arm spec on the model folder, in a fresh
               ml_prod project on the embedded profile (its persistent local Ray, started by `deploy` with the
               Serve flags ml_prod sets itself; the bench sets none), API key required (`ML_PROD_API_KEY`),
               validation against the model's signature, the audit record of every request, batching on;
               requests go to the replica's own port (the one `ml_prod serve status` lists beside it);
- `ml_prod_shared` the same deployment, requests to the application's stable address: the port all its replicas
               share (SO_REUSEPORT), the `url` that `ml_prod serve up` prints;
- `ml_prod_nobatch` the same with batching off.
- `ml_prod_step` `ml_prod` with one separate pre step (`{step: "builtins:list", num_cpus: 0}`: a copy of the
               records, in a deployment of its own): the cost of one handle hop per request.

Load comes from wrk (a C HTTP load generator; `apt-get install -y wrk`), POSTing through a Lua script whose
`done()` hook prints exact p50/p90/p99 latencies. Each target gets a warm-up at the highest connection count,
then one run per connection count (`-t2`, or `-t1` for 1 connection). `--rounds N` (default 3) repeats the whole
list N times, interleaved (every target once per round, in a fresh process each time), and the table shows the
median over the rounds of req/s, p50 and p99 in ms, the number of non-2xx/3xx answers and socket errors summed,
each round's req/s, and the median req/s as a fraction of the baseline's median at the same connection count,
beside the baseline's own figure. wrk shares the 2 cores with the server, the same for every target.

All Ray targets keep every listening socket on 127.0.0.1: `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` before Ray is
imported makes 127.0.0.1 the node address, and a worker setup hook (ml_prod's `ml_prod.runtime.cluster.loopback_hook`) moves the two listeners
Ray hard-codes to all interfaces.

Everything started is stopped at the end, also on Ctrl-C or SIGTERM: each target runs in its own process
group, is asked to shut down (stdin closed: Serve and Ray shut down cleanly; a target whose parent dies does
the same) and its process group is killed if it does not within a timeout.

CI does not run this; timings on a small shared machine are noisy: check the load (printed) and rerun.
"""
import argparse, json, os, secrets, shutil, signal, socket, subprocess, sys, tempfile, threading, time
from pathlib import Path

N_FEATURES, HIDDEN, SEED = 30, 32, 0
TARGETS = ["fastapi", "ray_proxy", "ray_direct", "ray_haproxy", "ml_prod", "ml_prod_shared", "ml_prod_nobatch", "ml_prod_step"]
START_TIMEOUT_S = 240
STOP_TIMEOUT_S = 60

# ---------------------------------------------------------------------------------------------- the model and app
# (used in the target processes; heavy imports stay inside functions so `--help` is quick)

def make_model():
    "The benchmark MLP with fixed weights, in eval mode."
    import torch
    torch.manual_seed(SEED)
    return torch.nn.Sequential(torch.nn.Linear(N_FEATURES, HIDDEN), torch.nn.ReLU(),
                               torch.nn.Linear(HIDDEN, 1), torch.nn.Sigmoid()).eval()

def request_features() -> list[float]:
    "The feature vector every benchmark request sends."
    import random
    rng = random.Random(SEED)
    return [round(rng.gauss(0, 1), 6) for _ in range(N_FEATURES)]

def _schemas():
    # built in a function (pydantic imports stay out of `--help`); this module has no `from __future__ import
    # annotations`, so FastAPI sees these classes themselves, not names it cannot resolve
    from pydantic import BaseModel, Field
    class PredictRequest(BaseModel):
        features: list[float] = Field(min_length=N_FEATURES, max_length=N_FEATURES)
    class PredictResponse(BaseModel):
        score: float
    return PredictRequest, PredictResponse

def score(model, features: list[float]) -> float:
    "Inference for one request: tiny (tens of microseconds), so it runs inline on the event loop."
    import torch
    with torch.inference_mode():
        return float(model(torch.tensor([features], dtype=torch.float32))[0, 0])

def build_fastapi_app():
    "The baseline app: the model is a closure variable."
    import torch
    from fastapi import FastAPI
    torch.set_num_threads(1)
    PredictRequest, PredictResponse = _schemas()
    model, app = make_model(), FastAPI()
    @app.post("/predict")
    async def predict(req: PredictRequest) -> PredictResponse:
        return PredictResponse(score=score(model, req.features))
    return app

def build_serve_app(max_ongoing_requests: int = 64, num_replicas: int = 1):
    "The same app as a Serve ingress deployment (the model is an attribute of the replica)."
    from fastapi import FastAPI
    from ray import serve
    PredictRequest, PredictResponse = _schemas()
    api = FastAPI()

    @serve.deployment(max_ongoing_requests=max_ongoing_requests, num_replicas=num_replicas)
    @serve.ingress(api)
    class Scorer:
        def __init__(self):
            import torch
            torch.set_num_threads(1)
            self.model = make_model()

        @api.post("/predict")
        async def predict(self, req: PredictRequest) -> PredictResponse:
            return PredictResponse(score=score(self.model, req.features))

    return Scorer.bind()

def save_model_dir(path: Path) -> Path:
    "Write the MLP as an MLflow model folder (for ml_prod)."
    import warnings
    warnings.filterwarnings("ignore")
    import numpy as np, mlflow.pytorch
    mlflow.pytorch.save_model(make_model(), str(path), serialization_format="pickle", pip_requirements=["torch"],
                              input_example=np.zeros((1, N_FEATURES), dtype="float32"))
    return path

# ---------------------------------------------------------------------------------------------- target processes

# Flags for the Ray targets' fresh clusters (set before ray.init, so GCS, raylet, controller and replicas inherit
# them). RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes Ray pick 127.0.0.1 as the node address, so its own servers
# listen on loopback only.
RAY_COMMON_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
RAY_DIRECT_ENV = {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
                  "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0"}

def ray_haproxy_env(state_dir: Path) -> dict:
    "HAProxy mode on 2 cores: one HAProxy thread, timeouts set, files and ports private to this cluster."
    return {**RAY_DIRECT_ENV, "RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_HAPROXY_NBTHREAD": "1",
            "RAY_SERVE_HAPROXY_TIMEOUT_SERVER_S": "60", "RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S": "60",
            "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": f"{state_dir}/haproxy.cfg",
            "RAY_SERVE_HAPROXY_SOCKET_PATH": f"{state_dir}/admin.sock",
            "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(state_dir),
            "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": f"{state_dir}/server-state",
            "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": f"{state_dir}/metrics.sock",
            "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()), "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
            "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(free_port())}

def _write_ready(path: str, info: dict):
    tmp = path + ".tmp"
    Path(tmp).write_text(json.dumps(info)); os.replace(tmp, path)

def _wait_for_stop():
    "Block until the parent closes our stdin (or dies) or sends SIGTERM/SIGINT."
    ev = threading.Event()
    threading.Thread(target=lambda: (_stdin_eof(), ev.set()), daemon=True).start()
    for sig in (signal.SIGTERM, signal.SIGINT): signal.signal(sig, lambda *a: ev.set())
    ev.wait()

def _serve_fastapi(args):
    import uvicorn
    app = build_fastapi_app()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=args.port, workers=1, log_level="warning",
                                           access_log=False))
    def stop_on_eof():                 # uvicorn handles SIGTERM/SIGINT itself; stdin EOF also stops it
        _stdin_eof(); server.should_exit = True
    def ready_when_started():
        while not server.started: time.sleep(0.05)
        _write_ready(args.ready_file, {"url": f"http://127.0.0.1:{args.port}/predict"})
    threading.Thread(target=stop_on_eof, daemon=True).start()
    threading.Thread(target=ready_when_started, daemon=True).start()
    server.run()

def _stdin_eof():
    "Return when stdin reaches EOF (the parent closed it or died)."
    try:
        while sys.stdin.buffer.read(1): pass
    except Exception: pass

def _ray_targets(app_name: str = "bench"):
    "Direct-ingress HTTP targets (host, port) of `app_name`, from the Serve controller."
    import ray
    ctrl = ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
    tgs = ray.get(ctrl.get_target_groups.remote(app_name))
    return [(t.ip, t.port) for tg in tgs if tg.app_name == app_name and str(getattr(tg.protocol, "value", tg.protocol)) == "HTTP"
            for t in tg.targets]

def _serve_ray(args, mode: str):
    "mode: proxy | direct | haproxy. The environment is set before Ray is imported."
    os.environ.update(RAY_COMMON_ENV)
    if mode == "direct": os.environ.update(RAY_DIRECT_ENV)
    state = None
    if mode == "haproxy":                    # short path: HAProxy's admin socket lives below it, under the node id
        state = Path(tempfile.mkdtemp(prefix="hap", dir="/tmp"))
        os.environ.update(ray_haproxy_env(state))
    import ray
    from ray import serve
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"worker_process_setup_hook": "ml_prod.runtime.cluster.loopback_hook"})
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        serve.run(build_serve_app(), name="bench", route_prefix="/")
        url = f"http://127.0.0.1:{args.port}/predict"
        if mode == "haproxy":                # HAProxy picks up the replica within a second or so
            t0 = time.time()
            while True:
                try:
                    check_once(url, {}); break
                except RuntimeError:
                    if time.time() - t0 > 60: raise
                    time.sleep(0.2)
        if mode == "direct":
            t0 = time.time()
            while True:
                ts = [t for t in _ray_targets("bench") if t[1] != args.port]
                if ts: break
                if time.time() - t0 > 60: raise RuntimeError("no direct-ingress target for app 'bench' after 60 s")
                time.sleep(0.2)
            url = f"http://{ts[0][0]}:{ts[0][1]}/predict"
        _write_ready(args.ready_file, {"url": url})
        _wait_for_stop()
    finally:
        try:
            if ray.is_initialized(): serve.shutdown()
        finally:
            ray.shutdown()
            if state: shutil.rmtree(state, ignore_errors=True)

def _serve_ml_prod(args, batching: bool = True, steps: list | None = None, shared: bool = False):
    """ml_prod's full request path (API key, validation against the signature, arm pick, audit record, batching on
    or off) on the embedded profile: `ml_prod.deploy` starts the project's persistent local Ray with the Serve flags
    it needs and serves the model folder; requests go to the replica's own (direct ingress) port, or with `shared` to the
    application's stable address (the port its replicas share)."""
    from ml_prod.runtime.cluster import cluster_down
    from ml_prod.serving.spec import spec_from_dict
    from ml_prod.serving.control import deploy, undeploy
    from ml_prod.settings import load_settings
    s = load_settings()
    spec = spec_from_dict({"applications": [{"name": "bench", "arms": {"main": {"model": register_model_dir(s, args.model_dir), "weight": 1}},
                                              "batching": {"enabled": batching, "max_batch_size": 32, "wait_ms": 1},
                                              "preprocess": steps or []}]})
    try:
        e = deploy(spec, s)["bench"]
        url = e["url"] if shared else e["replica_urls"][0]
        _write_ready(args.ready_file, {"url": url + "/predict", "headers": {"x-api-key": os.environ["ML_PROD_API_KEY"]}})
        _wait_for_stop()
    finally:
        try: undeploy(None, s)
        finally: cluster_down(s)

def register_model_dir(s, model_dir) -> str:
    "Log the model folder as run artifacts in the project's tracking store and register it: ml_prod serves registered versions only."
    import mlflow
    from ml_prod.models.registry import register
    mlflow.set_tracking_uri(s.tracking_uri)
    mlflow.set_experiment("bench")
    with mlflow.start_run() as run: mlflow.log_artifacts(str(model_dir), "model")
    return f"models:/bench/{register(s, run.info.run_id, 'bench')}"

def target_main(args):
    "Entry point of a target process (`--_serve NAME`)."
    {"fastapi": _serve_fastapi, "ray_proxy": lambda a: _serve_ray(a, "proxy"), "ray_direct": lambda a: _serve_ray(a, "direct"),
     "ray_haproxy": lambda a: _serve_ray(a, "haproxy"), "ml_prod": _serve_ml_prod,
     "ml_prod_shared": lambda a: _serve_ml_prod(a, shared=True), "ml_prod_nobatch": lambda a: _serve_ml_prod(a, batching=False),
     "ml_prod_step": lambda a: _serve_ml_prod(a, steps=[{"step": "builtins:list", "num_cpus": 0}])}[args._serve](args)

# ---------------------------------------------------------------------------------------------- the driver side

def free_port() -> int:
    """A port free now, from below the ephemeral range: one the kernel hands out for bind(0) can be taken meanwhile as the local
    port of one of the many connections Ray opens (a run once failed so: Serve's proxy could not bind it)."""
    import random
    for port in random.sample(range(20000, 30000, 2), 500):  # even: the one after it is the shared port ml_prod picks
        with socket.socket() as s:
            try: s.bind(("127.0.0.1", port))
            except OSError: continue
        with socket.socket() as s:
            try: s.bind(("127.0.0.1", port + 1)); return port
            except OSError: continue
    raise RuntimeError("no free port pair in 20000-30000")

class Target:
    "A target process in its own process group; `start` waits for its ready file, `stop` always cleans up."
    def __init__(self, name: str, workdir: Path, model_dir: Path):
        self.name, self.workdir, self.model_dir = name, workdir, model_dir
        self.proc, self.log = None, workdir/f"{name}.log"

    def start(self) -> dict:
        ready = self.workdir/f"{self.name}.ready"
        ready.unlink(missing_ok=True)  # a file from an earlier round's process
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        for k in list(env):           # the bench's own shell must not leak Ray/Serve flags into the targets
            if k.startswith(("RAY_SERVE_", "RAY_ENABLE_WINDOWS")): env.pop(k)
        cwd = str(Path(__file__).resolve().parent.parent)
        port = free_port()
        if self.name.startswith("ml_prod"):
            proj = self.workdir/"ml_prod_project"; proj.mkdir(exist_ok=True)
            (proj/"settings.ini").write_text("[DEFAULT]\n")
            env.update(ML_PROD_SERVE_PORT=str(port), ML_PROD_API_KEY="bench-" + secrets.token_hex(8))
            env.pop("ML_PROD_PROFILE", None)
            cwd = str(proj)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_serve", self.name, "--port", str(port),
               "--ready-file", str(ready), "--model-dir", str(self.model_dir)]
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=open(self.log, "wb"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        t0 = time.time()
        while not ready.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before it was ready:\n{self.tail()}")
            if time.time() - t0 > START_TIMEOUT_S:
                raise RuntimeError(f"{self.name} not ready after {START_TIMEOUT_S} s:\n{self.tail()}")
            time.sleep(0.2)
        info = json.loads(ready.read_text()); info["start_s"] = time.time() - t0
        return info

    def tail(self, n: int = 30) -> str:
        try: return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError: return ""

    def stop(self) -> float:
        "Ask the target to shut down (stdin EOF), wait, then kill its process group. Returns seconds taken."
        if self.proc is None: return 0.0
        t0 = time.time()
        try:
            if self.proc.poll() is None:
                try: self.proc.stdin.close()
                except OSError: pass
                try: self.proc.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    print(f"  {self.name}: no clean shutdown after {STOP_TIMEOUT_S} s, killing its process group", flush=True)
        finally:
            _kill_group(self.proc.pid)
            try: self.proc.wait(10)
            except subprocess.TimeoutExpired: pass
        return time.time() - t0

def _kill_group(pgid: int):
    "SIGTERM, then SIGKILL, whatever is left in the target's process group (Ray daemons it started)."
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try: os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError): return
        for _ in range(20):
            try: os.killpg(pgid, 0)
            except ProcessLookupError: return
            time.sleep(0.1)

LUA = r"""
wrk.method = "POST"
wrk.body = [[%(body)s]]
wrk.headers["Content-Type"] = "application/json"
%(headers)s
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('BENCH_JSON {"requests":%%d,"duration_us":%%d,"p50_us":%%d,"p90_us":%%d,"p99_us":%%d,"max_us":%%d,"non2xx":%%d,"socket_errors":%%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, e.status, e.connect + e.read + e.write + e.timeout))
end
"""

def lua_script(path: Path, headers: dict) -> Path:
    body = json.dumps({"features": request_features()}, separators=(",", ":"))
    hdr = "\n".join(f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}" for k, v in headers.items())
    path.write_text(LUA % {"body": body, "headers": hdr})
    return path

def run_wrk(url: str, script: Path, connections: int, duration: float) -> dict:
    threads = min(2, connections)
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration))}s", "--timeout", "10s",
           "--latency", "-s", str(script), url]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try: out, _ = p.communicate(timeout=duration + 60)
    finally:
        if p.poll() is None: p.kill(); p.wait()
    line = next((l for l in out.splitlines() if l.startswith("BENCH_JSON ")), None)
    if line is None: raise RuntimeError(f"wrk gave no result (rc {p.returncode}):\n{out}")
    r = json.loads(line[len("BENCH_JSON "):])
    r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
    return r

def check_once(url: str, headers: dict) -> str:
    "One request with the standard library: the target must answer 2xx before it is measured."
    import urllib.request
    body = json.dumps({"features": request_features()}).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return f"{r.status} {r.read()[:80].decode(errors='replace')}"
    except OSError as e:                         # HTTPError, URLError, timeouts
        detail = e.read()[:300].decode(errors="replace") if hasattr(e, "read") else ""
        raise RuntimeError(f"check request to {url} failed: {e} {detail}") from None

def median_rows(rows: list[dict]) -> list[dict]:
    "One row per (target, connections): the median over the rounds of req/s, p50 and p99, errors summed, each round's req/s."
    from statistics import median
    out = {}
    for r in rows: out.setdefault((r["target"], r["connections"]), []).append(r)
    return [dict(target=t, connections=c, rps=median(x["rps"] for x in rs), p50_us=median(x["p50_us"] for x in rs),
                 p99_us=median(x["p99_us"] for x in rs), non2xx=sum(x["non2xx"] for x in rs), socket_errors=sum(x["socket_errors"] for x in rs),
                 rounds=[round(x["rps"]) for x in rs], load=[round(x["load"], 2) for x in rs]) for (t, c), rs in out.items()]

def print_table(rows: list[dict]):
    "The medians over the rounds, each round's req/s and the load average (1 min) after each run."
    rows = median_rows(rows)
    base = {r["connections"]: r["rps"] for r in rows if r["target"] == "fastapi"}
    print()
    print(f"{'target':<15} {'conns':>5} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8} {'sock err':>8} {'vs fastapi':>10}  {'fastapi req/s':>13}  rounds (req/s; load)")
    print("-" * 120)
    for r in rows:
        ratio = f"{r['rps'] / base[r['connections']]:.2f}" if base.get(r["connections"]) else "-"
        fa = f"{base[r['connections']]:.0f}" if base.get(r["connections"]) else "-"
        print(f"{r['target']:<15} {r['connections']:>5} {r['rps']:>9.0f} {r['p50_us'] / 1000:>8.2f} {r['p99_us'] / 1000:>8.2f} "
              f"{r['non2xx']:>8} {r['socket_errors']:>8} {ratio:>10}  {fa:>13}  {r['rounds']}; {r['load']}")

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="Targets: " + ", ".join(TARGETS))
    ap.add_argument("--duration", type=float, default=15, help="seconds per measured wrk run (default 15)")
    ap.add_argument("--connections", default="1,8,32", help="comma-separated connection counts (default 1,8,32)")
    ap.add_argument("--only", default="", help="comma-separated targets to run (default: all)")
    ap.add_argument("--warmup", type=float, default=3, help="seconds of untimed load per target before measuring")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the targets; the table shows medians (default 3)")
    ap.add_argument("--json", default="", help="also write the results to this JSON file")
    ap.add_argument("--_serve", default="", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--ready-file", default="", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._serve: return target_main(args)

    if shutil.which("wrk") is None:
        sys.exit("wrk is needed and was not found. Install it with `apt-get install -y wrk` (Debian/Ubuntu) "
                 "or `brew install wrk` (macOS), or build it from https://github.com/wg/wrk.")
    conns = [int(c) for c in args.connections.split(",") if c.strip()]
    names = [n.strip() for n in args.only.split(",") if n.strip()] or TARGETS
    if bad := [n for n in names if n not in TARGETS]: sys.exit(f"unknown target(s) {bad}; choose from {TARGETS}")
    names = [n for n in TARGETS if n in names]

    # SIGTERM to the bench behaves like Ctrl-C, so the finally blocks below always clean up
    def on_sigterm(*_): raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_sigterm)
    rows, workdir = [], Path(tempfile.mkdtemp(prefix="ml_prod-bench-serving-"))
    print(f"targets {names}, connections {conns}, {args.rounds} round(s), {args.duration:g} s per run, warm-up {args.warmup:g} s; "
          f"{os.cpu_count()} cores; work dir {workdir}", flush=True)
    try:
        model_dir = save_model_dir(workdir/"model") if any(n.startswith("ml_prod") for n in names) else workdir/"model"
        for rnd, name in [(k, n) for k in range(1, args.rounds + 1) for n in names]:
            t = Target(name, workdir, model_dir)
            try:
                print(f"\n== round {rnd}/{args.rounds}, {name}: starting (load average {os.getloadavg()[0]:.2f})", flush=True)
                info = t.start()
                if "skip" in info:
                    print(f"  {name}: skipped: {info['skip']}", flush=True); continue
                url, headers = info["url"], info.get("headers") or {}
                print(f"  up in {info['start_s']:.1f} s at {url}; check: {check_once(url, headers)}", flush=True)
                script = lua_script(workdir/f"{name}.lua", headers)
                if args.warmup > 0:
                    w = run_wrk(url, script, max(conns), args.warmup)
                    print(f"  warm-up: {w['rps']:.0f} req/s", flush=True)
                for c in conns:
                    r = run_wrk(url, script, c, args.duration)
                    r.update(target=name, connections=c, round=rnd, load=os.getloadavg()[0])
                    rows.append(r)
                    print(f"  {c:>3} connections: {r['rps']:8.0f} req/s  p50 {r['p50_us'] / 1000:6.2f} ms  "
                          f"p99 {r['p99_us'] / 1000:6.2f} ms  non-2xx {r['non2xx']}  socket errors {r['socket_errors']}  "
                          f"(load {r['load']:.2f})", flush=True)
            except RuntimeError as e:
                print(f"  {name}: FAILED: {e}", flush=True)
            finally:
                took = t.stop()
                if t.proc is not None: print(f"  stopped in {took:.1f} s", flush=True)
    except KeyboardInterrupt:
        print("\ninterrupted: stopped the running target", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if rows:
        print_table(rows)
        if args.json: Path(args.json).write_text(json.dumps(rows, indent=1))

if __name__ == "__main__":
    main()
