"""`ziya-batch serve`: the FastAPI app of api/app.py behind Ray Serve.

The app is built on the replica (a builder function, so nothing but the frozen settings and the Redis
URL is shipped to it), and talks to the queue through its own Broker. The replica needs no GPU and no
CPU reservation: it only reads and writes Redis and storage. Storage credentials reach the replica
through the environment variables named in io/storage.py, forwarded in the replica's runtime_env.
"""
from __future__ import annotations

import functools
import logging
import os
import socket
import sys
import time
from typing import Optional

from .. import settings as env
from ..errors import ModelError, ServiceError
from .settings import ApiSettings

log = logging.getLogger(__name__)

APP_NAME = "ziya-batch"
_FORWARD_ENV_PREFIXES = ("ZIYA_BATCH_", "AWS_", "FSSPEC_", "GOOGLE_APPLICATION_CREDENTIALS")


def _forwarded_env() -> dict[str, str]:
    # the token and prefixes travel inside ApiSettings; storage credentials are needed by the replica
    return env.environment(_FORWARD_ENV_PREFIXES, leave_out=(env.TOKEN_ENV,))


def build_asgi_app(settings: ApiSettings, redis_url: str):
    """The FastAPI app for one replica (Ray Serve calls this on the replica)."""
    from ..redact import mask_logs
    from ..runtime.services import connect_broker
    from .app import create_app

    mask_logs()                    # the replica's own process: its 500s' tracebacks are logged there
    return create_app(settings, functools.partial(connect_broker, redis_url, warn=False))


def build_application(settings: ApiSettings, redis_url: str, num_replicas: int = 1):
    """The Ray Serve application (bind it with serve.run)."""
    from ray import serve

    def builder():
        # a plain function: Serve runs builder functions on the replica (a partial would be taken for an app)
        return build_asgi_app(settings, redis_url)

    ingress = serve.ingress(builder)

    @serve.deployment(name="ApiDeployment", num_replicas=num_replicas,
                      ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": _forwarded_env()}})
    @ingress
    class ApiDeployment:
        """Routes come from the ingress app; the class holds no state of its own."""

    return ApiDeployment.bind()


def start_serve(settings: ApiSettings, redis_url: str, host: str, port: int, num_replicas: int = 1):
    """Start Serve's HTTP proxy on host:port and deploy the API (Ray must be initialised)."""
    from ray import serve

    serve.start(http_options={"host": host, "port": port})
    return serve.run(build_application(settings, redis_url, num_replicas), name=APP_NAME, route_prefix="/")


def _check_port_free(host: str, port: int) -> None:
    """Fail with one line before starting Ray when the port is taken (Serve would fail much later)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        try:
            sock.bind((host, port))
        except OSError as err:
            raise ServiceError(f"cannot listen on {host}:{port} ({err.strerror}); pick another with --port, "
                               "or stop what holds it") from None


def _check_local_model(model: Optional[str], local_replicas: bool) -> None:
    """The model OpenAI batches run on (--model / ZIYA_BATCH_MODEL) must be a directory here when this command's
    own replicas are to load it; a wrong one otherwise left every batch in_progress, its shards waiting on
    replicas that cannot load it. On a cluster (or with --no-workers) the workers' hosts read it: not checked."""
    if local_replicas and model and "://" not in model and not os.path.isdir(model):
        raise ModelError(f"--model {model} is not a directory (the model OpenAI batches run on, loaded by this "
                         "command's replicas: a merged Hugging Face checkpoint; `ziya-batch demo-model DIR` writes "
                         "a tiny one to try things with)")


def serve_main(host: str = "127.0.0.1", port: int = 8000, model: Optional[str] = None,
               storage: Optional[str] = None, redis_url: Optional[str] = None, ray_address: Optional[str] = None,
               insecure_no_auth: bool = False, num_replicas: int = 1, workers: bool = True,
               tensor_parallel: int = 1, cpu: bool = False, poll_s: float = 2.0) -> None:
    """Run the API until Ctrl-C. Refuses to start without a token (unless insecure_no_auth) or a reachable Redis.

    Without a Ray address it starts a Ray of its own and, unless `workers` is off, runs replicas on this
    machine's GPUs (or one on the CPU) as `run` does, so a job submitted over HTTP completes with nothing else
    started. On a cluster (an address) the cluster's `ziya-batch worker`s do the work."""
    import ray
    from ray import serve

    from ..redact import mask_url
    from ..runtime.services import connect_broker, redis_for

    settings = ApiSettings.from_env(model=model, storage=storage, insecure_no_auth=insecure_no_auth)
    _check_local_model(settings.model, local_replicas=workers and not env.ray_address(ray_address))
    _check_port_free(host, port)
    url, private = redis_for(redis_url, register=True)
    manager = None
    try:
        broker = connect_broker(url)    # fails here, with one line, when Redis is missing; prints unsafe settings
        if settings.insecure_no_auth:
            print("ziya-batch: warning: serving WITHOUT authentication (--insecure-no-auth)", file=sys.stderr)
        if not settings.allowed_prefixes:
            print("ziya-batch: warning: ZIYA_BATCH_ALLOWED_PREFIXES is unset: every job submitted over "
                  "/v1/jobs will be refused", file=sys.stderr)
        address = env.ray_address(ray_address)
        if address and private is not None:
            print("ziya-batch: warning: the queue is this host's private redis-server (127.0.0.1 only): workers "
                  f"on other hosts cannot reach it; give a Redis they can reach with --redis-url or {env.REDIS_ENV}",
                  file=sys.stderr)
        if address:
            from ..runtime.cluster import connect_cluster

            # with Ray's token when one is at hand, as `ziya-batch worker` joins; one line when refused
            connect_cluster(address, namespace=APP_NAME, include_dashboard=False, log_to_driver=False)
        else:
            # without an address, a Ray of our own: the API talks to workers only through Redis, so it never
            # needs to sit in their cluster, and joining one found by chance would put Serve into it
            ray.init(address="local", namespace=APP_NAME, include_dashboard=False, log_to_driver=False)
        start_serve(settings, url, host, port, num_replicas)
        if workers and not address:
            from ..runtime.local import start_local_replicas

            manager = start_local_replicas(url, None, tensor_parallel, cpu=cpu, worker_prefix="serve")
        where = ("replicas on this machine run the jobs" if manager else
                 "no workers here: `ziya-batch worker` on GPU nodes runs the jobs")
        print(f"ziya-batch API on http://{host}:{port} (OpenAPI schema at /openapi.json, with the token), queue "
              f"at {mask_url(url)}; {where}; Ctrl-C stops it", flush=True)
        _serve_until_interrupted(broker, manager, poll_s)
    finally:
        try:
            if manager is not None:
                manager.stop()
            if ray.is_initialized():
                serve.shutdown()
                ray.shutdown()
        finally:
            if private is not None:
                private.release()


def _serve_until_interrupted(broker, manager, poll_s: float) -> None:
    """Keep the local replicas running (one that dies is started again) and requeue expired leases, until
    Ctrl-C or SIGTERM."""
    import signal

    stop = []
    # SIGINT too: a shell's background job starts with SIGINT ignored, where Python raises no KeyboardInterrupt
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.append(True))
    try:
        while not stop:
            if manager is not None:
                manager.reconcile()
                try:
                    broker.reap()
                except Exception as err:  # noqa: BLE001 - Redis away for a moment: the next poll tries again
                    log.warning("could not reap expired leases: %s", type(err).__name__)
            time.sleep(poll_s)
    except KeyboardInterrupt:
        pass
