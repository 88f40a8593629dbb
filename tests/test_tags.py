"""Every `ml_prod.*` key of the job record (MLflow tags, metrics, the registry's events experiment) is named
once, in `ml_prod/tracking/tags.py`; no other module spells one as a string literal.

Scanned: the exported cells (`#| export`, `#| exports`, `#| exporti`) of every notebook under nbs/ except
nbs/api/12_tracking_tags.ipynb (the source of ml_prod/tracking/tags.py), and every .py under ml_prod/ except
ml_prod/tracking/tags.py and ml_prod/_modidx.py (nbdev's index, generated). Python is read with `tokenize`,
so imports and comments never count; only string tokens do (f-strings included). A string offends when

* it starts with `ml_prod.` (`"ml_prod.error"`, `f"ml_prod.input.{k}.sha256"`, `"ml_prod."`), or
* it holds an MLflow search filter on such a key (``f"tags.`ml_prod.pipeline` = '{name}'"``),

unless that dotted name is a module path: an ml_prod module, or a top-level name defined in one
(`"ml_prod.runtime.cluster.loopback_hook"`, `"ml_prod.serving:app_builder"`, `f"ml_prod.report: ..."`).
Modules are found by reading files, not importing: the .py files under ml_prod/ and the `default_exp`
of the notebooks. The whole dotted name must resolve, not only its start: `ml_prod.tune` is a module,
but `"ml_prod.tune.trial_id"` is a tag. A name ending in a dot (`"ml_prod.step."`) is a key prefix, never a module path.
"""
import ast, io, json, re, tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP = {Path("ml_prod/tracking/tags.py"), Path("ml_prod/_modidx.py")}  # the module that names the keys, and nbdev's index
SKIP_NBS = {Path("nbs/api/12_tracking_tags.ipynb")}                    # the notebook tags.py is exported from
EXPORT = re.compile(r"^\s*#\|\s*export", re.M)
DEFAULT_EXP = re.compile(r"^\s*#\|\s*default_exp\s+(\S+)", re.M)
LEADING = re.compile(r"ml_prod(?:\.\w+)*\.?")                            # the dotted name a string starts with
IN_FILTER = re.compile(r"(?:tags|metrics|params)\.`(ml_prod(?:\.\w+)*\.?)")  # a key in a search filter

def strings(src:str):
    "(line, body) of each string literal in Python source `src`; an f-string's body keeps its {fields}."
    lines, fstarts = io.StringIO(src).readlines(), []  # as tokenize counts rows
    offset = lambda row, col: sum(map(len, lines[:row - 1])) + col
    for t in tokenize.generate_tokens(io.StringIO(src).readline):
        name = tokenize.tok_name[t.type]
        if name == "FSTRING_START": fstarts.append(t.start); continue  # Python 3.12+: an f-string is several tokens
        if name == "FSTRING_END": start = fstarts.pop(); text = src[offset(*start):offset(*t.end)]
        elif t.type == tokenize.STRING: start, text = t.start, t.string
        else: continue
        q = re.match(r"[A-Za-z]*('''|\"\"\"|'|\")", text)
        yield start[0], text[len(q.group(0)):-len(q.group(1))]

def _names(src:str) -> set[str]:
    "Top-level names defined in `src`."
    try: tree = ast.parse(src)
    except SyntaxError: return set()
    out = set()
    for n in tree.body:
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)): out.add(n.name)
        for t in getattr(n, "targets", []) + [getattr(n, "target", None)]:
            if isinstance(t, ast.Name): out.add(t.id)
    return out

def notebooks(root:Path) -> list[Path]:
    "The notebooks under nbs/, checkpoints and other hidden folders left out."
    return sorted(p for p in (root/"nbs").rglob("*.ipynb") if not any(d.startswith(".") for d in p.relative_to(root).parts))

def exported_cells(nb:Path) -> list[tuple[int, str]]:
    "(index, source) of the notebook's exported code cells."
    cells = json.loads(nb.read_text())["cells"]
    srcs = [(i, "".join(c["source"])) for i, c in enumerate(cells) if c["cell_type"] == "code"]
    return [(i, s) for i, s in srcs if EXPORT.search(s)]

def modules(root:Path) -> dict[str, set[str]]:
    "Dotted name -> top-level names of each ml_prod module, from its .py file or from the notebook that exports it."
    out = {}
    for p in (root/"ml_prod").rglob("*.py"):
        parts = p.relative_to(root).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = _names(p.read_text())
    for nb in notebooks(root):
        cells = json.loads(nb.read_text())["cells"]
        for m in [m for c in cells if (m := DEFAULT_EXP.search("".join(c["source"])))][:1]:
            mod = "ml_prod." + m.group(1)
            out[mod] = out.get(mod, set()) | _names("\n".join(s for _, s in exported_cells(nb)))
            for i in range(1, mod.count(".")): out.setdefault(".".join(mod.split(".")[:i + 1]), set())  # its packages
    return out

def is_module_path(name:str, mods:dict) -> bool:
    mod, _, attr = name.rpartition(".")
    return not name.endswith(".") and (name in mods or attr in mods.get(mod, ()))

def offences(root:Path=ROOT) -> list[str]:
    "'file:line: literal' for each string that spells an ml_prod record key."
    mods, sources = modules(root), []
    for p in sorted((root/"ml_prod").rglob("*.py")):
        if p.relative_to(root) not in SKIP: sources.append((str(p.relative_to(root)), p.read_text()))
    for nb in notebooks(root):
        if nb.relative_to(root) not in SKIP_NBS: sources += [(f"{nb.relative_to(root)}:cell {i}", s) for i, s in exported_cells(nb)]
    out = []
    for where, src in sources:
        for line, body in strings(src):
            names = ([LEADING.match(body).group(0)] if body.startswith("ml_prod.") else []) + IN_FILTER.findall(body)
            if any(not is_module_path(n, mods) for n in names): out.append(f"{where}:{line}: {body[:100]!r}")
    return out

def test_no_record_keys_outside_tags():
    bad = offences()
    assert not bad, (f"{len(bad)} string(s) spell an ml_prod.* record key; use the constants and helpers of "
                     "ml_prod.tracking.tags instead (or add the key there):\n" + "\n".join(bad))
