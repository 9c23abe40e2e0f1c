"""`ziya-batch worker`'s choice of Ray node, without a cluster: address matching and refusing a second node."""
import pytest

from ziya_batch.errors import ServiceError
from ziya_batch.runtime import cluster


def test_same_address_treats_loopback_and_this_hosts_ip_as_one_host():
    ip = cluster._primary_ip()
    assert cluster._same_address("127.0.0.1:6379", f"{ip}:6379")
    assert cluster._same_address("localhost:6379", "127.0.0.1:6379")
    assert not cluster._same_address("127.0.0.1:6379", "127.0.0.1:6380")
    assert not cluster._same_address("192.0.2.77:6379", "198.51.100.9:6379")


def test_a_node_of_another_cluster_on_this_host_is_refused_not_doubled(monkeypatch):
    monkeypatch.setattr(cluster.signal, "signal", lambda *a: None)      # leave pytest's handlers alone
    monkeypatch.setattr(cluster, "_local_clusters", lambda: ["198.51.100.9:6379"])
    started = []
    monkeypatch.setattr(cluster, "_OwnNode", lambda *a: started.append(a))
    with pytest.raises(ServiceError, match="--start-node"):
        cluster.serve_node(redis_url="redis://127.0.0.1:6379/15", ray_address="192.0.2.77:6379")
    assert started == []
