"""The launcher panel in JupyterLab in a real browser: `jupyter lab` headless on 127.0.0.1 with a token (a free port,
its own config, runtime and settings folders, widget state saved with the notebook), driven by Playwright for Python on
Debian's Chromium. The test opens a notebook, runs the cell that starts a local Ray (1 CPU) and the launcher cell, fills
the form, clicks Launch, checks that `1 + 1` in the same kernel answers within 2 s while the job runs, sees the job
finish in the panel, saves the notebook and searches the saved file for the secret. Every wait is on a page condition
(a cell's execution count, a status text); screenshots of each step go to ML_PROD_TEST_ARTIFACTS (default: the test's
tmp folder). Without /usr/bin/chromium the test is skipped, except in CI (`CI` set), where it fails. The deployments and
loop panels are driven on the session's serving project, the monitoring panel shows a drift on a project of its own, and
the runs panel and the sweep monitor show finished runs and a finished sweep written without Ray;
the deployments and monitoring panels' screenshots are the README's (`ML_PROD_UPDATE_SCREENSHOT=1` takes them again).
"""
from __future__ import annotations

import json, os, re, secrets, shutil, subprocess, sys, time, urllib.request
from contextlib import contextmanager
from pathlib import Path

import nbformat
import psutil
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from conftest import RECORD, client, deploy, free_ports, log_version, open_sweep, stop_processes, wait_for

ARTIFACTS = os.environ.get("ML_PROD_TEST_ARTIFACTS")  # read at import: the project fixtures drop ML_PROD_* from the environment
UPDATE_SHOT = os.environ.get("ML_PROD_UPDATE_SCREENSHOT")
SECRET = "pw-" + secrets.token_hex(8)
JOB_PARAMS = ('steps: int = 8  # steps to take {min: 1, max: 50}\n'
              'pause_s: float = 0.1  # seconds per step {min: 0}\n'
              'mode = "fast"  # {choices: [fast, careful]}\n'
              'token: str = ""  # api token {secret: true}\n')
JOB_BODY = ("import time, hashlib, mlflow\nfor i in range(steps):\n    print('step', i, mode, flush=True)\n    time.sleep(pause_s)\n"
            "mlflow.log_param('token_sha256', hashlib.sha256(token.encode()).hexdigest())\n")
PANEL_CELLS = [
    'import ray\nray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)\n"ray up"',
    'import ml_prod.ui\npanel = ml_prod.ui.launcher("steps.ipynb", poll_s=0.3)\npanel',
    "1 + 1",
    "ray.shutdown()",
]


def write_nb(path: Path, cells: list[str], params: str | None = None):
    cs = ([new_code_cell(params, metadata={"tags": ["parameters"]})] if params else []) + [new_code_cell(c) for c in cells]
    nb = new_notebook(cells=cs)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


