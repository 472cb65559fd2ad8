"""The HTML report of one run: overview, DAF, TCAC and the failure taxonomy, as one page with its folder.

:class:`ReportBuilder` works in three passes: each section reads what it shows and asks for the thumbnails it
needs; the thumbnails are made in parallel (:class:`clipaudit.report.images.Thumbnails`); then each section renders.
Only the top cases are shown (``report.*`` in the config), so the page stays a few MB for any corpus size; the
tables hold everything. Every string from the corpus, the LLM or the run goes through :func:`~.html.esc`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from clipaudit.config import ReportConfig
from clipaudit.io import fs
from clipaudit.records import BLIND_PAIRS, DAF_CASES, FAILURE_CHECKS, TCAC_CASES
from clipaudit.report import charts
from clipaudit.report.benchmark_section import benchmark_section
from clipaudit.report.html import Markup, join, num, page, pct, seconds, table, tag
from clipaudit.report.images import Thumbnails
from clipaudit.report.probe_section import probe_section
from clipaudit.report.probe_truth import probe_scenes, truth_of_pairs
from clipaudit.report.taxonomy_section import evidence_pairs, taxonomy_section
from clipaudit.run_models import entries, short_sha
from clipaudit.run_view import RunView
from clipaudit.transforms import TransformParams, is_graded
from clipaudit.transforms.severities import level_curve, most_severe

log = logging.getLogger("clipaudit.report")

CHARTS_DIR = "charts"
Section = Callable[[], Markup]


def missing(what: str, why: str, hint: str | None = None) -> Markup:
    """The box that says a section has nothing to show because its stage did not run (or wrote nothing)."""
    return tag("div", tag("strong", f"{what}: missing. "), why, (" " + hint) if hint else "", class_="missing",
               data_missing=what)


def figure(label: str, value: Any, note: str | None = None) -> Markup:
    """One headline number."""
    return tag("div", tag("b", value), tag("span", label), tag("div", note, class_="muted") if note else "",
               class_="figure")


RANK_ORDER = [("rank", "ascending", "at_start"), ("image_id", "ascending", "at_start")]
"""The order of the DAF cases shown: by rank, a missing rank first, then image_id."""


def top_daf_cases(view: RunView, n: int) -> list[dict[str, Any]]:
    """The ``n`` first ``daf_cases`` rows by rank (a missing rank first), then image_id, as dicts.

    Only ``image_id`` and ``rank`` of every case are read (as Arrow columns), then the full rows up to the n-th
    rank: never a Python object per case."""
    keys = view.read(DAF_CASES, ["image_id", "rank"]) if n > 0 else None
    if keys is None or keys.num_rows == 0:
        return []
    order = pc.sort_indices(keys, sort_keys=RANK_ORDER)
    last = pc.max(keys.column("rank").take(order[:n])).as_py()
    where = "rank IS NULL" if last is None else f"rank IS NULL OR rank <= {int(last)}"
    rows = view.read(DAF_CASES, where=where)
    order = pc.sort_indices(rows, sort_keys=RANK_ORDER)
    return rows.take(order[:n]).to_pylist()


def top_blind_pairs(view: RunView, n: int) -> list[dict[str, Any]]:
    """The ``n`` ``blind_pairs`` rows of largest gap (a missing gap counts 0; ties keep table order), as dicts;
    sorted in Arrow, so only the rows shown become Python objects."""
    pairs = view.read(BLIND_PAIRS) if n > 0 else None
    if pairs is None or pairs.num_rows == 0:
        return []
    gap = pc.fill_null(pairs.column("gap"), 0.0) if "gap" in pairs.column_names else pa.nulls(pairs.num_rows,
                                                                                             pa.float32())
    order = pc.sort_indices(pa.table({"gap": gap}), sort_keys=[("gap", "descending")])
    return pairs.take(order[:n]).to_pylist()


def differ_in(truth: dict[str, Any] | None) -> str:
    """A pair's truth for a table cell: ``only position`` or the attributes it differs in."""
    if truth is None:
        return "-"
    return f"only {truth['only']}" if truth.get("only") else ", ".join(truth.get("differs") or []) or "nothing"


