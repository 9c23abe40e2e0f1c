"""A tiny random-weight model with Ziya-LLaMA-13B's architecture and a real sentencepiece tokenizer.

It lets every part of the system (engine, workers, scoring, the CLI) run without the 13B weights: the
checkpoint loads with `AutoTokenizer` / `AutoModelForCausalLM` exactly as Ziya's does, uses Ziya's special
ids (unk 0, bos 1, eos 2, pad 0) and tokenizes like LLaMA's sentencepiece model (BPE, byte fallback, split
digits, dummy prefix). The weights are random, so the model writes random text; that is expected.

The tokenizer is trained from the corpus shipped in `ziya_batch/data/` every time (well under a second,
single-threaded and deterministic), so two writes with the same arguments give byte-identical files.

Tokenizer decisions, and why:
- Vocabulary of exactly DEMO_VOCAB_SIZE (4096) pieces, and config.json's vocab_size is the same number,
  so there are no embedding rows beyond the tokenizer (as in Ziya, whose 39,410 rows match its tokenizer).
- Every CJK character of the corpus is its own piece and no piece holds two CJK characters (Ziya added
  ~7k Chinese characters as single tokens, so Chinese text costs about one token per character): pieces
  with several CJK characters are removed from the trained model (see train_sentencepiece).
- No whitespace-only pieces ("▁▁▁▁"): transformers' fast LLaMA tokenizer merges them differently from
  sentencepiece, and we want the two to agree token for token.
- transformers 5 builds LlamaTokenizer with a Metaspace pre-tokenizer that adds the dummy prefix only when
  the text does not already start with a space. So text that STARTS with a space encodes with one "▁" fewer
  than sentencepiece and decodes with that space lost. This is how Ziya's own tokenizer behaves under
  transformers 5 too; prompts always start with "<human>:", so it never touches a prompt.
"""
from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path

from ..engine.types import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from ..errors import ModelError

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
CORPUS_FILES = ("tokenizer_corpus_zh.txt", "tokenizer_corpus_en.txt", "tokenizer_corpus_code.txt")
DEMO_PROMPTS_FILE = "demo_prompts.jsonl"       # >= 240 lines in the ziya input format
DEMO_BAD_LINES_FILE = "demo_bad_lines.jsonl"   # invalid lines, one per error code, for error-line demos
DEMO_VOCAB_SIZE = 4096  # pieces in the tokenizer = rows of the embedding (a multiple of 64)

_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_CJK_RE = re.compile(f"([{_CJK}])")
# a control character that never occurs in the corpus: marks where training must split
_DELIMITER = "\x1f"


def is_cjk(ch: str) -> bool:
    return bool(_CJK_RE.fullmatch(ch))


def corpus_text() -> str:
    """The shipped tokenizer corpus (Chinese and English prose, dialogue in Ziya's format, code), plus the
    texts of the demo prompts, so that every Chinese character they use is a piece of its own."""
    parts = [(DATA_DIR / name).read_text(encoding="utf-8") for name in CORPUS_FILES]
    for line in (DATA_DIR / DEMO_PROMPTS_FILE).read_text(encoding="utf-8").splitlines():
        obj = json.loads(line)
        parts.append(obj["prompt"] if "prompt" in obj else "\n".join(m["content"] for m in obj["messages"]))
    return "\n".join(parts)


