"""ShardStream and generate_lines over a real engine on the CPU (a tiny random LLaMA, no tokenizer)."""
from __future__ import annotations

from ziya_batch.engine.engine import LLMEngine
from ziya_batch.engine.types import EngineConfig
from ziya_batch.records import PromptLine
from ziya_batch.work.generation import ShardStream, generate_lines
from ziya_batch.spec import SamplingSpec
from ziya_batch.tools.testing import tiny_llama


def make_engine(max_num_seqs=8) -> LLMEngine:
    cfg = EngineConfig(model_path="", device="cpu", max_num_seqs=max_num_seqs, max_num_batched_tokens=64, block_size=4)
    return LLMEngine.from_model(tiny_llama(), None, cfg)


def prompts(file: str, lines: range, max_new_tokens: int = 4):
    sampling = SamplingSpec(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, temperature=0.0)
    return [(PromptLine(f"{file}-{n}", file, n, "", sampling), [5 + n, 7, 9 + n]) for n in lines]


def test_stream_reports_each_shard_when_its_own_lines_are_done():
    eng = make_engine()
    stream = ShardStream(eng)
    stream.add("a", prompts("f", range(1, 5), max_new_tokens=2))
    stream.step()
    assert stream.admitted()                   # 4 lines, 8 seats: all admitted by the first step
    stream.add("b", prompts("f", range(1, 5), max_new_tokens=6))   # the same file and lines: ids stay apart
    done = []
    while len(done) < 2:
        done += [(key, [r.line.line for r in results], [len(r.samples[0].token_ids) for r in results])
                 for key, results in stream.step()]
    assert done == [("a", [1, 2, 3, 4], [2] * 4), ("b", [1, 2, 3, 4], [6] * 4)]
    assert not eng.has_unfinished()


def test_stream_abort_drops_one_shard_and_keeps_the_other():
    eng = make_engine()
    stream = ShardStream(eng)
    stream.add("a", prompts("f", range(1, 4)))
    stream.add("b", prompts("g", range(1, 4)))
    stream.step()
    stream.abort("a")
    done = []
    while not done:
        done = stream.step()
    assert [(key, len(results)) for key, results in done] == [("b", 3)]
    assert not eng.has_unfinished()


def test_generate_lines_isolates_the_line_whose_step_raises():
    eng = make_engine()
    step = eng.step

    def failing_step():
        if any(s.request_id.endswith(":6") for s in list(eng.scheduler.running) + list(eng.scheduler.waiting)):
            raise RuntimeError("boom")
        return step()

    eng.step = failing_step
    results, failures = generate_lines(eng, prompts("f", range(1, 11)))
    assert [r.line.line for r in sorted(results, key=lambda r: r.line.line)] == [1, 2, 3, 4, 5, 7, 8, 9, 10]
    assert [(f.line, f.code, f.message) for f in failures] == [(6, "generation_failed", "RuntimeError: boom")]
    assert not eng.has_unfinished()           # a failed batch's requests were aborted, not left behind
