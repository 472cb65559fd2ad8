"""The report's "Checked against the truth" section: on probe scenes, whether the findings are the attribute the
CLIP misses (the figures come from ``summary.json``'s ``probe`` section, :mod:`clipaudit.report.probe_truth`)."""

from __future__ import annotations

from typing import Any

from clipaudit.report.html import Markup, join, num, pct, table, tag

TITLE = "Checked against the truth: what the findings differ in"


def _lift(measure: dict[str, Any] | None) -> str:
    lift = (measure or {}).get("lift")
    return f"{lift:,.0f} \u00d7" if lift else "-"


def headline(probe: dict[str, Any]) -> Markup:
    """The trained blind spot and how precisely the audit found it."""
    trained = probe.get("trained_to_miss") or {}
    top = probe.get("headline") or {}
    hidden = top.get("hidden")
    blind, daf = top.get("blind_pairs") or {}, top.get("daf_clip_only") or {}
    parts: list[Any] = [tag("p", tag("strong", "Trained blind spot: "), tag("code", hidden), ". ",
                            trained.get("what") or "")]
    parts.append(tag("div",
                     tag("div", tag("b", pct(blind.get("only"))),
                         tag("span", f"of {num(blind.get('pairs'))} CLIP-blind pairs differ only in {hidden}"),
                         tag("div", f"chance {pct(blind.get('chance_only'), 2)} \u00b7 lift {_lift(blind)}",
                             class_="muted"), class_="figure"),
                     tag("div", tag("b", pct(daf.get("only"))),
                         tag("span", f"of {num(daf.get('pairs'))} (DAF case, CLIP-only neighbour) pairs differ only "
                                     f"in {hidden}"),
                         tag("div", f"chance {pct(daf.get('chance_only'), 2)} \u00b7 lift {_lift(daf)}",
                             class_="muted"), class_="figure"),
                     class_="figures"))
    held_out = trained.get("held_out") or {}
    if held_out:
        parts.append(tag("p", "At training time, on held-out minimal pairs, the mean cosine similarity (CLIP / "
                              "reference) was: ",
                         "; ".join(f"{attribute} {num(s.get('clip'), 3)} / {num(s.get('reference'), 3)}"
                                   for attribute, s in held_out.items()),
                         " (src/clipaudit/models/weights/probe.json).", class_="muted"))
    return join(parts)


def by_attribute(probe: dict[str, Any]) -> Markup:
    """Per attribute: the share of each kind of flagged pair that differs only in it, against chance."""
    blind = probe.get("blind_pairs") or {}
    clip_only = probe.get("daf_clip_only") or {}
    ref_only = probe.get("daf_reference_only") or {}
    attributes = list(blind or clip_only)
    rows = []
    for attribute in attributes:
        b, c, r = blind.get(attribute) or {}, clip_only.get(attribute) or {}, ref_only.get(attribute) or {}
        chance = b.get("chance_only", c.get("chance_only"))
        rows.append((attribute, pct(b.get("only")), pct(c.get("only")), pct(r.get("only")), pct(chance, 2)))
    header = ["differ only in", "CLIP-blind pairs", "DAF: case + CLIP-only neighbour",
              "DAF: case + reference-only neighbour", "all pairs of the corpus (chance)"]
    return table(header, rows, class_="probe-truth")


def probe_section(summary: dict[str, Any]) -> Markup:
    """The section's HTML ('' when the corpus has no probe scenes)."""
    probe = summary.get("probe")
    if not probe:
        return Markup("")
    parts: list[Any] = [tag("h2", TITLE, id="truth")]
    if probe.get("headline"):
        parts.append(headline(probe))
    parts.append(tag("p", f"The corpus holds {num(probe.get('scenes'))} probe scenes whose every attribute is known. "
                          "For each kind of pair the audit flagged, the share whose two images differ in exactly "
                          "one attribute, by attribute; a share far above its chance level is an attribute the CLIP "
                          "conflates. The reference-only neighbours are the contrast: what the reference groups "
                          "together and the CLIP does not.", class_="muted"))
    parts.append(by_attribute(probe))
    return join(parts)
