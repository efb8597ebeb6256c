"""Griffe extension for the API reference: render the reST math in minidora's docstrings.

The docstrings are Google style but write equations the reST way (``.. math::`` blocks and
``:math:`x``` roles) and cross-references as ``:func:`name```; Markdown would print those
literally. Before rendering, this rewrites them into what pymdownx.arithmatex and Markdown
understand: ``$$ ... $$`` blocks, ``$...$`` inline math and plain ``code``.
"""

import re

try:  # the docs toolchain has griffe; the test suite imports only rewrite()
    import griffe
except ImportError:
    griffe = None

_ROLE_MATH = re.compile(r":math:`([^`]+)`")
_ROLE_REF = re.compile(r":(?:func|class|meth|mod|attr|data|obj|exc):`~?([^`]+)`")


def _math_blocks(text: str) -> str:
    """``.. math::  first line`` plus indented continuation lines -> a $$ block."""
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        m = re.match(r"^(\s*)\.\. math::\s*(.*)$", lines[i])
        if not m:
            out.append(lines[i])
            i += 1
            continue
        indent, body = len(m.group(1)), [m.group(2)] if m.group(2).strip() else []
        i += 1
        while i < len(lines) and (not lines[i].strip() or
                                  len(lines[i]) - len(lines[i].lstrip()) > indent):
            if lines[i].strip():
                body.append(lines[i].strip())
            elif (body and i + 1 < len(lines)
                  and len(lines[i + 1]) - len(lines[i + 1].lstrip()) <= indent):
                break
            i += 1
        out += ["", m.group(1) + "$$", *(m.group(1) + b for b in body), m.group(1) + "$$", ""]
    return "\n".join(out)


def rewrite(text: str) -> str:
    text = _math_blocks(text)
    text = _ROLE_MATH.sub(lambda m: f"${m.group(1)}$", text)
    return _ROLE_REF.sub(
        lambda m: f"`{m.group(1).split('.')[-1] if '.' in m.group(1) else m.group(1)}`", text)


if griffe is not None:

    class RstMath(griffe.Extension):
        def on_instance(self, *, obj, **kwargs) -> None:
            if obj.docstring is not None:
                obj.docstring.value = rewrite(obj.docstring.value)
