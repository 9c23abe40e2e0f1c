"""fsspec plumbing: turning URLs into (filesystem, path), joining them, and writing objects atomically.

Every URL fsspec understands works: local paths, ``file://``, ``s3://``, ``gs://``, ``memory://``...

How to pass storage options (credentials, endpoints) — no option lives in the job spec, so a spec
never carries secrets and the same spec runs against AWS and a local S3-compatible store:

1. The backend's own environment variables. For S3 that is botocore's chain: ``AWS_ACCESS_KEY_ID``,
   ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``, ``AWS_PROFILE`` and, for MinIO/Ceph/moto,
   ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (honoured by botocore >= 1.31).
2. fsspec's own configuration: environment variables ``FSSPEC_<PROTOCOL>_<OPTION>`` (e.g.
   ``FSSPEC_S3_ENDPOINT_URL=http://127.0.0.1:9000``, read when fsspec is imported) or JSON/INI files in
   ``FSSPEC_CONFIG_DIR`` (default ``~/.config/fsspec``).
3. ``ZIYA_BATCH_STORAGE_OPTIONS``: a JSON object keyed by protocol, passed to the filesystem as keyword
   arguments, e.g. ``{"s3": {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}, "anon": false}}``.
   It wins over 2. Read on every call, so a process can change it at run time.

Workers on other machines need the same variables; ``ziya-batch worker`` inherits its environment.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import posixpath
import re
import stat
import uuid
from typing import Any, Iterator, Optional
from urllib.parse import unquote

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .. import settings
from ..errors import InputError, ServiceError, ZiyaBatchError
from ..settings import STORAGE_OPTIONS_ENV


def storage_options(protocol: str) -> dict[str, Any]:
    """Options for `protocol` from ZIYA_BATCH_STORAGE_OPTIONS (a JSON object keyed by protocol)."""
    raw = settings.storage_options_json()
    if not raw:
        return {}
    try:
        conf = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ServiceError(f"{STORAGE_OPTIONS_ENV} is not valid JSON ({err}); expected e.g. "
                           '{"s3": {"client_kwargs": {"endpoint_url": "http://host:9000"}}}') from None
    if not isinstance(conf, dict) or not all(isinstance(v, dict) for v in conf.values()):
        raise ServiceError(f"{STORAGE_OPTIONS_ENV} must map a protocol to an object of options, e.g. "
                           '{"s3": {"anon": false}}')
    aliases = {"s3a": "s3", "gcs": "gs"}
    return dict(conf.get(protocol) or conf.get(aliases.get(protocol, protocol)) or {})


def protocol_of(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def is_local(url: str) -> bool:
    return protocol_of(url) in ("file", "local")


def url_to_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for any fsspec URL or local path."""
    try:
        return fsspec.core.url_to_fs(url, **storage_options(protocol_of(url)))
    except (ImportError, ValueError) as err:
        raise ServiceError(f"cannot open {url}: {err} (is the fsspec backend for "
                           f"'{protocol_of(url)}://' installed?)") from None


