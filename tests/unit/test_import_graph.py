"""The import graph of ziya_batch, read from the source (ast, no import runs): no cycles, and the layers of
the README's Layout holds. Every import counts, at module level or inside a function, under TYPE_CHECKING or not: a cycle
that only a lazy import keeps from failing is still two modules that cannot be read one without the other."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "ziya_batch"

# (module, what it imports) that break a rule today, each with why it is allowed for now. An entry that no
# longer breaks the rule fails test_known_exceptions_are_still_needed: delete it then.
KNOWN_LAYER_EXCEPTIONS: dict[tuple[str, str], str] = {}
KNOWN_CYCLES: dict[frozenset, str] = {}


def _modules(root: Path) -> dict[str, tuple[Path, bool]]:
    """module name -> (file, is a package's __init__)."""
    out = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


def _imports(name: str, path: Path, is_package: bool, known: set[str]) -> set[str]:
    """Every module `name` imports: ziya_batch modules resolved to the most specific module there is
    (`from .. import io` is ziya_batch.io), other packages as written (`torch.nn`)."""
    here = name.split(".") if is_package else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else target)
    return {m for m in found if m != name}


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = _modules(root)
    return {name: _imports(name, path, is_pkg, set(modules)) for name, (path, is_pkg) in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan), among ziya_batch modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _under(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _pkg(*names: str) -> tuple[str, ...]:
    return tuple(f"{PACKAGE}.{n}" for n in names)


# (modules the rule is about, what they must not import, the rule as the README's Layout says it)
LAYER_RULES = [
    (_pkg("engine"), ("redis", "ray"), "engine/ never imports redis or ray"),
    (_pkg("queue", "io"), ("torch",) + _pkg("runtime", "api", "cli", "jobs"),
     "queue/ and io/ never import torch, nor the layers above them"),
    (_pkg("io"), _pkg("queue"), "io/ sits below queue/"),
    (_pkg("jobs"), ("ray", "torch") + _pkg("runtime", "api", "cli", "work"),
     "the jobs service has no Ray and no torch and sits below cli/, api/, runtime/ and work/ (the worker finalizes "
     "through it)"),
    (_pkg("work"), ("ray", "redis") + _pkg("runtime", "api", "cli"),
     "work/ (the worker, generation, models, failure policy, commit) has no Ray, reaches Redis only through queue/ "
     "(it catches queue.BROKER_UNREACHABLE, not redis's types) and sits below runtime/'s adapters"),
]


# engine/ is the bottom layer: of ziya_batch it may import only itself and errors.py. An allow-list, not a list
# of what is above it, so a new top-level module (spec.py, constraints.py once) cannot slip under the rule.
ENGINE_MAY_IMPORT = _pkg("engine", "errors")
ENGINE_RULE = "engine/ imports of ziya_batch only ziya_batch.engine.* and ziya_batch.errors"


def violations(graph: dict[str, set[str]]) -> set[tuple[str, str, str]]:
    found = set()
    for module, imported in graph.items():
        for target in imported:
            if _under(module, *_pkg("engine")) and _under(target, PACKAGE) and not _under(target, *ENGINE_MAY_IMPORT):
                found.add((module, target, ENGINE_RULE))
            for subjects, forbidden, rule in LAYER_RULES:
                if _under(module, *subjects) and _under(target, *forbidden):
                    found.add((module, target, rule))
            if _under(target, "ray") and not _under(module, *_pkg("runtime", "api")):
                found.add((module, target, "ray is imported only in runtime/ and api/"))
    return found


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_the_graph_resolves_relative_imports(graph):
    # the edges the rest relies on being seen: `from .status import`, `from .. import io, jobs`, lazy imports
    assert "ziya_batch.queue.status" in graph["ziya_batch.queue.broker"]
    assert {"ziya_batch.io", "ziya_batch.jobs"} <= graph["ziya_batch.api.openai_batch"]
    assert "ziya_batch.jobs" in graph["ziya_batch.work.worker"]
    assert "ray" in graph["ziya_batch.api.serve"] and "torch" in graph["ziya_batch.engine.model"]


def test_the_engine_rule_catches_any_module_above_it():
    # the import that once slipped through: engine/grammar.py -> ziya_batch.constraints (a top-level module)
    planted = {"ziya_batch.engine.grammar": {"ziya_batch.constraints", "ziya_batch.errors", "torch",
                                             "ziya_batch.engine.types"},
               "ziya_batch.engine.types": {"ziya_batch", "ziya_batch.spec"}}
    assert violations(planted) == {("ziya_batch.engine.grammar", "ziya_batch.constraints", ENGINE_RULE),
                                   ("ziya_batch.engine.types", "ziya_batch", ENGINE_RULE),
                                   ("ziya_batch.engine.types", "ziya_batch.spec", ENGINE_RULE)}


def test_cycle_finder_finds_a_planted_cycle():
    planted = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert cycles(planted) == [frozenset({"a", "b", "c"})]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles(graph):
    unexpected = [sorted(c) for c in cycles(graph) if c not in KNOWN_CYCLES]
    assert unexpected == [], "import cycles (move what both need into a lower module)"


def test_layers_hold(graph):
    broken = sorted((m, t, rule) for m, t, rule in violations(graph) if (m, t) not in KNOWN_LAYER_EXCEPTIONS)
    assert broken == [], "imports against the README's layers (Layout)"


def test_known_exceptions_are_still_needed(graph):
    seen = {(m, t) for m, t, _ in violations(graph)}
    assert sorted(set(KNOWN_LAYER_EXCEPTIONS) - seen) == []
    assert [sorted(c) for c in set(KNOWN_CYCLES) - set(cycles(graph))] == []


def test_protocols_module_imports_nothing_heavy(graph):
    # annotations only: protocols.py must stay importable without redis, ray or torch
    direct = graph["ziya_batch.protocols"]
    assert not any(_under(m, "redis", "ray", "torch") for m in direct)


def test_work_layer_may_not_import_redis():
    # the worker reaches Redis only through queue/: a planted `import redis` (even a lazy one) is a violation
    assert {rule for m, t, rule in violations({"ziya_batch.work.worker": {"redis"}})}
    assert violations({"ziya_batch.work.worker": {"ziya_batch.queue.errors"}}) == set()
