"""The models a worker holds: one engine per (checkpoint, dtype, engine settings), loaded once, plus the
reference and reward scorers an experience job asks for."""
from __future__ import annotations

import logging
from typing import Optional

from ..spec import JobSpec
from ..spec import engine_config as spec_engine_config

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
    from ..settings import home_dir

    return str(ensure_merged(spec.model.base, spec.model.delta, home_dir() / "merged"))


def engine_config(spec: JobSpec, device: str, path: Optional[str] = None):
    """The job's EngineConfig (spec.engine_config) on its merged checkpoint (`path` when already resolved)."""
    return spec_engine_config(spec, path or model_path(spec), device)


def engine_key(spec: JobSpec) -> tuple:
    """Jobs with equal keys can share one loaded engine. Named as the spec names the model, without resolving
    it: a base + delta pair is merged only when its engine loads, not whenever a claim compares jobs."""
    m = spec.model
    return (m.path or f"{m.base} + {m.delta}", m.dtype, m.tensor_parallel, spec.engine.model_dump_json(),
            m.quantization)


def check_remote_code(spec: JobSpec) -> None:
    """A spec in Redis alone never makes a worker run code from a model directory: the worker's own process must
    allow it (--allow-remote-code / ZIYA_BATCH_ALLOW_REMOTE_CODE). Raised here, the job's shards go back with
    this line noted on the worker, which `status` shows."""
    from ..errors import ModelError
    from ..settings import REMOTE_CODE_ENV, allow_remote_code

    if spec.model.trust_remote_code and not allow_remote_code():
        raise ModelError("the job sets model.trust_remote_code (it runs Python code from the model directory) and "
                         "this worker was not started allowing it: start workers with --allow-remote-code (or "
                         f"{REMOTE_CODE_ENV}=1) only if you trust that code")


def release_memory(device: str) -> None:
    """Frees what dropped engines held (their graphs and caches keep reference cycles) before another loads."""
    import gc

    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


class ReplicaBroken(BaseException):
    """A tensor-parallel replica whose ranks no longer hold the same model (a load failed on rank 0 after the
    other ranks had started it): not a shard's failure but the replica's, so it passes the worker's per-shard
    handling (a BaseException), stops the replica, and its manager starts a new one."""


class ModelCache:
    def __init__(self, device: str = "auto"):
        """The engines of a one-device replica (tensor_parallel 1)."""
        self.device = resolve_device(device)
        self._engines: dict[tuple, object] = {}
        self._scorers: dict[tuple, object] = {}

    def device_name(self) -> str:
        if self.device.startswith("cuda"):
            import torch

            return torch.cuda.get_device_name(torch.device(self.device))
        return "cpu"

    def can_serve(self, spec: JobSpec) -> bool:
        """Whether this replica serves the job: a one-device replica only jobs of tensor_parallel 1 (a job that
        asks for its model to be sharded waits for replicas of its shape)."""
        return spec.model.tensor_parallel == 1

    def holds(self, spec: JobSpec) -> bool:
        """Whether the job's engine is the one loaded."""
        return engine_key(spec) in self._engines

    def engine(self, spec: JobSpec):
        # every job, also one whose model another job already loaded: the consent is asked of each spec
        check_remote_code(spec)
        key = engine_key(spec)
        if key not in self._engines:
            self._drop_engines()
            log.info("loading %s on %s", key[0], self.device)
            self._engines[key] = self._load(spec)
        return self._engines[key]

    def _load(self, spec: JobSpec):
        from ..engine.engine import LLMEngine

        return LLMEngine(engine_config(spec, self.device))

    def _drop_engines(self) -> None:
        """One engine at a time on a device: drop the others before loading (their memory is needed)."""
        if not self._engines:
            return
        self._engines.clear()
        release_memory(self.device)


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


class TPModelCache(ModelCache):
    """Rank 0's engines in a tensor-parallel replica of `world_size` ranks: one model at a time, loaded on every
    rank. Switching models tells the other ranks first (driver.load, with the job spec), then builds rank 0's
    shard; all ranks load together, as their engines agree on one cache size."""

    def __init__(self, device: str, world_size: int, driver, loaded: Optional[tuple] = None):
        super().__init__(device)
        self.world_size, self.driver = world_size, driver
        if loaded is not None:                       # (spec, engine) loaded on every rank when the replica started
            self._engines[engine_key(loaded[0])] = loaded[1]

    def can_serve(self, spec: JobSpec) -> bool:
        return spec.model.tensor_parallel == self.world_size

    def _load(self, spec: JobSpec):
        from ..engine.engine import LLMEngine
        from ..errors import ModelError

        if spec.model.tensor_parallel != self.world_size:
            raise ModelError(f"this replica is sharded over {self.world_size} GPUs; the job asks for "
                             f"tensor_parallel {spec.model.tensor_parallel}")
        path = model_path(spec)
        # what can fail on rank 0 alone fails before the other ranks are told: the shard fails, the replica stays
        self._check(path, spec.model.trust_remote_code)
        if spec.model.quantization == "fp8":
            import torch

            from ..engine.quant import require_fp8
            require_fp8(torch.device(self.device))
        self.driver.load(spec.model_dump_json())
        try:
            engine = LLMEngine(engine_config(spec, self.device, path), tensor_parallel=(0, self.world_size))
        except Exception as err:
            raise ReplicaBroken(f"rank 0 failed to load {path} after the other ranks started loading it: "
                                f"{type(err).__name__}: {err}") from err
        engine.plan_hook = self.driver
        return engine

    def _check(self, path: str, trust_remote_code: bool) -> None:
        """The checks of a model that need no other rank: its config and tokenizer load, its heads split over the
        ranks, and it has weight files."""
        from transformers import AutoConfig, AutoTokenizer

        from ..engine.model import ModelArgs, check_tp_split, checkpoint_files
        from ..errors import ModelError

        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        try:
            check_tp_split(ModelArgs.from_hf_config(config), self.world_size)
        except ValueError as err:
            raise ModelError(str(err)) from None
        try:
            checkpoint_files(path)
        except FileNotFoundError as err:
            raise ModelError(str(err)) from None
