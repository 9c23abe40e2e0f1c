"""`ziya-batch quantize`: an FP8 copy of a float16 Hugging Face LLaMA checkpoint, written tensor by tensor in
bounded memory, in the layout quant.py describes (llm-compressor's FP8_DYNAMIC, "compressed-tensors": linear
weights float8_e4m3fn with a float32 weight_scale [out, 1], everything else as it was) with config.json's
quantization_config saying so, so replicas load it without quantising (model.quantization: fp8)."""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
from pathlib import Path
from typing import Optional

import torch

from ziya_batch.engine.merge_delta import checkpoint_errors, parse_size_bytes
from ziya_batch.engine.model import checkpoint_files, iter_checkpoint
from ziya_batch.engine.quant import is_quantized_weight, quantize_weight
from ziya_batch.errors import ModelError

QUANTIZATION_CONFIG = {
    "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
    "ignore": ["lm_head"], "kv_cache_scheme": None,
    "config_groups": {"group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False,
                    "group_size": None, "block_structure": None, "actorder": None, "observer": "minmax"},
        "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True,
                              "dynamic": True, "group_size": None, "block_structure": None, "actorder": None,
                              "observer": None},
        "output_activations": None}},
}
# what is not copied beside the new weights: the old weights and their indexes
_WEIGHT_FILE = re.compile(r"(\.safetensors|\.bin|\.index\.json|\.pt|\.pth|\.msgpack|\.h5)$")
DEFAULT_MAX_SHARD_SIZE = "2GB"
INDEX_FILE = "model.safetensors.index.json"
# created (only if absent) in the target while a quantize writes there
CLAIM_FILE = ".ziya-quantize-claim"


def checkpoint_quantization(config: dict) -> Optional[str]:
    """'fp8' when a config.json says its linear weights are float8 (compressed-tensors or vLLM's fp8); the method
    it names otherwise, None for none. A quantization_config of another shape is named as such, not a crash."""
    q = config.get("quantization_config")
    if not q:
        return None
    if not isinstance(q, dict):
        return "a quantization_config that is not an object"
    method = q.get("quant_method")
    if method == "fp8":
        return "fp8"
    groups = q.get("config_groups")
    if method == "compressed-tensors" and isinstance(groups, dict):
        for group in groups.values():
            w = group.get("weights") if isinstance(group, dict) else None
            if isinstance(w, dict) and w.get("type") == "float" and w.get("num_bits") == 8:
                return "fp8"
    return None if not method else str(method)[:100]


