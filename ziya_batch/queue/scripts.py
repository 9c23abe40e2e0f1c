"""The Lua scripts of the queue, each with the transition tables and common functions prepended.

Every state change runs as one script: atomic on the server, and checked against states.py's tables."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import redis

from .states import TransitionError, lua_tables

_DIR = Path(__file__).parent
NAMES = ("create_job", "add_shards", "seal", "claim", "heartbeat", "line", "commit", "uncommit", "requeue",
         "cancel", "set_state", "reopen", "finalize", "end_finalize", "progress", "worker", "statuses", "forget",
         "restore")


@lru_cache(maxsize=None)
def source(name: str) -> str:
    return lua_tables() + (_DIR / "common.lua").read_text() + "\n" + (_DIR / f"{name}.lua").read_text()


class Scripts:
    """Registered scripts of one client: `scripts.claim(keys=[...], args=[...])` runs claim.lua by SHA."""

    def __init__(self, client: redis.Redis):
        self._registered = {name: client.register_script(source(name)) for name in NAMES}

    def __getattr__(self, name: str):
        try:
            script = self.__dict__["_registered"][name]
        except KeyError:
            raise AttributeError(name) from None

        def run(keys: list[str], args: list, client=None):
            try:
                return script(keys=keys, args=args, client=client)
            except redis.ResponseError as err:
                text = str(err)
                at = text.find("TRANSITION ")
                if at >= 0:
                    msg = text[at + len("TRANSITION "):].split(" script:")[0].strip()
                    raise TransitionError(msg) from None
                raise

        return run
