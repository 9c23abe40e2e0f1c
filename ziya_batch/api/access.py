"""Who may call the API, and which URLs a job sent over it may name.

Tokens are compared in constant time. Every input, output and model location a job names is normalised
before it is compared with the allowed prefixes: local paths are resolved (`..`, symlinks, `~`), so a
link under an allowed directory that points elsewhere is judged by where it points; remote URLs with
`.`/`..` segments or fsspec chaining (`a::b`) are refused outright, since backends disagree on what they
mean. Inputs are checked again after glob expansion, file by file.
"""
from __future__ import annotations

import hmac
import os
import posixpath
from typing import Iterable, Optional
from urllib.parse import unquote

from ..errors import ZiyaBatchError
from ..spec import JobSpec
from .settings import MODELS_ENV, PREFIXES_ENV, ApiSettings


class AccessDenied(ZiyaBatchError):
    """A job names a location (or option) this server does not allow; HTTP 403."""

    exit_code = 5


def token_matches(given: Optional[str], expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def _protocol(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else "file"


def normalize_location(url: str) -> str:
    """The canonical form of a location for prefix comparison; raises AccessDenied for unsafe URLs."""
    if "::" in url:
        raise AccessDenied(f"{url}: chained fsspec URLs (a::b) are not accepted by the API; name the object directly")
    proto = _protocol(url)
    if proto in ("file", "local"):
        path = url.split("://", 1)[1] if "://" in url else url
        return os.path.realpath(os.path.expanduser(path))
    rest = url.split("://", 1)[1]
    segments = unquote(rest).split("/")
    if any(s in (".", "..") for s in segments):
        raise AccessDenied(f"{url}: '.' and '..' segments are not accepted in remote URLs; name the object directly")
    return f"{proto}://{posixpath.normpath(rest) if rest else rest}"


def is_under(location: str, prefixes: Iterable[str]) -> bool:
    """True when the normalised location equals an allowed prefix or lies below one (at a '/' boundary)."""
    loc = normalize_location(location)
    for prefix in prefixes:
        try:
            p = normalize_location(prefix)
        except AccessDenied:
            continue
        if loc == p or loc.startswith(p.rstrip("/") + "/"):
            return True
    return False


def _no_prefixes_message() -> str:
    return (f"this server allows no input or output locations: set {PREFIXES_ENV} (comma-separated URL "
            f"prefixes, e.g. {PREFIXES_ENV}=/data/prompts/,s3://bucket/runs/) where `ziya-batch serve` runs, "
            "and restart it")


def check_data_location(url: str, what: str, settings: ApiSettings) -> None:
    if not settings.allowed_prefixes:
        raise AccessDenied(_no_prefixes_message())
    try:
        resolved = normalize_location(url)
    except AccessDenied as err:
        raise AccessDenied(f"{what} {err}") from None
    if not is_under(url, settings.allowed_prefixes):
        where = f" (it resolves to {resolved})" if resolved.rstrip("/") != url.rstrip("/") else ""
        raise AccessDenied(f"{what} {url}{where} is outside the allowed prefixes ({', '.join(settings.allowed_prefixes)}); "
                           f"move the data under one of them, or add a prefix to {PREFIXES_ENV} on the server")


def model_locations(spec: JobSpec) -> list[tuple[str, str]]:
    """(field name, location) of every model a job loads."""
    pairs = [("model.path", spec.model.path), ("model.base", spec.model.base), ("model.delta", spec.model.delta),
             ("experience.reference_model", spec.experience.reference_model),
             ("experience.reward_model", spec.experience.reward_model)]
    return [(k, v) for k, v in pairs if v]


def check_job(spec: JobSpec, settings: ApiSettings) -> None:
    """Refuse a job that names anything outside what the server allows. Runs before any file is touched."""
    if not settings.allowed_prefixes:
        raise AccessDenied(_no_prefixes_message())
    for url in spec.input:
        check_data_location(url, "input", settings)
    check_data_location(spec.output.path, "output.path", settings)
    if spec.model.trust_remote_code:
        raise AccessDenied("model.trust_remote_code is not accepted over the API (it runs code from the "
                           "checkpoint); submit such a job with `ziya-batch submit` on a trusted machine")
    allowed = tuple(settings.allowed_models) + ((settings.model,) if settings.model else ())
    for field_name, url in model_locations(spec):
        if not allowed or not is_under(url, allowed):
            names = ", ".join(allowed) if allowed else "none"
            raise AccessDenied(f"{field_name} {url} is not an allowed model location (allowed: {names}); "
                               f"add its directory to {MODELS_ENV} on the server, or use the server's --model")
    check_rewards(spec, settings)


def check_rewards(spec: JobSpec, settings: ApiSettings) -> None:
    """A reward function runs code on the workers and a reward URL receives the job's text: over HTTP only the
    built-ins and the functions the server lists, and URLs under the prefixes it lists."""
    from ..rewards import BUILTINS
    from .settings import REWARD_FUNCTIONS_ENV, REWARD_URLS_ENV

    ref = spec.experience.reward_function
    builtin = ref in BUILTINS or (ref or "").startswith("ziya_batch.rewards:") and ref.rpartition(":")[2] in BUILTINS
    if ref and not builtin and ref not in settings.allowed_reward_functions:
        raise AccessDenied(f"experience.reward_function {ref} is not allowed over the API (it would run code on the "
                           f"workers): use a built-in ({', '.join(BUILTINS)}) or add it to {REWARD_FUNCTIONS_ENV} "
                           "on the server")
    url = spec.experience.reward_url
    if url and not any(url == p or url.startswith(p if p.endswith("/") else p + "/")
                       for p in settings.allowed_reward_urls):
        names = ", ".join(settings.allowed_reward_urls) or "none"
        raise AccessDenied(f"experience.reward_url {url} is not an allowed reward endpoint (allowed: {names}); "
                           f"add its prefix to {REWARD_URLS_ENV} on the server")


def check_expanded_inputs(files: Iterable[str], settings: ApiSettings) -> None:
    """After glob expansion: every matched file, resolved, must still lie under an allowed prefix."""
    for f in files:
        check_data_location(f, "input file", settings)
