"""The CLI contract scripts rely on: bad input exits 2 with one message that names the field or value, never
a traceback; `--profile` and `--json` on the root command reach every subcommand.

Every command runs as a real `ml_prod` process in a fresh project folder (settings.ini `[DEFAULT]`, the
tracking store created on first use); none of the bad inputs gets as far as starting Ray."""
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

ML_PROD = str(Path(sys.executable).parent / "ml_prod")


@pytest.fixture(scope="module")
def proj(tmp_path_factory):
    "A project folder with a job notebook, pipelines, a search space and a serving spec to get wrong."
    root = tmp_path_factory.mktemp("contract")
    (root / "settings.ini").write_text("[DEFAULT]\n\n[other]\n")
    nb = new_notebook(cells=[new_code_cell("x: int = 1  # a number", metadata={"tags": ["parameters"]}), new_code_cell("print(x)")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, root / "nb.ipynb")
    (root / "pipe.yaml").write_text("name: pipe\nsteps:\n  a: {notebook: nb.ipynb}\n")
    (root / "badpipe.yaml").write_text("name: badpipe\nsteps:\n  a: {notebook: nb.ipynb, parameters: {x: '${steps.zz.params.y}'}}\n")
    (root / "space.yaml").write_text("nosuchparam: {uniform: [0, 1]}\n")
    (root / "spec.yaml").write_text("applications:\n  fraud: {route: 7}\n")
    (root / "values.yaml").write_text("- just\n- a list\n")
    (root / "taken").mkdir()
    return root


def ml_prod(root: Path, *args: str, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    "`ml_prod ARGS` as a process in the project `root`, with nothing of the caller's ml_prod/Ray/MLflow environment."
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("ML_PROD_", "RAY_ADDRESS", "MLFLOW_"))}
    return subprocess.run([ML_PROD, *args], cwd=root, capture_output=True, text=True, timeout=timeout,
                          env={**clean, "RAY_USAGE_STATS_ENABLED": "0", "COLUMNS": "200", **(env or {})})


R32 = "0" * 32  # a well-formed run id that no run has

