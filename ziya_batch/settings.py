"""Every environment variable ziya-batch reads, read here and nowhere else in the package.

Each is read when asked for (not at import), so a test's monkeypatch.setenv and a process's own environment both
hold; a flag the user gave always wins over the variable (the `given` arguments).

- ZIYA_BATCH_HOME: where `run` keeps its private Redis, merged checkpoints and the API's files
  (default ~/.cache/ziya-batch).
- ZIYA_BATCH_REDIS_URL: the Redis queue (`--redis-url` wins).
- RAY_ADDRESS: the Ray cluster (`--address` wins); Ray itself reads it too.
- ZIYA_BATCH_API_TOKEN, ZIYA_BATCH_ALLOWED_PREFIXES, ZIYA_BATCH_ALLOWED_MODELS, ZIYA_BATCH_MODEL: the HTTP API's
  (api/settings.py says what each means).
- ZIYA_BATCH_STORAGE_OPTIONS: fsspec options per protocol, a JSON object (io/storage.py parses it).
- ZIYA_BATCH_COMMIT: the commit a benchmark row names, where the tree has no git (a copied checkout).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

HOME_ENV = "ZIYA_BATCH_HOME"
REDIS_ENV = "ZIYA_BATCH_REDIS_URL"
RAY_ENV = "RAY_ADDRESS"
TOKEN_ENV = "ZIYA_BATCH_API_TOKEN"
PREFIXES_ENV = "ZIYA_BATCH_ALLOWED_PREFIXES"
MODELS_ENV = "ZIYA_BATCH_ALLOWED_MODELS"
MODEL_ENV = "ZIYA_BATCH_MODEL"
REWARD_FUNCTIONS_ENV = "ZIYA_BATCH_ALLOWED_REWARD_FUNCTIONS"
REWARD_URLS_ENV = "ZIYA_BATCH_ALLOWED_REWARD_URLS"
STORAGE_OPTIONS_ENV = "ZIYA_BATCH_STORAGE_OPTIONS"
COMMIT_ENV = "ZIYA_BATCH_COMMIT"


def _get(name: str) -> Optional[str]:
    """The variable's value; unset and empty are the same (None)."""
    return os.environ.get(name) or None


def home_dir() -> Path:
    return Path(_get(HOME_ENV) or Path.home() / ".cache" / "ziya-batch")


def redis_url(given: Optional[str] = None) -> Optional[str]:
    return given or _get(REDIS_ENV)


def ray_address(given: Optional[str] = None) -> Optional[str]:
    return given or _get(RAY_ENV)


def api_token() -> Optional[str]:
    return _get(TOKEN_ENV)


def split_list(raw: Optional[str]) -> tuple[str, ...]:
    """A comma-separated variable as a tuple, blanks and empty items dropped."""
    return tuple(p.strip() for p in (raw or "").split(",") if p.strip())


def allowed_prefixes() -> tuple[str, ...]:
    return split_list(_get(PREFIXES_ENV))


def allowed_models() -> tuple[str, ...]:
    return split_list(_get(MODELS_ENV))


def allowed_reward_functions() -> tuple[str, ...]:
    return split_list(_get(REWARD_FUNCTIONS_ENV))


def allowed_reward_urls() -> tuple[str, ...]:
    return split_list(_get(REWARD_URLS_ENV))


def api_model(given: Optional[str] = None) -> Optional[str]:
    return given or _get(MODEL_ENV)


def storage_options_json() -> Optional[str]:
    return _get(STORAGE_OPTIONS_ENV)


def commit() -> Optional[str]:
    return _get(COMMIT_ENV)


def environment(prefixes: tuple[str, ...], leave_out: tuple[str, ...] = ()) -> dict[str, str]:
    """The variables whose names start with one of `prefixes`, but not those in `leave_out` (what a process
    started elsewhere, such as a Serve replica, must see as this one does)."""
    return {k: v for k, v in os.environ.items() if k.startswith(prefixes) and k not in leave_out}
