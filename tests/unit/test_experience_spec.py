"""The experience spec fields of issue 20: logprobs_mode, rewards, top_logprobs, group filtering; job ids of
specs that leave them at their defaults are unchanged; a job stored before logprobs_mode keeps processed."""
import pytest

from ziya_batch.api.access import AccessDenied, check_job
from ziya_batch.api.settings import ApiSettings
from ziya_batch.errors import SpecError
from ziya_batch.spec import parse_spec, stored_spec

BASE = {"name": "t", "model": {"path": "m"}, "input": ["a.jsonl"], "output": {"path": "out"}}


def with_exp(**exp):
    return {**BASE, "experience": exp}


def test_defaults_are_materialised_and_keep_the_pinned_id():
    spec = parse_spec(BASE)
    assert spec.experience.logprobs_mode == "temperature"
    assert '"logprobs_mode": "temperature"' in spec.to_json()          # the stored spec names the mode
    assert spec.identity() == "9a00f24076b5f4c0"                       # tests/unit/test_spec.py pins it too
    assert parse_spec(with_exp(logprobs_mode="temperature", top_logprobs=0, reward_weights={})).identity() == \
        spec.identity()


@pytest.mark.parametrize("exp", [{"logprobs_mode": "raw"}, {"logprobs_mode": "processed"}, {"top_logprobs": 5},
                                 {"reward_function": "math_answer"}, {"reward_url": "http://j/"},
                                 {"reward_model": "rm", "reward_weights": {"model": 2.0}}])
def test_fields_that_change_the_output_change_the_id(exp):
    assert parse_spec(with_exp(**exp)).identity() != parse_spec(BASE).identity()


def test_dropping_constant_groups_needs_a_reward_and_changes_the_id():
    drop = {**BASE, "output": {"path": "out", "filters": {"drop_constant_reward_groups": True}}}
    with pytest.raises(SpecError, match="needs a reward"):
        parse_spec(drop)
    spec = parse_spec({**drop, "experience": {"reward_function": "exact_match"}})
    assert spec.identity() != parse_spec(with_exp(reward_function="exact_match")).identity()


@pytest.mark.parametrize("exp,msg", [
    ({"logprobs_mode": "processed", "reference_model": "r"}, "cannot be used with a reference_model"),
    ({"logprobs_mode": "softmax"}, "logprobs_mode"),
    ({"top_logprobs": 21}, "top_logprobs"),
    ({"reward_function": "no_colon_here"}, "built-in"),
    ({"reward_url": "file:///etc/passwd"}, "http"),
    ({"reward_function": "math_answer", "reward_weights": {"math": 1.0}}, "not a configured reward"),
])
def test_invalid_experience_settings_are_one_line_errors(exp, msg):
    with pytest.raises(SpecError, match=msg) as err:
        parse_spec(with_exp(**exp))
    assert "\n" not in str(err.value)


def test_a_spec_stored_before_logprobs_mode_resumes_in_processed_mode():
    old = parse_spec(BASE).model_dump(mode="json")
    del old["experience"]["logprobs_mode"]
    assert stored_spec(old).experience.logprobs_mode == "processed"
    old["experience"]["reference_model"] = "ref"          # processed is refused with a reference: temperature
    assert stored_spec(old).experience.logprobs_mode == "temperature"
    assert stored_spec(parse_spec(with_exp(logprobs_mode="raw")).model_dump(mode="json")).experience.logprobs_mode \
        == "raw"


def _settings(**kw):
    return ApiSettings(token="t" * 16, allowed_prefixes=("/data/",), model="/models/m", **kw)


def _api_spec(stored: bool = False, **exp):
    return parse_spec({**BASE, "model": {"path": "/models/m"}, "input": ["/data/a.jsonl"],
                       "output": {"path": "/data/out"}, "experience": exp}, stored=stored)


