"""Steps with prefill as two forwards (EngineConfig.overlap_mixed_steps, runner._run_split), run on the CPU: there
nothing can overlap (no graphs, no second stream), so steps split only where a test asks (split_serially), the
decode rows and the prefill chunks one after the other. That checks what the GPU's overlap relies on: the split
inputs, the rows' order, the tokens taken from the step before, and that each part computes what the joint step
computes."""
from __future__ import annotations

import pytest
import torch

from ziya_batch.engine.runner import ModelRunner
from ziya_batch.engine.types import Request, SamplingParams
from ziya_batch.tools.testing import tiny_llama

from tests.unit.test_engine import check_against_hf, greedy, make_engine, random_prompts
from tests.unit.test_piecewise import pieces_engine


def _spy_splits(eng, inside: list | None = None) -> list[tuple[int, int]]:
    """(decode rows, prefill chunks) of every step _run_split ran; `inside`, where given, holds True while one
    runs."""
    seen: list[tuple[int, int]] = []
    run = eng.runner._run_split

    def spy(chunks, nd, *a):
        seen.append((nd, len(chunks) - nd))
        if inside is not None:
            inside.append(True)
        try:
            return run(chunks, nd, *a)
        finally:
            if inside is not None:
                inside.pop()
    eng.runner._run_split = spy
    return seen


def _staggered(eng, prompts, params):
    """Requests arriving a few steps apart, so steps mix decode rows and prefill chunks (some cut, so a step's
    prefill part may sample nothing)."""
    outs, pending = {}, list(enumerate(prompts))
    step = 0
    while pending or eng.has_unfinished():
        if pending and step % 3 == 0:
            i, p = pending.pop(0)
            eng.add_request(Request(f"r{i}", p, params))
        for o in eng.step():
            outs[o.request_id] = o
        step += 1
    return [outs[f"r{i}"] for i in range(len(prompts))]


@pytest.mark.parametrize("async_scheduling", [True, False])
@pytest.mark.parametrize("num_kv_heads", [4, 2])
def test_split_steps_match_transformers_and_the_joint_step(num_kv_heads, async_scheduling):
    prompts = random_prompts(8, seed=20 + num_kv_heads, lo=3, hi=60)
    outs = []
    for overlap in (False, True):
        eng = make_engine(num_kv_heads, overlap_mixed_steps=overlap, async_scheduling=async_scheduling)
        assert eng.runner.overlap_mixed is overlap and eng.runner.split_rows == 0
        eng.runner.split_serially = True
        seen = _spy_splits(eng)
        outs.append(_staggered(eng, prompts, greedy(10)))
        assert eng.runner.num_split_steps == len(seen)
        if overlap:
            assert any(nd > 0 and npre > 0 for nd, npre in seen), "no step mixed decode rows and prefill chunks"
        else:
            assert not seen
    for p, joint, split in zip(prompts, *outs):
        check_against_hf(tiny_llama(num_kv_heads), p, split.completions[0], 10)
        assert split.completions[0].token_ids == joint.completions[0].token_ids
        assert torch.allclose(torch.tensor(split.completions[0].logprobs),
                              torch.tensor(joint.completions[0].logprobs), atol=1e-5)


