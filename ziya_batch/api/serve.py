"""`ziya-batch serve`: the FastAPI app of api/app.py behind Ray Serve.

The app is built on the replica (a builder function, so nothing but the frozen settings and the Redis
URL is shipped to it), and talks to the queue through its own Broker. The replica needs no GPU and no
CPU reservation: it only reads and writes Redis and storage. Storage credentials reach the replica
through the environment variables named in io/storage.py, forwarded in the replica's runtime_env.
"""
from __future__ import annotations

import functools
import logging
import socket
import sys
import time
from typing import Optional

from .. import settings as env
from ..errors import ServiceError
from .settings import ApiSettings

log = logging.getLogger(__name__)

APP_NAME = "ziya-batch"
_FORWARD_ENV_PREFIXES = ("ZIYA_BATCH_", "AWS_", "FSSPEC_", "GOOGLE_APPLICATION_CREDENTIALS")


def _forwarded_env() -> dict[str, str]:
    # the token and prefixes travel inside ApiSettings; storage credentials are needed by the replica
    return env.environment(_FORWARD_ENV_PREFIXES, leave_out=(env.TOKEN_ENV,))


def build_asgi_app(settings: ApiSettings, redis_url: str):
    """The FastAPI app for one replica (Ray Serve calls this on the replica)."""
    from ..runtime.services import connect_broker
    from .app import create_app

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


def serve_main(host: str = "127.0.0.1", port: int = 8000, model: Optional[str] = None,
               storage: Optional[str] = None, redis_url: Optional[str] = None, ray_address: Optional[str] = None,
               insecure_no_auth: bool = False, num_replicas: int = 1) -> None:
    """Run the API until Ctrl-C. Refuses to start without a token (unless insecure_no_auth) or Redis."""
    import ray
    from ray import serve

    from ..runtime.services import connect_broker

    settings = ApiSettings.from_env(model=model, storage=storage, insecure_no_auth=insecure_no_auth)
    url = env.redis_url(redis_url)
    _check_port_free(host, port)
    connect_broker(url)             # fails here, with one line, when Redis is missing; prints unsafe settings
    if settings.insecure_no_auth:
        print("ziya-batch: warning: serving WITHOUT authentication (--insecure-no-auth)", file=sys.stderr)
    if not settings.allowed_prefixes:
        print("ziya-batch: warning: ZIYA_BATCH_ALLOWED_PREFIXES is unset: every job submitted over "
              "/v1/jobs will be refused", file=sys.stderr)
    try:
        # without an address, a Ray of our own: the API talks to workers only through Redis, so it never
        # needs to sit in their cluster, and joining one found by chance would put Serve into it
        ray.init(address=env.ray_address(ray_address) or "local", namespace=APP_NAME,
                 include_dashboard=False, log_to_driver=False)
    except ConnectionError as err:
        raise ServiceError(f"cannot reach Ray at {env.ray_address(ray_address)}: {err}") from None
    start_serve(settings, url, host, port, num_replicas)
    print(f"ziya-batch API on http://{host}:{port} (OpenAPI schema at /openapi.json, docs at /docs); "
          "Ctrl-C stops it", flush=True)
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