def test_api_accepts_builtins_and_listed_functions_and_urls_only():
    check_job(_api_spec(reward_function="math_answer"), _settings())
    check_job(_api_spec(reward_function="ziya_batch.rewards:json_schema"), _settings())
    with pytest.raises(AccessDenied, match="ZIYA_BATCH_ALLOWED_REWARD_FUNCTIONS"):
        check_job(_api_spec(reward_function="/tmp/evil.py:f"), _settings())
    check_job(_api_spec(reward_function="pkg.mod:f"), _settings(allowed_reward_functions=("pkg.mod:f",)))
    with pytest.raises(AccessDenied, match="ZIYA_BATCH_ALLOWED_REWARD_URLS"):
        check_job(_api_spec(reward_url="http://169.254.169.254/latest"), _settings())
    ok = _settings(allowed_reward_urls=("http://judge:8000",))
    check_job(_api_spec(reward_url="http://judge:8000/score"), ok)
    # a user part is refused by the spec itself since 2026-12-07; one of a job stored before by the API's check
    with pytest.raises(SpecError, match="no user or password"):
        _api_spec(reward_url="http://judge:8000@evil.example/")
    with pytest.raises(AccessDenied):
        check_job(_api_spec(stored=True, reward_url="http://judge:8000@evil.example/"), ok)
    # what a server or another parser could read as somewhere else than the allowed prefix
    under = _settings(allowed_reward_urls=("http://judge:8000/score",))
    check_job(_api_spec(reward_url="http://judge:8000/score/v2?x=1"), under)
    check_job(_api_spec(reward_url="http://JUDGE:8000/score"), under)
    for bad in ("http://judge:8000/score/../admin", "http://judge:8000/score/%2e%2e/admin",
                "http://judge:8000/score/%2E%2E/admin", "http://judge:8000/score\\..\\admin",
                "http://judge:8000/scores", "http://u:p@judge:8000/score", "http://judge:8001/score",
                "https://judge:8000/score", "http://judge.evil:8000/score", "http://judge:8000/score/./x"):
        with pytest.raises(AccessDenied, match="ZIYA_BATCH_ALLOWED_REWARD_URLS"):
            check_job(_api_spec(stored=True, reward_url=bad), under)
    keyed = _settings(allowed_reward_urls=("http://judge:8000/score?key=1",))
    check_job(_api_spec(reward_url="http://judge:8000/score?key=1"), keyed)
    with pytest.raises(AccessDenied, match="ZIYA_BATCH_ALLOWED_REWARD_URLS"):
        check_job(_api_spec(reward_url="http://judge:8000/score?key=2"), keyed)
    # a built-in only by its own name: anything else after the module is not one
    for ref in ("ziya_batch.rewards:x:exact_match", "ziya_batch.rewards:os:exact_match"):
        with pytest.raises(AccessDenied, match="ZIYA_BATCH_ALLOWED_REWARD_FUNCTIONS"):
            check_job(_api_spec(reward_function=ref), _settings())


def test_a_relative_file_in_the_allow_list_matches_the_job_as_stored(tmp_path, monkeypatch):
    """The server stores a job's 'file.py:f' with the file's absolute path from its own directory before it
    checks it: a relative entry of the allow-list means the same file."""
    from ziya_batch.jobs.submit import absolute_locations

    monkeypatch.chdir(tmp_path)
    listed = _settings(allowed_reward_functions=("rw/score.py:check",))
    check_job(absolute_locations(_api_spec(reward_function="rw/score.py:check")), listed)
    check_job(_api_spec(reward_function=f"{tmp_path}/rw/score.py:check"), listed)
    for other in ("rw/score.py:other", "score.py:check", "/elsewhere/rw/score.py:check"):
        with pytest.raises(AccessDenied, match="ZIYA_BATCH_ALLOWED_REWARD_FUNCTIONS"):
            check_job(absolute_locations(_api_spec(reward_function=other)), listed)


def test_api_settings_read_the_allow_lists_from_the_environment(monkeypatch):
    monkeypatch.setenv("ZIYA_BATCH_API_TOKEN", "x" * 16)
    monkeypatch.setenv("ZIYA_BATCH_ALLOWED_REWARD_FUNCTIONS", "a.b:c, d.py:e")
    monkeypatch.setenv("ZIYA_BATCH_ALLOWED_REWARD_URLS", "https://j/")
    s = ApiSettings.from_env(storage="/tmp/x")
    assert s.allowed_reward_functions == ("a.b:c", "d.py:e") and s.allowed_reward_urls == ("https://j/",)


