"""Ray Tune over notebook parameters (`ml_prod.tune`): spaces refused before anything runs, a real
ASHA sweep on the session's local Ray where bad settings are stopped early (their kernels killed,
their child runs KILLED with the partial executed notebook) in reused trial actors, and a CLI sweep
interrupted with Ctrl-C (SIGINT) and continued with `--resume`."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from ml_prod.tracking import store
from ml_prod.errors import ParameterError
from ml_prod.settings import load_settings
from ml_prod.flows.tune import tune_notebook

EPOCHS = 6


def make_notebook(path: Path, epochs: int = EPOCHS, sleep: float | str = 0.4, log: str | None = None) -> Path:
    "Reports `score` each epoch: climbs for lr near 0.1, stays near zero for lr >= 0.5. `log`: a file each execution appends its seed to."
    params = new_code_cell("lr: float = 0.1  # {min: 0, max: 1}\nseed: int = 0", metadata={"tags": ["parameters"]})
    start = [new_code_cell(f"with open({log!r}, 'a') as f: f.write(f'{{seed}}\\n')")] if log else []
    loop = new_code_cell(f"import time, ml_prod\nfor epoch in range({epochs}):\n    time.sleep({sleep})\n"
                         "    ml_prod.report(epoch=epoch, score=(epoch + 1) * (1 - abs(lr - 0.1)) if lr < 0.5 else 0.1 * (1 - lr))\n"
                         "    print('epoch', epoch, flush=True)")
    nb = new_notebook(cells=[params, *start, loop, new_code_cell("print('done')")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def test_bad_space_refused_before_anything_runs(project_dir):
    s = load_settings()
    nbp = make_notebook(project_dir / "train.ipynb")
    with pytest.raises(ParameterError, match="unknown parameter 'lrs', did you mean 'lr'"):
        tune_notebook(nbp, {"lrs": {"choice": [0.1]}}, settings=s)
    with pytest.raises(ParameterError, match=r"lr bound 2.0: out of range, allowed 0 <= lr <= 1"):
        tune_notebook(nbp, {"lr": {"uniform": [0, 2]}}, settings=s)
    with pytest.raises(ParameterError, match="seed: unknown distribution 'gird'. Did you mean 'grid'"):
        tune_notebook(nbp, {"seed": {"gird": [0, 1]}}, settings=s)
    (project_dir / "space.yaml").write_text("seed: {randint: [0, 2.5]}\n")
    with pytest.raises(ParameterError, match="seed: randint draws integers"):
        tune_notebook(nbp, project_dir / "space.yaml", settings=s)
    assert not (Path(s.state_dir) / "tune").exists()
    c = store.client(s)
    assert not c.search_runs([e.experiment_id for e in c.search_experiments()])


def test_secret_parameter_cannot_be_searched(project_dir):
    s = load_settings()
    nb = new_notebook(cells=[new_code_cell("lr: float = 0.1\ntoken: str = ''  # {secret: true}", metadata={"tags": ["parameters"]})])
    nbformat.write(nb, project_dir / "keyed.ipynb")
    with pytest.raises(ParameterError, match="token is a secret parameter, which cannot be searched") as e:
        tune_notebook(project_dir / "keyed.ipynb", {"lr": {"grid": [0.1]}, "token": {"choice": ["key-one-1", "key-two-2"]}}, settings=s)
    assert "key-one" not in str(e.value)  # the candidates are not quoted
    assert not (Path(s.state_dir) / "tune").exists()
    c = store.client(s)
    assert not c.search_runs([e.experiment_id for e in c.search_experiments()])

def _pgid_alive(pgid: int) -> bool:
    try: os.killpg(pgid, 0)
    except ProcessLookupError: return False
    except PermissionError: return True
    return True


def test_asha_stops_bad_trials(ray_local, project_dir):
    s = load_settings()
    nbp = make_notebook(project_dir / "train.ipynb")
    space = project_dir / "space.yaml"
    space.write_text("lr: {grid: [0.1, 0.9, 0.8]}\n")
    r = tune_notebook(nbp, space, metric="score", mode="max", samples=1, scheduler="asha", max_concurrent=2,
                      settings=s, max_t=EPOCHS, grace_period=1, reduction_factor=2, fixed_parameters={"seed": 3}, progress=False)
    print(r.summary())
    assert r.best_params == {"lr": 0.1} and r.best_metric == pytest.approx(EPOCHS)
    assert len(r.trials) == 3
    c = store.client(s)
    sweep = c.get_run(r.sweep_run_id)
    assert sweep.info.status == "FINISHED" and sweep.data.tags["ml_prod.best_run_id"] == r.best_run_id
    children = store.client(s).search_runs([sweep.info.experiment_id], f"tags.`mlflow.parentRunId` = '{r.sweep_run_id}'")
    assert sorted(ch.info.run_id for ch in children) == sorted(t.run_id for t in r.trials)
    best = c.get_run(r.best_run_id)
    assert best.info.status == "FINISHED" and best.data.params["seed"] == "3"
    assert len(c.get_metric_history(r.best_run_id, "score")) == EPOCHS

    killed = [t for t in r.trials if t.status == "KILLED"]
    assert killed, r.summary()
    for t in killed:
        assert t.reports < EPOCHS and "stopped by asha" in t.error
        run = c.get_run(t.run_id)
        assert len(c.get_metric_history(t.run_id, "score")) < EPOCHS
        assert not _pgid_alive(int(run.data.tags["ml_prod.kernel_pgid"])), "the stopped trial's kernel group is still alive"
        import mlflow.artifacts
        out = mlflow.artifacts.download_artifacts(run_id=t.run_id, artifact_path="train.ipynb", tracking_uri=s.tracking_uri,
                                                  dst_path=str(project_dir / "dl" / t.trial_id))
        nb = nbformat.read(out, as_version=4)
        assert "stopped by asha" in nb.cells[0].source  # the banner
        assert "done" not in json.dumps(nb.cells[-1].get("outputs", []))  # the notebook did not get to its end
    for ch in children:
        assert ch.info.status in ("FINISHED", "KILLED")
    # actors were reused (3 trials, 2 at a time), each trial with its own kernel
    pids = [ch.data.tags["ml_prod.supervisor_pid"] for ch in children]
    assert len(set(pids)) < len(pids) and len({ch.data.tags["ml_prod.kernel_pgid"] for ch in children}) == len(children), pids
    # the environment freeze is logged once, on the sweep's run, and the trials refer to it
    assert "requirements.txt" in {Path(a.path).name for a in c.list_artifacts(r.sweep_run_id, "provenance")}
    for ch in children:
        assert ch.data.tags["ml_prod.environment"] == f"runs:/{r.sweep_run_id}/provenance/requirements.txt"
        assert {Path(a.path).name for a in c.list_artifacts(ch.info.run_id, "provenance")} == {"train.ipynb"}
        assert json.loads(ch.data.tags["ml_prod.versions"])["ray"]


CLEAN = ("import os, json\n"
         "seen = dict(seed=seed, run=os.environ['MLFLOW_RUN_ID'], leak=os.environ.get('ML_PROD_TEST_LEAK'), kernel=os.getpid(),\n"
         "            leftover='leftover' in globals())\n"
         "os.environ['ML_PROD_TEST_LEAK'] = str(seed); leftover = seed\n"
         "with open('seen.jsonl', 'a') as f: f.write(json.dumps(seen) + '\\n')\n"
         "import ml_prod; ml_prod.report(score=seed)")


def test_reused_actor_starts_each_trial_clean(ray_local, project_dir):
    "Three trials, one at a time, in one reused actor: each gets a new kernel, its own run, no variable of the one before."
    s = load_settings()
    params = new_code_cell("seed: int = 0", metadata={"tags": ["parameters"]})
    nb = new_notebook(cells=[params, new_code_cell(CLEAN)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, project_dir / "clean.ipynb")
    r = tune_notebook(project_dir / "clean.ipynb", {"seed": {"grid": [1, 2, 3]}}, metric="score", scheduler="fifo", max_concurrent=1,
                      settings=s, progress=False)
    assert [t.status for t in r.trials] == ["FINISHED"] * 3, r.summary()
    c = store.client(s)
    runs = {t.params["seed"]: c.get_run(t.run_id) for t in r.trials}
    assert len({run.data.tags["ml_prod.supervisor_pid"] for run in runs.values()}) == 1  # one actor ran all three
    seen = [json.loads(line) for line in (project_dir / "seen.jsonl").read_text().splitlines()]
    assert sorted(x["seed"] for x in seen) == [1, 2, 3]
    for x in seen:
        assert x["run"] == runs[x["seed"]].info.run_id and runs[x["seed"]].data.params["seed"] == str(x["seed"])
        assert x["leak"] is None and not x["leftover"], x
    assert len({x["kernel"] for x in seen}) == 3
    for run in runs.values(): assert not _pgid_alive(int(run.data.tags["ml_prod.kernel_pgid"]))


# ---- interrupting a sweep and resuming it ---------------------------------------------------------------

ML_PROD = str(Path(sys.executable).parent / "ml_prod")


def wait_for(cond, timeout: float, every: float = 0.5, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if v := cond(): return v
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _tune_cli(d: Path, log: Path, *extra: str) -> subprocess.Popen:
    "`ml_prod tune` of train.ipynb in project `d`, its output to `log` (a file: nobody reads a pipe while it runs)."
    args = [ML_PROD, "tune", "train.ipynb", "--space", "space.yaml", "--metric", "score", "--scheduler", "fifo",
            "--max-concurrent", "2", *extra]
    with open(log, "w") as f:
        return subprocess.Popen(args, cwd=d, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}, stdout=f, stderr=subprocess.STDOUT, text=True)


def _finish(p: subprocess.Popen, log: Path, timeout: float) -> str:
    "Wait for `p` (killed if it outlives `timeout`) and return its output."
    try: p.wait(timeout=timeout)
    finally:
        if p.poll() is None: p.kill(); p.wait()
    return log.read_text()


def _sweep_runs(c, exp: str, sweep_run_id: str) -> dict:
    "The sweep's child runs by trial id (fails on a trial with two runs)."
    runs = c.search_runs([exp], f"tags.`mlflow.parentRunId` = '{sweep_run_id}'")
    by_trial = Counter(r.data.tags["ml_prod.tune.trial_id"] for r in runs)
    assert max(by_trial.values(), default=1) == 1, f"a trial has several child runs: {by_trial}"
    return {r.data.tags["ml_prod.tune.trial_id"]: r for r in runs}


def test_interrupted_sweep_resumes(project_dir):
    """`ml_prod tune` gets Ctrl-C (SIGINT) once a trial has finished and others are running; `--resume` then
    continues it: finished trials are not run again, interrupted ones restart in the child runs they had, and
    the sweep ends with all its trials under its one parent run."""
    s = load_settings()
    # seed 0 is quick (2.4 s), the others slow (9 s): when seed 0 is done and another has reported, that one
    # is still far from done, so Ctrl-C always finds a trial to interrupt (with equal trials it could finish first)
    make_notebook(project_dir / "train.ipynb", sleep="(0.4 if seed == 0 else 1.5)", log="executions.log")
    (project_dir / "space.yaml").write_text("seed: {grid: [0, 1, 2, 3]}\n")
    c = store.client(s)
    p = _tune_cli(project_dir, project_dir / "first.log")
    try:
        def sweep():
            if not (project_dir / ".ml_prod" / "mlflow.db").exists(): return None  # the CLI creates the store
            runs = c.search_runs([e.experiment_id for e in c.search_experiments()], "tags.`ml_prod.sweep` = 'true'")
            return runs[0] if runs else None
        parent = wait_for(sweep, 120, what="the sweep's run")
        exp, sweep_id = parent.info.experiment_id, parent.info.run_id
        def one_done_one_running():
            runs = list(_sweep_runs(c, exp, sweep_id).values())
            done = [r for r in runs if r.info.status == "FINISHED"]
            running = [r for r in runs if r.info.status == "RUNNING" and c.get_metric_history(r.info.run_id, "score")]
            return done and running
        wait_for(one_done_one_running, 180, what="a finished trial and a running one that has reported")
    finally: p.send_signal(signal.SIGINT)  # Ctrl-C: also when the wait failed, so the CLI shuts its Ray down
    out = _finish(p, project_dir / "first.log", 120)
    assert p.returncode == 130, out
    assert "--resume" in out, out
    assert c.get_run(sweep_id).info.status == "KILLED"
    before = _sweep_runs(c, exp, sweep_id)
    finished = {t: r for t, r in before.items() if r.info.status == "FINISHED"}
    interrupted = {t: r for t, r in before.items() if r.info.status != "FINISHED"}
    assert finished and interrupted, {t: r.info.status for t, r in before.items()}
    for r in interrupted.values():  # stopped and recorded, kernel gone
        assert r.info.status == "KILLED" and "stopped by Ray Tune" in r.data.tags["ml_prod.error"], r.data.tags.get("ml_prod.error")
        wait_for(lambda: not _pgid_alive(int(r.data.tags["ml_prod.kernel_pgid"])), 15, what="the interrupted kernel to be gone")
    ran_before = Counter((project_dir / "executions.log").read_text().split())
    scores_before = {t: len(c.get_metric_history(r.info.run_id, "score")) for t, r in before.items()}

    p = _tune_cli(project_dir, project_dir / "resumed.log", "--resume")
    out = _finish(p, project_dir / "resumed.log", 300)
    assert p.returncode == 0, out
    sweeps = c.search_runs([exp], "tags.`ml_prod.sweep` = 'true'")
    assert [r.info.run_id for r in sweeps] == [sweep_id]  # the parent run is reused, not a second sweep
    parent = c.get_run(sweep_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["ml_prod.tune.resumes"] == "1"
    after = _sweep_runs(c, exp, sweep_id)
    assert len(after) == 4 and all(r.info.status == "FINISHED" for r in after.values()), {t: r.info.status for t, r in after.items()}
    assert parent.data.tags["ml_prod.best_run_id"] in {r.info.run_id for r in after.values()}
    for t, r in finished.items():  # not run again
        assert after[t].info.run_id == r.info.run_id and after[t].info.end_time == r.info.end_time
        assert after[t].data.tags["ml_prod.attempts"] == "1"
    for t, r in interrupted.items():  # run again from the start, in the run they had, without the first attempt's reports again
        assert after[t].info.run_id == r.info.run_id and after[t].data.tags["ml_prod.attempts"] == "2"
        assert "ml_prod.error" not in after[t].data.tags
        assert len(c.get_metric_history(r.info.run_id, "score")) == scores_before[t] + EPOCHS
    assert sorted(re.findall(r"^  (\S+) +FINISHED +reports=(\d+)", out, re.M)) == sorted((t, str(EPOCHS)) for t in after), out
    ran = Counter((project_dir / "executions.log").read_text().split())
    seeds = {t: r.data.params["seed"] for t, r in after.items()}
    for t in finished: assert ran[seeds[t]] == 1, ran
    for t in interrupted: assert ran[seeds[t]] == ran_before[seeds[t]] + 1, ran
    assert sum(ran.values()) == 4 + len(interrupted), ran
    assert "best run:" in out and f"{EPOCHS:.4g}" in out.split("best run:")[1], out
