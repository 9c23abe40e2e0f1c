"""The layer rule for work/: the job's logic without Ray (ray only in runtime/ and api/)."""
import pathlib
import re
import subprocess
import sys

import ziya_batch

WORK = pathlib.Path(ziya_batch.__file__).parent / "work"


def test_work_never_imports_ray_or_the_ray_adapters():
    for path in sorted(WORK.glob("*.py")):
        text = path.read_text()
        assert not re.search(r"^\s*(import ray|from ray\b)", text, re.M), f"{path.name} imports ray"
        for adapter in ("actors", "tp_actors", "replicas", "cluster", "local"):
            assert not re.search(rf"runtime(\.|\s+import\s+){adapter}\b", text), f"{path.name} imports {adapter}"
    modules = ", ".join(f"ziya_batch.work.{p.stem}" for p in sorted(WORK.glob("*.py")) if p.stem != "__init__")
    code = f"import sys, {modules}; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
