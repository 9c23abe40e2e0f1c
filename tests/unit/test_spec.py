import json
import subprocess
import sys

import pytest

from ziya_batch.errors import SpecError
from ziya_batch.spec import JobSpec, load_spec, parse_spec

BASE = {"name": "t", "model": {"path": "m"}, "input": ["a.jsonl"], "output": {"path": "out"}}


def test_defaults_are_the_model_cards():
    s = parse_spec(BASE)
    assert (s.sampling.top_p, s.sampling.temperature, s.sampling.repetition_penalty) == (0.85, 1.0, 1.0)
    assert s.sampling.max_new_tokens == 1024 and s.sampling.n == 1 and s.shard_size == 512
    assert s.output.records == ["results", "sft", "experience"]
    assert s.model.replicas == "auto" and s.model.tensor_parallel == 1 and not s.model.trust_remote_code


def test_unknown_key_suggests_closest():
    with pytest.raises(SpecError, match=r"unknown key 'sampling.temprature' \(did you mean 'temperature'\?\)"):
        parse_spec({**BASE, "sampling": {"temprature": 0.5}})
    with pytest.raises(SpecError, match=r"unknown key 'shardsize' \(did you mean 'shard_size'\?\)"):
        parse_spec({**BASE, "shardsize": 3})


def test_ranges_and_types_name_the_field():
    with pytest.raises(SpecError, match=r"'sampling.top_p'.*less than or equal to 1"):
        parse_spec({**BASE, "sampling": {"top_p": 1.5}})
    with pytest.raises(SpecError, match=r"'model.tensor_parallel'"):
        parse_spec({**BASE, "model": {"path": "m", "tensor_parallel": "two"}})
    with pytest.raises(SpecError, match=r"missing required key 'output'"):
        parse_spec({k: v for k, v in BASE.items() if k != "output"})


def test_model_path_or_base_and_delta():
    assert parse_spec({**BASE, "model": {"base": "b", "delta": "d"}}).model.path is None
    with pytest.raises(SpecError, match="either path, or base and delta"):
        parse_spec({**BASE, "model": {"path": "m", "base": "b", "delta": "d"}})
    with pytest.raises(SpecError, match="give path"):
        parse_spec({**BASE, "model": {"base": "b"}})


def test_line_sampling_override_validates():
    s = parse_spec(BASE).sampling
    assert s.merged({"temperature": 0}).temperature == 0
    with pytest.raises(Exception):
        s.merged({"temperature": -1})


def test_identity_is_stable_and_depends_on_output(tmp_path):
    a, b = parse_spec(BASE), parse_spec(json.loads(json.dumps(BASE)))
    assert a.identity() == b.identity()
    assert parse_spec({**BASE, "output": {"path": "other"}}).identity() != a.identity()


def test_identity_of_a_spec_is_the_same_from_version_to_version():
    """The id hashes every field that decides the output, defaults included: a new such field or a changed
    default gives every spec that does not set it a new id, and an unfinished job then no longer resumes from
    the same spec after an upgrade (unless submit adopts the old id, as it does for legacy_identity). If this
    value must change, say so where upgrades are described. Changed again 2026-11-29: the id stopped hashing
    RUN_FIELDS (legacy_identity is the id before, which jobs/submit.py still resumes)."""
    assert parse_spec(BASE).identity() == "9a00f24076b5f4c0"
    assert parse_spec(BASE).legacy_identity() == "5cb10aec0f187c5d"        # BASE's id until RUN_FIELDS left it
    fcfs = {**BASE, "engine": {"schedule": "fcfs"}}
    assert parse_spec(fcfs).legacy_identity() == "cf0de894cb73a90a"        # ... and until 2026-11-29


@pytest.mark.parametrize("section,name,value", [
    ("model", "tensor_parallel", 2), ("model", "replicas", 3), ("engine", "max_num_seqs", 64),
    ("engine", "max_num_batched_tokens", 512), ("engine", "block_size", 32), ("engine", "gpu_memory_fraction", 0.5),
    ("engine", "cuda_graphs", False), ("engine", "schedule", "fcfs"), ("reliability", "lease_s", 10.0),
    ("reliability", "max_retries", 9), (None, "priority", 7)])
def test_settings_of_how_a_job_runs_keep_its_identity(section, name, value):
    """A resubmit after an out-of-memory with a lower gpu_memory_fraction, or on tensor_parallel 2, is the same
    job; every field of RUN_FIELDS is tried, and each of them does change the legacy id (every field)."""
    from ziya_batch.spec import RUN_FIELDS

    assert ((section, name) if section else (name,)) in RUN_FIELDS
    changed = {**BASE, **({section: {name: value}} if section else {name: value})}
    if section == "model":
        changed[section] = {**BASE["model"], name: value}
    assert parse_spec(changed).identity() == parse_spec(BASE).identity()
    assert parse_spec(changed).legacy_identity() != parse_spec(BASE).legacy_identity()