# (argv, expected exit code, a fragment of the message: it names the field or the value that is wrong)
BAD_INPUTS = [
    # run
    (["run", "missing.ipynb"], 2, "missing.ipynb"),
    (["run", "nb.ipynb", "-p", "nosuch", "1"], 2, "unknown parameter 'nosuch'"),
    (["run", "nb.ipynb", "-p", "x", "many"], 2, "x = 'many'"),
    (["run", "nb.ipynb", "-p", "x=many"], 2, "x = 'many'"),
    (["run", "nb.ipynb", "-p", "x"], 2, "-p/--param x"),
    (["run", "nb.ipynb", "-f", "missing.yaml"], 2, "missing.yaml"),
    (["run", "nb.ipynb", "-f", "values.yaml"], 2, "values.yaml"),
    (["run", "nb.ipynb", "--memory", "lots"], 2, "--memory 'lots'"),
    (["run", "nb.ipynb", "--resources", "{bad"], 2, "--resources '{bad'"),
    (["run", "nb.ipynb", "--cpus", "many"], 2, "--cpus"),
    (["run", "nb.ipynb", "--profile", "nosuch"], 2, "'nosuch'"),
    # jobs
    (["jobs", "show", R32], 2, R32),
    (["jobs", "logs", R32], 2, R32),
    (["jobs", "cancel", R32], 2, R32),
    (["jobs", "list", "--status", "DONE"], 2, "'DONE'"),
    (["jobs", "list", "--limit", "0"], 2, "--limit"),
    # cluster
    (["cluster", "status", "--profile", "nosuch"], 2, "'nosuch'"),
    (["cluster", "up", "--num-cpus", "0"], 2, "--num-cpus"),
    # config and the root options
    (["config", "show", "--profile", "nosuch"], 2, "'nosuch'"),
    (["--profile", "nosuch", "config", "show"], 2, "'nosuch'"),
    (["--profile", "nosuch", "jobs", "list"], 2, "'nosuch'"),
    (["nosuchcommand"], 2, "nosuchcommand"),
    # pipeline
    (["pipeline", "run", "missing.yaml"], 2, "missing.yaml"),
    (["pipeline", "check", "missing.yaml"], 2, "missing.yaml"),
    (["pipeline", "show", "missing.yaml"], 2, "missing.yaml"),
    (["pipeline", "check", "badpipe.yaml"], 2, "'zz'"),
    (["pipeline", "run", "pipe.yaml", "--only", "nosuchstep"], 2, "nosuchstep"),
    # tune
    (["tune", "missing.ipynb", "--metric", "auc"], 2, "missing.ipynb"),
    (["tune", "nb.ipynb", "--metric", "auc", "--space", "missing.yaml"], 2, "missing.yaml"),
    (["tune", "nb.ipynb", "--metric", "auc", "--space", "space.yaml"], 2, "nosuchparam"),
    (["tune", "nb.ipynb", "--metric", "auc", "--space", "space.yaml", "--scheduler", "bogus"], 2, "bogus"),
    (["tune", "nb.ipynb", "--metric", "auc", "--space", "space.yaml", "--mode", "sideways"], 2, "sideways"),
    (["tune", "nb.ipynb", "--metric", "auc", "-p", "x"], 2, "-p/--param x"),
    # reproduce
    (["reproduce", R32], 2, R32),
    (["reproduce"], 2, "Missing argument 'run_id'"),
    # models
    (["models", "show", "nosuchmodel"], 2, "nosuchmodel"),
    (["models", "history", "nosuchmodel"], 2, "nosuchmodel"),
    (["models", "history", "m", "--alias", "champion", "--at", "yesterday"], 2, "--at 'yesterday'"),
    (["models", "register", R32, "--name", "m"], 2, R32),
    (["models", "promote", "m", "--mode", "sideways"], 2, "sideways"),
    (["models", "rollback", "nosuchmodel"], 2, "nosuchmodel"),
    # serve
    (["serve", "up", "missing.yaml"], 2, "missing.yaml"),
    (["serve", "build", "missing.yaml"], 2, "missing.yaml"),
    (["serve", "build", "spec.yaml"], 2, "route"),
    (["serve", "update", "fraud", "--weight", "canary"], 2, "--weight 'canary'"),
    (["serve", "logs", "fraud", "-n", "many"], 2, "--lines"),
    # audit
    (["audit", "query", "--format", "xml"], 2, "'xml'"),
    (["audit", "query", "--since", "last tuesday"], 2, "'last tuesday'"),
    (["audit", "compact", "--retention-days", "-1"], 2, "retention_days = -1"),
    # demo
    (["demo", "--rows", "10"], 2, "rows = 10"),
    (["demo", "--epochs", "many"], 2, "--epochs"),
    # schedule
    (["schedule", "add", "s", "--cron", "0 * *", "--notebook", "nb.ipynb"], 2, "not a five-field crontab"),
    (["schedule", "add", "s", "--cron", "0 * * * *"], 2, "give exactly one target"),
    (["schedule", "add", "s", "--cron", "0 * * * *", "--notebook", "missing.ipynb"], 2, "missing.ipynb"),
    (["schedule", "add", "s", "--cron", "0 * * * *", "--notebook", "nb.ipynb", "--timezone", "Mars/Base"], 2, "unknown timezone"),
    (["schedule", "add", "s", "--cron", "0 * * * *", "--pipeline", "pipe.yaml", "--timeout-s", "60"], 2, "timeout_s applies to notebook and monitor runs"),
    (["schedule", "apply", "missing.yaml"], 2, "missing.yaml"),
    (["schedule", "show", "nosuch"], 2, "no schedule 'nosuch'"),
    (["schedule", "pause", "nosuch"], 2, "no schedule 'nosuch'"),
    (["schedule", "run-now", "nosuch"], 2, "no schedule 'nosuch'"),
    # lifecycle
    (["lifecycle", "approve", "fraud"], 2, "--reason: say why"),
    (["lifecycle", "explain"], 2, "Missing argument 'APP'"),
    # init and docs (the project folder has no docs/build.py)
    (["init", "Bad_Name"], 2, "NAME 'Bad_Name'"),
    (["init", "taken"], 2, "taken already exists: choose another NAME, or pass --force"),
    (["docs", "build"], 2, "no docs/build.py"),
    (["docs", "serve"], 2, "no docs/build.py"),
    (["docs", "serve", "--dir", "nosite"], 2, "nosite/index.html does not exist"),
    (["docs", "serve", "--port", "-1"], 2, "--port"),
]


