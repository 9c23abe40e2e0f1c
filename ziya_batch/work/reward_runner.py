"""Running verifiable rewards for experience records: a reward function in a process pool, an HTTP reward
endpoint, and their weighted sum with the reward model's score. No torch, no Ray.

A reward is per sample: a function that raises, returns something that is not a finite number, or runs past
experience.reward_timeout_s gives that sample `null` and a one-line error, never a failed shard. A hung
function's pool is torn down (its processes killed) and rebuilt, so one bad line cannot stall a worker.
Functions run in spawned processes: user code cannot corrupt the worker's CUDA context or hold its GIL.
"""
from __future__ import annotations

import atexit
import hashlib
import http.client
import importlib
import importlib.util
import json
import math
import numbers
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Optional

from ..errors import utf8_text
from ..redact import mask_text

Score = tuple[Optional[float], Optional[str]]     # (value, why it is None)
Item = tuple[Any, str, Optional[dict]]            # (prompt or messages, response, metadata)

MODEL = "model"       # reward component names; a function's component is its own name
URL = "url"


def function_name(ref: str) -> str:
    """The component name of reward_function `ref`: the function's name."""
    return ref.rpartition(":")[2]


def resolve(ref: str) -> Callable:
    """'package.module:function', 'path/to/file.py:function', or a bare built-in name (ziya_batch.rewards)."""
    from .. import rewards

    target, _, name = ref.rpartition(":")
    if not target:
        if ref not in rewards.BUILTINS:
            raise ValueError(f"{ref!r} is not a built-in reward ({', '.join(rewards.BUILTINS)}); "
                             "give 'package.module:function' or 'file.py:function'")
        return getattr(rewards, ref)
    if target.endswith(".py"):
        mod_name = "ziya_reward_" + hashlib.sha256(target.encode()).hexdigest()[:12]
        spec = importlib.util.spec_from_file_location(mod_name, target)
        if spec is None or spec.loader is None or not os.path.isfile(target):
            raise ValueError(f"reward function file {target} does not exist on this worker")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"{target} has no function {name!r}")
    return fn


def one_line(err: BaseException) -> str:
    # written to the records' reward_error: an endpoint's URL quoted by http.client may hold a password, and a reward
    # function's error a lone surrogate (no part could be encoded with it)
    text = utf8_text(" ".join(mask_text(str(err)).split()))
    return f"{type(err).__name__}: {text}"[:500] if text else type(err).__name__


def as_reward(value: Any) -> float:
    # numbers.Real takes numpy's scalars too (a reward computed with numpy returns np.float32, np.int64)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"a reward must be a number, got {type(value).__name__}")
    try:
        value = float(value)
    except (OverflowError, ArithmeticError):        # an integer of hundreds of digits
        raise ValueError("a reward must be finite, got an integer too large for a float") from None
    if not math.isfinite(value):
        raise ValueError(f"a reward must be finite, got {value}")
    return value


def _warm() -> None:
    return None


_LOADED: dict[str, Callable] = {}      # in each pool process: reward functions loaded so far


def _call(ref: str, prompt: Any, response: str, metadata: Optional[dict]) -> float:
    fn = _LOADED.get(ref)
    if fn is None:
        fn = _LOADED[ref] = resolve(ref)
    return as_reward(fn(prompt, response, metadata))


