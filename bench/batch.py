#!/usr/bin/env python
"""Benchmark: batch scoring (`ml_prod.batch.score.score_batch` on Ray Data) against a plain pandas loop over the same model.

    .venv/bin/python bench/batch.py [--rows N] [--files F] [--batch-size B] [--cpus C] [--actors A] [--dir DIR]

1. A project of its own on the embedded profile (SQLite MLflow in a temporary folder; Ray started in-process by
   `score_batch`, stopped at the end). A scikit-learn model (one-hot country, 8 numeric features, logistic
   regression) wrapped as an MLflow pyfunc that answers the fraud probability, registered as `bench-batch@champion`.
2. N rows in F Parquet files of 9 feature columns and an id.
3. The baseline, in this one process: the registered version loaded once with `mlflow.pyfunc.load_model`, then for each
   file `pd.read_parquet`, `predict` on chunks of B rows, and the scores written with `to_parquet`.
4. `score_batch` twice into fresh output folders: the first run pays Ray's start and the actors' model load (cold), the
   second finds Ray up (warm). Each row is validated against the signature, scored, given its decision and version, and
   the run is tracked in MLflow, as `ml_prod batch score` does. Every run starts its own scoring actors (a Python
   process each, importing MLflow and loading the model), a fixed cost; so a third run scores the input three times
   over (each file copied twice more) and the marginal rate, (3N - N) rows over the difference of the two warm
   runs' seconds, is the throughput once the actors are up.
5. The scores of both paths are compared row by row (asserted equal).

It prints rows per second and seconds of each path, the ratios against the baseline beside the baseline's absolute
figure, and the machine's load (`os.getloadavg`) before and after. Issue 14 asks for the figures, with no target.
"""
from __future__ import annotations
import argparse, os, shutil, tempfile, time
from pathlib import Path
import numpy as np
import pandas as pd
import mlflow


class Proba(mlflow.pyfunc.PythonModel):
    "The fraud probability of a fitted classifier, as one `score` column."
    def __init__(self, clf): self.clf = clf
    def predict(self, context, model_input, params=None):
        return pd.DataFrame({"score": self.clf.predict_proba(model_input)[:, 1]})


def rows(rng, n: int, start: int = 0) -> pd.DataFrame:
    df = pd.DataFrame({f"x{j}": rng.normal(0, 1, n).round(4) for j in range(8)})
    df.insert(0, "id", np.arange(start, start + n))
    df["country"] = rng.choice(["US", "FR", "DE", "GB"], n)
    return df


def train_and_register(s, rng) -> int:
    from mlflow.models import infer_signature
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder
    from ml_prod.models.registry import register
    X = rows(rng, 20_000).drop(columns=["id"])
    y = (X.x0 + 0.5 * X.x1 - X.x2 * (X.country == "FR") + rng.normal(0, 1, len(X)) > 1.5).astype(int)
    clf = make_pipeline(ColumnTransformer([("c", OneHotEncoder(handle_unknown="ignore"), ["country"])], remainder="passthrough"),
                        LogisticRegression(max_iter=500)).fit(X, y)
    mlflow.set_tracking_uri(s.tracking_uri)
    mlflow.set_experiment("bench-batch")
    with mlflow.start_run() as run:
        example = X.head(5)
        mlflow.pyfunc.log_model(name="model", python_model=Proba(clf), input_example=example,
                                signature=infer_signature(example, Proba(clf).predict(None, example)))
    return register(s, run.info.run_id, "bench-batch", alias="champion")


def baseline(uri: str, files: list[Path], out: Path, batch_size: int) -> float:
    "Seconds for the pandas loop (model load included)."
    t = time.perf_counter()
    model = mlflow.pyfunc.load_model(uri)
    out.mkdir()
    for f in files:
        df = pd.read_parquet(f)
        feats = df.drop(columns=["id"])
        scores = np.concatenate([model.predict(feats.iloc[i:i + batch_size])["score"].to_numpy() for i in range(0, len(df), batch_size)])
        df.assign(score=scores).to_parquet(out / f.name)
    return time.perf_counter() - t