@pytest.mark.parametrize("argv,code,fragment", BAD_INPUTS, ids=[" ".join(a) for a, _, _ in BAD_INPUTS])
def test_bad_input_exits_2_with_a_message_that_names_it(proj, argv, code, fragment):
    r = ml_prod(proj, *argv)
    out = r.stdout + r.stderr
    assert r.returncode == code, f"exit {r.returncode}, expected {code}:\n{out[-3000:]}"
    assert fragment in " ".join(out.split()), out[-3000:]  # rich may wrap a long message
    assert "Traceback" not in out, out[-3000:]


def test_the_table_covers_every_command_group():
    "Each group of `ml_prod --help` has a row."
    groups = {"run", "jobs", "cluster", "config", "pipeline", "tune", "reproduce", "models", "serve", "audit", "demo", "init", "docs", "schedule", "lifecycle"}
    assert groups <= {argv[0] for argv, _, _ in BAD_INPUTS} | {argv[2] for argv, _, _ in BAD_INPUTS if argv[0] == "--profile"}


def test_root_profile_and_json_reach_the_subcommands(proj):
    "`--profile` before the subcommand is the default of every subcommand; `--json` makes show commands print JSON."
    shown = json.loads(ml_prod(proj, "--profile", "other", "--json", "config", "show").stdout)
    assert shown["profile"] == "other"
    row = next(r for r in shown["settings"] if r["key"] == "tracking_uri")
    assert row == {"key": "tracking_uri", "value": f"sqlite:///{proj.resolve()}/.ml_prod/mlflow.db", "source": "built-in default"}, row
    # the subcommand's own --profile wins over the root one; ML_PROD_PROFILE is the default of both
    assert json.loads(ml_prod(proj, "--profile", "nosuch", "--json", "config", "show", "--profile", "default").stdout)["profile"] == "default"
    assert json.loads(ml_prod(proj, "--json", "config", "show", env={"ML_PROD_PROFILE": "other"}).stdout)["profile"] == "other"
    assert json.loads(ml_prod(proj, "--json", "jobs", "list").stdout) == []
    assert json.loads(ml_prod(proj, "--json", "models", "list").stdout) == []
    r = ml_prod(proj, "--json", "cluster", "status")
    assert json.loads(r.stdout)["address"] is None and r.returncode == 3, (r.stdout, r.stderr)  # nothing is up: unhealthy


def test_a_bug_prints_no_local_variables(proj, tmp_path):
    "An unexpected exception prints a traceback, but never the values of local variables (a secret may be one)."
    from ml_prod.cli.common import app
    assert app.pretty_exceptions_show_locals is False
    secret = "s3cr3t-token-value"
    script = tmp_path / "boom.py"
    script.write_text(
        "import os\nfrom ml_prod.cli.common import app\n"
        "@app.command('boom')\ndef boom():\n    token = os.environ['TOKEN']\n    raise RuntimeError('unexpected')\n"
        "app(prog_name='ml_prod')\n")
    r = subprocess.run([sys.executable, str(script), "boom"], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "COLUMNS": "200", "TOKEN": secret})
    assert r.returncode == 1 and "RuntimeError: unexpected" in r.stderr, r.stderr
    assert secret not in r.stdout + r.stderr, r.stderr
