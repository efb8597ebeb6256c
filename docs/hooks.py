"""mkdocs hooks: what the site needs beyond mkdocs-material and its plugins.

- The tutorials execute at build time without installing the package. mkdocs-jupyter runs each
  one in a Jupyter kernel started by this process, and the kernel inherits our environment; so
  we put the repository root on PYTHONPATH (``import minidora`` finds the checkout, with its
  compiled extension when built) and choose the tutorial size:
  ``MINIDORA_TUTORIAL_SIZE=small mkdocs build --strict`` renders the quick versions; the
  default is the full size, as a reader running them would see them.
- MathJax is served by the site itself, so that formulas render with no network. It comes
  from the npm package pinned in ``docs/package-lock.json`` (``npm ci`` in ``docs/``; run here
  when ``docs/node_modules`` lacks it or holds another version) and is copied into
  ``site/javascripts/mathjax/``.
- Each tutorial page links, at its top, to its notebook (an ``.ipynb`` made here with jupytext,
  with a first code cell that installs minidora) and to its jupytext source (the ``.py`` that
  mkdocs-jupyter's ``include_source`` copies next to the page). The tutorial's own relative
  links are made relative to the page.
- Table-of-contents titles are plain text: the sidebars are not typeset, so TeX in a heading
  becomes Unicode there (``$\\alpha / \\sqrt r$`` -> ``α / √r``).

``tutorial_notebook`` is imported by tests/test_notebooks.py, so this module imports nothing
from mkdocs at the top.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
TUTORIALS = ROOT / "tutorials"

MATHJAX = DOCS / "node_modules" / "mathjax" / "es5"
MATHJAX_DEST = "javascripts/mathjax"  # in the site; mkdocs.yml loads tex-chtml.js from there
# The TeX-to-HTML bundle, what it loads on demand (TeX extensions, fonts, the menu and its
# accessibility parts) and the licence. The other bundles of the package are not used.
MATHJAX_PARTS = ("tex-chtml.js", "input", "output", "ui", "a11y", "sre")

INSTALL_CELL = """\
# Installs minidora into this notebook's Python (torch 2.13.0 comes with it). The package
# builds a C++ extension, minidora._C, which needs a C++17 compiler and takes a few minutes.
# Where there is no compiler (or no time), uncomment the %env line: the install then builds
# nothing, and every method runs on the plain PyTorch reference path; only the fused NF4
# kernels are missing (see docs/install.md, "Notebook service / no-compile install").
# Already installed, or running from a checkout with the package on the path? Skip this cell.
# %env MINIDORA_NO_EXTENSION=1
%pip install minidora"""


# --- the tutorials' kernel ---------------------------------------------------------------------

def on_config(config, **kwargs):
    paths = [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    os.environ.setdefault("MINIDORA_TUTORIAL_SIZE", "default")
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"  # figures inline
    ensure_mathjax()
    return config


# --- MathJax from the site itself ---------------------------------------------------------------

def pinned_mathjax_version() -> str:
    lock = json.loads((DOCS / "package-lock.json").read_text())
    return lock["packages"]["node_modules/mathjax"]["version"]


def installed_mathjax_version() -> str | None:
    meta = MATHJAX.parent / "package.json"
    return json.loads(meta.read_text())["version"] if meta.is_file() else None


def ensure_mathjax() -> None:
    """Install the pinned MathJax into docs/node_modules unless it is there already."""
    want = pinned_mathjax_version()
    have = installed_mathjax_version()
    if have == want:
        return
    from mkdocs.exceptions import PluginError

    npm = shutil.which("npm")
    if npm is None:
        raise PluginError(f"MathJax {want} is needed in docs/node_modules (found: {have}), and npm "
                          "is not on PATH to install it: install Node.js and npm, then run "
                          "`npm ci` in docs/ (or `make docs`)")
    done = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=DOCS, text=True,
                          capture_output=True)
    if done.returncode != 0 or installed_mathjax_version() != want:
        raise PluginError(f"`npm ci` in docs/ did not install MathJax {want}:\n"
                          f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}")


def on_post_build(config, **kwargs):
    dest = Path(config["site_dir"]) / MATHJAX_DEST
    for part in MATHJAX_PARTS:
        src = MATHJAX / part
        if src.is_dir():
            shutil.copytree(src, dest / part, dirs_exist_ok=True)
        else:
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / part)
    shutil.copy2(MATHJAX.parent / "LICENSE", dest / "LICENSE")


# --- notebooks ------------------------------------------------------------------------------------

def tutorial_notebook(path: Path):
    """The notebook of a tutorial: its cells, with the install cell first among the code cells
    (after the title and introduction), tagged ``install``."""
    import jupytext
    import nbformat

    nb = jupytext.read(path)
    nb.metadata.pop("jupytext", None)  # the download is a plain notebook, paired with nothing
    first_code = next(i for i, cell in enumerate(nb.cells) if cell.cell_type == "code")
    nb.cells.insert(first_code, nbformat.v4.new_code_cell(INSTALL_CELL,
                                                          metadata={"tags": ["install"]}))
    for i, cell in enumerate(nb.cells):  # stable cell ids: the same file from the same source
        cell["id"] = f"{path.stem[:2]}-{i:03d}"
    return nb


def write_notebook(path: Path, dest: Path) -> None:
    import nbformat

    dest.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(tutorial_notebook(path), str(dest))


def is_tutorial(page) -> bool:
    src = Path(page.file.src_uri)
    return src.parent.name == "tutorials" and src.suffix == ".py"


def on_page_content(html, page, config, files, **kwargs):
    for item in walk_toc(page.toc):
        item.title = tex_to_text(item.title)
    if not is_tutorial(page):
        return html + markdown_source_link(page)
    stem = Path(page.file.src_uri).stem
    # next to the page, where mkdocs-jupyter's include_source puts the .py
    write_notebook(TUTORIALS / f"{stem}.py", Path(page.file.abs_dest_path).parent / f"{stem}.ipynb")
    links = (f'<p class="minidora-downloads">'
             f'<a class="md-button md-button--primary" href="{stem}.ipynb" download>'
             f'Download the notebook</a> '
             f'<a class="md-button" href="{stem}.py">Source: {stem}.py</a></p>')
    html = drop_notebook_leftovers(html)
    # The tutorial's own relative links (solutions/01_solutions.py) point from tutorials/; its
    # page is one folder deeper (tutorials/01_lora_from_scratch/).
    html = re.sub(r'(<a\s[^>]*?href=")(?![A-Za-z][A-Za-z0-9+.-]*:|/|#)', r"\1../", html)
    # below the title: the first </h1> of the first Markdown cell
    head, sep, rest = html.partition("</h1>")
    return head + sep + links + rest if sep else links + html


def markdown_source_link(page) -> str:
    """Copy a Markdown page's source next to its HTML and link it at the end of the page."""
    src = Path(page.file.abs_src_path)
    dest = Path(page.file.abs_dest_path).parent / src.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dest)
    return (f'<p class="minidora-source"><a href="{src.name}">Source of this page: '
            f'docs/{page.file.src_uri}</a></p>')


