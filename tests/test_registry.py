"""The model registry under concurrency (several processes, one SQLite store) and the promotion guard
end to end with the fraud example's notebooks as ml_prod jobs on Ray.

* Concurrency: 8 processes (forked from a forkserver that has imported ml_prod.registry, so they
  start in well under a second) wait for a common start time, then each registers a version of the
  same model, or moves the same alias several times. Versions must be exactly 1..8, each from a
  distinct run; no alias event may be lost, and the log must chain (each move starts where the
  previous one ended) and agree with the registry's final state.
* Promotion (slow, ~60-90 s on 2 CPUs): data -> two trainings -> register champion and challenger
  -> guarded promote (paired bootstrap on the same holdout rows) -> a deliberately bad challenger is refused -> force -> rollback.
"""
from __future__ import annotations

import multiprocessing as mp
import tempfile
import time
from importlib.resources import files
from pathlib import Path

import pytest

from ml_prod.models import promote, registry
from ml_prod.tracking import store as tracking  # `store` is this module's fixture
from ml_prod.settings import load_settings

N = 8
FRAUD = Path(str(files("ml_prod") / "examples" / "fraud"))


def _pool(n):
    ctx = mp.get_context("forkserver")
    # the workers are forked from a server that has imported MLflow's SQL stores: no import cost per worker
    ctx.set_forkserver_preload(["ml_prod.models.registry", "mlflow.store.tracking.sqlalchemy_store",
                                "mlflow.store.model_registry.sqlalchemy_store", "mlflow.store.db.utils",
                                "alembic.command", "test_registry"])
    return ctx.Pool(n)


def _wait_until(t):
    time.sleep(max(0.0, t - time.time()))


def _register(args):
    ini, run_id, start = args
    s = load_settings(path=ini, env={})
    _wait_until(start)
    return run_id, registry.register(s, run_id, "race", reason="race"), dict(registry.retries)


def _move(args):
    ini, versions, start = args
    s = load_settings(path=ini, env={})
    _wait_until(start)
    events = [registry.set_alias(s, "moves", "champion", v, "race", actor=f"worker-{versions}") for v in versions]
    return [e.event_id for e in events], dict(registry.retries)


