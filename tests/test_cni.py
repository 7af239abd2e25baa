"""overlayd-cni without a kernel: subnet file -> delegate config, version conversion, the CNI error
JSON of the real ``overlayd-cni`` executable, and every document checked against the CNI result
schema (tests/data/cni-result.schema.json, written from the spec).  The same plugin with the real
``bridge`` and ``host-local`` plugins is in test_cni_kernel.py and tests/e2e/test_cni.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from overlayd import cni
from overlayd.errors import UserError
from overlayd.subnetfile import SubnetFile, parse_subnet_file

SCHEMA = json.loads((Path(__file__).parent / "data" / "cni-result.schema.json").read_text())
OVERLAYD_CNI = str(Path(sys.executable).with_name("overlayd-cni"))

SUBNET_ENV = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
DUAL_ENV = SUBNET_ENV + "FLANNEL_IPV6_NETWORK=fd00:10::/56\nFLANNEL_IPV6_SUBNET=fd00:10:0:3::1/64\n"

RESULT_1 = {
    "cniVersion": "1.0.0",
    "interfaces": [
        {"name": "cni0", "mac": "0e:38:06:3a:fc:df"},
        {"name": "veth1234", "mac": "22:ce:b4:41:4c:0a"},
        {"name": "eth0", "mac": "b2:c7:10:74:47:29", "sandbox": "/run/netns/pod"},
    ],
    "ips": [
        {"interface": 2, "address": "10.244.3.2/24", "gateway": "10.244.3.1"},
        {"interface": 2, "address": "fd00:10:0:3::2/64", "gateway": "fd00:10:0:3::1"},
    ],
    "routes": [{"dst": "10.244.0.0/16"}, {"dst": "fd00:10::/56"}],
    "dns": {},
}


def validate(doc: dict[str, Any], definition: str) -> None:
    jsonschema.validate(doc, {"$defs": SCHEMA["$defs"], "$ref": f"#/$defs/{definition}"})


def result_schema(version: str) -> str:
    return "result-1" if version.startswith("1.") else "result-0"


def conf(**extra: Any) -> cni.PluginConfig:
    doc = {"cniVersion": "1.0.0", "name": "overlay", "type": "overlayd-cni", **extra}
    return cni.parse_config(json.dumps(doc).encode())


# -- the subnet file ------------------------------------------------------------------------------


def test_subnet_file_is_parsed_strictly() -> None:
    parsed = parse_subnet_file(DUAL_ENV)
    assert str(parsed.network) == "10.244.0.0/16" and str(parsed.subnet) == "10.244.3.0/24"
    assert parsed.mtu == 1450 and parsed.ip_masq is True
    assert str(parsed.ipv6_subnet) == "fd00:10:0:3::/64"
    assert parse_subnet_file(parsed.render()) == parsed


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_MTU=1450\n", "FLANNEL_NETWORK is set but FLANNEL_SUBNET is missing"),
        ("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.245.0.1/24\nFLANNEL_MTU=1450\n", "is not inside"),
        ("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\n", "FLANNEL_MTU is missing"),
        ("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\nFLANNEL_MTU=9x\n", "is not a number"),
        (
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=1\n",
            "neither",
        ),
        ("FLANNEL_NETWORK=fd00::/56\nFLANNEL_SUBNET=10.244.3.1/24\nFLANNEL_MTU=1450\n", "not an IPv4 CIDR"),
        ("hello\n", "is it a subnet file?"),
    ],
)
def test_subnet_file_errors_name_the_key(text: str, says: str) -> None:
    with pytest.raises(UserError, match=says):
        parse_subnet_file(text, "/run/flannel/subnet.env")


# -- the delegate config --------------------------------------------------------------------------


def test_delegate_config_is_flannels_bridge_with_host_local() -> None:
    generated = cni.delegate_config(conf(), parse_subnet_file(SUBNET_ENV), "1.0.0")
    assert generated == {
        "cniVersion": "1.0.0",
        "name": "overlay",
        "type": "bridge",
        "bridge": "cni0",
        "isGateway": True,
        "mtu": 1450,
        "ipMasq": False,  # the daemon masquerades (FLANNEL_IPMASQ=true): the bridge must not
        "ipam": {
            "type": "host-local",
            "ranges": [[{"subnet": "10.244.3.0/24"}]],
            "routes": [{"dst": "10.244.0.0/16", "gw": "10.244.3.1"}],
        },
    }


def test_bridge_masquerades_when_the_daemon_does_not() -> None:
    subnet = parse_subnet_file(SUBNET_ENV.replace("IPMASQ=true", "IPMASQ=false"))
    assert cni.delegate_config(conf(), subnet, "1.0.0")["ipMasq"] is True


def test_dual_stack_gets_a_range_and_a_route_per_family() -> None:
    ipam = cni.delegate_config(conf(), parse_subnet_file(DUAL_ENV), "0.4.0")["ipam"]
    assert ipam["ranges"] == [[{"subnet": "10.244.3.0/24"}], [{"subnet": "fd00:10:0:3::/64"}]]
    assert ipam["routes"] == [
        {"dst": "10.244.0.0/16", "gw": "10.244.3.1"},
        {"dst": "fd00:10::/56", "gw": "fd00:10:0:3::1"},
    ]


# The subnet files the daemon writes for a dual-stack and an IPv6-only network (V6DESIGN: the first
# address of each subnet, like the IPv4 line; IPv6-only has no FLANNEL_NETWORK/FLANNEL_SUBNET).
V6_LINES = "FLANNEL_IPV6_NETWORK=fd00::/48\nFLANNEL_IPV6_SUBNET=fd00:0:0:1::1/64\n"
DUAL_STACK_ENV = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\n" + V6_LINES + "FLANNEL_MTU=1430\n"
IPV6_ONLY_ENV = V6_LINES + "FLANNEL_MTU=1430\nFLANNEL_IPMASQ=false\n"


def test_dual_stack_subnet_file_gives_two_host_local_ranges_and_both_routes() -> None:
    generated = cni.delegate_config(conf(), parse_subnet_file(DUAL_STACK_ENV), "1.0.0")
    assert generated["ipam"] == {
        "type": "host-local",
        "ranges": [[{"subnet": "10.244.1.0/24"}], [{"subnet": "fd00:0:0:1::/64"}]],
        "routes": [{"dst": "10.244.0.0/16", "gw": "10.244.1.1"}, {"dst": "fd00::/48", "gw": "fd00:0:0:1::1"}],
    }
    assert generated["mtu"] == 1430 and generated["ipMasq"] is True and generated["isGateway"] is True


def test_ipv6_only_subnet_file_gives_one_ipv6_range() -> None:
    generated = cni.delegate_config(conf(), parse_subnet_file(IPV6_ONLY_ENV), "1.0.0")
    assert generated["ipam"]["ranges"] == [[{"subnet": "fd00:0:0:1::/64"}]]
    assert generated["ipam"]["routes"] == [{"dst": "fd00::/48", "gw": "fd00:0:0:1::1"}]
    assert (generated["type"], generated["bridge"], generated["mtu"]) == ("bridge", "cni0", 1430)


def test_top_level_ipam_is_the_base_as_in_flannel() -> None:
    """flannel's conf: a top-level ``ipam`` keeps its keys, its routes come first, ranges are the lease's."""
    user = {"dataDir": "/var/lib/pods", "routes": [{"dst": "::/0"}], "ranges": [[{"subnet": "192.168.0.0/24"}]]}
    generated = cni.delegate_config(conf(ipam=user), parse_subnet_file(DUAL_STACK_ENV), "1.0.0")
    ipam = generated["ipam"]
    assert ipam["type"] == "host-local" and ipam["dataDir"] == "/var/lib/pods"
    assert ipam["ranges"] == [[{"subnet": "10.244.1.0/24"}], [{"subnet": "fd00:0:0:1::/64"}]]
    assert ipam["routes"][0] == {"dst": "::/0"} and len(ipam["routes"]) == 3
    assert (
        cni.delegate_config(conf(ipam={"type": "whereabouts"}), parse_subnet_file(SUBNET_ENV), "1.0.0")["ipam"]["type"]
        == "whereabouts"
    )


@pytest.mark.parametrize("ipam", [[], {"routes": {}}, {"routes": [{"dst": "nowhere"}]}, {"routes": ["::/0"]}])
def test_a_bad_top_level_ipam_is_code_7(ipam: Any) -> None:
    doc = {"cniVersion": "1.0.0", "name": "overlay", "type": "overlayd-cni", "ipam": ipam}
    with pytest.raises(cni.CniError) as caught:
        cni.parse_config(json.dumps(doc).encode())
    assert caught.value.code == cni.INVALID_CONFIG and "ipam" in caught.value.details


def test_a_moved_ipv6_subnet_is_noticed_even_when_ipv4_stayed() -> None:
    saved = cni.delegate_config(conf(), parse_subnet_file(DUAL_STACK_ENV), "1.0.0")
    assert cni.lease_mismatch(saved, parse_subnet_file(DUAL_STACK_ENV)) is None
    moved6 = parse_subnet_file(DUAL_STACK_ENV.replace("fd00:0:0:1::1/64", "fd00:0:0:9::1/64"))
    assert "fd00:0:0:1::/64" in (cni.lease_mismatch(saved, moved6) or "")
    only6 = cni.delegate_config(conf(), parse_subnet_file(IPV6_ONLY_ENV), "1.0.0")
    assert cni.lease_mismatch(only6, parse_subnet_file(IPV6_ONLY_ENV)) is None
    assert cni.lease_mismatch(only6, parse_subnet_file(SUBNET_ENV)) is not None


def test_delegate_is_merged_key_by_key_but_name_and_version_are_the_runtimes() -> None:
    delegate = {
        "bridge": "br-pods",
        "hairpinMode": True,
        "ipam": {"dataDir": "/var/lib/pods"},
        "name": "other",
        "cniVersion": "0.1.0",
    }
    generated = cni.delegate_config(conf(delegate=delegate, args={"x": 1}), parse_subnet_file(SUBNET_ENV), "1.0.0")
    assert generated["bridge"] == "br-pods" and generated["hairpinMode"] is True
    assert generated["ipam"]["dataDir"] == "/var/lib/pods"
    assert generated["ipam"]["ranges"] == [[{"subnet": "10.244.3.0/24"}]]  # kept under the merged key
    assert (generated["name"], generated["cniVersion"]) == ("overlay", "1.0.0")
    assert generated["args"] == {"x": 1}


def test_a_non_bridge_delegate_gets_no_bridge_keys() -> None:
    generated = cni.delegate_config(conf(delegate={"type": "ptp"}), parse_subnet_file(SUBNET_ENV), "1.0.0")
    assert generated["type"] == "ptp" and "bridge" not in generated and "isGateway" not in generated


def test_a_changed_lease_is_noticed() -> None:
    saved = cni.delegate_config(conf(), parse_subnet_file(SUBNET_ENV), "1.0.0")
    assert cni.lease_mismatch(saved, parse_subnet_file(SUBNET_ENV)) is None
    moved = parse_subnet_file(SUBNET_ENV.replace("10.244.3.1/24", "10.244.9.1/24"))
    assert "10.244.3.0/24" in (cni.lease_mismatch(saved, moved) or "")


# -- versions -------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", cni.SUPPORTED_VERSIONS)
def test_results_convert_to_every_supported_version(version: str) -> None:
    converted = cni.convert_result(RESULT_1, version)
    validate(converted, result_schema(version))
    assert converted["cniVersion"] == version
    back = cni.convert_result(converted, "1.0.0")
    assert back == RESULT_1


def test_0x_results_carry_the_ip_family() -> None:
    ips = cni.convert_result(RESULT_1, "0.3.1")["ips"]
    assert [ip["version"] for ip in ips] == ["4", "6"]
    assert all("version" not in ip for ip in cni.convert_result({**RESULT_1, "ips": ips}, "1.1.0")["ips"])


def test_11_fields_are_dropped_for_older_versions() -> None:
    newer = {
        **RESULT_1,
        "cniVersion": "1.1.0",
        "interfaces": [{"name": "eth0", "mtu": 1450, "socketPath": "/x"}],
        "routes": [{"dst": "10.244.0.0/16", "table": 100, "mtu": 1400}],
    }
    validate(newer, "result-1")
    older = cni.convert_result(newer, "1.0.0")
    assert older["interfaces"] == [{"name": "eth0"}] and older["routes"] == [{"dst": "10.244.0.0/16"}]
    validate(cni.convert_result(newer, "0.4.0"), "result-0")


@pytest.mark.parametrize(
    ("requested", "supported", "chosen"),
    [
        ("1.0.0", ["0.3.1", "0.4.0", "1.0.0"], "1.0.0"),
        ("1.1.0", ["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0"], "1.0.0"),  # Debian's plugins 1.1.1
        ("0.3.1", ["1.0.0", "1.1.0"], "1.0.0"),
        ("0.4.0", ["0.3.0", "0.3.1", "1.0.0"], "0.3.1"),
    ],
)
def test_delegate_version_negotiation(requested: str, supported: list[str], chosen: str) -> None:
    assert cni.negotiate(requested, supported) == chosen


def test_negotiation_fails_with_code_1_when_nothing_fits() -> None:
    with pytest.raises(cni.CniError) as info:
        cni.negotiate("1.0.0", ["0.1.0", "0.2.0"])
    assert info.value.code == cni.INCOMPATIBLE_VERSION


# -- the executable: error JSON, VERSION, STATUS ------------------------------------------------


def plugin(command: str, stdin: dict[str, Any] | str, **env: str) -> tuple[int, dict[str, Any] | None, str]:
    """Run the real overlayd-cni; (exit code, parsed stdout or None, stderr)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
    if command:
        full["CNI_COMMAND"] = command
    full.update(env)
    data = stdin if isinstance(stdin, str) else json.dumps(stdin)
    proc = subprocess.run([OVERLAYD_CNI], input=data, capture_output=True, text=True, env=full, timeout=60)
    out = json.loads(proc.stdout) if proc.stdout.strip() else None
    return proc.returncode, out, proc.stderr


