"""Tensor parallelism on the CPU: 2 gloo processes give the same greedy tokens as one process."""
from __future__ import annotations

import json
import random

import pytest
import torch
import torch.multiprocessing as mp

from ziya_batch.engine.engine import LLMEngine
from ziya_batch.engine.model import LlamaModel, ModelArgs, from_hf_model, iter_checkpoint
from ziya_batch.engine.tp import apply_tp
from ziya_batch.engine.types import EngineConfig, Request, SamplingParams
from ziya_batch.tools.testing import load_sharded, tiny_llama, tp_generate_worker


def test_apply_tp_refuses_a_split_that_does_not_divide():
    model = from_hf_model(tiny_llama(2), torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError):
        apply_tp(model, 0, 4)             # 2 key/value heads over 4 ranks


@pytest.mark.parametrize("num_kv_heads,safetensors", [(2, True), (4, True), (2, False)])
def test_a_rank_loads_only_its_shard_of_the_checkpoint(tmp_path, num_kv_heads, safetensors):
    """from_state_dict(tp=...) keeps, of every projection read from the checkpoint, exactly the rows (q/k/v heads,
    gate/up columns) or columns (o_proj, down_proj) of its rank, in tensors of the shard's own size; the same
    as apply_tp on the whole model. From safetensors and from .bin files."""
    hf = tiny_llama(num_kv_heads)
    hf.save_pretrained(tmp_path / "m", safe_serialization=safetensors)
    sd = {k: v for k, v in hf.state_dict().items()}
    D, H = 16, 4                                                  # head_dim, heads of tiny_llama
    for rank in range(2):
        got = load_sharded(str(tmp_path / "m"), rank, 2, torch.device("cpu"), torch.float32)
        whole = apply_tp(from_hf_model(tiny_llama(num_kv_heads), torch.device("cpu"), torch.float32), rank, 2)
        kv = num_kv_heads // 2
        for i, (layer, ref) in enumerate(zip(got.layers, whole.layers)):
            w = lambda name: sd[f"model.layers.{i}.{name}.weight"]  # noqa: E731
            q_rows = slice(rank * (H // 2) * D, (rank + 1) * (H // 2) * D)
            kv_rows = slice(rank * kv * D, (rank + 1) * kv * D)
            assert torch.equal(layer.qkv_proj, torch.cat([w("self_attn.q_proj")[q_rows], w("self_attn.k_proj")[kv_rows],
                                                          w("self_attn.v_proj")[kv_rows]]))
            assert torch.equal(layer.o_proj, w("self_attn.o_proj")[:, q_rows])
            cols = slice(rank * 64, (rank + 1) * 64)              # intermediate 128 over 2 ranks
            assert torch.equal(layer.gate_up_proj, torch.cat([w("mlp.gate_proj")[cols], w("mlp.up_proj")[cols]]))
            assert torch.equal(layer.down_proj, w("mlp.down_proj")[:, cols])
            assert (layer.local_heads, layer.local_kv_heads) == (H // 2, kv)
            for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "input_norm", "post_norm"):
                p = getattr(layer, name)
                assert torch.equal(p, getattr(ref, name)), name
                assert p.untyped_storage().nbytes() == p.numel() * p.element_size(), name   # not a view of the whole
        for name in ("embed", "norm", "lm_head"):
            assert torch.equal(getattr(got, name), getattr(whole, name)), name


def test_iter_checkpoint_reads_only_a_ranks_slice_of_each_projection(tmp_path):
    hf = tiny_llama(2)
    hf.save_pretrained(tmp_path / "m")
    whole = dict(iter_checkpoint(str(tmp_path / "m")))
    part = dict(iter_checkpoint(str(tmp_path / "m"), tp=(1, 2)))
    assert part.keys() == whole.keys()
    for name, t in whole.items():
        kind = name.split(".")[-2]
        if kind in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
            assert torch.equal(part[name], t[t.shape[0] // 2:]), name
        elif kind in ("o_proj", "down_proj"):
            assert torch.equal(part[name], t[:, t.shape[1] // 2:]), name
        else:
            assert torch.equal(part[name], t), name                  # norms, embedding, lm_head: whole


def test_a_sharded_load_refuses_a_projection_of_another_size(tmp_path):
    tiny_llama(2).save_pretrained(tmp_path / "m")
    args = ModelArgs.from_hf_config(tiny_llama(2).config)
    bad = ((n, t[:3] if n.endswith("q_proj.weight") else t) for n, t in iter_checkpoint(str(tmp_path / "m")))
    with pytest.raises(ValueError, match="q_proj"):
        LlamaModel.from_state_dict(args, bad, torch.device("cpu"), torch.float32, tp=(0, 2))


def test_a_sharded_load_refuses_a_split_that_does_not_divide(tmp_path):
    tiny_llama(2).save_pretrained(tmp_path / "m")
    args = ModelArgs.from_hf_config(tiny_llama(2).config)
    with pytest.raises(ValueError, match="key/value heads"):
        LlamaModel.from_state_dict(args, iter_checkpoint(str(tmp_path / "m")), torch.device("cpu"), torch.float32,
                                   tp=(0, 4))


@pytest.mark.parametrize("num_kv_heads,loaded,pieces,slow_piece",
                         [(2, False, (), 0), (2, True, (), 0), (2, False, (16, 40), 0), (2, False, (16, 24, 40), 24)])
def test_two_gloo_ranks_match_one_process_token_for_token(tmp_path, num_kv_heads, loaded, pieces, slow_piece):
    """Both ways a rank gets its shard: apply_tp on the whole model, and loading the saved checkpoint sharded
    (as LLMEngine does for `model.tensor_parallel`); and with the steps with prefill in pieces (their
    all-reduces inside the pieces, as captured on GPUs; 4 heads, 2 kv heads: 2 + 1 per rank), also where one
    rank alone times a bucket as slow (both must drop it, or their padded all-reduces would differ)."""
    rng = random.Random(num_kv_heads)
    prompts = [[rng.randrange(3, 300) for _ in range(rng.randint(3, 40))] for _ in range(6)]
    model_dir = ""
    if loaded:
        tiny_llama(num_kv_heads).save_pretrained(tmp_path / "m")
        model_dir = str(tmp_path / "m")
    # few blocks: the tensor-parallel run also preempts and recomputes, and n=2 forks share blocks
    args = (2, str(tmp_path / "init"), num_kv_heads, prompts, 10, 2, 40, str(tmp_path / "out.json"), model_dir, pieces,
            slow_piece)
    mp.spawn(tp_generate_worker, args=args, nprocs=2, join=True)
    got = json.loads((tmp_path / "out.json").read_text())
    if slow_piece:
        kept = [json.loads((tmp_path / f"out.json.rank{r}.buckets").read_text()) for r in (0, 1)]
        assert kept[0] == kept[1] == [b for b in pieces if b != slow_piece]
    # the same path as the ranks (our model, no tokenizer, so no EOS id), unsharded
    whole = apply_tp(from_hf_model(tiny_llama(num_kv_heads), torch.device("cpu"), torch.float32), 0, 1)
    eng = LLMEngine.from_model(whole, None, EngineConfig(model_path="", device="cpu", block_size=4))
    want = [[c.token_ids for c in o.completions] for o in eng.generate(
        [Request(str(i), p, SamplingParams(max_new_tokens=10, min_new_tokens=10, temperature=0.0, n=2))
         for i, p in enumerate(prompts)])]
    assert got["tokens"] == want
    assert got["preemptions"] > 0


def test_a_replica_switches_models_on_every_rank(tmp_path):
    """Rank 0 of a tensor-parallel replica claims jobs of two models in turn (a, b, then a again): each switch
    loads the new model's shards on both ranks, and each job's greedy tokens equal that model's in one process."""
    from ziya_batch.tools.demo_model import write_demo_model
    from ziya_batch.tools.testing import tp_switch_worker
    from ziya_batch.work.models import engine_config
    from ziya_batch.spec import parse_spec

    specs = []
    for name, seed in (("a", 0), ("b", 1)):
        model = write_demo_model(tmp_path / name, seed=seed)
        specs.append(parse_spec({"name": name, "model": {"path": str(model), "tensor_parallel": 2},
                                 "input": ["unused.jsonl"], "output": {"path": str(tmp_path / f"out-{name}")}}))
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 200) for _ in range(rng.randint(3, 30))] for _ in range(5)]
    order = [specs[0], specs[1], specs[0]]
    mp.spawn(tp_switch_worker, args=(2, str(tmp_path / "init"), [s.model_dump_json() for s in order], prompts, 6,
                                     str(tmp_path / "out.json")), nprocs=2, join=True)
    got = json.loads((tmp_path / "out.json").read_text())
    params = SamplingParams(max_new_tokens=6, min_new_tokens=6, temperature=0.0)
    want = {}
    for s in specs:
        eng = LLMEngine(engine_config(s, "cpu"))
        want[s.name] = [o.completions[0].token_ids for o in eng.generate(
            [Request(str(i), p, params) for i, p in enumerate(prompts)])]
    assert want["a"] != want["b"]                      # the two models really differ
    assert got == [want["a"], want["b"], want["a"]]
