"""Location normalisation and prefix checks of the API's allow-list (no services)."""
from __future__ import annotations

import os

import pytest

from ziya_batch.api.access import AccessDenied, is_under, normalize_location, token_matches


def test_token_comparison():
    assert token_matches("abcdefgh", "abcdefgh")
    assert not token_matches("abcdefgH", "abcdefgh")
    assert not token_matches(None, "abcdefgh")
    assert not token_matches("", "abcdefgh")
    assert token_matches("令牌令牌令牌令牌", "令牌令牌令牌令牌")


def test_local_paths_are_resolved(tmp_path):
    (tmp_path / "allowed").mkdir()
    (tmp_path / "allowed" / "out").symlink_to("/etc")
    assert normalize_location(str(tmp_path / "allowed" / ".." / "x")) == os.path.realpath(tmp_path / "x")
    assert normalize_location(f"file://{tmp_path}/allowed/out/passwd") == "/etc/passwd"
    assert is_under(str(tmp_path / "allowed" / "a.jsonl"), [str(tmp_path / "allowed")])
    assert is_under(str(tmp_path / "allowed" / "a.jsonl"), [str(tmp_path / "allowed") + "/"])
    assert is_under(str(tmp_path / "allowed"), [str(tmp_path / "allowed")])
    assert not is_under(str(tmp_path / "allowed-2" / "a.jsonl"), [str(tmp_path / "allowed")])
    assert not is_under(str(tmp_path / "allowed" / "out" / "passwd"), [str(tmp_path / "allowed")])


def test_remote_urls():
    assert is_under("s3://bucket/runs/x/part.jsonl", ["s3://bucket/runs/"])
    assert is_under("s3a://bucket/runs/x", ["s3://bucket/runs"])       # one filesystem class, two names
    with pytest.raises(AccessDenied, match="can open"):
        normalize_location("S3://bucket/runs/x")                          # fsspec knows no 'S3' protocol
    assert not is_under("s3://bucket/runs-other/x", ["s3://bucket/runs"])
    assert not is_under("s3://other/runs/x", ["s3://bucket/runs/"])
    assert not is_under("memory://bucket/runs/x", ["s3://bucket/runs/"])
    assert not is_under("s3://bucket/runs/x", ["/bucket/runs"])
    assert is_under("https://h/runs/x.jsonl", ["https://h/runs/"])
    assert not is_under("http://h/runs/x.jsonl", ["https://h/runs/"])
    assert not is_under("https://h/runs2", ["https://h/runs"])
    for url in ("s3://bucket/runs/../secret", "s3://bucket/runs/%2e%2e/secret", "s3://bucket/runs/./x",
                "https://h/runs/x%2f..%2f..%2fsecret", "https://h/runs/x\\..\\secret"):
        with pytest.raises(AccessDenied, match="segments"):
            normalize_location(url)
    with pytest.raises(AccessDenied, match="chained"):
        normalize_location("zip://a.jsonl::s3://bucket/runs/x.zip")


def test_a_bad_prefix_matches_nothing():
    assert not is_under("s3://bucket/x", ["s3://bucket/../"])


def test_expanded_inputs_are_judged_by_the_file_a_descriptor_finds(tmp_path, monkeypatch):
    """check_expanded_inputs returns each local file's identity as judged (submit_job's `vetted`), and judges the
    path a descriptor opened on it has too: a link out of the prefix that the path check missed (as it would, were
    the link swapped in right after that check) is refused."""
    from ziya_batch.api import access
    from ziya_batch.api.settings import ApiSettings
    from ziya_batch.io.inputs import file_identity

    data, outside = tmp_path / "data", tmp_path / "outside"
    data.mkdir()
    outside.mkdir()
    (outside / "x.jsonl").write_text('{"prompt": "p"}\n')
    (data / "x.jsonl").symlink_to(outside / "x.jsonl")
    (data / "y.jsonl").write_text('{"prompt": "p"}\n')
    settings = ApiSettings(token="t" * 16, allowed_prefixes=(str(data),))
    assert access.check_expanded_inputs([str(data / "y.jsonl")], settings) == {
        str(data / "y.jsonl"): file_identity(os.stat(data / "y.jsonl"))}
    with pytest.raises(AccessDenied, match="outside the allowed prefixes"):
        access.check_expanded_inputs([str(data / "x.jsonl")], settings)
    monkeypatch.setattr(access, "check_data_location", lambda *a: None)
    with pytest.raises(AccessDenied, match=f"it resolves to {outside / 'x.jsonl'}"):
        access.check_expanded_inputs([str(data / "x.jsonl")], settings)
