"""FP8 weights (quant.py) on the CPU: the quantisation math, the float32 emulation of Fp8Linear (and the real
torch._scaled_mm where this torch runs it on the CPU), the FP8 checkpoint writer and reader, tensor-parallel
sharding of the scales, and the refusal to load on hardware without FP8."""
from __future__ import annotations

import json
import random
import statistics

import pytest
import torch

from ziya_batch.engine import fp8_checkpoint, quant
from ziya_batch.engine.engine import LLMEngine
from ziya_batch.engine.model import LlamaModel, ModelArgs, from_hf_model, iter_checkpoint
from ziya_batch.tools.testing import tiny_llama
from ziya_batch.engine.tp import apply_tp
from ziya_batch.engine.types import EngineConfig, Request, SamplingParams
from ziya_batch.errors import ModelError, SpecError

CPU = torch.device("cpu")
PROJ = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def _matrix(rows: int, cols: int, seed: int) -> torch.Tensor:
    # rows of very different magnitudes (1e-3 .. 1e2), as real weights have: per-channel scales must follow them
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * torch.logspace(-3, 2, rows).unsqueeze(1)


@pytest.mark.parametrize("seed", range(4))
def test_each_output_channel_gets_its_own_scale_and_round_trips_within_e4m3_rounding(seed):
    w = _matrix(48, 80, seed)
    w8, scale = quant.quantize_weight(w)
    assert w8.dtype == torch.float8_e4m3fn and w8.shape == w.shape
    assert scale.dtype == torch.float32 and scale.shape == (48, 1)
    assert torch.allclose(scale[:, 0], w.abs().amax(dim=1) / 448.0)
    # every row uses the whole e4m3 range: its largest magnitude lands on 448
    assert torch.equal(w8.float().abs().amax(dim=1), torch.full((48,), 448.0))
    back = quant.dequantize(w8, scale)
    # 3 mantissa bits: normal values within 2^-4 relative; subnormals (below 2^-6 * scale) within 2^-10 * scale
    bound = torch.maximum(w.abs() * 2.0 ** -4, scale * 2.0 ** -10)
    assert ((back - w).abs() <= bound).all()


def test_a_zero_row_quantises_to_zeros_with_a_finite_scale():
    w = _matrix(8, 32, 0)
    w[3] = 0.0
    w8, scale = quant.quantize_weight(w)
    assert torch.equal(w8[3].float(), torch.zeros(32))
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert torch.equal(quant.dequantize(w8, scale)[3], torch.zeros(32))


def test_values_beyond_448_times_the_scale_cannot_occur_and_nothing_overflows():
    x = torch.tensor([[1e6, -3e5, 1.0], [-7.0, 0.5, 7.0]])
    x8, sx = quant.quantize_rows(x)
    assert torch.isfinite(x8.float()).all()
    assert x8.float().abs().max() == 448.0
    assert torch.allclose(sx[:, 0], torch.tensor([1e6, 7.0]) / 448.0)


def test_a_per_tensor_scale_is_spread_over_the_rows():
    assert torch.equal(quant.per_channel(torch.tensor(0.5), 3), torch.full((3, 1), 0.5))
    assert torch.equal(quant.per_channel(torch.tensor([2.0]), 2), torch.full((2, 1), 2.0))
    with pytest.raises(ValueError):
        quant.per_channel(torch.ones(4, 1), 3)


def test_the_emulated_fp8_linear_is_close_to_float16():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 128, generator=g) * 0.05
    x = torch.randn(17, 128, generator=g)
    want = (x.half() @ w.half().t()).float()                   # the float16 reference
    got = quant.Fp8Linear(*quant.quantize_weight(w))(x)
    rel = (got - want).norm() / want.norm()
    assert rel < 0.06, rel                                     # two e4m3 roundings (x and w), ~2 * 2^-5 rms
    # and it is not float16 itself: the float8 rounding is really there
    assert rel > 1e-3


