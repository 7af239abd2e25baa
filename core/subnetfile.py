"""The subnet file (``/run/flannel/subnet.env``): flannel's hand-off to the CNI plugin.

Written atomically (temporary file + rename) and only once the host is ready, so its presence
means "this host has a lease and its datapath is set up".  Read back at start-up so a restarted
daemon prefers the subnet it had, and on every pass so a deleted or edited file is restored.

Every read is bounded and refuses anything but a regular file: the path comes from the command
line, and ``--subnet-file /dev/full`` (or ``/dev/zero``, or a FIFO) must not read forever.  The
path is checked at start-up, before the store or the kernel is touched, so a typo is one line
and exit 2 rather than a lease and a VXLAN device followed by a traceback.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import stat
import tempfile
from ipaddress import IPv4Network, IPv6Network
from typing import TypeVar

import attrs

from .errors import UserError

#: A subnet file is four to six short lines; anything longer is not one of ours.
MAX_BYTES = 4096


@attrs.frozen
class SubnetFile:
    network: IPv4Network | None
    subnet: IPv4Network | None
    mtu: int
    ip_masq: bool
    ipv6_network: IPv6Network | None = None
    ipv6_subnet: IPv6Network | None = None

    def render(self) -> str:
        lines = []
        if self.network is not None and self.subnet is not None:
            lines.append(f"FLANNEL_NETWORK={self.network}")
            lines.append(f"FLANNEL_SUBNET={self.subnet.network_address + 1}/{self.subnet.prefixlen}")
        if self.ipv6_network is not None and self.ipv6_subnet is not None:
            lines.append(f"FLANNEL_IPV6_NETWORK={self.ipv6_network}")
            lines.append(f"FLANNEL_IPV6_SUBNET={self.ipv6_subnet.network_address + 1}/{self.ipv6_subnet.prefixlen}")
        lines.append(f"FLANNEL_MTU={self.mtu}")
        lines.append(f"FLANNEL_IPMASQ={'true' if self.ip_masq else 'false'}")
        return "\n".join(lines) + "\n"


def check_writable(path: str) -> None:
    """Raise ``UserError`` (naming ``--subnet-file``) unless *path* can be written atomically:
    not empty, not a directory or device, and in a directory where files can be created.
    Missing parent directories are created, as the writer would."""
    if not path.strip():
        raise UserError("--subnet-file is empty; give a file path such as /run/flannel/subnet.env")
    full = os.path.abspath(path)
    try:
        info = os.stat(full)
    except FileNotFoundError:
        pass
    except NotADirectoryError:
        raise UserError(f"--subnet-file {path}: {_file_ancestor(full)} is a file, not a directory") from None
    except OSError as exc:
        raise UserError(f"--subnet-file {path}: {exc.strerror}") from exc
    else:
        if stat.S_ISDIR(info.st_mode):
            raise UserError(f"--subnet-file {path} is a directory; give a file path inside it")
        if not stat.S_ISREG(info.st_mode):
            raise UserError(f"--subnet-file {path} is not a regular file (it is replaced by rename)")
    directory = os.path.dirname(full)
    try:
        os.makedirs(directory, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".subnet-check-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except (NotADirectoryError, FileExistsError):
        raise UserError(f"--subnet-file {path}: {_file_ancestor(full)} is a file, not a directory") from None
    except OSError as exc:
        why = "read-only or immutable" if exc.errno in (errno.EROFS, errno.EPERM) else exc.strerror
        raise UserError(f"--subnet-file {path}: cannot create files in {directory} ({why})") from exc


def _file_ancestor(path: str) -> str:
    """The first ancestor of *path* that exists and is not a directory."""
    parts = path.split(os.sep)
    for i in range(2, len(parts)):
        candidate = os.sep.join(parts[:i])
        if os.path.exists(candidate) and not os.path.isdir(candidate):
            return candidate
    return os.path.dirname(path)


def write_subnet_file(path: str, content: SubnetFile | str) -> None:
    """Replace *path* atomically with *content*."""
    text = content if isinstance(content, str) else content.render()
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".subnet-", dir=directory)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_bounded(path: str, limit: int = MAX_BYTES) -> bytes | None:
    """Up to *limit* + 1 bytes of *path*, or None when it is missing or not a regular file.

    Opened non-blocking so a FIFO cannot stall the daemon, and checked with ``fstat`` on the
    open descriptor, so a device swapped in after a ``stat`` is still refused.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        chunks = []
        left = limit + 1
        while left > 0:
            chunk = os.read(fd, left)
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


