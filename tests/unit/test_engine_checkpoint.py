"""The engine loading a checkpoint folder (the demo model: Ziya's architecture, a real sentencepiece tokenizer)."""
from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from ziya_batch.engine.engine import LLMEngine
from ziya_batch.engine.types import EngineConfig, Request, SamplingParams
from ziya_batch.tools.demo_model import write_demo_model
from ziya_batch.tools.testing import hf_greedy


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return write_demo_model(tmp_path_factory.mktemp("demo") / "model")


def test_loads_safetensors_and_matches_transformers(demo_dir):
    eng = LLMEngine(EngineConfig(model_path=str(demo_dir), device="cpu"))
    hf = AutoModelForCausalLM.from_pretrained(str(demo_dir), dtype=torch.float32).eval()
    assert eng.max_model_len == hf.config.max_position_embeddings and eng.device.type == "cpu"
    assert eng.eos_ids == [2]
    prompt = eng.tokenizer("<human>:写一首关于西安的诗\n<bot>:")["input_ids"]
    out = eng.generate([Request("a", prompt, SamplingParams(max_new_tokens=12, min_new_tokens=12,
                                                            temperature=0.0))])[0].completions[0]
    assert out.token_ids == hf_greedy(hf, prompt, 12)[0]
    assert out.text == eng.tokenizer.decode(out.token_ids, skip_special_tokens=True)


def test_loads_a_bin_checkpoint_with_weights_only(demo_dir, tmp_path):
    bin_dir = tmp_path / "bin"
    shutil.copytree(demo_dir, bin_dir)
    from safetensors.torch import load_file
    state = {}
    for f in bin_dir.glob("*.safetensors"):
        state.update(load_file(str(f)))
        f.unlink()
    torch.save(state, bin_dir / "pytorch_model.bin")
    a = LLMEngine(EngineConfig(model_path=str(demo_dir), device="cpu"))
    b = LLMEngine(EngineConfig(model_path=str(bin_dir), device="cpu"))
    req = lambda: [Request("x", [1, 500, 600, 700], SamplingParams(max_new_tokens=8, temperature=0.0))]
    assert a.generate(req())[0].completions[0].token_ids == b.generate(req())[0].completions[0].token_ids


def test_stop_string_with_the_real_tokenizer(demo_dir):
    eng = LLMEngine(EngineConfig(model_path=str(demo_dir), device="cpu"))
    prompt = eng.tokenizer("<human>:hello\n<bot>:")["input_ids"]
    free = eng.generate([Request("a", prompt, SamplingParams(max_new_tokens=24, temperature=0.0,
                                                             ignore_eos=True))])[0].completions[0]
    text = free.text
    stop = next((text[i:i + 2] for i in range(4, len(text) - 2) if text[i:i + 2].strip() == text[i:i + 2]), None)
    if stop is None:
        pytest.skip("the random model wrote no usable two-character stop string")
    cut = text.find(stop)
    out = eng.generate([Request("b", prompt, SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True,
                                                            stop=(stop,)))])[0].completions[0]
    assert out.finish_reason == "stop" and text[:cut].startswith(out.text) and stop not in out.text
    assert out.token_ids == free.token_ids[:len(out.token_ids)]
    # the text is that of the tokens returned (a token that also makes part of the stop string is dropped)
    assert out.text == eng.tokenizer.decode(out.token_ids, skip_special_tokens=True)
