"""A tiny MLflow model for serving tests, logged as code (MLflow's models-from-code), so replicas
load it without importing the tests. Its `model_config` makes it different (`offset`), slow (`delay`
seconds per call, `load_delay` seconds to load, except in the process `logged_by`) or broken (fails to load with `load_error`, except in the process
`logged_by`; fails to score: always with `broken`, only
inside a Ray Serve replica with `broken_in_replica`, like a model whose dependency the cluster's nodes
lack; with `fail_above`, inside a replica, any call holding a row whose amount is above it: an error rate
that follows the traffic's share of such rows). With `pid_file` every load appends "PID PARENT_PID" to that file; with `calls_file` every
predict call appends the number of rows it scored. With `hold_file` and `hold_country` a call holding a row of that
country waits while that file exists (a run stopped at a known row, whatever the batching). With `nodes_file` every predict call
made in a Ray actor appends that actor's node id and process id."""
import os
import time

import mlflow
import numpy as np
import pandas as pd


def _in_replica() -> bool:
    try:
        from ray import serve
        serve.get_replica_context()  # raises outside a replica
        return True
    except Exception:
        return False


def _append(path, line):
    with open(path, "a") as f: f.write(line + "\n")


def _append_node(path):
    "The Ray node id of this process, if it is a Ray actor (not MLflow logging the model, nor a driver loading it)."
    import ray
    if ray.is_initialized() and ray.get_runtime_context().get_actor_id(): _append(path, f"{ray.get_runtime_context().get_node_id()} {os.getpid()}")


class Tiny(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        self.cfg = context.model_config or {}
        if self.cfg.get("pid_file"): _append(self.cfg["pid_file"], f"{os.getpid()} {os.getppid()}")
        if self.cfg.get("logged_by") != os.getpid(): time.sleep(self.cfg.get("load_delay", 0.0))  # MLflow loads it while logging it
        if self.cfg.get("load_error") and self.cfg.get("logged_by") != os.getpid(): raise RuntimeError(self.cfg["load_error"])

    def predict(self, context, model_input, params=None):
        if self.cfg.get("calls_file"): _append(self.cfg["calls_file"], str(len(model_input)))
        if self.cfg.get("nodes_file"): _append_node(self.cfg["nodes_file"])
        if self.cfg.get("broken"): raise ValueError("weights are corrupt")
        if self.cfg.get("broken_in_replica") and _in_replica(): raise ImportError("a dependency this model needs is missing on the cluster's nodes")
        if self.cfg.get("fail_above") is not None and (model_input["amount"] > self.cfg["fail_above"]).any() and _in_replica():
            raise ValueError(f"cannot score amounts above {self.cfg['fail_above']}")
        time.sleep(self.cfg.get("delay", 0.0))
        if self.cfg.get("hold_file") and (model_input["country"] == self.cfg["hold_country"]).any():
            while os.path.exists(self.cfg["hold_file"]): time.sleep(0.05)
        x = model_input["amount"].to_numpy(dtype=float)
        return pd.DataFrame({"score": (1 / (1 + np.exp(-(x / 100 - 1)))) * (1 - self.cfg.get("offset", 0.0))})


mlflow.models.set_model(Tiny())
