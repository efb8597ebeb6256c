"""The docs site as a reader without network sees it, in a real browser.

The site is served from 127.0.0.1 by this process, and headless Chromium is told that no other
host exists (``--host-resolver-rules``). Each page with math must typeset it with the MathJax
the site serves itself, raise no TeX error, and leave no raw TeX in its text, sidebars included.
The checks that need no browser read the built HTML: nothing loaded from another host, a
notebook and a source link on every tutorial page, the tables, lists and definition lists that
once broke.

Which site: ``MINIDORA_DOCS_SITE=<dir>`` names one already built (``make docs`` runs this file on
the site it has just built); otherwise the site is built here, into a temporary folder, with
``MINIDORA_TUTORIAL_SIZE=small`` (about a minute and a half on two cores).
"""

import functools
import html
import html.parser
import http.server
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = [p.stem for p in sorted((ROOT / "tutorials").glob("[0-9][0-9]_*.py"))]
MATH_PAGES = ["math/lora/", "math/dora/", "math/nf4/", "format/"] + [
    f"tutorials/{stem}/" for stem in TUTORIALS]
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


# --- the site, its server and the browser -----------------------------------------------------

@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    given = os.environ.get("MINIDORA_DOCS_SITE")
    if given:
        path = Path(given).resolve()
        assert (path / "index.html").is_file(), f"MINIDORA_DOCS_SITE={given} holds no built site"
        return path
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("the docs toolchain is not installed (pip install -r docs/requirements.txt); "
                    "`make docs` builds the site and then runs these tests on it")
    path = tmp_path_factory.mktemp("site")
    env = dict(os.environ, MINIDORA_TUTORIAL_SIZE="small")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q",
                           "-d", str(path)], cwd=ROOT, env=env, text=True, capture_output=True,
                          timeout=1200)
    assert done.returncode == 0, f"mkdocs build:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return path


class Server:
    """The site over HTTP on 127.0.0.1, remembering each path asked for."""

    def __init__(self, root: Path):
        self.requested = []
        requested = self.requested

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):
                requested.append(self.path)

        self.httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def server(site):
    served = Server(site)
    yield served
    served.httpd.shutdown()
    served.httpd.server_close()


@pytest.fixture(scope="module")
def chromium():
    found = os.environ.get("MINIDORA_CHROMIUM") or next(filter(None, map(shutil.which, BROWSERS)),
                                                        None)
    if not found:
        pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium); "
                    "set MINIDORA_CHROMIUM to use another build")
    return found


def offline_chromium(chromium: str, profile: Path, *args: str) -> list:
    """A headless Chromium command that resolves 127.0.0.1 and no other host."""
    return [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--disable-extensions", f"--user-data-dir={profile}",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", *args]


def rendered_dom(chromium: str, url: str, profile: Path) -> str:
    """The page's DOM once its scripts have run (10 s of virtual time: MathJax is done)."""
    cmd = offline_chromium(chromium, profile, "--window-size=1280,2000",
                           "--virtual-time-budget=10000", "--dump-dom", url)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "</html>" in done.stdout, done.stderr[-3000:]
    return done.stdout


class Text(html.parser.HTMLParser):
    """The text a reader sees as text: no code, no scripts, no typeset math, nothing hidden (a
    notebook cell keeps a hidden copy of its code for the copy button)."""

    SKIP = {"script", "style", "pre", "code", "textarea", "svg", "mjx-container", "template"}
    SKIP_CLASS = {"clipboard-copy-txt"}
    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
            "track", "wbr"}

    def __init__(self):
        super().__init__()
        self.depth_skipped = 0
        self.parts = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        hidden = "hidden" in attrs or self.SKIP_CLASS & set((attrs.get("class") or "").split())
        if (tag in self.SKIP or hidden or self.depth_skipped) and tag not in self.VOID:
            self.depth_skipped += 1

    def handle_endtag(self, tag):
        if self.depth_skipped:
            self.depth_skipped -= 1

    def handle_data(self, data):
        if not self.depth_skipped:
            self.parts.append(data)


def visible_text(dom: str) -> str:
    parser = Text()
    parser.feed(dom)
    return " ".join(parser.parts)


RAW_TEX = re.compile(r"\\\(|\\\)|\\\[|\\\]|\$\$|\$[^\s$][^$]*\$|\\[A-Za-z]{2,}")


# --- in the browser -------------------------------------------------------------------------------

@pytest.mark.parametrize("page", MATH_PAGES)
def test_page_typesets_its_math_offline(page, site, server, chromium, tmp_path):
    before = len(server.requested)
    dom = rendered_dom(chromium, server.url + page, tmp_path / "profile")
    requested = server.requested[before:]
    formulas = dom.count("<mjx-container")
    assert formulas > 0, f"{page}: no formula typeset"
    if not page.startswith("tutorials/"):  # arithmatex marks every formula of a Markdown page
        assert formulas == (site / page / "index.html").read_text().count('class="arithmatex"')
    assert "<mjx-merror" not in dom, f"{page}: MathJax reports a TeX error"
    raw = sorted({m.group(0) for m in RAW_TEX.finditer(visible_text(dom))})
    assert not raw, f"{page}: raw TeX left in the text: {raw[:20]}"
    assert "/javascripts/mathjax/tex-chtml.js" in requested
    # the glyphs are drawn: their CSS asked for the site's own fonts
    assert [r for r in requested if r.endswith("/woff-v2/MathJax_Main-Regular.woff")], requested


