"""Ray Tune over notebook parameters (`ml_prod.tune`): spaces refused before anything runs, and a real
ASHA sweep on the session's local Ray where bad settings are stopped early, their kernels killed and
their child runs KILLED with the partial executed notebook."""
from __future__ import annotations

import json
import os
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from ml_prod import tracking
from ml_prod.errors import ParameterError
from ml_prod.settings import load_settings
from ml_prod.tune import tune_notebook

EPOCHS = 6


def make_notebook(path: Path, epochs: int = EPOCHS, sleep: float = 0.4) -> Path:
    "Reports `score` each epoch: climbs for lr near 0.1, stays near zero for lr >= 0.5."
    params = new_code_cell("lr: float = 0.1  # {min: 0, max: 1}\nseed: int = 0", metadata={"tags": ["parameters"]})
    loop = new_code_cell(f"import time, ml_prod\nfor epoch in range({epochs}):\n    time.sleep({sleep})\n"
                         "    ml_prod.report(epoch=epoch, score=(epoch + 1) * (1 - abs(lr - 0.1)) if lr < 0.5 else 0.1 * (1 - lr))\n"
                         "    print('epoch', epoch, flush=True)")
    nb = new_notebook(cells=[params, loop, new_code_cell("print('done')")])
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
    c = tracking.client(s)
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
    c = tracking.client(s)
    sweep = c.get_run(r.sweep_run_id)
    assert sweep.info.status == "FINISHED" and sweep.data.tags["ml_prod.best_run_id"] == r.best_run_id
    children = tracking.client(s).search_runs([sweep.info.experiment_id], f"tags.`mlflow.parentRunId` = '{r.sweep_run_id}'")
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
