"""A job id is looked up in the jobs index, not as whatever key it spells: '<id>:spec', '<id>:shards' and the
like name the keys of the job before the colon, and reading them as a job hash gave a 500 (WRONGTYPE) over HTTP and
a traceback on the CLI. Over HTTP, an output folder linked out of the allowed prefixes is refused at submit."""
import pytest
from api_support import AUTH, job_spec

from ziya_batch import cli
from ziya_batch.errors import JobNotFound
from ziya_batch.jobs import cancel_job, job_status

SUFFIXES = (":spec", ":files", ":pending", ":shards", ":dead", ":errors", ":progress", ":leased")


def test_an_id_naming_one_of_a_jobs_keys_is_no_job(broker, make_spec, make_shards, monkeypatch, capsys):
    job_id = broker.submit(make_spec(), make_shards(make_spec(), 3)).job_id
    broker.fail(broker.claim("w"), "boom")                   # errors and progress keys exist too
    for suffix in SUFFIXES:
        assert broker.find_job(job_id + suffix) is None
        with pytest.raises(JobNotFound):
            job_status(broker, job_id + suffix)
        with pytest.raises(JobNotFound):
            cancel_job(broker, job_id + suffix)
    monkeypatch.setattr(cli, "_broker", lambda url: broker)
    for argv in (["status", job_id + ":spec"], ["cancel", job_id + ":shards"]):
        with pytest.raises(SystemExit) as ex:
            cli.main(argv)
        assert ex.value.code == JobNotFound.exit_code
        assert capsys.readouterr().err.startswith("ziya-batch: error: no job")
    assert job_status(broker, job_id).job_id == job_id


def test_http_answers_404_for_them(api_env):
    data, models, make_client = api_env
    client = make_client()
    job_id = client.post("/v1/jobs", json=job_spec(data, models), headers=AUTH).json()["id"]
    for suffix in SUFFIXES:
        for method, path in (("GET", ""), ("GET", "/manifest"), ("POST", "/cancel")):
            r = client.request(method, f"/v1/jobs/{job_id}{suffix}{path}", headers=AUTH)
            assert r.status_code == 404, (suffix, path, r.text)
    assert client.get(f"/v1/jobs/{job_id}", headers=AUTH).status_code == 200


def test_http_refuses_an_output_folder_linked_out_of_the_prefixes(api_env, tmp_path):
    data, models, make_client = api_env
    outside = tmp_path / "outside"
    outside.mkdir()
    spec = job_spec(data, models)
    out = data / "linked"
    out.mkdir()
    (out / "results").symlink_to(outside)
    spec["output"] = {"path": str(out)}
    r = make_client().post("/v1/jobs", json=spec, headers=AUTH)
    assert r.status_code in (400, 422) and "symbolic link" in r.json()["error"]["message"], r.text
    assert list(outside.iterdir()) == []
