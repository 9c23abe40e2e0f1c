"""Plain values the API tests share with the `api_env` fixture (tests/redis/conftest.py): the bearer token
its apps accept and a job spec under the data directory it allows."""
from __future__ import annotations

from pathlib import Path

TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def job_spec(data: Path, models: Path, **extra) -> dict:
    spec = {"name": "api-test", "model": {"path": str(models / "m")}, "input": [str(data / "in.jsonl")],
            "sampling": {"max_new_tokens": 4}, "output": {"path": str(data / "out")}, "shard_size": 1}
    spec.update(extra)
    return spec
