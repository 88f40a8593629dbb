"The shared fixtures of conftest.py do what the tests rely on."
import os
from pathlib import Path

from ml_prod.settings import find_settings_file, load_settings


def test_project_dir_is_a_fresh_project(project_dir):
    assert Path.cwd() == project_dir
    assert find_settings_file() == project_dir / "settings.ini"
    s = load_settings()
    assert s.profile == "default" and s.project_dir == project_dir.resolve()
    assert Path(s.state_dir) == project_dir.resolve() / ".ml_prod"  # embedded state stays in the tmp project
    assert not any(k.startswith("ML_PROD_") and k != "ML_PROD_TEST_SESSION" for k in os.environ)


def test_ray_local(ray_local):
    assert ray_local.is_initialized()
    assert ray_local.cluster_resources()["CPU"] == 2

    @ray_local.remote
    def square(x): return x * x

    assert ray_local.get([square.remote(i) for i in range(4)]) == [0, 1, 4, 9]
