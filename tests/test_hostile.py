"""Hostile input against one real served application (issue 19, "Hostile input" and "Doors"), and concurrent
registrations of one model name.

* One application `hostile` on the session's shared serving cluster (conftest's `project`), API keys required
  on 127.0.0.1; every request goes over HTTP to its replica's own port.
* schemathesis generates requests from the endpoint's own OpenAPI schema (`/openapi.json`), valid and
  invalid (its positive and negative modes): no answer is a 5xx, every 4xx says why in its body.
* Oversized bodies, deep nesting, wrong content types, unicode edge cases, huge or malformed headers: each
  answered 4xx, the same replica process answers afterwards, its memory (RSS) stays within a generous bound.
* 1,000 requests without a key or with a wrong one: all 401; neither those keys nor the real one is written to
  any file of the project's state folder (audit log, MLflow) or of the cluster's Ray session folder (logs).
* Notebook parameters that carry code are injected as data (a real kernel runs the notebook; the code would
  leave a marker file); names that would lead out of their folder (a sweep's, an experiment's artifact folder, a
  pipeline step's) are refused, or made into one plain folder name, before anything is written.
* 20 registrations of one model name at once (4 processes of 5 threads), 10 rounds, on MLflow on SQLite:
  versions unique and contiguous in the database itself, no error.

Figures (counts, RSS, seconds) are printed, not asserted. Runs on the worker's serving cluster, whose fixed ports
(conftest's `SERVING_PORTS`) allow one test session on the machine at a time."""
from __future__ import annotations

import json
import socket
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import psutil
import pytest

from conftest import RECORD, cli, deploy, log_version, status

KEY = f"hostile-{uuid.uuid4().hex}"  # the application's API key, drawn per session: found in no file afterwards
AUTH = {"x-api-key": KEY}
APP = "hostile"


# ---- one served application -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def served(project):
    "The base URL of the one replica of `hostile` (API keys required); the application is removed at the end."
    log_version("hostile")
    url = deploy(project, {"name": APP, "arms": {"main": {"model": "models:/tiny@hostile", "weight": 1}}, "num_cpus": 0.25},
                 env={"ML_PROD_API_KEY": KEY})
    assert urlsplit(url).hostname == "127.0.0.1", url
    yield url
    cli("serve", "down", APP, check=False)


def replica_pid() -> int:
    (r,) = status(APP)["replicas"]
    return r["pid"]


def rss_mib(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def has_reason(r) -> bool:
    "Whether a 4xx answer says why: a JSON body with a non-empty `error` (ml_prod's) or `detail` (FastAPI's)."
    try: body = r.json()
    except ValueError: return False
    return isinstance(body, dict) and any(isinstance(body.get(k), (str, list)) and body.get(k) for k in ("error", "detail"))


def alive(url: str, pid: int):
    "The same replica process still answers a valid request."
    r = httpx.post(f"{url}/predict", json=RECORD, headers=AUTH, timeout=30)
    assert r.status_code == 200 and "score" in r.json(), r.text
    assert replica_pid() == pid, "the replica process was replaced"


# ---- schemathesis against the endpoint's own OpenAPI schema ---------------------------------------

EXAMPLES = {"POST /predict": 400, "POST /feedback": 150}  # per generation mode; the GET operations get 20


def test_schemathesis_no_5xx_and_every_4xx_says_why(served):
    import requests
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    doc = httpx.get(f"{served}/openapi.json", headers=AUTH, timeout=30).json()
    assert "Record" in doc["components"]["schemas"], doc["components"]  # the served model's own record schema
    schema = schemathesis.openapi.from_dict(doc)
    answers, session, t0, ungenerated = [], requests.Session(), time.monotonic(), []
    for result in schema.get_all_operations():
        op = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            if mode is GenerationMode.NEGATIVE and op.method.upper() == "GET": continue  # nothing to make invalid

            @settings(max_examples=EXAMPLES.get(op.label, 20), deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck), phases=[Phase.generate])
            @given(case=op.as_strategy(generation_mode=mode))
            def call(case):
                r = case.call(base_url=served, session=session, headers=AUTH, timeout=30)
                answers.append((op.label, mode.value, r.status_code, has_reason(r), r.text[:300], repr(case.body)[:300]))
            try: call()
            except Unsatisfiable: ungenerated.append(f"{op.label} ({mode.value})")  # the schema leaves nothing to make invalid
    elapsed = time.monotonic() - t0
    counts = Counter((label, mode, code) for label, mode, code, *_ in answers)
    print(f"schemathesis: {len(answers)} requests in {elapsed:.1f} s; nothing to generate for {ungenerated}", *sorted(counts.items()), sep="\n  ")
    refused_valid = Counter((a[0], a[4][:120]) for a in answers if a[1] == "positive" and a[2] >= 400)
    print("valid by the schema, refused by the server:", *refused_valid.most_common(5), sep="\n  ")
    assert not ungenerated, ungenerated  # every operation with a body declares its schema
    assert len(answers) >= 1000, len(answers)
    server_errors = [a for a in answers if a[2] >= 500]
    assert not server_errors, server_errors[:5]
    silent = [a for a in answers if 400 <= a[2] < 500 and not a[3]]
    assert not silent, silent[:5]
    assert counts[("POST /predict", "positive", 200)] > 0 and sum(n for (_, m, c), n in counts.items() if m == "negative" and c >= 400) > 0


