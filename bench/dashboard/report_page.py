"""The Report tab: ``results/REPORT.md`` rendered with markdown-it-py (raw HTML escaped, relative
links and images pointed at ``/files/``), verdicts as text badges that need no emoji font, and the
plots under ``plots/`` that the report does not already show (each plot appears once)."""
from __future__ import annotations

import re

from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from markdown_it import MarkdownIt

PLOT_KINDS = {".png": "image", ".svg": "image", ".jpg": "image", ".jpeg": "image", ".gif": "image",
              ".html": "html"}
# Verdict marks of moe-bench report (bench/report VERDICT_MARK) and of older reports' emoji.
EMOJI = {"✅": "reproduced", "❌": "refuted", "➖": "no-effect", "❔": "inconclusive", "❓": "inconclusive"}
BADGE_TEXT = {"reproduced": "reproduced", "refuted": "refuted", "no-effect": "no effect",
              "inconclusive": "inconclusive", "no-data": "no data"}
WORDS = {"reproduced": "reproduced", "refuted": "refuted", "no effect beyond delta": "no-effect",
         "inconclusive": "inconclusive", "no data": "no-data"}
_STRONG_OR_CELL = re.compile(r"<strong>(reproduced|refuted|no effect beyond delta)</strong>"
                             r"|(?<=<td>)(inconclusive|no data)(?=</td>)")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")

_md = MarkdownIt("commonmark", {"html": False}).enable("table")  # html=False: raw HTML is shown as text


def badge(verdict: str, text: str | None = None) -> str:
    return f'<span class="verdict {verdict}">{text or BADGE_TEXT[verdict]}</span>'


def _badges(html: str) -> str:
    for mark, verdict in EMOJI.items():
        html = html.replace(mark + "\ufe0f", badge(verdict)).replace(mark, badge(verdict))
    return _STRONG_OR_CELL.sub(lambda m: badge(WORDS[m[1] or m[2]], m[1] or m[2]), html)


def render(text: str) -> tuple[str, set[str]]:
    """(HTML, the results-folder paths the document links or shows)."""
    tokens = _md.parse(text)
    used: set[str] = set()
    for tok in tokens:
        for child in tok.children or ():
            attr = {"link_open": "href", "image": "src"}.get(child.type)
            target = child.attrGet(attr) if attr else None
            if not isinstance(target, str) or _SCHEME.match(target) or target.startswith("#"):
                continue  # markdown-it already dropped unsafe schemes (javascript:, data: ...)
            rel = target.removeprefix("./").lstrip("/")
            used.add(unquote(rel.split("#")[0]))
            child.attrSet(attr, "/files/" + rel)  # already percent-encoded by markdown-it
    return _badges(_md.renderer.render(tokens, _md.options, {})), used


def report(results_dir: Path) -> dict[str, Any]:
    """REPORT.md as HTML, and the plots under ``plots/`` it does not show, with their /files/ URLs."""
    md = results_dir / "REPORT.md"
    out: dict[str, Any] = {"path": str(md), "html": None, "note": None, "plots": []}
    used: set[str] = set()
    if md.is_file():
        try:
            out["html"], used = render(md.read_text(encoding="utf-8", errors="replace"))
        except OSError as e:
            out["note"] = f"cannot read {md}: {e}"
    else:
        out["note"] = f"no report: {md} does not exist (`moe-bench report` writes it)"
    plots = results_dir / "plots"
    if plots.is_dir():
        for p in sorted(plots.rglob("*")):
            kind = PLOT_KINDS.get(p.suffix.lower())
            rel = p.relative_to(results_dir).as_posix()
            if kind and p.is_file() and rel not in used:
                out["plots"].append({"name": p.relative_to(plots).as_posix(), "kind": kind, "url": "/files/" + quote(rel)})
    return out
