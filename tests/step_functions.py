"""Pre/post-processing steps for the serving tests (tests/ is on the cluster's PYTHONPATH there).

Each call leaves a file named `FUNCTION-PID` in the folder `$STEP_TEST_LOG`, so a test can tell which
process ran it. `enrich` fails for country FAIL and takes `STEP_SLOW_S` seconds for country SLOW."""
import os
import time
from pathlib import Path

STEP_SLOW_S = 6.0


def _note(name: str):
    if folder := os.environ.get("STEP_TEST_LOG"): (Path(folder) / f"{name}-{os.getpid()}").touch()


def enrich(records):
    "Pre step: amount + 100."
    _note("enrich")
    if records[0]["country"] == "FAIL": raise ValueError("enrich refuses country FAIL")
    if records[0]["country"] == "SLOW": time.sleep(STEP_SLOW_S)  # blocking code: must not stall the step's replica
    return [dict(r, amount=r["amount"] + 100) for r in records]


def halve(records, scores):
    "Post step: scores / 2."
    _note("halve")
    return [x / 2 for x in scores]


def double(records):
    "Pre step (fused in the tests): amount * 2."
    _note("double")
    return [dict(r, amount=r["amount"] * 2) for r in records]
