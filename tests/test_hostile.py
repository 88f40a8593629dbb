"""Concurrent registrations of one model name (issue 19, "Jobs and the control service under faults"): 20 registrations
at once (4 processes of 5 threads), 10 rounds, through ml_prod's `register` on MLflow on SQLite: versions unique and
contiguous in the database itself, no error.

Figures (counts, seconds) are printed, not asserted."""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest


# ---- 20 registrations of one name at once, 10 rounds ------------------------------------------------

PROCESSES, THREADS, ROUNDS = 4, 5, 10  # 20 registrations at once: 4 processes (SQLite's file lock) of 5 threads (its pool)


def _register_rounds(project: str, run_ids: list[str], barrier, results):
    "In a process of its own: each round, wait for the others, then register `run_ids` at once (one thread each)."
    import os
    os.chdir(project)
    from ml_prod.models.registry import register
    from ml_prod.settings import load_settings
    s = load_settings()

    def one(run_id):
        try: return int(register(s, run_id, "crowded"))
        except Exception as e: return f"{type(e).__name__}: {str(e)[:300]}"
    with ThreadPoolExecutor(len(run_ids)) as ex:
        for r in range(ROUNDS):
            barrier.wait(timeout=120)
            results.put((r, list(ex.map(one, run_ids))))


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
    errors = [x for _, xs in got for x in xs if not isinstance(x, int)]
    versions = sorted(x for _, xs in got for x in xs if isinstance(x, int))
    db = s.tracking_uri.removeprefix("sqlite:///")
    with sqlite3.connect(db) as con:
        raw = sorted(int(v) for (v,) in con.execute("select version from model_versions where name = 'crowded'"))
    n = PROCESSES * THREADS * ROUNDS
    print(f"{n} registrations, {PROCESSES * THREADS} at a time in {PROCESSES} processes: {elapsed:.1f} s (with the processes' start), "
          f"{len(errors)} errors, {len(raw)} versions in the database")
    assert not errors, errors[:5]
    assert raw == list(range(1, n + 1)), raw  # unique and contiguous, read from the database itself
    assert versions == raw
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
