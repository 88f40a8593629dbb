#!/usr/bin/env python3
"""Build the docs site from nbs/ and ml_prod/ into docs/site/, offline, with Sphinx and myst-nb.

    python docs/build.py              # what `make docs` runs: fails on any warning (broken link, bad reference)
    python docs/build.py --out DIR    # build somewhere else (the browser test builds into its tmp dir)
    python docs/build.py --keep       # keep the prepared sources in docs/_build/src to inspect them

nbdev's own docs need Quarto; this does what they do with pip-installable tools. Each notebook of nbs/ is
copied to a temporary source folder the way nbdev prepares it: `#| hide` cells are dropped, `#| export`
cells are replaced by the reference of what they define (signature, docstring and the docments of the
parameters, as Sphinx Python-domain objects, so they are searchable and cross-referenceable),
`#| default_exp` cells are dropped and the remaining `#|` directive lines removed. Notebooks lose their
number prefix as nbdev's URLs do (`api/23_jobs_submit.ipynb` -> `api/jobs_submit.html`), and each page
also gets a markdown twin (`api/jobs_submit.html.md`), the link every module docstring carries.

Generated pages, so they never drift from the code: `reference/index` (the names in `ml_prod.__all__`),
`reference/cli` (from the Typer app) and `reference/yaml` (from the pydantic schemas of the serving spec
and the pipeline). Notebooks are rendered with the outputs saved in them (nb_execution_mode "off"); a
saved error output fails the build unless its cell is tagged `raises-exception`.
"""
from __future__ import annotations

import argparse, ast, copy, importlib, inspect, json, re, shutil, subprocess, sys, tempfile, time, typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NBS, LIB, DOCS = ROOT / "nbs", ROOT / "ml_prod", ROOT / "docs"
SITE = DOCS / "site"
ASSETS = {".png", ".jpg", ".jpeg", ".gif", ".svg", ".webp"}
SECTIONS = {"tutorials": "Tutorials", "explanations": "Explanations", "api": "API: one page per module"}

sys.path.insert(0, str(ROOT / ".ci"))  # nbdev's cell directives are parsed in one place, the README renderer
from readme import directives, strip_directives, text  # noqa: E402


class DocsError(Exception): "A notebook the site cannot show as it is (a saved error output)."


def page_name(nb: Path) -> str:
    "`nbs/api/23_jobs_submit.ipynb` -> `api/jobs_submit.ipynb` (nbdev's `nbpath2html` rule, subfolders kept)."
    rel = nb.relative_to(NBS)
    return str(rel.with_name(re.sub(r"^\d+[a-zA-Z0-9]*_", "", rel.name.lower())))


def sources() -> list[Path]:
    "The notebooks (and images) of nbs/, skipping `_`/`.` names and checkpoints, as nbdev does."
    return sorted(p for p in NBS.rglob("*") if p.is_file() and (p.suffix == ".ipynb" or p.suffix in ASSETS)
                  and not any(part.startswith(("_", ".")) for part in p.relative_to(NBS).parts))


# ---- reference of one object (signature, docstring, docments) ---------------------------------

def _clean(s: str) -> str: return re.sub(r"\btyping\.|\bcollections\.abc\.|\bml_prod\.[\w.]+\.(?=[A-Z_])", "", s)


def signature(obj) -> str:
    "`(a: int = 1, ...) -> T` with annotations as written; `(...)` when it has none Sphinx can parse."
    try: sig = inspect.signature(obj, eval_str=True)  # ml_prod types fully qualified: references that resolve
    except Exception:
        try: sig = inspect.signature(obj)
        except (TypeError, ValueError): return "(...)"
    s = re.sub(r"\btyping\.|\bcollections\.abc\.", "", str(sig))
    try: ast.parse(f"def f{s}: pass")
    except SyntaxError: s = "(" + ", ".join(p.name for p in sig.parameters.values()) + ")"
    return s.replace("\n", " ")


def _anno(a) -> str:
    if a is inspect.Parameter.empty: return ""
    return _clean(a if isinstance(a, str) else getattr(a, "__name__", repr(a)))


