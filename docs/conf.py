# Sphinx configuration of the docs site. Do not run sphinx-build on docs/ directly: `make docs`
# (docs/build.py) prepares the pages from nbs/ and ml_prod/ in a temporary folder, copies this file
# there and builds into docs/site/. Everything works offline: no CDN, no web fonts, Sphinx's own search.
project = "ml_prod"
author = "ml_prod developers"
copyright = "ml_prod developers"
html_title = "ml_prod"
html_baseurl = "https://ml-prod.github.io/ml_prod/"

extensions = ["myst_nb"]
nb_execution_mode = "off"          # the outputs saved by the notebook tests (nbdev-test --save) are shown
nb_execution_raise_on_error = True
nb_merge_streams = True
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3
smartquotes = False                # code and docstrings show the quotes they were written with
exclude_patterns = ["**.ipynb_checkpoints"]

# a broken reference or internal link is an error (docs/build.py runs sphinx-build -W --keep-going -n).
# Type annotations in signatures name classes outside ml_prod (str, Path, pd.DataFrame...) that have no
# page here (no intersphinx: offline), and private ml_prod names (`_Sweep`) have none by design; every
# reference to a public ml_prod name is still checked.
nitpicky = True
nitpick_ignore_regex = [(r"py:(class|obj|data)", r"(?!ml_prod\.).*"), (r"py:(class|obj|data)", r"ml_prod\.(.*\.)?_\w+")]

html_theme = "alabaster"
html_theme_options = {"description": "From notebooks to production ML on Ray and MLflow", "fixed_sidebar": False}
html_sidebars = {"**": ["about.html", "searchbox.html", "navigation.html", "relations.html"]}
html_show_sourcelink = False
html_copy_source = False
html_permalinks = True
