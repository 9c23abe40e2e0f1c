"""merge_delta: base + delta gives the target back, tensor by tensor, resumably, from safetensors or .bin."""
import json
import shutil
import threading

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from ziya_batch.engine import merge_delta as md
from ziya_batch.engine.merge_delta import ensure_merged, is_merged, is_taken_from_delta, merge_delta
from ziya_batch.errors import ModelError
from ziya_batch.tools.demo_model import write_demo_model

BASE_VOCAB = 4000  # smaller than the demo tokenizer's 4096, as LLaMA's 32,000 is smaller than Ziya's 39,410
SIDE = ("config.json", "generation_config.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
        "special_tokens_map.json")


def _grid(t: torch.Tensor) -> torch.Tensor:
    # values on a 2**-16 grid below 1 in magnitude: their sums and differences are exact in float32
    return (torch.round(t.float().clamp(-0.99, 0.99) * 2**16) / 2**16).to(t.dtype)


def _save_sharded(sd: dict, path, parts: int = 2) -> None:
    path.mkdir(parents=True)
    names = list(sd)
    weight_map = {}
    for i in range(parts):
        file = f"model-{i + 1:05d}-of-{parts:05d}.safetensors"
        chunk = {n: sd[n].contiguous() for n in names[i::parts]}
        save_file(chunk, str(path / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in chunk})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _make(tmp_path, dtype="float32", exact=True):
    """(target_dir, base_dir, delta_dir): delta = target - base, with the target's vocabulary rows."""
    target = write_demo_model(tmp_path / "target", dtype=dtype)
    sd = load_file(str(target / "model.safetensors"))
    if exact:
        sd = {n: _grid(t) for n, t in sd.items()}
        save_file(sd, str(target / "model.safetensors"), metadata={"format": "pt"})
    g = torch.Generator().manual_seed(1)
    base, delta = {}, {}
    for name, t in sd.items():
        if is_taken_from_delta(name):
            base[name] = (torch.randn(BASE_VOCAB, t.shape[1], generator=g) * 0.02).to(t.dtype)
            delta[name] = t
        else:
            b = (torch.randn(t.shape, generator=g) * 0.02).to(t.dtype)
            base[name] = _grid(b) if exact else b
            delta[name] = (t.float() - base[name].float()).to(t.dtype)
    (tmp_path / "base").mkdir()
    save_file(base, str(tmp_path / "base" / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((target / "config.json").read_text())
    (tmp_path / "base" / "config.json").write_text(json.dumps({**cfg, "vocab_size": BASE_VOCAB}))
    _save_sharded(delta, tmp_path / "delta")
    for name in SIDE:
        shutil.copyfile(target / name, tmp_path / "delta" / name)
    return target, tmp_path / "base", tmp_path / "delta"


def _merged_state(path) -> dict:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    out = {}
    for name, file in index["weight_map"].items():
        with safe_open(str(path / file), "pt") as f:
            out[name] = f.get_tensor(name)
    return out


def test_merge_recovers_the_target_exactly_in_float32(tmp_path):
    target, base, delta = _make(tmp_path)
    out = merge_delta(base, delta, tmp_path / "merged")
    want = load_file(str(target / "model.safetensors"))
    got = _merged_state(out)
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == torch.float32
        assert torch.equal(got[name], want[name]), name
    assert got["model.embed_tokens.weight"].shape[0] == 4096  # the delta's vocabulary came through
    assert is_merged(out)
    # loads as a model with the delta's tokenizer, and computes what the target computes
    tok = AutoTokenizer.from_pretrained(str(out))
    ids = tok("<human>:你好\n<bot>:", return_tensors="pt").input_ids
    m1 = AutoModelForCausalLM.from_pretrained(str(out))
    m2 = AutoModelForCausalLM.from_pretrained(str(target))
    with torch.no_grad():
        assert torch.equal(m1(ids).logits, m2(ids).logits)


def test_merge_float16_is_within_float16_rounding(tmp_path):
    target, base, delta = _make(tmp_path, dtype="float16", exact=False)
    out = merge_delta(base, delta, tmp_path / "merged", max_shard_size="300KB")
    want = load_file(str(target / "model.safetensors"))
    b, d = load_file(str(base / "model.safetensors")), _merged_state(delta)
    got = _merged_state(out)
    assert len(set(json.loads((out / md.INDEX_FILE).read_text())["weight_map"].values())) > 1
    for name in want:
        assert got[name].dtype == torch.float16
        if not is_taken_from_delta(name):  # one rounding of the float32 sum, not two float16 roundings
            assert torch.equal(got[name], (b[name].float() + d[name].float()).half()), name
        # the delta was rounded to float16 once and the sum once more: float16 ulps of |delta| ~ 0.1
        torch.testing.assert_close(got[name].float(), want[name].float(), rtol=2e-3, atol=1e-4)


def test_interrupted_merge_resumes_without_redoing_finished_shards(tmp_path):
    target, base, delta = _make(tmp_path)

    class Stop(Exception):
        pass

    def stop_after_first(i, n, file):
        assert n > 2
        raise Stop()

    with pytest.raises(Stop):
        merge_delta(base, delta, tmp_path / "merged", max_shard_size="200KB", on_shard_written=stop_after_first)
    merged = tmp_path / "merged"
    shards = sorted(merged.glob("model-*.safetensors"))
    assert len(shards) == 1 and not (merged / md.INDEX_FILE).exists() and not is_merged(merged)
    stat = shards[0].stat()
    written = []
    merge_delta(base, delta, merged, max_shard_size="200KB", on_shard_written=lambda i, n, f: written.append(i))
    assert 0 not in written and written == list(range(1, len(written) + 1))
    assert shards[0].stat().st_mtime_ns == stat.st_mtime_ns and shards[0].stat().st_ino == stat.st_ino
    want = load_file(str(target / "model.safetensors"))
    got = _merged_state(merged)
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert not list(merged.glob("*.tmp"))
    # a finished merge run again is a no-op
    again = []
    merge_delta(base, delta, merged, max_shard_size="200KB", on_shard_written=lambda i, n, f: again.append(i))
    assert again == []


def test_shape_mismatch_names_the_tensor_and_both_shapes(tmp_path):
    _, base, delta = _make(tmp_path)
    sd = load_file(str(base / "model.safetensors"))
    sd["model.layers.0.mlp.up_proj.weight"] = torch.zeros(100, 64)
    save_file(sd, str(base / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelError) as err:
        merge_delta(base, delta, tmp_path / "merged")
    msg = str(err.value)
    assert "model.layers.0.mlp.up_proj.weight" in msg and "[100, 64]" in msg and "[172, 64]" in msg
    assert not (tmp_path / "merged").exists()


def test_missing_tensor_and_bad_directories_are_model_errors(tmp_path):
    _, base, delta = _make(tmp_path)
    sd = load_file(str(base / "model.safetensors"))
    del sd["model.norm.weight"]
    save_file(sd, str(base / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelError, match="model.norm.weight"):
        merge_delta(base, delta, tmp_path / "merged")
    with pytest.raises(ModelError, match="no such directory"):
        merge_delta(tmp_path / "nope", delta, tmp_path / "merged")
    with pytest.raises(ModelError, match="no model weights"):
        merge_delta(tmp_path, delta, tmp_path / "merged")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "something.txt").write_text("x")
    with pytest.raises(ModelError, match="--base and --delta are the same directory"):
        merge_delta(delta, delta, tmp_path / "busy")
    (tmp_path / "two").mkdir()
    _, base2, delta2 = _make(tmp_path / "two")
    with pytest.raises(ModelError, match="not empty"):
        merge_delta(base2, delta2, tmp_path / "busy")


def test_bin_inputs(tmp_path):
    target, base, delta = _make(tmp_path)
    # base: sharded .bin with an index; delta: a single .bin
    sd = load_file(str(base / "model.safetensors"))
    (base / "model.safetensors").unlink()
    names = list(sd)
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2])):
        file = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        torch.save({n: sd[n] for n in part}, base / file)
        weight_map.update({n: file for n in part})
    (base / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    dsd = {}
    for f in delta.glob("model-*.safetensors"):
        dsd.update(load_file(str(f)))
        f.unlink()
    (delta / "model.safetensors.index.json").unlink()
    dsd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.arange(8, dtype=torch.float32)  # old checkpoints
    torch.save(dsd, delta / "pytorch_model.bin")
    out = merge_delta(base, delta, tmp_path / "merged")
    want = load_file(str(target / "model.safetensors"))
    got = _merged_state(out)
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert torch.equal(got["model.layers.0.self_attn.rotary_emb.inv_freq"], torch.arange(8, dtype=torch.float32))


def test_ensure_merged_merges_once_even_when_two_callers_race(tmp_path, monkeypatch):
    target, base, delta = _make(tmp_path)
    calls = []
    real = md.merge_delta

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(md, "merge_delta", counting)
    results = []
    threads = [threading.Thread(target=lambda: results.append(ensure_merged(base, delta, tmp_path / "cache")))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 2 and results[0] == results[1]
    assert is_merged(results[0]) and results[0].parent == tmp_path / "cache"
    assert ensure_merged(base, delta, tmp_path / "cache") == results[0] and len(calls) == 1
    want = load_file(str(target / "model.safetensors"))
    assert torch.equal(_merged_state(results[0])["lm_head.weight"], want["lm_head.weight"])


def test_parse_size_bytes():
    assert md.parse_size_bytes("5GB") == 5 * 10**9
    assert md.parse_size_bytes("200kb") == 200_000
    assert md.parse_size_bytes("1GiB") == 2**30
    assert md.parse_size_bytes(123) == 123
    with pytest.raises(ModelError):
        md.parse_size_bytes("lots")


def test_comparing_jobs_merges_nothing(tmp_path, monkeypatch):
    """A worker compares jobs' engines on every claim (which model is loaded, which jobs share one): for a base +
    delta spec that must not merge, or even look at, the checkpoints; only loading its engine does."""
    from ziya_batch.engine import merge_delta
    from ziya_batch.work.models import engine_key
    from ziya_batch.spec import parse_spec

    def no_merge(*a, **k):
        raise AssertionError("merged while comparing jobs")

    monkeypatch.setattr(merge_delta, "ensure_merged", no_merge)
    spec = parse_spec({"name": "m", "model": {"base": str(tmp_path / "base"), "delta": str(tmp_path / "delta")},
                       "input": ["a.jsonl"], "output": {"path": str(tmp_path / "o")}})
    other = parse_spec({"name": "n", "model": {"base": str(tmp_path / "base"), "delta": str(tmp_path / "delta2")},
                        "input": ["a.jsonl"], "output": {"path": str(tmp_path / "o2")}})
    assert engine_key(spec) == engine_key(spec.model_copy()) and engine_key(spec) != engine_key(other)