@contextmanager
def jupyter_lab(root: Path, tmp_path: Path):
    "JupyterLab serving folder `root`; yields (url, token); the server and its kernels are stopped after."
    settings = tmp_path / "lab-settings" / "@jupyter-widgets" / "jupyterlab-manager"
    settings.mkdir(parents=True)
    (settings / "plugin.jupyterlab-settings").write_text(json.dumps({"saveState": True}))  # so the test can search widget state
    notification = tmp_path / "lab-settings" / "@jupyterlab" / "apputils-extension"
    notification.mkdir(parents=True)  # no "get notified about news?" toast over the panels in the screenshots
    (notification / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false"}))
    port, token = free_ports(1)[0], secrets.token_hex(16)
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(tmp_path / "jcfg"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "jrun"),
           "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "lab-settings"), "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "ws")}
    cmd = [str(Path(sys.executable).parent / "jupyter"), "lab", "--no-browser", "--allow-root", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
           f"--ServerApp.root_dir={root}", "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    log = open(tmp_path / "lab.log", "w")
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    def up():
        try: return urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2).status == 200
        except OSError: return proc.poll() is not None and pytest.fail((tmp_path / "lab.log").read_text()[-3000:])
    server = psutil.Process(proc.pid)  # taken now: the server may exit (a bad flag) before the test ends
    try:
        wait_for(up, timeout=90)
        yield url, token
    finally:
        try: procs = [server, *server.children(recursive=True)]
        except psutil.NoSuchProcess: procs = []
        stop_processes(procs, grace_s=20)  # SIGTERM: the server shuts its kernels down; SIGKILL after 20 s
        assert not [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.fixture
def lab(project_dir, tmp_path):
    "JupyterLab on a fresh project with the job notebook and the launcher's notebook."
    write_nb(project_dir / "steps.ipynb", [JOB_BODY], JOB_PARAMS)
    write_nb(project_dir / "panel.ipynb", PANEL_CELLS)
    with jupyter_lab(project_dir, tmp_path) as served: yield served


def open_notebook(browser, url: str, token: str, name: str, height: int = 1000):
    "A page with notebook `name` open and its kernel idle (a viewport `height` px tall: a panel taller is cut in its screenshot)."
    page = browser.new_context(viewport={"width": 1300, "height": height}).new_page()
    page.goto(f"{url}/lab/tree/{name}?token={token}")
    page.locator(".jp-Notebook .jp-CodeCell").first.wait_for(timeout=90_000)
    page.locator("#jp-main-statusbar").filter(has_text="Idle").wait_for(timeout=90_000)  # the kernel is up and idle
    return page


def run_cell(page, i: int, timeout_s: float = 120) -> float:
    "Run code cell `i` with Shift+Enter; seconds until its prompt shows an execution count."
    cell = page.locator(".jp-Notebook .jp-CodeCell").nth(i)
    cell.locator(".jp-InputArea-editor").click()
    t0 = time.monotonic()
    page.keyboard.press("Shift+Enter")
    cell.locator(".jp-InputPrompt").filter(has_text=re.compile(r"\[\d+\]")).wait_for(timeout=timeout_s * 1000)
    return time.monotonic() - t0


def test_launch_a_job_from_the_panel_in_jupyterlab(lab, browser, project_dir, tmp_path):
    url, token = lab
    shots = Path(ARTIFACTS or tmp_path) / "panels"
    shots.mkdir(parents=True, exist_ok=True)
    page = open_notebook(browser, url, token, "panel.ipynb")
    run_cell(page, 0)
    run_cell(page, 1)
    form = page.locator(".ml-prod-launcher")
    form.wait_for(timeout=60_000)
    page.screenshot(path=shots / "1_form.png")

    def field(name):  # the input of the control labelled `name`
        return form.locator(".widget-inline-hbox").filter(has=page.locator(f"label:text-is('{name}')")).locator("input, select").first
    field("pause_s").fill("-1")
    field("pause_s").press("Enter")
    form.locator(".ml-prod-error").filter(has_text="out of range, allowed 0 <= pause_s").wait_for(timeout=10_000)
    page.screenshot(path=shots / "2_field_error.png")
    assert form.locator("button:has-text('Launch')").is_disabled()
    field("pause_s").fill("0.5")
    field("pause_s").press("Enter")
    form.locator(".ml-prod-error").wait_for(state="detached", timeout=10_000)
    field("mode").select_option(label="careful")
    field("token").fill(SECRET)
    field("token").press("Enter")
    page.wait_for_function("el => el.value === '' && el.placeholder.startsWith('set (hidden)')", arg=field("token").element_handle())
    form.locator("button:has-text('Launch')").click()
    form.locator(".ml-prod-status").filter(has_text="RUNNING").wait_for(timeout=60_000)
    answered_s = run_cell(page, 2, timeout_s=10)  # the same kernel, while the job runs
    outputs = [o.strip() for o in page.locator(".jp-CodeCell").nth(2).locator(".jp-OutputArea-output").all_inner_texts()]
    assert outputs == ["2"], f"the outputs of the `1 + 1` cell: {outputs}: the panel's watcher thread displayed into the running cell"
    assert form.locator(".ml-prod-status").inner_text() == "RUNNING", "the job ended before 1 + 1 was asked: make it longer"
    page.screenshot(path=shots / "3_running.png")
    form.locator(".ml-prod-status").filter(has_text="FINISHED").wait_for(timeout=180_000)
    page.screenshot(path=shots / "4_finished.png")
    print(f"1 + 1 answered in {answered_s:.2f} s while the job ran")
    assert answered_s < 2.0
    assert "step 7 careful" in form.locator("textarea").input_value()
    assert "MLflow run" in form.inner_text()
    run_cell(page, 3)
    page.keyboard.press("Control+s")
    wait_for(lambda: "application/vnd.jupyter.widget-state+json" in (project_dir / "panel.ipynb").read_text(), timeout=30)
    saved = (project_dir / "panel.ipynb").read_text()
    assert "ml-prod-launcher" in saved or "Launch steps.ipynb" in saved  # the panel's widget state is in the file
    assert SECRET not in saved


APP = "panels-browser"
ROOT = Path(__file__).resolve().parents[1]
PANEL_SHOT = ROOT / "nbs" / "images" / "panel_deployments.png"  # shown in the README; `ML_PROD_UPDATE_SCREENSHOT=1` takes it again
OPS_CELLS = [
    f'import ml_prod.ui\ndeployments = ml_prod.ui.deployments("{APP}")\ndeployments',
    'loop = ml_prod.ui.loop()\nloop',
]


def test_move_traffic_and_approve_a_promotion_from_the_panels_in_jupyterlab(project, browser, tmp_path):
    """The deployments panel and the loop panel in JupyterLab, in the session's serving project: move all traffic from
    arm a to arm b in the browser and see the endpoint's own answers follow; approve a pending promotion and find the
    approval, with its approver and reason, in the events experiment's raw runs."""
    import httpx
    from ml_prod.lifecycle.state import move
    from ml_prod.settings import load_settings
    from ml_prod.tracking import tags as keys
    shots = Path(ARTIFACTS or tmp_path) / "panels"
    shots.mkdir(parents=True, exist_ok=True)
    log_version("browser_a"), log_version("browser_b", offset=0.5)
    url = deploy(project, {"name": APP, "arms": {"a": {"model": "models:/tiny@browser_a", "weight": 1},
                                                 "b": {"model": "models:/tiny@browser_b", "weight": 0}}})
    http = httpx.Client(base_url=url, timeout=10)
    arms = lambda: {http.post("/predict", json=RECORD).json()["arm"] for _ in range(30)}
    assert arms() == {"a"}
    s = load_settings()
    move(s, APP, "retraining", "drift", retrain_run="p1", last_retrain=time.time())  # how the engine records its steps
    move(s, APP, "evaluating", "retrain pipeline p1 FINISHED", challenger=2)
    move(s, APP, "awaiting_approval", "challenger 2 better on the holdout")
    write_nb(project / "ops.ipynb", OPS_CELLS)
    with jupyter_lab(project, tmp_path) as (lab_url, token):
        page = open_notebook(browser, lab_url, token, "ops.ipynb")
        run_cell(page, 0)
        panel = page.locator(".ml-prod-deployments")
        panel.wait_for(timeout=60_000)
        weight = lambda arm: panel.locator(".widget-inline-hbox").filter(has=page.locator(f"label:text-is('{arm}')")).locator("input").first
        weight("a").fill("0"); weight("a").press("Enter")
        weight("b").fill("1"); weight("b").press("Enter")
        page.screenshot(path=shots / "5_deployments.png")
        panel.locator("button:has-text('Apply weights')").click()
        panel.locator(".ml-prod-applied").filter(has_text="a=0, b=1").wait_for(timeout=180_000)
        page.screenshot(path=shots / "6_weights_applied.png")
        panel.screenshot(path=shots / PANEL_SHOT.name)
        if UPDATE_SHOT: shutil.copy(shots / PANEL_SHOT.name, PANEL_SHOT)
        assert f"]({PANEL_SHOT.relative_to(ROOT)})" in (ROOT / "README.md").read_text() and PANEL_SHOT.read_bytes()[:4] == b"\x89PNG"
        assert arms() == {"b"}  # the endpoint's answers follow the weights set in the browser
        run_cell(page, 1)
        loop = page.locator(".ml-prod-loop-panel")
        loop.wait_for(timeout=60_000)
        field = lambda name: loop.locator(".widget-inline-hbox").filter(has=page.locator(f"label:text-is('{name}')")).locator("input, select").first
        field("app").select_option(label=APP)
        field("approver").fill("ana@lab"); field("approver").press("Enter")
        field("reason").fill("holdout AUC better, drift report read"); field("reason").press("Enter")
        loop.locator("button:has-text('Approve')").click()
        c = client(s)
        exp = c.get_experiment_by_name(keys.EVENTS_EXPERIMENT).experiment_id
        query = f"tags.`{keys.KIND}` = 'approval' and tags.`{keys.STREAM}` = 'lifecycle/{APP}'"
        runs = wait_for(lambda: c.search_runs([exp], query), timeout=60)
        page.screenshot(path=shots / "7_approved.png")
    (run,) = runs
    data = json.loads("".join(run.data.tags[keys.payload_key(i)] for i in range(int(run.data.tags[keys.PAYLOAD_PARTS]))))
    assert run.data.tags[keys.ACTOR] == "ana@lab" and data["approved"] is True and data["challenger"] == 2
    assert data["reason"] == "holdout AUC better, drift report read"


# ---- the monitoring panel: a drift view, its screenshot the README's ---------------------------------------------

MONITOR_SHOT = ROOT / "nbs" / "images" / "panel_monitoring.png"  # shown in the README; `ML_PROD_UPDATE_SCREENSHOT=1` takes it again
HOUR, T0 = 3600.0, 1_750_000_000.0


def monitored_shop(s):
    """Application `shop` served and monitored as `ml_prod monitor` records it, without Ray (as nbs/api/89a_ui_monitoring.ipynb
    does): a model version with its reference profile, four hours of scored and labelled requests in the audit log (amounts
    shifted in the last hour), two monitoring runs written with the monitoring job's own steps. Returns the last run's id."""
    import mlflow, numpy as np, pandas as pd
    from conftest import mlflow_at
    from ml_prod.audit.writer import AuditWriter, FeedbackWriter
    from ml_prod.monitoring import job
    from ml_prod.monitoring.profile import build_profile, load_profile, log_profile
    from ml_prod.monitoring.window import read_window
    from ml_prod.tracking import store, tags as keys
    rng, c = np.random.default_rng(0), store.client(s)
    amounts = lambda n, shift=0.0: rng.lognormal(4.5 + shift, 0.6, n)
    countries = lambda n: rng.choice(["US", "FR", "DE"], n, p=[0.6, 0.3, 0.1])
    scored = lambda a: 1 / (1 + np.exp(-(a / 100 - 1)))

    def serve(t0, n, shift=0.0):
        a, co = amounts(n, shift), countries(n)
        with AuditWriter(s.audit_dir, "shop", "r1") as w, FeedbackWriter(s.audit_dir, "shop", "r1") as fw:
            for i in range(n):
                p = float(scored(a[i]))
                w.write(request_id=f"q{int(t0)}-{i}", ts=t0 + i * HOUR / n, status=200, outcome="ok", arm="main", model_name="shop", model_version="1",
                        inputs=[{"amount": float(a[i]), "country": str(co[i])}], outputs={"scores": [p], "decisions": ["fraud" if p >= 0.5 else "legit"]}, latency_ms=3.0)
                fw.write(f"q{int(t0)}-{i}", int(rng.uniform() < p), ts=t0 + HOUR + 60)

    def monitor_run(t0, t1, windows=1):
        values = dict(app="shop", start=t0, end=t1, windows=windows, model="", audit_dir=str(s.audit_dir), min_rows=200)
        nb = job.monitor_notebook()
        run_id = store.create_job_run(s, store.ensure_experiment(s, keys.MONITOR_EXPERIMENT), nb, nb.read_bytes(), values, run_name="monitor shop",
                                      tags={keys.MONITOR_APP: "shop", keys.MONITOR_START: keys.seconds(t0), keys.MONITOR_END: keys.seconds(t1)})
        edges = job.window_edges(t0, t1, windows)
        before = t0 - (edges[0][1] - edges[0][0])
        win = read_window(s.audit_dir, "shop", before, t1)
        reference = job.reference_model(win.records[win.records["ts"] >= t0])
        table = job.evaluate(win, load_profile(reference, s), edges, job.served_decision(win.records), before=before, min_rows=200)
        with mlflow.start_run(run_id=run_id):
            job.log_table(table, edges)
            job.log_verdict(job.verdict(table, job.window_name(edges[-1][0])), reference)
        return run_id

    with mlflow_at(s.tracking_uri):  # log_profile and the job's steps log through MLflow's global client
        ref = pd.DataFrame({"amount": amounts(2000), "country": countries(2000)})
        train = c.create_run(store.ensure_experiment(s, "training"))
        y = (rng.uniform(size=2000) < scored(ref["amount"].to_numpy())).astype(int)
        log_profile(build_profile(ref, scores=scored(ref["amount"].to_numpy()), labels=y, metrics={"val_roc_auc": 0.75}), train.info.run_id)
        c.create_registered_model("shop"); c.create_model_version("shop", train.info.artifact_uri, run_id=train.info.run_id)
        for k in range(4): serve(T0 + k * HOUR, 400, shift=0.5 if k == 3 else 0.0)
        monitor_run(T0 + HOUR, T0 + 2 * HOUR)
        return monitor_run(T0 + 2 * HOUR, T0 + 4 * HOUR, windows=2)


def test_the_monitoring_panel_shows_the_drift_in_jupyterlab(project_dir, browser, tmp_path):
    """The monitoring panel in JupyterLab on a project whose last monitoring run found the amounts drifted: the panel shows
    the verdict recorded in that run, amount flagged and country not, the distribution and quality plots drawn; its
    screenshot is the README's drift view."""
    from ml_prod.settings import load_settings
    from ml_prod.tracking import store, tags as keys
    s = load_settings()
    t0 = time.monotonic()
    last = store.client(s).get_run(monitored_shop(s))
    print(f"records and monitoring runs written in {time.monotonic() - t0:.1f} s")
    shots = Path(ARTIFACTS or tmp_path) / "panels"
    shots.mkdir(parents=True, exist_ok=True)
    write_nb(project_dir / "monitoring.ipynb", ['import ml_prod.ui\nml_prod.ui.monitoring("shop")'])
    with jupyter_lab(project_dir, tmp_path) as (lab_url, token):
        page = open_notebook(browser, lab_url, token, "monitoring.ipynb", height=2400)  # the whole panel: verdict, scores, both plots
        took = run_cell(page, 0)
        panel = page.locator(".ml-prod-monitoring")
        panel.wait_for(timeout=60_000)
        images = panel.locator("img")
        wait_for(lambda: images.count() == 2 and all(images.nth(i).evaluate("el => el.complete && el.naturalWidth > 0") for i in range(2)), timeout=60)
        flagged = [t.strip() for t in panel.locator(".ml-prod-flagged").all_inner_texts()]
        text = panel.inner_text()
        panel.screenshot(path=shots / MONITOR_SHOT.name)
        page.screenshot(path=shots / "8_monitoring.png")
    print(f"panel shown {took:.1f} s after the cell was run; flagged rows: {flagged}")
    status = last.data.tags[keys.MONITOR_STATUS]  # what the monitoring run recorded, read from MLflow
    assert status in text and "country" in text and len(flagged) == 1 and flagged[0].split()[0] == "amount", (status, flagged)
    if UPDATE_SHOT: shutil.copy(shots / MONITOR_SHOT.name, MONITOR_SHOT)
    assert f"]({MONITOR_SHOT.relative_to(ROOT)})" in (ROOT / "README.md").read_text() and MONITOR_SHOT.read_bytes()[:4] == b"\x89PNG"


# ---- the runs panel and the sweep monitor -----------------------------------------------------------------------------

RUNS_CELLS = ['import ml_prod.ui\nruns = ml_prod.ui.runs("panels")\nruns', 'sweep = ml_prod.ui.sweep("tuning")\nsweep']


def finished_sweep(s, root: Path) -> str:
    """A finished sweep of 'score' (max) written by flows.tune's own functions, no Ray (conftest.open_sweep):
    three trials, one stopped by ASHA, closed with its best as tune_notebook closes it. Returns the sweep's run id."""
    from mlflow.entities import Metric
    from ml_prod.flows import tune
    from ml_prod.tracking import store
    c = client(s)
    sw = open_sweep(s, root, samples=3)
    sweep_id = sw.sweep_run_id
    trials = {}
    for tid, lr, scores, end in [("abc_00001", 0.1, [0.60, 0.75, 0.82], "FINISHED"), ("abc_00002", 0.5, [0.40], "KILLED"),
                                 ("abc_00003", 0.3, [0.70, 0.80, 0.91], "FINISHED")]:
        run_id, _ = tune._trial_run(sw, {"lr": lr}, tid)
        now = int(time.time() * 1000)
        c.log_batch(run_id, metrics=[Metric("score", v, now + i, i) for i, v in enumerate(scores)])
        if end == "FINISHED": c.set_terminated(run_id, end)
        else: store.fail_run(c, run_id, "train.ipynb: cell 2: stopped by asha after 1 report(s) of score", end)
        trials[tid] = (run_id, lr, scores[-1])
    best_id, lr, value = max(trials.values(), key=lambda t: t[2])
    tune._close_sweep(s, sweep_id, tune.TrialResult(best_id, "train.ipynb", "FINISHED", params={"lr": lr}, metric=value), "score", False)
    return sweep_id


def test_the_runs_panel_and_the_sweep_monitor_in_jupyterlab(project_dir, browser, tmp_path):
    """The runs panel and the sweep monitor in JupyterLab on a project with four finished runs and a finished sweep (real
    MLflow on SQLite, no Ray): the table lists the runs with the values in MLflow's database, a click on a column header
    sorts the page's rows by it, two runs selected and compared show their parameters side by side, and the sweep's table
    marks as best the trial the sweep recorded."""
    import sqlite3
    from ml_prod.settings import load_settings
    from ml_prod.tracking import store
    s = load_settings()
    c, exp = client(s), store.ensure_experiment(s, "panels")
    for name, lr, acc in [("r1", 0.1, 0.81), ("r2", 0.01, 0.95), ("r3", 0.5, 0.62), ("r4", 0.05, 0.88)]:
        r = c.create_run(exp, run_name=name)
        c.log_param(r.info.run_id, "lr", lr)
        for step, v in enumerate([acc - 0.2, acc]): c.log_metric(r.info.run_id, "accuracy", v, step=step)
        c.set_terminated(r.info.run_id, "FINISHED")
    sweep_id = finished_sweep(s, project_dir)
    db = sqlite3.connect(s.tracking_uri.removeprefix("sqlite:///"))  # MLflow's own database, read directly
    raw = {n: (i, float(lr)) for i, n, lr in db.execute("select r.run_uuid, r.name, p.value from runs r join params p on p.run_uuid = r.run_uuid "
                                                        "join experiments e on e.experiment_id = r.experiment_id where e.name = 'panels' and p.key = 'lr'")}
    last = {n: v for n, v in db.execute("select r.name, m.value from latest_metrics m join runs r on r.run_uuid = m.run_uuid where m.key = 'accuracy'")}
    best = dict(db.execute("select key, value from tags where run_uuid = ?", (sweep_id,)))["ml_prod.best_run_id"]
    trial_rows = dict(db.execute("select run_uuid, name from runs where run_uuid in (select run_uuid from tags where key = 'mlflow.parentRunId' and value = ?)", (sweep_id,)))
    shots = Path(ARTIFACTS or tmp_path) / "panels"
    shots.mkdir(parents=True, exist_ok=True)
    write_nb(project_dir / "runs.ipynb", RUNS_CELLS)
    t0 = time.monotonic()
    with jupyter_lab(project_dir, tmp_path) as (lab_url, token):
        page = open_notebook(browser, lab_url, token, "runs.ipynb", height=2400)
        run_cell(page, 0)
        panel = page.locator(".ml-prod-runs-panel")
        panel.locator(".ml-prod-run").first.wait_for(timeout=60_000)
        names = lambda: [r.get_attribute("data-run") for r in panel.locator(".ml-prod-run").all()]
        assert sorted(names()) == sorted(i for i, _ in raw.values())  # the runs MLflow holds, each once
        rows = {r.get_attribute("data-run"): r.locator("td").all_inner_texts() for r in panel.locator(".ml-prod-run").all()}
        for n, (i, lr) in raw.items():  # name, status and the lr and accuracy MLflow holds, in the row of that run
            assert rows[i][0] == n and rows[i][1] == "FINISHED" and f"{lr:.4g}" in rows[i] and f"{last[n]:.4g}" in rows[i], (n, rows[i])
        page.screenshot(path=shots / "9_runs.png")

        def sorted_by(header: str, expected: list[str]):  # a click on the column header; the page's rows follow
            panel.locator(".ml-prod-runs-head button").filter(has_text=re.compile(rf"^{re.escape(header)}( [▼▲])?$")).click()
            wait_for(lambda: names() == expected, timeout=20)
        by_lr = [i for i, lr in sorted(raw.values(), key=lambda t: -t[1])]
        sorted_by("params.lr", by_lr)  # descending first: 0.5, 0.1, 0.05, 0.01
        page.screenshot(path=shots / "10_runs_by_lr.png")
        sorted_by("params.lr", by_lr[::-1])  # a second click: ascending
        sorted_by("metrics.accuracy", [raw[n][0] for n in sorted(last, key=lambda n: -last[n])])
        page.screenshot(path=shots / "11_runs_by_accuracy.png")

        picked = ["r2", "r3"]
        panel.locator("select[multiple]").select_option(label=[f"{n} ({raw[n][0][:8]})" for n in picked])
        panel.locator("button:has-text('Compare')").click()
        compare = panel.locator(".ml-prod-compare")
        compare.wait_for(timeout=20_000)
        head = compare.locator("th").all_inner_texts()
        lr_row = compare.locator("tr").filter(has_text="params.lr").locator("td").all_inner_texts()
        assert head[1:] == [raw[n][0] for n in picked] and lr_row == ["params.lr", *(f"{raw[n][1]:.4g}" for n in picked)], (head, lr_row)
        assert compare.locator("tr.ml-prod-differs").count() == 2  # lr and accuracy differ
        page.screenshot(path=shots / "12_runs_compared.png")
        metric = panel.locator(".widget-inline-hbox").filter(has=page.locator("label:text-is('metric')")).locator("select")
        assert metric.evaluate("el => el.selectedIndex >= 0 ? el.options[el.selectedIndex].text : ''") == "accuracy"  # chosen, the one metric
        assert not panel.locator("img").first.is_visible()  # no plot yet: none shown, not a broken image
        panel.locator("button:has-text('Over steps')").click()
        wait_for(lambda: panel.locator("img").first.evaluate("el => el.complete && el.naturalWidth > 0"), timeout=30)
        page.screenshot(path=shots / "13_runs_over_steps.png")

        run_cell(page, 1)
        monitor = page.locator(".ml-prod-sweep")
        monitor.locator(".ml-prod-trial").first.wait_for(timeout=60_000)
        marked = [r.get_attribute("data-run") for r in monitor.locator(".ml-prod-trial.ml-prod-best").all()]
        shown = {r.get_attribute("data-run") for r in monitor.locator(".ml-prod-trial").all()}
        stopped = [r.get_attribute("data-run") for r in monitor.locator(".ml-prod-trial.ml-prod-stopped").all()]
        status = monitor.locator(".ml-prod-sweep-status").inner_text()
        monitor.locator("img").first.wait_for(timeout=20_000)
        wait_for(lambda: monitor.locator("img").first.evaluate("el => el.complete && el.naturalWidth > 0"), timeout=30)
        page.screenshot(path=shots / "14_sweep.png")
    print(f"JupyterLab, both panels and every step in {time.monotonic() - t0:.1f} s")
    assert marked == [best] and shown == set(trial_rows) and status == "FINISHED"
    assert [trial_rows[i] for i in stopped] == ["train-abc_00002"]  # stopped by ASHA: marked