def add_env(tmp_path: Path) -> dict[str, str]:
    """A call's environment whose CNI_PATH has no plugins: these tests run in the caller's
    namespace, where a real bridge plugin must never run (it would make cni0 there)."""
    netns = tmp_path / "netns"
    netns.touch()
    return {"CNI_CONTAINERID": "c1", "CNI_NETNS": str(netns), "CNI_IFNAME": "eth0", "CNI_PATH": str(tmp_path / "none")}


def network(tmp_path: Path, version: str = "1.0.0", **extra: Any) -> dict[str, Any]:
    return {
        "cniVersion": version,
        "name": "overlay",
        "type": "overlayd-cni",
        "subnetFile": str(tmp_path / "subnet.env"),
        "dataDir": str(tmp_path / "state"),
        **extra,
    }


def assert_error(code: int, out: dict[str, Any] | None, exit_code: int, want: int) -> dict[str, Any]:
    assert exit_code != 0 and out is not None, out
    validate(out, "error")
    assert out["code"] == want, out
    return out


def test_add_without_a_subnet_file_waits_then_says_the_daemon_has_no_lease(tmp_path: Path) -> None:
    start = time.monotonic()
    code, out, _ = plugin("ADD", network(tmp_path, subnetFileWait=0.5), **add_env(tmp_path))
    waited = time.monotonic() - start
    error = assert_error(code, out, code, cni.TRY_AGAIN_LATER)
    assert error["cniVersion"] == "1.0.0"
    assert "overlayd has no lease yet" in error["msg"] and "overlayd status" in error["msg"]
    assert str(tmp_path / "subnet.env") in error["msg"]
    assert waited >= 0.5
    assert not (tmp_path / "state").exists()  # nothing saved for a container that was never added