def train_sentencepiece(text: str, vocab_size: int = DEMO_VOCAB_SIZE) -> bytes:
    """Train a LLaMA-style BPE sentencepiece model on `text`; returns the serialized model proto.

    Training splits the text around every CJK character (sentencepiece's pretokenization_delimiter), so
    no piece holds two of them and Chinese encodes one character per token, as in Ziya's vocabulary.
    Sentencepiece 0.2.2 keeps the delimiter itself as a piece and 0.2.3 does not, so we train one piece
    more than asked, remove any piece holding the delimiter, and cut the vocabulary to `vocab_size` by
    dropping the last-learned merges (a BPE piece is built only from earlier pieces, so what is kept is
    still a complete merge table). Both versions then give the same model for the shipped corpus (which
    has no tab characters: 0.2.3 learns a piece for a space before a tab, 0.2.2 does not)."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as sp_pb

    if _DELIMITER in text:
        raise ValueError("the corpus must not contain U+001F (used as the training split marker)")
    cjk_chars = "".join(sorted({c for c in text if is_cjk(c)}))
    lines = [_CJK_RE.sub(_DELIMITER + r"\1" + _DELIMITER, line) for line in text.split("\n") if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size + 1,
        pretokenization_delimiter=_DELIMITER,
        character_coverage=1.0,
        required_chars=cjk_chars,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        allow_whitespace_only_pieces=False,
        unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1,
        unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
        max_sentence_length=1 << 20,
        num_threads=1,
        minloglevel=2,
    )
    proto = sp_pb.ModelProto()
    proto.ParseFromString(model.getvalue())
    normal = sp_pb.ModelProto.SentencePiece.NORMAL
    keep = [p for p in proto.pieces
            if not (p.type == normal and (_DELIMITER in p.piece or sum(map(is_cjk, p.piece)) > 1))]
    merged = [i for i, p in enumerate(keep) if p.type == normal and len(p.piece) > 1]
    excess = len(keep) - vocab_size
    if excess < 0 or excess > len(merged):
        raise ModelError(f"the tokenizer corpus gives {len(keep)} pieces, cannot make exactly {vocab_size}")
    drop = set(sorted(merged, key=lambda i: keep[i].score)[:excess])
    pieces = [p for i, p in enumerate(keep) if i not in drop]
    del proto.pieces[:]
    proto.pieces.extend(pieces)
    return proto.SerializeToString()


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")


def write_demo_tokenizer(path: str | Path, *, model_max_length: int = 1024) -> Path:
    """Write tokenizer.model, tokenizer_config.json, special_tokens_map.json and tokenizer.json to `path`."""
    from transformers import AutoTokenizer

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    sp_model = train_sentencepiece(corpus_text())
    (out / "tokenizer.model").write_bytes(sp_model)
    special = {
        "unk_token": "<unk>",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<unk>",  # Ziya pads with id 0
    }
    _write_json(out / "special_tokens_map.json", special)
    _write_json(out / "tokenizer_config.json", {
        **special,
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "padding_side": "left",
    })
    (out / "tokenizer.json").unlink(missing_ok=True)
    # tokenizer.json as transformers converts it from tokenizer.model: later loads skip the conversion
    # (and need neither sentencepiece nor protobuf) and give the same ids
    tok = AutoTokenizer.from_pretrained(str(out))
    if len(tok) != DEMO_VOCAB_SIZE or tok.convert_tokens_to_ids("</s>") != EOS_ID:
        raise ModelError(f"demo tokenizer came out with {len(tok)} tokens; expected {DEMO_VOCAB_SIZE}")
    tok.backend_tokenizer.save(str(out / "tokenizer.json"))
    return out


def demo_config(*, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 4,
                intermediate_size: int = 172, max_position_embeddings: int = 1024, dtype: str = "float32"):
    """A LlamaConfig shaped like Ziya-LLaMA-13B's (same options), only smaller."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=DEMO_VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        hidden_act="silu",
        rms_norm_eps=1e-6,
        initializer_range=0.02,
        tie_word_embeddings=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        dtype=dtype,
    )


def write_demo_model(path: str | Path, *, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                     num_kv_heads: int = 4, intermediate_size: int = 172, max_position_embeddings: int = 1024,
                     seed: int = 0, dtype: str = "float32") -> Path:
    """Write a random-weight LlamaForCausalLM (safetensors) with the demo tokenizer to `path`.

    dtype is "float32", "float16" or "bfloat16" (the dtype the weights are stored in). Returns the path.
    """
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    if not str(path).strip():
        raise ModelError("no directory given for the demo model")
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ModelError(f"{out} exists and is not a directory; give a new or existing directory for the demo model")
    if out.is_dir() and not _holds_only_a_demo_model(out):
        raise ModelError(f"{out} holds files that are not a demo model's (another checkpoint?); give a new or empty "
                         "directory, or one an earlier demo-model wrote")
    torch_dtype = _torch_dtype(dtype)
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ModelError(f"hidden_size ({hidden_size}) must divide by num_heads ({num_heads}), "
                         f"and num_heads by num_kv_heads ({num_kv_heads})")
    out.mkdir(parents=True, exist_ok=True)
    config = demo_config(hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                         num_kv_heads=num_kv_heads, intermediate_size=intermediate_size,
                         max_position_embeddings=max_position_embeddings, dtype=dtype)
    # a private generator state: the caller's global RNG is left as it was
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model = model.to(torch_dtype).eval()
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    for stale in out.glob("model*.safetensors*"):
        stale.unlink()
    model.save_pretrained(str(out), safe_serialization=True)
    write_demo_tokenizer(out, model_max_length=max_position_embeddings)
    return out


