"""The README against the code: the job spec reference has every spec key with its default, Troubleshooting
every error class with its exit code and every line error code. A field added to spec.py without its row (or
a default changed in one place only) fails here."""
from __future__ import annotations

import json
import re
from pathlib import Path

from pydantic import BaseModel

from ziya_batch import errors
from ziya_batch.spec import JobSpec

README = Path(__file__).resolve().parents[2] / "README.md"


def _section(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else len(text)]


def _rows(section: str) -> dict[str, list[str]]:
    """For the rows of the markdown tables in `section` whose first cell starts with `key`: key -> [the rest
    of the first cell, then the other cells]."""
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\| `([^`]+)`([^|]*)\|(.*)\|\s*$", line)
        if m:
            rows[m.group(1)] = [m.group(2).strip()] + [c.strip() for c in m.group(3).split(" | ")]
    return rows


def _leaves(model: type[BaseModel], prefix: str = ""):
    """(dotted key, default as the README writes it) for every leaf field of the spec."""
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from _leaves(field.annotation, f"{prefix}{name}.")
        elif field.is_required():
            yield prefix + name, "required"
        else:
            default = field.default_factory() if field.default_factory else field.default
            yield prefix + name, f"`{json.dumps(default, ensure_ascii=False)}`"


def test_spec_reference_names_every_key_with_its_default():
    rows = _rows(_section("Job spec reference"))
    expected = dict(_leaves(JobSpec))
    assert set(rows) == set(expected), (sorted(set(expected) - set(rows)), sorted(set(rows) - set(expected)))
    for key, default in expected.items():
        assert rows[key][2] == default, (key, rows[key][2], default)


def test_troubleshooting_explains_every_error_class_with_its_exit_code():
    """Every ZiyaBatchError subclass in the package has its row (found in the source, so a module that moves
    is still found); the exit code in the rows of errors.py's classes is the class's."""
    parents = {}
    for path in Path(errors.__file__).parent.rglob("*.py"):
        for name, base in re.findall(r"^class (\w+)\((?:\w+\.)?(\w+)\)", path.read_text(encoding="utf-8"), re.M):
            parents[name] = base
    user_errors, grew = {"ZiyaBatchError"}, True
    while grew:
        more = {name for name, base in parents.items() if base in user_errors} - user_errors
        user_errors |= more
        grew = bool(more)
    rows = _rows(_section("Troubleshooting"))
    missing = user_errors - {"ZiyaBatchError"} - set(rows)
    assert not missing, sorted(missing)
    assert len(user_errors) >= 9
    for name in user_errors & set(vars(errors)) - {"ZiyaBatchError"}:
        assert rows[name][0].startswith(f"({getattr(errors, name).exit_code}, "), (name, rows[name][0])


def test_troubleshooting_explains_every_line_error_code():
    codes = {v for k, v in vars(errors).items() if k.isupper() and isinstance(v, str)}
    assert len(codes) >= 7
    missing = codes - set(_rows(_section("Troubleshooting")))
    assert not missing, missing
