#!/usr/bin/env python3
"""Build the docs site from nbs/ and ml_prod/ into docs/site/, offline, with mkdocs-material.

    python docs/build.py              # what `make docs` runs
    python docs/build.py --execute    # run the notebooks first, to show fresh outputs
    python docs/build.py --strict     # fail on any mkdocs warning

nbdev's own docs need Quarto; this does what they do with pip-installable tools. Each notebook in
nbs/ is copied to a temporary folder and prepared the way nbdev prepares it: cells marked `#| hide`
are dropped, `#| export` cells are replaced by the signature and docstring of what they define (as
nbdev's `show_doc` renders them), `#| default_exp` cells are dropped and the remaining `#|`
directive lines removed. Notebooks lose their number prefix (`02_params.ipynb` -> `params.html`,
nbdev's URLs). One API reference page per public module of ml_prod is generated for mkdocstrings.
Notebooks are rendered with the outputs saved in them (mkdocs-jupyter, execute: false).
"""
from __future__ import annotations

import argparse
import ast
import copy
import importlib
import inspect
import os
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
NBS, LIB, DOCS = ROOT / "nbs", ROOT / "ml_prod", ROOT / "docs"
SITE = DOCS / "site"
ASSETS = {".png", ".jpg", ".jpeg", ".gif", ".svg", ".webp", ".css", ".js"}

_NUMBER = re.compile(r"^\d+[a-z]?_")

# nbdev's cell directives are parsed in one place, the README renderer (standard library only)
sys.path.insert(0, str(ROOT / ".ci"))
from readme import directives, strip_directives, text  # noqa: E402


def page_name(nb: Path) -> str:
    "`nbs/02_params.ipynb` -> `params.ipynb`; subfolders are kept."
    rel = nb.relative_to(NBS)
    return str(rel.with_name(_NUMBER.sub("", rel.name)))


def sources() -> list[Path]:
    "The notebooks (and images) of nbs/, skipping `_`/`.` names and checkpoints, as nbdev does."
    return sorted(p for p in NBS.rglob("*") if p.is_file() and (p.suffix == ".ipynb" or p.suffix in ASSETS)
                  and not any(part.startswith(("_", ".")) for part in p.relative_to(NBS).parts))


# ---- show_doc for exported cells ---------------------------------------------------------------

def _is_patch(dec) -> bool:
    f = dec.func if isinstance(dec, ast.Call) else dec
    return getattr(f, "id", getattr(f, "attr", None)) == "patch"


def _documented(source: str, mod) -> list[tuple[str, object]]:
    "(heading, object) for each public function or class an exported cell defines, and each method it patches."
    try: tree = ast.parse(source)
    except SyntaxError: return []
    public, out = set(getattr(mod, "__all__", [])), []
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)): continue
        if not isinstance(node, ast.ClassDef) and any(_is_patch(d) for d in node.decorator_list):
            ann = node.args.args[0].annotation if node.args.args else None
            cls = getattr(mod, ann.id, None) if isinstance(ann, ast.Name) else None
            if cls is not None and ann.id in public and not node.name.startswith("_"):
                out.append((f"{ann.id}.{node.name}", getattr(cls, node.name, None)))
        elif node.name in public: out.append((node.name, getattr(mod, node.name, None)))
    return [(h, o) for h, o in out if o is not None]


def show_doc_markdown(heading: str, obj) -> str | None:
    "nbdev's markdown for `obj` (signature with documented parameters, docstring), without the Quarto-only source link."
    from nbdev.showdoc import BasicMarkdownRenderer
    try: md = BasicMarkdownRenderer(obj)._repr_markdown_()
    except Exception:  # e.g. an annotation only imported under TYPE_CHECKING: show it unevaluated
        try: sig = str(inspect.signature(obj))
        except (TypeError, ValueError): sig = ""
        doc = inspect.getdoc(obj) or ""
        md = f"### {heading}\n\n```python\n{getattr(obj, '__name__', heading)}{sig}\n```\n\n" + (f"*{doc}*" if doc else "")
    lines = [l for l in md.strip().splitlines() if not l.startswith("[source](")]
    lines = [f"### {heading}" if l.startswith("### ") else l for l in lines]
    return "\n".join(lines).strip()


# ---- notebooks ---------------------------------------------------------------------------------

