"""Guards of the one-machine path that need no service: /healthz tells no error text, remote model code needs
the worker's own consent, `worker --address auto` without a local cluster and Ray's token mode."""
import pytest
from fastapi.testclient import TestClient

from ziya_batch import settings
from ziya_batch.api.app import create_app
from ziya_batch.api.settings import ApiSettings
from ziya_batch.errors import ModelError, ServiceError
from ziya_batch.runtime import cluster
from ziya_batch.work.models import check_remote_code
from ziya_batch.spec import JobSpec


def test_healthz_tells_unauthenticated_callers_no_error_text():
    def broken():
        raise ConnectionError("cannot reach redis://:hunter2@10.1.2.3:6379/0 from /srv/secret")

    app = create_app(ApiSettings(token="t" * 24, allowed_prefixes=("/tmp/",)), broken)
    r = TestClient(app).get("/healthz")
    assert r.status_code == 503 and r.json()["status"] == "degraded" and r.json()["redis"] is False
    assert "cannot be reached" in r.json()["error"]
    assert not any(secret in r.text for secret in ("hunter2", "10.1.2.3", "/srv/secret", "ConnectionError"))


def _spec(trust: bool) -> JobSpec:
    return JobSpec.model_validate({"name": "x", "model": {"path": "/m", "trust_remote_code": trust},
                                   "input": ["/in.jsonl"], "output": {"path": "/out"}})


def test_remote_code_needs_the_workers_consent(monkeypatch):
    monkeypatch.delenv(settings.REMOTE_CODE_ENV, raising=False)
    check_remote_code(_spec(False))
    with pytest.raises(ModelError, match="--allow-remote-code"):
        check_remote_code(_spec(True))
    monkeypatch.setenv(settings.REMOTE_CODE_ENV, "1")
    check_remote_code(_spec(True))


def test_address_auto_without_a_local_cluster_is_one_line(monkeypatch):
    monkeypatch.setattr(cluster, "_local_clusters", lambda: [])
    with pytest.raises(ServiceError, match="no Ray cluster runs on this host: start one"):
        cluster.resolve_address("auto")
    assert cluster.resolve_address("10.0.0.1:6379") == "10.0.0.1:6379"


def test_a_token_at_hand_turns_rays_token_mode_on(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in (settings.RAY_AUTH_MODE_ENV, *settings.RAY_AUTH_TOKEN_ENVS):
        monkeypatch.setenv(name, "")              # restored (unset) after the test, whatever the code sets
        monkeypatch.delenv(name)
    assert cluster._use_ray_token() is False and settings.ray_auth_mode() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("x" * 32)
    assert cluster._use_ray_token() is True and settings.ray_auth_mode() == "token"
    monkeypatch.setenv(settings.RAY_AUTH_MODE_ENV, "disabled")      # a mode the user chose is kept
    assert cluster._use_ray_token() is False and settings.ray_auth_mode() == "disabled"


def test_the_remote_code_consent_travels_to_workers_on_other_nodes(monkeypatch):
    monkeypatch.delenv(settings.REMOTE_CODE_ENV, raising=False)
    assert settings.worker_runtime_env() == {}
    monkeypatch.setenv(settings.REMOTE_CODE_ENV, "1")
    assert settings.worker_runtime_env() == {"env_vars": {settings.REMOTE_CODE_ENV: "1"}}


def test_remote_code_is_refused_even_when_the_same_model_is_loaded(monkeypatch):
    from ziya_batch.work.models import ModelCache, engine_key

    monkeypatch.delenv(settings.REMOTE_CODE_ENV, raising=False)
    cache = ModelCache(device="cpu")
    loaded = object()
    cache._engines[engine_key(_spec(False))] = loaded          # another job's engine, the same checkpoint
    assert engine_key(_spec(True)) == engine_key(_spec(False)) and cache.engine(_spec(False)) is loaded
    with pytest.raises(ModelError, match="trust_remote_code"):
        cache.engine(_spec(True))


def test_a_failed_join_is_one_line_and_names_the_token_when_none_was_sent(monkeypatch):
    monkeypatch.setenv(settings.RAY_AUTH_MODE_ENV, "disabled")
    err = cluster._join_error("10.0.0.1:6379", ConnectionError("Failed to connect to Ray cluster at 10.0.0.1:6379\n"
                                                                "Traceback ..."))
    assert "\n" not in str(err) and "Failed to connect" in str(err) and "RAY_AUTH_TOKEN" in str(err)
    auth = cluster._join_error("h:1", RuntimeError("Authentication failed: token mismatch"))
    assert str(auth).startswith("the Ray cluster at h:1 requires token authentication")
    monkeypatch.setenv(settings.RAY_AUTH_MODE_ENV, "token")
    assert "RAY_AUTH_TOKEN" not in str(cluster._join_error("h:1", ConnectionError("refused")))


def _token_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in (settings.RAY_AUTH_MODE_ENV, *settings.RAY_AUTH_TOKEN_ENVS):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("x" * 32)


def test_run_and_serve_on_a_cluster_send_rays_token_and_fail_in_one_line(monkeypatch, tmp_path):
    """`run` and `serve` given a Ray address connect as `worker` does: with the token at hand (a head started by
    `ray start --head` where ~/.ray/auth_token exists requires it) in token mode, and a refusal is one line.
    They connected without it, and `run` ended in ConnectionError's traceback after ~25 lines of Ray's retries."""
    import ray

    from ziya_batch.runtime import local, services

    _token_home(monkeypatch, tmp_path)
    modes = []

    def refused(*args, **kwargs):
        modes.append(settings.ray_auth_mode())
        raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.1:6379\nTraceback ...")

    monkeypatch.setattr(services, "check_ray_address", lambda address: None)     # something answers there
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refused)
    with pytest.raises(ServiceError) as err:
        local._start_ray("10.0.0.1:6379")                                          # run
    assert modes == ["token"] and "\n" not in str(err.value) and "10.0.0.1:6379" in str(err.value)
    monkeypatch.delenv(settings.RAY_AUTH_MODE_ENV)
    with pytest.raises(ServiceError) as err:
        cluster.connect_cluster("10.0.0.1:6379", namespace="ziya-batch")          # serve
    assert modes == ["token", "token"] and "\n" not in str(err.value)
