"""The HTTP API as a plain FastAPI app: jobs, health, metrics, and the OpenAI Batch subset.

`create_app(settings, broker_factory)` builds it; Ray Serve wraps it in api/serve.py, and tests drive it
with fastapi's TestClient. Every error is JSON in OpenAI's shape, `{"error": {"message", "type",
"code"}}`, with a one-line message saying what to do; a client mistake is a 4xx, never a 500.
"""
from __future__ import annotations

import json
import logging
import threading
from typing import Any, Callable, Optional

import redis.exceptions as redis_errors
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import errors, jobs
from ..errors import JobNotFound, ZiyaBatchError
from ..spec import JobSpec, check_spec_data, format_validation_error, show_text
from .access import AccessDenied, check_expanded_inputs, check_job, token_matches
from .http_errors import ApiError, error_response
from .limits import BodyLimit
from .settings import ApiSettings

log = logging.getLogger(__name__)

_STATUS_OF = [  # most specific first
    (AccessDenied, 403, "permission_denied"),
    (JobNotFound, 404, "not_found"),
    (errors.JobNotFinished, 409, "conflict"),
    (errors.SpecError, 422, "invalid_request_error"),
    (errors.InputError, 400, "invalid_request_error"),
    (errors.ModelError, 400, "invalid_request_error"),
    (errors.ServiceError, 503, "service_unavailable"),
    (ZiyaBatchError, 400, "invalid_request_error"),
]


class _BodyErrors:
    """Quacks like pydantic's ValidationError for format_validation_error: FastAPI's errors with their
    leading 'body' location removed, so messages name the spec's own keys (`sampling.top_p`)."""

    def __init__(self, errs: list[dict]):
        self._errs = [{**e, "loc": tuple(e.get("loc", ()))[1:] if tuple(e.get("loc", ()))[:1] == ("body",)
                       else tuple(e.get("loc", ()))} for e in errs]

    def errors(self) -> list[dict]:
        return self._errs


def format_request_errors(errs: list[dict], source: str) -> str:
    return format_validation_error(_BodyErrors(errs), source)  # type: ignore[arg-type]


