"""Request ids, estimates and safe answer parsing."""

from __future__ import annotations

import pickle

import pytest

from clipaudit.llm.parse import ParseError, parse_failure_types, repair_request
from clipaudit.llm.requests import (
    LLMRequest,
    LLMResult,
    estimate_cost,
    estimate_request_tokens,
    estimate_tokens,
)

MESSAGES = [{"role": "system", "content": "You name failures."}, {"role": "user", "content": "Captions: ..."}]


def test_request_id_is_stable_and_covers_model_messages_params() -> None:
    a = LLMRequest("m", MESSAGES, {"temperature": 0.0, "max_tokens": 100})
    b = LLMRequest("m", [dict(m) for m in MESSAGES], {"max_tokens": 100, "temperature": 0.0})
    assert a.request_id == b.request_id and a == b and hash(a) == hash(b)
    assert len(a.request_id) == 24 and int(a.request_id, 16) >= 0
    assert LLMRequest("m2", MESSAGES, a.params).request_id != a.request_id
    assert LLMRequest("m", MESSAGES, {"temperature": 0.5}).request_id != a.request_id
    assert LLMRequest("m2", MESSAGES).prompt_hash == a.prompt_hash
    assert pickle.loads(pickle.dumps(a)).request_id == a.request_id


def test_token_and_cost_estimates() -> None:
    assert estimate_tokens("") == 0 and estimate_tokens("abcd") == 1 and estimate_tokens("abcde") == 2
    request = LLMRequest("m", [{"role": "user", "content": "x" * 400}], {"max_tokens": 50})
    assert estimate_request_tokens(request) == 3 + 4 + 100 + 50
    prices = {"gpt-x": (0.5, 1.5), "gpt-x-mini": (0.1, 0.2)}
    assert estimate_cost("gpt-x-mini-2025", 1000, 2000, prices) == pytest.approx(0.5)
    assert estimate_cost("gpt-x", 2000, 1000, prices) == pytest.approx(2.5)
    assert estimate_cost("other", 10, 10, prices) is None
    result = LLMResult("id", "ph", "m", "ok", text="t")
    assert result.ok and result.to_dict()["status"] == "ok"


@pytest.mark.parametrize(
    "answer",
    [
        (
            '{"failure_types": [{"name": "Counting", "description": "Miscounts objects."}, '
            '{"name": "Negation", "description": "Ignores not."}]}'
        ),
        "{'Counting': 'Miscounts objects.', 'Negation': 'Ignores not.'}",
        'Here you go:\n```json\n{"Counting": "Miscounts objects.", "Negation": "Ignores not."}\n```\nHope it helps.',
        (
            "Sure! {'failure_types': [{'name': 'Counting', 'description': 'Miscounts objects.'}, "
            "{'name': 'Negation', 'description': 'Ignores not.'}]} Let me know."
        ),
        '[["Counting", "Miscounts objects."], {"title": "Negation", "desc": "Ignores not."}]',
        '{"Counting": {"description": "Miscounts objects."}, "Negation": {"description": "Ignores not."}}',
    ],
)
def test_parse_accepts_json_python_fences_and_prose(answer: str) -> None:
    assert parse_failure_types(answer) == [("Counting", "Miscounts objects."), ("Negation", "Ignores not.")]


def test_parse_keeps_numbered_keys_as_names() -> None:
    answer = "{'Failure type 1': 'Confuses left and right.', 'Failure type 2': 'Misses small objects.'}"
    assert parse_failure_types(answer) == [
        ("Failure type 1", "Confuses left and right."),
        ("Failure type 2", "Misses small objects."),
    ]


@pytest.mark.parametrize(
    "answer",
    [
        "",
        "no structure at all",
        "{}",
        '{"failure_types": []}',
        "{'a': __import__('os').system('touch /tmp/clipaudit_pwned')}",
        "[1, 2, 3]",
        '{"a": 1',
        "x" * 200_000,
    ],
)
def test_parse_rejects_bad_answers_without_evaluating(answer: str) -> None:
    with pytest.raises(ParseError):
        parse_failure_types(answer)


def test_repair_request_asks_for_json_and_keeps_model() -> None:
    original = LLMRequest("m", MESSAGES, {"temperature": 0.7, "max_tokens": 200})
    repaired = repair_request(original, "bad answer")
    assert repaired.model == "m" and repaired.params["temperature"] == 0.0
    assert repaired.params["max_tokens"] == 200
    assert repaired.messages[: len(MESSAGES)] == MESSAGES
    assert repaired.messages[-2] == {"role": "assistant", "content": "bad answer"}
    assert "JSON" in repaired.messages[-1]["content"]
    assert repaired.request_id != original.request_id