def parse_env(data: bytes | str) -> dict[str, str]:
    """The ``KEY=value`` pairs of a subnet file's contents; junk lines are skipped."""
    text = data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data
    out = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key:
            out[key] = value
    return out


def read_env(path: str) -> dict[str, str]:
    """The ``KEY=value`` pairs of a subnet file; empty when it is missing, not a regular file,
    or longer than any subnet file."""
    data = read_bounded(path)
    if data is None or len(data) > MAX_BYTES:
        return {}
    return parse_env(data)


def parse_subnet(raw: str | None) -> IPv4Network | None:
    """``FLANNEL_SUBNET``'s value (``10.244.3.1/24``) as its network, None unless valid IPv4."""
    if not raw:
        return None
    try:
        net = ipaddress.ip_interface(raw.strip()).network
    except ValueError:
        return None
    return net if isinstance(net, IPv4Network) else None


def previous_subnet(path: str) -> IPv4Network | None:
    """The IPv4 subnet recorded by a previous run, if the file holds a valid one."""
    return parse_subnet(read_env(path).get("FLANNEL_SUBNET"))


def previous_subnets(path: str) -> list[IPv4Network | IPv6Network]:
    """The subnets recorded by a previous run, one per family (``FLANNEL_SUBNET``,
    ``FLANNEL_IPV6_SUBNET``), those that are valid: what a restart prefers."""
    env = read_env(path)
    out: list[IPv4Network | IPv6Network] = []
    for key, kind in (("FLANNEL_SUBNET", IPv4Network), ("FLANNEL_IPV6_SUBNET", IPv6Network)):
        try:
            net = ipaddress.ip_interface(env.get(key, "").strip()).network
        except ValueError:
            continue
        if isinstance(net, kind):
            out.append(net)
    return out


_Net = TypeVar("_Net", IPv4Network, IPv6Network)


def _pair(env: dict[str, str], prefix: str, kind: type[_Net], path: str) -> tuple[_Net, _Net] | None:
    """``<prefix>NETWORK`` and ``<prefix>SUBNET`` of *kind*; both or neither, the subnet inside."""
    found: list[_Net] = []
    for key in (f"{prefix}NETWORK", f"{prefix}SUBNET"):
        raw = env.get(key)
        if raw is None:
            continue
        try:
            net = ipaddress.ip_interface(raw.strip()).network
        except ValueError:
            net = None
        if not isinstance(net, kind):
            raise UserError(f"{path}: {key}={raw!r} is not an IPv{4 if kind is IPv4Network else 6} CIDR")
        found.append(net)
    if not found:
        return None
    if len(found) == 1:
        given, missing = ("NETWORK", "SUBNET") if f"{prefix}NETWORK" in env else ("SUBNET", "NETWORK")
        raise UserError(f"{path}: {prefix}{given} is set but {prefix}{missing} is missing")
    network, subnet = found
    if not subnet.subnet_of(network):
        raise UserError(f"{path}: {prefix}SUBNET {subnet} is not inside {prefix}NETWORK {network}")
    return network, subnet