def params_md(obj) -> list[str]:
    "One bullet per parameter: name, type, default and its docment (nbdev's trailing comment)."
    from fastcore.docments import docments
    try: d = docments(obj, full=True)
    except Exception: return []
    out = []
    for name, p in d.items():
        if name in ("self", "cls") or not isinstance(p, dict): continue
        if name == "return":
            if p.get("docment"): out.append(f"- **returns**: {p['docment']}")
            continue
        kind = p.get("kind")
        star = "**" if kind == inspect.Parameter.VAR_KEYWORD else "*" if kind == inspect.Parameter.VAR_POSITIONAL else ""
        bits = [f"`{_anno(p.get('anno', inspect.Parameter.empty))}`"] if _anno(p.get("anno", inspect.Parameter.empty)) else []
        if p.get("default", inspect.Parameter.empty) is not inspect.Parameter.empty: bits.append(f"default `{p['default']!r}`")
        head = f"- **`{star}{name}`**" + (f" ({', '.join(bits)})" if bits else "")
        out.append(head + (f": {p['docment']}" if p.get("docment") else ""))
    return out


def object_md(module: str, name: str, obj, index: bool = True) -> str:
    "A MyST Python-domain directive for `module.name`: searchable, and the target of `{py:obj}` references."
    kind = "class" if inspect.isclass(obj) else "function" if callable(obj) else "data"
    sig = signature(obj) if kind != "data" else ""
    doc = inspect.getdoc(obj) or ""
    if kind == "class" and doc == inspect.getdoc(object): doc = ""
    body = [f"```{{py:{kind}}} {name}{sig}", f":module: {module}"] + ([":no-index:"] if not index else []) + [""]
    body += [doc, ""] if doc else []
    ps = params_md(obj) if kind != "data" else []
    body += (["**Parameters**", "", *ps, ""] if ps else [])
    return "\n".join(body + ["```"])


# ---- notebooks ---------------------------------------------------------------------------------

def _is_patch(dec) -> bool:
    f = dec.func if isinstance(dec, ast.Call) else dec
    return getattr(f, "id", getattr(f, "attr", None)) == "patch"


def documented(source: str, mod) -> list[tuple[str, object]]:
    "(name, object) for each public function or class an exported cell defines, and each method it patches."
    try: tree = ast.parse(source)
    except SyntaxError: return []
    public, out = set(getattr(mod, "__all__", [])), []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and any(_is_patch(d) for d in node.decorator_list):
            ann = node.args.args[0].annotation if node.args.args else None
            cls = getattr(mod, ann.id, None) if isinstance(ann, ast.Name) else None
            if cls is not None and ann.id in public and not node.name.startswith("_"):
                out.append((f"{ann.id}.{node.name}", getattr(cls, node.name, None)))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name in public:
            out.append((node.name, getattr(mod, node.name, None)))
    return [(n, o) for n, o in out if o is not None]


def check_outputs(nb: dict, where: str) -> None:
    for i, cell in enumerate(nb["cells"]):
        if "raises-exception" in cell.get("metadata", {}).get("tags", []): continue
        for o in cell.get("outputs", []):
            if o.get("output_type") == "error":
                raise DocsError(f"{where}: cell {i} has a saved error output ({o.get('ename')}: {o.get('evalue')}). "
                                f"Fix the notebook and save its outputs again, or tag the cell `raises-exception`.")


def _md(src: str, cell_id: str) -> dict: return {"cell_type": "markdown", "id": cell_id, "metadata": {}, "source": src}


