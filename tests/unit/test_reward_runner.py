"""Reward functions in a spawned process pool (errors, timeouts and crashes stay per sample), the reward URL
against a fake of the HTTP call it makes (batches, retries, bad answers), and the weighted sum of components."""
import io
import json
import socket
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ziya_batch.work.reward_runner import FunctionRewards, UrlRewards, combine, function_name, resolve

FIXTURES = str(Path(__file__).with_name("reward_fixtures.py"))


def ref(name: str) -> str:
    return f"{FIXTURES}:{name}"


def test_resolve_names_builtins_modules_and_files():
    from ziya_batch import rewards

    assert resolve("math_answer") is rewards.math_answer
    assert resolve("ziya_batch.rewards:exact_match") is rewards.exact_match
    assert resolve(ref("length"))("p", "abc", {}) == 3.0
    assert function_name(ref("length")) == "length"
    with pytest.raises(ValueError, match="not a built-in"):
        resolve("nope")
    with pytest.raises(ValueError, match="does not exist"):
        resolve("/no/such/file.py:f")


@pytest.fixture
def pool():
    made = []

    def make(name, timeout_s=20.0, processes=2):
        made.append(FunctionRewards(ref(name), timeout_s, processes))
        return made[-1]
    yield make
    for p in made:
        p.close()


def test_values_and_per_sample_errors(pool):
    runner = pool("label_or_raise")
    out = runner.score([("p", "r", {"score": 0.5}), ("p", "r", {"boom": True}), ("p", "r", {"score": 2})])
    assert out[0] == (0.5, None) and out[2] == (2.0, None)
    assert out[1][0] is None and out[1][1] == "RuntimeError: no label for this line"     # one line
    bad = pool("not_a_number").score([("p", "r", {})])
    assert bad[0][0] is None and "must be a number" in bad[0][1]
    kinds = pool("echo_prompt_kind").score([([{"role": "user", "content": "hi"}], "r", None), ("hi", "r", None)])
    assert [v for v, _ in kinds] == [1.0, 0.0]


def test_an_error_holding_a_lone_surrogate_is_written_as_its_escape(pool):
    # reward_error is written into the experience part: a lone surrogate there failed the part's UTF-8 encoding, and
    # with it every line of the shard
    from ziya_batch.io.schema import encode_jsonl

    out = pool("raise_undecodable").score([("p", "r", {})])
    assert out == [(None, "ValueError: no label in labels-\\udcff.txt")]
    assert json.loads(encode_jsonl([{"reward_error": out[0][1]}]))["reward_error"] == out[0][1]


def test_a_hung_call_times_out_alone_and_the_pool_is_rebuilt(pool):
    runner = pool("hang_on", timeout_s=2.0)
    t0 = time.monotonic()
    out = runner.score([("p", "ok", None), ("p", "hang", None), ("p", "ok", None), ("p", "ok", None)])
    assert time.monotonic() - t0 < 30
    assert out[0] == (1.0, None) and out[2] == (1.0, None) and out[3] == (1.0, None)
    assert out[1] == (None, "timed out after 2 s")
    assert runner.score([("p", "ok", None)]) == [(1.0, None)]       # a fresh pool after the teardown


def test_a_call_that_kills_its_process_fails_only_its_sample(pool):
    out = pool("die_on").score([("p", "ok", None), ("p", "die", None), ("p", "ok", None)])
    assert out[0] == (2.0, None) and out[2] == (2.0, None)
    assert out[1][0] is None and "died" in out[1][1]


