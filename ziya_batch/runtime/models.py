"""The models a worker holds: one engine per (checkpoint, dtype, engine settings), loaded once, plus the
reference and reward scorers an experience job asks for."""
from __future__ import annotations

import logging
from typing import Optional

from ..spec import JobSpec

log = logging.getLogger(__name__)


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def model_path(spec: JobSpec) -> str:
    """The merged checkpoint: the spec's path, or base+delta merged once into the local cache."""
    if spec.model.path:
        return spec.model.path
    from ..engine.merge_delta import ensure_merged
    from .services import home_dir

    return str(ensure_merged(spec.model.base, spec.model.delta, home_dir() / "merged"))


def engine_config(spec: JobSpec, device: str):
    from ..engine.types import EngineConfig

    e = spec.engine
    return EngineConfig(
        model_path=model_path(spec), dtype=spec.model.dtype, device=device, max_num_seqs=e.max_num_seqs,
        max_num_batched_tokens=e.max_num_batched_tokens, block_size=e.block_size,
        gpu_memory_fraction=e.gpu_memory_fraction, cuda_graphs=e.cuda_graphs, schedule_policy=e.schedule,
        kv_cache_dtype=e.kv_cache_dtype,
        trust_remote_code=spec.model.trust_remote_code)


def engine_key(spec: JobSpec) -> tuple:
    """Jobs with equal keys can share one loaded engine."""
    return (model_path(spec), spec.model.dtype, spec.model.tensor_parallel, spec.engine.model_dump_json())


class ModelCache:
    def __init__(self, device: str = "auto", pinned: Optional[tuple] = None):
        """`pinned`: (spec, engine) of a tensor-parallel replica, whose ranks hold one model for good; its
        worker claims no shard of a job that needs another model (can_serve), and one that reaches it anyway
        fails here and goes to another replica."""
        self.device = resolve_device(device)
        self._engines: dict[tuple, object] = {}
        self._scorers: dict[tuple, object] = {}
        self._pinned = None
        if pinned is not None:
            self._pinned = engine_key(pinned[0])
            self._engines[self._pinned] = pinned[1]

    def device_name(self) -> str:
        if self.device.startswith("cuda"):
            import torch

            return torch.cuda.get_device_name(torch.device(self.device))
        return "cpu"

    def can_serve(self, spec: JobSpec) -> bool:
        """Whether this cache's replica serves the job: a tensor-parallel replica only jobs of the model (and
        tensor_parallel, dtype, engine settings) it holds, a one-device replica only jobs of tensor_parallel 1
        (a job asking for its model to be sharded waits for replicas of its shape)."""
        if self._pinned is not None:
            return engine_key(spec) == self._pinned
        return spec.model.tensor_parallel == 1

    def engine(self, spec: JobSpec):
        from ..engine.engine import LLMEngine
        from ..errors import ModelError

        key = engine_key(spec)
        if self._pinned is not None and key != self._pinned:
            raise ModelError(f"this tensor-parallel replica holds {self._pinned[0]} (tensor_parallel "
                             f"{self._pinned[2]}); the job needs {key[0]} (tensor_parallel {key[2]})")
        if key not in self._engines:
            # one engine at a time on a device: drop others before loading (their memory is needed)
            self._engines.clear()
            log.info("loading %s on %s", key[0], self.device)
            self._engines[key] = LLMEngine(engine_config(spec, self.device))
        return self._engines[key]

    def _scorer(self, kind: str, path: Optional[str], dtype: str):
        if not path:
            return None
        key = (kind, path, dtype)
        if key not in self._scorers:
            from ..engine import scoring

            cls = scoring.ReferenceScorer if kind == "reference" else scoring.RewardScorer
            self._scorers[key] = cls(path, device=self.device, dtype=dtype)
        return self._scorers[key]

    def reference(self, spec: JobSpec) -> Optional[object]:
        """The reference model's scorer (ref_logprobs and kl), or None when the spec names none."""
        return self._scorer("reference", spec.experience.reference_model, spec.model.dtype)

    def reward(self, spec: JobSpec) -> Optional[object]:
        """The reward model's scorer, or None when the spec names none."""
        return self._scorer("reward", spec.experience.reward_model, spec.model.dtype)