def weights_table(provenance: dict[str, Any] | None) -> list[Markup]:
    """The overview's table of the models (``summary["provenance"]``), one row per model: the spec asked for, the
    spec that ran (a fallback marked), the weights' source, Hugging Face revision and short SHA-256; [] without
    it (a run directory written before clipaudit recorded ``models.json``: the overview then shows the models
    used against those asked for, from the embed stage's stats)."""
    rows = []
    for role, spec, entry in entries(provenance):
        ran: Any = tag("code", entry.get("ran") or "-")
        if entry.get("fallback"):
            ran = join([ran, " ", tag("strong", "FALLBACK" + (", RANDOM" if entry.get("random") else ""),
                                      class_="fallback")])
        elif entry.get("random"):
            ran = join([ran, " ", tag("strong", "RANDOM")])
        sha = entry.get("weights_sha256")
        rows.append((role, tag("code", spec), ran, entry.get("source") or "-", entry.get("revision") or "-",
                     tag("code", short_sha(sha), title=f"sha256 {sha}") if sha else "-"))
    if not rows:
        return []
    return [tag("p", "The models asked for and what ran, with which weights (run_dir/models.json; a later run of "
                     "this run directory whose models run other weights is refused):", class_="muted"),
            table(["role", "asked for", "ran", "source", "revision", "weights sha256"], rows, class_="provenance")]


