#!/usr/bin/env python
"""Benchmark: the drift engine on an in-memory window against a reference profile, beside a numpy/scipy floor.

    .venv/bin/python bench/monitoring_engine.py [--rows 1000000] [--features 30] [--reps 3]

A reference of 200,000 rows by F numeric features (normal, lognormal, exponential, Poisson and
uniform columns, in turn) is profiled with `build_profile` (deciles, 2,000-value samples). The
window is N rows of the same generator with every third feature shifted. Timed, best of `--reps`:

- **engine**: `ml_prod.monitoring.drift.drift_table(window, profile)`, the whole table: per feature
  KS, PSI, Jensen-Shannon and normalized Wasserstein against the profile, the integrity figures and
  the dataset row; with its default 2 threads, and with 1;
- **floor**: plain numpy/scipy for the same figures on the same arrays: `np.histogram` of the window
  on the profile's edges, then PSI and `scipy.spatial.distance.jensenshannon` on those counts,
  `scipy.stats.ks_2samp` and `scipy.stats.wasserstein_distance` of the window against the
  profile's sample (one thread).

The statistics of the two are asserted identical (KS and Wasserstein equal to the last bit; PSI and
Jensen-Shannon to 1e-12, the same counts through differently ordered sums). It prints absolute
seconds, the ratio engine / floor and `os.getloadavg()`. Timings on a small shared machine are
noisy: check the load and rerun.
"""
from __future__ import annotations
import argparse, os, time
import numpy as np
import pandas as pd
import scipy.spatial.distance
import scipy.stats


def columns(n:int, f:int, rng, shift:bool) -> pd.DataFrame:
    "n rows of f numeric features; with `shift`, every third feature moves."
    out = {}
    for i in range(f):
        d = 0.3 if shift and i % 3 == 0 else 0.0
        kind = i % 5
        if kind == 0: v = rng.normal(d, 1, n)
        elif kind == 1: v = rng.lognormal(3.5 + d, 0.9, n)
        elif kind == 2: v = rng.exponential(8 * (1 + d), n)
        elif kind == 3: v = rng.poisson(2 + d, n).astype(float)
        else: v = rng.uniform(0, 1 + d, n)
        out[f"f{i:02d}"] = v
    return pd.DataFrame(out)


def floor(window:pd.DataFrame, profile:dict, alpha:float=0.5) -> dict:
    "The same figures with plain numpy/scipy calls."
    from ml_prod.monitoring.profile import bin_edges
    out = {}
    for name, spec in profile["features"].items():
        x, sample = window[name].to_numpy(), np.asarray(spec["sample"])
        w = np.histogram(x, bin_edges(spec))[0]
        r = np.asarray(spec["counts"])
        p, q = (r + alpha) / (r.sum() + alpha * len(r)), (w + alpha) / (w.sum() + alpha * len(w))
        out[name] = dict(ks=scipy.stats.ks_2samp(x, sample).statistic, psi=float(np.sum((q - p) * np.log(q / p))),
                         jensen_shannon=float(scipy.spatial.distance.jensenshannon(r, w, base=2)),
                         wasserstein_norm=scipy.stats.wasserstein_distance(x, sample) / spec["std"])
    return out


def best(fn, reps:int):
    times, out = [], None
    for _ in range(reps):
        t0 = time.perf_counter(); out = fn(); times.append(time.perf_counter() - t0)
    return min(times), out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="window rows")
    ap.add_argument("--features", type=int, default=30, help="numeric features")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions (the best is reported)")
    a = ap.parse_args()
    from ml_prod.monitoring.drift import DRIFT_METRICS, drift_table
    from ml_prod.monitoring.profile import build_profile
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    profile = build_profile(columns(200_000, a.features, rng, shift=False))
    window = columns(a.rows, a.features, rng, shift=True)
    print(f"window {a.rows:,} rows x {a.features} numeric features; profile built in {time.perf_counter() - t0:.2f} s")
    print(f"load average before: {os.getloadavg()}")
    t_engine, table = best(lambda: drift_table(window, profile), a.reps)
    t_engine1, _ = best(lambda: drift_table(window, profile, workers=1), a.reps)
    t_floor, ref = best(lambda: floor(window, profile), a.reps)
    got = table[table.metric.isin(DRIFT_METRICS)].set_index(["feature", "metric"])["value"]
    for name, figs in ref.items():
        for m, v in figs.items():
            if m in ("ks", "wasserstein_norm"): assert got[name, m] == v, (name, m, got[name, m], v)
            else: assert abs(got[name, m] - v) <= 1e-12 * max(1.0, abs(v)), (name, m, got[name, m], v)
    drifted = sorted(set(table[(table.check == "data_drift") & table.flagged & (table.feature != "*")].feature))
    print(f"statistics identical ({len(ref) * 4} figures); {len(drifted)} features flagged: {drifted}")
    print(f"engine, 2 threads (drift_table): {t_engine:6.2f} s")
    print(f"engine, 1 thread:                {t_engine1:6.2f} s")
    print(f"floor, numpy/scipy:              {t_floor:6.2f} s")
    print(f"ratio engine / floor: {t_engine / t_floor:.3f} (1 thread: {t_engine1 / t_floor:.3f})")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
