"`nbdev-clean`, run with this repo's config, keeps the `parameters` cell tag that `notebook_schema` reads."
import re, subprocess, sys
from pathlib import Path
import nbformat
from nbdev.config import get_config
from ml_prod.params import notebook_schema

ROOT = Path(__file__).resolve().parents[1]
NBDEV_CLEAN = Path(sys.executable).parent/"nbdev-clean"
PARAMS = "rows: int = 20_000  # transactions {min: 100}\ndevice = 'web'  # device family {choices: [web, pos]}"

def _project(tmp_path:Path, pyproject:str) -> Path:
    "A repo-like folder (pyproject.toml + nbs/) holding one job notebook; returns the notebook's path."
    (tmp_path/"nbs").mkdir()
    (tmp_path/"pyproject.toml").write_text(pyproject)
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    nb.cells = [nbformat.v4.new_code_cell(PARAMS, metadata={"tags": ["parameters"], "scrolled": True}, execution_count=3),
                nbformat.v4.new_code_cell("print(rows)", execution_count=4)]
    nbformat.write(nb, tmp_path/"nbs"/"job.ipynb")
    return tmp_path/"nbs"/"job.ipynb"

def _nbdev_clean(path:Path) -> nbformat.NotebookNode:
    "Run the `nbdev-clean` command on `path` from its project folder, as a developer or the git hook would."
    subprocess.run([str(NBDEV_CLEAN), "--fname", str(path)], cwd=path.parent.parent, check=True, capture_output=True, text=True)
    return nbformat.read(path, as_version=4)

def test_repo_config_allows_tags():
    assert "tags" in get_config(ROOT).get("allowed_cell_metadata_keys")

def test_nbdev_clean_keeps_parameters_tag(tmp_path):
    path = _project(tmp_path, (ROOT/"pyproject.toml").read_text())
    nb = _nbdev_clean(path)
    assert nb.cells[0].execution_count is None and "scrolled" not in nb.cells[0].metadata  # it did clean
    assert nb.cells[0].metadata["tags"] == ["parameters"]
    schema = notebook_schema(path)
    assert schema.names == ["rows", "device"]
    assert (schema["rows"].min, schema["device"].choices) == (100, ["web", "pos"])

def test_without_the_config_key_the_tag_is_stripped(tmp_path):
    "The control: the same notebook loses its parameters when the config does not allow `tags`."
    pyproject, n = re.subn(r"(?m)^allowed_cell_metadata_keys\s*=.*$", "", (ROOT/"pyproject.toml").read_text())
    assert n == 1
    path = _project(tmp_path, pyproject)
    nb = _nbdev_clean(path)
    assert "tags" not in nb.cells[0].metadata
    schema = notebook_schema(path)
    assert (schema.cell, schema.names) == (None, [])
