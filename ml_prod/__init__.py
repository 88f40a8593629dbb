__version__ = "0.1.0"

# The public surface: one entry point per capability. `report` is imported eagerly because job notebooks
# call it and it is cheap; everything else loads on first use, so `import ml_prod` stays fast in a kernel
# (and loads neither Ray nor MLflow). Everything not named here is internal and may change.
from .report import report

_PUBLIC = {  # name -> (module, attribute)
    # settings and errors
    "load_settings": ("settings", "load_settings"), "MlProdError": ("errors", "MlProdError"), "JobFailed": ("errors", "JobFailed"),
    # jobs
    "notebook_schema": ("params", "notebook_schema"), "connect": ("runtime.cluster", "connect"),
    "run_notebook": ("jobs.submit", "run_notebook"), "submit_notebook": ("jobs.submit", "submit_notebook"),
    "run_notebooks": ("jobs.submit", "run_notebooks"), "JobResult": ("jobs.query", "JobResult"),
    # flows of many jobs
    "run_pipeline": ("flows.pipelines", "run_pipeline"), "tune_notebook": ("flows.tune", "tune_notebook"),
    "reproduce": ("flows.reproduce", "reproduce"),
    # models
    "register": ("models.registry", "register"), "set_alias": ("models.registry", "set_alias"), "promote": ("models.promote", "promote"),
    # serving and its audit log
    "load_spec": ("serving.spec", "load_spec"), "deploy": ("serving.control", "deploy"), "audit_query": ("audit.query", "query"),
    # monitoring (a training notebook logs the reference: ml_prod.monitoring.profile.log_profile)
    "monitor": ("monitoring.job", "monitor"),
}
__all__ = ["report", *_PUBLIC]

def __getattr__(name):
    if name in _PUBLIC:
        import importlib
        module, attr = _PUBLIC[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module 'ml_prod' has no attribute {name!r}")

def __dir__(): return sorted([*__all__, "__version__"])
