"""Structured output (json_schema, regex, choice): every finished response satisfies its constraint, whatever the
weights (the random demo model), through the engine and through work/generation; bad constraints are one
invalid_sampling error line; OpenAI's response_format is honoured."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from ziya_batch import errors
from ziya_batch.tools.demo_model import write_demo_model
from ziya_batch.engine.engine import LLMEngine
from ziya_batch.engine.grammar import Grammars, apply_masks, grammar_of
from ziya_batch.engine.types import EngineConfig, Request, SamplingParams
from ziya_batch.errors import LineError, SpecError
from ziya_batch.prompts import parse_line
from ziya_batch.work.generation import build_parts, generate_lines, parse_shard
from ziya_batch.spec import SamplingSpec, parse_spec

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 12},
        "category": {"enum": ["travel", "food", "history"]},
        "rating": {"type": "integer", "minimum": 1, "maximum": 10},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 2},
        "ok": {"type": "boolean"},
    },
    "required": ["title", "category", "rating", "ok"],
    "additionalProperties": False,
}
REGEX = r"[0-9]{3}-[a-z]{2,5}( [A-Z][a-z]{0,6})?"
CHOICE = ("yes", "no way", "中文", 'a "quoted" \\ one')


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_demo_model(tmp_path_factory.mktemp("demo") / "model")


def make_engine(model_dir, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model_path=str(model_dir), device="cpu", max_num_seqs=16,
                                  max_num_batched_tokens=256, **kw))


def prompt_ids(eng, text="hello"):
    return eng.tokenizer(f"<human>:{text}\n<bot>:").input_ids


def check(kind, text):
    if kind == "json":
        jsonschema.validate(json.loads(text), SCHEMA)
    elif kind == "regex":
        assert re.fullmatch(REGEX, text), text
    else:
        assert text in CHOICE, text


def test_every_finished_response_satisfies_its_constraint_in_a_mixed_batch(model_dir):
    eng = make_engine(model_dir)
    ids = prompt_ids(eng)
    reqs, kinds = [], {}
    for i in range(2):
        for kind, params in (("json", dict(json_schema=json.dumps(SCHEMA))), ("regex", dict(regex=REGEX)),
                             ("choice", dict(choice=CHOICE)), ("free", {})):
            rid = f"{kind}{i}"
            kinds[rid] = kind
            reqs.append(Request(rid, ids, SamplingParams(max_new_tokens=90, n=3 if i else 1, seed=i, **params)))
    outs = eng.generate(reqs)
    seen_texts = set()
    for out in outs:
        kind = kinds[out.request_id]
        for c in out.completions:
            if kind == "free":
                continue
            assert c.finish_reason == "stop", (out.request_id, c.text)
            check(kind, c.text)
            assert len(c.logprobs) == len(c.token_ids) and all(lp <= 0 for lp in c.logprobs)
            assert eng.eos_ids[0] not in c.token_ids
            seen_texts.add(c.text)
    assert len(seen_texts) > 5            # the samples differ: each has its own matcher and noise
    assert not eng.has_unfinished() and not eng._grammars._matchers and not eng._grammars._of_request


def test_json_is_compact_by_default_and_flexible_on_request(model_dir):
    eng = make_engine(model_dir)
    ids = prompt_ids(eng)
    compact = eng.generate([Request(str(i), ids, SamplingParams(max_new_tokens=150, seed=i, json_schema=json.dumps(SCHEMA)))
                            for i in range(3)])
    for out in compact:
        text = out.completions[0].text
        assert text == json.dumps(json.loads(text), separators=(",", ":"), ensure_ascii=False)
    flexible = eng.generate([Request(f"f{i}", ids, SamplingParams(max_new_tokens=300, seed=i, json_whitespace="flexible",
                                                                   json_schema=json.dumps(SCHEMA)))
                             for i in range(3)])
    for out in flexible:
        c = out.completions[0]
        if c.finish_reason == "stop":
            jsonschema.validate(json.loads(c.text), SCHEMA)


def test_a_response_cut_by_max_new_tokens_says_length(model_dir):
    eng = make_engine(model_dir)
    out = eng.generate([Request("j", prompt_ids(eng), SamplingParams(max_new_tokens=3, json_schema=json.dumps(SCHEMA)))])
    c = out[0].completions[0]
    assert c.finish_reason == "length" and len(c.token_ids) == 3 and c.text.startswith('{"')


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_async_scheduling_gives_the_same_constrained_output_as_synchronous_steps(model_dir, temperature):
    def run(async_scheduling):
        eng = make_engine(model_dir, async_scheduling=async_scheduling)
        ids = prompt_ids(eng, "写一个 JSON")
        reqs = [Request(f"{i}", ids, SamplingParams(max_new_tokens=60, n=2, seed=i, temperature=temperature,
                                                    **({"json_schema": json.dumps(SCHEMA)} if i % 2 else {"regex": REGEX})))
                for i in range(3)] + [Request("free", ids, SamplingParams(max_new_tokens=20, seed=9))]
        return [(o.request_id, [(c.token_ids, c.finish_reason) for c in o.completions]) for o in eng.generate(reqs)]

    assert run(True) == run(False)


def test_seeded_constrained_samples_do_not_depend_on_the_batch(model_dir):
    eng = make_engine(model_dir)
    ids = prompt_ids(eng)
    p = SamplingParams(max_new_tokens=60, seed=5, choice=CHOICE + ("maybe", "perhaps not"))
    alone = eng.generate([Request("a", ids, p)])[0].completions[0].token_ids
    crowd = eng.generate([Request(f"x{i}", ids, SamplingParams(max_new_tokens=20, seed=i)) for i in range(5)]
                         + [Request("a", ids, p)])
    assert crowd[-1].completions[0].token_ids == alone


def test_preemption_and_recompute_keep_each_samples_matcher_in_step(model_dir):
    def run(**kw):
        eng = make_engine(model_dir, **kw)
        ids = prompt_ids(eng, "记录")
        outs = eng.generate([Request(str(i), ids, SamplingParams(max_new_tokens=90, n=2, seed=i,
                                                                 json_schema=json.dumps(SCHEMA))) for i in range(5)])
        return [[c.text for c in o.completions] for o in outs], eng.scheduler.num_preemptions

    roomy, _ = run()
    tight, preemptions = run(num_kv_blocks=14, admission_horizon_tokens=0)
    assert preemptions > 0 and tight == roomy
    for texts in tight:
        for text in texts:
            check("json", text)


def test_stop_strings_still_cut_a_constrained_response(model_dir):
    eng = make_engine(model_dir)
    out = eng.generate([Request("s", prompt_ids(eng), SamplingParams(max_new_tokens=80, seed=1, stop=('":',),
                                                                     json_schema=json.dumps(SCHEMA)))])
    c = out[0].completions[0]
    assert c.finish_reason == "stop" and c.text == '{"title'


def test_grammars_compile_off_the_step_and_each_distinct_one_once(model_dir, monkeypatch):
    import threading
    release, compiled = threading.Event(), []
    compile_ = Grammars._compile

    def slow(self, grammar):
        compiled.append(grammar)
        release.wait(60)
        return compile_(self, grammar)

    monkeypatch.setattr(Grammars, "_compile", slow)
    eng = make_engine(model_dir)
    ids = prompt_ids(eng)
    eng.add_request(Request("free", ids, SamplingParams(max_new_tokens=4, seed=1)))
    for i in range(3):
        eng.add_request(Request(f"c{i}", ids, SamplingParams(max_new_tokens=20, seed=i, choice=CHOICE)))
    done = []
    while eng.has_unfinished() and not done:
        done += eng.step()          # the unconstrained request runs while the grammar compiles
    assert [o.request_id for o in done] == ["free"] and len(eng._grammars.waiting) == 3
    release.set()
    while eng.has_unfinished():
        done += eng.step()
    assert sorted(o.request_id for o in done) == ["c0", "c1", "c2", "free"]
    assert len(compiled) == 1       # three requests, one grammar


def test_a_constraint_the_engine_cannot_compile_fails_only_its_request(model_dir):
    eng = make_engine(model_dir)
    ids = prompt_ids(eng)
    eng.add_request(Request("bad", ids, SamplingParams(max_new_tokens=5, json_schema=json.dumps({"type": "nope"}))))
    eng.add_request(Request("good", ids, SamplingParams(max_new_tokens=5, regex="[a-z]+")))
    with pytest.raises(ValueError, match="bad.*cannot be compiled.*nope"):
        while eng.has_unfinished():
            eng.step()
    done = []
    while eng.has_unfinished():
        done += eng.step()
    assert [o.request_id for o in done] == ["good"]


def test_masks_touch_only_the_constrained_rows_and_never_allow_ids_past_the_tokenizer(model_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    V = len(tok) + 40                     # a model vocab padded past the tokenizer's
    g = Grammars(tok, V, [2], pin_memory=False)
    from ziya_batch.engine.scheduler import Sequence
    p = SamplingParams(choice=("yes", "no"))
    seq = Sequence(0, "r", 0, [1, 5, 6], 3, p)
    g.add(seq, grammar_of(p))
    assert g.ready(block=True)[0] == [seq]
    plain = Sequence(1, "u", 0, [1, 5, 6], 3, SamplingParams())
    rows, bits = g.masks([plain, seq], pending_token=None)
    assert rows == [1]
    logits = torch.randn(2, V)
    masked = apply_masks(logits, torch.tensor(rows), bits)
    assert torch.equal(masked[0], logits[0])
    allowed = torch.isfinite(masked[1]).nonzero()[:, 0].tolist()
    assert allowed and max(allowed) < len(tok)
    assert all("yes".startswith(tok.decode([t])) or "no".startswith(tok.decode([t])) for t in allowed)
    assert 2 not in allowed               # EOS only once the grammar accepts


# ---- the spec, input lines and OpenAI's response_format ------------------------------------------------------
def test_spec_fields_validate_and_keep_old_job_ids():
    base = {"name": "t", "model": {"path": "m"}, "input": ["a.jsonl"], "output": {"path": "out"}}
    assert parse_spec(base).identity() == "9a00f24076b5f4c0"    # unchanged by the new (unset) fields
    with_schema = parse_spec({**base, "sampling": {"json_schema": SCHEMA}})
    assert with_schema.identity() != parse_spec(base).identity()
    with pytest.raises(SpecError, match="at most one of json_schema, regex and choice"):
        parse_spec({**base, "sampling": {"regex": "a", "choice": ["a"]}})
    with pytest.raises(SpecError, match=r"json_schema.*cannot be compiled.*uniqueItems"):
        parse_spec({**base, "sampling": {"json_schema": {"type": "array", "uniqueItems": True}}})
    with pytest.raises(SpecError, match="json_whitespace"):
        parse_spec({**base, "sampling": {"json_schema": SCHEMA, "json_whitespace": "loose"}})


def test_a_line_constraint_replaces_the_jobs_and_a_bad_one_is_invalid_sampling():
    job = SamplingSpec(json_schema=SCHEMA)
    line = parse_line(json.dumps({"prompt": "q", "sampling": {"regex": "[a-z]+"}}), "ziya", "f", 1, job)
    assert line.sampling.regex == "[a-z]+" and line.sampling.json_schema is None
    with pytest.raises(LineError) as err:
        parse_line(json.dumps({"prompt": "q", "sampling": {"regex": "(?<=a)b"}}), "ziya", "f", 2, job)
    assert err.value.code == errors.INVALID_SAMPLING and "look-around" in err.value.message
    assert "\n" not in err.value.message


def test_openai_response_format_maps_to_json_schema():
    def parse(fmt):
        body = {"messages": [{"role": "user", "content": "hi"}], "response_format": fmt}
        return parse_line(json.dumps({"custom_id": "c", "body": body}), "openai-batch", "f", 1, SamplingSpec()).sampling

    assert parse({"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}).json_schema == SCHEMA
    assert parse({"type": "json_object"}).json_schema == {"type": "object"}
    assert parse({"type": "text"}).json_schema is None
    for bad in ({"type": "grammar"}, {"type": "json_schema", "json_schema": {"name": "x"}}, "json"):
        with pytest.raises(LineError) as err:
            parse(bad)
        assert err.value.code == errors.INVALID_SAMPLING


def test_a_job_through_runtime_generation_writes_only_valid_records(model_dir):
    eng = make_engine(model_dir)
    spec = parse_spec({"name": "t", "model": {"path": str(model_dir)}, "input": ["a.jsonl"], "output": {"path": "o"},
                       "sampling": {"json_schema": SCHEMA, "max_new_tokens": 90, "n": 2, "seed": 3}})
    lines = [json.dumps({"id": "j1", "prompt": "描述西安"}),
             json.dumps({"id": "r1", "prompt": "code?", "sampling": {"regex": REGEX}}),
             json.dumps({"id": "c1", "prompt": "yes or no?", "sampling": {"choice": list(CHOICE), "n": 3}}),
             json.dumps({"id": "bad", "prompt": "x", "sampling": {"json_schema": {"type": "nope"}}}),
             json.dumps({"id": "j2", "messages": [{"role": "user", "content": "再来一个"}]})]
    work = parse_shard([(i + 1, ln.encode()) for i, ln in enumerate(lines)], "a.jsonl", spec, eng.tokenizer,
                       eng.max_model_len)
    assert [(f.id, f.code) for f in work.failures] == [("bad", errors.INVALID_SAMPLING)]
    results, failures = generate_lines(eng, work.prompts)
    assert not failures
    parts = build_parts(spec, results, work.failures)
    by_id = {}
    for rec in parts["results"]:
        by_id.setdefault(rec["id"], []).append(rec)
        assert rec["finish_reason"] == "stop"
        kind = {"j": "json", "r": "regex", "c": "choice"}[rec["id"][0]]
        check(kind, rec["response"])
    assert {k: len(v) for k, v in by_id.items()} == {"j1": 2, "r1": 2, "c1": 3, "j2": 2}
    assert [e["id"] for e in parts["errors"]] == ["bad"]


# ---- tensor parallel: rank 0 samples from the full logits, so constraints run there alone ------------------------
def _tp_worker(rank: int, world_size: int, init_file: str, model_dir: str, requests: list, result_file: str) -> None:
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from ziya_batch.tools.testing import load_sharded
    from ziya_batch.engine.tp import enable_tp_driver, serve_follower

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        model = load_sharded(model_dir, rank, world_size, torch.device("cpu"), torch.float32)
        eng = LLMEngine.from_model(model, AutoTokenizer.from_pretrained(model_dir),
                                   EngineConfig(model_path="", device="cpu", max_num_batched_tokens=256))
        if rank == 0:
            driver = enable_tp_driver(eng)
            outs = eng.generate([Request(rid, ids, SamplingParams(**p)) for rid, ids, p in requests])
            driver.stop()
            with open(result_file, "w") as fh:
                json.dump([[c.text for c in o.completions] for o in outs], fh)
        else:
            serve_follower(eng)
    finally:
        dist.destroy_process_group()


def test_tensor_parallel_2_gives_the_constrained_output_of_one_process(model_dir, tmp_path):
    import torch.multiprocessing as mp
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(model_dir))("<human>:记录\n<bot>:").input_ids
    reqs = [("j", ids, dict(max_new_tokens=60, temperature=0.0, json_schema=json.dumps(SCHEMA))),
            ("r", ids, dict(max_new_tokens=30, temperature=0.0, n=2, regex=REGEX)),
            ("c", ids, dict(max_new_tokens=10, temperature=0.0, choice=CHOICE)),
            ("u", ids, dict(max_new_tokens=8, temperature=0.0))]
    mp.spawn(_tp_worker, args=(2, str(tmp_path / "init"), str(model_dir), reqs, str(tmp_path / "out.json")),
             nprocs=2, join=True)
    two = json.loads((tmp_path / "out.json").read_text())
    eng = make_engine(model_dir)
    one = [[c.text for c in o.completions]
           for o in eng.generate([Request(rid, i, SamplingParams(**p)) for rid, i, p in reqs])]
    assert two == one
    for (rid, _, _), texts in zip(reqs[:3], two):
        for text in texts:
            check({"j": "json", "r": "regex", "c": "choice"}[rid], text)
