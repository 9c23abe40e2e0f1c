"""Random and adversarial URLs through the API's allow-list. The invariant: a location the check accepts is, when
fsspec opens it, under an allowed prefix (by path components, symlinks resolved). The other way round the check
may be stricter than needed (it refuses chains, '..' in remote paths, protocols fsspec does not know)."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import fsspec
import pytest
from fsspec.implementations.local import LocalFileSystem
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ziya_batch.api.access import AccessDenied, is_under
from ziya_batch.io.storage import absolute_url

SEGMENTS = ["in", "input-secret", "in-x", "..", ".", "", "%2e%2e", "%2E%2e", "link", "x", "in.", "in..", "ｉｎ",
            "in\u2215x", "~", "in ", ".in", "...", "in%2f..", "::", "in:", "bucket"]
SCHEMES = ["", "/", "//", "file:", "file:/", "file://", "file:///", "file://host/", "local:", "local://",
           "local:///", "memory://", "memory:///", "simplecache::file://", "FILE://", "~/", "./", "../", "s3://",
           "s3a://", "dir::", "zip://", "data:"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("urls")
    for d in ("in/sub", "input-secret", "in-x", "outside"):
        (root / d).mkdir(parents=True)
    (root / "in" / "link").symlink_to(root / "outside", target_is_directory=True)
    (root / "in" / "sub" / "up").symlink_to(root / "in" / "sub" / ".." / "..", target_is_directory=True)
    return root


@contextlib.contextmanager
def _cwd(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _opened(url: str) -> tuple[str, str]:
    """(kind, path) of what fsspec itself opens for `url`, judged independently of the code under test."""
    fs, path = fsspec.core.url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        return "file", os.path.realpath(path)
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return proto, path


def _within(inner: tuple[str, str], outer: tuple[str, str]) -> bool:
    (k1, p1), (k2, p2) = inner, outer
    if k1 != k2:
        return False
    if k1 != "file" and ".." in p1.split("/"):
        return False
    return p1 == p2 or p1.startswith(p2.rstrip("/") + "/")


def _prefixes(root: Path) -> list[str]:
    return [str(root / "in"), f"{root}/in/", f"file://{root}/in", "memory://bucket/in", "s3://bucket/in/"]


def _check(url: str, root: Path, cwd: Path) -> None:
    with _cwd(cwd):
        prefixes = _prefixes(root)
        try:
            accepted = is_under(url, prefixes)
        except AccessDenied as err:
            assert "\n" not in str(err)
            return
        if not accepted:
            return
        where = _opened(url)
        assert any(_within(where, _opened(p)) for p in prefixes), (url, where)
        # what a submit stores opens the same place from any other working directory
        stored = absolute_url(url)
    with _cwd(root / "outside"):
        assert _opened(stored) == where, (url, stored)


URL = st.builds(lambda scheme, segs, absolute: scheme + ("{root}/" if absolute else "") + "/".join(segs),
                st.sampled_from(SCHEMES), st.lists(st.sampled_from(SEGMENTS), max_size=6), st.booleans())


@given(url=URL, where=st.sampled_from(["root", "in", "in/sub", "outside"]))
@settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))
@example(url="file:../in/x", where="in/sub")
@example(url="file:in/../../outside", where="root")
@example(url="local://../outside", where="in")
@example(url="file://host/../outside", where="in")
@example(url="{root}/in/link/x", where="root")
@example(url="{root}/in/sub/up/outside", where="root")
@example(url="//{root}/in/../outside", where="root")
@example(url="simplecache::file://{root}/in/x", where="root")
@example(url="memory://bucket/in/../secret", where="root")
@example(url="s3://bucket/in/%2e%2e/secret", where="root")
@example(url="file://{root}/in/in://x", where="root")         # stored bare, '/…/in/in' read as a protocol
@example(url="local://in://x", where="root")
def test_an_accepted_location_opens_under_an_allowed_prefix(tree, url, where):
    _check(url.replace("{root}", str(tree)), tree, tree if where == "root" else tree / where)


@given(text=st.text(max_size=60))
@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
def test_random_text_is_judged_or_refused_in_one_line(tree, text):
    _check(text, tree, tree / "in")


def test_the_component_boundary_and_known_escapes(tree):
    with _cwd(tree / "in"):
        prefixes = [str(tree / "in")]
        assert is_under("x.jsonl", prefixes) and is_under("file:x", prefixes) and is_under("local://sub", prefixes)
        for bad in (f"{tree}/input-secret/x", f"{tree}/in-x", "file:../input-secret", "local://../outside",
                    f"{tree}/in/link/x", f"file://{tree}/in/link", f"{tree}/in/sub/up/outside", "~", "/"):
            assert not is_under(bad, prefixes), bad
        for refused in ("simplecache::file:///x", f"dir::{tree}/in", "FILE:///x", "nosuchproto://x"):
            with pytest.raises(AccessDenied):
                is_under(refused, prefixes)
