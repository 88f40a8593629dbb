#!/usr/bin/env python3
"""Render README.md from nbs/index.ipynb without Quarto.

    python .ci/readme.py           # write README.md
    python .ci/readme.py --check   # exit 1 if README.md is not what the notebook renders to

Markdown cells are copied verbatim. Code cells become ```python fences with nbdev's `#|` directive
lines removed; cells marked `#| hide` (or `#| include: false`) are skipped, `#| echo: false` keeps
only the outputs, `#| output: false` only the source. Outputs: text/markdown is inserted as markdown,
text/plain and streams as plain ``` fences; images and HTML-only outputs are left out. An error output
fails the render: the README must not show a traceback. Only the standard library is used and the
output depends on nothing but the notebook, so the check gives the same answer on every machine.
"""
from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "nbs" / "index.ipynb"
README = ROOT / "README.md"
HEADER = "<!-- Generated from nbs/index.ipynb by .ci/readme.py (`make readme`): edit the notebook, not this file. -->"
STALE = "README.md is stale: run `make readme`"

_DIRECTIVE = re.compile(r"^\s*#\s*\|\s*(.*?)\s*$")
_KEY_VALUE = re.compile(r"([\w-]+)\s*:?\s*(.*)")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def text(value) -> str:
    "A notebook string field, which nbformat stores as a string or a list of lines."
    return "".join(value) if isinstance(value, list) else (value or "")


def directives(source: str) -> dict[str, str]:
    "nbdev directives of a cell, e.g. {'hide': '', 'echo': 'false'}; `#|hide` and `#| hide` alike."
    out = {}
    for line in source.splitlines():
        if (m := _DIRECTIVE.match(line)) and (kv := _KEY_VALUE.match(m.group(1))):
            out[kv.group(1)] = kv.group(2).strip()
    return out


def strip_directives(source: str) -> str:
    return "\n".join(l for l in source.splitlines() if not _DIRECTIVE.match(l)).strip("\n")


def fence(body: str, lang: str = "") -> str:
    body = body.rstrip("\n")
    ticks = "```"
    while ticks in body: ticks += "`"  # an output that itself holds a fence
    return f"{ticks}{lang}\n{body}\n{ticks}"


def render_outputs(outputs: list, where: str) -> list[str]:
    "Markdown blocks for a code cell's outputs; consecutive stream outputs share one fence."
    blocks, stream = [], []

    def flush():
        if stream: blocks.append(fence("".join(stream)))
        stream.clear()

    for o in outputs:
        kind = o.get("output_type")
        if kind == "stream":
            stream.append(_ANSI.sub("", text(o.get("text"))))
            continue
        flush()
        if kind == "error":
            raise SystemExit(f"{where} has an error output ({o.get('ename')}: {o.get('evalue')}); "
                             "fix the notebook and execute it again")
        data = o.get("data", {})
        if "text/markdown" in data: blocks.append(text(data["text/markdown"]).strip("\n"))
        elif "text/plain" in data and not any(k.startswith("image/") for k in data):
            blocks.append(fence(_ANSI.sub("", text(data["text/plain"]))))
    flush()
    return blocks


def render(nb: dict) -> str:
    blocks = [HEADER]
    for i, cell in enumerate(nb["cells"]):
        source = text(cell.get("source"))
        if cell["cell_type"] == "markdown":
            if source.strip(): blocks.append(source.strip("\n"))
            continue
        if cell["cell_type"] != "code": continue  # raw cells (front matter) are not part of the README
        d = directives(source)
        if "hide" in d or d.get("include") == "false": continue
        code = strip_directives(source)
        if code.strip() and d.get("echo") != "false": blocks.append(fence(code, "python"))
        if d.get("output") != "false": blocks += render_outputs(cell.get("outputs", []), f"nbs/index.ipynb cell {i}")
    return "\n\n".join(blocks) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if README.md differs from the rendering")
    args = ap.parse_args(argv)
    new = render(json.loads(NOTEBOOK.read_text(encoding="utf-8")))
    if args.check:
        old = README.read_text(encoding="utf-8") if README.exists() else ""
        if old == new: return 0
        diff = list(difflib.unified_diff(old.splitlines(), new.splitlines(), "README.md", "rendered nbs/index.ipynb", lineterm="", n=1))
        print("\n".join(diff[:40] + (["..."] if len(diff) > 40 else [])), file=sys.stderr)
        print(STALE, file=sys.stderr)
        return 1
    README.write_text(new, encoding="utf-8", newline="\n")
    print(f"wrote {README.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
