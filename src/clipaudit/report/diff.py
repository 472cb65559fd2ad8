"""``clipaudit diff A B``: what changed between two runs (nightly audits).

A and B are run directories, or ``RUN_DIR@RUN_ID`` / ``RUN_DIR@previous`` for a finished run of a directory read
back through the LanceDB tags it left (:mod:`clipaudit.runs`). The figures come from each run's summary
(``summary.json``, ``history/<run_id>/summary.json``, or computed from the tables when the report stage did not
run); the corpus overlap from the two ``samples`` tables. Failure types are matched by method and name (case,
spacing and punctuation ignored; a name merged into a type as an alias matches it too).

The comparison opens with the weights each model ran with (:func:`models_comparison`, from each run's recorded
provenance, ``RUN_DIR/models.json`` as the summary carries it): the findings of two runs compare only as far as
their models do.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from clipaudit.records import SAMPLES
from clipaudit.report.summary import load_summary
from clipaudit.run_models import entries, run_provenance, short_sha
from clipaudit.run_view import RunView

_COUNTS = ("in", "embedded", "rejected", "rejects", "captions_embedded")
_DAF = ("mean_overlap", "median_overlap", "chance_overlap", "alignment_over_chance", "null_p_value", "cases",
        "blind_pairs")
_TCAC = ("mean_changed", "top1_changed_share", "recall_at_1_before", "recall_at_1_after", "mean_tv_distance",
         "images", "cases")
_EXAMPLES = 5
_IDENTITY = ("ran", "weights_sha256", "revision")
"""What makes two runs' entries of one model the same weights: the model that ran, its weights' hash and revision."""
_ENTRY_KEYS = ("ran", "fallback", "random", "backend", "source", "revision", "weights_sha256")
MODEL_STATUSES = ("same", "changed", "fallback", "only_a", "only_b", "unknown")
"""A model's status in :func:`models_comparison`: the same weights in both runs; other weights or another revision
(``changed``); a fallback or random weights in one run and real weights in the other (``fallback``); in one run
only; in a run whose provenance is unknown (``unknown``: no ``models.json``, a run from before it was recorded)."""


def normalise_name(name: str) -> str:
    """A failure type name for matching: lower case, letters and digits only, single spaces."""
    return " ".join(re.findall(r"[a-z0-9]+", str(name).lower()))


def _change(a: Any, b: Any) -> dict[str, Any]:
    delta = b - a if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) else None
    return {"a": a, "b": b, "delta": delta}


def _changes(a: dict[str, Any] | None, b: dict[str, Any] | None, keys: Iterable[str]) -> dict[str, Any]:
    a, b = a or {}, b or {}
    return {key: _change(a.get(key), b.get(key)) for key in keys if a.get(key) is not None or b.get(key) is not None}


def corpus_overlap(a: RunView, b: RunView) -> dict[str, Any] | None:
    """Image ids in both runs' ``samples`` tables, only in one of them, and the Jaccard index; None when either run
    has no samples table."""
    ta, tb = a.read(SAMPLES, ["image_id"]), b.read(SAMPLES, ["image_id"])
    if ta is None or tb is None:
        return None
    ids_a, ids_b = set(ta.column("image_id").to_pylist()), set(tb.column("image_id").to_pylist())
    both, union = ids_a & ids_b, ids_a | ids_b
    return {"a": len(ids_a), "b": len(ids_b), "both": len(both), "only_a": len(ids_a - ids_b),
            "only_b": len(ids_b - ids_a), "jaccard": len(both) / len(union) if union else 1.0,
            "examples_only_a": sorted(ids_a - ids_b)[:_EXAMPLES], "examples_only_b": sorted(ids_b - ids_a)[:_EXAMPLES]}


def _type_keys(item: dict[str, Any]) -> set[tuple[str, str, str]]:
    """What identifies a failure type across runs: its namer, method and name (or aliases). A caption-contrast
    type is its family (``spatial position``), whatever its top terms this time."""
    method = str(item.get("method") or "")
    namer = str(item.get("namer") or "llm")
    if namer == "caption_contrast":
        return {(namer, method, normalise_name(str(item["name"]).split(" (")[0]))}
    return {(namer, method, normalise_name(n)) for n in [item["name"], *(item.get("aliases") or [])]}


def failure_type_changes(a: list[dict[str, Any]] | None, b: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """New, gone and changed failure types between two taxonomies (None when neither run has one)."""
    if a is None and b is None:
        return None
    in_a, in_b = a is not None, b is not None
    a, b = a or [], b or []
    index = {}
    for item in a:
        for key in _type_keys(item):
            index.setdefault(key, item)
    matched: set[int] = set()
    new, changed, same = [], [], 0
    for item in b:
        previous = next((index[key] for key in sorted(_type_keys(item)) if key in index), None)
        if previous is None:
            new.append(_brief(item))
            continue
        matched.add(id(previous))
        support = _change(previous.get("support"), item.get("support"))
        rate = _change(previous.get("success_rate"), item.get("success_rate"))
        if support["delta"] or (rate["a"] != rate["b"]):
            changed.append({"method": item["method"], "name": item["name"], "name_a": previous["name"],
                            "support": support, "success_rate": rate})
        else:
            same += 1
    gone = [_brief(item) for item in a if id(item) not in matched]
    return {"new": new, "gone": gone, "changed": changed, "unchanged": same, "a": len(a), "b": len(b),
            "in_a": in_a, "in_b": in_b}


def _brief(item: dict[str, Any]) -> dict[str, Any]:
    return {key: item.get(key) for key in ("method", "name", "description", "support", "success_rate")}


def run_models_provenance(view: RunView, summary: Mapping[str, Any]) -> dict[str, Any] | None:
    """The recorded provenance of a run's models (``{"clip": {SPEC: entry}, "reference": {...}}``), None where it
    is unknown: the summary's ``provenance``; for the latest run of a directory whose summary predates it,
    ``RUN_DIR/models.json`` read as the summary would have (a tagged run's summary is its only record)."""
    if "provenance" in summary:
        return summary.get("provenance")
    if view.version is not None:
        return None
    return run_provenance(view.run_dir, view.config(), view.clip_model)


def _entry(entry: Mapping[str, Any]) -> dict[str, Any]:
    return {key: entry.get(key) for key in _ENTRY_KEYS}


def _random(entry: Mapping[str, Any]) -> bool:
    return bool(entry.get("fallback") or entry.get("random"))


def _model_row(role: str, spec: str, a: Mapping[str, Any] | None, b: Mapping[str, Any] | None,
               known_a: bool, known_b: bool) -> dict[str, Any]:
    """One model's comparison (see :data:`MODEL_STATUSES`)."""
    row: dict[str, Any] = {"role": role, "spec": spec, "a": None if a is None else _entry(a),
                           "b": None if b is None else _entry(b), "differs": []}
    if a is None or b is None:
        status = "unknown" if not (known_a and known_b) else "only_b" if a is None else "only_a"
        return {**row, "status": status}
    differs = [key for key in _IDENTITY if a.get(key) != b.get(key)]
    if _random(a) != _random(b):
        return {**row, "status": "fallback", "differs": differs, "random_in": "A" if _random(a) else "B"}
    return {**row, "status": "changed" if differs else "same", "differs": differs}


def models_comparison(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> dict[str, Any]:
    """The weights of every model (by role and spec) in either run's provenance (see
    :func:`run_models_provenance`; None: unknown), as plain data: ``known_a`` / ``known_b``, ``models`` (a row per
    model: ``role``, ``spec``, ``status`` (one of :data:`MODEL_STATUSES`), each run's entry or None, the fields
    that ``differs``, and for a ``fallback`` the run with random weights, ``random_in``), ``counts`` per status,
    and ``warnings`` (a sentence per model that ran random weights in one run and real ones in the other)."""
    specs = list(dict.fromkeys((role, spec) for role, spec, _ in [*entries(a), *entries(b)]))
    rows = [_model_row(role, spec, ((a or {}).get(role) or {}).get(spec), ((b or {}).get(role) or {}).get(spec),
                       a is not None, b is not None) for role, spec in specs]
    warnings = [f"{row['role']} {row['spec']}: random weights in {row['random_in']} "
                f"({_weights_text(row[row['random_in'].lower()])}) but real weights in "
                f"{'B' if row['random_in'] == 'A' else 'A'}: this diff compares a random model with a real one"
                for row in rows if row["status"] == "fallback"]
    return {"known_a": a is not None, "known_b": b is not None, "models": rows,
            "counts": {status: sum(row["status"] == status for row in rows) for status in MODEL_STATUSES},
            "warnings": warnings}


def _side(view: RunView, summary: dict[str, Any]) -> dict[str, Any]:
    return {"label": view.label, "run_id": summary.get("run_id"), "models": summary.get("models") or {},
            "random_models": summary.get("random_models")}


def diff_runs(a: RunView, b: RunView) -> dict[str, Any]:
    """Everything that changed from run ``a`` to run ``b`` as plain data (what ``--json`` writes).

    When both runs audited several CLIP-role models (their summaries have ``per_model``), the top level compares
    the first model of each, and ``per_model`` holds the same comparison for every model in both runs, with
    ``clip_models`` (in both, only in A, only in B) and ``leaderboard`` (each common model's rank and blindness
    change). ``provenance`` compares the weights of all the models of both runs (:func:`models_comparison`)."""
    sa, sb = load_summary(a), load_summary(b)
    corpus = corpus_overlap(a, b)
    out = _diff_summaries(a, b, sa, sb, corpus)
    out["provenance"] = models_comparison(run_models_provenance(a, sa), run_models_provenance(b, sb))
    per_a, per_b = sa.get("per_model"), sb.get("per_model")
    if isinstance(per_a, dict) and isinstance(per_b, dict):
        specs_a = list(sa.get("clip_models") or per_a)
        specs_b = list(sb.get("clip_models") or per_b)
        both = [spec for spec in specs_a if spec in per_b]
        out["clip_models"] = {"both": both, "only_a": [s for s in specs_a if s not in per_b],
                              "only_b": [s for s in specs_b if s not in per_a]}
        out["per_model"] = {spec: _diff_summaries(a, b, per_a[spec], per_b[spec], corpus) for spec in both}
        board_a = {row.get("clip_model"): row for row in sa.get("leaderboard") or []}
        board_b = {row.get("clip_model"): row for row in sb.get("leaderboard") or []}
        out["leaderboard"] = None if not board_a and not board_b else {
            spec: {"rank": _change((board_a.get(spec) or {}).get("rank"), (board_b.get(spec) or {}).get("rank")),
                   "blindness": _change((board_a.get(spec) or {}).get("blindness"),
                                        (board_b.get(spec) or {}).get("blindness"))}
            for spec in both}
    return out


def _diff_summaries(a: RunView, b: RunView, sa: dict[str, Any], sb: dict[str, Any],
                    corpus: dict[str, Any] | None) -> dict[str, Any]:
    """The comparison of two summaries (of two runs, or of one CLIP model in each)."""
    models_a, models_b = sa.get("models") or {}, sb.get("models") or {}
    stages_a, stages_b = sa.get("stages") or {}, sb.get("stages") or {}
    ta, tb = (sa.get("tcac") or {}).get("transforms") or {}, (sb.get("tcac") or {}).get("transforms") or {}
    return {
        "a": _side(a, sa),
        "b": _side(b, sb),
        "models_changed": {role: _change(models_a.get(role), models_b.get(role))
                           for role in sorted(set(models_a) | set(models_b))
                           if models_a.get(role) != models_b.get(role)},
        "corpus": corpus,
        "counts": _changes(sa.get("counts"), sb.get("counts"), _COUNTS),
        "daf": None if sa.get("daf") is None and sb.get("daf") is None else {
            "in_a": sa.get("daf") is not None, "in_b": sb.get("daf") is not None,
            **_changes(sa.get("daf"), sb.get("daf"), _DAF)},
        "tcac": None if not ta and not tb else {
            "only_a": sorted(set(ta) - set(tb)), "only_b": sorted(set(tb) - set(ta)),
            "transforms": {name: _changes(ta.get(name), tb.get(name), _TCAC) for name in [*ta, *[t for t in tb
                                                                                               if t not in ta]]}},
        "failure_types": failure_type_changes(sa.get("failure_types"), sb.get("failure_types")),
        "stages": {"ran_in_a_only": sorted(s for s, i in stages_a.items() if i.get("ran") and s != "report"
                                           and not (stages_b.get(s) or {}).get("ran")),
                   "ran_in_b_only": sorted(s for s, i in stages_b.items() if i.get("ran") and s != "report"
                                           and not (stages_a.get(s) or {}).get("ran"))},
    }


def _fmt(value: Any, share: bool = False) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{100 * value:.1f}%" if share else f"{value:.3f}"
    return str(value)


def _delta(change: dict[str, Any], share: bool = False) -> str:
    text = f"{_fmt(change['a'], share)} -> {_fmt(change['b'], share)}"
    delta = change.get("delta")
    if delta is None:
        return text
    if share:
        return f"{text} ({100 * delta:+.1f} pp)"
    return f"{text} ({delta:+,})" if isinstance(delta, int) else f"{text} ({delta:+.3f})"


def format_diff(d: dict[str, Any]) -> str:
    """The diff as text for a terminal or a nightly log (a block per CLIP model when both runs audited several)."""
    a, b = d["a"], d["b"]
    lines = [f"A: {a['label']} (run {a.get('run_id') or '-'})", f"B: {b['label']} (run {b.get('run_id') or '-'})"]
    if d.get("provenance") is not None:
        lines += models_lines(d["provenance"])
    if "per_model" not in d:
        return "\n".join(lines + _body_lines(d)) + "\n"
    models = d.get("clip_models") or {}
    lines.append(f"CLIP models: {len(models.get('both') or [])} in both runs"
                 + (f"; only in A: {', '.join(models['only_a'])}" if models.get("only_a") else "")
                 + (f"; only in B: {', '.join(models['only_b'])}" if models.get("only_b") else ""))
    board = d.get("leaderboard")
    if board is None:
        lines.append("leaderboard: missing in both runs")
    else:
        lines.append("leaderboard (rank; blindness):")
        for spec, change in board.items():
            rank = change["rank"]
            delta = rank.get("delta")
            moved = f" ({'up' if delta < 0 else 'down'} {abs(delta)})" if delta else ""
            lines.append(f"  {spec}: rank {_fmt(rank['a'])} -> {_fmt(rank['b'])}{moved}; blindness "
                         f"{_delta(change['blindness'])}")
    lines.append(_corpus_line(d.get("corpus")))
    for spec, diff in d["per_model"].items():
        lines.append(f"== CLIP model {spec} ==")
        lines += ["  " + line for line in _body_lines(diff, with_corpus=False)]
    return "\n".join(lines) + "\n"


_STATUS_WORDS = {"same": "same", "changed": "changed", "fallback": "random in one run, real in the other",
                 "only_a": "only in A", "only_b": "only in B"}
_DIFFERS_WORDS = {"ran": "model that ran", "weights_sha256": "weights", "revision": "revision"}


def _weights_text(entry: Mapping[str, Any], with_revision: bool = False) -> str:
    """One run's weights of a model: ``ran tiny-clip (fallback, RANDOM), no weight files (random (seeded))``,
    ``sha256 1a2b3c4d5e6f, revision 0123456789ab`` (``with_revision``: the revision even when there is none)."""
    parts = []
    if entry.get("fallback"):
        parts.append(f"ran {entry.get('ran')} (fallback{', RANDOM' if entry.get('random') else ''})")
    elif entry.get("random"):
        parts.append("RANDOM weights")
    sha = entry.get("weights_sha256")
    parts.append(f"sha256 {short_sha(sha)}" if sha else f"no weight files ({entry.get('source') or 'unknown source'})")
    if entry.get("revision") or with_revision:
        parts.append(f"revision {short_sha(entry.get('revision')) or '-'}")
    return ", ".join(parts)


def _model_line(row: Mapping[str, Any]) -> str:
    name, a, b = f"{row['role']} {row['spec']}", row["a"], row["b"]
    status = row["status"]
    if status == "same":
        return f"  = {name}: same weights ({_weights_text(a)})"
    if status == "changed":
        what = ", ".join(_DIFFERS_WORDS[key] for key in row["differs"])
        return (f"  ~ {name}: CHANGED ({what}): A {_weights_text(a, with_revision=True)}; "
                f"B {_weights_text(b, with_revision=True)}")
    if status == "fallback":
        return (f"  ! {name}: RANDOM in {row['random_in']}, real weights in the other: A {_weights_text(a)}; "
                f"B {_weights_text(b)}")
    if status == "only_a":
        return f"  - {name}: only in A ({_weights_text(a)})"
    if status == "only_b":
        return f"  + {name}: only in B ({_weights_text(b)})"
    side, known = ("A", b) if a is None else ("B", a)
    return f"  ? {name}: provenance unknown in {side}; {'B' if side == 'A' else 'A'} {_weights_text(known)}"


def models_lines(p: Mapping[str, Any]) -> list[str]:
    """The text of :func:`models_comparison`: a count line, a line per model, and a WARNING per model that ran
    random weights in one run and real ones in the other."""
    unknown = [side for side in ("A", "B") if not p[f"known_{side.lower()}"]]
    why = "no models.json: written before provenance was recorded"
    if len(unknown) == 2:
        return [f"models (weights): provenance unknown in A and B ({why})"]
    counts = "; ".join(f"{n} {_STATUS_WORDS[status]}" for status, n in p["counts"].items()
                       if n and status != "unknown")
    head = f"models (weights): {counts or 'none recorded'}"
    if unknown:
        head = f"models (weights): provenance unknown in {unknown[0]} ({why})"
    return [head, *map(_model_line, p["models"]), *(f"WARNING: {warning}" for warning in p["warnings"])]


def _corpus_line(corpus: dict[str, Any] | None) -> str:
    if not corpus:
        return "corpus: no samples table in one of the runs"
    return (f"corpus: A {corpus['a']:,} images, B {corpus['b']:,}; {corpus['both']:,} in both (Jaccard "
            f"{corpus['jaccard']:.3f}); {corpus['only_a']:,} only in A, {corpus['only_b']:,} only in B")


def _body_lines(d: dict[str, Any], with_corpus: bool = True) -> list[str]:
    """The lines of one comparison after the A / B header (``with_corpus``: with the corpus overlap line)."""
    a, b = d["a"], d["b"]
    lines: list[str] = []
    if d["models_changed"]:
        lines.append("models changed: " + "; ".join(f"{role} {c['a']} -> {c['b']}"
                                                    for role, c in d["models_changed"].items()))
    else:
        lines.append("models: same (" + ", ".join(f"{r} {s}" for r, s in (a.get("models") or {}).items()) + ")")
    if a.get("random_models") or b.get("random_models"):
        lines.append("WARNING: random models in " + " and ".join(x for x, s in (("A", a), ("B", b))
                                                                 if s.get("random_models"))
                     + ": their findings are meaningless")
    if with_corpus:
        lines.append(_corpus_line(d.get("corpus")))
    if d["counts"]:
        lines.append("counts: " + "; ".join(f"{key} {_delta(c)}" for key, c in d["counts"].items()))
    daf = d.get("daf")
    if daf is None:
        lines.append("DAF: missing in both runs")
    else:
        where = "" if daf["in_a"] and daf["in_b"] else f" (missing in {'A' if not daf['in_a'] else 'B'})"
        lines.append("DAF" + where + ": " + "; ".join(f"{key} {_delta(daf[key])}" for key in _DAF if key in daf))
    tcac = d.get("tcac")
    if tcac is None:
        lines.append("TCAC: missing in both runs")
    else:
        lines.append("TCAC per transform (mean changed; top-1 changed share):")
        for name, figures in tcac["transforms"].items():
            parts = [_delta(figures["mean_changed"]) if "mean_changed" in figures else "-",
                     _delta(figures["top1_changed_share"], share=True) if "top1_changed_share" in figures else "-"]
            only = " (only in A)" if name in tcac["only_a"] else " (only in B)" if name in tcac["only_b"] else ""
            lines.append(f"  {name}{only}: {parts[0]}; {parts[1]}")
    types = d.get("failure_types")
    if types is None:
        lines.append("failure types: missing in both runs")
    else:
        count_a = types["a"] if types["in_a"] else "missing"
        count_b = types["b"] if types["in_b"] else "missing"
        lines.append(f"failure types: A {count_a}, B {count_b}: {len(types['new'])} new, {len(types['gone'])} "
                     f"gone, {len(types['changed'])} changed, {types['unchanged']} unchanged")
        lines += [f"  + new   {t['method']}: {t['name']} (support {_fmt(t['support'])})" for t in types["new"]]
        lines += [f"  - gone  {t['method']}: {t['name']} (support {_fmt(t['support'])})" for t in types["gone"]]
        for t in types["changed"]:
            lines.append(f"  ~ {t['method']}: {t['name']}: support {_delta(t['support'])}; success rate "
                         f"{_delta(t['success_rate'], share=True)}")
    stages = d["stages"]
    for key, label in (("ran_in_a_only", "ran in A only"), ("ran_in_b_only", "ran in B only")):
        if stages[key]:
            lines.append(f"stages {label}: {', '.join(stages[key])}")
    return lines


def new_failure_types(d: dict[str, Any]) -> list[str]:
    """The failure types of the later run that the earlier one did not have, for any CLIP-role model (``SPEC:
    name`` for a model of a several-model run)."""
    per_model = d.get("per_model")
    if not per_model:
        return [str(_name(item)) for item in (d.get("failure_types") or {}).get("new") or []]
    return [f"{spec}: {_name(item)}" for spec, diff in per_model.items()
            for item in (diff.get("failure_types") or {}).get("new") or []]


def _name(item: Any) -> Any:
    return item.get("name", item) if isinstance(item, dict) else item
