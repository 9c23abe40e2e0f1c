"""The model card's apply_delta step (target = LLaMA base + Ziya delta), streaming in bounded memory.

Every tensor of the target is base + delta, computed in float32 and cast to the delta's dtype, except the
token embeddings, the LM head and the rotary inverse frequencies, which are the delta's own: the delta
carries Ziya's 39,410-token vocabulary while LLaMA's base has 32,000 rows.

Memory: tensors are read one at a time (safetensors through `safe_open`, `.bin` through
`torch.load(weights_only=True, mmap=True)`) and written straight into the output file by a small
safetensors writer that lays out the header first, so the peak is a few tensors, not two 13B models.

Restartable: shards are written under a temporary name and renamed when complete; `.merge-progress.json`
in the target lists the finished shards and a fingerprint of the inputs. Running the same merge again
skips finished shards. The index `model.safetensors.index.json` is written last, after the config and the
delta's tokenizer files, so a target with an index is a complete model.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from ..errors import ModelError

PROGRESS_FILE = ".merge-progress.json"
INDEX_FILE = "model.safetensors.index.json"
# copied from the delta: the merged model is Ziya, with Ziya's tokenizer and config
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.model", "tokenizer.json",
              "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
DEFAULT_MAX_SHARD_SIZE = "5GB"

_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def is_taken_from_delta(name: str) -> bool:
    """Tensors the delta holds in full rather than as a difference (vocabulary-sized and rotary)."""
    return name.endswith(("embed_tokens.weight", "lm_head.weight")) or "rotary_emb.inv_freq" in name


def parse_size_bytes(size: int | str) -> int:
    """'5GB' -> 5_000_000_000 (decimal units, as transformers' max_shard_size); ints pass through."""
    if isinstance(size, int):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", size.upper())
        if not m:
            raise ModelError(f"max shard size {size!r} is not a size; write e.g. 5GB, 500MB or a number of bytes")
        unit = m.group(2) or "B"
        scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
                 "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
        value = int(float(m.group(1)) * scale)
    if value < 1:
        raise ModelError(f"max shard size must be at least 1 byte, got {size!r}")
    return value


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str  # file name inside the checkpoint directory


class CheckpointReader:
    """Lazy access to the tensors of a Hugging Face checkpoint directory (safetensors or .bin, sharded
    with an index or single). Nothing is loaded until `get` is called."""

    def __init__(self, path: str | Path, role: str):
        self.path = Path(path)
        self.role = role
        if "://" in str(path):
            raise ModelError(f"{role} {path}: merging reads local directories; copy the checkpoint to local disk first")
        if not self.path.is_dir():
            raise ModelError(f"{role} {path}: no such directory")
        self.files = self._weight_files()
        self._bin_cache: dict[str, dict] = {}
        self.tensors: dict[str, TensorInfo] = {}
        for file in self.files:
            for info in self._scan(file):
                self.tensors[info.name] = info

    def _weight_files(self) -> list[str]:
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index = self.path / index_name
            if index.is_file():
                files = index_files(index, f"{self.role} {index}")
                missing = [f for f in files if not (self.path / f).is_file()]
                if missing:
                    raise ModelError(f"{self.role} {self.path}: the index names {missing[0]}, which is missing; "
                                     "the download is incomplete")
                return files
        for single in ("model.safetensors", "pytorch_model.bin"):
            if (self.path / single).is_file():
                return [single]
        raise ModelError(f"{self.role} {self.path}: no model weights (model.safetensors, pytorch_model.bin or "
                         "their sharded .index.json); is this a Hugging Face checkpoint directory?")

    def _scan(self, file: str) -> Iterator[TensorInfo]:
        with checkpoint_errors(f"{self.role} {self.path / file}"):
            yield from self._scan_file(file)

    def _scan_file(self, file: str) -> Iterator[TensorInfo]:
        if file.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(str(self.path / file), framework="pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    yield TensorInfo(name, tuple(sl.get_shape()), _torch_dtype(sl.get_dtype()), file)
        else:
            for name, t in self._load_bin(file).items():
                yield TensorInfo(name, tuple(t.shape), t.dtype, file)

    def _load_bin(self, file: str) -> dict:
        if file not in self._bin_cache:
            path = str(self.path / file)
            try:
                # mmap: pages are read on demand, the shard is not copied into memory
                sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:
                # legacy (pre-zip) .bin files cannot be mapped: hold one such shard at a time
                self._bin_cache.clear()
                sd = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:  # pickle refused by weights_only, truncated file...
                raise ModelError(f"{self.role} {path}: cannot read weights safely ({err})") from None
            self._bin_cache[file] = sd
        return self._bin_cache[file]

    def get(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        if info.file.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(str(self.path / info.file), framework="pt") as f:
                return f.get_tensor(name)
        return self._load_bin(info.file)[name]

    def fingerprint(self) -> list:
        """Names and sizes of the files that define this checkpoint (cheap; no hashing of contents)."""
        names = set(self.files) | {f for f in SIDE_FILES if (self.path / f).is_file()}
        return sorted((n, (self.path / n).stat().st_size) for n in names)


def _torch_dtype(st_dtype: str) -> torch.dtype:
    for dt, code in _ST_DTYPES.items():
        if code == st_dtype:
            return dt
    raise ModelError(f"unsupported tensor dtype {st_dtype} in checkpoint")


@dataclass(frozen=True)
class ShardPlan:
    file: str
    tensors: tuple[TensorInfo, ...]   # output names, shapes and dtypes, in file order


def plan_shards(delta: CheckpointReader, max_shard_size_bytes: int) -> list[ShardPlan]:
    """Group the delta's tensors (the target has the same names, shapes and dtypes) into shards."""
    groups: list[list[TensorInfo]] = [[]]
    size = 0
    for info in delta.tensors.values():
        nbytes = _nbytes(info)
        if groups[-1] and size + nbytes > max_shard_size_bytes:
            groups.append([])
            size = 0
        groups[-1].append(info)
        size += nbytes
    n = len(groups)
    return [ShardPlan(f"model-{i + 1:05d}-of-{n:05d}.safetensors", tuple(g)) for i, g in enumerate(groups)]


def _nbytes(info: TensorInfo) -> int:
    numel = 1
    for d in info.shape:
        numel *= d
    return numel * torch.empty((), dtype=info.dtype).element_size()


def _header_bytes(plan: ShardPlan) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for info in plan.tensors:
        n = _nbytes(info)
        header[info.name] = {"dtype": _ST_DTYPES[info.dtype], "shape": list(info.shape),
                             "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
    return struct.pack("<Q", len(raw)) + raw


def shard_size_bytes(plan: ShardPlan) -> int:
    return len(_header_bytes(plan)) + sum(_nbytes(i) for i in plan.tensors)


def check_compatible(base: CheckpointReader, delta: CheckpointReader) -> None:
    """Every delta tensor that is a difference needs a base tensor of the same shape."""
    for name, d in delta.tensors.items():
        if is_taken_from_delta(name):
            continue
        b = base.tensors.get(name)
        if b is None:
            raise ModelError(f"tensor {name} is in the delta {delta.path} but not in the base {base.path}; "
                             "is --base the original LLaMA-13B checkpoint in Hugging Face format?")
        if b.shape != d.shape:
            raise ModelError(f"tensor {name}: base shape {list(b.shape)} differs from delta shape "
                             f"{list(d.shape)}; --base must be the LLaMA model this delta was made from")
        if not (d.dtype.is_floating_point and b.dtype.is_floating_point):
            raise ModelError(f"tensor {name}: cannot add {b.dtype} and {d.dtype}")
    extra = [n for n in base.tensors if n not in delta.tensors and not is_taken_from_delta(n)]
    if extra:
        raise ModelError(f"tensor {extra[0]} is in the base {base.path} but not in the delta {delta.path}; "
                         "the two checkpoints are of different architectures")


def merged_tensor(name: str, base: CheckpointReader, delta: CheckpointReader) -> torch.Tensor:
    d = delta.get(name)
    if is_taken_from_delta(name):
        return d
    # float32 sum, then the delta's dtype: float16 + float16 would round twice
    return (base.get(name).to(torch.float32) + d.to(torch.float32)).to(d.dtype)


def index_files(index: Path, what: str) -> list[str]:
    """The weight files a Hugging Face index (model.safetensors.index.json) names, in order, each a file name in
    the index's own directory; ModelError for an index of another shape or one naming files elsewhere."""
    try:
        weight_map = json.loads(index.read_bytes())["weight_map"]
    except (ValueError, KeyError, TypeError, RecursionError) as err:
        raise ModelError(f"{what}: not a valid weight index ({type(err).__name__}: {str(err)[:100]})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise ModelError(f"{what}: not a valid weight index (weight_map is not an object of file names)")
    files = list(dict.fromkeys(weight_map.values()))
    outside = [f for f in files if not f or os.path.basename(f) != f or f in (".", "..")]
    if outside:
        raise ModelError(f"{what}: the index names {outside[0]!r}, which is not a file of that directory")
    return files


@contextlib.contextmanager
def checkpoint_errors(what: str) -> Iterator[None]:
    """A checkpoint file that cannot be read (a safetensors header that lies, a truncated file) or written (a
    full disk) as one ModelError naming it, instead of the library's traceback."""
    try:
        yield
    except ModelError:
        raise
    except OSError as err:
        raise ModelError(f"{what}: {err.strerror or type(err).__name__}"
                         + (f" ({err.filename})" if err.filename else "")) from None
    except Exception as err:  # noqa: BLE001 - safetensors' own error type, whatever the version calls it
        if type(err).__name__ != "SafetensorError":
            raise
        raise ModelError(f"{what}: not a readable safetensors file, or it could not be written ({str(err)[:160]})") \
            from None


def _create(path: Path):
    """A new file at `path` for writing, never through a symbolic link (one left there is removed first, not
    followed)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    return os.fdopen(fd, "wb")


def _copy_atomic(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    with open(src, "rb") as fin, _create(tmp) as fout:
        shutil.copyfileobj(fin, fout)
    os.replace(tmp, dst)


def _write_shard(path: Path, plan: ShardPlan, base: CheckpointReader, delta: CheckpointReader) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with _create(tmp) as f:
        f.write(_header_bytes(plan))
        for info in plan.tensors:
            t = merged_tensor(info.name, base, delta).contiguous()
            if tuple(t.shape) != info.shape or t.dtype != info.dtype:
                raise ModelError(f"tensor {info.name}: read {list(t.shape)} {t.dtype}, expected "
                                 f"{list(info.shape)} {info.dtype}; the checkpoint changed during the merge")
            f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with _create(tmp) as f:
        f.write((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())
    os.replace(tmp, path)


def _read_progress(target: Path) -> dict:
    try:
        return json.loads((target / PROGRESS_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return {}


def is_merged(target_dir: str | Path) -> bool:
    target = Path(target_dir)
    return (target / INDEX_FILE).is_file() and _read_progress(target).get("complete") is True


def merge_delta(base_dir: str | Path, delta_dir: str | Path, target_dir: str | Path, *,
                max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                on_shard_written: Optional[Callable[[int, int, str], None]] = None) -> Path:
    """Write base + delta to target_dir as sharded safetensors with their index, the delta's config and
    tokenizer. Resumes an interrupted merge of the same inputs. `on_shard_written(i, n, file)` is called
    after each shard (progress display; tests interrupt the merge through it). Returns the target path."""
    base = CheckpointReader(base_dir, "base")
    delta = CheckpointReader(delta_dir, "delta")
    target = Path(target_dir)
    if base.path.resolve() == delta.path.resolve():
        raise ModelError(f"--base and --delta are the same directory ({base.path}); the delta is the Ziya delta "
                         "checkpoint, the base the original LLaMA-13B")
    if not (delta.path / "config.json").is_file():      # before any shard is written, not after all of them
        raise ModelError(f"delta {delta.path} has no config.json; it is not a complete Ziya delta checkpoint")
    check_compatible(base, delta)
    max_bytes = parse_size_bytes(max_shard_size)
    plans = plan_shards(delta, max_bytes)
    fingerprint = hashlib.sha256(json.dumps(
        {"base": base.fingerprint(), "delta": delta.fingerprint(), "max_shard_bytes": max_bytes}).encode()
    ).hexdigest()

    progress = _read_progress(target)
    if target.exists():
        if not target.is_dir():
            raise ModelError(f"target {target} is a file; give a directory")
        if progress.get("fingerprint") not in (None, fingerprint) or (not progress and any(target.iterdir())):
            raise ModelError(f"target {target} is not empty and holds no unfinished merge of these inputs; "
                             "give a new or empty directory")
        links = [p.name for p in target.iterdir() if p.is_symlink()]
        if links:
            raise ModelError(f"target {target} holds a symbolic link ({links[0]}); a merge writes only its own "
                             "files: remove it, or give a new directory")
    if progress.get("complete"):
        return target
    target.mkdir(parents=True, exist_ok=True)
    done = set(progress.get("done", []))
    # claim the directory before the first shard, so an interrupted merge is recognised as ours
    _write_json_atomic(target / PROGRESS_FILE, {"fingerprint": fingerprint, "done": sorted(done), "complete": False})
    for i, plan in enumerate(plans):
        path = target / plan.file
        if plan.file in done and path.is_file() and path.stat().st_size == shard_size_bytes(plan):
            continue
        _write_shard(path, plan, base, delta)
        done.add(plan.file)
        _write_json_atomic(target / PROGRESS_FILE, {"fingerprint": fingerprint, "done": sorted(done),
                                                    "complete": False})
        if on_shard_written is not None:
            on_shard_written(i, len(plans), plan.file)

    for name in SIDE_FILES:
        if (delta.path / name).is_file():
            _copy_atomic(delta.path / name, target / name)
    weight_map = {info.name: plan.file for plan in plans for info in plan.tensors}
    total = sum(_nbytes(info) for plan in plans for info in plan.tensors)
    _write_json_atomic(target / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
    _write_json_atomic(target / PROGRESS_FILE, {"fingerprint": fingerprint, "done": sorted(done), "complete": True})
    return target


def ensure_merged(base_dir: str | Path, delta_dir: str | Path, cache_dir: str | Path, *,
                  max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """The merged model for a spec that names base: and delta:, merged once into cache_dir.

    The cache entry is keyed by the inputs' paths, file names and sizes. A lock file makes a second
    worker on the same host wait for the first one's merge instead of merging again; a merge killed
    half-way is resumed by whoever takes the lock next."""
    base = CheckpointReader(base_dir, "base")
    delta = CheckpointReader(delta_dir, "delta")
    key = hashlib.sha256(json.dumps({
        "base": [str(base.path.resolve()), base.fingerprint()],
        "delta": [str(delta.path.resolve()), delta.fingerprint()],
    }).encode()).hexdigest()[:16]
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"merged-{key}"
    if is_merged(target):
        return target
    with open(cache / f"merged-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released by the OS if this process dies
        try:
            if not is_merged(target):
                merge_delta(base_dir, delta_dir, target, max_shard_size=max_shard_size)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return target


def main(base: str, delta: str, target: str, max_shard_size: str = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """`ziya-batch merge-delta --base DIR --delta DIR --target DIR`."""
    def report(i: int, n: int, file: str) -> None:
        print(f"wrote shard {i + 1}/{n}: {file}", flush=True)

    with checkpoint_errors(f"merge into {target}"):
        out = merge_delta(base, delta, target, max_shard_size=max_shard_size, on_shard_written=report)
    print(f"merged model written to {out}")
    return out