def parse_subnet_file(data: bytes | str, path: str = "subnet file") -> SubnetFile:
    """A subnet file's contents as a :class:`SubnetFile`; ``UserError`` naming the bad key otherwise.

    The consumers (the CNI plugin, ``overlayd docker-opts``) need every value to be right, so
    unlike :func:`parse_subnet` this is strict: an IPv4 or an IPv6 pair (network and subnet, the
    subnet inside the network), an MTU, and ``FLANNEL_IPMASQ`` true or false when present.
    """
    env = parse_env(data)
    v4 = _pair(env, "FLANNEL_", IPv4Network, path)
    v6 = _pair(env, "FLANNEL_IPV6_", IPv6Network, path)
    if v4 is None and v6 is None:
        raise UserError(f"{path}: no FLANNEL_NETWORK/FLANNEL_SUBNET (nor the IPV6 pair); is it a subnet file?")
    raw_mtu = env.get("FLANNEL_MTU")
    if raw_mtu is None:
        raise UserError(f"{path}: FLANNEL_MTU is missing")
    try:
        mtu = int(raw_mtu.strip())
    except ValueError:
        raise UserError(f"{path}: FLANNEL_MTU={raw_mtu!r} is not a number") from None
    if not 68 <= mtu <= 65535:
        raise UserError(f"{path}: FLANNEL_MTU={mtu} is outside 68..65535")
    masq = env.get("FLANNEL_IPMASQ", "false").strip().lower()
    if masq not in ("true", "false"):
        raise UserError(f"{path}: FLANNEL_IPMASQ={masq!r} is neither true nor false")
    return SubnetFile(
        network=v4[0] if v4 else None,
        subnet=v4[1] if v4 else None,
        mtu=mtu,
        ip_masq=masq == "true",
        ipv6_network=v6[0] if v6 else None,
        ipv6_subnet=v6[1] if v6 else None,
    )


def load_subnet_file(path: str) -> SubnetFile | None:
    """The subnet file at *path*, or None while it does not exist (the daemon has no lease yet).

    ``UserError`` when something is there but is not a subnet file: not a regular file, too long,
    or values :func:`parse_subnet_file` rejects.
    """
    data = read_bounded(path)
    if data is None:
        if not os.path.lexists(path):
            return None
        raise UserError(f"{path} exists but is not a readable regular file")
    if len(data) > MAX_BYTES:
        raise UserError(f"{path} is longer than any subnet file ({MAX_BYTES} bytes)")
    return parse_subnet_file(data, path)


def docker_options(subnet: SubnetFile) -> list[str]:
    """dockerd flags for this host's lease (what flannel's ``mk-docker-opts.sh`` prints).

    ``--bip`` is the bridge's address (the subnet's first host) and prefix; ``--ip-masq=false``
    when the daemon already masquerades, so traffic is not masqueraded twice.
    """
    if subnet.subnet is None:
        raise UserError("the subnet file has no IPv4 subnet (FLANNEL_SUBNET); dockerd's --bip needs one")
    opts = [f"--bip={subnet.subnet.network_address + 1}/{subnet.subnet.prefixlen}", f"--mtu={subnet.mtu}"]
    if subnet.ip_masq:
        opts.append("--ip-masq=false")
    if subnet.ipv6_subnet is not None:
        opts += ["--ipv6", f"--fixed-cidr-v6={subnet.ipv6_subnet}"]
    return opts


def docker_env_file(opts: list[str]) -> str:
    """*opts* as an environment file for a dockerd unit (``EnvironmentFile=``): the combined
    ``DOCKER_OPTS`` and ``DOCKER_NETWORK_OPTIONS``, and one ``DOCKER_OPT_*`` per option."""
    names = {
        "--bip": "BIP",
        "--mtu": "MTU",
        "--ip-masq": "IPMASQ",
        "--ipv6": "IPV6",
        "--fixed-cidr-v6": "FIXED_CIDR_V6",
    }
    lines = [f'DOCKER_OPT_{names[opt.split("=", 1)[0]]}="{opt}"' for opt in opts]
    joined = " ".join(opts)
    lines += [f'DOCKER_OPTS="{joined}"', f'DOCKER_NETWORK_OPTIONS="{joined}"']
    return "\n".join(lines) + "\n"
