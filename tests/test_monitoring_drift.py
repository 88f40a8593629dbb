"""Drift monitoring's defaults on the fraud example's own generator (plain papermill, no Ray).

`data.ipynb` documents that `data_drift` shifts the inputs of every transaction: amounts up,
hours later in the evening, devices towards mobile; the other inputs are drawn the same way at
any `data_drift`. A reference profile of clean data (seed 0) and a window drifted by the smallest
`data_drift` the default thresholds are meant to detect (0.5; a different seed, so the window is
new rows, not the reference's) must flag exactly the shifted features and the dataset, and a clean
window of another seed nothing at all.
"""

from importlib.resources import files
from pathlib import Path

import pandas as pd
import papermill as pm
import pytest

from ml_prod.monitoring.drift import DATASET, decide, drift_table
from ml_prod.monitoring.profile import build_profile

EXAMPLE = Path(str(files("ml_prod") / "examples" / "fraud"))
SMALLEST_DATA_DRIFT = 0.5
SHIFTED = {"amount", "hour", "device"}  # what data.ipynb's data_drift moves (README: amounts, hours, devices)
# amount_to_avg_ratio is amount / customer average: both move up together, so its centre stays,
# but its spread widens a little with the amounts'. It is neither asserted shifted nor unshifted.
UNSHIFTED = {"merchant_category", "country", "distance_from_home_km", "txn_count_1h", "txn_count_24h", "is_foreign"}


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("drift")
    out = {}
    for label, params in {"reference": dict(seed=0, data_drift=0.0), "calm": dict(seed=1, data_drift=0.0),
                          "drifted": dict(seed=2, data_drift=SMALLEST_DATA_DRIFT)}.items():
        path = tmp / f"{label}.parquet"
        pm.execute_notebook(str(EXAMPLE / "data.ipynb"), str(tmp / f"data-{label}.ipynb"), parameters=dict(params, output_path=str(path)),
                            kernel_name="python3", cwd=str(tmp), progress_bar=False)
        out[label] = pd.read_parquet(path).drop(columns=["is_fraud"])
    return out


def flagged_features(table):
    rows = table[(table.check == "data_drift") & table.flagged]
    return set(rows.feature) - {DATASET}


def test_smallest_documented_data_drift_flags_the_shifted_features_only(frames):
    reference = build_profile(frames["reference"])
    assert set(reference["features"]) == SHIFTED | UNSHIFTED | {"amount_to_avg_ratio"}
    table = drift_table(frames["drifted"], reference)
    flagged = flagged_features(table)
    assert SHIFTED <= flagged, table[table.feature.isin(SHIFTED - flagged)]
    assert not (flagged & UNSHIFTED), table[table.feature.isin(flagged & UNSHIFTED) & table.flagged]
    result = decide(table)
    assert result["status"] == "data_drift"
    assert {r["feature"] for r in result["reasons"]} >= SHIFTED | {DATASET}


def test_a_clean_window_of_the_generator_is_healthy(frames):
    table = drift_table(frames["calm"], build_profile(frames["reference"]))
    assert flagged_features(table) == set()
    assert not table.flagged.any(), table[table.flagged]
    assert decide(table)["status"] == "healthy"
