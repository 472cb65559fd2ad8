"""The report's "Benchmark" section: what ``clipaudit export`` would write from this run (counts by kind) and the
commands that export it and score models on it."""

from __future__ import annotations

import shlex
from collections.abc import Callable
from typing import Any

from clipaudit.report.html import Markup, join, num, table, tag
from clipaudit.run_view import RunView

ANCHOR = "benchmark"
TITLE = "Benchmark: export the findings, score any model"


def benchmark_section(view: RunView, missing: Callable[..., Markup]) -> Callable[[], Markup]:
    """The section for ``view`` (counted now, rendered later, like the report's other sections); ``missing`` makes
    the box shown when the run has no findings to export."""
    from clipaudit.benchmark.export import FINDINGS, plan_counts

    if not view.exists("samples") or not any(view.exists(name) for name in FINDINGS):
        return lambda: join([tag("h2", TITLE, id=ANCHOR), missing(
            "Benchmark", f"Nothing to export yet: none of the tables {', '.join(FINDINGS)} is in this run.",
            "Run the daf, tcac or validate stage first.")])
    counts = plan_counts(view)

    def render() -> Markup:
        pairs, left = counts["pairs"], counts["pairs_left_out"]
        rows: list[tuple[Any, ...]] = [
            ("pairs.parquet", "CLIP-blind pairs", num(pairs.get("blind_pair", 0))),
            ("pairs.parquet", "other DAF case pairs (a case and a CLIP-only neighbour)", num(pairs.get("daf_case", 0))),
            ("", "left out: their captions do not tell the images apart", num(sum(left.values()))),
            *(("invariance.parquet", f"TCAC probes: {transform}", num(n))
              for transform, n in counts["invariance"].items()),
            *(("text_pairs.parquet", f"caption pairs: {name}", num(n)) for name, n in counts["text_pairs"].items()),
        ]
        command = f"clipaudit export {view.label} BENCH_DIR"
        if view.clip_model is not None:
            command += f" --clip-model {shlex.quote(view.clip_model)}"
        return join([
            tag("h2", TITLE, id=ANCHOR),
            tag("p", "What an export of this run would contain (a versioned folder of Parquet files with a dataset "
                     "card; the TCAC probes are checked against their rebuilt caption pools when exported):",
                class_="muted"),
            table(["file", "kind", "rows"], rows, class_="benchmark"),
            tag("p", "Export, then score any image-text model on it (pair accuracy, invariance per transform, "
                     "text-pair separation, each with a 95% interval):"),
            tag("pre", tag("code", f"{command}\nclipaudit score BENCH_DIR --model SPEC [--model SPEC ...] "
                                   "--json scores.json")),
        ])

    return render