def test_a_reward_function_file_is_made_absolute_at_submit(tmp_path, monkeypatch):
    """Workers run in other directories: 'file.py:function' is stored with the file's absolute path, a module
    reference as given."""
    import os

    from ziya_batch.jobs.submit import absolute_locations
    from ziya_batch.spec import parse_spec

    monkeypatch.chdir(tmp_path)
    base = {"name": "t", "model": {"path": "/m"}, "input": ["/in.jsonl"], "output": {"path": "/out"}}
    spec = absolute_locations(parse_spec({**base, "experience": {"reward_function": "rw/score.py:check"}}))
    assert spec.experience.reward_function == f"{os.path.join(str(tmp_path), 'rw', 'score.py')}:check"
    spec = absolute_locations(parse_spec({**base, "experience": {"reward_function": "my_pkg.scoring:check"}}))
    assert spec.experience.reward_function == "my_pkg.scoring:check"


def test_filters_that_would_keep_no_sft_record_are_refused():
    """min_reward without a reward drops every sample (none has one); a minimum length above the maximum keeps
    none: both are a mistake, said at submit rather than found in an empty sft/."""
    with pytest.raises(SpecError, match="min_reward needs a reward"):
        parse_spec({**BASE, "output": {"path": "out", "filters": {"min_reward": 0.0}}})
    parse_spec({**BASE, "output": {"path": "out", "filters": {"min_reward": 0.0}},
                "experience": {"reward_function": "exact_match"}})
    with pytest.raises(SpecError, match="min_response_tokens \\(10\\) is above max_response_tokens \\(5\\)"):
        parse_spec({**BASE, "output": {"path": "out", "filters": {"min_response_tokens": 10, "max_response_tokens": 5}}})
    parse_spec({**BASE, "output": {"path": "out", "filters": {"min_response_tokens": 5, "max_response_tokens": 5}}})


def test_a_job_queued_before_those_checks_is_still_read_back():
    """A stored spec (Redis, a manifest) is read with the checks its release made: workers, finalize and report of
    a job an earlier release queued with such filters must still read it."""
    from ziya_batch.spec import stored_spec

    for filters in ({"min_reward": 0.0}, {"min_response_tokens": 10, "max_response_tokens": 5}):
        data = {**BASE, "output": {"path": "out", "filters": filters}}
        with pytest.raises(SpecError):
            parse_spec(data)
        assert stored_spec(data).output.filters.model_dump(exclude_defaults=True) == filters
    with pytest.raises(SpecError, match="drop_constant_reward_groups needs a reward"):     # as it always was
        stored_spec({**BASE, "output": {"path": "out", "filters": {"drop_constant_reward_groups": True}}})


@pytest.mark.parametrize("logprobs", [True, False])
def test_experience_logprobs_false_writes_no_logprobs_and_no_kl_made_of_them(line_result, logprobs):
    """kl is logprobs - ref_logprobs (k3 is made of the same two): with `experience.logprobs: false` the records
    held a null `logprobs` beside the kl lists, from which `logprobs` were recovered exactly (kl + ref_logprobs),
    and which no check of kl against logprobs could read. ref_logprobs stay: the reference model was asked for."""
    from ziya_batch.work.generation import build_parts

    spec = parse_spec({**BASE, "output": {"path": "out", "records": ["results", "experience"]},
                       "experience": {"logprobs": logprobs, "reference_model": "ref"}})
    records = build_parts(spec, [line_result(1, ref=True)], [])["experience"]
    assert len(records) == 2
    for rec in records:
        n = rec["response_length"]
        assert rec["ref_logprobs"] is not None and len(rec["ref_logprobs"]) == n
        if logprobs:
            assert len(rec["logprobs"]) == len(rec["kl"]) == len(rec["kl_k3"]) == n
            assert rec["kl"] == [lp - rp for lp, rp in zip(rec["logprobs"], rec["ref_logprobs"])]
        else:
            assert rec["logprobs"] is None and rec["kl"] is None and rec["kl_k3"] is None
