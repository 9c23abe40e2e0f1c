"""Checkpoints that are damaged, lie about themselves or were written by something else: the engine's loader and
`quantize` / `merge-delta` refuse them with one line naming the tensor or file, rather than loading garbage
(copy_ broadcasts a row, .to converts integers, a NaN scale makes every logit NaN), mixing two runs' shards, or
writing through a symbolic link."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from ziya_batch.engine import fp8_checkpoint
from ziya_batch.engine.merge_delta import merge_delta
from ziya_batch.engine.model import LlamaModel, ModelArgs, iter_checkpoint
from ziya_batch.errors import ModelError
from ziya_batch.tools.demo_model import write_demo_model

from tests.unit.test_merge_delta import _make

O_PROJ = "model.layers.1.self_attn.o_proj.weight"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ck")
    src = write_demo_model(root / "f16", dtype="float16", hidden_size=64, num_heads=4, num_kv_heads=2,
                           intermediate_size=128)
    return src, fp8_checkpoint.write_fp8_checkpoint(src, root / "fp8", max_shard_size="60KB")


def _load(path: Path, tp=(0, 1)):
    args = ModelArgs.from_hf_config(AutoConfig.from_pretrained(path))
    return LlamaModel.from_state_dict(args, iter_checkpoint(str(path), tp=tp, args=args), torch.device("cpu"),
                                      torch.float32, tp=tp)


def _tampered(src: Path, dst: Path, name: str, value) -> Path:
    """A copy of the checkpoint with tensor `name` replaced by value(old tensor), or removed when value is None."""
    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        sd = load_file(str(f))
        if name in sd:
            new = value(sd[name]) if value is not None else None
            sd = {n: (new if n == name else t) for n, t in sd.items() if n != name or new is not None}
            save_file(sd, str(f), metadata={"format": "pt"})
            return dst
    raise AssertionError(name)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 0.0, -1.0])
def test_a_scale_that_is_not_positive_and_finite_is_refused(checkpoints, tmp_path, value):
    _, fp8 = checkpoints

    def bad(s):
        s = s.clone()
        s[3] = value
        return s
    ck = _tampered(fp8, tmp_path / "c", O_PROJ + "_scale", bad)
    with pytest.raises(ValueError, match=r"layers.1.o_proj.weight_scale holds a scale that is not a positive"):
        _load(ck)


@pytest.mark.parametrize("name,value,message", [
    ("model.embed_tokens.weight", lambda t: t[:1], r"has shape \[1, 64\], the config says \[4096, 64\]"),
    ("model.norm.weight", lambda t: t[:1], r"norm.weight has shape \[1\], the config says \[64\]"),
    (O_PROJ, lambda t: t[:1], "o_proj.weight has shape"),
    (O_PROJ, lambda t: t.to(torch.int8), "is int8: weights are floating point"),
    ("model.norm.weight", lambda t: t > 0, "is bool: weights are floating point"),
    (O_PROJ, lambda t: t.to(torch.float8_e5m2), "float8 weights are e4m3"),
    ("model.layers.5.input_layernorm.weight", None, None)])
def test_a_tensor_of_another_shape_or_kind_is_refused(checkpoints, tmp_path, name, value, message):
    src, _ = checkpoints
    if value is None:           # a layer the config does not have
        ck = Path(shutil.copytree(src, tmp_path / "c"))
        sd = load_file(str(ck / "model.safetensors"))
        sd[name] = sd["model.layers.0.input_layernorm.weight"].clone()
        save_file(sd, str(ck / "model.safetensors"), metadata={"format": "pt"})
        message = "the config has 2 layers"
    else:
        ck = _tampered(src, tmp_path / "c", name, value)
    with pytest.raises(ValueError, match=message):
        _load(ck)


def test_a_scale_beside_a_float_weight_is_refused(checkpoints, tmp_path):
    src, _ = checkpoints
    ck = Path(shutil.copytree(src, tmp_path / "c"))
    sd = load_file(str(ck / "model.safetensors"))
    sd["model.layers.0.self_attn.q_proj.weight_scale"] = torch.full((64, 1), 1000.0)
    save_file(sd, str(ck / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"q_proj.weight is float\d+ but the checkpoint gives it a weight_scale"):
        _load(ck)


def test_a_projection_larger_than_the_config_is_refused_before_a_rank_slices_it(checkpoints, tmp_path):
    src, _ = checkpoints
    name = "model.layers.0.self_attn.q_proj.weight"
    ck = _tampered(src, tmp_path / "c", name, lambda t: torch.cat([t, t * 100]))
    for rank in (0, 1):
        with pytest.raises(ValueError, match="q_proj.weight has 128 along dimension 0, the config says 64"):
            _load(ck, tp=(rank, 2))


def test_quantize_refuses_weights_that_are_not_finite(checkpoints, tmp_path):
    src, _ = checkpoints

    def bad(t):
        t = t.clone()
        t[3, 0] = float("inf")
        return t
    ck = _tampered(src, tmp_path / "c", O_PROJ, bad)
    with pytest.raises(ModelError, match="o_proj.weight holds values that are not finite"):
        fp8_checkpoint.write_fp8_checkpoint(ck, tmp_path / "out")
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["c"]


def test_an_index_is_followed_all_or_nothing(checkpoints, tmp_path):
    _, fp8 = checkpoints
    ck = Path(shutil.copytree(fp8, tmp_path / "c"))
    index = json.loads((ck / fp8_checkpoint.INDEX_FILE).read_text())
    files = sorted(set(index["weight_map"].values()))
    # a stray copy the index does not name is not read: its lm_head would override the real one
    stray = load_file(str(ck / files[-1]))
    save_file({n: torch.zeros_like(t) for n, t in stray.items()}, str(ck / "model-00000-of-99999.safetensors"))
    base = _load(fp8)
    assert torch.equal(_load(ck).lm_head, base.lm_head)
    (ck / files[0]).unlink()
    with pytest.raises(FileNotFoundError, match=f"the index names {files[0]}, which is missing"):
        _load(ck)
    f16 = Path(shutil.copytree(checkpoints[0], tmp_path / "f16"))
    (f16 / fp8_checkpoint.INDEX_FILE).write_text(json.dumps({"weight_map": {"a": "model.safetensors",
                                                                            "b": "model-2.safetensors"}}))
    with pytest.raises(ModelError, match="the index names model-2.safetensors, which is missing"):
        fp8_checkpoint.write_fp8_checkpoint(f16, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (ck / fp8_checkpoint.INDEX_FILE).write_text(json.dumps({"weight_map": {"x": "../f16/model.safetensors"}}))
    with pytest.raises(ModelError, match="not a file of that directory"):
        _load(ck)
    (ck / fp8_checkpoint.INDEX_FILE).write_text(json.dumps({"weight_map": ["x"]}))
    with pytest.raises(ModelError, match="not a valid weight index"):
        _load(ck)


@pytest.mark.parametrize("config,message", [("{oops", "config.json is not JSON"), ("[1]", "not a JSON object"),
                                            ('{"quantization_config": "fp8"}', "already quantised"),
                                            ('{"quantization_config": {"quant_method": "compressed-tensors", '
                                             '"config_groups": [1]}}', "already quantised")])
def test_a_config_of_another_shape_is_one_line(checkpoints, tmp_path, config, message):
    src, _ = checkpoints
    ck = Path(shutil.copytree(src, tmp_path / "c"))
    (ck / "config.json").write_text(config)
    with pytest.raises(ModelError, match=message):
        fp8_checkpoint.write_fp8_checkpoint(ck, tmp_path / "out")


def test_a_truncated_safetensors_file_is_one_line(checkpoints, tmp_path):
    src, _ = checkpoints
    ck = Path(shutil.copytree(src, tmp_path / "c"))
    data = (ck / "model.safetensors").read_bytes()
    (ck / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="not a readable safetensors file"):
        fp8_checkpoint.write_fp8_checkpoint(ck, tmp_path / "out")
    (ck / "model.safetensors").write_bytes((2 ** 40).to_bytes(8, "little") + b"{}")
    with pytest.raises(ModelError, match="not a readable safetensors file"):
        fp8_checkpoint.write_fp8_checkpoint(ck, tmp_path / "out")


def test_two_quantize_runs_into_one_target_never_mix(checkpoints, tmp_path):
    """A second run into a target another is writing is refused at once; the first finishes whole."""
    src, _ = checkpoints
    other = write_demo_model(tmp_path / "other", dtype="float16", hidden_size=64, num_heads=4, num_kv_heads=2,
                             intermediate_size=128, seed=5)
    target = tmp_path / "target"
    refused = []

    def race(n):
        if not refused:
            with pytest.raises(ModelError, match="a quantize that is running, or was killed") as e:
                fp8_checkpoint.write_fp8_checkpoint(other, target, max_shard_size="60KB")
            refused.append(e.value)
    fp8_checkpoint.write_fp8_checkpoint(src, target, max_shard_size="60KB", on_shard=race)
    assert refused
    want = dict(iter_checkpoint(str(fp8_checkpoint.write_fp8_checkpoint(src, tmp_path / "again",
                                                                        max_shard_size="60KB"))))
    got = dict(iter_checkpoint(str(target)))
    assert got.keys() == want.keys() and all(torch.equal(got[n].float(), want[n].float()) for n in want)
    assert sorted(p.name for p in target.iterdir() if p.name.startswith(".")) == []
    # one killed outright leaves its claim: the next run says what it is
    (target.parent / "killed").mkdir()
    (target.parent / "killed" / fp8_checkpoint.CLAIM_FILE).write_text("")
    (target.parent / "killed" / ".shard-00001.tmp").write_text("")
    with pytest.raises(ModelError, match="holds what a quantize that is running, or was killed, wrote"):
        fp8_checkpoint.write_fp8_checkpoint(src, target.parent / "killed")


def test_quantize_into_an_existing_empty_directory_and_the_current_one(checkpoints, tmp_path, monkeypatch):
    src, _ = checkpoints
    (tmp_path / "empty").mkdir()
    fp8_checkpoint.write_fp8_checkpoint(src, tmp_path / "empty")
    assert (tmp_path / "empty" / fp8_checkpoint.INDEX_FILE).is_file()
    # the shards get the mode a new file gets (safetensors writes 0600), as config.json has
    mode = (tmp_path / "empty" / "config.json").stat().st_mode & 0o777
    assert [p.stat().st_mode & 0o777 for p in (tmp_path / "empty").glob("*.safetensors")] == [mode]
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    fp8_checkpoint.write_fp8_checkpoint(src, ".")
    assert (tmp_path / "here" / "config.json").is_file()
    (tmp_path / "full").mkdir()

    def fail(n):
        raise OSError(28, "No space left on device")
    with pytest.raises(ModelError, match="No space left on device"):
        fp8_checkpoint.write_fp8_checkpoint(src, tmp_path / "full", max_shard_size="60KB", on_shard=fail)
    assert (tmp_path / "full").is_dir() and list((tmp_path / "full").iterdir()) == []


def test_an_interrupted_quantize_leaves_no_target(checkpoints, tmp_path):
    src, _ = checkpoints

    def stop(n):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        fp8_checkpoint.write_fp8_checkpoint(src, tmp_path / "out", max_shard_size="60KB", on_shard=stop)
    assert list(tmp_path.iterdir()) == []


def test_a_resumed_merge_never_writes_through_a_link(tmp_path):
    _, base, delta = _make(tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    target = tmp_path / "merged"

    def stop(i, n, file):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        merge_delta(base, delta, target, max_shard_size="20KB", on_shard_written=stop)
    (target / "model-00002-of-00009.safetensors.tmp").unlink(missing_ok=True)
    os.symlink(victim, target / "model-00002-of-00009.safetensors.tmp")
    with pytest.raises(ModelError, match="holds a symbolic link"):
        merge_delta(base, delta, target, max_shard_size="20KB")
    assert victim.read_text() == "keep me"


def test_a_delta_without_a_config_is_refused_before_anything_is_written(tmp_path):
    _, base, delta = _make(tmp_path)
    (delta / "config.json").unlink()
    with pytest.raises(ModelError, match="has no config.json"):
        merge_delta(base, delta, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_a_float8_weight_without_its_scale_is_named(checkpoints, tmp_path):
    _, fp8 = checkpoints
    ck = _tampered(fp8, tmp_path / "c", O_PROJ + "_scale", None)
    with pytest.raises(ValueError, match=r"waiting for the rest of layers.1.o_proj.weight"):
        _load(ck)


def test_a_config_describing_more_weights_than_the_files_hold_is_refused_before_allocating(checkpoints, tmp_path):
    from ziya_batch.engine.engine import LLMEngine
    from ziya_batch.engine.model import num_parameters
    from ziya_batch.engine.types import EngineConfig

    src, fp8 = checkpoints
    for ck in (src, fp8):           # a true config fits its files, float16 or float8
        args = ModelArgs.from_hf_config(AutoConfig.from_pretrained(ck))
        assert num_parameters(args) == sum(t.numel() for n, t in iter_checkpoint(str(ck)) if not n.endswith("_scale"))
    ck = Path(shutil.copytree(src, tmp_path / "c"))
    config = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 100000}))
    with pytest.raises(ValueError, match="config.json describes .* parameters, more than its weight files hold"):
        LLMEngine(EngineConfig(model_path=str(ck), device="cpu"))