# ---- hostile bodies and headers --------------------------------------------------------------------

def raw_http(url: str, head: bytes, body: bytes = b"") -> int:
    "Send bytes as they are (a request httpx would refuse to make); the answer's status, or 0 if the server closed the connection."
    u = urlsplit(url)
    with socket.create_connection((u.hostname, u.port), timeout=30) as s:
        s.sendall(head + body)
        data = b""
        while b"\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk: break
            data += chunk
    return int(data.split()[1]) if data.startswith(b"HTTP/") else 0


def request_head(path: str, headers: dict) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


ONE = json.dumps(RECORD)
HOSTILE = {  # name -> (body, headers beyond the key and a JSON content type)
    "declared body over max_body_bytes (2 MiB)": (b"[" + b" " * (2 << 20) + b"]", {}),
    "10,000 nested arrays": (b"[" * 10_000 + b"]" * 10_000, {}),
    "10,000 nested objects": (b'{"a":' * 10_000 + b"1" + b"}" * 10_000, {}),
    "a record nested 10,000 deep in a field": (('{"amount": ' + "[" * 10_000 + "]" * 10_000 + ', "country": "US"}').encode(), {}),
    "text/plain": (ONE.encode(), {"content-type": "text/plain"}),
    "form-urlencoded": (ONE.encode(), {"content-type": "application/x-www-form-urlencoded"}),
    "multipart": (b'--b\r\nContent-Disposition: form-data; name="x"\r\n\r\n' + ONE.encode() + b"\r\n--b--\r\n",
                  {"content-type": "multipart/form-data; boundary=b"}),
    "XML": (b"<record><amount>1</amount></record>", {"content-type": "application/xml"}),
    "lone high surrogate": (b'{"amount": 1.0, "country": "\\ud800"}', {}),
    "lone low surrogate": (b'{"amount": 1.0, "country": "\\udfff"}', {}),
    "invalid UTF-8": (b'{"amount": 1.0, "country": "\xff\xfe"}', {}),
    "UTF-16 body": (ONE.encode("utf-16"), {}),
    "NUL in a field name": (b'{"amount": 1.0, "country": "US", "\\u0000": 1}', {}),
    "RTL override in a field name": ('{"amount": 1.0, "\u202ecountry": "US"}'.encode(), {}),
    "number with 5,000 digits": (('{"amount": 1' + "0" * 5000 + ', "country": "US"}').encode(), {}),
    "1e400": (b'{"amount": 1e400, "country": "US"}', {}),
    "x-attempt of 10,000 digits": (ONE.encode(), {"x-attempt": "9" * 10_000}),
    "negative x-attempt": (ONE.encode(), {"x-attempt": "-1"}),
    "x-attempt in Arabic-Indic digits": (ONE.encode(), {"x-attempt": "\u0661".encode()}),
    "x-request-id with an RTL override": (ONE.encode(), {"x-request-id": "\u202eabc".encode()}),
    "x-request-id of 4,000 characters": (ONE.encode(), {"x-request-id": "a" * 4000}),
}


