"""JupyterLab control panels (ipywidgets, imported when a panel is shown), each over a plain-Python state: `launcher(nb)`, `deployments(app)`, `loop()`, `runs(experiment)`, `sweep(run_id_or_experiment)`, `monitoring(app)`."""
from ml_prod.ui.launcher import launcher  # the function, not the module of the same name: `ml_prod.ui.launcher(nb)`
from ml_prod.ui.deployments import deployments  # likewise `ml_prod.ui.deployments(app)`
from ml_prod.ui.loop import loop  # likewise `ml_prod.ui.loop()`
from ml_prod.ui.runs import runs  # likewise `ml_prod.ui.runs(experiment)`
from ml_prod.ui.sweep import sweep  # likewise `ml_prod.ui.sweep(run_id_or_experiment)`
from ml_prod.ui.monitoring import monitoring  # likewise `ml_prod.ui.monitoring(app)`