class _Judge:
    """Stands in for the opener's open (urlopen without redirects), the one call UrlRewards makes (the unit suite starts no server):
    records each request and answers like a reward service. `script` holds what the next calls do instead of
    answering: an HTTP status to fail with, "hang" (the client's timeout fires) or "refused"."""

    def __init__(self):
        self.calls: list[dict] = []
        self.timeouts: list[float] = []
        self.script: list = []

    def __call__(self, req: urllib.request.Request, timeout: float):
        assert req.get_method() == "POST" and req.get_header("Content-type") == "application/json"
        body = json.loads(req.data)
        self.calls.append(body)
        self.timeouts.append(timeout)
        action = self.script.pop(0) if self.script else None
        if isinstance(action, int):
            raise urllib.error.HTTPError(req.full_url, action, "scripted", None, io.BytesIO(b""))
        if action == "hang":           # what urlopen raises when no answer comes within its timeout
            raise TimeoutError("timed out")
        if action == "refused":
            raise urllib.error.URLError(ConnectionRefusedError(111, "Connection refused"))
        if action == "html":
            return _Answer(b"<html>busy</html>")
        if action == "bigint":
            return _Answer(b'{"rewards": [' + b"9" * 400 + b"]}")
        if action == "huge":
            return _Answer(b"{}", declared=10**9)
        if action == "drip":
            return _Answer(b'{"rewards": [1.0]}' + b" " * 100, delay_s=0.3)
        items = body["items"]
        rewards = [None if it["metadata"].get("skip") else float(len(it["response"])) for it in items]
        if items and items[0]["metadata"].get("short"):
            rewards = rewards[:-1]
        return _Answer(json.dumps({"rewards": rewards}).encode())


class _Answer(io.BytesIO):
    """An HTTP answer as UrlRewards reads it: headers, and read1 (one read off the socket: `delay_s` each, a
    byte at a time when it drips)."""

    def __init__(self, data: bytes, declared=None, delay_s: float = 0.0):
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data) if declared is None else declared)}
        self.delay_s = delay_s

    def read1(self, n=-1):
        if self.delay_s:
            time.sleep(self.delay_s)
            return super().read1(1)
        return super().read1(n)


URL = "http://judge.invalid/score"


@pytest.fixture
def judge(monkeypatch):
    from ziya_batch.work import reward_runner

    fake = _Judge()
    monkeypatch.setattr(reward_runner._OPENER, "open", fake)
    return fake


def test_reward_url_batches_and_nulls(judge):
    items = [("p", "x" * i, {"skip": i == 3}) for i in range(7)]
    out = UrlRewards(URL, 5.0, batch_size=3, concurrency=2).score(items)
    assert [v for v, _ in out] == [0.0, 1.0, 2.0, None, 4.0, 5.0, 6.0]
    assert out[3][1] == "reward_url gave null"
    assert sorted(len(c["items"]) for c in judge.calls) == [1, 3, 3]
    assert judge.calls[0]["items"][0].keys() == {"prompt", "response", "metadata"}
    assert judge.timeouts == [5.0] * 3


@pytest.mark.parametrize("failure", [503, 429, "hang", "refused"])
def test_reward_url_retries_a_passing_failure(judge, failure):
    judge.script = [failure]
    assert UrlRewards(URL, 5.0, backoff_s=0.01).score([("p", "ab", {})]) == [(2.0, None)]
    assert len(judge.calls) == 2


def test_reward_url_gives_up_after_its_retries(judge):
    judge.script = [500] * 10
    out = UrlRewards(URL, 5.0, retries=2, backoff_s=0.01).score([("p", "ab", {})])
    assert out == [(None, "reward_url answered HTTP 500")] and len(judge.calls) == 3
    judge.script = ["hang"] * 10
    out = UrlRewards(URL, 1.5, retries=1, backoff_s=0.01).score([("p", "ab", {})])
    assert out == [(None, "reward_url: TimeoutError: timed out")] and judge.timeouts[-2:] == [1.5, 1.5]
    judge.script = ["refused"]
    down = UrlRewards(URL, 1.0, retries=0).score([("p", "a", {})])
    assert down == [(None, "reward_url: ConnectionRefusedError: [Errno 111] Connection refused")]


