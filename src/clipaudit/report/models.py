"""The report of a run that audited several CLIP-role models (``models.clip`` a list).

``report/index.html`` opens with the leaderboard (the ``leaderboard`` table: one row per model, ranked by
blindness) and one bar chart per measure, each model's name a link to its own page ``report/model-<slug>.html``
(the one-model report of :class:`~clipaudit.report.render.ReportBuilder`, built through the model's view of the
run). Below it, "Where the models disagree": images that are DAF cases for one model and not for another, with
each model's nearest CLIP neighbours side by side. Every page shares ``report/thumbs/`` (thumbnails are named by
what they show, so two pages asking for the same image share its file) and ``report/charts/``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from typing import Any

from clipaudit.config import ReportConfig
from clipaudit.io import fs
from clipaudit.records import DAF_CASES, NEIGHBOURS
from clipaudit.report import charts
from clipaudit.report.html import Markup, join, num, page, pct, seconds, table, tag
from clipaudit.report.images import Thumbnails
from clipaudit.report.render import missing
from clipaudit.run_models import ran_note, short_sha
from clipaudit.run_view import RunView, in_filter, is_random_spec
from clipaudit.transforms import TransformParams
from clipaudit.transforms.severities import level_curve

CHARTS_DIR = "charts"
FLIP = "top1_flip_rate_"
R1_BEFORE = "recall_at_1_before_"
R1_AFTER = "recall_at_1_after_"
MEASURES: tuple[tuple[str, str, bool], ...] = (
    ("mean_overlap", "mean overlap@k with the reference", True),
    ("blind_pair_rate", "CLIP-blind pairs per image", False),
    ("mean_top1_flip_rate", "top-1 flip rate, mean over transforms", True),
    ("validation_success_rate", "validation success rate", True),
)
"""The leaderboard measures charted on the index page: (key, axis label, whether it is a share in [0, 1])."""
_MAX_NEIGHBOURS = 10


def model_slug(spec: str) -> str:
    """A file-name-safe name of a model spec: lower case, runs of other characters as ``-``, and a short hash of
    the spec (two specs never share a slug)."""
    base = re.sub(r"[^a-z0-9]+", "-", spec.lower()).strip("-")[:48].strip("-") or "model"
    return f"{base}-{hashlib.sha1(spec.encode('utf-8')).hexdigest()[:8]}"


def model_page(spec: str) -> str:
    """The file name (in ``report/``) of the page of CLIP-role model ``spec``."""
    return f"model-{model_slug(spec)}.html"


def transforms_of(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The transforms the leaderboard has columns for, in column order."""
    names: list[str] = []
    for row in rows:
        for key in row:
            if key.startswith(FLIP) and key[len(FLIP):] not in names:
                names.append(key[len(FLIP):])
    return names


def mean_flip_rate(row: dict[str, Any], transforms: Sequence[str]) -> float | None:
    """The mean top-1 flip rate over the transforms a model has one for (None: none)."""
    values = [row.get(f"{FLIP}{t}") for t in transforms]
    values = [float(v) for v in values if v is not None]
    return sum(values) / len(values) if values else None


