"""What the HTTP API is configured with: token, allowed prefixes, the model and storage for OpenAI batches.

Read from flags and the environment once, at start (the variables through ziya_batch/settings.py, the one
module that reads the environment); every request sees the same frozen value.

- ``ZIYA_BATCH_API_TOKEN``: the bearer token every endpoint but ``/healthz`` requires. ``serve`` refuses
  to start without one unless started with ``--insecure-no-auth`` (for a loopback-only test setup).
- ``ZIYA_BATCH_ALLOWED_PREFIXES``: comma-separated URL prefixes that a job's ``input`` and
  ``output.path`` must lie under (``/data/prompts/,s3://bucket/runs/``). Unset or empty means none: every
  job is refused, so a fresh server can never be used to read or overwrite its own files.
- ``ZIYA_BATCH_ALLOWED_MODELS``: comma-separated prefixes that a job's model paths (``model.path``,
  ``base``, ``delta``, ``experience.reference_model``, ``experience.reward_model``) must lie under. The
  server's own ``--model`` directory is always allowed. Model directories are kept apart from data
  prefixes on purpose: people can write to data prefixes, and a model directory decides what code runs.
- ``ZIYA_BATCH_ALLOWED_REWARD_FUNCTIONS``: comma-separated ``experience.reward_function`` values jobs may name
  besides the built-ins (``exact_match``, ``math_answer``, ``json_schema``); a reward function runs its code on
  the workers, so over HTTP only these are accepted, exactly as written (``my_pkg.scoring:passes_tests``).
- ``ZIYA_BATCH_ALLOWED_REWARD_URLS``: comma-separated URL prefixes ``experience.reward_url`` must lie under
  (the workers POST prompts and responses there). Unset: no job may name a reward_url over HTTP.
- ``ZIYA_BATCH_MODEL``: the model OpenAI-batch requests run on (``--model``).
- ``--storage`` (default ``$ZIYA_BATCH_HOME/files``): where uploaded files, batch records and batch
  outputs live; any fsspec URL.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .. import settings as env
from ..errors import ServiceError
# the variables' names, for messages (access.py and openai_batch.py import them from here)
from ..settings import (MODEL_ENV, MODELS_ENV, PREFIXES_ENV, REWARD_FUNCTIONS_ENV, REWARD_URLS_ENV,  # noqa: F401
                        TOKEN_ENV)
from ..spec import JobSpec, SamplingSpec


@dataclass(frozen=True)
class ApiSettings:
    token: Optional[str]
    """Bearer token; None only when auth is explicitly off (insecure_no_auth)."""
    allowed_prefixes: tuple[str, ...] = ()
    """Input and output URL prefixes jobs may name; empty refuses every job."""
    allowed_models: tuple[str, ...] = ()
    """Model directory prefixes jobs may name, besides `model`."""
    model: Optional[str] = None
    """Model directory (or URL) for OpenAI-batch requests; None refuses batches with a message."""
    allowed_reward_functions: tuple[str, ...] = ()
    """experience.reward_function values accepted besides the built-ins."""
    allowed_reward_urls: tuple[str, ...] = ()
    """Prefixes experience.reward_url must start with; empty refuses every reward_url."""
    storage_url: str = ""
    """Where /v1/files and /v1/batches keep their objects."""
    insecure_no_auth: bool = False
    batch_shard_size: int = JobSpec.model_fields["shard_size"].default
    """Prompts per shard of a job made from an OpenAI batch."""
    batch_max_new_tokens: int = SamplingSpec.model_fields["max_new_tokens"].default
    """Default max_new_tokens of batch requests that name no max_tokens."""
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if not self.insecure_no_auth and not self.token:
            raise ServiceError(f"no API token: set {TOKEN_ENV} to a long random string (clients send it as "
                               "'Authorization: Bearer <token>'), or start with --insecure-no-auth to serve "
                               "without authentication on a trusted loopback address")
        if self.token is not None and len(self.token) < 8:
            raise ServiceError(f"{TOKEN_ENV} is too short ({len(self.token)} characters); use at least 8, "
                               "e.g. the output of `openssl rand -hex 32`")
        if self.token is not None and (not all(" " <= ch < "\x7f" for ch in self.token)
                                       or self.token != self.token.strip()):
            # HTTP carries header values as bytes read as latin-1 and strips the ends: a token with other
            # characters, or spaces at its ends, could never be matched
            raise ServiceError(f"{TOKEN_ENV} must be printable ASCII with no space at either end, e.g. the "
                               "output of `openssl rand -hex 32`")

    def model_name(self) -> str:
        """The name batches report as their model: the model directory's last component."""
        return (self.model or "").rstrip("/").rsplit("/", 1)[-1] or "ziya-llama-13b"

    @classmethod
    def from_env(cls, model: Optional[str] = None, storage: Optional[str] = None,
                 insecure_no_auth: bool = False, **kw) -> "ApiSettings":
        """Settings from flags (given here) over the environment."""
        token = env.api_token()
        return cls(
            token=None if insecure_no_auth and not token else token,
            allowed_prefixes=env.allowed_prefixes(),
            allowed_models=env.allowed_models(),
            allowed_reward_functions=env.allowed_reward_functions(),
            allowed_reward_urls=env.allowed_reward_urls(),
            model=env.api_model(model),
            storage_url=storage or str(env.home_dir() / "files"),
            insecure_no_auth=insecure_no_auth,
            **kw,
        )
