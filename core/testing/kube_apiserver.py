"""The fake Kubernetes API server for tests: re-exported from the lab (``overlayd._lab.kube_apiserver``),
where the end-to-end clusters start it as a process inside their store namespace."""

from .._lab.kube_apiserver import ApiError, FakeApiServer, NodeState, kubeconfig_for, request

__all__ = ["ApiError", "FakeApiServer", "NodeState", "kubeconfig_for", "request"]
