#!/usr/bin/env python
"""Benchmark: drift over one audit window of N requests by K numeric features, end to end from the audit folder.

    .venv/bin/python bench/monitoring.py [--n N] [--k K] [--dir DIR] [--keep]

1. Writes N audit records (one scoring record each, K float features, a score) with `AuditWriter`, the
   replica's writer, half of them shifted (the drifted window), and compacts them to Parquet; then writes
   the same N again, left uncompacted (the newest segments), under a second application.
2. Builds the reference profile from 200,000 reference rows of the same generator (`build_profile`).
3. Times, for the compacted and for the uncompacted log separately: `read_window` (Arrow reads the
   partitions or segments and decodes the JSON columns in one pass) and the drift statistics of every
   feature against the profile (`drift.feature_rows`), and their sum, the end-to-end figure.
4. The floor: the same statistics with plain numpy and scipy on an in-memory numpy copy of the same window
   against the same profile (`np.histogram` on the profile's bin edges for PSI and Jensen-Shannon,
   `scipy.stats.ks_2samp` and `scipy.stats.wasserstein_distance` against the profile's sample); the engine's
   and the floor's statistics are asserted equal on identical rows.

It prints absolute seconds of every part, the ratio engine / floor, and the machine's load (`os.getloadavg`).
Target (issue 13): end to end under 10 s on 2 cores, within 1.5x of the floor. The window is never sampled.
"""
from __future__ import annotations
import argparse, os, shutil, tempfile, time
from pathlib import Path
import numpy as np
import pandas as pd

def gen(rng, n, k, shift=0.0):
    "n rows by k features: normal, lognormal and uniform columns in turn; `shift` moves every third feature."
    X = np.empty((n, k))
    for j in range(k):
        s = shift if j % 3 == 0 else 0.0
        X[:, j] = [rng.normal(s, 1, n), rng.lognormal(0.5 * s, 0.6, n), rng.uniform(s, 1 + s, n)][j % 3]
    return X.round(5)

def write_log(root: Path, app: str, X, scores, t0: float):
    from ml_prod.audit.writer import AuditWriter
    names = [f"f{j}" for j in range(X.shape[1])]
    with AuditWriter(root, app, "r1") as w:
        for i, (row, sc) in enumerate(zip(X.tolist(), scores.tolist())):
            w.write(request_id=f"q{i}", ts=t0 + i * 1e-3, status=200, outcome="ok", arm="main", model_name="m", model_version="1",
                    inputs=[dict(zip(names, row))], outputs=dict(scores=[sc], decisions=["fraud" if sc >= 0.5 else "legit"]), latency_ms=2.0)

def timed(f, *a, **kw):
    t = time.perf_counter(); out = f(*a, **kw); return out, time.perf_counter() - t

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="audit records in the window")
    ap.add_argument("--k", type=int, default=30, help="numeric features per record")
    ap.add_argument("--dir", help="folder to write in (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the audit folder (and reuse it when --dir holds one)")
    a = ap.parse_args()
    from ml_prod.audit.store import compact
    from ml_prod.monitoring.window import read_window
    root = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="bench-monitoring-"))
    rng, t0 = np.random.default_rng(0), 1_750_000_000.0
    X = np.vstack([gen(rng, a.n // 2, a.k), gen(rng, a.n - a.n // 2, a.k, shift=0.3)])
    scores = rng.uniform(size=a.n).round(5)
    try:
        if not (root/"compacted").is_dir():
            _, w1 = timed(write_log, root, "compacted", X, scores, t0)
            _, c1 = timed(compact, root, app="compacted")
            _, w2 = timed(write_log, root, "uncompacted", X, scores, t0)
            print(f"wrote {a.n:,} records twice ({w1:.1f} s, {w2:.1f} s with AuditWriter); compacted one copy in {c1:.1f} s")
        from ml_prod.monitoring.drift import DRIFT_METRICS, drift_table
        from ml_prod.monitoring.profile import build_profile
        from monitoring_engine import floor  # bench/: the same figures with plain numpy/scipy calls
        names = [f"f{j}" for j in range(a.k)]
        profile = build_profile(pd.DataFrame(gen(np.random.default_rng(1), 200_000, a.k), columns=names))
        frame = pd.DataFrame(X, columns=names)  # the floor's in-memory copy of the same window
        print(f"load average before: {os.getloadavg()}")
        ref, t_floor = timed(floor, frame, profile)
        for app in ("compacted", "uncompacted"):
            win, t_read = timed(read_window, root, app)
            assert len(win.records) == a.n, (app, len(win.records))
            table, t_drift = timed(drift_table, win.records, profile)
            got = table[table.metric.isin(DRIFT_METRICS)].set_index(["feature", "metric"])["value"]
            for name, figs in ref.items():  # the engine, fed from the audit folder, and the floor agree on every figure
                for m, v in figs.items(): assert abs(got[name, m] - v) <= 1e-12 * max(1.0, abs(v)), (app, name, m, got[name, m], v)
            total = t_read + t_drift
            print(f"{app:<12} read_window {t_read:6.2f} s + drift_table {t_drift:5.2f} s = {total:6.2f} s end to end "
                  f"({len(win.records):,} records, {len(win.features)} features); floor {t_floor:.2f} s; ratio {total / t_floor:.2f}x")
        print(f"load average (1, 5, 15 min): {os.getloadavg()}")
    finally:
        if not a.keep and not a.dir: shutil.rmtree(root, ignore_errors=True)

if __name__ == "__main__":
    main()
