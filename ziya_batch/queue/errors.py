"""The broker's failures as the layers above it catch them, so that they need not import redis themselves.

BROKER_UNREACHABLE: Redis is away (down, restarting, failing over, the network cut) or, mid-failover, a replica
answers writes with READONLY until it is promoted (or the client reconnects to the new primary); a caller that
can wait it out (the worker's loop) catches these and tries again later. BROKER_ERRORS: anything Redis refused, for a caller
whose step is only a hint (a worker's wait for announced work falls back to looking on its own).
Tuples of redis's own types rather than a type of ours: every broker call, its Lua scripts and its subscription
raise them as they are, and callers that catch redis's types keep working unchanged.
"""
from __future__ import annotations

import redis

BROKER_UNREACHABLE: tuple[type[Exception], ...] = (redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError)
BROKER_ERRORS: tuple[type[Exception], ...] = (redis.RedisError,)