def prepare(nb: dict, where: str) -> dict:
    "The notebook as its docs page shows it (see the module docstring)."
    check_outputs(nb, where)
    cells, module, shown = [], None, set()
    for cell in nb["cells"]:
        src = text(cell.get("source"))
        if cell["cell_type"] == "markdown":
            cells.append({**cell, "source": src})
            continue
        if cell["cell_type"] != "code": continue
        d = directives(src)
        if "default_exp" in d: module = d["default_exp"]
        if "hide" in d or d.get("include") == "false" or "default_exp" in d or "exporti" in d: continue
        if "export" in d:
            target = d["export"] or module
            mod = importlib.import_module(f"ml_prod.{target}") if target else None
            for name, obj in documented(strip_directives(src), mod) if mod else []:
                if name in shown: continue  # a class continued in a later cell is shown once, where it starts
                shown.add(name)
                cells.append(_md(object_md(mod.__name__, name, obj), f"{cell.get('id', 'x')}-{len(cells)}"))
            continue
        cell = {**cell, "source": strip_directives(src), "metadata": copy.deepcopy(cell.get("metadata", {}))}
        if d.get("echo") == "false": cell["metadata"].setdefault("tags", []).append("remove-input")
        if d.get("output") == "false": cell["outputs"] = []
        if cell["source"].strip() or cell.get("outputs"): cells.append(cell)
    meta = {k: v for k, v in nb.get("metadata", {}).items() if k in ("kernelspec", "language_info")}
    meta.setdefault("kernelspec", {"name": "python3", "display_name": "Python 3", "language": "python"})
    return {**nb, "metadata": meta, "cells": cells}


def markdown_twin(nb: dict) -> str:
    "The page as plain markdown (`<page>.html.md`, the link in module docstrings): prose, code, text outputs."
    out = []
    for c in nb["cells"]:
        src = text(c.get("source"))
        if c["cell_type"] == "markdown": out.append(src)
        elif c["cell_type"] == "code":
            out.append(f"```python\n{src}\n```")
            for o in c.get("outputs", []):
                t = text(o.get("text") or o.get("data", {}).get("text/plain"))
                if t.strip(): out.append(f"```\n{t.rstrip()}\n```")
    return "\n\n".join(out) + "\n"


# ---- generated reference pages -----------------------------------------------------------------

def _public_map() -> dict[str, tuple[str, str]]:
    import ml_prod
    return {"report": ("report", "report"), **ml_prod._PUBLIC}


def reference_index(api_pages: dict[str, str]) -> str:
    "The names of `ml_prod.__all__`, each linked to its reference on its module's page."
    import ml_prod
    rows = []
    for name in ml_prod.__all__:
        module, attr = _public_map()[name]
        rows.append(f"- `ml_prod.{name}`: {{py:obj}}`ml_prod.{module}.{attr}` ({_summary(getattr(ml_prod, name))})")
    mods = [f"- [`ml_prod.{m}`](../{p}) {_mod_summary(m)}" for m, p in sorted(api_pages.items())]
    return "\n".join(["# Reference", "", "The public surface: `import ml_prod` gives these names (`ml_prod.__all__`); "
                      "everything else is internal and may change.", "", *rows, "",
                      "## Commands and file formats", "", "- [The `ml_prod` command](cli.md)",
                      "- [YAML formats: the serving spec and the pipeline](yaml.md)", "",
                      "## Modules", "", *mods, "", "```{toctree}", ":hidden:", "", "cli", "yaml", "```", ""])


def _summary(obj) -> str: return (inspect.getdoc(obj) or "").strip().split("\n")[0].rstrip(".")


def _mod_summary(m: str) -> str:
    doc = ast.get_docstring(ast.parse((LIB / f"{m.replace('.', '/')}.py").read_text(encoding="utf-8"))) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def _click_type(p) -> str:
    if getattr(p, "is_flag", False): return "flag"
    return str(getattr(getattr(p, "type", None), "name", "") or "value").lower()