def write_fp8_checkpoint(src: str | Path, target: str | Path, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                         device: str = "cpu", on_shard=None) -> Path:
    """Writes an FP8 copy of the Hugging Face LLaMA checkpoint `src` to `target` (a new or empty directory):
    every linear weight as float8 + weight_scale, everything else as it was; the tokenizer and other side
    files copied; config.json with QUANTIZATION_CONFIG. Tensors are read, quantised (on `device`) and written
    one at a time, so host memory holds at most one output shard (max_shard_size) and one input tensor. The
    index is written last: a target with one is complete. The run claims the target first (a file created only if
    absent), so two runs into one target never mix their shards: the second is refused at once. What a failed
    run wrote is removed; one killed outright leaves its claim and hidden files, which the next run names.
    `on_shard(n)` after the n-th shard."""
    src, target = Path(src), Path(target)
    if not (src / "config.json").is_file():
        raise ModelError(f"{src}: no config.json; give a Hugging Face checkpoint directory")
    try:
        config = json.loads((src / "config.json").read_bytes())
    except (ValueError, RecursionError) as err:
        raise ModelError(f"{src}/config.json is not JSON ({str(err)[:100]})") from None
    if not isinstance(config, dict):
        raise ModelError(f"{src}/config.json is not a JSON object: not a Hugging Face config")
    if checkpoint_quantization(config):
        raise ModelError(f"{src} is already quantised ({checkpoint_quantization(config)}); give the float16 checkpoint")
    try:
        checkpoint_files(str(src))
    except FileNotFoundError as err:
        raise ModelError(str(err)) from None
    _check_empty(target)
    limit = parse_size_bytes(max_shard_size)
    dev = _quantize_device(device)              # before anything is made: a bad one leaves nothing behind
    made = not target.exists()
    try:
        target.mkdir(parents=True, exist_ok=True)
        claim = os.open(target / CLAIM_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        raise ModelError(f"target {target}: another quantize is writing into it ({CLAIM_FILE}); give another "
                         "target, or remove that file if no quantize runs") from None
    except OSError as err:
        raise ModelError(f"target {target}: {err.strerror}") from None
    os.close(claim)
    try:
        _check_empty(target, but=CLAIM_FILE)    # nothing else arrived between the first look and the claim
        with checkpoint_errors(f"quantize {src}"):
            _write_into(src, target, config, limit, dev, on_shard)
    except BaseException:
        if made:
            shutil.rmtree(target, ignore_errors=True)
        else:                                   # the user's own (empty) directory stays, emptied of ours only
            for p in target.iterdir():
                if p.name != CLAIM_FILE:
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink()
            (target / CLAIM_FILE).unlink(missing_ok=True)
        raise
    (target / CLAIM_FILE).unlink()
    return target


def _check_empty(target: Path, but: str = "") -> None:
    if not target.exists() and not target.is_symlink():
        return
    if not target.is_dir():
        raise ModelError(f"target {target} is not a directory; give a new or empty one")
    names = sorted(p.name for p in target.iterdir() if p.name != but)
    if names and all(n.startswith(".") for n in names) and (CLAIM_FILE in names or any(
            n.startswith(".shard-") for n in names)):
        raise ModelError(f"target {target} holds what a quantize that is running, or was killed, wrote "
                         f"({', '.join(names[:3])}); if none runs, empty it, or give another target")
    if names:
        raise ModelError(f"target {target} is not an empty directory; give a new or empty one")


def _write_into(src: Path, target: Path, config: dict, limit: int, dev, on_shard) -> None:
    from safetensors.torch import save_file

    written: list[tuple[str, list[str]]] = []       # (temporary file, tensor names)
    shard: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        nonlocal shard, size
        if shard:
            tmp = target / f".shard-{len(written) + 1:05d}.tmp"
            save_file(shard, str(tmp), metadata={"format": "pt"})
            written.append((tmp.name, list(shard)))
            if on_shard is not None:
                on_shard(len(written))
        shard, size = {}, 0

    with torch.no_grad():
        for name, t in iter_checkpoint(str(src)):
            if is_quantized_weight(name):
                t = t.to(dev)
                if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                    raise ModelError(f"{src}: {name} holds values that are not finite numbers (inf or NaN) or are "
                                     "not floating point: a damaged checkpoint, not one to quantise")
                w8, scale = quantize_weight(t)
                out = {name: w8.cpu(), name + "_scale": scale.cpu()}
            else:
                out = {name: t.contiguous()}
            n = sum(x.numel() * x.element_size() for x in out.values())
            if shard and size + n > limit:
                flush()
            shard.update(out)
            size += n
            total += n
    flush()
    weight_map = {}
    for i, (tmp, names) in enumerate(written):
        final = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
        os.replace(target / tmp, target / final)
        weight_map.update({n: final for n in names})
    for f in sorted(src.iterdir()):
        if f.is_file() and f.name != "config.json" and not _WEIGHT_FILE.search(f.name) and not f.name.startswith("."):
            shutil.copyfile(f, target / f.name)
    (target / "config.json").write_text(json.dumps({**config, "quantization_config": QUANTIZATION_CONFIG},
                                                   indent=2, sort_keys=True) + "\n")
    # safetensors writes its files 0600: the shards get the mode the umask gives a new file, as config.json has
    mode = stat.S_IMODE((target / "config.json").stat().st_mode)
    for final in set(weight_map.values()):
        os.chmod(target / final, mode)
    (target / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                indent=2, sort_keys=True) + "\n")


def _quantize_device(device: str):
    """torch.device(device) where this machine has it; ModelError (one line) for a name torch does not know or a
    GPU that is not here."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ModelError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ModelError(f"--device {device!r}: quantise on cpu or cuda[:N]")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (dev.index or 0) >= count:
            raise ModelError(f"--device {device!r}: this machine has {count} CUDA GPU(s); use cpu or auto")
    return dev


def main(model: str, target: str, max_shard_size: str = DEFAULT_MAX_SHARD_SIZE, device: str = "auto") -> Path:
    """`ziya-batch quantize --model DIR --target DIR`."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    out = write_fp8_checkpoint(model, target, max_shard_size, device,
                               on_shard=lambda n: print(f"wrote shard {n}", flush=True))
    print(f"FP8 checkpoint written to {out}; load it with model.quantization: fp8")
    return out
