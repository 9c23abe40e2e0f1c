"""The note saying why a queued job waits is in every machine-readable status: `status --json` for one job and
for the list, GET /v1/jobs/{id} and GET /v1/jobs."""
from __future__ import annotations

import json

from api_support import AUTH, job_spec

from ziya_batch.runtime.status_view import show_status

NO_WORKER = "no live worker serves tensor_parallel 1 jobs"


def test_the_job_list_says_why_a_job_waits(api_env, capsys):
    data, models, make_client = api_env
    client = make_client()
    job_id = client.post("/v1/jobs", json=job_spec(data, models), headers=AUTH).json()["id"]
    broker = client.app.state.brokers.get()
    show_status(broker, None, as_json=True)
    [listed] = json.loads(capsys.readouterr().out)
    show_status(broker, job_id, as_json=True)
    one = json.loads(capsys.readouterr().out)
    assert listed["job_id"] == job_id and listed["note"].startswith(NO_WORKER) and listed["note"] == one["note"]
    [api_listed] = client.get("/v1/jobs", headers=AUTH).json()["jobs"]
    assert api_listed["note"] == client.get(f"/v1/jobs/{job_id}", headers=AUTH).json()["note"] == one["note"]
    # a job that no longer waits has none
    client.post(f"/v1/jobs/{job_id}/cancel", headers=AUTH)
    show_status(broker, None, as_json=True)
    [listed] = json.loads(capsys.readouterr().out)
    assert listed["state"] == "cancelled" and listed["note"] is None
    assert client.get("/v1/jobs", headers=AUTH).json()["jobs"][0]["note"] is None


def test_names_and_notes_print_as_written_not_as_rich_markup(api_env, capsys):
    """A job name is anyone's text (the HTTP API takes it): `[/bold]` in one broke every `status` listing, and
    `[draft]` vanished from it."""
    data, models, make_client = api_env
    client = make_client()
    name = "[/bold] oops [draft] [red]x"
    job_id = client.post("/v1/jobs", json=job_spec(data, models, name=name), headers=AUTH).json()["id"]
    broker = client.app.state.brokers.get()
    for which in (None, job_id):
        show_status(broker, which)
        out = " ".join(capsys.readouterr().out.split())
        assert name in out and NO_WORKER in out


def test_a_running_job_whose_workers_all_died_says_so(broker, make_spec, make_shards, expire, capsys):
    """Every worker of a running job gone (a `run` killed, its node lost) and nobody left to take its leases back:
    status showed it `running`, its dead workers as active and no note, for as long as nothing came. Its leases
    expired, no live worker serves it: every surface says so, the list too."""
    from ziya_batch.jobs import waiting_note

    spec = make_spec("orphan", lease_s=30.0)
    job_id = broker.submit(spec, make_shards(spec, 3)).job_id
    broker.register_worker("gone", "node-a", {"tensor_parallel": 1})
    held = [broker.claim("gone"), broker.claim("gone")]
    st = broker.status(job_id)
    assert st.state.value == "running" and st.shards["leased"] == 2 and waiting_note(broker, st) is None
    for lease in held:
        expire(broker, lease)               # its leases ran out, and no reaper runs
    broker.unregister_worker("gone")        # nor is it registered any more
    st = broker.status(job_id)
    note = waiting_note(broker, st)
    assert note is not None and NO_WORKER in note and "the 2 leased shard(s)" in note and "(gone)" in note
    # ...while one live worker's lease stands, nothing is said
    held2 = broker.claim("alive")
    assert held2 is not None and waiting_note(broker, broker.status(job_id)) is None
    expire(broker, held2)
    # the last shards leased, none pending: the same
    assert broker.status(job_id).shards["pending"] == 0 and NO_WORKER in waiting_note(broker, broker.status(job_id))
    show_status(broker, None)
    out = " ".join(capsys.readouterr().out.split())
    assert f"{job_id}: " in out and NO_WORKER in out
    show_status(broker, None, as_json=True)
    [listed] = json.loads(capsys.readouterr().out)
    assert NO_WORKER in listed["note"]
