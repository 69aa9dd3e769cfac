"""Structured output from Python: `generate` and `stream` take json_schema (a dict or JSON text),
json_object, regex, choice and grammar; the output parses or matches; a constraint that does not
compile is a ValueError with llguidance's message."""

import json
import re

import pytest

from conftest import cli_json, MODELS, model

FIXTURE = "full-vocab-f16"

SCHEMA = {
    "type": "object",
    "properties": {
        "label": {"enum": ["spam", "ham"]},
        "score": {"type": "integer", "minimum": 0, "maximum": 9},
        "ok": {"type": "boolean"},
    },
    "required": ["label", "score", "ok"],
    "additionalProperties": False,
    # At most one space between JSON tokens, so that the object fits the fixture's context.
    "x-guidance": {"whitespace_pattern": " "},
}


def check(text):
    o = json.loads(text)
    assert o["label"] in ("spam", "ham") and 0 <= o["score"] <= 9 and isinstance(o["ok"], bool)


@pytest.mark.parametrize("schema", [SCHEMA, json.dumps(SCHEMA)])
def test_json_schema_output_parses(schema):
    m = model(FIXTURE)
    for seed in range(3):
        r = m.generate("Label:", max_tokens=50, seed=seed, json_schema=schema)
        check(r.text)
        assert r.finish_reason == "stop"


def test_json_object_regex_choice_and_grammar():
    m = model(FIXTURE)
    r = m.generate("Q:", max_tokens=20, seed=1, json_object=True)
    assert r.text.startswith("{")
    r = m.generate("Q:", max_tokens=20, seed=2, regex=r"[0-9]{3}-[a-z]{2}")
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", r.text), r.text
    for seed in range(3):
        r = m.generate("Q:", max_tokens=10, seed=seed, choice=["yes", "no", "n/a (skip)"])
        assert r.text in ("yes", "no", "n/a (skip)") and r.finish_reason == "stop"
    r = m.generate("Q:", max_tokens=20, seed=3, grammar='start: "<" /[xy]{2}/ ">"')
    assert re.fullmatch(r"<[xy]{2}>", r.text), r.text
    # A batch: every prompt constrained.
    for r in m.generate(["A", "B", "C"], max_tokens=10, seed=4, choice=["left", "right"]):
        assert r.text in ("left", "right")


def test_stream_is_constrained():
    m = model(FIXTURE)
    s = m.stream("Label:", max_tokens=50, seed=5, json_schema=SCHEMA)
    text = "".join(s)
    check(text)
    assert s.result.text == text


def test_a_constraint_never_changes_a_satisfying_token():
    m = model(FIXTURE)
    free = m.generate("Hello", max_tokens=12, temperature=0)
    same = m.generate("Hello", max_tokens=12, temperature=0, regex=r"(.|\n)*")
    assert same.tokens == free.tokens
    only = m.generate("Hello", max_tokens=12, temperature=0, choice=[free.text, "other"])
    assert only.tokens == free.tokens and only.finish_reason == "stop"


def test_the_cli_gives_the_same_constrained_tokens(tmp_path):
    m = model(FIXTURE)
    r = m.generate("Q:", max_tokens=20, seed=7, regex=r"[a-f]{5}")
    c = cli_json("generate", "--model", str(MODELS / FIXTURE), "--prompt", "Q:", "-n", "20",
                 "--seed", "7", "--regex", "[a-f]{5}")
    assert c["tokens"] == r.tokens


@pytest.mark.parametrize("kw, says", [
    ({"regex": "a(b"}, "unclosed group"),
    ({"json_schema": {"type": "no-such-type"}}, "no-such-type"),
    ({"json_schema": "{not json"}, "not valid JSON"),
    ({"grammar": "start: undefined_rule"}, "undefined_rule"),
    ({"choice": []}, "at least one"),
    ({"regex": "a", "choice": ["a"]}, "one constraint"),
    ({"regex": "a", "num_beams": 2}, "beam search"),
])
def test_bad_constraints_are_value_errors(kw, says):
    m = model(FIXTURE)
    with pytest.raises(ValueError, match=re.escape(says)):
        m.generate("Q:", max_tokens=5, **kw)
    if "num_beams" not in kw:
        with pytest.raises(ValueError, match=re.escape(says)):
            m.stream("Q:", max_tokens=5, **kw)
