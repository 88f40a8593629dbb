"""Batch scoring (`ml_prod batch score`) on the session's shared serving cluster: the endpoint's answers, a run
killed halfway and resumed, and bad input refused with exit status 2.

The commands run in subprocesses (the pytest process never connects to the shared cluster): `ml_prod.cli.common.app`
with only the batch group imported (`ml_prod.cli.main` registers it with the others).
Facts are read from the files themselves (pyarrow), the endpoint's HTTP answers and the registry's versions."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from conftest import HERE, deploy, log_version

BATCH = [sys.executable, "-c", "from ml_prod.cli.common import app; import ml_prod.cli.batch; app(prog_name='ml_prod')", "batch", "score"]


def batch_env(project: Path) -> dict:
    "The driver's environment: tests/ importable (the steps), as the shared cluster's processes have it."
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])])}


def batch(project: Path, *args, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    root = ["--json"] if "--json" in args else []  # a root option: before the group
    cmd = [*BATCH[:3], *root, *BATCH[3:], *(a for a in args if a != "--json")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=batch_env(project), cwd=project)
    if check and r.returncode != 0: raise AssertionError(f"batch score {' '.join(args)} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def rows(n: int, seed: int, start: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"id": np.arange(start, start + n), "amount": rng.uniform(0, 400, n).round(2),
                         "country": rng.choice(["US", "FR", "DE"], n)})


def read_dir(folder: Path) -> pd.DataFrame:
    "Every Parquet file directly under `folder` (not the rejects), concatenated."
    return pd.concat([pq.read_table(f).to_pandas() for f in sorted(folder.glob("*.parquet"))], ignore_index=True)


ONLINE = {"name": "batch-online", "arms": {"main": {"model": "models:/tiny@batch-online", "weight": 1}}, "num_cpus": 0.25,
          "preprocess": ["step_functions:double"], "postprocess": ["step_functions:halve"],
          "decision": {"threshold": 0.3, "positive": "block", "negative": "allow"}}


@pytest.fixture(scope="module")
def cluster(project):
    "(version, replica URL) of the application `ONLINE`; its `serve up` starts the shared cluster (with Serve's flags) if it is not up."
    version = log_version("batch-online")
    return version, deploy(project, ONLINE)


def test_batch_gives_the_endpoints_answers(project, cluster, tmp_path):
    "The same rows through the endpoint (HTTP, fused pre and post steps) and through batch scoring: identical scores and decisions."
    version, url = cluster
    data = rows(300, seed=1)
    inp = tmp_path / "in"; inp.mkdir()
    data.iloc[:150].to_parquet(inp / "part-0.parquet"); data.iloc[150:].to_parquet(inp / "part-1.parquet")
    bad = pd.DataFrame({"id": [999], "amount": [None], "country": ["US"]}).astype({"amount": float})
    bad.to_parquet(inp / "part-2.parquet")

    records, online_scores, online_decisions = data[["amount", "country"]].to_dict(orient="records"), [], []
    for i in range(0, len(records), 100):  # under the endpoint's max_records
        answer = httpx.post(f"{url}/predict", json=records[i:i + 100], timeout=60)
        assert answer.status_code == 200, answer.text
        online_scores += answer.json()["scores"]; online_decisions += answer.json()["decisions"]
    refused = httpx.post(f"{url}/predict", json={"amount": None, "country": "US"}, timeout=60)
    assert refused.status_code == 422, refused.text

    out = tmp_path / "out"
    r = batch(project, "--app", str(project / "batch-online.yaml"), "--input", str(inp), "--output", str(out), "--cpus", "0.5", "--json")
    result = json.loads(r.stdout)
    got = read_dir(out).sort_values("id").reset_index(drop=True)
    assert got["id"].tolist() == data["id"].tolist()  # every valid row, once, in the output
    assert got["score"].tolist() == online_scores  # exactly, not approximately
    assert got["decision"].tolist() == online_decisions
    assert set(got["decision"]) == {"block", "allow"}
    assert set(got["model_name"]) == {"tiny"} and set(got["model_version"]) == {str(version)}
    assert got["score"].tolist()[0] == pytest.approx(1 / (1 + math.exp(-(data.amount[0] * 2 / 100 - 1))) / 2)  # double, tiny, halve
    # the refused row is in the rejects file, with the error an endpoint answers
    rej = pq.read_table(out / "_rejects" / "part-2.parquet").to_pandas()
    assert rej["id"].tolist() == [999] and json.loads(rej["errors"][0]) == refused.json()["errors"]
    assert not (out / "_rejects" / "part-0.parquet").exists()
    assert (result["rows_scored"], result["rows_rejected"], result["model"]) == (300, 1, f"models:/tiny/{version}")
    # the MLflow run
    from ml_prod.settings import load_settings
    from ml_prod.tracking.store import client
    run = client(load_settings()).get_run(result["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["ml_prod.batch.model"] == f"models:/tiny/{version}"
    assert run.data.metrics["ml_prod.batch.rows_scored"] == 300 and run.data.metrics["ml_prod.batch.rows_rejected"] == 1
    assert run.data.tags["ml_prod.batch.app"] == "batch-online" and len(run.data.tags["ml_prod.batch.input_sha256"]) == 64


def test_killed_run_resumes_without_duplicates_or_mixing(project, cluster, tmp_path):
    "Killed after its first output file, moved alias in between: refused, then finished with the first version; every row once."
    hold = tmp_path / "hold"; hold.touch()  # the model waits on the rows of the third file on while this exists
    first = log_version("batch-resume", hold_file=str(hold), hold_country="HOLD")
    inp = tmp_path / "in"; inp.mkdir()
    n_files, per_file = 6, 200
    for i in range(n_files):
        r = rows(per_file, seed=10 + i, start=i * per_file)
        if i >= 2: r["country"] = "HOLD"
        r.to_parquet(inp / f"f{i}.parquet")
    out = tmp_path / "out"
    args = ["--model", "tiny@batch-resume", "--input", str(inp), "--output", str(out), "--cpus", "0.5", "--actors", "1", "--batch-size", "50"]
    p = subprocess.Popen([*BATCH, *args], env=batch_env(project), cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None and not (out / "f0.parquet").exists(): time.sleep(0.05)
    assert p.poll() is None, p.communicate()[1][-3000:]
    time.sleep(2)  # held on the third file: nothing more completes
    os.killpg(p.pid, signal.SIGKILL); p.wait()
    hold.unlink()
    done_before = sorted(f.name for f in out.glob("f*.parquet"))
    # the first file's scores survive the kill; the second's may (Ray Data hands a task's output on when its actor starts the next)
    assert done_before in (["f0.parquet"], ["f0.parquet", "f1.parquet"]), done_before
    assert not json.loads((out / "_batch.json").read_text())["finished"]

    second = log_version("batch-resume")  # the alias moves while the run is down
    assert second != first
    r = batch(project, *args, check=False)
    assert r.returncode == 2 and "never mixes versions" in r.stderr, r.stderr[-2000:]

    r = batch(project, *args, "--keep-version", "--json")
    result = json.loads(r.stdout)
    assert result["files_skipped"] == len(done_before) and result["files_scored"] == n_files - len(done_before)
    got = read_dir(out)
    expected = pd.concat([pd.read_parquet(inp / f"f{i}.parquet") for i in range(n_files)])
    assert len(got) == len(expected) == n_files * per_file  # no row missing, none twice
    assert sorted(got["id"]) == sorted(expected["id"]) and got["id"].is_unique
    assert set(got["model_version"]) == {str(first)}  # the version resolved first, on every row
    assert not list(out.rglob(".*.tmp"))
    for i in range(n_files):  # one output file per input file, with that file's rows
        assert pq.read_table(out / f"f{i}.parquet").column("id").to_pylist() == pd.read_parquet(inp / f"f{i}.parquet")["id"].tolist()
    # a finished output is refused unless --overwrite, which scores everything again with the alias's version now
    r = batch(project, *args, check=False)
    assert r.returncode == 2 and "--overwrite" in r.stderr
    result = json.loads(batch(project, *args, "--overwrite", "--json").stdout)
    assert result["files_skipped"] == 0 and set(read_dir(out)["model_version"]) == {str(second)}


def test_bad_input_exits_2(project, tmp_path):
    "Missing or empty input, a schema that does not match the signature, an output that exists, an unknown alias: exit 2, named."
    log_version("batch-bad")
    good = tmp_path / "good.parquet"; rows(3, seed=3).to_parquet(good)
    empty = tmp_path / "empty.parquet"; rows(0, seed=3).to_parquet(empty)
    wrong = tmp_path / "wrong.parquet"; rows(3, seed=3).drop(columns=["country"]).to_parquet(wrong)
    mine = tmp_path / "mine"; mine.mkdir(); (mine / "notes.txt").write_text("not scores")
    cases = [(["--model", "tiny@batch-bad", "--input", str(tmp_path / "nope")], "does not exist"),
             (["--model", "tiny@batch-bad", "--input", str(empty)], "hold no rows"),
             (["--model", "tiny@batch-bad", "--input", str(wrong)], "missing column(s) ['country']"),
             (["--model", "tiny@batch-bad", "--input", str(good), "--output", str(mine)], "not a batch output"),
             (["--model", "tiny@no-such-alias", "--input", str(good)], "has no alias 'no-such-alias'"),
             (["--model", "tiny/9999", "--input", str(good)], "has no version 9999")]
    for args, says in cases:
        if "--output" not in args: args = [*args, "--output", str(tmp_path / "out")]
        r = batch(project, *args, check=False)
        assert r.returncode == 2 and says in r.stderr, (args, r.returncode, r.stderr[-2000:])
    assert (mine / "notes.txt").read_text() == "not scores" and not (tmp_path / "out").exists()
