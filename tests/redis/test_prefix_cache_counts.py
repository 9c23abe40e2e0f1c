"""Prefix-cache counters of committed shards: summed in the job hash, shown by status, summed in the manifest."""
import json
from types import SimpleNamespace

from ziya_batch.queue import ShardStats
from ziya_batch.jobs.finalize import _summary


def test_committed_prefix_cache_counts_add_up_in_status(broker, make_spec, make_shards):
    spec = make_spec()
    job_id = broker.submit(spec, make_shards(spec, 3)).job_id
    assert broker.status(job_id).to_dict()["prefix_cache_hit_rate"] is None       # nothing looked up yet
    a, b = broker.claim("w"), broker.claim("w")
    assert broker.commit(a, ShardStats(prompts_done=10, prefix_cache_query_tokens=1000, prefix_cache_hit_tokens=600))
    assert broker.commit(b, ShardStats(prompts_done=10, prefix_cache_query_tokens=3000, prefix_cache_hit_tokens=2400))
    d = json.loads(json.dumps(broker.status(job_id).to_dict()))
    assert (d["prefix_cache_query_tokens"], d["prefix_cache_hit_tokens"]) == (4000, 3000)
    assert d["prefix_cache_hit_rate"] == 0.75
    assert broker.commits(job_id)[b.shard.index][1].prefix_cache_hit_tokens == 2400    # the stats round-trip


def test_manifest_summary_sums_the_markers_counts_and_reads_old_markers_as_zero():
    status = SimpleNamespace(job_id="j", state=SimpleNamespace(value="finalizing"), shards_total=3)

    def marker(stats):
        return SimpleNamespace(prompts_done=1, prompts_failed=0, samples=1, output_tokens=5, stats=stats)
    markers = {0: marker({"prefix_cache_query_tokens": 100, "prefix_cache_hit_tokens": 64}),
               1: marker({"prefix_cache_query_tokens": 50, "prefix_cache_hit_tokens": 48}), 2: marker({})}
    s = _summary(status, markers)
    assert (s["prefix_cache_query_tokens"], s["prefix_cache_hit_tokens"]) == (150, 112)


def test_a_templated_job_reuses_its_shared_prefix_across_shards_and_reports_it(tmp_path, demo_model, broker):
    from ziya_batch import io
    from ziya_batch.queue import JobState
    from ziya_batch.jobs.submit import submit_job
    from ziya_batch.work.worker import Worker
    from ziya_batch.spec import parse_spec

    template = "You are a careful travel guide. " * 12 + "Answer in one sentence. Question: "
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"{template}where is place {i}?"}) + "\n"
                           for i in range(24)))
    spec = parse_spec({"name": "templated", "model": {"path": str(demo_model)}, "input": [str(inp)],
                       "sampling": {"max_new_tokens": 4, "seed": 1}, "output": {"path": str(tmp_path / "out")},
                       "shard_size": 8})
    job_id = submit_job(spec, broker).job_id
    Worker(broker, device="cpu", max_in_flight=1).run_until_idle()
    st = broker.status(job_id)
    assert st.state == JobState.COMPLETED
    summary = io.read_manifest(str(tmp_path / "out"))["summary"]
    assert summary["prefix_cache_query_tokens"] == st.prefix_cache_query_tokens > 24 * 100
    assert summary["prefix_cache_hit_tokens"] == st.prefix_cache_hit_tokens
    # one line computes the template once; every other line of every shard (one engine for all) finds it
    assert st.prefix_cache_hit_rate > 0.8
    hits = [m.stats["prefix_cache_hit_tokens"] for _, m in sorted(io.committed_shards(str(tmp_path / "out")).items())]
    assert hits[0] > 0 and hits[0] % 7 == 0 and hits[1:] == [hits[0] // 7 * 8] * 2