def execute(nb: dict, path: Path) -> dict:
    import nbclient, nbformat
    node = nbformat.from_dict(copy.deepcopy(nb))
    nbclient.NotebookClient(node, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    return json.loads(nbformat.writes(node))


def prepare(nb: dict, renames: dict[str, str]) -> dict:
    "The notebook as its docs page shows it (see the module docstring)."
    cells, module = [], None
    for cell in nb["cells"]:
        src = text(cell.get("source"))
        if cell["cell_type"] == "markdown":
            for old, new in renames.items(): src = src.replace(f"({old})", f"({new})").replace(f"({old}#", f"({new}#")
            cells.append({**cell, "source": src})
            continue
        if cell["cell_type"] != "code": continue
        d = directives(src)
        if "default_exp" in d: module = d["default_exp"]
        if "hide" in d or d.get("include") == "false" or "default_exp" in d or "exporti" in d: continue
        if "export" in d:
            target = d["export"] or module
            try: mod = importlib.import_module(f"ml_prod.{target}") if target else None
            except Exception as e:
                print(f"  warning: cannot import ml_prod.{target} for its docs: {e!r}", file=sys.stderr)
                mod = None
            for heading, obj in _documented(strip_directives(src), mod) if mod else []:
                if md := show_doc_markdown(heading, obj):
                    cells.append({"cell_type": "markdown", "id": f"{cell.get('id', 'x')}-{len(cells)}", "metadata": {}, "source": md})
            continue
        cell = {**cell, "source": strip_directives(src), "metadata": copy.deepcopy(cell.get("metadata", {}))}
        if d.get("echo") == "false": cell["metadata"].setdefault("tags", []).append("remove_input")
        if d.get("output") == "false": cell["outputs"] = []
        if cell["source"].strip() or cell.get("outputs"): cells.append(cell)
    return {**nb, "cells": cells}


# ---- API reference -----------------------------------------------------------------------------

def modules() -> list[str]:
    "Public modules of ml_prod, dotted below the package (`jobs.submit`); not `_modidx` or other private ones."
    names = (p.relative_to(LIB).with_suffix("") for p in LIB.rglob("*.py") if "examples" not in p.parts)
    return sorted(".".join(n.parts) for n in names if not any(part.startswith("_") for part in n.parts))


def summary(module: str) -> str:
    doc = ast.get_docstring(ast.parse((LIB / f"{module.replace('.', '/')}.py").read_text(encoding="utf-8"))) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def write_api(dst: Path) -> list[str]:
    (dst / "api").mkdir()
    rows = [f"| [`ml_prod.{m}`]({m}.md) | {summary(m)} |" for m in modules()]
    (dst / "api" / "index.md").write_text("# API reference\n\nEvery public name of each module of ml_prod.\n\n"
                                          "| module | what it is for |\n|---|---|\n" + "\n".join(rows) + "\n")
    for m in modules(): (dst / "api" / f"{m}.md").write_text(f"# ml_prod.{m}\n\n::: ml_prod.{m}\n")
    return ["api/index.md", *[f"api/{m}.md" for m in modules()]]


# ---- build -------------------------------------------------------------------------------------

def nav(pages: list[str], api: list[str]) -> list:
    top = [p for p in pages if "/" not in p and p.endswith(".ipynb")]
    items = [{"Home": "index.ipynb"}] if "index.ipynb" in top else []
    items.append({"Modules": [p for p in top if p != "index.ipynb"]})
    folders = sorted({p.split("/")[0] for p in pages if "/" in p})
    for f in folders:
        items.append({f.replace("_", " ").capitalize(): [p for p in pages if p.startswith(f + "/") and p.endswith(".ipynb")]})
    items.append({"API reference": api})
    return [i for i in items if list(i.values())[0]]


def build(tmp: Path, run: bool, strict: bool) -> int:
    src = tmp / "pages"
    src.mkdir()
    files = sources()
    renames = {str(p.relative_to(NBS)): page_name(p).replace(".ipynb", ".html") for p in files if p.suffix == ".ipynb"}
    pages = []
    for p in files:
        out = src / page_name(p)
        out.parent.mkdir(parents=True, exist_ok=True)
        if p.suffix != ".ipynb":
            shutil.copy2(p, out)
            continue
        print(f"  {p.relative_to(ROOT)} -> {out.relative_to(src)}")
        nb = json.loads(p.read_text(encoding="utf-8"))
        if run: nb = execute(nb, p)
        out.write_text(json.dumps(prepare(nb, renames), indent=1, ensure_ascii=False), encoding="utf-8")
        pages.append(page_name(p))
    api = write_api(src)
    cfg = yaml.safe_load((DOCS / "mkdocs.yml").read_text(encoding="utf-8"))
    cfg.update(docs_dir=str(src), site_dir=str(SITE), nav=nav(pages, api))
    for plugin in cfg["plugins"]:
        if isinstance(plugin, dict) and "mkdocstrings" in plugin:
            plugin["mkdocstrings"]["handlers"]["python"]["paths"] = [str(ROOT)]  # ml_prod from this tree
    (tmp / "mkdocs.yml").write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    cmd = [sys.executable, "-m", "mkdocs", "build", "--clean", "-f", str(tmp / "mkdocs.yml")] + ["--strict"] * strict
    return subprocess.run(cmd, cwd=tmp, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}).returncode


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--execute", action="store_true", help="execute each notebook (in nbs/) before rendering it")
    ap.add_argument("--strict", action="store_true", help="treat mkdocs warnings as errors")
    ap.add_argument("--keep", action="store_true", help="keep the prepared pages in docs/_build/ to inspect them")
    args = ap.parse_args(argv)
    if args.keep:
        tmp = DOCS / "_build"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        rc = build(tmp, args.execute, args.strict)
    else:
        with tempfile.TemporaryDirectory(prefix="ml_prod-docs-") as d: rc = build(Path(d), args.execute, args.strict)
    if rc == 0: print(f"docs built: {(SITE / 'index.html').relative_to(ROOT)} (open it in a browser; search works offline)")
    return rc


if __name__ == "__main__":
    sys.exit(main())