def make_store(tmp_path):
    "A project whose runs each carry a small pyfunc model as a `model/` artifact (no Ray)."
    import mlflow
    import pandas as pd

    class Const(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return pd.DataFrame({"score": [0.5] * len(model_input)})

    (tmp_path / "settings.ini").write_text("[DEFAULT]\n")
    s = load_settings(path=tmp_path / "settings.ini", env={})
    saved = Path(tempfile.mkdtemp(dir=tmp_path)) / "model"
    mlflow.pyfunc.save_model(saved, python_model=Const(), pip_requirements=["mlflow"])
    c, exp = tracking.client(s), tracking.ensure_experiment(s)
    runs = []
    for _ in range(N):
        rid = c.create_run(exp).info.run_id
        c.log_artifacts(rid, str(saved), "model")
        c.set_terminated(rid)
        runs.append(rid)
    return s, tmp_path / "settings.ini", runs


@pytest.fixture(scope="module")
def store(tmp_path_factory): return make_store(tmp_path_factory.mktemp("registry"))


def test_parallel_registrations_give_versions_1_to_n(store):
    s, ini, runs = store
    start = time.time() + 2.0
    with _pool(N) as pool:
        out = pool.map(_register, [(ini, r, start) for r in runs])
    print("retried in workers:", [r for *_, r in out])
    versions = {v: rid for rid, v, _ in out}
    assert sorted(versions) == list(range(1, N + 1))       # none duplicated, none lost
    assert sorted(versions.values()) == sorted(runs)         # each from a distinct run
    shown = registry.show_model(s, "race")["versions"]
    assert [(v["version"], v["run_id"]) for v in shown] == sorted(versions.items())
    assert {m["name"]: m["latest_version"] for m in registry.list_models(s)}["race"] == N


def test_parallel_alias_moves_lose_no_events(store):
    s, ini, runs = store
    for r in runs[:3]: registry.register(s, r, "moves")
    plans = [[1 + (i + j) % 3 for j in range(3)] for i in range(N)]  # 8 workers x 3 moves
    start = time.time() + 2.0
    with _pool(N) as pool:
        out = pool.map(_move, [(ini, p, start) for p in plans])
    print("retried in workers:", [r for _, r in out])
    ids = [i for ev, _ in out for i in ev]
    hist = registry.alias_history(s, "moves", "champion")
    assert len(ids) == len(set(ids)) == len(hist) == 3 * N
    assert {e.event_id for e in hist} == set(ids)
    assert hist[0].from_version is None
    assert [e.from_version for e in hist[1:]] == [e.to_version for e in hist[:-1]]
    c = tracking.client(s)
    assert int(c.get_model_version_by_alias("moves", "champion").version) == hist[-1].to_version
    assert registry.version_at(s, "moves", "champion", hist[5].time) == hist[5].to_version


def test_register_retries_a_locked_database(store, monkeypatch):
    "A writer holding SQLite's lock past the busy timeout makes MLflow fail; register waits it out."
    import sqlite3
    import threading
    s, _, runs = store
    monkeypatch.setattr(registry, "retries", __import__("collections").Counter())
    db = s.tracking_uri[len("sqlite:///"):]
    calls = {"n": 0}
    real = tracking.client(s).__class__.create_model_version

    def locked_twice(self, *a, **k):  # the store reports a lock the first two times, as SQLite does under contention
        calls["n"] += 1
        if calls["n"] <= 2: raise RuntimeError("(sqlite3.OperationalError) database is locked")
        return real(self, *a, **k)

    monkeypatch.setattr(tracking.client(s).__class__, "create_model_version", locked_twice)
    assert registry.register(s, runs[0], "locked") == 1
    assert registry.retries["database is locked"] == 2
    # a real lock: another connection holds the write lock for a while
    con = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    con.execute("BEGIN EXCLUSIVE")
    threading.Timer(1.0, lambda: con.execute("COMMIT")).start()
    t0 = time.time()
    assert registry.register(s, runs[1], "locked") == 2
    assert time.time() - t0 >= 0.9


def test_register_names_a_run_without_model(store):
    s, _, _ = store
    c = tracking.client(s)
    rid = c.create_run(tracking.ensure_experiment(s)).info.run_id
    with pytest.raises(registry.RegistryError, match=f"run {rid} has no model to register"):
        registry.register(s, rid, "x")


# ---- the promotion guard with the real fraud notebooks on Ray -------------------------------------

def test_register_does_not_move_a_held_champion(store):
    "The guarded alias is moved only by promote: `register(alias='champion')` with a champion in place is refused, and champion stays."
    s, _, runs = store
    assert registry.register(s, runs[0], "held-champion", alias="champion", reason="baseline") == 1
    with pytest.raises(registry.RegistryError, match="guarded"):
        registry.register(s, runs[1], "held-champion", alias="champion", reason="no evaluation")
    assert str(tracking.client(s).get_model_version_by_alias("held-champion", "champion").version) == "1"

@pytest.mark.slow
def test_promote_guard_with_fraud_notebooks(ray_local, project_dir):
    from ml_prod.jobs.submit import run_notebooks
    s = load_settings(path=project_dir / "settings.ini", env={})
    t0 = time.time()
    run_notebooks([dict(notebook=FRAUD / "data.ipynb", parameters=dict(rows=3000, seed=s_, output_path=f"{n}.parquet"))
                   for n, s_ in (("train", 0), ("holdout", 1))], settings=s)
    trainings = dict(champ=dict(epochs=1, lr=0.003), chall=dict(epochs=3, lr=0.01), bad=dict(epochs=1, lr=1e-5))
    res = run_notebooks([dict(notebook=FRAUD / "train.ipynb", parameters=dict(data_path="train.parquet", output_dir=f"out_{k}", **p))
                         for k, p in trainings.items()], settings=s)
    runs = dict(zip(trainings, (r.run_id for r in res)))
    print(f"data and training: {time.time() - t0:.1f} s")

    assert registry.register(s, runs["champ"], "fraud", alias="champion", reason="baseline") == 1
    assert registry.register(s, runs["chall"], "fraud", alias="challenger", reason="more epochs") == 2
    t1 = time.time()
    e = promote.promote(s, "fraud", data_path="holdout.parquet", reason="weekly retrain")
    print(f"guarded promotion: {time.time() - t1:.1f} s")
    assert (e.from_version, e.to_version, e.action, e.details["decision"]) == (1, 2, "promote", "promoted")
    assert float(e.details["challenger_score"]) >= float(e.details["champion_score"])
    import pandas as pd  # the guard compared both versions on every holdout row, and its interval of the difference is above zero
    assert e.details["rows"] == len(pd.read_parquet(project_dir / "holdout.parquet")) == 3000 and e.details["low"] > 0, e.details
    c = tracking.client(s)
    ev = c.get_run(e.evaluation_run)
    assert ev.data.params["model_uri"] == "models:/fraud/2" and ev.data.tags["ml_prod.alias"] == "challenger"
    assert c.get_run(e.details["champion_evaluation_run"]).data.params["model_uri"] == "models:/fraud/1"
    assert int(c.get_model_version_by_alias("fraud", "champion").version) == 2

    # a deliberately bad challenger is refused, and the refusal is on record
    assert registry.register(s, runs["bad"], "fraud", alias="challenger") == 3
    with pytest.raises(registry.PromotionRefused, match="refused to promote fraud version 3 to champion") as refused:
        promote.promote(s, "fraud", data_path="holdout.parquet")
    assert refused.value.exit_code == 1 and refused.value.event.details["decision"] == "refused"
    assert int(c.get_model_version_by_alias("fraud", "champion").version) == 2

    # force overrides the guard; rollback undoes it
    e = promote.promote(s, "fraud", data_path="holdout.parquet", force=True, reason="override for the test")
    assert (e.from_version, e.to_version, e.details["decision"]) == (2, 3, "forced")
    r = registry.rollback(s, "fraud", reason="bad model")
    assert (r.from_version, r.to_version, r.details["undoes"]) == (3, 2, e.event_id)
    assert int(c.get_model_version_by_alias("fraud", "champion").version) == 2
    kinds = [(x.action, x.kind, x.to_version) for x in registry.alias_history(s, "fraud", "champion", refusals=True)]
    assert kinds == [("register", "alias_move", 1), ("promote", "alias_move", 2), ("promote", "promotion_refused", 3),
                     ("promote", "alias_move", 3), ("rollback", "alias_move", 2)]
    assert registry.version_at(s, "fraud", "champion", e.time) == 3
    print(f"total: {time.time() - t0:.1f} s")
