"""A tiny HTML builder that escapes everything it is not told is safe.

Text from the corpus (captions), from the LLM (failure type names, descriptions, caption pairs) and from the run
(paths, ids) goes through :func:`esc`; markup built here is a :class:`Markup` and passes unchanged. A caption
``<script>alert(1)</script>`` therefore reaches the page as text.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable
from typing import Any


class Markup(str):
    """A string that is already HTML (built by :func:`tag`, :func:`join` or :func:`raw`)."""

    __slots__ = ()


def esc(value: Any) -> Markup:
    """``value`` as HTML text: escaped, unless it is :class:`Markup` already; None is the empty string."""
    if isinstance(value, Markup):
        return value
    if value is None:
        return Markup("")
    return Markup(html.escape(str(value), quote=True))


def raw(text: str) -> Markup:
    """Mark trusted, constant markup (never data) as HTML."""
    return Markup(text)


def _flatten(children: Iterable[Any]) -> Iterable[Any]:
    for child in children:
        if isinstance(child, (list, tuple)) or (hasattr(child, "__next__") and not isinstance(child, str)):
            yield from _flatten(child)
        else:
            yield child


def join(children: Iterable[Any], sep: Any = "") -> Markup:
    """Concatenate children (each escaped unless Markup), with an optional separator."""
    return Markup(esc(sep).join(esc(child) for child in _flatten(children)))


_VOID = {"img", "br", "hr", "meta", "col", "wbr"}


def tag(name: str, *children: Any, **attrs: Any) -> Markup:
    """``<name attrs>children</name>``. Attribute names: a trailing ``_`` is dropped (``class_``), ``_`` inside
    becomes ``-`` (``data_k`` -> ``data-k``); None or False leaves an attribute out, True writes it bare."""
    parts = [name]
    for key, value in attrs.items():
        if value is None or value is False:
            continue
        attr = key.rstrip("_").replace("_", "-")
        parts.append(attr if value is True else f'{attr}="{esc(value)}"')
    opening = f"<{' '.join(parts)}>"
    if name in _VOID:
        return Markup(opening)
    return Markup(f"{opening}{join(children)}</{name}>")


def table(header: Iterable[Any], rows: Iterable[Iterable[Any]], class_: str | None = None) -> Markup:
    """A table with one header row."""
    head = tag("thead", tag("tr", [tag("th", cell) for cell in header]))
    body = tag("tbody", [tag("tr", [tag("td", cell) for cell in row]) for row in rows])
    return tag("table", head, body, class_=class_)


def num(value: Any, digits: int = 3) -> str:
    """A number for a table cell: ``-`` for None / NaN, integers as they are, floats to ``digits`` places."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(number):
        return "-"
    return f"{number:.{digits}f}"


def pct(value: Any, digits: int = 1) -> str:
    """A share in [0, 1] as a percentage; ``-`` for None."""
    if value is None:
        return "-"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return "-" if math.isnan(number) else f"{100 * number:.{digits}f} %"


def seconds(value: Any) -> str:
    """Seconds, human readable (``0.42 s``, ``3 min 5 s``, ``2 h 3 min``)."""
    if value is None:
        return "-"
    s = float(value)
    if s < 60:
        return f"{s:.2f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60)} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60)} min"