def cli_md() -> str:
    "Every command of the Typer app: usage, help and each argument and option, from click's own objects."
    import typer  # typer may carry its own click: the objects are read by their attributes, not their classes
    from ml_prod.cli.main import app
    root = typer.main.get_command(app)
    out = ["# The `ml_prod` command", "", "Generated from the Typer app (`ml_prod.cli.main.app`) at build time; "
           "`ml_prod COMMAND --help` prints the same.", ""]

    def walk(cmd, path: list[str], ctx_parent=None):
        ctx = cmd.context_class(cmd, info_name=path[-1], parent=ctx_parent)
        if len(path) > 1:
            out.extend([f"{'#' * min(len(path), 4)} `{' '.join(path)}`", ""])
            if cmd.help: out.extend([inspect.cleandoc(cmd.help).replace("\b\n", ""), ""])
            out.extend(["```text", " ".join(path) + " " + " ".join(cmd.collect_usage_pieces(ctx)), "```", ""])
            for p in cmd.params:
                if getattr(p, "hidden", False) or p.name == "help": continue
                if p.param_type_name == "argument":
                    out.append(f"- `{(getattr(p, 'metavar', None) or p.name.upper())}` (argument, {_click_type(p)}{', required' if getattr(p, 'required', False) else ''}): {(getattr(p, 'help', '') or '').strip()}")
                else:
                    names = " / ".join([*getattr(p, "opts", []), *getattr(p, "secondary_opts", [])]) or p.name
                    d = getattr(p, "default", None)
                    dflt = "" if d in (None, False, ()) or callable(d) else f", default `{d}`"
                    out.append(f"- `{names}` ({_click_type(p)}{dflt}): {(getattr(p, 'help', '') or '').strip()}")
            out.append("")
        if hasattr(cmd, "list_commands"):
            for name in cmd.list_commands(ctx):
                sub = cmd.get_command(ctx, name)
                if sub is not None and not sub.hidden: walk(sub, path + [name], ctx)

    walk(root, ["ml_prod"])
    return "\n".join(out) + "\n"


def _type(t) -> str:
    "A field's type as a reader writes it in YAML terms (`Annotated` and discriminators dropped)."
    from pydantic import BaseModel
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin is typing.Annotated: return _type(args[0])
    if isinstance(t, type) and issubclass(t, BaseModel): return t.__name__
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join(_type(a) for a in args if a is not type(None)) + (" or null" if type(None) in args else "")
    if origin in (list, tuple, set): return f"list of {_type(args[0])}" if args else "list"
    if origin is dict: return f"mapping of {_type(args[0])} to {_type(args[1])}" if args else "mapping"
    if origin is typing.Literal: return " or ".join(repr(a) for a in args)
    return getattr(t, "__name__", _clean(str(t)))


def _models(t, seen: list) -> None:
    from pydantic import BaseModel
    if isinstance(t, type) and issubclass(t, BaseModel):
        if t in seen: return
        seen.append(t)
        for f in t.model_fields.values(): _models(f.annotation, seen)
    for a in typing.get_args(t): _models(a, seen)


def _model_md(m, level: str) -> list[str]:
    from pydantic_core import PydanticUndefined
    out = [f"{level} `{m.__name__}`", "", _summary(m) + ".", ""] if _summary(m) else [f"{level} `{m.__name__}`", ""]
    for name, f in m.model_fields.items():
        key = f.alias or name
        need = "required" if f.is_required() else (f"default `{f.default!r}`" if f.default is not PydanticUndefined else "optional")
        out.append(f"- `{key}` ({_type(f.annotation)}, {need}): {f.description or ''}".rstrip(": "))
    return out + [""]


def yaml_md() -> str:
    "Each YAML format's fields (type, default, meaning), from its pydantic models at build time."
    from ml_prod.serving.spec import ServeSpec
    from ml_prod.flows.pipelines import Pipeline
    from ml_prod.flows.schedules import Schedule
    out = ["# YAML formats", "", "Generated from the pydantic schemas at build time, so this page is what the loader accepts.", ""]
    for title, top, loader in [("The serving spec (`serve.yaml`)", ServeSpec, "ml_prod.serving.spec.load_spec"),
                               ("The pipeline (`pipeline.yaml`)", Pipeline, "ml_prod.flows.pipelines.load_pipeline"),
                               ("Schedules (`schedules.yaml`: a list of these, or `schedules:` holding one)", Schedule, "ml_prod.flows.schedules.load_schedules")]:
        out += [f"## {title}", "", f"Read by {{py:obj}}`{loader}`; the top level is `{top.__name__}`, unknown keys are refused "
                "where the model says so.", ""]
        seen: list = []
        _models(top, seen)
        for m in seen: out += _model_md(m, "###")
    return "\n".join(out) + "\n"