class FunctionRewards:
    """experience.reward_function over a ProcessPoolExecutor (spawn), one call per sample with a timeout. After
    TIMED_OUT_ROUNDS rounds in a row in which every call timed out, the rest of the batch is not called (each
    such sample gets that reason): a function that always hangs costs a shard a few timeouts, not one per sample."""

    TIMED_OUT_ROUNDS = 3

    def __init__(self, ref: str, timeout_s: float, processes: Optional[int] = None):
        self.ref, self.timeout_s = ref, timeout_s
        self.processes = processes or max(1, min(8, os.cpu_count() or 1))
        self._pool: Optional[ProcessPoolExecutor] = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            import multiprocessing

            self._pool = ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"))
            # start every process (spawn and imports take seconds) before any call's timeout starts counting
            for fut in [self._pool.submit(_warm) for _ in range(self.processes)]:
                fut.result()
        return self._pool

    def close(self) -> None:
        """Kill the pool's processes (a hung call never returns to let shutdown finish)."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        procs = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(timeout=5)

    def score(self, items: list[Item]) -> list[Score]:
        out: list[Score] = [(None, "not scored")] * len(items)
        hung_rounds = 0
        # as many calls at once as there are processes, so each call's timeout counts from about its start
        for lo in range(0, len(items), self.processes):
            chunk = range(lo, min(lo + self.processes, len(items)))
            if hung_rounds >= self.TIMED_OUT_ROUNDS:
                why = (f"not called: every call timed out (after {self.timeout_s:g} s) in "
                       f"{hung_rounds} rounds in a row")
                for i in range(lo, len(items)):
                    out[i] = (None, why)
                break
            pool = self._executor()
            futures = {i: pool.submit(_call, self.ref, *items[i]) for i in chunk}
            deadline = time.monotonic() + self.timeout_s
            rebuild, died, timed_out = False, [], 0
            for i, fut in futures.items():
                try:
                    out[i] = (fut.result(timeout=max(0.0, deadline - time.monotonic())), None)
                except FutureTimeout:
                    out[i] = (None, f"timed out after {self.timeout_s:g} s")
                    rebuild, timed_out = True, timed_out + 1
                except BrokenProcessPool:
                    out[i] = (None, "the reward process died (crashed or killed) while scoring")
                    rebuild = True
                    died.append(i)
                except Exception as err:  # noqa: BLE001 - the function's own error, for this sample only
                    out[i] = (None, one_line(err))
            hung_rounds = hung_rounds + 1 if timed_out == len(chunk) else 0
            if rebuild:
                self.close()
            if len(chunk) > 1:
                # a dead process breaks the whole pool: score those calls again one at a time, so only the
                # sample whose call kills its process gets the error
                for i in died:
                    out[i] = self.score([items[i]])[0]
        return out


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A reward endpoint is answered where it was allowed: a redirect (to another host, an internal address, a
    cloud metadata endpoint) is not followed but is that request's error."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


# per thread, the holder of the socket its request opens: the request's deadline watchdog (another thread) shuts it
_SOCKETS = threading.local()


def _opened(sock) -> None:
    holder = getattr(_SOCKETS, "holder", None)
    if holder is not None:
        holder["sock"] = sock


class _HTTPConnection(http.client.HTTPConnection):
    def connect(self):
        super().connect()
        _opened(self.sock)


class _HTTPSConnection(http.client.HTTPSConnection):
    def connect(self):
        super().connect()
        _opened(self.sock)


class _Handler(urllib.request.HTTPHandler, urllib.request.HTTPSHandler):
    def http_open(self, req):
        return self.do_open(_HTTPConnection, req)

    def https_open(self, req):
        return self.do_open(_HTTPSConnection, req, context=self._context)


_OPENER = urllib.request.build_opener(_NoRedirect, _Handler)
MAX_ANSWER_BYTES = 1 << 20            # a reward answer: {"rewards": [...]}, a few bytes a sample
ANSWER_BYTES_PER_ITEM = 64


class _Unanswered(Exception):
    """The reward endpoint's answer did not come whole in time, or was too large: not sent again."""


