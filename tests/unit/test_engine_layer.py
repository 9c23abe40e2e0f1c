"""engine/ is inference only: it imports nothing above it (README "Layout"), and its modules import each
other without cycles. Read from the source with ast, imports inside functions included."""
from __future__ import annotations

import ast
from pathlib import Path

import ziya_batch

PACKAGE = Path(ziya_batch.__file__).resolve().parent
ENGINE = PACKAGE / "engine"
ABOVE = ("ziya_batch.runtime", "ziya_batch.queue", "ziya_batch.io", "ziya_batch.api", "ziya_batch.cli",
         "ziya_batch.tools", "ziya_batch.spec", "ziya_batch.settings")
FORBIDDEN_THIRD_PARTY = ("redis", "ray", "pydantic")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports, relative imports resolved (`from . import x` counts as package.x)."""
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}     # `from pkg import module`
    return out


def _engine_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ENGINE.glob("*.py"))}


def _under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_the_engine_imports_nothing_above_it():
    modules = _engine_modules()
    assert "ziya_batch.engine.engine" in modules and "ziya_batch.engine.types" in modules
    bad = [f"{name}: {imp}" for name, path in modules.items() for imp in sorted(imports_of(path))
           if _under(imp, ABOVE) or _under(imp, FORBIDDEN_THIRD_PARTY)]
    assert not bad, "engine/ imports from above it:\n" + "\n".join(bad)


def test_engine_modules_import_each_other_without_cycles():
    modules = _engine_modules()
    graph = {name: {i for i in imports_of(path) if i in modules and i != name} for name, path in modules.items()}
    state: dict[str, int] = {}          # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for nxt in sorted(graph[name]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_the_reader_sees_each_form_of_import(tmp_path):
    # the checks above must not pass by reading nothing: each import form resolves to the module it names
    pkg = tmp_path / "ziya_batch" / "engine"
    pkg.mkdir(parents=True)
    src = pkg / "x.py"
    src.write_text("import ray\nfrom ..runtime import models\nfrom . import model\n"
                   "def f():\n    from ziya_batch.tools.bench import run_bench\n")
    global PACKAGE
    saved, PACKAGE = PACKAGE, tmp_path / "ziya_batch"
    try:
        got = imports_of(src)
    finally:
        PACKAGE = saved
    assert {"ray", "ziya_batch.runtime.models", "ziya_batch.engine.model", "ziya_batch.tools.bench"} <= got