def test_adaptive_step_size_is_a_setting_of_how_a_job_runs_and_reaches_the_engine():
    from ziya_batch.spec import RUN_FIELDS, engine_config
    assert ("engine", "adaptive_step_size") in RUN_FIELDS
    off = parse_spec({**BASE, "engine": {"adaptive_step_size": False}})
    # a job started before the key existed (legacy id: it was not hashed then) or with it on resumes with it off
    assert (off.identity(), off.legacy_identity()) == (parse_spec(BASE).identity(), parse_spec(BASE).legacy_identity())
    assert engine_config(off, "m", "cpu").adaptive_step_size is False
    assert engine_config(parse_spec(BASE), "m", "cpu").adaptive_step_size is True
    with pytest.raises(SpecError, match="adaptive_step_size"):
        parse_spec({**BASE, "engine": {"adaptive_step_size": "sometimes"}})


def test_fp8_fast_accumulation_needs_fp8_weights_and_reaches_the_engine():
    with pytest.raises(SpecError, match=r"engine.fp8_fast_accum applies to FP8 weights: set model.quantization: fp8"):
        parse_spec({**BASE, "engine": {"fp8_fast_accum": True}})
    spec = parse_spec({**BASE, "model": {"path": "m", "quantization": "fp8"}, "engine": {"fp8_fast_accum": True}})
    from ziya_batch.spec import engine_config
    assert engine_config(spec, "m", "cpu").fp8_fast_accum is True
    assert engine_config(parse_spec(BASE), "m", "cpu").fp8_fast_accum is False
    # left at its default, the key does not change a job's id (jobs submitted before it existed resume)
    fp8 = {**BASE, "model": {"path": "m", "quantization": "fp8"}}
    assert parse_spec({**fp8, "engine": {"fp8_fast_accum": False}}).identity() == parse_spec(fp8).identity()
    # on, it changes outputs slightly: another job (like kv_cache_dtype), not a setting of how it runs
    assert parse_spec({**fp8, "engine": {"fp8_fast_accum": True}}).identity() != parse_spec(fp8).identity()


def test_more_samples_than_the_batch_has_seats_is_refused():
    with pytest.raises(SpecError, match=r"sampling.n \(8\) exceeds engine.max_num_seqs \(4\)"):
        parse_spec({**BASE, "sampling": {"n": 8}, "engine": {"max_num_seqs": 4}})
    assert parse_spec({**BASE, "sampling": {"n": 4}, "engine": {"max_num_seqs": 4}}).sampling.n == 4


@pytest.mark.parametrize("change", [
    {"name": "u"}, {"model": {"path": "m2"}}, {"model": {"path": "m", "dtype": "bfloat16"}}, {"input": ["b.jsonl"]},
    {"sampling": {"temperature": 0.5}}, {"sampling": {"seed": 3}}, {"output": {"path": "out", "format": "parquet"}},
    {"engine": {"kv_cache_dtype": "fp8"}}, {"shard_size": 100}, {"experience": {"logprobs": False}},
    {"format": "openai-batch"}])
def test_what_decides_a_jobs_output_changes_its_identity(change):
    assert parse_spec({**BASE, **change}).identity() != parse_spec(BASE).identity()


def test_yaml_and_json_files(tmp_path):
    y = tmp_path / "j.yaml"
    y.write_text("name: x\nmodel: {path: m}\ninput: a.jsonl\noutput: {path: o}\n")
    j = tmp_path / "j.json"
    j.write_text(json.dumps(BASE))
    assert load_spec(y).input == ["a.jsonl"]
    assert isinstance(load_spec(j), JobSpec)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad)
    with pytest.raises(SpecError, match="no such job spec file"):
        load_spec(tmp_path / "missing.yaml")


def test_cli_spec_error_is_one_line_exit_2(tmp_path):
    y = tmp_path / "j.yaml"
    y.write_text("name: x\nmodel: {path: m, dtyp: float16}\ninput: a.jsonl\noutput: {path: o}\n")
    r = subprocess.run([sys.executable, "-m", "ziya_batch.cli", "submit", str(y), "--redis-url", "redis://127.0.0.1:1/0"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0, r.stderr
    assert "did you mean 'dtype'" in r.stderr and "Traceback" not in r.stderr