def test_reward_url_does_not_retry_a_client_error_or_a_wrong_answer(judge):
    judge.script = [400, 400]
    assert UrlRewards(URL, 5.0, backoff_s=0.01).score([("p", "ab", {})]) == [(None, "reward_url answered HTTP 400")]
    assert len(judge.calls) == 1 and judge.script == [400]
    judge.script = []
    wrong = UrlRewards(URL, 5.0).score([("p", "a", {"short": True}), ("p", "b", {})])
    assert all(v is None and "2 values" in e for v, e in wrong) and len(judge.calls) == 2


def test_the_unit_suite_refuses_a_listening_socket():
    # tests/unit/conftest.py: a server in a unit test fails at once instead of passing where the port is free
    with pytest.raises(AssertionError, match="listen"):
        ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        with pytest.raises(AssertionError, match="listen"):
            sock.listen()


def test_combine_weights_components_and_nulls():
    comps = {"model": [(1.0, None), (2.0, None)], "math_answer": [(1.0, None), (None, "timed out after 2 s")]}
    out = combine(comps, {"model": 0.5}, 2)
    assert out[0] == (1.5, {"model": 1.0, "math_answer": 1.0}, None)
    assert out[1] == (None, {"model": 2.0, "math_answer": None}, "math_answer: timed out after 2 s")


def test_a_builtin_by_bare_name_runs_in_the_pool(pool):
    runner = FunctionRewards("math_answer", 20.0, 1)
    try:
        out = runner.score([("q", "so \\boxed{12}", {"answer": 12}), ("q", "13", {"answer": "12"}), ("q", "x", {})])
    finally:
        runner.close()
    assert out[:2] == [(1.0, None), (0.0, None)] and "no 'answer' field" in out[2][1]


def test_reward_url_answers_that_came_but_are_wrong_are_not_sent_again(judge):
    """Not JSON, or a number no float holds: that batch's samples get the error, once (a scoring sandbox may
    not be safe to call twice); before, the first was retried and the second failed the whole shard."""
    judge.script = ["html"]
    out = UrlRewards(URL, 5.0, backoff_s=0.01).score([("p", "a", {})])
    assert out[0][0] is None and "not JSON" in out[0][1] and len(judge.calls) == 1
    judge.script = ["bigint"]
    out = UrlRewards(URL, 5.0, backoff_s=0.01).score([("p", "a", {})])
    assert out[0][0] is None and "too large for a float" in out[0][1] and len(judge.calls) == 2


def test_reward_url_answers_are_read_against_one_deadline_and_a_size_cap(judge):
    judge.script = ["drip"]
    t0 = time.monotonic()
    out = UrlRewards(URL, 1.0, backoff_s=0.01).score([("p", "a", {})])
    assert time.monotonic() - t0 < 5 and len(judge.calls) == 1
    assert out[0][0] is None and "did not come whole within 1 s" in out[0][1]
    judge.script = ["huge"]
    out = UrlRewards(URL, 5.0, backoff_s=0.01).score([("p", "a", {})])
    assert out[0][0] is None and "1,000,000,000 bytes" in out[0][1] and len(judge.calls) == 2


def test_reward_function_pools_are_bounded(monkeypatch):
    from ziya_batch.work import reward_runner

    closed = []
    monkeypatch.setattr(reward_runner, "_FUNCTIONS", {})
    monkeypatch.setattr(reward_runner.FunctionRewards, "close", lambda self: closed.append(self.ref))
    a = reward_runner.function_rewards("exact_match", 30.0)
    assert reward_runner.function_rewards("exact_match", 30.1) is a and a.timeout_s == 30.1    # one pool a function
    reward_runner.function_rewards("math_answer", 30.0)
    reward_runner.function_rewards("ziya_batch.rewards:exact_match", 30.0)
    assert closed == ["exact_match"] and len(reward_runner._FUNCTIONS) == reward_runner.MAX_POOLS
