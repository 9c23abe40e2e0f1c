"""What a user follows on one machine: `make demo` and a plain shell share one home, so the `ziya-batch status`
that the demo ends with, or that the user types later, lists the demo's job; the Quick start shows the
three-command HTTP path."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _recipe(makefile: str, target: str) -> list[str]:
    body = re.search(rf"^{target}:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert body, target
    return [line.strip() for line in body.group(1).splitlines()]


def test_make_demo_uses_the_home_a_plain_shell_uses():
    makefile = (REPO / "Makefile").read_text()
    # any assignment (export, ?=, :=, a recipe's env prefix) would put the demo's Redis where a shell never looks
    assert not re.search(r"ZIYA_BATCH_HOME\s*[:?+]?=|ZIYA_BATCH_HOME=", makefile)
    assert _recipe(makefile, "demo")[-1] == "$(ZB) status"
    readme = (REPO / "README.md").read_text()
    assert ".cache/ziya-batch/redis" not in readme.replace("~/.cache/ziya-batch/redis", "")


def test_quick_start_shows_serve_submit_and_status_over_http():
    readme = (REPO / "README.md").read_text()
    quick = readme[readme.index("\n## Quick start\n"):readme.index("\n## Concepts\n")]
    # commands, not the demo's own output ("ziya-batch status (the private redis-server ...)")
    command = re.compile(r"(ZIYA_BATCH_API_TOKEN=|curl |ziya-batch status(\s|$)(?!\())")
    commands = [line for line in quick.splitlines() if command.match(line)]
    assert [c.split()[0] for c in commands] == ["ZIYA_BATCH_API_TOKEN=secret-token-0123456789abcdef", "curl",
                                               "ziya-batch"]
    assert "ziya-batch serve" in quick and "/v1/jobs" in commands[1]