# what write_demo_model writes (save_pretrained and the tokenizer's files): a directory holding only these, with a
# config of the demo vocabulary, is a demo model that a new one may replace
_DEMO_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.model", "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja"}


def _holds_only_a_demo_model(out: Path) -> bool:
    """Whether directory `out` is empty or holds a demo model and nothing else (so writing one there loses nothing:
    any other checkpoint, such as a merged 13B's shards, is refused rather than overwritten)."""
    names = {p.name for p in out.iterdir() if not p.name.startswith(".")}     # .gitkeep and the like: kept
    if not names:
        return True
    # save_pretrained's names for a model in shards too (the stale ones are deleted before a new one is written)
    shards = {n for n in names if re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors|model\.safetensors\.index\.json", n)}
    if not names - shards <= _DEMO_FILES or "config.json" not in names:
        return False
    try:
        config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("vocab_size") == DEMO_VOCAB_SIZE


def _torch_dtype(dtype: str):
    import torch

    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(dtype)
    if torch_dtype is None:
        raise ModelError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
    return torch_dtype


def write_demo_reference_model(path: str | Path, *, seed: int = 1, dtype: str = "float32", **sizes) -> Path:
    """A demo causal LM (different weights from the default demo policy) to use as reference_model."""
    return write_demo_model(path, seed=seed, dtype=dtype, **sizes)


def write_demo_reward_model(path: str | Path, layout: str = "ziya", *, seed: int = 2, dtype: str = "float32",
                            hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                            intermediate_size: int = 172, max_position_embeddings: int = 1024) -> Path:
    """A random-weight reward checkpoint with the demo tokenizer, in the 'ziya' or 'seqcls' layout."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForSequenceClassification, LlamaModel

    if layout not in ("ziya", "seqcls"):
        raise ValueError(f"layout must be 'ziya' or 'seqcls', got {layout!r}")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    config = demo_config(hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                         num_kv_heads=num_heads, intermediate_size=intermediate_size,
                         max_position_embeddings=max_position_embeddings, dtype=dtype)
    torch_dtype = _torch_dtype(dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if layout == "ziya":
            body = LlamaModel(config)
            # std 1/sqrt(H) on unit-RMS hidden states: rewards of order 1 that differ between samples
            head = torch.randn(1, hidden_size) / hidden_size ** 0.5
        else:
            config.num_labels = 1
            model = LlamaForSequenceClassification(config)
    if layout == "ziya":
        state = {f"model.{k}": v.to(torch_dtype).contiguous() for k, v in body.state_dict().items()}
        state["value_head.weight"] = head.to(torch_dtype)
        for stale in out.glob("model*.safetensors*"):
            stale.unlink()
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        cfg = config.to_dict()
        cfg["architectures"] = ["LlamaRewardModel"]
        (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    else:
        model.to(torch_dtype).save_pretrained(str(out), safe_serialization=True)
    write_demo_tokenizer(out, model_max_length=max_position_embeddings)
    return out


def main(path: str, dtype: str = "float32") -> Path:
    """`ziya-batch demo-model DIR`: write the demo model and say what was written."""
    out = write_demo_model(path, dtype=dtype)
    size_bytes = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    print(f"wrote a demo Ziya-architecture model ({DEMO_VOCAB_SIZE}-token sentencepiece vocabulary, random "
          f"weights, {size_bytes / 1e6:.1f} MB) to {out}")
    return out


if __name__ == "__main__":  # python -m ziya_batch.tools.demo_model DIR
    main(sys.argv[1] if len(sys.argv) > 1 else "demo-model")
