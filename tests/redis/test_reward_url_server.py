"""UrlRewards against a real HTTP server on 127.0.0.1 (the unit suite listens on no socket): a redirect is not
followed (it could point at an internal address or a cloud metadata endpoint), and an answer that drips a byte at
a time ends at the request's timeout instead of holding the worker for good."""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ziya_batch.work.reward_runner import UrlRewards


class _Handler(BaseHTTPRequestHandler):
    hits: list = []

    def log_message(self, *args):
        pass

    def _answer(self):
        self.hits.append((self.command, self.path))
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{self.server.server_port}/target")
            self.end_headers()
            return
        if self.path == "/drip-headers":
            self.wfile.write(b"HTTP/1.1 200 OK\r\n")
            for i in range(200):
                try:
                    self.wfile.write(b"X-Slow-%d: 1\r\n" % i)
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.2)
            return
        if self.path == "/drip":
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            for _ in range(100):
                try:
                    self.wfile.write(b" ")
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.2)
            return
        body = json.dumps({"rewards": [1.0]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._answer()

    do_GET = _answer


@pytest.fixture
def server():
    _Handler.hits = []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_port}"
    srv.shutdown()
    srv.server_close()


def test_an_answer_comes_and_a_redirect_is_not_followed(server):
    assert UrlRewards(f"{server}/score", 5.0).score([("p", "a", {})]) == [(1.0, None)]
    out = UrlRewards(f"{server}/redirect", 5.0, backoff_s=0.01).score([("p", "a", {})])
    assert out[0][0] is None and "HTTP 302" in out[0][1] and "not followed" in out[0][1]
    assert ("GET", "/target") not in _Handler.hits and ("POST", "/target") not in _Handler.hits


@pytest.mark.parametrize("path", ["/drip", "/drip-headers"])
def test_a_dripping_answer_ends_at_the_timeout(server, path):
    """A body, or the headers before it, a byte at a time: each read within the socket's timeout, the whole
    never; the request ends at its deadline (the headers ran 100 x the timeout before)."""
    t0 = time.monotonic()
    out = UrlRewards(f"{server}{path}", 1.0, retries=0).score([("p", "a", {})])
    assert time.monotonic() - t0 < 2.5
    assert out[0][0] is None and "did not come whole within 1 s" in out[0][1]