# ---- build -------------------------------------------------------------------------------------

def index_toctree(pages: list[str]) -> str:
    out = []
    for folder, caption in SECTIONS.items():
        mine = [p[:-len(".ipynb")] for p in pages if p.startswith(folder + "/")]
        if mine: out += ["```{toctree}", f":caption: {caption}", ":maxdepth: 1", "", *mine, "```", ""]
    return "\n".join(out + ["```{toctree}", ":caption: Reference", ":maxdepth: 1", "", "reference/index", "```", ""])


def prepare_sources(src: Path) -> tuple[list[str], dict[str, str]]:
    "Write the Sphinx sources into `src`: conf.py, the prepared notebooks, the generated reference pages."
    shutil.copy2(DOCS / "conf.py", src / "conf.py")
    pages, twins, api_pages = [], {}, {}
    for p in sources():
        out = src / page_name(p)
        out.parent.mkdir(parents=True, exist_ok=True)
        if p.suffix != ".ipynb":
            shutil.copy2(p, out)
            continue
        nb = json.loads(p.read_text(encoding="utf-8"))
        page = prepare(nb, str(p))
        m = next((directives(text(c.get("source"))).get("default_exp") for c in nb["cells"] if c["cell_type"] == "code"
                  and "default_exp" in directives(text(c.get("source")))), None)
        if m: api_pages[m] = page_name(p)
        if page_name(p) == "index.ipynb": page["cells"].append(_md(index_toctree([page_name(q) for q in sources()]), "toctree"))
        out.write_text(json.dumps(page, indent=1, ensure_ascii=False), encoding="utf-8")
        pages.append(page_name(p))
        twins[page_name(p)[:-len(".ipynb")] + ".html.md"] = markdown_twin(page)
    (src / "reference").mkdir()
    (src / "reference" / "index.md").write_text(reference_index(api_pages), encoding="utf-8")
    (src / "reference" / "cli.md").write_text(cli_md(), encoding="utf-8")
    (src / "reference" / "yaml.md").write_text(yaml_md(), encoding="utf-8")
    return pages, twins


def build(src: Path, site: Path, jobs: str = "1") -> int:
    _, twins = prepare_sources(src)
    shutil.rmtree(site, ignore_errors=True)
    cmd = [sys.executable, "-m", "sphinx", "-b", "html", "-W", "--keep-going", "-n", "-q", "-j", jobs,
           "-d", str(src.parent / "doctrees"), str(src), str(src.parent / "html")]
    rc = subprocess.run(cmd, cwd=src).returncode  # myst-nb's jupyter_execute/ lands beside html/, in the temp folder
    if rc == 0:
        for rel, md in twins.items(): (src.parent / "html" / rel).write_text(md, encoding="utf-8")
        shutil.copytree(src.parent / "html", site)
    return rc


def main(argv=None) -> int:
    global NBS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=SITE, help="the site's folder (default docs/site)")
    ap.add_argument("--keep", action="store_true", help="keep the prepared sources in docs/_build/src")
    ap.add_argument("--nbs", type=Path, default=NBS, help="the notebooks' folder (default nbs/)")
    ap.add_argument("-j", "--jobs", default="1", help="sphinx-build parallel jobs (default 1)")
    args = ap.parse_args(argv)
    NBS = args.nbs.resolve()
    t0 = time.monotonic()
    try:
        if args.keep:
            shutil.rmtree(DOCS / "_build", ignore_errors=True)
            (DOCS / "_build" / "src").mkdir(parents=True)
            rc = build(DOCS / "_build" / "src", args.out.resolve(), args.jobs)
        else:
            with tempfile.TemporaryDirectory(prefix="ml_prod-docs-") as d:
                (Path(d) / "src").mkdir()
                rc = build(Path(d) / "src", args.out.resolve(), args.jobs)
    except DocsError as e:
        print(f"docs build failed: {e}", file=sys.stderr)
        return 1
    if rc == 0: print(f"docs built in {time.monotonic() - t0:.0f}s: {args.out / 'index.html'} (search works offline)")
    else: print("docs build failed: see the warnings above (each is an error)", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
