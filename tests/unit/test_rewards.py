"""The built-in verifiable rewards of ziya_batch.rewards."""
import pytest

from ziya_batch.rewards import exact_match, final_answer, json_schema, math_answer, parse_number


@pytest.mark.parametrize("response,answer,want", [
    ("Paris", "paris", 1.0), ("  Paris. ", "Paris", 1.0), ("ＰＡＲＩＳ", "paris", 1.0), ("Lyon", "Paris", 0.0),
    ("B", ["A", "b"], 1.0),
])
def test_exact_match(response, answer, want):
    assert exact_match("q", response, {"answer": answer}) == want


def test_a_missing_label_raises_with_its_name():
    with pytest.raises(ValueError, match="'answer'"):
        exact_match("q", "x", {})
    with pytest.raises(ValueError, match="'answer'"):
        math_answer("q", "x", None)


@pytest.mark.parametrize("response,answer,want", [
    ("so the answer is \\boxed{42}.", "42", 1.0),
    ("first 3, then \\boxed{\\frac{3}{4}}", 0.75, 1.0),
    ("it costs $1,234.50 in total", "1234.5", 1.0),
    ("\\boxed{7} wait no, \\boxed{8}", 7, 0.0),
    ("half is 1/2", "\\boxed{0.5}", 1.0),
    ("\\boxed{50\\%}", 0.5, 1.0),
    ("The answer is 13", 12, 0.0),
    ("no number here", 3, 0.0),
    ("\\boxed{x^2 + 1}", "x^2+1", 0.0),
    ("\\boxed{\\text{yes}}", "\\text{yes}", 1.0),
])
def test_math_answer(response, answer, want):
    assert math_answer("q", response, {"answer": answer}) == want


def test_number_parsing_and_final_answer():
    assert parse_number("\\frac{1}{3}") == parse_number("1/3")
    assert parse_number("abc") is None
    assert final_answer("a 1 b 2 c 3.5") == "3.5"
    assert final_answer("\\boxed{a{b}c} 9") == "a{b}c"


SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}


@pytest.mark.parametrize("response,want", [
    ('{"n": 3}', 1.0), ('```json\n{"n": 3}\n```', 1.0), ('{"n": "3"}', 0.0), ("not json", 0.0), ("{}", 0.0),
])
def test_json_schema(response, want):
    assert json_schema("q", response, {"schema": SCHEMA}) == want
    assert json_schema("q", response, {"schema": '{"type": "object", "required": ["n"]}'}) == (
        1.0 if response.strip("`json\n").startswith('{"n"') else 0.0)


def test_json_schema_refuses_a_bad_schema():
    import jsonschema

    with pytest.raises(jsonschema.SchemaError):
        json_schema("q", "{}", {"schema": {"type": "no-such-type"}})