def test_split_steps_through_the_pieces_with_sampling_and_n():
    # the prefill part through the mixed-step pieces; seeded sampling, n > 1 (a prefill chunk with children) and
    # top logprobs give the same as the joint step
    prompts = random_prompts(6, seed=3, lo=10, hi=50)
    params = SamplingParams(max_new_tokens=8, temperature=0.9, top_p=0.9, top_k=40, seed=7, n=2,
                            logprobs_mode="processed", top_logprobs=3)
    outs = []
    for overlap in (False, True):
        eng = pieces_engine(buckets=(16, 64), overlap_mixed_steps=overlap)
        eng.runner.split_serially = True
        used, inside = [], []      # decode rows of each run of the pieces within a split step
        run = eng.runner.mixed.run
        eng.runner.mixed.run = lambda ids, pos, meta, *a: (inside and used.append(meta.num_decode)) or run(
            ids, pos, meta, *a)
        seen = _spy_splits(eng, inside)
        outs.append(_staggered(eng, prompts, params))
        if overlap:
            assert any(nd > 0 and npre > 0 for nd, npre in seen)
            # the prefill part in the pieces, alone; the decode part (no decode graph on the CPU) too, on its own
            assert 0 in used and set(used) <= {0} | {d for d, _ in seen}
    for joint, split in zip(*outs):
        for a, b in zip(joint.completions, split.completions):
            assert a.token_ids == b.token_ids
            assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)
            assert [[t for t, _ in row] for row in a.top_logprobs] == [[t for t, _ in row] for row in b.top_logprobs]


def test_no_split_under_tensor_parallelism():
    # two streams' all-reduces could reach the ranks in different orders: a tensor-parallel model (the engine
    # gives it agree_num_blocks) never splits
    eng = make_engine(overlap_mixed_steps=True)
    model = eng.model
    model.agree_num_blocks = lambda n: n
    try:
        runner = ModelRunner(model, eng.kv_caches, eng.runner.block_size, 4, 64, eng.device, use_graphs=False,
                             use_triton=False, overlap_mixed=True)
    finally:
        del model.agree_num_blocks
    assert runner.overlap_mixed is False and runner.side_stream is None


def test_a_one_token_prompt_chunk_that_samples_nothing_still_writes_its_kv():
    # 63 + 1 tokens fill the first step's budget of 64: the second prompt's first chunk is one token that samples
    # nothing, sorted with the decode rows; it must still run (its K/V is read by every later step)
    rng = __import__("random").Random(1)
    a, b = [rng.randrange(3, 300) for _ in range(63)], [rng.randrange(3, 300) for _ in range(20)]
    eng = make_engine(4, overlap_mixed_steps=True, max_num_batched_tokens=64, prefix_caching=False)
    eng.runner.split_serially = True
    seen = _spy_splits(eng)
    outs = eng.generate([Request("a", a, greedy(8)), Request("b", b, greedy(8))])
    assert seen and seen[0] == (1, 1)
    for p, o in zip((a, b), outs):
        check_against_hf(tiny_llama(4), p, o.completions[0], 8)


def test_without_a_second_stream_steps_do_not_split():
    # on the CPU (no graphs) a split would run two forwards one after the other for nothing: steps stay whole
    eng = make_engine(overlap_mixed_steps=True)
    seen = _spy_splits(eng)
    prompts = random_prompts(6, seed=4, lo=3, hi=60)
    for p, o in zip(prompts, _staggered(eng, prompts, greedy(6))):
        check_against_hf(tiny_llama(4), p, o.completions[0], 6)
    assert eng.runner.side_stream is None and not seen


def test_a_negative_sm_carveout_is_refused():
    with pytest.raises(ValueError, match="overlap_sm_carveout must be 0 up to"):
        make_engine(overlap_mixed_steps=True, overlap_sm_carveout=-1)


def test_the_sm_carveout_is_put_back_whatever_happens_inside():
    from ziya_batch.engine.piecewise import gemm_sm_carveout
    before = (torch._C._get_sm_carveout_experimental(), torch.backends.cuda.preferred_blas_library())
    with gemm_sm_carveout(0):                   # nothing to leave free: nothing set
        assert torch._C._get_sm_carveout_experimental() == before[0]
    try:
        with gemm_sm_carveout(8):
            assert torch._C._get_sm_carveout_experimental() == 8
            raise KeyError("inside")
    except (KeyError, RuntimeError):            # RuntimeError: a build without cuBLASLt refuses the library
        pass
    assert (torch._C._get_sm_carveout_experimental(), torch.backends.cuda.preferred_blas_library()) == before
