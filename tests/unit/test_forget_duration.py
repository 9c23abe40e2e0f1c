"""`forget --finished-before DURATION`: the duration parser takes exactly a whole number and a unit (s, m, h, d, w),
each unit at most once, ASCII digits only, up to MAX_DURATION_S; anything else a user can type is a ValueError with a
one-line message quoting it, never another exception, a wrong value or a hang."""
from __future__ import annotations

import re

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from ziya_batch.jobs.forget import MAX_DURATION_S, UNIT_S, parse_duration

UNITS = "smhdw"


def _refused(text: str) -> str:
    with pytest.raises(ValueError) as err:
        parse_duration(text)
    message = str(err.value)
    assert "\n" not in message and len(message) < 200, message
    return message


@pytest.mark.parametrize("text,seconds", [
    ("30m", 1800), ("12h", 43200), ("7d", 604800), ("2w", 1209600), ("45s", 45), ("0s", 0), ("1d12h", 129600),
    ("12h1d", 129600), ("1w2d3h4m5s", 788645), ("007d", 604800), ("36500d", MAX_DURATION_S),
])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", [
    "", " ", "7", "d", "7 d", " 7d", "7d ", "7D", "7days", "1.5h", "1,5h", "-7d", "+7d", "7d-", "1e3s", "0x10s",
    "٧d", "７d", "7\u0000d", "7d\n", "1d1d", "1h30m1h", "36501d", "5215w", str(MAX_DURATION_S + 1) + "s",
    "9" * 31 + "s", "9" * 5000 + "s", "inf" + "s", "nans", "7d;rm -rf /",
])
def test_refused(text):
    _refused(text)


@given(st.dictionaries(st.sampled_from(UNITS), st.integers(0, 10**6), min_size=1))
def test_any_whole_numbers_of_distinct_units_read_back_as_their_sum(parts):
    text = "".join(f"{n}{unit}" for unit, n in parts.items())
    seconds = sum(n * UNIT_S[unit] for unit, n in parts.items())
    if seconds > MAX_DURATION_S or len(text) > 32:
        _refused(text)
    else:
        assert parse_duration(text) == seconds


@given(st.integers(min_value=-(10**40), max_value=10**40), st.sampled_from(UNITS))
@example(-1, "d")
@example(10**19, "s")
@example(2**63, "s")
@example(2**64 // 86400 + 1, "d")
def test_negative_and_overflowing_numbers_are_refused_not_wrapped(n, unit):
    text = f"{n}{unit}"
    if n < 0 or n * UNIT_S[unit] > MAX_DURATION_S:
        _refused(text)
    else:
        assert parse_duration(text) == n * UNIT_S[unit]


@given(st.text(max_size=40))
@example("٣d")          # Arabic-Indic three: int() and \d take it
@example("³d")          # superscript three: str.isdigit() says yes
@example("𝟕d")          # mathematical bold seven
@example("7ｄ")
def test_any_text_is_a_duration_or_one_line_value_error(text):
    try:
        seconds = parse_duration(text)
    except ValueError as err:
        assert "\n" not in str(err)
        return
    # accepted: then it was ASCII digits and units only, and means what it says
    assert re.fullmatch(r"(?:[0-9]+[smhdw])+", text, re.ASCII)
    assert 0 <= seconds <= MAX_DURATION_S
    assert seconds == sum(int(n) * UNIT_S[u] for n, u in re.findall(r"([0-9]+)([smhdw])", text))


@given(st.text(alphabet=st.characters(categories=["Nd"]), min_size=1, max_size=6), st.sampled_from(UNITS))
@example("999999", "w")
def test_only_ascii_digits_count(digits, unit):
    text = digits + unit
    if digits.isascii() and int(digits) * UNIT_S[unit] <= MAX_DURATION_S:
        assert parse_duration(text) == int(digits) * UNIT_S[unit]
    else:
        _refused(text)
