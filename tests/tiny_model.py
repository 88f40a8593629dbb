"""A tiny MLflow model for serving tests, logged as code (MLflow's models-from-code), so replicas
load it without importing the tests. Its `model_config` makes it different (`offset`), slow (`delay`
seconds per call) or broken (fails to score)."""
import time

import mlflow
import numpy as np
import pandas as pd


class Tiny(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        self.cfg = context.model_config or {}

    def predict(self, context, model_input, params=None):
        if self.cfg.get("broken"): raise ValueError("weights are corrupt")
        time.sleep(self.cfg.get("delay", 0.0))
        x = model_input["amount"].to_numpy(dtype=float)
        return pd.DataFrame({"score": (1 / (1 + np.exp(-(x / 100 - 1)))) * (1 - self.cfg.get("offset", 0.0))})


mlflow.models.set_model(Tiny())