def test_add_picks_up_a_subnet_file_that_appears_while_it_waits(tmp_path: Path) -> None:
    """The wait is real: the file arriving during it gets the call past the lease check, to the
    delegate lookup (an empty CNI_PATH here, so no plugin runs in this namespace)."""
    env = {**os.environ, "CNI_COMMAND": "ADD", **add_env(tmp_path)}
    proc = subprocess.Popen([OVERLAYD_CNI], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(json.dumps(network(tmp_path, subnetFileWait=20)))
    proc.stdin.close()
    time.sleep(0.5)
    (tmp_path / "subnet.env").write_text(SUBNET_ENV)
    out = json.loads(proc.stdout.read())
    assert proc.wait(30) != 0
    assert out["code"] == cni.INVALID_ENVIRONMENT and "bridge plugin is not on CNI_PATH" in out["msg"], out


@pytest.mark.parametrize(
    ("stdin", "want", "says"),
    [
        ("{not json", cni.DECODE_FAILURE, "failed to decode"),
        ("[]", cni.DECODE_FAILURE, "failed to decode"),
        ({"cniVersion": "0.2.0", "name": "n"}, cni.INCOMPATIBLE_VERSION, "0.2.0"),
        ({"name": "n"}, cni.INCOMPATIBLE_VERSION, "0.1.0"),
        ({"cniVersion": "1.0.0"}, cni.INVALID_CONFIG, "name"),
        ({"cniVersion": "1.0.0", "name": "n", "delegate": []}, cni.INVALID_CONFIG, "delegate"),
        ({"cniVersion": "1.0.0", "name": "n", "subnetFileWait": "5"}, cni.INVALID_CONFIG, "subnetFileWait"),
        ({"cniVersion": "1.0.0", "name": "n", "delegate": {"type": "../x"}}, cni.INVALID_CONFIG, "delegate.type"),
    ],
)
def test_bad_config_gives_the_specs_error_codes(tmp_path: Path, stdin: Any, want: int, says: str) -> None:
    code, out, _ = plugin("ADD", stdin, **add_env(tmp_path))
    error = assert_error(code, out, code, want)
    assert says in error["msg"] + error.get("details", "")


@pytest.mark.parametrize(
    ("drop", "override", "says"),
    [
        ("CNI_NETNS", {}, "CNI_NETNS is required"),
        ("CNI_PATH", {}, "CNI_PATH is required"),
        (None, {"CNI_CONTAINERID": "-bad id"}, "CNI_CONTAINERID"),
        (None, {"CNI_IFNAME": "a/b"}, "CNI_IFNAME"),
        (None, {"CNI_IFNAME": "x" * 16}, "CNI_IFNAME"),
        (None, {"CNI_COMMAND": "FROB"}, "CNI_COMMAND"),
    ],
)
def test_bad_environment_gives_code_4(tmp_path: Path, drop: str | None, override: dict[str, str], says: str) -> None:
    env = {**add_env(tmp_path), **override}
    if drop:
        del env[drop]
    code, out, _ = plugin(env.pop("CNI_COMMAND", "ADD"), network(tmp_path), **env)
    error = assert_error(code, out, code, cni.INVALID_ENVIRONMENT)
    assert says in error["details"]


def test_a_missing_delegate_names_cni_path(tmp_path: Path) -> None:
    (tmp_path / "subnet.env").write_text(SUBNET_ENV)
    code, out, _ = plugin("ADD", network(tmp_path), **add_env(tmp_path))
    error = assert_error(code, out, code, cni.INVALID_ENVIRONMENT)
    assert "bridge" in error["msg"] and "CNI_PATH" in error["msg"]


def test_check_needs_04_and_a_prev_result(tmp_path: Path) -> None:
    code, out, _ = plugin("CHECK", network(tmp_path, "0.3.1"), **add_env(tmp_path))
    assert_error(code, out, code, cni.INCOMPATIBLE_VERSION)
    code, out, _ = plugin("CHECK", network(tmp_path), **add_env(tmp_path))
    assert_error(code, out, code, cni.INVALID_CONFIG)
    code, out, _ = plugin("CHECK", network(tmp_path, prevResult=RESULT_1), **add_env(tmp_path))
    assert_error(code, out, code, cni.UNKNOWN_CONTAINER)


def test_del_with_nothing_to_undo_succeeds(tmp_path: Path) -> None:
    env = add_env(tmp_path)
    del env["CNI_NETNS"]  # optional for DEL
    for _ in range(2):
        code, out, _ = plugin("DEL", network(tmp_path), **env)
        assert (code, out) == (0, None)


@pytest.mark.parametrize("requested", [None, *cni.SUPPORTED_VERSIONS, "9.9.9"])
def test_version(requested: str | None) -> None:
    code, out, _ = plugin("VERSION", {"cniVersion": requested} if requested else "")
    assert code == 0 and out is not None
    validate(out, "version")
    assert out["supportedVersions"] == ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
    assert out["cniVersion"] == (requested if requested in cni.SUPPORTED_VERSIONS else "1.1.0")


def test_status_reports_whether_adds_can_succeed(tmp_path: Path) -> None:
    code, out, _ = plugin("STATUS", network(tmp_path, "1.1.0"))
    error = assert_error(code, out, code, cni.NOT_AVAILABLE)
    assert "overlayd has no lease yet" in error["msg"]
    (tmp_path / "subnet.env").write_text(SUBNET_ENV)
    assert plugin("STATUS", network(tmp_path, "1.1.0"))[:2] == (0, None)
    code, out, _ = plugin("STATUS", network(tmp_path, "1.0.0"))
    assert_error(code, out, code, cni.INCOMPATIBLE_VERSION)


def test_without_cni_command_it_explains_itself() -> None:
    code, out, err = plugin("", "")
    assert code == 0 and out is None
    assert "CNI versions 0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0" in err


def test_subnet_file_shape_matches_the_daemons_writer() -> None:
    written = SubnetFile(
        network=parse_subnet_file(SUBNET_ENV).network,
        subnet=parse_subnet_file(SUBNET_ENV).subnet,
        mtu=1400,
        ip_masq=False,
    ).render()
    assert cni.delegate_config(conf(), parse_subnet_file(written), "1.0.0")["mtu"] == 1400


# -- the examples -------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def daemonset_and_config() -> tuple[dict[str, Any], dict[str, Any]]:
    import yaml

    docs = [d for d in yaml.safe_load_all((ROOT / "examples" / "kubernetes" / "overlayd.yaml").read_text()) if d]
    [daemonset] = [d for d in docs if d["kind"] == "DaemonSet"]
    [configmap] = [d for d in docs if d["kind"] == "ConfigMap"]
    return daemonset, configmap


def test_the_manifests_conflist_is_the_example() -> None:
    """tests/test_cni_kernel.py runs examples/cni/10-overlayd.conflist with the real plugins; the
    DaemonSet installs the same document."""
    daemonset, configmap = daemonset_and_config()
    example = json.loads((ROOT / "examples" / "cni" / "10-overlayd.conflist").read_text())
    assert json.loads(configmap["data"]["10-overlayd.conflist"]) == example
    [install] = [c for c in daemonset["spec"]["template"]["spec"]["initContainers"] if c["name"] == "install-cni"]
    assert install["command"][-1] == "/etc/cni/net.d/10-overlayd.conflist"


def test_the_init_containers_install_script_installs_a_working_plugin(tmp_path: Path) -> None:
    """The install-cni-plugin script, run against a stand-in image root and host paths under
    tmp_path (twice: an upgrade), leaves one runtime and a shim that answers VERSION."""
    daemonset, _ = daemonset_and_config()
    [install] = [
        c for c in daemonset["spec"]["template"]["spec"]["initContainers"] if c["name"] == "install-cni-plugin"
    ]
    script = install["command"][-1]
    image = tmp_path / "image"
    (image / "bin").mkdir(parents=True)
    (image / "lib").mkdir()
    (image / "bin" / "python3").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    (image / "bin" / "python3").chmod(0o755)
    (tmp_path / "opt" / "overlayd").mkdir(parents=True)
    (tmp_path / "cni-bin").mkdir()
    paths = {
        "/host/opt/overlayd": f"{tmp_path}/opt/overlayd",
        "/opt/overlayd/current": f"{tmp_path}/opt/overlayd/current",
        "/host/opt/cni/bin": f"{tmp_path}/cni-bin",
        "/usr/local": str(image),
    }
    script = re.sub("|".join(map(re.escape, paths)), lambda m: paths[m.group(0)], script)
    for _ in range(2):
        subprocess.run(["/bin/sh", "-c", script], check=True, timeout=60)
    runtimes = sorted(p.name for p in (tmp_path / "opt" / "overlayd").iterdir())
    assert len(runtimes) == 2 and runtimes[0] == "current" and runtimes[1].startswith("runtime-"), runtimes
    shim = tmp_path / "cni-bin" / "overlayd-cni"
    proc = subprocess.run(
        [str(shim)], input='{"cniVersion": "1.0.0"}', env={"CNI_COMMAND": "VERSION"}, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["supportedVersions"][-1] == "1.1.0"
