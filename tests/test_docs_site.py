"""The docs site (docs/build.py) in a real browser: headless Debian Chromium driven by Playwright.

The site is built from nbs/ into the test's tmp folder, served from 127.0.0.1 by http.server, and opened
in Chromium: every internal link resolves (pages, anchors and images), searching `run_notebook` lands on
its reference, and the fraud tutorial shows its plot. Screenshots go to the test's tmp folder (the README's,
nbs/images/docs_jobs_submit.png, is taken again and written there with ML_PROD_UPDATE_SCREENSHOT=1). The site is
built by `ml_prod docs build`, which runs docs/build.py as `make docs` does. Without
/usr/bin/chromium the browser tests are skipped, except in CI (`CI` set), where they fail.
"""
from __future__ import annotations

import base64, functools, http.server, json, os, re, shutil, struct, subprocess, sys, threading
from pathlib import Path
from urllib.parse import urldefrag, urlparse

import pytest

ROOT = Path(__file__).resolve().parents[1]


def build(out: Path, nbs: Path | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "docs" / "build.py"), "--out", str(out)] + (["--nbs", str(nbs)] if nbs else [])
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    "The site as `ml_prod docs build` builds it (the command runs docs/build.py, as `make docs` does)."
    out = tmp_path_factory.mktemp("docs") / "site"
    r = subprocess.run([str(Path(sys.executable).parent / "ml_prod"), "docs", "build", "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT / "nbs", timeout=600)  # found from a folder below the root
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def url(site):
    handler = functools.partial(type("Quiet", (http.server.SimpleHTTPRequestHandler,), {"log_message": lambda *a: None}),
                                directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


@pytest.fixture
def page(browser, url):
    ctx = browser.new_context(viewport={"width": 1200, "height": 900})
    # only the local server may be reached: anything else is answered with an error, and counted
    outside = []
    ctx.route(re.compile(r"^(?!http://127\.0\.0\.1:).*"), lambda route: (outside.append(route.request.url), route.abort()))
    pg = ctx.new_page()
    yield pg
    ctx.close()
    assert not [u for u in outside if not u.startswith(("data:", "about:"))], f"the site requested outside URLs: {outside}"


def test_every_internal_link_resolves(page, url, tmp_path):
    seen, todo, anchors, broken = set(), [url + "index.html"], [], []
    while todo:
        target = todo.pop()
        if target in seen: continue
        seen.add(target)
        r = page.goto(target)
        if r is None or r.status != 200:
            broken.append((target, r and r.status))
            continue
        if not target.endswith(".html"): continue
        for src, ok in page.eval_on_selector_all("img", "els => els.map(e => [e.currentSrc, e.complete && e.naturalWidth > 0])"):
            if not ok: broken.append((target, f"image {src} did not load"))
        for href in page.eval_on_selector_all("a[href]", "els => els.map(e => e.href)"):
            base, frag = urldefrag(href)
            if not base.startswith(url): continue
            if frag: anchors.append((target, base, frag))
            todo.append(base)
    page.screenshot(path=str(tmp_path / "last_page.png"))
    ids: dict[str, set] = {}
    for origin, base, frag in anchors:
        if base not in ids:
            page.goto(base)
            ids[base] = set(page.eval_on_selector_all("[id]", "els => els.map(e => e.id)"))
        if frag not in ids[base]: broken.append((origin, f"{base}#{frag}: no such anchor"))
    assert len([s for s in seen if s.endswith(".html")]) > 40, f"only {len(seen)} pages reached from index.html"
    assert not broken, broken[:20]


def test_search_finds_run_notebook(page, url, tmp_path):
    from fastcore.docments import docments
    from ml_prod.jobs.submit import run_notebook
    page.goto(url + "index.html")
    page.fill("input[name=q]", "run_notebook")
    page.press("input[name=q]", "Enter")
    hit = page.locator("#search-results a", has_text="run_notebook").first
    hit.wait_for(timeout=30_000)
    page.screenshot(path=str(tmp_path / "search.png"), full_page=True)
    page.locator("#search-results a[href*='ml_prod.jobs.submit.run_notebook']").first.click()
    page.wait_for_load_state()
    assert urlparse(page.url).path == "/api/jobs_submit.html" and urlparse(page.url).fragment == "ml_prod.jobs.submit.run_notebook"
    ref = page.locator("[id='ml_prod.jobs.submit.run_notebook']")
    assert ref.is_visible()
    entry = page.locator("dl:has(> dt[id='ml_prod.jobs.submit.run_notebook'])")
    shown = entry.inner_text()
    for name, d in docments(run_notebook, full=True).items():  # each parameter's trailing comment in the source
        if name != "return" and d["docment"]: assert name in shown and d["docment"] in shown, (name, shown)
    entry.screenshot(path=str(tmp_path / "run_notebook.png"))


def _saved_pngs(nb: Path) -> list[bytes]:
    cells = json.loads(nb.read_text())["cells"]
    return [base64.b64decode(o["data"]["image/png"]) for c in cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]


def test_tutorial_shows_its_plot(page, url, tmp_path):
    saved = _saved_pngs(ROOT / "nbs" / "tutorials" / "fraud_end_to_end.ipynb")
    assert saved, "the tutorial notebook has no saved plot (make tutorial saves its outputs)"
    page.goto(url + "tutorials/fraud_end_to_end.html")
    img = page.locator(".cell_output img").first
    img.scroll_into_view_if_needed()
    assert img.evaluate("e => e.complete && e.naturalWidth") > 100
    body = page.request.get(img.evaluate("e => e.currentSrc")).body()
    assert body in saved  # the very image the executed notebook saved
    page.screenshot(path=str(tmp_path / "tutorial.png"), full_page=True)
    img.screenshot(path=str(tmp_path / "tutorial_plot.png"))


SCREENSHOT = ROOT / "nbs" / "images" / "docs_jobs_submit.png"  # shown in the README


def _png_size(png: bytes) -> tuple[int, int]: return struct.unpack(">II", png[16:24])  # the IHDR chunk's width, height


def test_readme_screenshot_is_a_page_of_the_site(page, url, tmp_path):
    "The README's screenshot is the top of api/jobs_submit.html at 1200x720; `ML_PROD_UPDATE_SCREENSHOT=1` writes it again."
    page.set_viewport_size({"width": 1200, "height": 720})
    page.goto(url + "api/jobs_submit.html")
    assert page.locator("h1", has_text="jobs.submit").is_visible()
    shot = tmp_path / SCREENSHOT.name
    page.screenshot(path=str(shot))
    if os.environ.get("ML_PROD_UPDATE_SCREENSHOT"): shutil.copy(shot, SCREENSHOT)
    assert f"]({SCREENSHOT.relative_to(ROOT)})" in (ROOT / "README.md").read_text()
    assert SCREENSHOT.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", SCREENSHOT
    assert _png_size(SCREENSHOT.read_bytes()) == _png_size(shot.read_bytes()) == (1200, 720)


def test_docs_serve_shows_the_site_on_localhost(site):
    "`ml_prod docs serve --dir SITE --port 0` serves the built site on 127.0.0.1 (port 0: any free one) until stopped."
    from urllib.request import urlopen
    p = subprocess.Popen([str(Path(sys.executable).parent / "ml_prod"), "docs", "serve", "--dir", str(site), "--port", "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = p.stdout.readline()
        base = re.search(r"at (http://127\.0\.0\.1:\d+/)", line)
        assert base, line
        assert urlopen(base[1] + "index.html", timeout=30).read() == (site / "index.html").read_bytes()
    finally:
        p.terminate()
        p.wait(timeout=30)


def test_cli_reference_lists_every_command(site):
    out = subprocess.run([str(Path(sys.executable).parent / "ml_prod"), "--help"], capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}).stdout
    commands = re.findall(r"^│ (\w[\w-]*)\s", out, re.M)
    assert len(commands) > 5, out
    html = re.sub(r"<[^>]+>", "", (site / "reference" / "cli.html").read_text())  # the text a reader sees
    for c in commands: assert f"ml_prod {c}" in html, c


def test_module_docstring_links_exist(site):
    import ast
    links = {}
    for py in (ROOT / "ml_prod").rglob("*.py"):
        doc = ast.get_docstring(ast.parse(py.read_text())) or ""
        if m := re.search(r"^Docs: https://ml-prod\.github\.io/ml_prod/(\S+)$", doc, re.M): links[py] = m[1]
    assert len(links) > 30
    missing = {str(p.relative_to(ROOT)): rel for p, rel in links.items() if not (site / rel).is_file()}
    assert not missing, missing


def test_build_fails_on_broken_link_and_error_output(tmp_path):
    nbs = tmp_path / "nbs"
    shutil.copytree(ROOT / "nbs", nbs, symlinks=False)
    nb_path = nbs / "explanations" / "architecture.ipynb"
    nb = json.loads(nb_path.read_text())
    nb["cells"].append({"cell_type": "markdown", "id": "broken", "metadata": {}, "source": "See [the page](no_such_page.ipynb)."})
    nb_path.write_text(json.dumps(nb))
    r = build(tmp_path / "site1", nbs)
    assert r.returncode != 0 and "no_such_page" in r.stdout + r.stderr, r.stdout[-2000:] + r.stderr[-2000:]
    nb["cells"][-1] = {"cell_type": "code", "id": "err", "metadata": {}, "execution_count": 1, "source": "1/0",
                       "outputs": [{"output_type": "error", "ename": "ZeroDivisionError", "evalue": "division by zero", "traceback": []}]}
    nb_path.write_text(json.dumps(nb))
    r = build(tmp_path / "site2", nbs)
    assert r.returncode != 0 and "ZeroDivisionError" in r.stderr, r.stderr[-2000:]