def hostile_answers(url: str, rounds: int) -> tuple[dict, list]:
    "Send every hostile request to `url` (`rounds` times over HTTP, the malformed ones once as raw bytes): (what each got, the answers that are not a 4xx with a reason)."
    seen, bad = {}, []
    with httpx.Client(base_url=url, timeout=60) as c:
        for _ in range(rounds):
            for name, (body, headers) in HOSTILE.items():
                r = c.post("/predict", content=body, headers={"content-type": "application/json", **AUTH, **headers})
                seen[name] = (r.status_code, r.text[:200])
                if not (400 <= r.status_code < 500 and has_reason(r)): bad.append((name, r.status_code, r.text[:300]))

        # a body streamed without a length, 8 MiB: refused once it passes the limit, not read to the end
        def streamed():
            for _ in range(128): yield b" " * (1 << 16)
        r = c.post("/predict", content=streamed(), headers={"content-type": "application/json", **AUTH})
        seen["streamed 8 MiB without content-length"] = (r.status_code, r.text[:200])
        if not (r.status_code == 413 and has_reason(r)): bad.append(("streamed", r.status_code, r.text[:300]))

    # what no client library sends: a negative, non-numeric or absurd length (with a small body), two lengths, a 200 kB header
    path, base = urlsplit(url).path + "/predict", {"content-type": "application/json", "x-api-key": KEY}
    raw = {"content-length -1": {"content-length": "-1"}, "content-length 'abc'": {"content-length": "abc"},
           "content-length 10^30": {"content-length": "1" + "0" * 30},
           "two different content-lengths": {"content-length": "5", "Content-Length": "500"},
           "a 200 kB header": {"x-attempt": "9" * 200_000}}
    for name, headers in raw.items():
        code = raw_http(url, request_head(path, {**base, **headers}), ONE.encode())
        seen[name] = (code, "")
        if not 400 <= code < 500: bad.append((name, code))
    return seen, bad


def test_hostile_bodies_and_headers_are_4xx_and_the_replica_lives(served):
    "The same hostile requests to the replica's own port, to the application's stable address (its shared port) and through Ray's proxy."
    pid = replica_pid()
    alive(served, pid)
    before = rss_mib(pid)
    st = status(APP)
    stable, proxy = st["url"], st["proxy_url"]
    assert stable != proxy and stable != served, st
    seen, bad = hostile_answers(served, rounds=3)  # three times: memory that grows per request would show
    via_stable, bad_via_stable = hostile_answers(stable, rounds=1)
    via_proxy, bad_via_proxy = hostile_answers(proxy, rounds=1)
    after = rss_mib(pid)
    n = 5 * (len(HOSTILE) + 6)
    print(f"replica pid {pid}: RSS {before:.0f} MiB before, {after:.0f} MiB after {n} hostile requests (3/5 to its port, 1/5 to the shared port, 1/5 through the proxy)")
    print(*(f"  {code} / {via_stable[name][0]} on the shared port / {via_proxy[name][0]} through the proxy  {name}: {text}" for name, (code, text) in seen.items()), sep="\n")
    assert not bad, bad
    assert not bad_via_stable, bad_via_stable
    assert not bad_via_proxy, bad_via_proxy
    alive(served, pid)
    assert httpx.post(f"{stable}/predict", json=RECORD, headers=AUTH, timeout=30).status_code == 200
    assert after < before + 300, (before, after)  # generous: a few large bodies buffered, not kept


# ---- doors: 1,000 requests without a key or with a wrong one ----------------------------------------

def files_holding(root: Path, needles: list[bytes]) -> list[str]:
    "Files under `root` holding any of `needles` (raw bytes; Ray's logs, the audit log, MLflow's database)."
    out = []
    for p in root.rglob("*"):
        try:
            if p.is_file() and not p.is_symlink():
                data = p.read_bytes()
                out += [f"{p}: {n[:12]!r}..." for n in needles if n in data]
        except OSError: pass
    return out


def test_a_thousand_requests_without_the_key_are_401_and_no_key_is_logged(served):
    from ml_prod.runtime.cluster import _temp_dir
    from ml_prod.settings import load_settings
    wrong = [f"wrong-{uuid.uuid4().hex}" for _ in range(5)]
    attempts = [("/predict", {}), ("/predict", {"x-api-key": ""}), ("/feedback", {}), ("/-/status", {}), ("/openapi.json", {})]
    attempts += [(p, {"x-api-key": k}) for k in wrong for p in ("/predict", "/feedback")]
    attempts += [("/predict", {"authorization": f"Bearer {wrong[0]}"}), ("/predict", {"x-api-key": KEY[:-1]}), ("/predict", {"x-api-key": KEY + "x"})]

    def hit(i: int) -> int:
        path, headers = attempts[i % len(attempts)]
        with httpx.Client(base_url=served, timeout=30) as c:
            if path in ("/-/status", "/openapi.json"): return c.get(path, headers=headers).status_code
            body = RECORD if path == "/predict" else {"request_id": f"door-{i}", "label": 1}
            return c.post(path, json=body, headers=headers).status_code

    t0 = time.monotonic()
    with ThreadPoolExecutor(8) as ex: codes = Counter(ex.map(hit, range(1000)))
    print(f"1000 requests without a valid key in {time.monotonic() - t0:.1f} s: {dict(codes)}")
    assert codes == {401: 1000}, codes
    assert httpx.post(f"{served}/predict", json=RECORD, headers=AUTH, timeout=30).status_code == 200  # the door still opens with the key

    time.sleep(2)  # the replica flushes its log every second
    s = load_settings()
    needles = [k.encode() for k in (KEY, *wrong)]
    logs = [p for p in Path(_temp_dir(s)).rglob("*") if p.is_file() and "replica" in p.name.lower() and APP in p.read_text(errors="ignore")]
    assert logs, f"no log file of {APP}'s replica under {_temp_dir(s)}: the search below would prove nothing"
    leaks = files_holding(Path(s.state_dir), needles) + files_holding(Path(_temp_dir(s)), needles)
    assert not leaks, leaks


