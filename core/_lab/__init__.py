"""The namespace lab: what the demo and the test fixtures both need, with no test dependency.

``netns`` holds the one set of network-namespace helpers (run a command, list, kill, delete,
read ``ip -j`` back), used by the demo's cluster (``overlayd._topology``) and by the pytest
fixtures in ``overlayd.testing.netns``; ``etcd`` starts real etcd servers for the demo and for
tests.  Runtime code may import this package; it never imports ``overlayd.testing`` or pytest.
"""
