"ml_prod's public surface: a short list of entry points, each resolving to a real object, loaded lazily."
import subprocess, sys
import ml_prod


def test_every_public_name_resolves_to_a_callable_or_class():
    assert 15 <= len(ml_prod.__all__) <= 20, ml_prod.__all__
    for name in ml_prod.__all__:
        obj = getattr(ml_prod, name)
        assert callable(obj), name
        assert obj.__module__.startswith("ml_prod."), (name, obj.__module__)


def test_dir_lists_the_public_names_only():
    assert set(dir(ml_prod)) == {*ml_prod.__all__, "__version__"}


def test_each_capability_has_an_entry_point():
    for name in ("run_notebook", "submit_notebook", "run_pipeline", "tune_notebook", "register", "promote",
                 "deploy", "audit_query", "monitor", "report", "load_settings"):
        assert name in ml_prod.__all__, name


def test_unknown_name_is_an_attribute_error():
    try: ml_prod.serving_internals
    except AttributeError as e: assert "serving_internals" in str(e)
    else: raise AssertionError("no AttributeError")


def test_import_loads_neither_ray_nor_mlflow():
    code = "import sys, ml_prod; ml_prod.report; print(sorted(m for m in ('ray', 'mlflow', 'papermill') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", out