def open_output_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, root path) of an output directory URL, without a trailing slash."""
    fs, path = url_to_fs(url)
    return fs, path.rstrip("/") or "/"


def is_chained(url: str) -> bool:
    """fsspec reads `a::b` as a chain of filesystems (simplecache::s3://...), wherever the `::` is."""
    return "::" in url


def fs_class_path(url: str) -> tuple[type, str]:
    """The filesystem class and the path in it that fsspec.core.url_to_fs opens for a URL that is not chained,
    worked out as fsspec does (split_protocol, then the class's _strip_protocol) without creating the
    filesystem. So `file:rel`, `file://host/p`, `local://p` and `~/p` are the local paths fsspec opens, made
    absolute from this working directory. Raises ValueError for an unknown protocol, ImportError for a
    backend that is not installed."""
    protocol = fsspec.core.split_protocol(url)[0] or "file"
    cls = fsspec.get_filesystem_class(protocol)
    return cls, cls._strip_protocol(url)


def absolute_url(url: str) -> str:
    """The URL as any process opens it wherever it runs: a local location in any spelling fsspec accepts
    becomes the absolute path fsspec opens from this working directory (kept as fsspec spells it: `..` stays,
    so a symlink means what it means to the kernel); other URLs, and ones fsspec cannot open, are unchanged."""
    if is_chained(url):
        return url
    try:
        cls, path = fs_class_path(url)
    except (ValueError, ImportError):
        return url
    if not issubclass(cls, LocalFileSystem):
        return url
    # fsspec leaves `~name` of an unknown user relative (expanduser keeps it): relative to here, as it opens it
    path = path if path.startswith("/") else f"{os.getcwd()}/{path}"
    # a path fsspec would read otherwise when bare (`/d/in://x` is protocol '/d/in'): kept behind file://
    return f"file://{path}" if "://" in path or "::" in path or path.startswith("data:") else path


def canonical_location(url: str) -> str:
    """The place fsspec opens for `url`, in one spelling that compares as a path: local locations resolved by
    the kernel's rules (os.path.realpath: `..` after symlinks, `~`, relative to this working directory), remote
    ones as `<protocol>://<backend path>` under the filesystem class's first protocol (s3a:// is s3://).
    Raises ValueError, saying why, for a location whose meaning backends disagree on: chained URLs, `.`/`..`
    segments in a remote path (also percent-encoded or after a backslash), an unknown protocol, a path no file
    can have."""
    if is_chained(url):
        raise ValueError("chained fsspec URLs (a::b) are not accepted; name the object directly")
    try:
        cls, path = fs_class_path(url)
    except (ValueError, ImportError):
        raise ValueError("not a location this server can open (unknown protocol or no backend installed "
                         "for it)") from None
    if issubclass(cls, LocalFileSystem):
        try:
            return os.path.realpath(path)
        except ValueError:          # a NUL byte, a lone surrogate
            raise ValueError("not a valid path") from None
    # raw, percent-decoded, and split at backslashes too: an HTTP server may decode %2f or read \ as a slash
    if any(s in (".", "..") for s in re.split(r"[/\\]", path) + re.split(r"[/\\]", unquote(path))):
        raise ValueError("'.' and '..' segments are not accepted in remote URLs; name the object directly")
    if "://" in path:               # a backend that keeps the whole URL as its path (http, https)
        return path.rstrip("/")
    family = cls.protocol if isinstance(cls.protocol, str) else cls.protocol[0]
    return f"{family}://{path.rstrip('/')}"


def location_within(inner: str, outer: str) -> bool:
    """True when canonical location `inner` is `outer` or lies below it, at a path-component boundary
    (`/data/in` holds `/data/in/x`, never `/data/input-secret`)."""
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def normalize_url(url: str) -> str:
    """A URL every process can open: local locations become absolute paths (Ray workers run in other working
    directories), remote URLs lose a trailing slash."""
    return absolute_url(url) if is_local(url) else url.rstrip("/")


def join_url(base: str, *parts: str) -> str:
    """Join with '/' whatever the protocol (os.path.join would break s3:// on Windows and on '//')."""
    out = base.rstrip("/") if base not in ("/", "") else base
    for p in parts:
        p = p.strip("/")
        if p:
            out = f"{out}/{p}" if out not in ("", "/") else f"{out}{p}"
    return out


def full_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The URL of `path` in `fs`: local paths stay plain paths, remote ones get their protocol back."""
    if isinstance(fs, LocalFileSystem):
        return path
    return fs.unstrip_protocol(path)


def put_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write `data` so that readers see the old object or the whole new one, never a torn one.

    Local: a temp file in the same directory, fsync, then os.replace (atomic on POSIX). Object stores:
    one PUT (s3fs sends one put_object below 100 MB, and a multipart upload becomes visible only on
    completion), which is atomic by the store's semantics.
    """
    if isinstance(fs, LocalFileSystem):
        parent = posixpath.dirname(path)
        os.makedirs(parent, exist_ok=True)
        tmp = posixpath.join(parent, f".{posixpath.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            write_synced(tmp, data)
            os.replace(tmp, path)
            _fsync_dir(parent)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return
    fs.pipe_file(path, data)
    fs.invalidate_cache(path)


def write_synced(path: str, data: bytes) -> None:
    """Write a local file and fsync it: the first half of every atomic local write (rename or link it after)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    """Make a rename durable: without it a power cut can forget the new name even after the file's fsync."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass                    # some filesystems refuse fsync on a directory; the rename still happened
    finally:
        os.close(fd)


def move_atomic(fs: fsspec.AbstractFileSystem, src: str, dst: str) -> None:
    """Move src over dst. Local: os.replace (atomic). Object stores: one server-side copy request (the
    destination appears whole), then delete the source; a crash in between leaves both, which the
    caller's idempotent retry resolves."""
    if isinstance(fs, LocalFileSystem):
        os.makedirs(posixpath.dirname(dst), exist_ok=True)
        os.replace(src, dst)
        _fsync_dir(posixpath.dirname(dst))
        return
    fs.cp_file(src, dst)
    fs.rm_file(src)
    fs.invalidate_cache(src)
    fs.invalidate_cache(dst)


@contextlib.contextmanager
def storage_errors(what: str) -> Iterator[None]:
    """Storage that cannot be reached (no credentials, a host that does not answer, a bucket name the store
    rejects, a filesystem whose library is missing) as one line naming `what` (e.g. "output.path s3://b/x"):
    ServiceError (exit 3, HTTP 503) where the store did not answer, else InputError; not a backend's traceback.
    Wrap the first calls that reach a location, not work of ours that may have bugs of its own."""
    try:
        yield
    except ZiyaBatchError:
        raise
    except Exception as err:  # noqa: BLE001 - a storage backend may raise anything; name it
        why = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
        if unreachable(err):
            raise ServiceError(f"{what}: its storage does not answer ({why}); try again once it does, or check "
                               "the URL") from None
        raise InputError(f"{what} not usable ({why}; check the URL and its credentials)") from None


@contextlib.contextmanager
def storage_away(what: str) -> Iterator[None]:
    """Storage that stops answering after storage_errors' first calls reached it (a connection refused or cut, a
    time-out, midway through a command's reads) as one line naming `what` (ServiceError, exit 3 / HTTP 503); any
    other error passes unchanged, ours included. Wrap a command's later calls to a location it reached."""
    try:
        yield
    except ZiyaBatchError:
        raise
    except Exception as err:
        if not unreachable(err):
            raise
        why = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
        raise ServiceError(f"{what}: its storage does not answer ({why}); try again once it does") from None


# what s3fs makes of an object store's "try again" answers once its client's retries are spent: 503 Slow Down and
# Service Unavailable (and 409 OperationAborted) are EBUSY, 500 Internal Error is EREMOTEIO
_BUSY_ERRNOS = frozenset({errno.EBUSY, getattr(errno, "EREMOTEIO", errno.EBUSY)})


def unreachable(err: BaseException) -> bool:
    """Whether a storage backend's error says the store did not answer (a connection refused or cut, a time-out, a
    "try again" such as S3's 503 Slow Down: the service's state, exit 3 / HTTP 503) rather than that the location is
    wrong (credentials, a bucket name)."""
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    if isinstance(err, OSError) and err.errno in _BUSY_ERRNOS:
        return True
    return any("Connect" in c.__name__ or "Timeout" in c.__name__ for c in type(err).__mro__)


def read_bytes(fs: fsspec.AbstractFileSystem, path: str, limit: Optional[int] = None,
               expect_size: Optional[int] = None) -> bytes | None:
    """The object's bytes, or None when it does not exist (one request; no exists() race). InputError for more
    than `limit` bytes (where given), and locally for anything but a regular file: a FIFO would block the
    reader for good, a device (a link to /dev/zero) never end.

    `expect_size`: the size the caller was told the object has (a part's, by its marker or the manifest), to save a
    request on an object store: s3fs asks for an object's size (a HEAD) before a GET without a range, to choose to
    download it in pieces. So a part said to hold bytes is asked for as the range 0- (a GET alone), and one said to
    be empty is asked for its size alone (a HEAD; its bytes are none). What is read is the same either way: an
    object of another size than said costs one request more."""
    if isinstance(fs, LocalFileSystem):
        return _read_local(LocalFileSystem._strip_protocol(path), limit)
    try:
        if limit is None and expect_size == 0:
            info = fs.info(path)
            if info.get("type") == "file" and info.get("size") == 0:
                return b""
            expect_size = info.get("size") if info.get("type") == "file" else None
        try:
            if limit is not None:
                data = fs.cat_file(path, start=0, end=limit + 1)
            else:
                data = fs.cat_file(path, start=0) if expect_size else fs.cat_file(path)
        except OSError as err:
            if (limit is None and not expect_size) or isinstance(err, FileNotFoundError) or \
                    err.errno != errno.EINVAL:
                raise
            data = fs.cat_file(path)        # an empty object: a ranged read of it is "not satisfiable" (416)
    except FileNotFoundError:
        return None
    if limit is not None and len(data) > limit:
        raise _too_large(path, limit)
    return data


_KINDS = ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"))


def special_kind(mode: int) -> Optional[str]:
    """What a file of this st_mode is when not a regular file ("a named pipe", ...); None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _too_large(path: str, limit: int) -> InputError:
    return InputError(f"{path} is larger than {limit:,} bytes, more than this file ever holds: not read")


def _read_local(path: str, limit: Optional[int]) -> bytes | None:
    try:
        # non-blocking: opening a FIFO for reading otherwise waits for a writer
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as err:
        if err.errno != errno.ENXIO:            # a socket
            raise
        raise InputError(f"{path} is a socket, not a regular file: not read") from None
    try:        # judged before a file object is made of it (one of a directory fails naming the fd number)
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        kind = special_kind(st.st_mode)
        if kind:
            raise InputError(f"{path} is {kind}, not a regular file: not read; remove it")
        if limit is not None and st.st_size > limit:
            raise _too_large(path, limit)
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as f:
        data = f.read()
    if limit is not None and len(data) > limit:
        raise _too_large(path, limit)
    return data


def exists_fresh(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """exists() that ignores fsspec's listing cache: another process may have just written it."""
    fs.invalidate_cache(path)
    return fs.exists(path)


def absent_fresh(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """Whether storage answers that the object does not exist, ignoring fsspec's listing cache. Unlike
    exists_fresh (fsspec's exists() answers False for every error, a timeout or a refused permission included),
    only "not found" counts: any other error propagates."""
    fs.invalidate_cache(path)
    try:
        fs.info(path)
    except FileNotFoundError:
        return True
    return False


def _ls_fresh(fs: fsspec.AbstractFileSystem, path: str, detail: bool) -> list:
    fs.invalidate_cache(path)
    try:
        return list(fs.ls(path, detail=detail))
    except FileNotFoundError:
        return []


def list_fresh(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """Names (full paths) under a directory, [] if it does not exist; bypasses the listing cache."""
    return sorted(_ls_fresh(fs, path, detail=False))


def list_fresh_detail(fs: fsspec.AbstractFileSystem, path: str) -> list[dict]:
    """fs.ls(path, detail=True) bypassing the listing cache, [] if it does not exist."""
    return _ls_fresh(fs, path, detail=True)
