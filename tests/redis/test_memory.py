"""Redis holds shard descriptors, never prompts: a job's memory grows with shards, not lines."""
from ziya_batch.queue import ShardStats


def job_bytes(broker, job_id: str) -> int:
    c = broker.client
    return sum(c.memory_usage(key, samples=0) or 0 for key in broker.keys.job_keys(job_id))


def test_memory_grows_with_shards_not_lines(broker, make_shards, make_spec):
    # the same 200 shards holding 10 or 10,000 lines each
    small, big = make_spec("small", shard_size=10), make_spec("big", shard_size=10_000)
    small_id = broker.submit(small, make_shards(small, 200)).job_id
    big_id = broker.submit(big, make_shards(big, 200)).job_id
    small_b, big_b = job_bytes(broker, small_id), job_bytes(broker, big_id)
    assert broker.status(big_id).prompts_total == 1000 * broker.status(small_id).prompts_total
    assert abs(big_b - small_b) < 0.1 * small_b               # only a few more digits per byte offset
    # twice the shards: about twice the memory
    more = make_spec("more", shard_size=10)
    more_id = broker.submit(more, make_shards(more, 400)).job_id
    assert 1.6 < job_bytes(broker, more_id) / small_b < 2.4


def test_million_line_job_costs_under_a_megabyte(broker, make_shards, make_spec):
    spec = make_spec("million", shard_size=512)
    n_shards = -(-1_000_000 // 512)
    job_id = broker.submit(spec, make_shards(spec, n_shards)).job_id
    assert broker.status(job_id).prompts_total == n_shards * 512
    size = job_bytes(broker, job_id)
    assert size < 1_000_000, size
    # committing every shard adds its stats and part checksums, still bounded per shard
    for _ in range(200):
        lease = broker.claim("w")
        broker.commit(lease, ShardStats(prompts_done=512, samples=512, output_tokens=100_000,
                                        parts={"results": (512, "a" * 64), "sft": (512, "b" * 64)}))
    assert job_bytes(broker, job_id) < 1_000_000 + 200 * 400