def scores_of(folder: Path) -> pd.Series:
    df = pd.concat([pd.read_parquet(f, columns=["id", "score"]) for f in sorted(folder.glob("*.parquet"))])
    return df.set_index("id")["score"].sort_index()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--files", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=4096, help="rows per model call, on both paths")
    ap.add_argument("--cpus", type=float, default=1, help="CPUs each scoring actor reserves")
    ap.add_argument("--actors", type=int, default=None, help="most scoring actors (default: as many as the CPUs allow)")
    ap.add_argument("--dir", help="folder to work in (default: a temporary folder, removed at the end)")
    a = ap.parse_args()
    root = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="bench-batch-"))
    root.mkdir(parents=True, exist_ok=True)
    (root / "settings.ini").write_text("[DEFAULT]\n")
    os.chdir(root)
    os.environ.pop("ML_PROD_PROFILE", None)
    from ml_prod.runtime.cluster import cluster_down
    from ml_prod.settings import load_settings
    from ml_prod.batch.score import score_batch
    s = load_settings(path=root / "settings.ini")
    rng = np.random.default_rng(0)
    print(f"load before: {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} CPUs")
    version = train_and_register(s, rng)
    inp = root / "in"; inp.mkdir(exist_ok=True)
    per = a.rows // a.files
    files = []
    for i in range(a.files):
        files.append(inp / f"part-{i:03d}.parquet")
        rows(rng, per + (a.rows - per * a.files if i == a.files - 1 else 0), start=i * per).to_parquet(files[-1])
    uri = f"models:/bench-batch/{version}"
    try:
        t_base = baseline(uri, files, root / "out-pandas", a.batch_size)
        runs = []
        inp3 = root / "in3"; inp3.mkdir(exist_ok=True)
        for f in files:
            for k in range(3): shutil.copyfile(f, inp3 / f"{f.stem}-{k}.parquet")
        for name, folder, n in (("cold", inp, a.rows), ("warm", inp, a.rows), ("warm3", inp3, 3 * a.rows)):
            t = time.perf_counter()
            r = score_batch("bench-batch@champion", folder, root / f"out-{name}", settings=s, num_cpus=a.cpus, actors=a.actors, batch_size=a.batch_size)
            runs.append((name, time.perf_counter() - t, r))
            assert r.rows_scored == n and r.rows_rejected == 0, r
    finally:
        cluster_down(s)
    base = scores_of(root / "out-pandas")
    for name, _, _ in runs[:2]:
        got = scores_of(root / f"out-{name}")
        assert got.index.equals(base.index) and np.array_equal(got.to_numpy(), base.to_numpy()), f"{name}: scores differ from the pandas loop's"
    n = a.rows
    print(f"{n:,} rows in {a.files} files, batch size {a.batch_size}, actors of {a.cpus} CPU (at most {a.actors or 'as the CPUs allow'})")
    print(f"  pandas loop, one process:  {t_base:7.2f} s  {n / t_base:>10,.0f} rows/s  (baseline)")
    for name, t, r in runs[:2]:
        print(f"  score_batch, {name:<4}:        {t:7.2f} s  {n / t:>10,.0f} rows/s  {t_base / t:5.2f}x the baseline's rows/s (run {r.run_id})")
    t3, t1 = runs[2][1], runs[1][1]
    print(f"  score_batch, 3N rows, warm: {t3:7.2f} s; marginal (2N rows in {t3 - t1:.2f} s): {2 * n / (t3 - t1):>10,.0f} rows/s  "
          f"{(2 * n / (t3 - t1)) / (n / t_base):5.2f}x the baseline's rows/s")
    print("  scores: identical on every row (both paths)")
    print(f"load after: {os.getloadavg()[0]:.2f} (1 min)")
    if not a.dir: shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
