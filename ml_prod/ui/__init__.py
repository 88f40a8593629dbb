"""JupyterLab control panels (ipywidgets, imported when a panel is shown), each over a plain-Python state: `launcher(nb)`."""
from ml_prod.ui.launcher import launcher  # the function, not the module of the same name: `ml_prod.ui.launcher(nb)`
