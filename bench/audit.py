#!/usr/bin/env python
"""Benchmark: the audit log's write path (in a serving replica's request path), compaction and queries.

    .venv/bin/python bench/audit.py [--n N] [--dir DIR]

1. `AuditWriter.write` latency (median, p90, p99, µs) for: a small record; a typical fraud record (20 input
   features); the same with privacy rules (1 field dropped, 2 hashed); two threads on one writer.
   One write is `json.dumps` + one `os.write` (O_APPEND, no fsync); rotation is left at its 64 MiB default.
2. `compact`: N records from two replicas (one attempt in ten retried, one in twenty with a shadow arm)
   into day partitions; records per second.
3. `query`: one hour of a day's partitions, and one request id.

It writes into a temporary folder (or --dir, e.g. a shared file system mount, to measure that instead) and
removes it afterwards. Timings on a small shared machine are noisy: check `uptime` and rerun.
"""
from __future__ import annotations
import argparse, os, shutil, statistics, tempfile, threading, time
from pathlib import Path

def pctl(xs, q):
    xs = sorted(xs); return xs[min(len(xs) - 1, int(len(xs) * q / 100))]

def timed_writes(w, n, make):
    out = []
    for i in range(n):
        kw = make(i)
        t0 = time.perf_counter(); w.write(**kw); out.append(time.perf_counter() - t0)
    return out

def row(name, xs):
    us = [x * 1e6 for x in xs]
    print(f"  {name:<38} median {statistics.median(us):7.1f} µs   p90 {pctl(us, 90):7.1f}   p99 {pctl(us, 99):7.1f}")

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000, help="records for the compaction benchmark")
    ap.add_argument("--dir", help="folder to write in (default: a temporary folder)")
    a = ap.parse_args()
    from ml_prod.audit.writer import AuditWriter, Privacy, SALT_ENV
    from ml_prod.audit.store import compact
    from ml_prod.audit.query import query
    root = Path(tempfile.mkdtemp(dir=a.dir, prefix="bench-audit-"))
    try:
        features = {f"f{i}": i * 0.37 for i in range(20)}
        fraud = lambda i: dict(request_id=f"r{i}", status=200, arm="a", model_name="fraud", model_version="3",
                               inputs={**features, "email": "x@y.z", "card": "4111", "customer": i},
                               outputs={"p_fraud": 0.02, "label": 0}, latency_ms=3.2)
        print(f"write latency (5000 writes each) in {root}")
        with AuditWriter(root, "small", "r0") as w:
            timed_writes(w, 500, lambda i: dict(request_id=f"w{i}", status=200))  # warm-up
            row("small record (~200 B)", timed_writes(w, 5000, lambda i: dict(request_id=f"s{i}", status=200, outputs=1)))
        with AuditWriter(root, "fraud", "r0") as w:
            row("fraud record, 20 features (~700 B)", timed_writes(w, 5000, fraud))
        os.environ.setdefault(SALT_ENV, "bench-salt")
        with AuditWriter(root, "private", "r0", privacy=Privacy(drop="card", hash="email,customer")) as w:
            row("fraud record + drop 1, hash 2 fields", timed_writes(w, 5000, fraud))
        with AuditWriter(root, "threads", "r0") as w:
            res = [[], []]
            ths = [threading.Thread(target=lambda k=k: res[k].extend(timed_writes(w, 5000, fraud))) for k in (0, 1)]
            for t in ths: t.start()
            for t in ths: t.join()
            row("fraud record, 2 threads, one writer", res[0] + res[1])

        print(f"\ncompaction of {a.n} records (2 replicas, retries and shadows)")
        t_day = time.time() - 86400
        ws = [AuditWriter(root, "big", f"r{k}") for k in (0, 1)]
        t0 = time.perf_counter()
        for i in range(a.n):
            kw = fraud(i) | dict(ts=t_day + i * 86400 / a.n)
            ws[i % 2].write(**kw)
            if i % 10 == 0: ws[(i + 1) % 2].write(**kw | dict(attempt=2))
            if i % 20 == 0: ws[i % 2].write(**kw | dict(arm="b", shadow=True))
        for w in ws: w.close()
        print(f"  writing: {time.perf_counter() - t0:.2f} s")
        t0 = time.perf_counter(); s = compact(root, "big"); dt = time.perf_counter() - t0
        print(f"  compact: {dt:.2f} s, {s.records_read / dt:,.0f} records/s; {s.rows_written} rows, "
              f"{s.duplicates_dropped} duplicates dropped, {s.partitions_written} partitions")
        size = sum(p.stat().st_size for p in (root/"big"/"requests").rglob("*.parquet"))
        print(f"  Parquet size: {size / 2**20:.1f} MiB ({size / s.rows_written:.0f} B per row; zstd)")
        t0 = time.perf_counter(); compact(root, "big"); print(f"  compact again (nothing to do): {time.perf_counter() - t0:.3f} s")

        print("\nqueries")
        t0 = time.perf_counter(); df = query(root, "big", start=t_day + 3600, end=t_day + 7200)
        print(f"  one hour ({len(df)} rows): {(time.perf_counter() - t0) * 1000:.0f} ms")
        t0 = time.perf_counter(); df = query(root, "big", request_id="r12345")
        print(f"  one request id ({len(df)} rows): {(time.perf_counter() - t0) * 1000:.0f} ms")
    finally:
        shutil.rmtree(root, ignore_errors=True)

if __name__ == "__main__": main()
