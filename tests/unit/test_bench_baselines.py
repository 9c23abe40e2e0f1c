"""The transformers continuous-batching baseline counts what it generated within its cap: every streamed token,
finished request or not, whichever way the manager streams (all tokens so far, or only the new ones)."""
from __future__ import annotations

import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ziya_batch.tools import bench_baselines as B


def test_a_cumulative_stream_counts_each_request_s_longest_result():
    t = B.StreamTally()
    for n in (1, 2, 3):
        t.add("a", n, False)
    t.add("b", 1, False)
    t.add("a", 4, True)
    assert (t.tokens, t.finished, t.incremental, t.finished_tokens) == (5, 1, False, 4)


def test_an_incremental_stream_counts_the_sum():
    t = B.StreamTally()
    for _ in range(4):
        t.add("a", 1, False)
    t.add("b", 2, False)
    t.add("b", 1, True)
    assert (t.tokens, t.finished, t.incremental, t.finished_tokens) == (7, 1, True, 3)


def test_a_cumulative_stream_may_repeat_its_last_length_when_it_finishes():
    t = B.StreamTally()
    for n in (1, 2, 3):
        t.add("a", n, False)
    t.add("a", 3, True)
    assert (t.tokens, t.finished, t.incremental) == (3, 1, False)


def test_finished_results_only_count_once_each():
    t = B.StreamTally()
    t.add("a", 7, True)
    t.add("b", 3, True)
    assert (t.tokens, t.finished) == (10, 2)


@settings(max_examples=200, deadline=None)
@given(lengths=st.lists(st.tuples(st.integers(1, 40), st.booleans()), min_size=1, max_size=12),
       incremental=st.booleans(), order=st.randoms(use_true_random=False))
def test_any_interleaving_of_streams_counts_what_was_generated(lengths, incremental, order):
    """Requests stream 1..n tokens (cumulative: each result all so far; incremental: one new token each, the
    first result two when n > 1, so that no stream is a run of equal lengths), finishing or not, interleaved in
    any order: the tally counts every token once, and the finished requests' ones apart."""
    streams = []
    for i, (n, done) in enumerate(lengths):
        if incremental:
            sizes = [min(n, 2)] + [1] * (n - 2) if n > 1 else [1]
        else:
            sizes = list(range(1, n + 1))
        streams.append([(f"r{i}", k, done and j == len(sizes) - 1) for j, k in enumerate(sizes)])
    events = []
    while any(streams):
        s = order.choice([x for x in streams if x])
        events.append(s.pop(0))
    t = B.StreamTally()
    for rid, k, fin in events:
        t.add(rid, k, fin)
    # (an incremental stream whose requests all send one result looks cumulative, and counts the same)
    assert t.incremental == (incremental and any(n > 2 for n, _ in lengths))
    assert t.tokens == sum(n for n, _ in lengths)
    assert t.finished == sum(done for _, done in lengths)
    assert t.finished_tokens == sum(n for n, done in lengths if done)


class _Result:
    def __init__(self, rid, tokens, done):
        self.request_id, self.generated_tokens, self._done = rid, tokens, done

    def is_finished(self):
        return self._done


class _Manager:
    """Streams like transformers' manager: a result per new token with all the request's tokens so far; request
    r0 is short and finishes, the others are still running when the cap ends the wait."""

    def __init__(self):
        self.results, self.streaming = [], None

    def start(self):
        pass

    def add_request(self, input_ids, request_id=None, max_new_tokens=None, streaming=False, eos_token_id=None):
        self.streaming = streaming
        n = 3 if request_id == "r0" else 5
        self.results += [_Result(request_id, [7] * k, k == max_new_tokens) for k in range(1, n + 1)]

    def get_result(self, timeout=None):
        if self.results:
            return self.results.pop(0)
        time.sleep(0.05)
        return None

    def stop(self, block=True, timeout=None):
        pass


class _Model:
    def __init__(self):
        self.manager = _Manager()

    def init_continuous_batching(self, generation_config=None):
        return self.manager


def test_the_baseline_counts_unfinished_requests_tokens_within_its_cap(monkeypatch):
    monkeypatch.setattr(B, "HF_CONTINUOUS_BUDGET_S", 0.5)
    monkeypatch.setattr(B.torch.cuda, "reset_peak_memory_stats", lambda *a, **k: None)
    monkeypatch.setattr(B.torch.cuda, "max_memory_allocated", lambda *a, **k: 0)
    model = _Model()
    row = B.bench_hf_continuous(model, [([5, 6], 3), ([5, 6], 400), ([5, 6], 400)], torch.device("cpu"))
    assert model.manager.streaming is True
    # r0: 3 tokens, finished; r1 and r2: 5 streamed tokens each, unfinished at the cap
    assert (row["requests"], row["output_tokens"]) == (3, 13)
    assert "1 finished, 13 tokens" in row["note"] and "streamed" in row["note"]
    assert "finished requests' alone: 3," in row["note"]          # the count a manager without streaming gives
    assert row["output_tok_s"] == pytest.approx(13 / row["wall_s"])
    assert row["finished_tok_s"] == pytest.approx(3 / row["wall_s"])


class _OldManager(_Manager):
    """A manager without streaming: one result per finished request."""

    def add_request(self, input_ids, request_id=None, max_new_tokens=None):
        if request_id == "r0":
            self.results.append(_Result(request_id, [7] * 3, True))


def test_without_streaming_only_finished_requests_count(monkeypatch):
    monkeypatch.setattr(B, "HF_CONTINUOUS_BUDGET_S", 0.5)
    monkeypatch.setattr(B.torch.cuda, "reset_peak_memory_stats", lambda *a, **k: None)
    monkeypatch.setattr(B.torch.cuda, "max_memory_allocated", lambda *a, **k: 0)
    model = _Model()
    model.manager = _OldManager()
    row = B.bench_hf_continuous(model, [([5, 6], 3), ([5, 6], 400)], torch.device("cpu"))
    assert row["output_tokens"] == 3 and "1 finished" in row["note"] and "not counted" in row["note"]
    assert row["finished_tok_s"] is None                        # one count only: output_tok_s is it
