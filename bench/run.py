"""Run every benchmark in one go and print their figures (``make bench``; root).

Each compares overlayd against the physical limit measured in the same run: overlay vs underlay
throughput, kernel programming vs ``ip -batch``, and the store's watch latency.  ``--quick``
shortens the scale bench's windows (10 s idle instead of 60 s).  The scale bench writes
docs/performance-after.json (its figures) and docs/performance.png (``pip install '.[bench]'``
for matplotlib), relative to the repository root.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = [
    ("throughput: vxlan and host-gw vs the underlay", ["throughput.py"]),
    ("vxlan over IPv4 and over IPv6 vs their underlays", ["vxlan_dualstack.py"]),
    ("udp backend: underlay vs vxlan vs udp plain vs udp offload", ["udp.py"]),
    (
        "control plane at scale: N = 100 / 1000 / 5000 peers",
        [
            "scale.py",
            "--peers",
            "100,1000,5000",
            "--plot",
            "docs/performance.png",
            "--json",
            "docs/performance-after.json",
        ],
    ),
    ("kernel read-back: pyroute2 vs the kernel-state cache's dump", ["kernel_dump.py"]),
    ("etcd store: watch latency and outage CPU", ["etcd_watch.py"]),
]


def main() -> int:
    quick = "--quick" in sys.argv[1:]
    failed = 0
    for title, argv in BENCHES:
        print(f"\n== {title} ==", flush=True)
        extra: list[str] = []
        if argv[0] == "scale.py":
            extra = ["--baseline", "docs/performance-before.json", *(["--quick"] if quick else [])]
        result = subprocess.run([sys.executable, str(HERE / argv[0]), *argv[1:], *extra], cwd=HERE.parent)
        failed += result.returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
