"""A minimal flannel-style udp forwarder, independent of overlayd, for the interop tests.

Written the way flannel's C proxy works: a plain TUN queue (``IFF_TUN | IFF_NO_PI``), one
``read`` -> one ``sendto`` of the bare IP packet to ``<peer>:8285``, one ``recvfrom`` -> one
``write``.  No offloads, no checks: what it sends is exactly what flannel would put on the wire.

Usage (inside the host's namespace): ``python flannel_udp_peer.py DEVICE BIND_IP SUBNET=PEER_IP ...``
"""

import fcntl
import ipaddress
import os
import select
import socket
import struct
import sys

TUNSETIFF, IFF_TUN, IFF_NO_PI = 0x400454CA, 0x0001, 0x1000


def main() -> None:
    device, bind, *pairs = sys.argv[1:]
    routes = [(ipaddress.ip_network(s), p) for s, p in (pair.split("=") for pair in pairs)]
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", device.encode(), IFF_TUN | IFF_NO_PI))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((bind, 8285))
    print("ready", flush=True)
    while True:
        readable, _, _ = select.select([fd, sock], [], [])
        if fd in readable:
            packet = os.read(fd, 65536)
            dst = ipaddress.ip_address(packet[16:20])
            for subnet, peer in routes:
                if dst in subnet:
                    sock.sendto(packet, (peer, 8285))
        if sock in readable:
            packet, _ = sock.recvfrom(65536)
            os.write(fd, packet)


if __name__ == "__main__":
    main()