class ReportBuilder:
    """Builds ``report/index.html`` (and its ``thumbs/`` and ``charts/``) for the run ``view`` shows."""

    def __init__(self, view: RunView, summary: dict[str, Any], cfg: ReportConfig, report_dir: str,
                 tcac_params: TransformParams | None = None, max_pixels: int = 64_000_000,
                 chart_prefix: str = "", index_link: str | None = None) -> None:
        """``chart_prefix``: put before each chart's file name (the pages of several CLIP models share
        ``charts/``); ``index_link``: the page of the whole run, linked from the header (a model's page)."""
        self.view = view
        self.summary = summary
        self.cfg = cfg
        self.report_dir = report_dir
        self.chart_prefix = chart_prefix
        self.index_link = index_link
        self.thumbs = Thumbnails(report_dir, cfg.thumb_px, cfg.jpeg_quality, max_pixels, cfg.workers, tcac_params)
        self.samples: dict[str, dict[str, Any]] = {}
        self.charts: list[str] = []
        self._scenes: dict[str, Any] | None = None

    # -- the page ---------------------------------------------------------------------------------------------

    def build(self) -> str:
        """Gather, make the thumbnails, render; returns the HTML text."""
        sections = [self._overview(), lambda: probe_section(self.summary), self._daf(), self._tcac(),
                    self._taxonomy(), benchmark_section(self.view, missing)]
        self.samples = self.view.samples(self.thumbs.image_ids())
        self.thumbs.make(lambda image_id: (self.samples.get(image_id) or {}).get("uri"))
        s = self.summary
        nav = tag("nav", [tag("a", label, href=f"#{anchor}") for anchor, label in
                          (("overview", "Overview"), *((("truth", "Truth"),) if self.summary.get("probe") else ()),
                           ("daf", "DAF"), ("tcac", "TCAC"), ("taxonomy", "Failure types"),
                           ("benchmark", "Benchmark"))])
        model = self.view.clip_model if self.index_link is not None else None
        title = tag("h1", "clipaudit report") if model is None else tag("h1", "clipaudit report: ", tag("code", model))
        back = (tag("div", tag("a", "\u2190 all CLIP models (leaderboard)", href=self.index_link), class_="back")
                if self.index_link is not None else "")
        header = tag("header", back, title,
                     tag("div", "run ", tag("code", s.get("run_id") or "-"), " \u00b7 ", tag("code", s["run_dir"]),
                         " \u00b7 generated ", s.get("generated_at"), class_="muted"), nav)
        footer = tag("footer", "Tables: ", tag("code", fs.join(s["run_dir"], "lancedb")),
                     f" (tagged {s.get('run_id')} when the run finished). Machine-readable figures: ",
                     tag("code", "summary.json"), ". Every caption and LLM answer on this page is shown as text.")
        body = join([header, *(section() for section in sections), footer])
        title = f"clipaudit report {s.get('run_id') or ''}".strip()
        return page(f"{title} ({model})" if model else title, body)

    def _chart(self, name: str, png: bytes, alt: str) -> Markup:
        name = f"{self.chart_prefix}{name}"
        path = f"{CHARTS_DIR}/{name}.png"
        fs.write_bytes(fs.join(self.report_dir, CHARTS_DIR, f"{name}.png"), png)
        self.charts.append(path)
        return tag("img", src=path, alt=alt, class_="chart")

    def _probe_scenes(self) -> dict[str, Any]:
        """The corpus's probe scenes by image id, read once for every section that shows a pair's truth."""
        if self._scenes is None:
            self._scenes = probe_scenes(self.view)
        return self._scenes

    def _caption(self, image_id: str) -> str:
        return str((self.samples.get(image_id) or {}).get("caption") or "")

    def _cell(self, key: str, image_id: str, caption: str | None = None, class_: str = "") -> Markup:
        text = caption if caption is not None else self._caption(image_id)
        return tag("div", self.thumbs.img(key, alt=text, title=image_id), tag("div", text, class_="cap"),
                   tag("div", image_id, class_="muted mono cap"), class_=f"cell {class_}".strip())

    # -- overview -----------------------------------------------------------------------------------------------

    def _overview(self) -> Section:
        def render() -> Markup:
            s = self.summary
            c = s["counts"]
            parts: list[Any] = [tag("h2", "Overview", id="overview")]
            if s.get("random_models"):
                models = ", ".join(f"{role} = {spec}" for role, spec in (s.get("models") or {}).items())
                parts.append(tag("div", tag("strong", "RANDOM MODELS. "),
                                 f"This run used models with random weights ({models}): its findings are "
                                 "meaningless. It only shows that the pipeline works. Provide the real weights "
                                 "(models.clip / models.reference) to audit a model.", class_="warning",
                                 id="random-models"))
            parts.append(tag("div", figure("images in", num(c.get("in"))), figure("embedded", num(c.get("embedded"))),
                             figure("rejected by embed", num(c.get("rejected"))),
                             figure("rejects (all stages)", num(c.get("rejects"))),
                             figure("captions embedded", num(c.get("captions_embedded"))), class_="figures"))
            if c.get("in") is not None and c.get("embedded") is not None and s["stages"].get("embed", {}).get("ran"):
                balanced = c["in"] == c["embedded"] + c["rejected"]
                parts.append(tag("p", f"{c['in']:,} in = {c['embedded']:,} embedded + {c['rejected']:,} rejected",
                                 "" if balanced else " (does not add up: some images are neither embedded by both "
                                 "models nor rejected; re-run the embed stage)", class_="muted"))
            dataset = s.get("dataset") or {}
            parts.append(tag("h3", "Corpus and models"))
            rows = [("format", dataset.get("format", "-"))]
            rows += [(key, dataset[key]) for key in ("captions", "images", "caption_choice", "num_images", "seed",
                                                     "limit") if dataset.get(key) is not None]
            parts.append(table(["dataset", ""], rows))
            requested = s.get("models_requested") or {}
            parts.extend(weights_table(s.get("provenance")) or [
                table(["role", "model used", "asked for"],
                      [(role, tag("code", spec or "-"), tag("code", requested.get(role) or "-"))
                       for role, spec in (s.get("models") or {}).items()])])
            if c.get("rejects_by_reason"):
                parts.append(tag("h3", "Rejected inputs"))
                retryable = set(c.get("retryable_reasons") or ())
                parts.append(table(["stage", "reason", "count", "kind"],
                                   [(*key.split("/", 1), num(n),
                                     "retryable: tried again by the next run" if key.split("/", 1)[1] in retryable
                                     else "final") for key, n in c["rejects_by_reason"].items()]))
                if c.get("rejects_retryable"):
                    parts.append(tag("p", f"{c['rejects_retryable']:,} reject(s) of a transient kind (a worker "
                                     "lost): run the same run_dir again to retry them.", class_="muted"))
            parts.append(tag("h3", "Stages"))
            rows = []
            for stage, info in s["stages"].items():
                if stage == "report":
                    rows.append((stage, "ran: this page", "-", ""))
                    continue
                if not info["ran"]:
                    status = tag("strong", "missing (did not run)")
                elif info.get("output") is False:
                    status = "ran, wrote no table"
                else:
                    status = "ran"
                rows.append((stage, status, tag("span", seconds(info.get("seconds")), class_="nowrap"),
                             info.get("summary") or ""))
            parts.append(table(["stage", "status", "time", "summary"], rows))
            return join(parts)

        return render

    # -- DAF -------------------------------------------------------------------------------------------------------

    def _daf(self) -> Section:
        daf = self.summary.get("daf")
        if daf is None:
            return lambda: join([tag("h2", "DAF: CLIP against the reference model", id="daf"),
                                 missing("DAF", "The daf stage has not run in this run directory (no daf_cases "
                                         "table).", "Run: clipaudit daf --config CONFIG.")])
        rows = top_daf_cases(self.view, self.cfg.daf_cases)
        for row in rows:
            row["_key"] = self.thumbs.want(row["image_id"])
            row["_clip"] = [(i, self.thumbs.want(i)) for i in row.get("clip_ids") or []]
            row["_ref"] = [(i, self.thumbs.want(i)) for i in row.get("reference_ids") or []]
        pairs = top_blind_pairs(self.view, self.cfg.blind_pairs)
        for pair in pairs:
            pair["_a"], pair["_b"] = self.thumbs.want(pair["image_a"]), self.thumbs.want(pair["image_b"])
        truth = (truth_of_pairs([(p["image_a"], p["image_b"]) for p in pairs], self._probe_scenes())
                 if self.summary.get("probe") else {})

        def render() -> Markup:
            k = daf.get("k") or 10
            parts: list[Any] = [tag("h2", "DAF: CLIP against the reference model", id="daf")]
            alignment = daf.get("alignment_over_chance")
            parts.append(tag("div",
                             figure(f"mean overlap@{k}", num(daf.get("mean_overlap"))),
                             figure("chance level", num(daf.get("chance_overlap")), f"k / (N - 1), N = "
                                    f"{num(daf.get('images'))}"),
                             figure("over chance", f"{num(alignment, 2)} \u00d7" if alignment else "-"),
                             figure("permutation null p", num(daf.get("null_p_value"), 4)),
                             figure("cases", num(daf.get("cases"))),
                             figure("CLIP-blind pairs", num(daf.get("blind_pairs"))), class_="figures"))
            parts.append(tag("p", f"For each image, overlap@{k} is the share of its {k} nearest neighbours under "
                                  "CLIP that are also among its nearest neighbours under the reference model. Low "
                                  "overlap means the two models see different images as similar: a candidate "
                                  "failure of CLIP (or of the reference). Two unrelated lists share "
                                  f"{num(daf.get('chance_overlap'))} on average (chance).", class_="muted"))
            histogram = daf.get("overlap_histogram")
            if histogram:
                parts.append(self._chart("daf_overlap", charts.overlap_chart(
                    histogram, k, daf.get("chance_overlap"), daf.get("mean_overlap"),
                    daf.get("null_overlap_histogram")), f"overlap@{k} distribution against chance"))
            parts.append(tag("h3", f"Most divergent cases ({len(rows)} of {num(daf.get('cases'))})"))
            parts.append(tag("p", tag("span", "\u25a0 orange: CLIP neighbour the reference does not share",
                                      style="color:#d9480f"), " \u00a0 ",
                             tag("span", "\u25a0 green: reference neighbour CLIP does not share",
                                 style="color:#1c7c54"), class_="legend"))
            if not rows:
                parts.append(tag("p", "No image met the case selection (daf.max_overlap / daf.top_n).",
                                 class_="muted"))
            for row in rows:
                clip_only, ref_only = set(row.get("clip_only") or []), set(row.get("reference_only") or [])
                head = tag("div", tag("strong", f"#{row.get('rank')} "), tag("code", row["image_id"]),
                           f" \u00b7 overlap {num(row.get('overlap'), 2)} \u00b7 divergence (1 - RBO) "
                           f"{num(row.get('score'), 3)} \u00b7 p {num(row.get('p_value'), 3)}", class_="case-head")
                query = self._cell(row["_key"], row["image_id"], row.get("caption"), "query")
                clip_cells = [self._cell(key, i, class_="only-clip" if i in clip_only else "") for i, key in
                              row["_clip"]]
                ref_cells = [self._cell(key, i, class_="only-ref" if i in ref_only else "") for i, key in row["_ref"]]
                strips = tag("div",
                             tag("div", tag("div", "CLIP neighbours", class_="strip-label clip"), clip_cells,
                                 class_="strip"),
                             tag("div", tag("div", "reference neighbours", class_="strip-label ref"), ref_cells,
                                 class_="strip"), class_="strips")
                parts.append(tag("div", head, tag("div", query, strips, class_="case-body"),
                                 class_="case daf-case", data_image_id=row["image_id"]))
            parts.append(tag("h3", f"CLIP-blind pairs ({len(pairs)} of {num(daf.get('blind_pairs'))})"))
            rule = daf.get("blind_rule") or {}
            parts.append(tag("p", "Pairs CLIP embeds as near-identical while the reference model sees them as "
                                  "different (MMVP): rule ", tag("code", json.dumps(rule, sort_keys=True)),
                             class_="muted"))
            if pairs:
                parts.append(table(["image a", "image b", "CLIP sim", "reference sim", "gap",
                                    *(["truth: differ in"] if truth else [])],
                                   [(self._cell(p["_a"], p["image_a"]), self._cell(p["_b"], p["image_b"]),
                                     num(p.get("clip_sim")), num(p.get("reference_sim")), num(p.get("gap")),
                                     *([differ_in(truth.get(f"{p['image_a']}|{p['image_b']}"))] if truth else []))
                                    for p in pairs], class_="blind-pairs"))
            else:
                parts.append(tag("p", "No CLIP-blind pairs under this rule.", class_="muted"))
            return join(parts)

        return render

    # -- TCAC ------------------------------------------------------------------------------------------------------

    def _tcac(self) -> Section:
        tcac = self.summary.get("tcac")
        if tcac is None:
            skipped = ((self.view.stats("tcac") or {}).get("notes") or {}).get("skipped")
            if skipped:
                return lambda: join([tag("h2", "TCAC: robustness to image transforms", id="tcac"),
                                     tag("p", tag("strong", "Skipped. "), skipped, class_="warning")])
            return lambda: join([tag("h2", "TCAC: robustness to image transforms", id="tcac"),
                                 missing("TCAC", "The tcac stage has not run in this run directory (no "
                                         "tcac_summary table).", "Run: clipaudit tcac --config CONFIG.")])
        n = self.cfg.tcac_cases
        cases_table = self.view.read(TCAC_CASES, where=f"is_case = true AND rank <= {n}") if n else None
        by_transform: dict[str, list[dict[str, Any]]] = {}
        for row in ([] if cases_table is None else cases_table.to_pylist()):
            by_transform.setdefault(row["transform"], []).append(row)
        for rows in by_transform.values():
            rows.sort(key=lambda r: (r.get("rank") or 0, r["image_id"]))
            for row in rows:
                row["_before"] = self.thumbs.want(row["image_id"])
                row["_after"] = self.thumbs.want(row["image_id"], row["transform"], row.get("params"),
                                                 row.get("settings"))

        def render() -> Markup:
            transforms = tcac["transforms"]
            top_k = tcac.get("top_k")
            parts: list[Any] = [tag("h2", "TCAC: robustness to image transforms", id="tcac")]
            parts.append(tag("p", "Each image is transformed; CLIP ranks a pool of captions (the image's own and their "
                                  "nearest corpus captions) before and after. A robust model keeps its top captions: "
                                  "many changes mean CLIP's reading of the image moved.", class_="muted"))
            names = [name for name in transforms if not is_graded(name)]
            if names:
                parts.append(table(
                    ["transform", "images", f"mean changed (top {top_k or 'k'})", "top-1 changed", "own caption R@1",
                     "R@5", "R@10", "mean TV shift", "cases (DAF too)"],
                    [(name, num(t.get("images")), num(t.get("mean_changed"), 2), pct(t.get("top1_changed_share")),
                      f"{pct(t.get('recall_at_1_before'))} \u2192 {pct(t.get('recall_at_1_after'))}",
                      f"{pct(t.get('recall_at_5_before'))} \u2192 {pct(t.get('recall_at_5_after'))}",
                      f"{pct(t.get('recall_at_10_before'))} \u2192 {pct(t.get('recall_at_10_after'))}",
                      num(t.get("mean_tv_distance")), f"{num(t.get('cases'))} ({num(t.get('daf_cases'))})")
                     for name, t in ((n, transforms[n]) for n in names)], class_="tcac-summary"))
                parts.append(self._chart("tcac_transforms", charts.transform_chart(
                    names, [transforms[t].get("mean_changed") for t in names],
                    [transforms[t].get("top1_changed_share") for t in names], top_k), "per-transform robustness"))
            parts.extend(self._severities(transforms, top_k))
            shown = names + [name for name in transforms if is_graded(name) and name in most_severe(transforms)]
            for name in shown:
                rows = by_transform.get(name) or []
                if not rows:
                    continue
                parts.append(tag("h3", f"{name}: top {len(rows)} case{'s' if len(rows) > 1 else ''}"))
                parts.extend(self._tcac_case(row) for row in rows)
            return join(parts)

        return render

    def _severities(self, transforms: dict[str, dict[str, Any]], top_k: int | None) -> list[Any]:
        """The graded corruptions: caption shift and the own caption's R@1 against the severity level, as curves
        and as a table (nothing when the run graded none)."""
        shift = level_curve((name, t.get("mean_changed")) for name, t in transforms.items())
        if not shift:
            return []
        recall = level_curve((name, t.get("recall_at_1_after")) for name, t in transforms.items())
        levels = sorted({level for points in shift.values() for level, _ in points})
        cells = {(c, level): v for c, points in shift.items() for level, v in points}
        recall_cells = {(c, level): v for c, points in recall.items() for level, v in points}
        return [
            tag("h3", "Graded corruptions: how the captions drift as the image degrades", id="severities"),
            tag("p", "JPEG, downscaling, blur, noise and brightness at severity levels 1 (mild) to 5 (severe), as "
                     "ImageNet-C grades them. A robust model's curves stay flat: the caption shift (top-"
                     f"{top_k or 'k'} captions that changed) near 0 and the own caption's R@1 near its value on "
                     "the original.", class_="muted"),
            self._chart("tcac_severity_shift", charts.severity_chart(
                {"": shift}, f"mean changed (top {top_k or 'k'})", top=float(top_k) if top_k else None),
                "caption shift per severity level"),
            self._chart("tcac_severity_recall", charts.severity_chart({"": recall}, "own caption R@1", share=True),
                        "own caption R@1 per severity level"),
            table(["corruption", *(f"level {level}" for level in levels)],
                  [(corruption, *(f"{num(cells.get((corruption, level)), 2)} / "
                                  f"{pct(recall_cells.get((corruption, level)))}" for level in levels))
                   for corruption in shift], class_="tcac-severity"),
            tag("p", "Cells: mean captions changed / own caption R@1. Cases are shown below for the most severe "
                     "level of each corruption.", class_="muted"),
        ]

    def _tcac_case(self, row: dict[str, Any]) -> Markup:
        shown = self.cfg.top_captions
        gt = row.get("gt_caption")

        def ranked(captions: list[str] | None, probs: list[float] | None) -> Markup:
            captions, probs = captions or [], probs or []
            return tag("ol", [tag("li", caption, " ", tag("span", f"({pct(prob)})", class_="prob"),
                                  class_="gt" if caption == gt else None)
                              for caption, prob in zip(captions[:shown], list(probs)[:shown] + [None] * shown)])

        head = tag("div", tag("strong", f"#{row.get('rank')} "), tag("code", row["image_id"]),
                   f" \u00b7 {num(row.get('changed'))} of the top captions changed \u00b7 own caption rank "
                   f"{num(row.get('gt_rank_before'))} \u2192 {num(row.get('gt_rank_after'))} \u00b7 TV shift "
                   f"{num(row.get('tv_distance'))}", " \u00b7 also a DAF case" if row.get("daf_case") else "",
                   class_="case-head")
        before = tag("div", tag("div", self.thumbs.img(row["_before"], alt="original", title=row["image_id"]),
                                class_="cell query"),
                     tag("div", tag("strong", "before"), ranked(row.get("top_before"), row.get("probs_before"))),
                     class_="side")
        after = tag("div", tag("div", self.thumbs.img(row["_after"], alt=f"{row['transform']}", title=row["image_id"]),
                               class_="cell query"),
                    tag("div", tag("strong", f"after {row['transform']}"),
                        ranked(row.get("top_after"), row.get("probs_after"))), class_="side")
        params = tag("div", "own caption: ", tag("span", gt, class_="gt"), " \u00b7 drawn parameters ",
                     tag("code", row.get("params") or "{}"), class_="muted")
        return tag("div", head, tag("div", before, after, class_="pair"), params, class_="case tcac-case",
                   data_image_id=row["image_id"], data_transform=row["transform"])

    # -- taxonomy ---------------------------------------------------------------------------------------------------

    def _taxonomy(self) -> Section:
        types = self.summary.get("failure_types")
        why = None
        if types is None:
            summarize = self.view.stats("summarize")
            dry = summarize is not None and "nothing sent" in str((summarize.get("notes") or {}).get("summary", ""))
            why = missing("Failure taxonomy", "No namer has written a failure_types table: the name stage has not run"
                          + (", and the summarize stage ran as a dry run (its prompts are in run_dir/llm/)." if dry
                             else "."), "Run: clipaudit name --config CONFIG (offline), or clipaudit summarize "
                          "(needs an OpenAI-compatible endpoint, see llm.base_url).")
        keys: dict[str, str] = {}
        pairs: list[tuple[str, str]] = []
        for item in types or []:
            item["shown_examples"] = item.get("example_ids", [])[: self.cfg.examples_per_type]
            item_pairs = evidence_pairs(item)[: self.cfg.examples_per_type]
            item["evidence_pairs"] = [f"{a}|{b}" for a, b in item_pairs]
            pairs += item_pairs
            for image_id in [*item["shown_examples"], *(i for pair in item_pairs for i in pair)]:
                keys.setdefault(image_id, self.thumbs.want(image_id))
        truth = truth_of_pairs(pairs, self._probe_scenes()) if self.summary.get("probe") and pairs else {}
        checks_table = self.view.read(FAILURE_CHECKS)
        checks = [] if checks_table is None else checks_table.to_pylist()

        def thumb(image_id: str) -> Markup:
            return self.thumbs.img(keys[image_id], alt=self._caption(image_id),
                                   title=f"{image_id}: {self._caption(image_id)}")

        def render() -> Markup:
            chart = None
            if types:
                chart = self._chart("failure_support", charts.support_chart(
                    [f"{t['method']}: {t['name']}" for t in types], [int(t.get("support") or 0) for t in types],
                    [t.get("success_rate") for t in types]), "support of each failure type")
            return taxonomy_section(types, checks, thumb, truth, why, self.summary.get("llm"), chart)

        return render


def unused_thumbs(report_dir: str, keep: set[str]) -> list[str]:
    """Local thumbnail files no longer referenced (a re-run shows other cases); [] for remote report folders."""
    if fs.is_remote(report_dir):
        return []
    folder = os.path.join(report_dir, "thumbs")
    if not os.path.isdir(folder):
        return []
    return [os.path.join(folder, name) for name in os.listdir(folder) if f"thumbs/{name}" not in keep]

