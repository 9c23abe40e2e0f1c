"""A real worker process for fault tests: the production Worker with a fault injected by name.

usage: python fault_worker.py REDIS_URL FAULT [POISON_LINES]
FAULT: none | die_after_stage | die_after_commit | exit_on_poison | stop_after_stage
Runs until the queue has nothing left to claim (none, exit_on_poison) or until the fault fires.
stop_after_stage: the process stops itself (SIGSTOP) once, after staging its first shard's parts and before
committing them, for the test to change the world (kill Redis) before it goes on (SIGCONT).
"""
import logging
import os
import signal
import sys
import threading

from ziya_batch import io
from ziya_batch.queue import Broker
from ziya_batch.work import worker as worker_mod
from ziya_batch.work.models import ModelCache


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def main():
    logging.basicConfig(level=logging.WARNING)
    url, fault = sys.argv[1], sys.argv[2]
    poison = {int(x) for x in sys.argv[3].split(",")} if len(sys.argv) > 3 and sys.argv[3] else set()
    broker = Broker.from_url(url)
    models = ModelCache("cpu")
    if fault == "die_after_stage":
        orig_stage = io.OutputDir.stage

        def stage_then_die(self, *a, **kw):
            orig_stage(self, *a, **kw)
            _die()
        io.OutputDir.stage = stage_then_die
    elif fault == "stop_after_stage":
        orig_stage = io.OutputDir.stage
        stopped = []

        def stage_then_stop(self, *a, **kw):
            staged = orig_stage(self, *a, **kw)
            if not stopped:
                stopped.append(True)
                os.kill(os.getpid(), signal.SIGSTOP)
            return staged
        io.OutputDir.stage = stage_then_stop
    elif fault == "die_after_commit":
        orig_commit = broker.commit

        def commit_then_die(*a, **kw):
            ok = orig_commit(*a, **kw)
            _die()
            return ok
        broker.commit = commit_then_die
    elif fault == "exit_on_poison":
        orig_engine = models.engine

        def engine_for(spec):
            eng = orig_engine(spec)
            if not getattr(eng, "_poisoned", False):
                orig_add = eng.add_request

                def add_request(req):
                    if int(req.request_id.rsplit(":", 1)[1]) in poison:
                        os._exit(3)  # the process dies, as a segfault or CUDA abort would take it
                    return orig_add(req)
                eng.add_request = add_request
                eng._poisoned = True
            return eng
        models.engine = engine_for
    w = worker_mod.Worker(broker, worker_id=f"fault-{fault}-{os.getpid()}", device="cpu", models=models)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if os.environ.get("FAULT_WORKER_SERVE"):
        w.serve_forever(stop, idle_sleep_s=0.2)
    else:
        w.run_until_idle()


if __name__ == "__main__":
    main()