class UrlRewards:
    """experience.reward_url: POST {"items": [{prompt, response, metadata}...]} in batches, at most
    `concurrency` requests at once, each retried on connection errors, timeouts and 5xx/429 answers (not on an
    answer that came but is wrong: sending it again would score it again). Each request has timeout_s for its
    whole answer, not for each read (a service that sends a byte at a time held the worker's thread for good);
    answers past MAX_ANSWER_BYTES (plus ANSWER_BYTES_PER_ITEM a sample) are not read; redirects are not
    followed."""

    def __init__(self, url: str, timeout_s: float, *, batch_size: int = 32, concurrency: int = 4,
                 retries: int = 2, backoff_s: float = 0.5):
        self.url, self.timeout_s = url, timeout_s
        self.batch_size, self.concurrency, self.retries, self.backoff_s = batch_size, concurrency, retries, backoff_s

    def _post(self, batch: list[Item]) -> list[Score]:
        body = json.dumps({"items": [{"prompt": p, "response": r, "metadata": m} for p, r, m in batch]},
                          ensure_ascii=False).encode()
        error = "not sent"
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            req = urllib.request.Request(self.url, data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
            try:
                raw = self._answer(req, MAX_ANSWER_BYTES + ANSWER_BYTES_PER_ITEM * len(batch))
            except urllib.error.HTTPError as err:
                error = f"reward_url answered HTTP {err.code}"
                if 300 <= err.code < 400:
                    error += " (a redirect, not followed: give the endpoint's own URL)"
                if err.code < 500 and err.code != 429:
                    break                       # the request is wrong: sending it again will not help
                continue
            except _Unanswered as err:
                error = f"reward_url: {err}"
                break
            except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
                error = f"reward_url: {one_line(getattr(err, 'reason', None) or err)}"
                continue
            try:
                answer = json.loads(raw)
            except (ValueError, RecursionError) as err:
                error = f"reward_url answered what is not JSON ({one_line(err)})"
                break
            rewards = answer.get("rewards") if isinstance(answer, dict) else None
            if not isinstance(rewards, list) or len(rewards) != len(batch):
                return [(None, f"reward_url must answer {{\"rewards\": [...]}} with {len(batch)} values")] * len(batch)
            out: list[Score] = []
            for v in rewards:
                try:
                    out.append((None, "reward_url gave null") if v is None else (as_reward(v), None))
                except (TypeError, ValueError) as err:
                    out.append((None, f"reward_url: {err}"))
            return out
        return [(None, error)] * len(batch)

    def _answer(self, req: urllib.request.Request, limit: int) -> bytes:
        """The answer's body, within one deadline for the whole request (a watchdog shuts the socket at it: the
        socket's own timeout bounds each read only, and a server can send its headers a byte at a time too) and
        at most `limit` bytes."""
        late, holder = threading.Event(), {}
        _SOCKETS.holder = holder
        too_late = f"the answer did not come whole within {self.timeout_s:g} s"

        def cut() -> None:
            late.set()
            sock = holder.get("sock")
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        watchdog = threading.Timer(self.timeout_s, cut)
        watchdog.daemon = True
        watchdog.start()
        try:
            try:
                with _OPENER.open(req, timeout=self.timeout_s) as resp:     # noqa: S310 - http(s), spec-checked
                    declared = resp.headers.get("Content-Length")
                    if declared is not None and declared.isdigit() and int(declared) > limit:
                        raise _Unanswered(f"the answer is {int(declared):,} bytes, more than the {limit:,} read")
                    chunks, size = [], 0
                    while True:
                        chunk = resp.read1(65536)
                        if late.is_set():
                            raise _Unanswered(too_late)
                        if not chunk:
                            return b"".join(chunks)
                        size += len(chunk)
                        if size > limit:
                            raise _Unanswered(f"the answer is more than the {limit:,} bytes read")
                        chunks.append(chunk)
            except (OSError, http.client.HTTPException):
                if late.is_set():
                    raise _Unanswered(too_late) from None
                raise
        finally:
            watchdog.cancel()
            _SOCKETS.holder = None

    def score(self, items: list[Item]) -> list[Score]:
        batches = [items[i:i + self.batch_size] for i in range(0, len(items), self.batch_size)]
        with ThreadPoolExecutor(max(1, min(self.concurrency, len(batches) or 1))) as pool:
            return [s for part in pool.map(self._post, batches) for s in part]


_FUNCTIONS: dict[str, FunctionRewards] = {}
MAX_POOLS = 2           # reward-function pools a worker keeps (up to 8 processes each): the least recent closes


def function_rewards(ref: str, timeout_s: float) -> FunctionRewards:
    """A pool per function per worker process, kept between shards (spawning is slow), its timeout the current
    job's; at most MAX_POOLS of them (jobs naming ever new functions or timeouts piled up processes)."""
    pool = _FUNCTIONS.pop(ref, None) or FunctionRewards(ref, timeout_s)
    pool.timeout_s = timeout_s
    _FUNCTIONS[ref] = pool                  # the most recent last
    while len(_FUNCTIONS) > MAX_POOLS:
        _FUNCTIONS.pop(next(iter(_FUNCTIONS))).close()
    return pool


@atexit.register
def _close_pools() -> None:
    for f in _FUNCTIONS.values():
        f.close()


def combine(components: dict[str, list[Score]], weights: dict[str, float], n: int
            ) -> list[tuple[Optional[float], dict[str, Optional[float]], Optional[str]]]:
    """Per sample (reward, rewards {name: value}, reward_error): reward is the weighted sum of the components
    (weight 1 unless given), None if any component is None."""
    out = []
    for i in range(n):
        values = {name: scores[i][0] for name, scores in components.items()}
        errors = [f"{name}: {scores[i][1]}" for name, scores in components.items() if scores[i][0] is None]
        total = None if errors else math.fsum(weights.get(k, 1.0) * v for k, v in values.items())
        out.append((total, values, "; ".join(errors) or None))
    return out
