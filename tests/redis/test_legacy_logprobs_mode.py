"""A job stored before experience.logprobs_mode existed ran with processed logprobs: read back, and submitted
again with its old spec (same id), it keeps that mode so its parts stay consistent."""
import json

from ziya_batch.jobs import submit_job
from ziya_batch.spec import parse_spec


def test_an_old_stored_spec_keeps_processed_mode_through_a_resubmit(broker, tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": str(i), "prompt": "q"}) + "\n" for i in range(4)))
    spec = parse_spec({"name": "old", "model": {"path": "m"}, "input": [str(inp)],
                       "output": {"path": str(tmp_path / "out")}, "shard_size": 2})
    job_id = submit_job(spec, broker).job_id
    # what an earlier release stored: the spec without the key
    old = json.loads(broker.client.get(broker.keys.spec(job_id)))
    del old["experience"]["logprobs_mode"]
    broker.client.set(broker.keys.spec(job_id), json.dumps(old))
    assert broker.get_spec(job_id).experience.logprobs_mode == "processed"
    again = submit_job(spec, broker)                      # the old YAML: default temperature, same job id
    assert again.job_id == job_id
    assert broker.get_spec(job_id).experience.logprobs_mode == "processed"
    # a new job of the same shape starts in the default mode
    fresh = parse_spec({**spec.model_dump(mode="json"), "output": {"path": str(tmp_path / "out2")}})
    assert broker.get_spec(submit_job(fresh, broker).job_id).experience.logprobs_mode == "temperature"