def test_torch_scaled_mm_on_the_cpu_matches_the_emulation():
    g = torch.Generator().manual_seed(1)
    w8, sw = quant.quantize_weight(torch.randn(64, 96, generator=g))
    x8, sx = quant.quantize_rows(torch.randn(9, 96, generator=g))
    try:
        got = torch._scaled_mm(x8, w8.t(), scale_a=sx, scale_b=sw.view(1, -1), out_dtype=torch.float32)
    except (RuntimeError, NotImplementedError) as err:
        pytest.skip(f"this torch has no CPU _scaled_mm: {err}")
    want = (x8.float() * sx) @ (w8.float() * sw).t()
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 300) for _ in range(rng.randint(3, 30))] for _ in range(n)]


def _first_tokens(model, prompts):
    eng = LLMEngine.from_model(model, None, EngineConfig(model_path="", device="cpu", block_size=4))
    params = SamplingParams(max_new_tokens=1, temperature=0.0)
    return [o.completions[0] for o in eng.generate([Request(str(i), p, params) for i, p in enumerate(prompts)])]


def test_an_fp8_model_picks_the_float32_models_next_token_with_close_logprobs():
    """The emulated W8A8 model through the whole engine (prefill, paged cache, sampling) against float32, on a
    random model whose next-token choices include near-ties: most agree, logprobs within ~0.1. A scale 30% off
    in one projection already gives 20 of 48 and 0.33 (measured), so these bounds see a wrong scale."""
    hf = tiny_llama(4)
    prompts = _prompts(48)
    ref = _first_tokens(from_hf_model(hf, CPU, torch.float32), prompts)
    got = _first_tokens(quant.quantize_model(from_hf_model(hf, CPU, torch.float32)), prompts)
    same = [(a, b) for a, b in zip(ref, got) if a.token_ids == b.token_ids]
    assert len(same) >= 0.65 * len(prompts), f"{len(same)} of {len(prompts)} first tokens agree"
    assert statistics.mean(abs(a.logprobs[0] - b.logprobs[0]) for a, b in same) < 0.2


def test_every_sampling_option_runs_on_an_fp8_model_and_seeds_reproduce():
    model = quant.quantize_model(from_hf_model(tiny_llama(2), CPU, torch.float32))
    eng = LLMEngine.from_model(model, None, EngineConfig(model_path="", device="cpu", block_size=4))
    params = SamplingParams(max_new_tokens=8, min_new_tokens=8, temperature=0.8, top_p=0.9, top_k=20,
                            repetition_penalty=1.2, n=2, seed=7)
    runs = [[[c.token_ids for c in o.completions] for o in eng.generate(
        [Request(str(i), p, params) for i, p in enumerate(_prompts(4, 3))])] for _ in range(2)]
    assert runs[0] == runs[1]
    assert all(len(c) == 8 for o in runs[0] for c in o) and all(len(o) == 2 for o in runs[0])


@pytest.fixture(scope="module")
def demo_dirs(tmp_path_factory):
    from ziya_batch.tools.demo_model import write_demo_model
    root = tmp_path_factory.mktemp("fp8")
    src = write_demo_model(root / "f16", dtype="float16", hidden_size=64, num_heads=4, num_kv_heads=2,
                           intermediate_size=128)
    dst = fp8_checkpoint.write_fp8_checkpoint(src, root / "fp8", max_shard_size="60KB")
    return src, dst


