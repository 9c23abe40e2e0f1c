"""engine/ is inference only: it imports nothing above it (README "Layout"), and its modules import each
other without cycles. Read from the source with ast, imports inside functions included."""
from __future__ import annotations

import ast
from pathlib import Path

import ziya_batch

PACKAGE = Path(ziya_batch.__file__).resolve().parent
ENGINE = PACKAGE / "engine"
# of ziya_batch, engine/ may import only itself and errors.py: everything else of the package is above it
ALLOWED = ("ziya_batch.engine", "ziya_batch.errors")
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
            if node.module:                  # `from .. import errors` imports ziya_batch.errors, not all of ziya_batch
                out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}     # `from pkg import module`
    return out


def _engine_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ENGINE.glob("*.py"))}


def _under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _forbidden(imp: str) -> bool:
    return (_under(imp, ("ziya_batch",)) and not _under(imp, ALLOWED)) or _under(imp, FORBIDDEN_THIRD_PARTY)


def test_the_engine_imports_nothing_above_it():
    modules = _engine_modules()
    assert "ziya_batch.engine.engine" in modules and "ziya_batch.engine.types" in modules
    bad = [f"{name}: {imp}" for name, path in modules.items() for imp in sorted(imports_of(path)) if _forbidden(imp)]
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
                   "from ziya_batch.constraints import grammar_text\nfrom .. import errors\n"
                   "def f():\n    from ziya_batch.tools.bench import run_bench\n")
    global PACKAGE
    saved, PACKAGE = PACKAGE, tmp_path / "ziya_batch"
    try:
        got = imports_of(src)
    finally:
        PACKAGE = saved
    assert {"ray", "ziya_batch.runtime.models", "ziya_batch.engine.model", "ziya_batch.tools.bench",
            "ziya_batch.constraints", "ziya_batch.errors"} <= got
    # a top-level module of the package counts as above the engine, whatever its name; errors.py does not
    assert {i for i in got if _forbidden(i)} == {"ray", "ziya_batch.runtime", "ziya_batch.runtime.models",
                                                 "ziya_batch.tools.bench", "ziya_batch.tools.bench.run_bench",
                                                 "ziya_batch.constraints", "ziya_batch.constraints.grammar_text"}
