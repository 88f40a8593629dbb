"""`pip install ml_prod` without extras gives a working `ml_prod run`.

The wheel is built from this checkout and installed, with no extra, into a fresh virtualenv (conftest's
`fresh_venv`, shared with test_init); the dependencies come from the package index (pip's cache makes a
second run quicker). Slow: the install takes minutes."""
import json
import time

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from conftest import clean_env, sh


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_wheel_without_extras_runs_a_notebook(tmp_path, fresh_venv):
    venv = fresh_venv
    env = clean_env(venv)

    # what the extras and the dev tools hold is not there (scikit-learn is: MLflow requires it), so the core needs none of it
    present = sh(venv / "bin" / "python", "-c", "import importlib.util as u, json; print(json.dumps([m for m in "
                 "('torch', 'jupyterlab', 'ipywidgets', 'fastcore', 'nbdev') if u.find_spec(m)]))", env=env).stdout
    assert json.loads(present) == [], present

    ml_prod = venv / "bin" / "ml_prod"
    assert "run" in sh(ml_prod, "--help", env=env).stdout

    project = tmp_path / "project"
    project.mkdir()
    (project / "settings.ini").write_text("[DEFAULT]\n")
    nb = new_notebook(cells=[new_code_cell("x: int = 1  # a number", metadata={"tags": ["parameters"]}),
                             new_code_cell("import mlflow\nprint('x is', x)\nmlflow.log_metric('doubled', 2 * x)")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, project / "double.ipynb")
    t0 = time.monotonic()
    r = sh(ml_prod, "run", "double.ipynb", "-p", "x", "7", cwd=project, env=env, timeout=600)
    print(f"ml_prod run in the fresh virtualenv: {time.monotonic() - t0:.0f} s")
    assert "x is 7" in r.stdout and "FINISHED" in r.stdout + r.stderr, r.stdout[-3000:] + r.stderr[-3000:]

    jobs = json.loads(sh(ml_prod, "--json", "jobs", "list", cwd=project, env=env).stdout)
    assert [(j["notebook"], j["status"]) for j in jobs] == [("double.ipynb", "FINISHED")], jobs
    assert jobs[0]["metrics"] == {"doubled": 14.0}, jobs
    # the parameter, as MLflow recorded it, read with the installed package
    params = sh(venv / "bin" / "python", "-c", "from ml_prod.settings import load_settings; from ml_prod.tracking.store import client; "
                f"print(client(load_settings()).get_run({jobs[0]['run_id']!r}).data.params.get('x'))", cwd=project, env=env).stdout
    assert params.strip() == "7", params
    log = json.loads(sh(ml_prod, "--json", "jobs", "logs", jobs[0]["run_id"], cwd=project, env=env).stdout)
    assert log["run_id"] == jobs[0]["run_id"] and "x is 7" in log["log"], log
