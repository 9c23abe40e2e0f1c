"""Passwords in URLs never reach what is shown (error lines, HTTP answers, messages kept in Redis), while the
scheme, host, bucket and path that say which location failed stay."""
from __future__ import annotations

import contextlib
import io
import logging

import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st

from ziya_batch.errors import ServiceError, short_text
from ziya_batch.redact import has_userinfo, mask_text, mask_url

# disjoint alphabets: a password's characters never occur in what is meant to stay, so "not in" means "not shown"
SECRET_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ!$@:"
secrets_ = st.text(SECRET_CHARS, min_size=1, max_size=40).filter(lambda s: any(c.isupper() for c in s))
users = st.text("abcdefghijklmnopqrstuvwxyz0123456789_-", max_size=12)
hosts = st.from_regex(r"[a-z][a-z0-9.-]{0,20}(:[0-9]{1,5})?", fullmatch=True)
paths = st.from_regex(r"(/[a-z0-9_.@-]{0,12}){0,4}", fullmatch=True)
schemes = st.sampled_from(["redis", "rediss", "REDIS", "Rediss", "s3", "gs", "https", "http", "unix", "abfs"])


@pytest.mark.parametrize("url,shown", [
    ("redis://:s3cret@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
    ("redis://user:s3cret@host:1/2", "redis://user:***@host:1/2"),
    ("rediss://:a%40b@h:1/0", "rediss://:***@h:1/0"),
    ("unix://:s3cret@/tmp/r.sock?db=0", "unix://:***@/tmp/r.sock?db=0"),
    ("unix:///tmp/r.sock?db=0&password=s3cret", "unix:///tmp/r.sock?db=0&password=***"),
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    # the cases the first mask_url showed whole or in part
    ("REDIS://:s3cret@127.0.0.1:1/0", "REDIS://:***@127.0.0.1:1/0"),          # redis-py reads any case
    ("redis://:s3c@ret@127.0.0.1:1/0", "redis://:***@127.0.0.1:1/0"),         # '@' in the password
    ("redis://:s3c/ret@127.0.0.1:1/0", "redis://:***@127.0.0.1:1/0"),         # '/' in the password
    ("s3://AKIAKEY:SECRETKEY@bucket/runs/x", "s3://AKIAKEY:***@bucket/runs/x"),
    ("https://ghp_TOKEN@example.com/p.jsonl", "https://***@example.com/p.jsonl"),
    ("s3://AKIAKEY:SECRETKE", "s3://AKIAKEY:***"),                            # cut short by a message
    ("https://b.s3.amazonaws.com/p?X-Amz-Credential=AK&X-Amz-Signature=ab12&X-Amz-Date=1",
     "https://b.s3.amazonaws.com/p?X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Date=1"),
    ("https://acct.blob.core.windows.net/c/p?sv=2024&sig=abc%2B", "https://acct.blob.core.windows.net/c/p?sv=2024&sig=***"),
    # not overdone: no user part, an '@' in a path or a unix socket's name, a port, IPv6
    ("s3://bucket/models/ziya@v2/x.jsonl", "s3://bucket/models/ziya@v2/x.jsonl"),
    ("unix:///tmp/a@b.sock", "unix:///tmp/a@b.sock"),
    ("redis://[::1]:6379/0", "redis://[::1]:6379/0"),
    ("redis://:pw@[::1]:6379/0", "redis://:***@[::1]:6379/0"),
    ("http://h:80/a@b?x=1@2&monkey=3", "http://h:80/a@b?x=1@2&monkey=3"),
    ("/data/user@host/in.jsonl", "/data/user@host/in.jsonl"),
    ("", ""),
    ("redis://:PASSWORD@host:port/0", "redis://:PASSWORD@host:port/0"),      # a message's example of the form
])
def test_mask_url(url, shown):
    assert mask_url(url) == shown
    assert mask_url(shown) == shown


@given(schemes, users, secrets_, hosts, paths)
def test_a_password_is_masked_whole_and_the_rest_stays(scheme, user, secret, host, path):
    url = f"{scheme}://{user}:{secret}@{host}{path}"
    assert mask_url(url) == f"{scheme}://{user}:***@{host}{path}"
    assert has_userinfo(url)


@given(schemes, secrets_.filter(lambda s: ":" not in s), hosts, paths)
def test_a_lone_user_part_is_taken_for_a_token(scheme, token, host, path):
    assert mask_url(f"{scheme}://{token}@{host}{path}") == f"{scheme}://***@{host}{path}"


@given(schemes, hosts, paths)
def test_a_url_without_a_user_part_is_shown_as_is(scheme, host, path):
    url = f"{scheme}://{host}{path}"
    assert mask_url(url) == url and mask_text(f"cannot open {url}: gone") == f"cannot open {url}: gone"
    assert not has_userinfo(url)


@given(st.sampled_from(["redis", "rediss", "REDIS"]), st.text("abcdefghijklmnopqrstuvwxyz0123456789", max_size=8),
       st.text(SECRET_CHARS + "/", min_size=1, max_size=30).filter(lambda s: any(c.isupper() for c in s)),
       st.from_regex(r"[a-z][a-z0-9]{0,10}", fullmatch=True), st.integers(1, 65535))
def test_what_redis_reads_as_the_password_is_never_shown(scheme, user, secret, host, port):
    url = f"{scheme}://{user}:{secret}@{host}:{port}/0"
    try:
        parsed = redis.connection.parse_url(url)
    except ValueError:
        return                                      # redis-py refuses it: never connected with, nothing to hide
    masked = mask_url(url)
    shown = masked.partition("://")[2]
    if parsed.get("password"):
        # what redis-py reads as the password of the URL shown is the mask (a text search misleads where the
        # password's characters are a separator or, after an '@' and '/' in it, the host: `redis://:A@A/@a:1/0`)
        assert redis.connection.parse_url(masked).get("password") == "***", masked
    if "/" not in secret:
        # with a '/' (not written %2F) where the password ends is ambiguous: the parser's reading is judged above
        assert not any(c.isupper() for c in shown), shown


@given(st.text("abcdefghijklmnopqrstuvwxyz ,.;()", max_size=30), st.sampled_from(["s3", "redis", "https"]), users,
       secrets_, hosts, paths, st.text("abcdefghijklmnopqrstuvwxyz ,.;()", max_size=30),
       st.sampled_from(["", "'", '"', "<", "`"]))
def test_every_url_in_a_message_is_masked(before, scheme, user, secret, host, path, after, quote):
    url = f"{scheme}://{user}:{secret}@{host}{path}"
    text = f"{before} {quote}{url}{quote} {after}"
    shown = mask_text(text)
    assert shown == f"{before} {quote}{scheme}://{user}:***@{host}{path}{quote} {after}"
    assert mask_text(shown) == shown


@given(st.sampled_from(["s3", "redis", "https"]), users, secrets_, hosts, paths, st.integers(1, 120))
def test_a_message_cut_short_shows_no_part_of_a_password(scheme, user, secret, host, path, limit):
    # short_text (every error line, finalize_wait's reason) cuts messages: no cut may leave a password's head
    text = short_text(f"output.path {scheme}://{user}:{secret}@{host}{path}: access denied", limit)
    assert not any(c.isupper() for c in text.replace("...", "")), text


CUT_URLS = ("https://GHPTOKENVALUE0SECRET@github.com/o/r", "redis://u:1234567890123@h:1/0",
            "s3://akiakey:SECRETVALUE@bucket/runs/x", "redis://:PA/SSWORD@h:1/0")
CUT_SECRETS = ("GHPTOKENVALUE0SECRET", "1234567890123", "SECRETVALUE", "PA/SSWORD")


@pytest.mark.parametrize("url,secret", zip(CUT_URLS, CUT_SECRETS))
@pytest.mark.parametrize("limit", [200, 80])
def test_a_cut_inside_a_url_shows_no_part_of_its_password(url, secret, limit):
    # short_text masks a window of the message (4 x limit characters) and then collapses its whitespace: a cut
    # inside a URL's user part (`https://GHPTOK` of `https://GHPTOKEN...@github.com`, `redis://u:12` of a numeric
    # password) reads as a host, and the collapse of the whitespace before it brings it into what is shown
    window = 4 * limit
    for at in range(1, len(url)):
        text = short_text("x" + " " * (window - 1 - at) + url + " refused", limit)
        shown = text.replace("...", "")
        assert not any(secret[i:i + 3] in shown for i in range(len(secret) - 2)), (at, text)


@given(st.sampled_from(["s3", "redis", "https"]), users, secrets_, hosts, paths, st.integers(1, 200), st.booleans(),
       st.data())
def test_a_message_cut_anywhere_in_a_url_shows_no_part_of_its_password(scheme, user, secret, host, path, limit, token,
                                                                       data):
    url = f"{scheme}://{secret.replace(':', '') or 'TOKEN'}@{host}{path}" if token else \
        f"{scheme}://{user}:{secret}@{host}{path}"
    at = data.draw(st.integers(0, len(url)), label="cut at")
    text = short_text("x" + " " * max(0, 4 * limit - 1 - at) + url + " refused", limit)
    assert not any(c.isupper() for c in text.replace("...", "")), text


def test_the_cli_error_line_masks_a_redis_password_in_any_case(capsys, tmp_path, monkeypatch):
    from ziya_batch.cli import main

    monkeypatch.setenv("ZIYA_BATCH_HOME", str(tmp_path))
    for url in ("REDIS://:TopSecretPw@127.0.0.1:1/0", "redis://:Top@SecretPw@127.0.0.1:1/0"):
        with pytest.raises(SystemExit) as exit_:
            main(["status", "--redis-url", url])
        err = capsys.readouterr().err
        assert exit_.value.code == 3 and "127.0.0.1:1" in err, err
        assert "Secret" not in err and "Top" not in err, err
    # redis-py quotes what it takes for the port: here the password's first part
    with pytest.raises(SystemExit) as exit_:
        main(["status", "--redis-url", "redis://:Top/SecretPw@127.0.0.1:1/0"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Top" not in err and "Secret" not in err, err
    assert "bad Redis URL (its port is not a number" in err and "redis://[:password@]host:port/db" in err


def test_the_cli_error_line_masks_urls_in_any_message(capsys, monkeypatch):
    # a message built elsewhere (a storage library's text naming its endpoint) is masked where it is printed
    from ziya_batch import cli

    def boom(*a, **kw):
        raise ServiceError("output.path s3://bucket/out: its storage does not answer (EndpointConnectionError: "
                           "Could not connect to the endpoint URL: \"http://minio:MinioPass@minio:9000/bucket\")")

    monkeypatch.setattr(cli, "app", boom)
    with pytest.raises(SystemExit):
        cli.main(["status"])
    err = capsys.readouterr().err
    assert "MinioPass" not in err and "http://minio:***@minio:9000/bucket" in err and "s3://bucket/out" in err


def test_a_worker_error_kept_in_redis_is_masked():
    from ziya_batch.work.failures import one_line
    from ziya_batch.work.reward_runner import one_line as reward_line

    err = OSError("Could not connect to the endpoint URL: http://k:KeepOut@minio:9000/b/x")
    assert one_line(err) == "OSError: Could not connect to the endpoint URL: http://k:***@minio:9000/b/x"
    assert "KeepOut" not in reward_line(err) and "minio:9000/b/x" in reward_line(err)


SPEC = {"name": "t", "model": {"path": "/models/m"}, "input": ["/data/in.jsonl"], "output": {"path": "/data/out"}}

def test_an_http_error_masks_the_servers_own_urls():
    # a token holder is told the allowed prefixes: one holding a password must not hand it out
    from fastapi.testclient import TestClient

    from ziya_batch.api.app import create_app
    from ziya_batch.api.settings import ApiSettings

    def no_broker():
        raise AssertionError("refused before the queue")

    token = "redact-test-token-0123456789"
    auth = {"Authorization": f"Bearer {token}"}

    def client(**kw):
        return TestClient(create_app(ApiSettings(token=token, storage_url="/nowhere", **kw), no_broker),
                          raise_server_exceptions=False)

    r = client(allowed_prefixes=("s3://AKIAKEY:ServerSecret@bucket/in/",)).post(
        "/v1/jobs", headers=auth, json={**SPEC, "input": ["/etc/passwd"]})
    assert r.status_code == 403, r.text
    assert "ServerSecret" not in r.text and "s3://AKIAKEY:***@bucket/in/" in r.text and "/etc/passwd" in r.text
    r = client(allowed_prefixes=("s3://bucket/in/",), allowed_models=("/models",),
               allowed_reward_urls=("https://judge:JudgeSecret@judge.example/",)).post(
        "/v1/jobs", headers=auth, json={**SPEC, "output": {"path": "s3://bucket/in/out"}, "input": ["s3://bucket/in/x"],
                                        "experience": {"reward_url": "https://elsewhere.example/s"}})
    assert r.status_code == 403, r.text
    assert "JudgeSecret" not in r.text and "https://judge:***@judge.example/" in r.text
    assert "https://elsewhere.example/s" in r.text


@contextlib.contextmanager
def _captured_log(name: str):
    """The logger `name` writing only to a StringIO, for the block."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    log = logging.getLogger(name)
    log.addHandler(handler)
    log.propagate = False
    try:
        yield log, stream
    finally:
        log.removeHandler(handler)


def test_a_log_record_of_an_exception_or_a_mapping_is_masked():
    # logging takes an exception as the message (`log.error(err)`) and one mapping as the arguments
    # (`log.info("%(where)s", {...})`): both reached the log as given
    from ziya_batch.redact import mask_logs

    mask_logs()
    with _captured_log("ziya_batch.test_redact_kinds") as (log, stream):
        log.error(OSError("cannot reach s3://AKIA:MsgSecret@bucket/out"))
        log.warning("at %(where)s (%(tries)d tries)", {"where": "redis://:MapSecret@10.0.0.1:6379/0", "tries": 3})
    text = stream.getvalue()
    assert "Secret" not in text, text
    assert text == "cannot reach s3://AKIA:***@bucket/out\nat redis://:***@10.0.0.1:6379/0 (3 tries)\n"


def test_logs_and_a_crash_traceback_mask_urls(capsys, monkeypatch):
    # a 500's traceback (the API logs it), a worker's warning quoting an exception, and a bug's traceback at the
    # CLI's end: each shows the URL's host and path, not its password or a pre-signed URL's signature
    from ziya_batch import cli
    from ziya_batch.redact import mask_logs

    mask_logs()
    mask_logs()                                     # installed once, whoever calls it
    with _captured_log("ziya_batch.test_redact") as (log, stream):
        err = OSError("GET https://b.s3.amazonaws.com/in.jsonl?X-Amz-Signature=SigSecret&X-Amz-Date=1 failed")
        try:
            raise RuntimeError("wrapped") from err
        except RuntimeError:
            log.exception("unhandled error on %s %s", "POST", "/v1/jobs")
        log.warning("storage away (%s)", OSError("at s3://AKIA:KeySecret@bucket/out"))
        log.error("plain https://u:PlainSecret@host/x")
        # uvicorn's access log unpacks its record's five arguments: they stay five, of the same kinds
        record = log.makeRecord(log.name, logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                                ("1.2.3.4:5", "GET", "/v1/files", "1.1", 200), None)
        assert record.args == ("1.2.3.4:5", "GET", "/v1/files", "1.1", 200)
    text = stream.getvalue()
    assert "Secret" not in text, text
    assert "X-Amz-Signature=***" in text and "s3://AKIA:***@bucket/out" in text and "Traceback" in text
    assert "b.s3.amazonaws.com/in.jsonl" in text and "unhandled error on POST /v1/jobs" in text

    def bug(*a, **kw):
        raise KeyError("redis://:CrashSecret@10.0.0.1:6379/0")

    monkeypatch.setattr(cli, "app", bug)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["status"])
    err_text = capsys.readouterr().err
    assert exit_.value.code == 1 and "Traceback" in err_text and "KeyError" in err_text, err_text
    assert "CrashSecret" not in err_text and "redis://:***@10.0.0.1:6379/0" in err_text
