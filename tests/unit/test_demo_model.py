"""The demo model: loads offline like Ziya's checkpoint, tokenizes like LLaMA's sentencepiece, runs."""
import json
import socket

import pytest
import sentencepiece as spm
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from ziya_batch.errors import LineError, ModelError
from ziya_batch.prompts import build_chat_prompt, build_prompt, parse_line
from ziya_batch.spec import SamplingSpec
from ziya_batch.tools import demo_model
from ziya_batch.tools.demo_model import DEMO_VOCAB_SIZE, corpus_text, is_cjk, write_demo_model

TRICKY = [
    "hello  world", "a\nb\n\nc\n", "tab\there\r\nwindows", "😀🎉 emoji 👨‍👩‍👧 ☀️", "罕见字:龘齉爩𠀀𪚥",
    "数字123456和3.14159", "mixed中文English混合", "<human>:你好\n<bot>:", "ß Ω Ж ש ع ह ♞ \u200b", "x" * 300,
    "end with spaces   ", "\x00\x01 control", "日本語のテキスト", "한국어 텍스트",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_demo_model(tmp_path_factory.mktemp("demo") / "model")


@pytest.fixture(scope="module")
def tok(model_dir):
    return AutoTokenizer.from_pretrained(str(model_dir))


@pytest.fixture(scope="module")
def sp(model_dir):
    return spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))