def drop_notebook_leftovers(html: str) -> str:
    """Remove what nbconvert's template adds for a page of its own: a MathJax 2 loader with an
    empty URL and a module script that imports mermaid from a CDN when the notebook has a
    mermaid diagram. The site loads its own MathJax, and the tutorials draw no mermaid."""
    html = re.sub(r"<!-- Load mathjax -->.*?<!-- End of mathjax configuration -->", "", html,
                  flags=re.S)
    return re.sub(r'<script type="module">(?:(?!</script>).)*?jp-Mermaid.*?</script>', "", html,
                  flags=re.S)


# --- table of contents ----------------------------------------------------------------------------

def walk_toc(items):
    for item in items:
        yield item
        yield from walk_toc(item.children)


TEX_SYMBOLS = {
    "alpha": "α", "beta": "β", "gamma": "γ", "delta": "δ", "epsilon": "ε", "theta": "θ",
    "lambda": "λ", "mu": "μ", "sigma": "σ", "Delta": "Δ", "Sigma": "Σ", "sqrt": "√",
    "cdot": "·", "times": "×", "top": "⊤", "lVert": "‖", "rVert": "‖", "lvert": "|",
    "rvert": "|", "ll": "≪", "le": "≤", "ge": "≥", "approx": "≈", "partial": "∂",
    "infty": "∞", "in": "∈", "to": "→", ",": " ", ";": " ", "!": "", "quad": " ",
}
SUBSCRIPTS = str.maketrans("0123456789", "₀₁₂₃₄₅₆₇₈₉")
SUPERSCRIPTS = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")
MATH = re.compile(r"\\\((.+?)\\\)|\$\$(.+?)\$\$|\$(.+?)\$|\\\[(.+?)\\\]", re.S)


def tex_to_text(title: str) -> str:
    """Plain text for a heading with math: the formulas' TeX turned into Unicode.

    >>> tex_to_text(r"Scaling: \\(\\alpha/r\\) and rsLoRA's $\\alpha / \\sqrt r$, $W'$, $W_0$")
    "Scaling: α/r and rsLoRA's α / √r, W′, W₀"
    """
    def command(match: re.Match) -> str:
        name, space, spacing = match.groups()
        if spacing:
            return TEX_SYMBOLS[spacing]
        return TEX_SYMBOLS[name] if name in TEX_SYMBOLS else name + (space or "")

    def one(match: re.Match) -> str:
        tex = next(group for group in match.groups() if group is not None)
        tex = re.sub(r"\\(?:text|mathrm|mathbf|operatorname)\{([^{}]*)\}", r"\1", tex)
        # a command's name ends at the space after it: \Delta D -> ΔD, \sqrt r -> √r
        tex = re.sub(r"\\([A-Za-z]+)(?![A-Za-z])(\s+(?=\w))?|\\([,;!])", command, tex)
        tex = re.sub(r"_\{?(\d+)\}?", lambda m: m.group(1).translate(SUBSCRIPTS), tex)
        tex = re.sub(r"\^\{?(\d+)\}?", lambda m: m.group(1).translate(SUPERSCRIPTS), tex)
        tex = tex.replace("'", "′").replace("{", "").replace("}", "")
        return re.sub(r"\s+", " ", tex).strip()

    return MATH.sub(one, title)
