"""The driver side of the two-node test, in a process of its own (Ray caches a process's cluster and auth
settings, so the test process itself never joins this throwaway cluster).

usage: python cluster_driver.py ADDRESS REDIS_URL JOB_YAML OUTPUT_DIR SECOND_NODE_PGID RESULT_JSON
Runs the job on the cluster; once replicas on both nodes have committed work, SIGKILLs the second node's
process group; writes {"code", "nodes_seen", "second_node", "killed"} to RESULT_JSON."""
import json
import os
import signal
import sys
import threading
import time

import ray

from ziya_batch import io
from ziya_batch.queue import Broker
from ziya_batch.runtime.local import run_job


def main():
    address, redis_url, job, out, second_pgid, result = sys.argv[1:7]
    ray.init(address=address, log_to_driver=False)
    head = ray.get_runtime_context().get_node_id()
    second_node = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != head)
    broker = Broker.from_url(redis_url)
    seen, killed = set(), threading.Event()

    def watch():
        while not killed.is_set():
            for w in broker.workers():
                seen.add((w.get("info") or {}).get("node_id"))
            if second_node in seen and len(io.committed_shards(out)) >= 4:
                os.killpg(int(second_pgid), signal.SIGKILL)
                killed.set()
                return
            time.sleep(0.2)

    threading.Thread(target=watch, daemon=True).start()
    code = run_job(job, redis_url=redis_url, ray_address=address, progress=False)
    with open(result, "w") as f:
        json.dump({"code": code, "nodes_seen": sorted(n for n in seen if n), "second_node": second_node,
                   "killed": killed.is_set()}, f)


if __name__ == "__main__":
    main()