def test_loads_with_auto_classes_without_network(model_dir, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert type(tok).__name__ == "LlamaTokenizer"
    assert model.config.vocab_size == len(tok) == DEMO_VOCAB_SIZE
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "LlamaTokenizer"
    assert cfg["add_bos_token"] is True and cfg["add_eos_token"] is False


def test_special_ids_are_ziyas(model_dir, tok, sp):
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 0)
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    gen = json.loads((model_dir / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, 2, 0)
    ids = tok(build_prompt("你好")).input_ids
    assert ids[0] == 1 and ids[-1] != 2


def test_eos_text_inside_a_prompt_is_token_2(tok):
    text = build_chat_prompt([{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                              {"role": "user", "content": "q2"}])
    ids = tok(text).input_ids
    assert ids.count(2) == 1
    assert tok.decode(ids[: ids.index(2) + 1]).endswith("a1</s>")


def test_every_chinese_character_of_the_corpus_is_one_piece(tok, sp):
    chars = {c for c in corpus_text() if is_cjk(c)}
    assert len(chars) > 1000
    for c in chars:
        assert sp.piece_to_id(c) != 0, c
        assert tok.convert_tokens_to_ids(c) not in (None, 0), c
    multi = [p for p in (sp.id_to_piece(i) for i in range(sp.vocab_size())) if sum(map(is_cjk, p)) > 1]
    assert multi == []
    assert tok.tokenize("帮我写一份去西安的旅游计划") == ["▁帮"] + list("我写一份去西安的旅游计划") or \
        tok.tokenize("帮我写一份去西安的旅游计划") == ["▁", "帮"] + list("我写一份去西安的旅游计划")


def test_corpus_keeps_the_tokenizer_the_same_across_sentencepiece_versions(sp):
    # 0.2.2 and 0.2.3 differ on tabs and on the training split marker (train_sentencepiece's docstring)
    text = corpus_text()
    assert "\t" not in text and "\x1f" not in text
    assert all("\x1f" not in sp.id_to_piece(i) for i in range(sp.vocab_size()))


def test_digits_are_split_and_bytes_fall_back(sp):
    assert sp.encode("2024", out_type=str) == ["▁", "2", "0", "2", "4"]
    assert sp.encode("𪚥", out_type=str) == ["▁", "<0xF0>", "<0xAA>", "<0x9A>", "<0xA5>"]


@pytest.mark.parametrize("text", TRICKY)
def test_arbitrary_text_round_trips(tok, sp, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert sp.decode(sp.encode(text)) == text
    assert 0 not in ids  # byte fallback: nothing becomes <unk>


def test_hf_tokenizer_matches_sentencepiece(tok, sp):
    lines = corpus_text().split("\n") + TRICKY
    # transformers 5's Metaspace skips the dummy prefix for text that already starts with a space (module doc)
    checked = [line for line in lines if line and not line[0].isspace() and "</s>" not in line]
    assert len(checked) > 500
    for line in checked:
        assert tok.encode(line, add_special_tokens=False) == sp.encode(line), line


def test_leading_space_quirk_is_pinned(tok, sp):
    # documented: one leading space is lost by transformers' LLaMA tokenizer, never inside the text
    assert tok.decode(tok.encode("  x", add_special_tokens=False)) == " x"
    assert sp.decode(sp.encode("  x")) == "  x"


def test_forward_and_generate(model_dir, tok):
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    ids = tok([build_prompt("帮我写一份去西安的旅游计划"), build_prompt("Hi")], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape == (2, ids.input_ids.shape[1], DEMO_VOCAB_SIZE)
    assert torch.isfinite(logits).all()
    out = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=2)
    assert out.shape[1] <= ids.input_ids.shape[1] + 5


def test_two_writes_are_byte_identical(model_dir, tmp_path):
    again = write_demo_model(tmp_path / "again")
    names = sorted(p.name for p in model_dir.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    assert {"tokenizer.model", "tokenizer.json", "model.safetensors", "config.json"} <= set(names)
    for name in names:
        assert (model_dir / name).read_bytes() == (again / name).read_bytes(), name


def test_float16_and_other_sizes(tmp_path):
    out = write_demo_model(tmp_path / "fp16", dtype="float16", hidden_size=32, num_heads=4, num_kv_heads=2,
                           num_layers=1, intermediate_size=64, seed=3)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        t = f.get_tensor("model.layers.0.self_attn.k_proj.weight")
    assert t.dtype == torch.float16 and t.shape == (16, 32)  # 2 kv heads of 16
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_key_value_heads"] == 2 and cfg["vocab_size"] == DEMO_VOCAB_SIZE


def test_main_prints_and_writes(tmp_path, capsys):
    demo_model.main(str(tmp_path / "m"))
    assert "demo" in capsys.readouterr().out
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_demo_prompt_files():
    data = demo_model.DATA_DIR
    lines = (data / demo_model.DEMO_PROMPTS_FILE).read_text(encoding="utf-8").splitlines()
    assert len(lines) >= 240
    parsed = [parse_line(line, "ziya", "demo", i + 1, SamplingSpec()) for i, line in enumerate(lines)]
    assert len({p.id for p in parsed}) == len(parsed)
    assert sum(p.messages is not None for p in parsed) >= 20
    assert sum(any(is_cjk(c) for c in p.text) for p in parsed) >= 100
    assert sum(not any(is_cjk(c) for c in p.text) for p in parsed) >= 80
    assert sum(p.sampling != SamplingSpec() for p in parsed) >= 3
    bad = (data / demo_model.DEMO_BAD_LINES_FILE).read_text(encoding="utf-8").splitlines()
    codes = []
    for i, line in enumerate(bad):
        with pytest.raises(LineError) as err:
            parse_line(line, "ziya", "bad", i + 1, SamplingSpec())
        codes.append(err.value.code)
    assert {"invalid_json", "missing_prompt", "empty_prompt", "invalid_sampling"} <= set(codes)


def test_a_demo_model_is_written_again_over_one_but_never_over_anything_else(tmp_path):
    """`make demo` writes the demo model over the one it wrote before; a directory holding anything else (a real
    checkpoint given by mistake, unrelated files) is refused before a file is touched, as is an empty path."""
    first = write_demo_model(tmp_path / "m")
    again = write_demo_model(tmp_path / "m")                      # over a demo model: fine
    assert (again / "model.safetensors").is_file()
    real = tmp_path / "real13b"
    real.mkdir()
    files = {"config.json": '{"hidden_size": 5120, "vocab_size": 39424}', "model.safetensors.index.json": "{}",
             "model-00001-of-00003.safetensors": "SHARD", "tokenizer.model": "REAL"}
    for name, text in files.items():
        (real / name).write_text(text)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    mixed = tmp_path / "mixed"
    write_demo_model(mixed)
    (mixed / "results.jsonl").write_text("kept")
    for target in (real, other, mixed):
        before = {p.name: p.read_bytes() for p in target.iterdir()}
        with pytest.raises(ModelError, match="not a demo model"):
            write_demo_model(target)
        assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    (first / ".gitkeep").write_text("")
    write_demo_model(first)                               # a dot file beside a demo model: no obstacle, and kept
    assert (first / ".gitkeep").exists()
    for empty in ("", "  "):
        with pytest.raises(ModelError, match="no directory"):
            write_demo_model(empty)
    assert first == again