# ---- code in notebook parameters, names that leave their folder -------------------------------------

PARAMS_NB = 'text: str = "hello"  # a free text\nn: int = 1\n'


def injected(marker: Path) -> list[str]:
    "Payloads that would create `marker` if the parameter's value were run as code."
    m = str(marker)
    return [f"'; import os; os.system('touch {m}') #",
            f'"; import os; os.system("touch {m}") #',
            f"\\'; open({m!r}, 'w') #",
            f'\\"; open({m!r}, "w") #',
            f"\"\"\"\nopen({m!r}, 'w')\n\"\"\"",
            f"{{open({m!r}, 'w')}}",
            f"\nopen({m!r}, 'w')\n"]


def test_parameter_values_carrying_code_are_injected_as_data(tmp_path):
    "Each payload, given to a str parameter, reaches a real kernel as that exact string; the code in it never runs."
    import nbformat
    from nbclient import NotebookClient
    from nbformat.v4 import new_code_cell, new_notebook
    from ml_prod.params import inject_parameters, notebook_schema
    nb = new_notebook(cells=[new_code_cell(PARAMS_NB, metadata={"tags": ["parameters"]}),
                             new_code_cell("import json\nopen(OUT, 'w').write(json.dumps(text))")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = tmp_path / "job.ipynb"
    nbformat.write(nb, path)
    schema = notebook_schema(path)
    marker = tmp_path / "INJECTED"
    for i, payload in enumerate(injected(marker)):
        run_nb, _ = inject_parameters(nbformat.read(path, as_version=4), {"text": payload}, schema)
        out = tmp_path / f"out-{i}.json"
        run_nb.cells.insert(0, new_code_cell(f"OUT = {str(out)!r}"))
        NotebookClient(run_nb, timeout=60, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
        assert json.loads(out.read_text()) == payload, (payload, out.read_text())
        assert not marker.exists(), f"payload {payload!r} ran as code"


def test_a_sweep_name_that_leaves_the_tune_folder_is_refused(project_dir):
    "A sweep's name is its folder under state_dir/tune: `../../x` would write outside the state folder."
    from ml_prod.errors import MlProdError
    from ml_prod.flows.tune import _sweep_dir
    from ml_prod.settings import load_settings
    s = load_settings()
    for bad in ("../../escaped-sweep", "../escaped-sweep", "/tmp/escaped-sweep", "a/../../../escaped-sweep"):
        with pytest.raises(MlProdError) as e: _sweep_dir(s, "job", bad, False)
        assert repr(bad) in str(e.value) and "name" in str(e.value), e.value
    assert not list(project_dir.parent.rglob("escaped-sweep")) and not Path("/tmp/escaped-sweep").exists()


def test_an_experiment_name_that_is_a_path_stays_inside_the_artifact_store(project_dir):
    "An experiment's name names its folder in the local artifact store: `../../x` or `/x` would put its artifacts outside."
    import mlflow
    from conftest import mlflow_at
    from ml_prod.settings import load_settings
    from ml_prod.tracking.store import client, ensure_experiment
    s = load_settings()
    store_root = Path(s.artifact_location).resolve()
    for bad in ("../../escaped-experiment", "../escaped-experiment", "/tmp/escaped-experiment"):
        exp = ensure_experiment(s, bad)
        assert client(s).get_experiment(exp).name == bad  # the name is kept as given: only its folder is made safe
        with mlflow_at(s.tracking_uri), mlflow.start_run(experiment_id=exp):
            mlflow.log_text("an artifact", "escaped-artifact.txt")
    written = [p.resolve() for root in (project_dir.parent, Path("/tmp/escaped-experiment")) for p in root.rglob("escaped-artifact.txt")]
    assert len(written) == 3 and all(store_root in p.parents for p in written), written
    assert not [p for p in [*project_dir.parent.rglob("*escaped-experiment*"), Path("/tmp/escaped-experiment")]
                if p.exists() and store_root not in p.resolve().parents], "a folder outside the artifact store"


def test_a_pipeline_step_name_that_is_a_path_is_refused(tmp_path):
    "Step names tag runs and name output folders: one like `../../x` is refused when the pipeline is read, before any step runs."
    from ml_prod.errors import MlProdError
    from ml_prod.flows.pipelines import load_pipeline
    (tmp_path / "job.ipynb").write_text("{}")
    for bad in ("../../escaped-step", "a/b", "..", "x\u0000"):
        f = tmp_path / "p.yaml"
        f.write_text(json.dumps({"name": "p", "steps": {bad: {"notebook": "job.ipynb"}}}))
        with pytest.raises(MlProdError) as e: load_pipeline(f)
        assert f"step name {bad!r}" in str(e.value), e.value
    assert not list(tmp_path.parent.rglob("escaped-step"))


# ---- 20 registrations of one name at once, 10 rounds ------------------------------------------------

PROCESSES, THREADS, ROUNDS = 4, 5, 10  # 20 registrations at once: 4 processes (SQLite's file lock) of 5 threads (its pool)


def _register_rounds(project: str, run_ids: list[str], barrier, results):
    "In a process of its own: each round, wait for the others, then register `run_ids` at once (one thread each)."
    import os
    os.chdir(project)
    from ml_prod.models import registry
    from ml_prod.models.registry import register
    from ml_prod.settings import load_settings
    s = load_settings()

    def one(run_id):
        try: return int(register(s, run_id, "crowded"))
        except Exception as e: return f"{type(e).__name__}: {str(e)[:300]}"
    with ThreadPoolExecutor(len(run_ids)) as ex:
        for r in range(ROUNDS):
            barrier.wait(timeout=120)
            results.put((os.getpid(), list(ex.map(one, run_ids)), sum(registry.retries.values())))  # and the store's errors retried so far


def test_concurrent_registrations_get_unique_contiguous_versions(project_dir):
    import multiprocessing
    import sqlite3
    import mlflow
    from ml_prod.settings import load_settings
    from conftest import mlflow_at
    s = load_settings()
    with mlflow_at(s.tracking_uri):
        mlflow.set_experiment("registrations")
        run_ids = []
        for _ in range(PROCESSES * THREADS):
            with mlflow.start_run() as run:
                mlflow.log_text("flavors: {}\n", "model/MLmodel")
                run_ids.append(run.info.run_id)
    ctx = multiprocessing.get_context("spawn")  # fresh processes: no SQLite connection inherited from this one
    barrier, results = ctx.Barrier(PROCESSES), ctx.Queue()
    procs = [ctx.Process(target=_register_rounds, args=(str(project_dir), run_ids[i::PROCESSES], barrier, results)) for i in range(PROCESSES)]
    t0 = time.monotonic()
    for p in procs: p.start()
    got = [results.get(timeout=300) for _ in range(PROCESSES * ROUNDS)]
    for p in procs: p.join(60)
    elapsed = time.monotonic() - t0
    errors = [x for _, xs, _ in got for x in xs if not isinstance(x, int)]
    versions = sorted(x for _, xs, _ in got for x in xs if isinstance(x, int))
    retried = sum(max(n for q, _, n in got if q == pid) for pid in {pid for pid, _, _ in got})  # 'database is locked' and the like
    db = s.tracking_uri.removeprefix("sqlite:///")
    with sqlite3.connect(db) as con:
        raw = sorted(int(v) for (v,) in con.execute("select version from model_versions where name = 'crowded'"))
    n = PROCESSES * THREADS * ROUNDS
    print(f"{n} registrations, {PROCESSES * THREADS} at a time in {PROCESSES} processes: {elapsed:.1f} s (with the processes' start), "
          f"{len(errors)} errors, {retried} transient store errors retried by register, {len(raw)} versions in the database")
    assert not errors, errors[:5]
    assert raw == list(range(1, n + 1)), raw  # unique and contiguous, read from the database itself
    assert versions == raw
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
