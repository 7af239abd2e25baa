"""TUN devices through /dev/net/tun ioctls: the kernel side of a userspace datapath.

netlink cannot attach a file descriptor to a TUN device, so this is the one kernel interface
overlayd reaches by ``ioctl`` instead of :mod:`overlayd.netlink` (which still configures the
device's address, MTU and routes like any other link).

* The device is made **persistent** (``TUNSETPERSIST``) by the daemon, so it, its address and
  the route through it survive a forwarder restart; the forwarder attaches to it by name.
* The queue flags are set per attach (``tun_set_iff`` replaces the feature bits on every
  ``TUNSETIFF``, drivers/net/tun.c), so one device serves both the offload path (``IFF_VNET_HDR``)
  and the plain path (one bare IP packet per read, flannel's ``IFF_TUN | IFF_NO_PI``).
* ``TUNSETOFFLOAD`` with ``TUN_F_CSUM | TUN_F_TSO4`` lets the kernel hand us whole TCP segments of
  up to 64 KB with a partial checksum; a kernel without it answers ``EINVAL`` and the caller falls
  back to the plain path.  Link: https://docs.kernel.org/networking/tuntap.html
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from .errors import KernelError

TUN_PATH = "/dev/net/tun"
TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02

#: struct virtio_net_hdr (include/uapi/linux/virtio_net.h): flags, gso_type, hdr_len, gso_size,
#: csum_start, csum_offset.
VNET_HDR = struct.Struct("=BBHHHH")
VNET_HDR_LEN = VNET_HDR.size
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_ECN = 0x80  # the segment carries ECN (CWR goes on the first packet only)


def _ifreq(name: str, flags: int) -> bytes:
    if not 0 < len(name.encode()) < 16:
        raise KernelError(f"TUN device name {name!r} must be 1 to 15 bytes")
    return struct.pack("16sH22x", name.encode(), flags)


def _open(name: str, flags: int) -> int:
    try:
        fd = os.open(TUN_PATH, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise KernelError(f"cannot open {TUN_PATH}: {exc.strerror} (is the tun module loaded?)") from exc
    try:
        fcntl.ioctl(fd, TUNSETIFF, _ifreq(name, flags))
    except OSError as exc:
        os.close(fd)
        hint = "; overlayd needs root or CAP_NET_ADMIN" if exc.errno == errno.EPERM else ""
        raise KernelError(f"attaching to TUN device {name} failed: {exc.strerror}{hint}") from exc
    return fd


def create_persistent(name: str) -> None:
    """Create TUN device *name* (no packet-info header) that outlives its file descriptors.

    An existing TUN device of that name is reused (``TUNSETIFF`` attaches to it)."""
    fd = _open(name, IFF_TUN | IFF_NO_PI)
    try:
        fcntl.ioctl(fd, TUNSETPERSIST, 1)
    except OSError as exc:
        raise KernelError(f"making TUN device {name} persistent failed: {exc.strerror}") from exc
    finally:
        os.close(fd)


def delete_persistent(name: str) -> None:
    """Drop persistence so the device disappears with its last file descriptor (now)."""
    try:
        fd = _open(name, IFF_TUN | IFF_NO_PI)
    except KernelError:
        return
    try:
        fcntl.ioctl(fd, TUNSETPERSIST, 0)
    finally:
        os.close(fd)


def attach(name: str, *, vnet_hdr: bool) -> tuple[int, bool]:
    """A non-blocking queue on TUN device *name*: ``(fd, offload)``.

    With *vnet_hdr*, every read and write starts with a ``virtio_net_hdr`` and TSO is asked for;
    ``offload`` says whether the kernel agreed.  When it did not, the queue is reopened plain."""
    if vnet_hdr:
        fd = _open(name, IFF_TUN | IFF_NO_PI | IFF_VNET_HDR)
        try:
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
            fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4)
        except OSError:
            os.close(fd)
        else:
            os.set_blocking(fd, False)
            return fd, True
    fd = _open(name, IFF_TUN | IFF_NO_PI)
    os.set_blocking(fd, False)
    return fd, False