STYLE = """
:root { --fg: #1d1d1f; --muted: #6b6b70; --line: #dcdce0; --bg: #fafafa; --accent: #2256c9;
        --warn-bg: #fde8e8; --warn-fg: #8a1010; --clip: #d9480f; --ref: #1c7c54; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: var(--fg); background: var(--bg); margin: 0; padding: 0 2rem 4rem; max-width: 1400px; }
header { padding: 1.2rem 0 .6rem; border-bottom: 2px solid var(--line); margin-bottom: 1rem; }
h1 { font-size: 1.5rem; margin: 0 0 .3rem; } h2 { font-size: 1.25rem; margin: 2rem 0 .6rem;
     border-bottom: 1px solid var(--line); padding-bottom: .2rem; } h3 { font-size: 1.05rem; margin: 1.2rem 0 .4rem; }
nav a { margin-right: 1rem; color: var(--accent); text-decoration: none; }
.muted { color: var(--muted); } code, .mono { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace;
     font-size: 12px; }
.warning { background: var(--warn-bg); color: var(--warn-fg); border: 2px solid var(--warn-fg); border-radius: 6px;
           padding: .8rem 1rem; margin: 1rem 0; font-size: 15px; }
.missing { background: #f1f1f4; border: 1px dashed #a0a0a8; border-radius: 6px; padding: .7rem 1rem; margin: .6rem 0;
           color: #44444a; }
table { border-collapse: collapse; margin: .5rem 0 1rem; background: #fff; }
th, td { border: 1px solid var(--line); padding: .3rem .55rem; text-align: left; vertical-align: top; }
th { background: #f0f0f3; font-weight: 600; }
.figures { display: flex; flex-wrap: wrap; gap: .6rem; margin: .6rem 0; }
.figure { background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: .5rem .8rem; min-width: 9rem; }
.figure b { display: block; font-size: 1.25rem; } .figure span { color: var(--muted); font-size: 12px; }
.chart { max-width: 100%; height: auto; border: 1px solid var(--line); background: #fff; }
.case { background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: .6rem .8rem; margin: .8rem 0; }
.case-head { margin-bottom: .4rem; }
.case-body { display: flex; gap: .8rem; align-items: flex-start; }
.strips { min-width: 0; flex: 1; }
.nowrap { white-space: nowrap; }
.strip { display: flex; gap: .5rem; align-items: flex-start; overflow-x: auto; padding: .3rem 0; }
.strip-label { min-width: 6.5rem; max-width: 6.5rem; font-weight: 600; font-size: 12px; padding-top: .3rem; }
.strip-label.clip { color: var(--clip); } .strip-label.ref { color: var(--ref); }
.strip-label.model { min-width: 12rem; max-width: 12rem; overflow-wrap: anywhere; font-family: ui-monospace,
                     Menlo, Consolas, monospace; }
.chart-row { display: flex; flex-wrap: wrap; gap: .6rem; }
.back { margin-bottom: .3rem; } .back a, a.model-link { color: var(--accent); }
.cell { width: 112px; min-width: 112px; font-size: 11px; line-height: 1.25; }
.cell img, .thumb-missing { display: block; border-radius: 3px; border: 2px solid transparent; }
.cell.only-clip img { border-color: var(--clip); } .cell.only-ref img { border-color: var(--ref); }
.cell.query img { border-color: #333; }
.thumb-missing { width: 96px; height: 72px; background: #eee; color: #888; font-size: 10px; display: flex;
                 align-items: center; justify-content: center; text-align: center; }
.cap { overflow-wrap: anywhere; max-height: 5em; overflow: hidden; }
.pair { display: flex; gap: 1.2rem; flex-wrap: wrap; align-items: flex-start; }
.side { min-width: 16rem; max-width: 32rem; }
.side ol { margin: .3rem 0; padding-left: 1.4rem; } .side li { margin: .1rem 0; overflow-wrap: anywhere; }
.gt { font-weight: 600; background: #fff4c2; }
.prob { color: var(--muted); font-variant-numeric: tabular-nums; }
.examples { display: flex; gap: .3rem; flex-wrap: wrap; }
.legend span { margin-right: 1rem; }
footer { margin-top: 3rem; color: var(--muted); font-size: 12px; border-top: 1px solid var(--line);
         padding-top: .6rem; }
"""
"""The page's only style sheet, inline (no external fonts or files)."""


def page(title: str, body: Markup) -> str:
    """The whole HTML document: inline CSS, no scripts, no external resources."""
    return ("<!DOCTYPE html>\n"
            + tag("html",
                  tag("head", raw('<meta charset="utf-8">'),
                      raw('<meta name="viewport" content="width=device-width, initial-scale=1">'),
                      raw("<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
                          "img-src 'self' file: data:; style-src 'unsafe-inline'\">"),
                      tag("title", title), tag("style", raw(STYLE))),
                  tag("body", body), lang="en")
            + "\n")
