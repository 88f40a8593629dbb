"""Pipelines against a real local Ray, real papermill kernels and real MLflow (SQLite).

Checking (no Ray): cycles, unknown parameters with a suggestion, missing notebooks, bad references.
Running: the fraud example's pipeline end to end and then fully cached; a parameter change re-runs
only the changed step and what is downstream; `force`, `only`, `from_step`; a failing step skips its
dependents while an independent branch finishes.
"""
from __future__ import annotations
import time
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

import ml_prod
from ml_prod.tracking import store
from ml_prod.errors import MlProdError
from ml_prod.flows.pipelines import PipelineError, check_pipeline, load_pipeline, pipeline_errors, run_pipeline, show_pipeline
from ml_prod.settings import load_settings

FRAUD = Path(ml_prod.__file__).parent / "examples" / "fraud" / "pipeline.yaml"


def make_nb(path: Path, *cells: str, params: str = "x: int = 1  # a number") -> Path:
    nb = new_notebook(cells=[new_code_cell(params, metadata={"tags": ["parameters"]}), *map(new_code_cell, cells)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def env(ray_local, project_dir):
    return load_settings(), project_dir


def child_runs(s, experiment="ml_prod"):
    c = store.client(s)
    exp = c.get_experiment_by_name(experiment)
    return c.search_runs([exp.experiment_id], "tags.`ml_prod.pipeline_step` != ''", max_results=1000)


def statuses(res):
    return {n: r.status for n, r in res.steps.items()}


# ---- checking, before anything runs ---------------------------------------------------------------

@pytest.fixture
def nbs(tmp_path):
    make_nb(tmp_path / "make.ipynb", params='n: int = 1  # rows\nout: str = "out.txt"  # file')
    make_nb(tmp_path / "use.ipynb", params='path: str = ""  # input\nscale: float = 1.0  # factor')
    return tmp_path


def test_check_reports_every_error_with_a_fix(nbs):
    p = write(nbs / "p.yaml", """
name: bad
steps:
  make: {notebook: make.ipynb, parameters: {n: three}, depends_on: [use]}
  use:
    notebook: use.ipynb
    parameters: {pth: "${steps.make.params.outt}", scale: "${steps.maek.metrics.size}"}
  other: {notebook: mkae.ipynb, depends_on: [nope], parameters: {x: "${steps.make.output}"}}
""")
    with pytest.raises(PipelineError) as e: check_pipeline(p)
    msg = str(e.value)
    assert e.value.exit_code == 2 and isinstance(e.value, MlProdError)
    assert "steps form a cycle: make -> use -> make" in msg or "steps form a cycle: use -> make -> use" in msg
    assert "use.ipynb has no parameter 'pth', did you mean 'path'?" in msg
    assert "steps.make.parameters.n = 'three': expected int, got str" in msg
    assert "step 'make' (make.ipynb) has no parameter 'outt', did you mean 'out'?" in msg
    assert "names unknown step 'maek', did you mean 'make'?" in msg
    assert "steps.other.notebook = 'mkae.ipynb': no such file" in msg and "did you mean 'make.ipynb'?" in msg
    assert "steps.other.depends_on: unknown step 'nope'" in msg
    assert "malformed reference '${steps.make.output}'; write one of" in msg
    assert len(pipeline_errors(load_pipeline(p))) == 8


def test_malformed_files_name_the_field(nbs):
    with pytest.raises(PipelineError, match="steps.a.notebok: unknown field, did you mean 'notebook'"):
        load_pipeline(write(nbs / "p.yaml", "name: p\nsteps:\n  a: {notebok: make.ipynb}\n"))
    with pytest.raises(PipelineError, match=r"steps.a.resources.cpus = -1: Input should be greater than or equal to 0"):
        load_pipeline(write(nbs / "p.yaml", "name: p\nsteps:\n  a: {notebook: make.ipynb, resources: {cpus: -1}}\n"))
    with pytest.raises(PipelineError, match="not valid YAML"):
        load_pipeline(write(nbs / "p.yaml", "name: [p\n"))
    with pytest.raises(PipelineError, match="does not exist"):
        load_pipeline(nbs / "missing.yaml")
    with pytest.raises(PipelineError, match="gives a str, but n is a int"):
        check_pipeline(write(nbs / "p.yaml", "name: p\nsteps:\n  a: {notebook: use.ipynb}\n"
                                            "  b: {notebook: make.ipynb, parameters: {n: '${steps.a.run_id}'}}\n"))


def test_fraud_pipeline_checks():
    p = check_pipeline(FRAUD)
    assert list(p.steps) == ["data", "train", "evaluate", "register"]


# ---- running ---------------------------------------------------------------------------------------

def test_fraud_pipeline_runs_then_is_fully_cached(env):
    s, d = env
    res = run_pipeline(FRAUD, s, cwd=d)
    assert statuses(res) == {"data": "FINISHED", "train": "FINISHED", "evaluate": "FINISHED", "register": "FINISHED"}, res.summary()
    c = store.client(s)
    train, ev = c.get_run(res.steps["train"].run_id), c.get_run(res.steps["evaluate"].run_id)
    assert ev.data.tags["evaluated_model_uri"] == train.data.tags["model_uri"]
    assert ev.data.params["data_path"] == "fraud_data/transactions.parquet" and (d / "fraud_evaluation" / "evaluation.json").is_file()
    assert train.data.tags["mlflow.parentRunId"] == res.run_id and train.data.tags["ml_prod.pipeline_step"] == "train"
    assert c.get_run(res.run_id).data.tags["ml_prod.pipeline"] == "fraud-training"
    n_children = len(child_runs(s, "fraud-pipeline"))
    assert n_children == 4
    from ml_prod.models.registry import alias_history
    (event,) = alias_history(s, "fraud-detector", "challenger")
    assert event.to_version == 1 and event.evaluation_run == res.steps["evaluate"].run_id

    again = run_pipeline(FRAUD, s, cwd=d)
    print(res.summary(), again.summary(), sep="\n")
    assert statuses(again) == {"data": "CACHED", "train": "CACHED", "evaluate": "CACHED", "register": "CACHED"}
    assert len(child_runs(s, "fraud-pipeline")) == n_children  # nothing ran again
    assert {n: r.run_id for n, r in again.steps.items()} == {n: r.run_id for n, r in res.steps.items()}
    parent = c.get_run(again.run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["ml_prod.step.train.cached_run"] == res.steps["train"].run_id
    shown = show_pipeline(FRAUD, s)
    assert "1. data [CACHED]" in shown and "3. evaluate [CACHED]  <- train, data" in shown, shown



RAW = """
name: raw
steps:
  count: {notebook: count.ipynb, parameters: {path: raw.csv}}
"""


def test_changed_input_file_reruns_the_step(env):
    "A step is reused while the file its parameter names holds the same bytes; once the raw data changes, it runs again."
    s, d = env
    make_nb(d / "count.ipynb", "import ml_prod; ml_prod.report(lines=len(open(path).read().splitlines()))", params='path: str = ""  # input')
    (d / "raw.csv").write_text("a\n1\n")
    yml = write(d / "raw.yaml", RAW)
    runs = [run_pipeline(yml, s, cwd=d)]
    runs.append(run_pipeline(yml, s, cwd=d))            # the same file: reused
    (d / "raw.csv").write_text("a\n1\n2\n")
    runs.append(run_pipeline(yml, s, cwd=d))            # new content: runs again
    runs.append(run_pipeline(yml, s, cwd=d))            # unchanged since: reused
    assert [statuses(r)["count"] for r in runs] == ["FINISHED", "CACHED", "FINISHED", "CACHED"], [r.summary() for r in runs]
    ids = [r.steps["count"].run_id for r in runs]
    assert ids[1] == ids[0] and ids[2] != ids[0] and ids[3] == ids[2]
    c = store.client(s)  # what each job itself computed from the file it read
    assert [c.get_run(i).data.metrics["lines"] for i in (ids[0], ids[2])] == [2.0, 3.0]
    assert len(child_runs(s, "ml_prod")) == 2

CHAIN = """
name: chain
steps:
  a: {{notebook: a.ipynb, parameters: {{x: {a}}}}}
  b: {{notebook: b.ipynb, parameters: {{x: {b}, y: "${{steps.a.metrics.doubled}}"}}}}
  c: {{notebook: b.ipynb, parameters: {{x: 0, y: "${{steps.b.metrics.doubled}}"}}}}
"""


def test_cache_force_only_and_from(env):
    s, d = env
    make_nb(d / "a.ipynb", "import ml_prod; ml_prod.report(doubled=2 * x)")  # cheaper than importing mlflow
    make_nb(d / "b.ipynb", "import ml_prod; ml_prod.report(doubled=2 * (x + y))", params="x: int = 1  # a\ny: float = 0.0  # b")
    yml = write(d / "chain.yaml", CHAIN.format(a=1, b=1))
    first = run_pipeline(yml, s, cwd=d)
    assert statuses(first) == dict(a="FINISHED", b="FINISHED", c="FINISHED"), first.summary()
    assert store.client(s).get_run(first.steps["c"].run_id).data.metrics["doubled"] == 2 * (0 + 2 * (1 + 2))

    write(yml, CHAIN.format(a=1, b=5))  # a parameter of b changed: b and c re-run, a is reused
    changed = run_pipeline(yml, s, cwd=d)
    assert statuses(changed) == dict(a="CACHED", b="FINISHED", c="FINISHED")
    assert changed.steps["a"].run_id == first.steps["a"].run_id

    forced = run_pipeline(yml, s, cwd=d, force=True)
    assert statuses(forced) == dict(a="FINISHED", b="FINISHED", c="FINISHED")

    only = run_pipeline(yml, s, cwd=d, only="c")
    assert statuses(only) == dict(a="CACHED", b="CACHED", c="FINISHED")
    assert only.steps["b"].run_id == forced.steps["b"].run_id

    frm = run_pipeline(yml, s, cwd=d, from_step="b")
    assert statuses(frm) == dict(a="CACHED", b="FINISHED", c="FINISHED")

    write(yml, CHAIN.format(a=7, b=5))  # a changed and never ran: b's input is not cached
    with pytest.raises(PipelineError, match="only='b' needs the output of step 'a', which has no successful run"):
        run_pipeline(yml, s, cwd=d, only="b")
    with pytest.raises(PipelineError, match="only='bb': no such step, did you mean 'b'"):
        run_pipeline(yml, s, cwd=d, only="bb")


def test_failing_step_skips_dependents_and_lets_other_branches_finish(env):
    s, d = env
    make_nb(d / "boom.ipynb", "import time; time.sleep(1.5)", "raise ValueError(f'bad x={x}')")
    make_nb(d / "ok.ipynb", "import time, ml_prod; time.sleep(1.5); ml_prod.report(x=x)")
    yml = write(d / "fail.yaml", """
name: failing
steps:
  boom: {notebook: boom.ipynb, parameters: {x: 3}}
  after: {notebook: ok.ipynb, depends_on: [boom]}
  later: {notebook: ok.ipynb, parameters: {x: "${steps.after.metrics.x}"}}
  side: {notebook: ok.ipynb, parameters: {x: 2}}
""")
    res = run_pipeline(yml, s, cwd=d)
    assert statuses(res) == dict(boom="FAILED", after="SKIPPED", later="SKIPPED", side="FINISHED"), res.summary()
    assert res.steps["after"].error == "upstream boom failed" and res.steps["later"].error == "upstream after skipped"
    assert "boom.ipynb: cell 3: ValueError: bad x=3" in res.steps["boom"].error
    summary = res.summary()
    assert "pipeline failing: FAILED" in summary and f"saved notebook: {res.steps['boom'].output_notebook}" in summary
    c = store.client(s)
    assert c.get_run(res.run_id).info.status == "FAILED"
    boom, side = c.get_run(res.steps["boom"].run_id).info, c.get_run(res.steps["side"].run_id).info
    assert boom.start_time < side.end_time and side.start_time < boom.end_time  # ran at the same time
    shown = show_pipeline(yml, s)
    assert "1. boom [FAILED]" in shown and "2. after [SKIPPED]  <- boom" in shown and "1. side [FINISHED]" in shown, shown


# ---- secrets ------------------------------------------------------------------------------------------

def test_secret_comes_from_the_environment_never_from_the_file(env, monkeypatch):
    import hashlib, uuid
    s, d = env
    token = uuid.uuid4().hex
    make_nb(d / "login.ipynb", "import hashlib, pathlib\npathlib.Path(f'seen-{x}.txt').write_text(hashlib.sha256(token.encode()).hexdigest())",
            params='x: int = 1  # a number\ntoken: str = ""  # the key {secret: true}')
    literal = write(d / "literal.yaml", f"name: literal\nsteps:\n  a: {{notebook: login.ipynb, parameters: {{token: {token}}}}}\n")
    with pytest.raises(PipelineError, match="token is a secret, so the pipeline file") as e:
        run_pipeline(literal, s, cwd=d)
    assert token not in str(e.value)
    yml = write(d / "secret.yaml", "name: secretive\nsteps:\n"
                "  a: {notebook: login.ipynb, parameters: {x: 1, token: {env: LOGIN_TOKEN}}}\n"
                "  b: {notebook: login.ipynb, parameters: {x: 2, token: {env: LOGIN_TOKEN}}, depends_on: [a]}\n")
    monkeypatch.delenv("LOGIN_TOKEN", raising=False)
    with pytest.raises(PipelineError, match="read from LOGIN_TOKEN, which is not set"):
        run_pipeline(yml, s, cwd=d)
    from conftest import cli
    r = cli("pipeline", "run", str(yml), check=False)  # not at a terminal: nothing to ask, refused
    assert r.returncode == 2 and "read from LOGIN_TOKEN, which is not set" in r.stderr, r.stderr
    c = store.client(s)
    exp = c.get_experiment_by_name("ml_prod")
    assert exp is None or not c.search_runs([exp.experiment_id])  # refused before anything ran

    res = run_pipeline(yml, s, cwd=d, secrets={"LOGIN_TOKEN": token})  # as `ml_prod pipeline run -s LOGIN_TOKEN ...` does
    assert statuses(res) == {"a": "FINISHED", "b": "FINISHED"}, res.summary()
    digest = hashlib.sha256(token.encode()).hexdigest()
    assert (d / "seen-1.txt").read_text() == digest and (d / "seen-2.txt").read_text() == digest  # each kernel got it
    stored = Path(c.download_artifacts(res.run_id, "pipeline.json")).read_text()
    assert '"env": "LOGIN_TOKEN"' in stored and token not in stored
    assert all("token" not in c.get_run(r.run_id).data.params for r in res.steps.values())

    monkeypatch.setenv("LOGIN_TOKEN", uuid.uuid4().hex)  # from the environment, with another value: cached all the same
    again = run_pipeline(yml, s, cwd=d)
    assert statuses(again) == {"a": "CACHED", "b": "CACHED"}, again.summary()