# --- in the built HTML ----------------------------------------------------------------------------

def pages(site: Path):
    return sorted(p for p in site.rglob("*.html") if "javascripts" not in p.parts)


EXTERNAL = re.compile(
    r"""<(?:script|img|iframe|source|audio|video|embed)\b[^>]*\bsrc=["']?(?:https?:)?//"""
    r"""|<link\b(?=[^>]*\brel=["']?(?:stylesheet|preload|modulepreload|icon|prefetch))"""
    r"""[^>]*\bhref=["']?(?:https?:)?//"""
    r"""|\bimport\(\s*["'](?:https?:)?//|url\(\s*["']?(?:https?:)?//""", re.I)


def test_no_page_loads_anything_from_another_host(site):
    offenders = {}
    for page in pages(site):
        found = EXTERNAL.findall(page.read_text(errors="replace"))
        if found:
            offenders[str(page.relative_to(site))] = found[:3]
    assert not offenders, offenders


def test_mathjax_is_the_pinned_version(site):
    lock = json.loads((ROOT / "docs" / "package-lock.json").read_text())
    pinned = lock["packages"]["node_modules/mathjax"]["version"]
    bundle = (site / "javascripts" / "mathjax" / "tex-chtml.js").read_text()
    assert f'.VERSION="{pinned}"' in bundle
    assert list((site / "javascripts" / "mathjax" / "output" / "chtml" / "fonts" / "woff-v2")
                .glob("*.woff"))


@pytest.mark.parametrize("stem", TUTORIALS)
def test_tutorial_page_offers_its_notebook_and_source(site, stem):
    import nbformat

    folder = site / "tutorials" / stem
    page = (folder / "index.html").read_text()
    assert f'href="{stem}.ipynb" download' in page
    assert f'href="{stem}.py"' in page
    assert page.index('class="minidora-downloads"') < page.index("</h1>") + 200  # under the title
    nb = nbformat.read(folder / f"{stem}.ipynb", as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code[0].metadata["tags"] == ["install"] and "%pip install minidora" in code[0].source
    assert not any(cell.get("outputs") for cell in code), "the download is not executed"
    assert (folder / f"{stem}.py").read_text().startswith("# ---\n# jupyter:")  # jupytext


@pytest.mark.parametrize("stem", TUTORIALS)
def test_tutorial_page_links_resolve(site, stem):
    folder = site / "tutorials" / stem
    hrefs = re.findall(r'<a\s[^>]*?href="([^"#]+)', (folder / "index.html").read_text())
    broken = []
    for href in hrefs:
        if re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", href):
            continue  # another site: not this test's business
        target = (site / href.lstrip("/")) if href.startswith("/") else (folder / href)
        if not (target / "index.html" if href.endswith("/") else target).exists():
            broken.append(href)
    assert not broken, f"{stem}: links to nothing: {broken}"


def test_table_of_contents_has_no_tex(site):
    link = re.compile(r'class="md-nav__link[^"]*"[^>]*>\s*<span class="md-ellipsis">(.*?)</span>',
                      re.S)
    titles = {html.unescape(t).strip() for page in pages(site)
              for t in link.findall(page.read_text())}
    assert "Scaling: α/r and rsLoRA" in titles
    assert "4. The scaling: α / r and rsLoRA's α / √r" in titles
    raw = sorted(t for t in titles if RAW_TEX.search(t) or "$" in t)
    assert not raw, raw


def test_the_pages_that_once_broke(site):
    fmt = (site / "format" / "index.html").read_text()
    table = fmt[fmt.index("<table>"):fmt.index("</table>")]
    assert table.count("<tr>") == 7, "the NF4Weight table lost rows to a | in a formula"
    assert r"\max \lvert x\rvert" in table
    verify = (site / "verify" / "index.html").read_text()
    assert verify.count("<dt>") == 3 and "<dd>" in verify, "definition lists are not enabled"
    demo = (site / "demo" / "index.html").read_text()
    steps = demo[demo.index('<h2 id="what-it-does">'):demo.index('<h3 id="the-texts">')]
    assert steps.count("<ol>") == 1 and steps.count("<ul>") == 1, "the demo's steps renumber"


def test_toc_tex_to_text():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    assert hooks.tex_to_text(r"Scaling: \(\alpha/r\) and rsLoRA") == "Scaling: α/r and rsLoRA"
    assert hooks.tex_to_text(r"4. The picture: $\Delta D$ against $\Delta M$") == \
        "4. The picture: ΔD against ΔM"
    assert hooks.tex_to_text(r"Without building \(W'\)") == "Without building W′"
    assert hooks.tex_to_text(r"$\lVert W_0\rVert_c$, $x^2$, $\text{dropout}(x)$") == \
        "‖W₀‖_c, x², dropout(x)"
    assert hooks.tex_to_text("Merging: no cost at inference") == "Merging: no cost at inference"


def test_docstring_math_is_rewritten_for_the_api_pages():
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        from griffe_rst_math import rewrite
    finally:
        sys.path.remove(str(ROOT / "docs"))
    doc = ("Intro:\n\n.. math::  y = x W^\\top\n           + b\n\n"
           "per block :math:`a_b = \\max |x|`, "
           "see :func:`~minidora.nf4.quantize` and :class:`NF4Weight`.")
    assert rewrite(doc) == ("Intro:\n\n\n$$\ny = x W^\\top\n+ b\n$$\n\n\n"
                            "per block $a_b = \\max |x|$, "
                            "see `quantize` and `NF4Weight`.")
