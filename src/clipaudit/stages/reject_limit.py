"""The reject limit of the model stages: a stage fails only when the share of the rows it tried and rejected
passes ``embed.max_reject_share`` (5 % by default), and then says why: the top reasons, an example of each.

What a stage "tried" is counted by the stage: embed, the images it attempted (embedded or rejected by it, not the
inputs ingest rejected); tcac, the images it transformed. One rejected row never fails a stage, whatever the
share (a corpus of 14 images with one bad file goes on); a limit of 1 never fails a stage. The LLM stages have
no such limit: a failed request is an ``llm_calls`` row that a re-run sends again, not a permanent reject.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

from clipaudit.errors import ClipauditError

TOP_REASONS = 3
"""Reasons quoted in the message, most frequent first."""
_DETAIL_WIDTH = 200


class RejectLimitError(ClipauditError, RuntimeError):
    """More of a stage's rows were rejected than ``embed.max_reject_share`` allows."""


def check_reject_share(stage: str, tried: int, rejects: Iterable[Mapping[str, object]], limit: float,
                       unit: str = "rows") -> None:
    """Raise :class:`RejectLimitError` when more than one row and more than ``limit`` of ``tried`` were rejected.

    ``rejects`` are rows with ``reason``, ``item`` and ``detail`` (the ``rejects`` table's columns, or an
    ``llm_calls`` row mapped to them); the message names the top reasons with their counts and one example each.
    """
    rows = list(rejects)
    if len(rows) <= 1 or len(rows) / max(tried, 1) <= limit:
        return
    counts = Counter(str(row["reason"]) for row in rows)
    first: dict[str, Mapping[str, object]] = {}
    for row in rows:
        first.setdefault(str(row["reason"]), row)
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_REASONS]
    reasons = "; ".join(f"{reason} {n} (e.g. {_example(first[reason])})" for reason, n in top)
    more = f"; {len(counts) - len(top)} other reason(s)" if len(counts) > len(top) else ""
    where = (f"Each is a row of the rejects table (stage = '{stage}'); rejected rows are not tried again in this "
             f"run_dir: fix the cause and use a new run_dir (or delete those rows), or raise embed.max_reject_share")
    raise RejectLimitError(
        f"{stage}: {len(rows)} of {tried} {unit} rejected ({len(rows) / tried:.1%}), more than "
        f"embed.max_reject_share {limit:.1%}. Top reasons: {reasons}{more}. {where}")


def _example(row: Mapping[str, object]) -> str:
    detail = str(row.get("detail") or "")
    if len(detail) > _DETAIL_WIDTH:
        detail = detail[: _DETAIL_WIDTH - 3] + "..."
    return f"{row.get('item')}: {detail}" if detail else str(row.get("item"))
