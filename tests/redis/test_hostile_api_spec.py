"""A spec sent over HTTP gets the same bounds as one loaded from a file: no NaN or infinity in any float field,
and a wrong value quoted short in a one-line 422."""
from __future__ import annotations

import json

from api_support import AUTH, job_spec


def test_non_finite_and_huge_values_over_http_are_one_short_422(api_env):
    data, models, make_client = api_env
    client = make_client()
    for sampling in ('{"temperature": NaN}', '{"top_p": Infinity}', '{"repetition_penalty": -Infinity}'):
        body = json.dumps(job_spec(data, models)).replace('"sampling": {"max_new_tokens": 4}',
                                                          f'"sampling": {sampling}')
        assert sampling in body
        r = client.post("/v1/jobs", content=body, headers={**AUTH, "Content-Type": "application/json"})
        assert r.status_code == 422, r.text
        msg = r.json()["error"]["message"]
        assert "finite" in msg and "\n" not in msg, msg
    r = client.post("/v1/jobs", json=job_spec(data, models, name=["x" * 100_000] * 100), headers=AUTH)
    msg = r.json()["error"]["message"]
    assert r.status_code == 422 and "'name'" in msg and len(msg) < 400, msg[:500]
