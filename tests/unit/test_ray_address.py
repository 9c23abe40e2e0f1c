"""`run` and `serve` check a Ray address they are given before anything is queued: a malformed one is one line
(exit 2; it was a ValueError traceback), one where nothing answers is one line (exit 3; ray.init retried it for
minutes while the job sat queued)."""
from __future__ import annotations

import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ziya_batch.errors import ServiceError, SpecError
from ziya_batch.queue.server import free_port
from ziya_batch.runtime.services import check_ray_address


@pytest.mark.parametrize("address", ["bogus:::", "http://x", "https://h:1", "x", ":6379", "host:", "host:0",
                                     "host:65536", "host:12a", "ray://", "ray://h:1/x", "h :1", "h:\u0663", "[::1]:",
                                     "", "[::1:6379", "::1:6379", "10.0.0.1:6379\n", "ray://h:1\nX", "a]:1"])
def test_a_malformed_address_is_one_line(address):
    with pytest.raises(SpecError, match="expected host:port"):
        check_ray_address(address)


def test_an_address_where_nothing_answers_is_one_line_and_one_that_answers_passes(monkeypatch):
    port = free_port()
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}", f"[::1]:{port}"):
        with pytest.raises(ServiceError, match="does not answer"):
            check_ray_address(address, timeout_s=2.0)
    check_ray_address("auto")
    check_ray_address("local")
    # where a head listens (faked here: this suite runs no servers; tests/ray runs `run --address` on real ones)
    tried = []

    class _Conn:
        def close(self):
            pass

    monkeypatch.setattr(socket, "create_connection", lambda where, timeout: tried.append(where) or _Conn())
    for address, where in (("10.0.0.1:6379", ("10.0.0.1", 6379)), ("ray://head:10001", ("head", 10001)),
                           ("[fe80::1]:6379", ("fe80::1", 6379))):
        check_ray_address(address)
        assert tried[-1] == where


def test_a_client_builders_own_scheme_is_left_to_ray():
    check_ray_address("anyscale://my-cluster")


def _nothing_answers(where, timeout):
    raise ConnectionRefusedError(111, "Connection refused")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_any_text_is_judged_in_one_line(text):
    with pytest.MonkeyPatch.context() as mp:        # no name lookups: every host:port "does not answer"
        mp.setattr(socket, "create_connection", _nothing_answers)
        try:
            check_ray_address(text, timeout_s=0.2)
        except (SpecError, ServiceError) as err:
            assert "\n" not in str(err) and "\r" not in str(err) and len(str(err)) < 600
