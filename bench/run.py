"""Run every benchmark in one go and print their figures (``make bench``; root).

Each compares overlayd against the physical limit measured in the same run: overlay vs underlay
throughput, kernel programming vs ``ip -batch``, and the store's watch latency.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = [
    ("throughput: overlay vs underlay", ["throughput.py"]),
    ("reconciler scale: lease -> route, 1000 peers", ["scale.py", "--peers", "1000"]),
    ("etcd store: watch latency and outage CPU", ["etcd_watch.py"]),
]


def main() -> int:
    failed = 0
    for title, argv in BENCHES:
        print(f"\n== {title} ==", flush=True)
        result = subprocess.run([sys.executable, str(HERE / argv[0]), *argv[1:]])
        failed += result.returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