def test_the_writer_stores_float8_weights_with_per_channel_scales_and_the_rest_as_it_was(demo_dirs):
    src, dst = demo_dirs
    before = dict(iter_checkpoint(str(src)))
    after = dict(iter_checkpoint(str(dst)))
    quantised = [n for n in before if quant.is_quantized_weight(n)]
    assert len(quantised) == 2 * 7
    assert set(after) == set(before) | {n + "_scale" for n in quantised}
    for name, t in before.items():
        if name in quantised:
            w8, scale = quant.quantize_weight(t)
            assert after[name].dtype == torch.float8_e4m3fn and torch.equal(after[name].float(), w8.float()), name
            assert after[name + "_scale"].shape == (t.shape[0], 1) and torch.equal(after[name + "_scale"], scale)
        else:
            assert after[name].dtype == t.dtype and torch.equal(after[name], t), name
    config = json.loads((dst / "config.json").read_text())
    assert fp8_checkpoint.checkpoint_quantization(config) == "fp8"
    assert config["quantization_config"]["config_groups"]["group_0"]["weights"]["strategy"] == "channel"
    index = json.loads((dst / fp8_checkpoint.INDEX_FILE).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files == sorted(p.name for p in dst.glob("*.safetensors"))   # 60KB shards
    assert set(index["weight_map"]) == set(after)
    for side in ("tokenizer.model", "tokenizer_config.json", "generation_config.json"):
        assert (dst / side).read_bytes() == (src / side).read_bytes(), side
    assert not list(dst.glob(".*"))                                   # no temporary files left


def test_the_writer_refuses_a_target_in_use_and_a_checkpoint_already_quantised(demo_dirs, tmp_path):
    src, dst = demo_dirs
    with pytest.raises(ModelError, match="not an empty directory"):
        fp8_checkpoint.write_fp8_checkpoint(src, dst)
    with pytest.raises(ModelError, match="already quantised"):
        fp8_checkpoint.write_fp8_checkpoint(dst, tmp_path / "again")
    with pytest.raises(ModelError, match="config.json"):
        fp8_checkpoint.write_fp8_checkpoint(tmp_path / "nowhere", tmp_path / "x")


def _load(path, tp=(0, 1), quantization="fp8"):
    from transformers import AutoConfig
    args = ModelArgs.from_hf_config(AutoConfig.from_pretrained(str(path)))
    return LlamaModel.from_state_dict(args, iter_checkpoint(str(path), tp=tp), CPU, torch.float32, tp=tp,
                                      quantization=quantization)


@pytest.fixture
def fp8_on_cpu(monkeypatch):
    # the loading code, not the hardware check (tested below), on a machine without FP8
    monkeypatch.setattr(quant, "require_fp8", lambda device, dtype=None: None)


def test_loading_quantises_a_float16_checkpoint_as_the_writer_does(demo_dirs, fp8_on_cpu):
    src, dst = demo_dirs
    a, b = _load(src), _load(dst)
    for la, lb in zip(a.layers, b.layers):
        for name in PROJ:
            fa, fb = getattr(la, name), getattr(lb, name)
            assert isinstance(fa, quant.Fp8Linear) and isinstance(fb, quant.Fp8Linear)
            assert fa.weight.dtype == torch.float8_e4m3fn and fa.scale.dtype == torch.float32
            assert torch.equal(fa.weight.float(), fb.weight.float()) and torch.equal(fa.scale, fb.scale), name
    assert a.embed.dtype == a.lm_head.dtype == torch.float32          # embeddings, lm_head stay in dtype


def test_without_quantization_an_fp8_checkpoint_is_widened_and_generates_on_the_cpu(demo_dirs):
    src, dst = demo_dirs
    wide = _load(dst, quantization=None)
    assert all(isinstance(getattr(layer, n), torch.nn.Parameter) for layer in wide.layers for n in PROJ)
    f16 = _load(src, quantization=None)
    rel = (wide.layers[0].qkv_proj - f16.layers[0].qkv_proj).norm() / f16.layers[0].qkv_proj.norm()
    assert 1e-4 < rel < 0.05
    eng = LLMEngine(EngineConfig(model_path=str(dst), device="cpu"))
    out = eng.generate([Request("a", [1, 5, 9, 13], SamplingParams(max_new_tokens=4, min_new_tokens=4))])
    assert len(out[0].completions[0].token_ids) == 4


def test_the_engine_refuses_fp8_on_the_cpu_in_one_line(demo_dirs):
    src, _ = demo_dirs
    with pytest.raises(ModelError) as err:
        LLMEngine(EngineConfig(model_path=str(src), device="cpu", quantization="fp8"))
    msg = str(err.value)
    assert "\n" not in msg and "fp8" in msg and "8.9" in msg


@pytest.mark.parametrize("from_checkpoint", [False, True])
def test_tensor_parallel_shards_split_column_parallel_scales_and_keep_row_parallel_ones(
        demo_dirs, fp8_on_cpu, from_checkpoint):
    """A rank's Fp8Linear holds its rows of q/k/v and gate/up with exactly those rows' scales, and its input
    columns of o/down with every row's scale; loading the FP8 checkpoint sharded gives the same as apply_tp
    on the whole quantised model."""
    src, dst = demo_dirs
    whole = _load(dst)
    for rank in range(2):
        got = _load(dst, tp=(rank, 2)) if from_checkpoint else apply_tp(_load(dst), rank, 2)
        for lw, lg in zip(whole.layers, got.layers):
            q, kv = 64, 32                                            # 4 heads and 2 kv heads of 16
            for name, pieces in (("qkv_proj", [q, kv, kv]), ("gate_up_proj", [128, 128])):
                w, g = getattr(lw, name), getattr(lg, name)
                for part in ("weight", "scale"):
                    want = torch.cat([x.chunk(2)[rank] for x in getattr(w, part).float().split(pieces)])
                    assert torch.equal(getattr(g, part).float(), want), (name, part)
            for name in ("o_proj", "down_proj"):
                w, g = getattr(lw, name), getattr(lg, name)
                assert torch.equal(g.weight.float(), w.weight.float().chunk(2, dim=1)[rank]), name
                assert torch.equal(g.scale, w.scale), name
            assert lg.local_heads == 2 and lg.local_kv_heads == 1


def test_a_sharded_fp8_rank_computes_its_share_of_the_whole_layer(demo_dirs, fp8_on_cpu):
    """Row-parallel products of the two ranks add up to the whole o_proj's (the all-reduce), up to the
    activation rounding: the scales kept whole are the right ones."""
    _, dst = demo_dirs
    whole = _load(dst).layers[0].o_proj
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    parts = sum(apply_tp(_load(dst), r, 2).layers[0].o_proj(x.chunk(2, dim=1)[r]) for r in range(2))
    assert ((parts - whole(x)).norm() / whole(x).norm()) < 0.05


def test_the_spec_field_reaches_the_engine_config_and_the_engine_key(tmp_path):
    from ziya_batch.work.models import engine_config, engine_key
    from ziya_batch.spec import RUN_FIELDS, parse_spec

    base = {"name": "x", "model": {"path": str(tmp_path)}, "input": ["a.jsonl"], "output": {"path": str(tmp_path)}}
    plain = parse_spec(base)
    fp8 = parse_spec({**base, "model": {"path": str(tmp_path), "quantization": "fp8"}})
    assert plain.model.quantization is None and fp8.model.quantization == "fp8"
    assert engine_config(fp8, "cpu").quantization == "fp8" and engine_config(plain, "cpu").quantization is None
    assert engine_key(fp8) != engine_key(plain)
    assert fp8.identity() != plain.identity() and ("model", "quantization") not in RUN_FIELDS
    with pytest.raises(SpecError, match="quantization"):
        parse_spec({**base, "model": {"path": str(tmp_path), "quantization": "int4"}})


def test_the_quantize_command_writes_a_checkpoint_and_fails_in_one_line(demo_dirs, tmp_path, capsys):
    from ziya_batch.cli import main
    src, _ = demo_dirs
    with pytest.raises(SystemExit) as code:
        main(["quantize", "--model", str(src), "--target", str(tmp_path / "q"), "--device", "cpu"])
    assert code.value.code == 0
    assert "model.quantization: fp8" in capsys.readouterr().out
    assert fp8_checkpoint.checkpoint_quantization(json.loads((tmp_path / "q" / "config.json").read_text())) == "fp8"
    with pytest.raises(SystemExit) as code:
        main(["quantize", "--model", str(tmp_path / "missing"), "--target", str(tmp_path / "q2")])
    err = capsys.readouterr().err
    assert code.value.code == 2 and err.count("\n") == 1 and err.startswith("ziya-batch: error:")
    # a device torch does not know, or a GPU this machine lacks: one line, and no target left behind
    for device in ("banana", "cuda:99", "meta", "cuda:-1"):
        with pytest.raises(SystemExit) as code:
            main(["quantize", "--model", str(src), "--target", str(tmp_path / "q3"), "--device", device])
        err = capsys.readouterr().err
        assert code.value.code == 2 and err.count("\n") == 1 and f"--device '{device}'" in err, err
        assert not (tmp_path / "q3").exists()


def test_the_fused_activation_quantisation_is_off_on_the_cpu():
    assert quant.check_fused_quantize(CPU, torch.float32) is False
    assert not any(getattr(layer, n).fused for layer in quant.quantize_model(
        from_hf_model(tiny_llama(2), CPU, torch.float32)).layers for n in PROJ)


def test_rows_quantised_by_the_norm_give_what_the_linear_quantising_them_gives():
    # the CPU runs _scaled_mm too: an Fp8Linear handed fused.QuantizedRows skips its own quantisation
    from ziya_batch.engine.fused import QuantizedRows
    g = torch.Generator().manual_seed(2)
    w, x = torch.randn(48, 64, generator=g) * 0.05, torch.randn(9, 64, generator=g)
    lin = quant.Fp8Linear(*quant.quantize_weight(w))
    got = lin(QuantizedRows(*quant.quantize_rows(x), torch.float32))
    assert got.dtype == torch.float32 and torch.allclose(got, lin(x), rtol=1e-5, atol=1e-5)
    assert quant.check_fused_norm_quantize(CPU, torch.float32) is False
    assert quant.check_fused_silu_quantize(CPU, torch.float32) is False
    assert not any(quant.check_fused_rows(CPU, torch.float32, 64, 128).values())
    with pytest.raises(ValueError, match="GPU only"):
        from ziya_batch.engine import fused
        fused.silu_mul(torch.randn(3, 8), quantize=True)
    assert not any(getattr(layer, n).takes_rows for layer in quant.quantize_model(
        from_hf_model(tiny_llama(2), CPU, torch.float32)).layers for n in PROJ)


def test_the_bench_roofline_counts_one_byte_a_float8_weight():
    from ziya_batch.tools.bench import _args, _weight_bytes
    a = _args(40)
    embeddings = 2 * 2 * a.vocab_size * a.hidden_size              # embedding and lm_head stay float16
    f16, f8 = _weight_bytes(a) - embeddings, _weight_bytes(a, "fp8") - embeddings
    assert f16 / 2 < f8 < f16 / 2 * 1.002                            # plus 4 bytes of scale per output row


def _gloo_fp8_rank(rank: int, world_size: int, init_file: str, model_dir: str, prompts: list, result_file: str):
    """One CPU rank (gloo) of an FP8 replica loaded sharded from an FP8 checkpoint; rank 0 writes the first
    greedy tokens as JSON."""
    import torch.distributed as dist

    from ziya_batch.engine.tp import attach_tp, enable_tp_driver, serve_follower
    torch.set_num_threads(1)
    quant.require_fp8 = lambda device, dtype=None: None     # the loading code on a CPU (the refusal is tested apart)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        model = attach_tp(_load(model_dir, tp=(rank, world_size)), rank, world_size)
        eng = LLMEngine.from_model(model, None, EngineConfig(model_path="", device="cpu", block_size=4))
        if rank == 0:
            driver = enable_tp_driver(eng)
            outs = eng.generate([Request(str(i), p, SamplingParams(max_new_tokens=1, temperature=0.0))
                                 for i, p in enumerate(prompts)])
            driver.stop()
            with open(result_file, "w") as fh:
                json.dump([o.completions[0].token_ids for o in outs], fh)
        else:
            serve_follower(eng)
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_with_fp8_weights_agree_with_one_process(tmp_path, fp8_on_cpu):
    """The float8 shards through attach_tp, the all-reduces and the followers. Not token for token: a rank
    quantises only its columns of o_proj's and down_proj's input, so activation rounding differs from one
    process's (as in vLLM); on this random model with near-ties most first tokens still agree."""
    import torch.multiprocessing as mp
    tiny_llama(2).save_pretrained(tmp_path / "f32")
    fp8_checkpoint.write_fp8_checkpoint(tmp_path / "f32", tmp_path / "fp8")
    prompts = _prompts(32, seed=4)
    mp.spawn(_gloo_fp8_rank, args=(2, str(tmp_path / "init"), str(tmp_path / "fp8"), prompts,
                                   str(tmp_path / "out.json")), nprocs=2, join=True)
    two = json.loads((tmp_path / "out.json").read_text())
    one = [c.token_ids for c in _first_tokens(_load(tmp_path / "fp8"), prompts)]
    same = sum(a == b for a, b in zip(one, two))
    assert len(two) == len(prompts) and same >= 0.8 * len(prompts), f"{same} of {len(prompts)} agree"


def test_an_engine_over_a_transformers_model_honours_the_quantization_too(fp8_on_cpu):
    """LLMEngine.from_model(hf_model, config) copies the weights through the same loader: quantization fp8 there
    gives Fp8Linear projections (the CPU refusal bypassed, as on an FP8 GPU), not a silent float copy."""
    eng = LLMEngine.from_model(tiny_llama(2), None, EngineConfig(model_path="", device="cpu", quantization="fp8"))
    assert all(isinstance(getattr(layer, n), quant.Fp8Linear) for layer in eng.model.layers for n in PROJ)


def test_fast_accumulation_reaches_every_fp8_projection_and_its_shards():
    model = quant.quantize_model(from_hf_model(tiny_llama(2), CPU, torch.float32))
    lins = [getattr(layer, n) for layer in model.layers for n in PROJ]
    assert not any(m.fast_accum for m in lins)
    assert quant.set_fast_accum(model, True) == len(lins) == 8
    assert all(m.fast_accum for m in lins) and lins[0].like(lins[0].weight, lins[0].scale).fast_accum
    # the CPU's float32 emulation ignores it: the same output either way
    x = torch.randn(3, lins[0].shape[1])
    on = lins[0](x)
    quant.set_fast_accum(model, False)
    assert torch.equal(on, lins[0](x))
    assert quant.set_fast_accum(from_hf_model(tiny_llama(2), CPU, torch.float32), True) == 0


@pytest.mark.parametrize("fast", [False, True])
def test_fast_accumulation_is_what_the_projection_asks_scaled_mm_for(monkeypatch, fast):
    from ziya_batch.engine.fused import QuantizedRows
    seen, real = [], torch._scaled_mm

    def spy(*args, **kw):
        seen.append(kw.get("use_fast_accum"))
        return real(*args, **{k: v for k, v in kw.items() if k != "use_fast_accum"})
    monkeypatch.setattr(torch, "_scaled_mm", spy)
    g = torch.Generator().manual_seed(3)
    lin = quant.Fp8Linear(*quant.quantize_weight(torch.randn(16, 32, generator=g) * 0.05))
    lin.fast_accum = fast
    lin(QuantizedRows(*quant.quantize_rows(torch.randn(4, 32, generator=g)), torch.float32))
    assert seen == [fast]


def test_an_engine_asked_for_fast_accumulation_without_fp8_weights_refuses():
    from ziya_batch.engine.types import EngineConfig
    with pytest.raises(ValueError, match="fp8_fast_accum applies to FP8 weights"):
        LLMEngine.from_model(from_hf_model(tiny_llama(2), CPU, torch.float32), None,
                             EngineConfig(model_path="", device="cpu", fp8_fast_accum=True))
