"""The HTTP API on a local Ray Serve, end to end: a job over /v1/jobs and a batch through the official
`openai` client, run by a Worker in this process on the demo model. One Serve app for the module."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import requests

from tests.processes import answers_ok, wait_for
from ziya_batch.api.settings import ApiSettings
from ziya_batch.queue import Broker, PrivateRedis
from ziya_batch.queue.server import free_port

pytestmark = pytest.mark.slow

TOKEN = "e2e-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def ray_private():
    """A Ray of this module's own: address="local" never joins a cluster another process started."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def api(tmp_path_factory, demo_model, ray_private):
    """(base URL, data dir, model dir, redis URL) of a Serve app on a private Redis."""
    from ray import serve

    from ziya_batch.api.serve import start_serve

    root = tmp_path_factory.mktemp("api-e2e")
    redis = PrivateRedis(root / "redis")
    redis_url = redis.start()
    data = root / "data"
    data.mkdir()
    settings = ApiSettings(token=TOKEN, allowed_prefixes=(str(data),), model=str(demo_model),
                           storage_url=str(root / "store"), batch_shard_size=2, batch_max_new_tokens=4)
    port = free_port()
    start_serve(settings, redis_url, "127.0.0.1", port)
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: answers_ok(f"{base}/healthz", timeout_s=2), 60, what="the Serve app to come up")
    yield base, data, Path(demo_model), redis_url
    serve.shutdown()
    redis.stop()


class _RunningWorker:
    """A queue Worker on the CPU in a thread of this process, for the duration of a `with` block."""

    def __init__(self, redis_url: str):
        from ziya_batch.work.worker import Worker

        self.stop = threading.Event()
        self.worker = Worker(Broker.from_url(redis_url), "api-e2e-worker", device="cpu")
        self.thread = threading.Thread(target=self.worker.serve_forever, args=(self.stop,), kwargs={"idle_sleep_s": 0.1},
                                       daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=60)


def _wait(fn, done, timeout_s: float = 180.0, every_s: float = 0.2):
    """Call fn until done(value); every distinct value seen, in order."""
    seen, deadline = [], time.monotonic() + timeout_s
    while True:
        value = fn()
        if not seen or seen[-1] != value:
            seen.append(value)
        if done(value):
            return seen
        assert time.monotonic() < deadline, f"timed out; seen {seen}"
        time.sleep(every_s)