class ModelsIndexBuilder:
    """Builds ``report/index.html`` of a run of several CLIP-role models (the leaderboard and where the models
    disagree); the model pages are built separately and linked by ``pages`` (spec -> file name)."""

    def __init__(self, view: RunView, summary: dict[str, Any], cfg: ReportConfig, report_dir: str,
                 pages: dict[str, str], tcac_params: TransformParams | None = None,
                 max_pixels: int = 64_000_000) -> None:
        self.view = view
        self.summary = summary
        self.cfg = cfg
        self.report_dir = report_dir
        self.pages = pages
        self.specs: list[str] = list(summary.get("clip_models") or pages)
        self.thumbs = Thumbnails(report_dir, cfg.thumb_px, cfg.jpeg_quality, max_pixels, cfg.workers, tcac_params)
        self.samples: dict[str, dict[str, Any]] = {}
        self.charts: list[str] = []

    def build(self) -> str:
        """Gather, make the thumbnails, render; returns the HTML text."""
        sections = [self._leaderboard(), self._disagreements(), self._run()]
        self.samples = self.view.samples(self.thumbs.image_ids())
        self.thumbs.make(lambda image_id: (self.samples.get(image_id) or {}).get("uri"))
        s = self.summary
        nav = tag("nav", [tag("a", label, href=f"#{anchor}") for anchor, label in
                          (("leaderboard", "Leaderboard"), ("disagree", "Where the models disagree"),
                           ("run", "Run"))])
        header = tag("header", tag("h1", f"clipaudit report: {len(self.specs)} CLIP models"),
                     tag("div", "run ", tag("code", s.get("run_id") or "-"), " \u00b7 ", tag("code", s["run_dir"]),
                         " \u00b7 generated ", s.get("generated_at"), class_="muted"), nav)
        footer = tag("footer", "Tables: ", tag("code", fs.join(s["run_dir"], "lancedb")),
                     " (every table of CLIP results keyed by clip_model). Machine-readable figures: ",
                     tag("code", "summary.json"), " (per model under per_model). Every caption on this page is shown "
                     "as text.")
        body = join([header, *(section() for section in sections), footer])
        return page(f"clipaudit report {s.get('run_id') or ''}".strip() + " (leaderboard)", body)

    def _chart(self, name: str, png: bytes, alt: str) -> Markup:
        path = f"{CHARTS_DIR}/{name}.png"
        fs.write_bytes(fs.join(self.report_dir, CHARTS_DIR, f"{name}.png"), png)
        self.charts.append(path)
        return tag("img", src=path, alt=alt, class_="chart")

    def _link(self, spec: str) -> Markup:
        return tag("a", tag("code", spec), href=self.pages.get(spec), class_="model-link")

    # -- the leaderboard --------------------------------------------------------------------------------------

    def _leaderboard(self) -> Callable[[], Markup]:
        rows = self.summary.get("leaderboard")

        def render() -> Markup:
            parts: list[Any] = [tag("h2", "Leaderboard: how blind is each CLIP model", id="leaderboard")]
            random = [spec for spec, summary in (self.summary.get("per_model") or {}).items()
                      if summary.get("random_models")]
            if random:
                parts.append(tag("div", tag("strong", "RANDOM MODELS. "), "These models have random weights: ",
                                 ", ".join(random), ". Their findings are meaningless; they only show that the "
                                 "pipeline works.", class_="warning", id="random-models"))
            if rows is None:
                parts.append(missing("Leaderboard", "The leaderboard stage has not run (no leaderboard table).",
                                     "Run: clipaudit leaderboard --config CONFIG."))
                parts.append(table(["CLIP model"], [(self._link(spec),) for spec in self.specs],
                                   class_="leaderboard"))
                return join(parts)
            transforms = transforms_of(rows)
            parts.append(tag("p", "Every model is audited on the same images, against the same reference neighbour "
                                  "lists and the same transformed pixels. Rank 1 is the most blind: blindness = "
                                  "((1 - mean overlap) + min(1, blind pairs per image)) / 2. Each model's name "
                                  "opens its own report.", class_="muted"))
            header = ["rank", "CLIP model", "weights (sha256)", "blindness", "images", "k", "mean overlap", "chance",
                      "null p", "DAF cases", "blind pairs", "blind pairs / image"]
            header += [f"{t}: top-1 flips, own caption R@1" for t in transforms]
            header += ["failure types (LLM)", "failure types (caption contrast)", "validation success"]
            body = []
            for row in rows:
                cells: list[Any] = [num(row.get("rank")), self._model_cell(row), self._weights_cell(row),
                                    num(row.get("blindness")),
                                    num(row.get("images")), num(row.get("k")), num(row.get("mean_overlap")),
                                    num(row.get("chance_overlap")), num(row.get("overlap_p_value"), 4),
                                    num(row.get("daf_cases")), num(row.get("blind_pairs")),
                                    num(row.get("blind_pair_rate"))]
                cells += [f"{pct(row.get(f'{FLIP}{t}'))}, {pct(row.get(f'{R1_BEFORE}{t}'))} \u2192 "
                          f"{pct(row.get(f'{R1_AFTER}{t}'))}" for t in transforms]
                cells += [num(row.get("failure_types")), num(row.get("contrast_types")),
                          pct(row.get("validation_success_rate"))]
                body.append(cells)
            parts.append(table(header, body, class_="leaderboard"))
            names = [str(row["clip_model"]) for row in rows]
            values = {"mean_top1_flip_rate": [mean_flip_rate(row, transforms) for row in rows]}
            images = []
            for key, label, share in MEASURES:
                series = values.get(key) or [row.get(key) for row in rows]
                images.append(self._chart(f"leaderboard_{key}", charts.model_bars(names, series, label, share),
                                          label))
            parts.append(tag("div", images, class_="chart-row"))
            parts.extend(self._severities())
            return join(parts)

        return render

    def _entry(self, row: dict[str, Any]) -> dict[str, Any]:
        """The provenance of a leaderboard row's model: the run's recorded entry, else what the row says ran."""
        spec = str(row["clip_model"])
        entry = ((self.summary.get("provenance") or {}).get("clip") or {}).get(spec)
        if entry:
            return dict(entry)
        ran = row.get("model_ran")
        if not ran:
            return {}
        return {"requested": spec, "ran": ran, "fallback": ran != spec, "random": is_random_spec(ran),
                "weights_sha256": row.get("weights_sha256"), "revision": row.get("revision")}

    def _model_cell(self, row: dict[str, Any]) -> Markup:
        """The model's name (a link to its page) and, when another model ran (a fallback) or its weights are
        random, what ran, marked."""
        note = ran_note(self._entry(row))
        if not note:
            return self._link(row["clip_model"])
        return join([self._link(row["clip_model"]), " ", tag("strong", note, class_="fallback")])

    def _weights_cell(self, row: dict[str, Any]) -> Markup:
        """The weights' short SHA-256 (the whole hash and the revision in its title), ``-`` without files."""
        entry = self._entry(row)
        sha = row.get("weights_sha256") or entry.get("weights_sha256")
        revision = row.get("revision") or entry.get("revision")
        if not sha:
            return tag("span", "random" if entry.get("random") else "-", class_="muted")
        title = f"sha256 {sha}" + (f", revision {revision}" if revision else "")
        return tag("code", short_sha(sha), title=title)

    def _severities(self) -> list[Any]:
        """Each model's caption-shift curve per graded corruption (nothing when no model was graded)."""
        per_model = self.summary.get("per_model") or {}
        curves = {spec: level_curve((name, t.get("mean_changed"))
                                    for name, t in (((per_model.get(spec) or {}).get("tcac") or {})
                                                    .get("transforms") or {}).items())
                  for spec in self.specs}
        curves = {spec: curve for spec, curve in curves.items() if curve}
        if not curves:
            return []
        return [tag("h3", "Graded corruptions: caption shift per severity level", id="severities"),
                tag("p", "Mean number of top-k captions that change once the image is degraded, at severity 1 "
                         "(mild) to 5 (severe); flatter is more robust. The leaderboard's corruption columns are "
                         "the means over the levels.", class_="muted"),
                self._chart("leaderboard_severity_shift", charts.severity_chart(curves, "mean captions changed"),
                            "caption shift per severity level, per model")]

    # -- where the models disagree ------------------------------------------------------------------------------

    def _disagreements(self) -> Callable[[], Markup]:
        title = tag("h2", "Where the models disagree", id="disagree")
        views = {spec: self.view.for_clip_model(spec) for spec in self.specs}
        cases: dict[str, dict[str, dict[str, Any]]] = {}
        for spec, view in views.items():
            table_ = view.read(DAF_CASES, ["image_id", "rank", "overlap", "clip_ids"])
            if table_ is not None:
                cases[spec] = {row["image_id"]: row for row in table_.to_pylist()}
        if len(cases) < 2:
            return lambda: join([title, missing("Disagreements", "The daf stage has not run for two or more of the "
                                                "models (no daf_cases rows to compare).",
                                                "Run: clipaudit daf --config CONFIG.")])
        found: dict[tuple[str, str, str], tuple[Any, ...]] = {}
        compared = [spec for spec in self.specs if spec in cases]
        for i, a in enumerate(compared):
            for b in compared[i + 1:]:
                for image_id in set(cases[a]) ^ set(cases[b]):
                    rank = (cases[a].get(image_id) or cases[b].get(image_id) or {}).get("rank")
                    found[(image_id, a, b)] = (rank is None, rank or 0, image_id, compared.index(a),
                                               compared.index(b))
        total = len(found)
        chosen = sorted(found, key=lambda key: found[key])[: max(self.cfg.daf_cases, 0)]
        wanted: dict[str, set[str]] = {}
        for image_id, a, b in chosen:
            for spec in (a, b):
                if image_id not in cases[spec]:
                    wanted.setdefault(spec, set()).add(image_id)
        lists = {spec: self._neighbour_lists(views[spec], ids, "clip") for spec, ids in wanted.items()}
        reference = self._neighbour_lists(views[compared[0]], {key[0] for key in chosen}, "reference")
        items = []
        for image_id, a, b in chosen:
            sides = []
            for spec in (a, b):
                case = cases[spec].get(image_id)
                ids = list((case or {}).get("clip_ids") or (lists.get(spec) or {}).get(image_id) or [])
                ref = reference.get(image_id) or []
                overlap = (case or {}).get("overlap")
                if case is None and ids and ref:
                    overlap = len(set(ids) & set(ref)) / max(len(ids), 1)
                sides.append({"spec": spec, "case": case, "overlap": overlap, "ref": set(ref),
                              "cells": [(i, self.thumbs.want(i)) for i in ids[:_MAX_NEIGHBOURS]]})
            ref_cells = [(i, self.thumbs.want(i)) for i in (reference.get(image_id) or [])[:_MAX_NEIGHBOURS]]
            items.append({"image_id": image_id, "key": self.thumbs.want(image_id), "sides": sides, "ref": ref_cells})

        def render() -> Markup:
            parts: list[Any] = [title, tag("p", "Images that one model's DAF picked as a failure case and another's "
                                                "did not: the image, then each model's nearest neighbours under its "
                                                "own image embedding (orange: not among the reference's). "
                                                f"{len(items)} of {num(total)} shown.", class_="muted")]
            if not items:
                parts.append(tag("p", "The models' DAF picked the same cases.", class_="muted"))
            for item in items:
                parts.append(self._disagreement(item))
            return join(parts)

        return render

    def _neighbour_lists(self, view: RunView, image_ids: set[str], role: str) -> dict[str, list[str]]:
        """image_id -> the ``role`` neighbour list of ``image_ids`` in ``view``'s ``neighbours`` rows (with several
        references, the first's)."""
        out: dict[str, list[str]] = {}
        ids = sorted(image_ids)
        for start in range(0, len(ids), 500):
            where = f"model = '{role}' AND {in_filter('image_id', ids[start:start + 500])}"
            only = view.first_reference_filter(NEIGHBOURS) if role == "reference" else None
            where = where if only is None else f"{where} AND {only}"
            table_ = view.read(NEIGHBOURS, ["image_id", "ids"], where=where)
            for row in [] if table_ is None else table_.to_pylist():
                out[row["image_id"]] = list(row.get("ids") or [])
        return out

    def _cell(self, key: str, image_id: str, class_: str = "") -> Markup:
        text = str((self.samples.get(image_id) or {}).get("caption") or "")
        return tag("div", self.thumbs.img(key, alt=text, title=image_id), tag("div", text, class_="cap"),
                   tag("div", image_id, class_="muted mono cap"), class_=f"cell {class_}".strip())

    def _disagreement(self, item: dict[str, Any]) -> Markup:
        image_id = item["image_id"]
        verdicts = []
        for side in item["sides"]:
            case = side["case"]
            verdict = (f"a DAF case for {side['spec']} (#{num(case.get('rank'))}, overlap "
                       f"{num(side['overlap'], 2)})" if case is not None else
                       f"not a case for {side['spec']} (overlap {num(side['overlap'], 2)})")
            verdicts.append(verdict)
        head = tag("div", tag("code", image_id), " \u00b7 ", join(verdicts, " \u00b7 "), class_="case-head")
        strips = []
        for side in item["sides"]:
            label = tag("div", tag("a", side["spec"], href=self.pages.get(side["spec"])),
                        tag("div", "DAF case" if side["case"] is not None else "not a case", class_="muted"),
                        class_="strip-label model")
            cells = [self._cell(key, i, "only-clip" if side["ref"] and i not in side["ref"] else "")
                     for i, key in side["cells"]]
            if not cells:
                cells = [tag("div", "no neighbour list for this image", class_="muted")]
            strips.append(tag("div", label, cells, class_="strip model-strip", data_clip_model=side["spec"]))
        if item["ref"]:
            strips.append(tag("div", tag("div", "reference neighbours", class_="strip-label ref"),
                              [self._cell(key, i) for i, key in item["ref"]], class_="strip"))
        query = self._cell(item["key"], image_id, "query")
        return tag("div", head, tag("div", query, tag("div", strips, class_="strips"), class_="case-body"),
                   class_="case disagreement", data_image_id=image_id)

    # -- the run ----------------------------------------------------------------------------------------------

    def _run(self) -> Callable[[], Markup]:
        def render() -> Markup:
            s = self.summary
            counts = s.get("counts") or {}
            rows = []
            for stage, info in (s.get("stages") or {}).items():
                status = ("ran" if info.get("ran") else tag("strong", "missing (did not run)"))
                rows.append((stage, status, tag("span", seconds(info.get("seconds")), class_="nowrap"),
                             info.get("summary") or ""))
            models = s.get("models") or {}
            return join([
                tag("h2", "Run", id="run"),
                tag("p", f"{num(counts.get('in'))} images in; reference model ",
                    tag("code", models.get("reference") or "-"), "; CLIP models: ",
                    join([self._link(spec) for spec in self.specs], ", "), ".", class_="muted"),
                table(["stage", "status", "time", "summary"], rows),
            ])

        return render
