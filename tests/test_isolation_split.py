"""Per-row fault isolation: the split-in-halves retry, the encoders that use it, and the reject limit."""

from __future__ import annotations

import numpy as np
import pytest

from clipaudit.batches.embed import FORWARD_FAILED, OK, ImageEncoder, TextEncoder
from clipaudit.batches.isolation import describe, run_isolated
from clipaudit.config import ConfigError, load_config
from clipaudit.stages.reject_limit import RejectLimitError, check_reject_share


def _doubler(bad: set[int], calls: list[list[int]]):
    def fn(part: np.ndarray) -> list[int]:
        calls.append(part.tolist())
        if bad & set(part.tolist()):
            raise RuntimeError(f"bad row in {part.tolist()}")
        return [2 * p for p in part.tolist()]
    return fn


def test_no_error_is_one_call() -> None:
    calls: list[list[int]] = []
    found = run_isolated(_doubler(set(), calls), 8)
    assert found.results == [0, 2, 4, 6, 8, 10, 12, 14]
    assert found.errors == {} and found.calls == 1 and calls == [list(range(8))]


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 100])
def test_one_bad_row_is_isolated_in_log_calls(n: int) -> None:
    bad = n // 2
    found = run_isolated(_doubler({bad}, []), n)
    assert set(found.errors) == {bad}
    assert isinstance(found.errors[bad], RuntimeError)
    assert found.results == [None if i == bad else 2 * i for i in range(n)]
    assert found.calls <= 2 * int(np.ceil(np.log2(max(n, 2)))) + 1
    assert found.ok.tolist() == [i != bad for i in range(n)]


def test_every_row_bad_is_bounded() -> None:
    n = 37
    found = run_isolated(_doubler(set(range(n)), []), n)
    assert set(found.errors) == set(range(n)) and all(r is None for r in found.results)
    assert found.calls == 2 * n - 1


def test_a_batch_that_fails_only_when_large_is_recomputed_in_parts() -> None:
    """An out-of-memory failure of a too-large batch: no row is bad, every row gets its result."""
    def fn(part: np.ndarray) -> list[int]:
        if len(part) > 4:
            raise MemoryError("CUDA out of memory")
        return part.tolist()

    found = run_isolated(fn, 19)
    assert found.errors == {} and found.results == list(range(19))


def test_wrong_result_count_counts_as_failure() -> None:
    found = run_isolated(lambda part: [0] * (len(part) + (3 in part.tolist())), 6)
    assert set(found.errors) == {3} and "results for 1 rows" in str(found.errors[3])


def test_empty_batch_makes_no_call() -> None:
    found = run_isolated(lambda part: (_ for _ in ()).throw(AssertionError("called")), 0)
    assert found.calls == 0 and found.results == []


def test_describe_names_type_and_message() -> None:
    assert describe(ValueError("no"), "forward (clip)") == "forward (clip): ValueError: no"


class _Model:
    """A loaded-model stand-in whose forward raises on a marked row (pixel value 13, text 'poison')."""

    dim = 3
    logit_scale = 100.0

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        if (pixels[:, 0, 0, 0] == 13).any():
            raise RuntimeError("linalg error on one image")
        out = np.ones((len(pixels), self.dim), np.float32) * pixels[:, :1, 0, 0]
        out[pixels[:, 0, 0, 0] == 7] = np.nan
        return out

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        if "poison" in texts:
            raise ValueError("tokenizer cannot read this text")
        return np.ones((len(texts), self.dim), np.float32)


class _Resolved:
    def load(self, device: str) -> _Model:
        return _Model()


def test_image_encoder_rejects_the_rows_that_raise_or_give_nan() -> None:
    n = 10
    pixels = np.zeros((n, 3, 2, 2), np.float32)
    pixels[:, 0, 0, 0] = np.arange(n) + 5
    batch = {"image_id": np.array([f"i{k}" for k in range(n)], dtype=object),
             "status": np.full(n, OK, dtype=object), "detail": np.full(n, "", dtype=object),
             "need_clip": np.ones(n, bool), "pixels_clip": pixels}
    batch["status"][0] = "truncated"
    out = ImageEncoder(_Resolved(), "clip")(batch)
    assert out["status"].tolist() == ["truncated", OK, FORWARD_FAILED] + [OK] * 5 + [FORWARD_FAILED, OK]
    assert out["detail"][8] == "forward (clip): RuntimeError: linalg error on one image"
    assert "FloatingPointError" in out["detail"][2]
    assert np.isfinite(out["vector_clip"]).all()
    assert out["vector_clip"][1].tolist() == [6.0, 6.0, 6.0] and not out["vector_clip"][8].any()
    assert batch["status"][8] == OK


def test_text_encoder_rejects_the_text_that_breaks_the_tokenizer() -> None:
    texts = np.array(["a dog", "poison", "a cat"], dtype=object)
    out = TextEncoder(_Resolved(), "clip")({"text": texts})
    assert out["status"].tolist() == [OK, FORWARD_FAILED, OK]
    assert out["detail"][1] == "text forward (clip): ValueError: tokenizer cannot read this text"
    assert out["vector_clip"][0].tolist() == [1.0, 1.0, 1.0] and not out["vector_clip"][1].any()


def _rejects(reasons: list[str]) -> list[dict[str, str]]:
    return [{"item": f"img{i}", "reason": r, "detail": f"{r} detail {i}"} for i, r in enumerate(reasons)]


def test_reject_share_at_the_limit_passes() -> None:
    check_reject_share("embed", 40, _rejects(["truncated"] * 2), 0.05)
    check_reject_share("embed", 0, [], 0.05)


def test_one_reject_never_fails_a_stage() -> None:
    check_reject_share("tcac", 3, _rejects(["transform_failed"]), 0.05)


def test_reject_share_past_the_limit_names_top_reasons_with_examples() -> None:
    rows = _rejects(["forward_failed"] * 3 + ["truncated"] * 2 + ["zero_bytes", "too_large"])
    with pytest.raises(RejectLimitError) as err:
        check_reject_share("embed", 50, rows, 0.05, "images")
    message = str(err.value)
    assert "embed: 7 of 50 images rejected (14.0%), more than embed.max_reject_share 5.0%" in message
    assert "forward_failed 3 (e.g. img0: forward_failed detail 0)" in message
    assert "truncated 2 (e.g. img3: truncated detail 3)" in message
    assert "1 other reason(s)" in message and "rejects table (stage = 'embed')" in message


def test_max_reject_share_is_typed_and_validated() -> None:
    assert load_config(None, []).embed.max_reject_share == 0.05
    assert load_config(None, ["embed.max_reject_share=0.2"]).embed.max_reject_share == 0.2
    with pytest.raises(ConfigError, match="embed.max_reject_share"):
        load_config(None, ["embed.max_reject_share=1.5"])
    with pytest.raises(ConfigError, match="embed.max_reject_share"):
        load_config(None, ["embed.max_reject_share=lots"])


def test_validate_drops_only_the_pair_whose_caption_cannot_be_embedded() -> None:
    from clipaudit.stages.validate import pair_similarities

    def encode(texts: list[str]) -> np.ndarray:
        if "\x00broken" in texts:
            raise UnicodeError("the tokenizer cannot read this caption")
        return np.asarray([[1.0, float(len(t))] for t in texts], np.float32)

    sims, errors = pair_similarities(["a", "b", "\x00broken"], ["a", "bb", "c"], encode)
    assert list(errors) == [2] and "UnicodeError: the tokenizer cannot read this caption" in errors[2]
    assert sims[0] == pytest.approx(1.0) and 0 < sims[1] < 1 and np.isnan(sims[2])