def test_serve_guards_the_api(api):
    base, data, model, _ = api
    assert requests.get(f"{base}/healthz").json() == {"status": "ok", "redis": True}
    r = requests.get(f"{base}/v1/jobs")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert requests.get(f"{base}/metrics").status_code == 401
    spec = {"name": "x", "model": {"path": str(model)}, "input": ["/etc/passwd"], "output": {"path": str(data / "o")}}
    r = requests.post(f"{base}/v1/jobs", json=spec, headers=AUTH)
    assert r.status_code == 403 and "outside the allowed prefixes" in r.json()["error"]["message"]
    r = requests.post(f"{base}/v1/jobs", data=b"{oops", headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    assert requests.get(f"{base}/openapi.json").status_code == 401             # the schema is behind the token
    assert requests.get(f"{base}/openapi.json", headers=AUTH).json()["info"]["title"] == "ziya-batch"
    assert requests.get(f"{base}/docs").status_code == 401              # nothing but /healthz answers without it
    assert requests.get(f"{base}/docs", headers=AUTH).status_code == 404  # and FastAPI's pages are off
    # through Serve's proxy too: a body over the limit is refused while read, declared or streamed
    big = b'{"name": "' + b"x" * (2 * 2**20) + b'"}'
    r = requests.post(f"{base}/v1/jobs", data=big, headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 413 and "larger than" in r.json()["error"]["message"]
    r = requests.post(f"{base}/v1/jobs", data=iter([big[:2**20], big[2**20:]]),
                      headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 413 and "larger than" in r.json()["error"]["message"]
    spec.update(input=[str(data / "x.jsonl")], output={"path": f"file:{data}/o/../../escaped"})
    r = requests.post(f"{base}/v1/jobs", json=spec, headers=AUTH)
    assert r.status_code == 403 and "output.path" in r.json()["error"]["message"], r.text


def test_job_over_http(api):
    base, data, model, redis_url = api
    lines = [{"id": f"p{i}", "prompt": f"写一首诗 {i}"} for i in range(5)]
    (data / "job.jsonl").write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n{bad\n",
                                    encoding="utf-8")
    spec = {"name": "http-job", "model": {"path": str(model)}, "input": [str(data / "job.jsonl")],
            "sampling": {"max_new_tokens": 4, "n": 2, "seed": 1}, "output": {"path": str(data / "job-out")},
            "shard_size": 2}
    r = requests.post(f"{base}/v1/jobs", json=spec, headers=AUTH)
    assert r.status_code == 200, r.text
    job_id = r.json()["id"]
    assert job_id in [j["job_id"] for j in requests.get(f"{base}/v1/jobs", headers=AUTH).json()["jobs"]]
    with _RunningWorker(redis_url):
        _wait(lambda: requests.get(f"{base}/v1/jobs/{job_id}", headers=AUTH).json()["state"],
              lambda s: s in ("completed", "failed"))
    st = requests.get(f"{base}/v1/jobs/{job_id}", headers=AUTH).json()
    assert st["state"] == "completed" and st["prompts_done"] == 5 and st["prompts_failed"] == 1
    manifest = requests.get(f"{base}/v1/jobs/{job_id}/manifest", headers=AUTH).json()
    assert manifest["job_id"] == job_id and manifest["records"]["results"] == 10 and manifest["records"]["errors"] == 1
    metrics = requests.get(f"{base}/metrics", headers=AUTH).text
    assert f'ziya_batch_job_prompts_done_total{{job_id="{job_id}",name="http-job"}} 5.0' in metrics


def _batch_input(n: int, bad: bool = True) -> bytes:
    lines = [{"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "ziya", "messages": [{"role": "user", "content": f"你好 {i}"}], "max_tokens": 3}}
             for i in range(n)]
    if bad:
        lines.append({"custom_id": "req-bad", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "ziya"}})
    return ("\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n").encode("utf-8")


def test_openai_batch_round_trip_with_the_official_client(api):
    import openai

    base, _, _, redis_url = api
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=TOKEN, max_retries=0)
    upload = client.files.create(file=("requests.jsonl", _batch_input(5)), purpose="batch")
    assert upload.purpose == "batch" and upload.bytes == len(_batch_input(5))
    assert client.files.retrieve(upload.id).filename == "requests.jsonl"
    assert client.files.content(upload.id).content == _batch_input(5)
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"purpose": "e2e"})
    assert batch.status == "validating" and batch.metadata == {"purpose": "e2e"}
    with _RunningWorker(redis_url):
        seen = _wait(lambda: client.batches.retrieve(batch.id).status,
                     lambda s: s in ("completed", "failed", "expired", "cancelled"))
    assert seen[-1] == "completed" and seen[0] in ("validating", "in_progress"), seen
    assert set(seen) <= {"validating", "in_progress", "finalizing", "completed"}, seen
    done = client.batches.retrieve(batch.id)
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (6, 5, 1)
    assert done.completed_at >= done.in_progress_at >= done.created_at
    out = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    assert sorted(x["custom_id"] for x in out) == [f"req-{i}" for i in range(5)]
    assert all(x["response"]["status_code"] == 200 and x["error"] is None for x in out)
    assert all(x["response"]["body"]["object"] == "chat.completion" for x in out)
    errors = [json.loads(x) for x in client.files.content(done.error_file_id).text.splitlines()]
    assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [("req-bad", "missing_prompt")]
    assert "file" not in errors[0]["error"]               # the server's storage paths stay private
    assert batch.id in [b.id for b in client.batches.list()]


def test_openai_batch_cancel(api):
    import openai

    base, _, _, _ = api
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=TOKEN, max_retries=0)
    upload = client.files.create(file=("c.jsonl", _batch_input(4, bad=False)), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    cancelled = client.batches.cancel(batch.id)            # no worker runs: nothing is leased
    assert cancelled.status in ("cancelling", "cancelled")
    _wait(lambda: client.batches.retrieve(batch.id).status, lambda s: s != "cancelling", timeout_s=30)
    final = client.batches.retrieve(batch.id)
    assert final.status == "cancelled" and final.cancelled_at is not None
    assert final.request_counts.completed == 0 and final.output_file_id is None
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_doesnotexist")
    with pytest.raises(openai.UnprocessableEntityError, match="'endpoint'"):
        client.batches.create(input_file_id=upload.id, endpoint="/v1/embeddings", completion_window="24h")
    with pytest.raises(openai.BadRequestError, match="purpose 'batch'"):
        client.files.create(file=("x.jsonl", b"{}"), purpose="fine-tune")