def _is_json(request: Request) -> bool:
    """Whether FastAPI parses this request's body as JSON: media type application/json or application/*+json."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    kind, _, sub = media.partition("/")
    return kind == "application" and (sub == "json" or sub.endswith("+json"))


def _json_kind(value: Any) -> str:
    """What a parsed JSON value is, in JSON's words."""
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array"}.get(
        type(value), "an object")


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errs = list(exc.errors())
        bad_json = [e for e in errs if e.get("type") == "json_invalid"]
        if bad_json:
            reason = (bad_json[0].get("ctx") or {}).get("error", "JSON decode error")
            return error_response(400, f"request body is not valid JSON: {reason}", "invalid_request_error")
        source = "job spec" if request.url.path.rstrip("/") == "/v1/jobs" else "request"
        whole = [e for e in errs if tuple(e.get("loc", ())) == ("body",)]      # the body itself, not a key in it
        if whole and whole[0].get("type") == "missing":
            return error_response(400, f"request body is empty: send the {source} as a JSON object with "
                                       "'Content-Type: application/json'", "invalid_request_error")
        if whole and isinstance(whole[0].get("input"), (bytes, str)) and not _is_json(request):
            return error_response(400, "request body must be a JSON object; send it with "
                                       "'Content-Type: application/json'", "invalid_request_error")
        if whole and whole[0].get("type") in ("model_attributes_type", "dict_type", "model_type"):
            kind = _json_kind(whole[0].get("input"))
            return error_response(422, f"{source}: the request body must be a JSON object, not {kind}",
                                  "invalid_request_error")
        return error_response(422, format_request_errors(errs, source), "invalid_request_error")

    @app.exception_handler(ZiyaBatchError)
    async def _user_error(request: Request, exc: ZiyaBatchError):
        for cls, status, kind in _STATUS_OF:
            if isinstance(exc, cls):
                return error_response(status, str(exc), kind)
        return error_response(400, str(exc), "invalid_request_error")

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.message, exc.kind)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = {401: "authentication_error", 404: "not_found", 405: "invalid_request_error"}.get(
            exc.status_code, "invalid_request_error" if exc.status_code < 500 else "server_error")
        detail = str(exc.detail)
        cause = exc.__cause__
        if exc.status_code == 400 and detail == "There was an error parsing the body" and cause is not None:
            # FastAPI's words for a JSON body its parser gave up on other than by a syntax error: say why
            why = "nested too deeply" if isinstance(cause, RecursionError) else \
                f"{type(cause).__name__}: {' '.join(str(cause).split())[:200]}"
            detail = f"request body is not valid JSON ({why})"
        return error_response(exc.status_code, detail, kind, headers=getattr(exc, "headers", None))

    @app.exception_handler(redis_errors.ConnectionError)
    @app.exception_handler(redis_errors.TimeoutError)
    @app.exception_handler(redis_errors.ReadOnlyError)
    @app.exception_handler(redis_errors.OutOfMemoryError)
    async def _redis_down(request: Request, exc: Exception):
        # Redis unreachable, refusing our password, a read-only replica or out of memory is the service's state,
        # not a bug: 503, try again later
        return error_response(503, f"the job queue (Redis) cannot be reached: {' '.join(str(exc).split())}",
                              "service_unavailable", headers={"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal error ({type(exc).__name__}); see the server log", "server_error")


class BrokerHolder:
    """One broker per app, made on first use (so the app starts even while Redis is still coming up)."""

    def __init__(self, factory: Callable[[], Any]):
        self._factory, self._broker, self._lock = factory, None, threading.Lock()

    def get(self):
        if self._broker is None:
            with self._lock:
                if self._broker is None:
                    self._broker = self._factory()
        return self._broker


_NO_TOKEN = ("missing or wrong bearer token: send 'Authorization: Bearer <token>' with the server's "
             "ZIYA_BATCH_API_TOKEN")
# the only path that answers without the token
_OPEN_PATHS = frozenset({"/healthz"})


def _authorized(settings: ApiSettings, authorization: Optional[str]) -> bool:
    if settings.insecure_no_auth and not settings.token:
        return True
    scheme, _, given = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and token_matches(given, settings.token or "")


def _route_path(scope) -> str:
    # the path the app's routes see: without the prefix it is mounted under (ASGI servers keep it in both)
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return (path[len(root):] or "/") if root and path.startswith(root) else path


class TokenGate:
    """ASGI middleware: 401 for a request without the token before anything reads its body. The routes' token
    dependency runs only after FastAPI has parsed the body, so an anonymous caller had its JSON parsed (or its
    upload spooled, up to the body limit) and heard the parser's verdict before its 401."""

    def __init__(self, app, settings: ApiSettings):
        self.app, self.settings = app, settings

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and _route_path(scope) not in _OPEN_PATHS and \
                not _authorized(self.settings, Headers(scope=scope).get("authorization")):
            response = error_response(401, _NO_TOKEN, "authentication_error", headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _require_token_dependency(settings: ApiSettings):
    # the same check as TokenGate's, where the schema shows it (and for an app mounted without the gate)
    bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer $ZIYA_BATCH_API_TOKEN")

    def require_token(creds: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> None:
        given = None if creds is None else f"{creds.scheme} {creds.credentials}"
        if not _authorized(settings, given):
            raise StarletteHTTPException(401, _NO_TOKEN, headers={"WWW-Authenticate": "Bearer"})

    return require_token


class _DuplicateKey(Exception):
    def __init__(self, key: str):
        self.key = key


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict:
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


async def _keys_given_once(request: Request) -> None:
    """Refuse a spec body that gives a key twice: FastAPI's JSON parse keeps the last one without a word
    (`{"name": "a", "name": "b"}` is "b"; a second `sampling` would drop the first), where `ziya-batch submit`'s
    loader refuses it. The body bytes are the ones already read (through BodyLimit) and cached by Starlette."""
    if request.headers.get("content-type") and not _is_json(request):
        return                      # not parsed as JSON: FastAPI's own answer (send JSON) stands
    try:
        data = json.loads(await request.body(), object_pairs_hook=_unique_pairs)
    except _DuplicateKey as dup:
        raise errors.SpecError(f"job spec: duplicate key '{show_text(str(dup.key))}': give each key once") from None
    except (ValueError, RecursionError):
        return                      # not valid JSON: FastAPI has answered that already
    if isinstance(data, dict):
        # the bounds a spec file gets (finite numbers, UTF-8 text in keys and values, size), before pydantic
        check_spec_data(data, "job spec")


def _jobs_router(settings: ApiSettings, brokers: BrokerHolder) -> APIRouter:
    router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

    @router.post("", summary="Submit a job (the job spec as JSON)", dependencies=[Depends(_keys_given_once)])
    def submit(spec: JobSpec) -> dict:
        spec = jobs.absolute_locations(spec)      # checked as stored: the locations fsspec opens
        check_job(spec, settings)
        files = jobs.list_inputs(spec)
        vetted = check_expanded_inputs(files, settings)      # each local file's identity as judged
        status = jobs.submit_job(spec, brokers.get(), files=files, vetted=vetted)
        return {"id": status.job_id, "state": status.state.value}

    @router.get("", summary="Every job with its status (the fields of GET /v1/jobs/{id}, note included)")
    def list_jobs() -> dict:
        broker = brokers.get()
        statuses = jobs.list_jobs(broker)
        notes = jobs.waiting_notes(broker, statuses)       # the live workers read once for every job
        return {"jobs": [{**s.to_dict(), "note": note} for s, note in zip(statuses, notes)]}

    @router.get("/{job_id}", summary="A job's status (the fields of `ziya-batch status --json`)")
    def get_job(job_id: str) -> dict:
        status = jobs.job_status(brokers.get(), job_id, detail=True, hint=jobs.API_HINT)
        # "note": why its shards wait with no worker to take them, or null
        return {**status.to_dict(), "note": jobs.waiting_note(brokers.get(), status)}

    @router.post("/{job_id}/cancel", summary="Stop handing out the job's shards; committed parts stay")
    def cancel(job_id: str, abandon_running: bool = False) -> dict:
        return jobs.cancel_job(brokers.get(), job_id, abandon_running=abandon_running, hint=jobs.API_HINT).to_dict()

    @router.delete("/{job_id}", summary="Forget a finished job: its records leave the queue, its output stays "
                   "(409 while it runs or a worker holds one of its shards)")
    def forget(job_id: str, dry_run: bool = False) -> dict:
        return jobs.forget_job(brokers.get(), job_id, dry_run=dry_run, hint=jobs.API_HINT).to_dict()

    @router.get("/{job_id}/manifest", summary="The job's manifest.json, once written")
    def manifest(job_id: str) -> dict:
        return jobs.get_manifest(brokers.get(), job_id, hint=jobs.API_HINT)

    return router


def create_app(settings: ApiSettings, broker_factory: Callable[[], Any]) -> FastAPI:
    """The API app. `broker_factory()` returns a queue Broker; it is called once, on first use."""
    from .metrics import metrics_response
    from .openai_batch import Batches, batch_router

    # the schema behind the token too (FastAPI's own /openapi.json, /docs and /redoc answer anyone)
    app = FastAPI(title="ziya-batch", version="0.1.0", openapi_url=None, docs_url=None, redoc_url=None,
                  description="Batch generation jobs for Ziya-LLaMA-13B, and the OpenAI Batch API subset. "
                              "Every endpoint but /healthz needs 'Authorization: Bearer <token>'.")
    brokers = BrokerHolder(broker_factory)
    app.state.settings, app.state.brokers = settings, brokers
    app.state.batches = Batches(settings, brokers)
    _install_error_handlers(app)
    app.add_middleware(BodyLimit)
    app.add_middleware(TokenGate, settings=settings)       # added last, so it runs first: 401 before any body
    auth = [Depends(_require_token_dependency(settings))]

    @app.get("/healthz", tags=["health"], summary="Liveness and Redis reachability (no token needed)")
    def healthz() -> JSONResponse:
        try:
            brokers.get().client.ping()
            return JSONResponse({"status": "ok", "redis": True})
        except Exception as err:  # noqa: BLE001 - health reports, never raises
            # the cause goes to the server log only: its text can name hosts, paths or a Redis URL, and
            # /healthz answers anyone
            log.warning("healthz: Redis not reachable: %s", type(err).__name__)
            return JSONResponse({"status": "degraded", "redis": False,
                                 "error": "the job queue (Redis) cannot be reached; the server log says why"},
                                status_code=503)

    @app.get("/metrics", tags=["metrics"], dependencies=auth, response_class=Response,
             summary="Prometheus metrics, read from Redis at scrape time")
    def metrics() -> Response:
        body, content_type = metrics_response(brokers)
        return Response(body, media_type=content_type)

    app.include_router(_jobs_router(settings, brokers), dependencies=auth)
    app.include_router(batch_router(app.state.batches), dependencies=auth)

    @app.get("/openapi.json", tags=["schema"], dependencies=auth, include_in_schema=False)
    def openapi_schema() -> JSONResponse:
        return JSONResponse(app.openapi())

    return app
