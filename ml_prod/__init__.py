__version__ = "0.1.0"

# The public surface. `report` is imported eagerly because job notebooks call it and it is cheap;
# everything else loads on first use, so `import ml_prod` stays fast inside a kernel.
from .report import report

_LAZY = {"run_notebook": "jobs", "submit_notebook": "jobs", "run_notebooks": "jobs", "JobResult": "jobs",
         "load_settings": "settings", "notebook_schema": "params", "MlProdError": "errors", "JobFailed": "errors",
         "deploy": "serving", "load_spec": "serve_spec"}

def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'ml_prod' has no attribute {name!r}")
