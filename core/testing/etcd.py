"""Real etcd servers for tests: re-exported from the lab (``overlayd._lab.etcd``), where the
demo finds them too without importing test code."""

from .._lab.etcd import (
    ETCD,
    ETCDCTL,
    RUN_PREFIX,
    EtcdCluster,
    EtcdError,
    EtcdServer,
    TLSFiles,
    free_port,
    make_tls,
)

__all__ = [
    "ETCD",
    "ETCDCTL",
    "RUN_PREFIX",
    "EtcdCluster",
    "EtcdError",
    "EtcdServer",
    "TLSFiles",
    "free_port",
    "make_tls",
]
