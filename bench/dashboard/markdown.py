"""Just enough Markdown for ``results/REPORT.md``: headings, pipe tables, lists, fenced code,
paragraphs, and inline code, bold, italics, links and images. Everything is HTML-escaped first;
relative link and image targets point into the results folder (served under ``/files/``)."""
from __future__ import annotations

import html
import re

from urllib.parse import quote

_INLINE = re.compile(
    r"`(?P<code>[^`]+)`"
    r"|!\[(?P<alt>[^\]]*)\]\((?P<src>[^)\s]+)\)"
    r"|\[(?P<text>[^\]]+)\]\((?P<href>[^)\s]+)\)"
    r"|\*\*(?P<bold>.+?)\*\*"
    r"|(?<![\w*])\*(?P<em>[^*\s][^*]*?)\*(?![\w*])"
)


def _url(target: str) -> str:
    """Absolute URLs and in-page anchors stay; a relative path becomes /files/<path>."""
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):
        return target if target.split(":", 1)[0].lower() in ("http", "https", "mailto") else "#"
    if target.startswith("#"):
        return target
    return "/files/" + quote(target.removeprefix("./").lstrip("/"), safe="/#")


def inline(text: str) -> str:
    out, pos = [], 0
    for m in _INLINE.finditer(text):
        out.append(html.escape(text[pos:m.start()]))
        if m["code"] is not None:
            out.append(f"<code>{html.escape(m['code'])}</code>")
        elif m["src"] is not None:
            out.append(f'<img src="{html.escape(_url(m["src"]))}" alt="{html.escape(m["alt"])}">')
        elif m["href"] is not None:
            out.append(f'<a href="{html.escape(_url(m["href"]))}">{inline(m["text"])}</a>')
        elif m["bold"] is not None:
            out.append(f"<strong>{inline(m['bold'])}</strong>")
        else:
            out.append(f"<em>{inline(m['em'])}</em>")
        pos = m.end()
    out.append(html.escape(text[pos:]))
    return "".join(out)


def _cells(line: str) -> list[str]:
    line = line.strip()
    line = line.removeprefix("|")
    if line.endswith("|") and not line.endswith("\\|"):
        line = line[:-1]
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)]


def _is_rule(line: str) -> bool:
    return bool(re.fullmatch(r"\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*", line))


def _align(rule: str) -> str:
    left, right = rule.startswith(":"), rule.endswith(":")
    side = "center" if left and right else "right" if right else "left" if left else None
    return f' style="text-align:{side}"' if side else ""


def _row(cells: list[str], tag: str, aligns: list[str]) -> str:
    return "<tr>" + "".join(f"<{tag}{aligns[k] if k < len(aligns) else ''}>{inline(c)}</{tag}>"
                            for k, c in enumerate(cells)) + "</tr>"


def render(text: str) -> str:
    """HTML for a Markdown document (the subset above)."""
    lines = text.replace("\r\n", "\n").split("\n")
    out: list[str] = []
    para: list[str] = []
    i = 0

    def flush() -> None:
        if para:
            out.append("<p>" + inline(" ".join(para)) + "</p>")
            para.clear()

    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("```"):
            flush()
            j = i + 1
            while j < len(lines) and not lines[j].lstrip().startswith("```"):
                j += 1
            out.append("<pre><code>" + html.escape("\n".join(lines[i + 1:j])) + "</code></pre>")
            i = j + 1
            continue
        if m := re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line):
            flush()
            level = len(m[1])
            out.append(f"<h{level}>{inline(m[2])}</h{level}>")
        elif "|" in line and i + 1 < len(lines) and _is_rule(lines[i + 1]):
            flush()
            aligns = [_align(c) for c in _cells(lines[i + 1])]
            head = _row(_cells(line), "th", aligns)
            body = []
            i += 2
            while i < len(lines) and "|" in lines[i] and lines[i].strip():
                body.append(_row(_cells(lines[i]), "td", aligns))
                i += 1
            out.append(f"<table><thead>{head}</thead><tbody>{''.join(body)}</tbody></table>")
            continue
        elif re.match(r"^\s*([-*+]|\d+[.)])\s+", line):
            flush()
            ordered = bool(re.match(r"^\s*\d", line))
            items = []
            while i < len(lines) and (m := re.match(r"^\s*([-*+]|\d+[.)])\s+(.*)", lines[i])):
                items.append(f"<li>{inline(m[2])}</li>")
                i += 1
            tag = "ol" if ordered else "ul"
            out.append(f"<{tag}>{''.join(items)}</{tag}>")
            continue
        elif re.fullmatch(r"\s*([-*_])(\s*\1){2,}\s*", line):
            flush()
            out.append("<hr>")
        elif not line.strip():
            flush()
        else:
            para.append(line.strip())
        i += 1
    flush()
    return "\n".join(out)
