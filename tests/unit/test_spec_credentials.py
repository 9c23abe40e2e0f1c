"""A job spec never carries credentials: a location with a user part is refused at submit, and the message that
says so shows the password masked (a spec is kept in Redis and manifest.json and shown by status and the API)."""
from __future__ import annotations

import pytest

SPEC = {"name": "t", "model": {"path": "/models/m"}, "input": ["/data/in.jsonl"], "output": {"path": "/data/out"}}


@pytest.mark.parametrize("field,value", [
    (("input",), ["https://alice:HunterPw@example.com/p.jsonl"]),
    (("output", "path"), "s3://AKIAKEY:AwsSecretKey@bucket/out"),
    (("model", "path"), "https://HfToken@example.com/models/m"),
    (("experience", "reward_url"), "http://bob:JudgePw@judge:9000/score"),
])
def test_a_spec_url_with_credentials_is_refused_without_quoting_them(field, value):
    # a spec is kept in Redis and manifest.json and shown by status and the API: credentials come from the environment
    from ziya_batch.errors import SpecError
    from ziya_batch.spec import parse_spec

    data = {**SPEC, "output": dict(SPEC["output"]), "model": dict(SPEC["model"])}
    target = data
    for key in field[:-1]:
        target = target.setdefault(key, {})
    target[field[-1]] = value
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    message = str(info.value)
    assert "no user or password in a URL" in message and ".".join(field) in message
    assert not any(w in message for w in ("HunterPw", "AwsSecretKey", "HfToken", "JudgePw")), message
    assert parse_spec(data, stored=True)        # a job queued by an earlier release stays readable


def test_a_spec_url_without_credentials_is_accepted():
    from ziya_batch.spec import parse_spec

    spec = parse_spec({**SPEC, "input": ["s3://bucket/in/ziya@v2/*.jsonl"], "output": {"path": "s3://bucket/out"},
                       "experience": {"reward_url": "http://judge:9000/score"}})
    assert spec.input == ["s3://bucket/in/ziya@v2/*.jsonl"]

