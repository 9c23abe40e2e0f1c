"""Reward functions in a spawned process pool (errors, timeouts and crashes stay per sample), the reward URL
over a local HTTP server (retries, bad answers), and the weighted sum of components."""
import json
import threading
import time
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


class _Judge(BaseHTTPRequestHandler):
    calls: list = []
    fail_first = 0

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).calls.append(body)
        if type(self).fail_first > 0:
            type(self).fail_first -= 1
            self.send_response(503)
            self.end_headers()
            return
        items = body["items"]
        rewards = [None if it["metadata"].get("skip") else float(len(it["response"])) for it in items]
        if items and items[0]["metadata"].get("short"):
            rewards = rewards[:-1]
        data = json.dumps({"rewards": rewards}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def judge():
    _Judge.calls, _Judge.fail_first = [], 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/score", _Judge
    server.shutdown()


def test_reward_url_batches_and_nulls(judge):
    url, handler = judge
    items = [("p", "x" * i, {"skip": i == 3}) for i in range(7)]
    out = UrlRewards(url, 5.0, batch_size=3, concurrency=2).score(items)
    assert [v for v, _ in out] == [0.0, 1.0, 2.0, None, 4.0, 5.0, 6.0]
    assert out[3][1] == "reward_url gave null"
    assert sorted(len(c["items"]) for c in handler.calls) == [1, 3, 3]
    assert handler.calls[0]["items"][0].keys() == {"prompt", "response", "metadata"}


def test_reward_url_retries_server_errors_then_gives_up(judge):
    url, handler = judge
    handler.fail_first = 1
    assert UrlRewards(url, 5.0, backoff_s=0.01).score([("p", "ab", {})]) == [(2.0, None)]
    handler.fail_first = 10
    out = UrlRewards(url, 5.0, retries=2, backoff_s=0.01).score([("p", "ab", {})])
    assert out == [(None, "reward_url answered HTTP 503")] and handler.fail_first == 7
    handler.fail_first = 0
    wrong = UrlRewards(url, 5.0).score([("p", "a", {"short": True}), ("p", "b", {})])
    assert all(v is None and "2 values" in e for v, e in wrong)
    down = UrlRewards("http://127.0.0.1:9/x", 1.0, retries=0).score([("p", "a", {})])
    assert down[0][0] is None and down[0][1].startswith("reward_url:")


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
