"""Who may call the API, and which URLs a job sent over it may name.

Tokens are compared in constant time. Every input, output and model location a job names (and every allowed
prefix) is normalised to what fsspec will open before the two are compared: the protocol and path by fsspec's
own rules, local paths then resolved (`..`, symlinks, `~`), so a link under an allowed directory that points
elsewhere is judged by where it points; remote URLs with `.`/`..` segments (also percent-encoded) or fsspec
chaining (`a::b`) are refused outright, since backends disagree on what they mean. Inputs are checked again
after glob expansion, file by file.
"""
from __future__ import annotations

import hmac
import urllib.parse
from typing import Iterable, Iterator, Optional

from ..errors import AccessDenied      # defined in errors since jobs.submit_job raises it too; named here as before
from ..io.storage import canonical_location, location_within
from ..spec import JobSpec, show_text
from .settings import MODELS_ENV, PREFIXES_ENV, ApiSettings


def token_matches(given: Optional[str], expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def normalize_location(url: str) -> str:
    """The location fsspec opens for `url` in one canonical spelling (io.storage.canonical_location: fsspec's own
    rules for the protocol and path, then realpath for local paths); AccessDenied for a URL the check cannot
    read the way every backend does."""
    try:
        return canonical_location(url)
    except ValueError as err:
        raise AccessDenied(f"{show_text(url)}: {err}") from None


def is_under(location: str, prefixes: Iterable[str]) -> bool:
    """True when the normalised location equals an allowed prefix or lies below one, at a path-component
    boundary (`/data/in` admits `/data/in/x`, never `/data/input-secret`)."""
    loc = normalize_location(location)
    return any(location_within(loc, p) for p in _normalized(prefixes))


def _normalized(prefixes: Iterable[str]) -> Iterator[str]:
    """The prefixes normalised as locations are; those the check cannot read are left out."""
    for prefix in prefixes:
        try:
            yield normalize_location(prefix)
        except AccessDenied:
            continue


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
        raise _outside(f"{what} {url}{where}", settings)


def _outside(named: str, settings: ApiSettings) -> AccessDenied:
    return AccessDenied(f"{named} is outside the allowed prefixes ({', '.join(settings.allowed_prefixes)}); move the "
                        f"data under one of them, or add a prefix to {PREFIXES_ENV} on the server")


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
    from ..jobs.submit import absolute_reward_function
    from ..rewards import BUILTINS
    from .settings import REWARD_FUNCTIONS_ENV, REWARD_URLS_ENV

    ref = spec.experience.reward_function
    builtin = ref in BUILTINS or ref in {f"ziya_batch.rewards:{name}" for name in BUILTINS}
    # the job's 'file.py:f' is judged as stored, absolute from the server's directory: so is the list's
    if ref and not builtin and ref not in {absolute_reward_function(r) for r in settings.allowed_reward_functions}:
        raise AccessDenied(f"experience.reward_function {ref} is not allowed over the API (it would run code on the "
                           f"workers): use a built-in ({', '.join(BUILTINS)}) or add it to {REWARD_FUNCTIONS_ENV} "
                           "on the server")
    url = spec.experience.reward_url
    if url and not any(_url_under(url, p) for p in settings.allowed_reward_urls):
        names = ", ".join(settings.allowed_reward_urls) or "none"
        raise AccessDenied(f"experience.reward_url {url} is not an allowed reward endpoint (allowed: {names}); "
                           f"add its prefix to {REWARD_URLS_ENV} on the server")


def _url_under(url: str, prefix: str) -> bool:
    """Whether an http(s) URL lies under an allowed prefix: the same scheme, host and port, and a path that is the
    prefix's or under it by whole segments, with no '.' or '..' segment (also percent-encoded), no backslash and no
    user part, which a server or a parser could read otherwise than this comparison does."""
    try:
        u, p = urllib.parse.urlsplit(url), urllib.parse.urlsplit(prefix)
        default = {"http": 80, "https": 443}
        u_port, p_port = u.port or default.get(u.scheme.lower()), p.port or default.get(p.scheme.lower())
    except ValueError:
        return False
    if "\\" in url or u.username is not None or u.password is not None or u.scheme.lower() not in ("http", "https"):
        return False
    if (u.scheme.lower(), (u.hostname or ""), u_port) != (p.scheme.lower(), (p.hostname or ""), p_port):
        return False
    segments = urllib.parse.unquote(u.path).split("/")
    if any(seg in (".", "..") for seg in segments) or "\\" in urllib.parse.unquote(u.path):
        return False
    if p.query and u.query != p.query:          # a prefix that names its query allows that query only
        return False
    base = p.path.rstrip("/")
    return u.path == p.path or u.path.startswith(base + "/")


def check_expanded_inputs(files: Iterable[str], settings: ApiSettings) -> dict[str, str]:
    """After glob expansion: every matched file, resolved, must still lie under an allowed prefix. Returns the
    identity (io.inputs.file_identity) of each local file as judged, for submit_job's `vetted`: the path is judged
    again by where a descriptor opened on it points (io.inputs.where_local_file_is), and that descriptor's file is
    the one the indexer must find, so a symlink swapped in after this check is refused, not indexed."""
    from ..io.inputs import where_local_file_is

    vetted: dict[str, str] = {}
    for f in files:
        check_data_location(f, "input file", settings)
        found = where_local_file_is(f)
        if found is None:               # object storage: no links, nothing to compare
            continue
        identity, where = found
        # as the kernel names it: compared as it is, not resolved again (a link could be swapped in meanwhile)
        if not any(location_within(where, p) for p in _normalized(settings.allowed_prefixes)):
            raise _outside(f"input file {f} (it resolves to {show_text(where)})", settings)
        vetted[f] = identity
    return vetted
