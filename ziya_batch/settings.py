"""Every environment variable ziya-batch reads, read here and nowhere else in the package.

Each is read when asked for (not at import), so a test's monkeypatch.setenv and a process's own environment both
hold; a flag the user gave always wins over the variable (the `given` arguments).

- ZIYA_BATCH_HOME: where `run` keeps its private Redis, merged checkpoints and the API's files
  (default ~/.cache/ziya-batch).
- ZIYA_BATCH_REDIS_URL: the Redis queue (`--redis-url` wins). Without it, the private redis-server under the home.
- ZIYA_BATCH_REDIS_IDLE_S: seconds the private redis-server waits unused before it stops (default 600).
- ZIYA_BATCH_ALLOW_REMOTE_CODE: "1" lets this process's workers load models with trust_remote_code
  (`--allow-remote-code` wins); a spec alone never can.
- RAY_AUTH_MODE, RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH: Ray's token authentication (Ray reads them too);
  `worker` looks at them to say which one is missing.
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
REDIS_IDLE_ENV = "ZIYA_BATCH_REDIS_IDLE_S"
REMOTE_CODE_ENV = "ZIYA_BATCH_ALLOW_REMOTE_CODE"
RAY_AUTH_MODE_ENV = "RAY_AUTH_MODE"
RAY_AUTH_TOKEN_ENVS = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def _get(name: str) -> Optional[str]:
    """The variable's value; unset and empty are the same (None)."""
    return os.environ.get(name) or None


def home_dir() -> Path:
    return Path(_get(HOME_ENV) or Path.home() / ".cache" / "ziya-batch")


def redis_url(given: Optional[str] = None) -> Optional[str]:
    return given or _get(REDIS_ENV)


def ray_address(given: Optional[str] = None) -> Optional[str]:
    return given or _get(RAY_ENV)


def redis_idle_s() -> float:
    raw = _get(REDIS_IDLE_ENV)
    try:
        return max(1.0, float(raw)) if raw else 600.0
    except ValueError:
        return 600.0


def allow_remote_code(given: bool = False) -> bool:
    return given or (_get(REMOTE_CODE_ENV) or "").lower() in ("1", "true", "yes")


def set_allow_remote_code() -> None:
    """Let this process and the Ray workers it starts load remote model code (a flag given on the command line):
    they read it from the environment, as a worker started by another process must too."""
    os.environ[REMOTE_CODE_ENV] = "1"


def worker_runtime_env() -> dict:
    """What a ray.init passes on to the workers it starts on nodes it did not start (their processes do not
    inherit this one's environment): the remote-code consent, when given."""
    env = environment((REMOTE_CODE_ENV,))
    return {"env_vars": env} if env else {}


def ray_auth_mode() -> Optional[str]:
    return _get(RAY_AUTH_MODE_ENV)


def ray_auth_token_set() -> bool:
    """Whether a Ray token is given through the environment (else Ray looks at ~/.ray/auth_token)."""
    return any(_get(n) for n in RAY_AUTH_TOKEN_ENVS)


def set_ray_auth_mode(mode: str) -> None:
    """Ray reads its mode from the environment only, in this process and in the `ray start` it runs."""
    os.environ[RAY_AUTH_MODE_ENV] = mode


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
