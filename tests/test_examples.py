"""The deployment examples are valid: the Kubernetes manifests against the Kubernetes schemas,
the systemd unit's command line and the TOML configs against overlayd's own CLI."""

from __future__ import annotations

import configparser
import os
import shlex
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "examples" / "kubernetes" / "overlayd.yaml"
OVERLAYD = [sys.executable, "-c", "from overlayd.cli import main; main()"]


def overlayd(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OVERLAYD_")}
    return subprocess.run([*OVERLAYD, *args], capture_output=True, text=True, env=env, timeout=60)


def manifests() -> list[dict[str, object]]:
    return [doc for doc in yaml.safe_load_all(MANIFEST.read_text()) if doc]


@pytest.mark.parametrize("doc", manifests(), ids=lambda d: f"{d['kind']}")
def test_manifest_is_valid_kubernetes(doc: dict[str, object]) -> None:
    kubernetes_validate.validate(doc, latest_version(), strict=True)


def test_manifest_has_the_expected_objects() -> None:
    kinds = [doc["kind"] for doc in manifests()]
    assert kinds == ["Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet"]


def test_rbac_grants_what_the_kubernetes_store_needs() -> None:
    [daemonset] = [doc for doc in manifests() if doc["kind"] == "DaemonSet"]
    [configmap] = [doc for doc in manifests() if doc["kind"] == "ConfigMap"]
    assert 'store = "kubernetes"' in configmap["data"]["overlayd.toml"]  # type: ignore[index]
    [role] = [doc for doc in manifests() if doc["kind"] == "ClusterRole"]
    granted = {(res, verb) for rule in role["rules"] for res in rule["resources"] for verb in rule["verbs"]}  # type: ignore[attr-defined]
    needed = {("nodes", v) for v in ("get", "list", "watch", "patch")} | {("nodes/status", "patch")}
    assert needed <= granted
    [binding] = [doc for doc in manifests() if doc["kind"] == "ClusterRoleBinding"]
    account = daemonset["spec"]["template"]["spec"]["serviceAccountName"]  # type: ignore[index]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": "kube-overlayd"}]
    env = {e["name"] for e in daemonset["spec"]["template"]["spec"]["containers"][0]["env"]}  # type: ignore[index]
    assert "NODE_NAME" in env


def test_configmap_toml_is_accepted_by_the_cli(tmp_path: Path) -> None:
    [configmap] = [doc for doc in manifests() if doc["kind"] == "ConfigMap"]
    config = tmp_path / "overlayd.toml"
    config.write_text(configmap["data"]["overlayd.toml"])  # type: ignore[index]
    result = overlayd("--config", str(config), "run", "--help")
    assert result.returncode == 0, result.stderr


def test_daemonset_command_matches_the_cli(tmp_path: Path) -> None:
    [daemonset] = [doc for doc in manifests() if doc["kind"] == "DaemonSet"]
    command = daemonset["spec"]["template"]["spec"]["containers"][0]["command"]  # type: ignore[index]
    assert command[0] == "overlayd"
    args = [a if a != "/etc/overlayd/overlayd.toml" else str(ROOT / "examples/systemd/overlayd.toml") for a in command]
    result = overlayd(*args[1:], "--help")
    assert result.returncode == 0, result.stderr


def test_systemd_unit_command_line_and_config() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(ROOT / "examples" / "systemd" / "overlayd.service")
    argv = shlex.split(unit["Service"]["ExecStart"])
    assert argv[0].endswith("/overlayd")
    argv = [a.replace("/etc/overlayd/overlayd.toml", str(ROOT / "examples/systemd/overlayd.toml")) for a in argv]
    result = overlayd(*argv[1:], "--help")
    assert result.returncode == 0, result.stderr
    assert unit["Service"]["RuntimeDirectory"] == "flannel"  # where the subnet file goes


def test_a_broken_toml_would_be_caught(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('stor = "etcd"\n')
    result = overlayd("--config", str(config), "run", "--help")
    assert result.returncode == 2 and "unknown setting(s) stor" in result.stderr
