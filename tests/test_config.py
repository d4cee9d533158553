"""Flags, KubeProxyConfiguration files, defaults and validation against upstream."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from kproxy.config import (
    API_VERSION,
    ProxyConfig,
    build_parser,
    format_duration,
    load_config,
    load_config_file,
    node_name,
    parse_duration,
    to_kube_proxy_configuration,
    write_config,
)
from kproxy.errors import ConfigError

# -- durations ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0", 0.0),
        ("0s", 0.0),
        ("500ms", 0.5),
        ("30s", 30.0),
        ("1h", 3600.0),
        ("1m30s", 90.0),
        ("1h2m3s", 3723.0),
        ("1.5h", 5400.0),
        ("2h45m", 9900.0),
        ("250ms", 0.25),
        ("100us", 0.0001),
        ("100µs", 0.0001),
        ("10ns", 1e-8),
        ("-1.5s", -1.5),
        ("+5s", 5.0),
        (".5s", 0.5),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "1d", "s", "1.2.3s", "abc", "1h 30m", "-", "30 s"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match="invalid duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (30, "30s"),
        (3600, "1h0m0s"),
        (86400, "24h0m0s"),
        (900, "15m0s"),
        (0.25, "250ms"),
        (90, "1m30s"),
        (1.5, "1.5s"),
    ],
)
def test_format_duration_like_go(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@given(st.integers(min_value=0, max_value=10**15))
def test_duration_round_trip(ns: int) -> None:
    seconds = ns / 1e9
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds, abs=1e-9)


# -- defaults (upstream v1alpha1 defaults.go and options.go) -----------------------------


def test_defaults_match_upstream() -> None:
    cfg = load_config([])
    assert cfg.mode == "iptables"
    assert cfg.bind_address == "0.0.0.0"
    assert cfg.healthz_bind_address == "0.0.0.0:10256"
    assert cfg.metrics_bind_address == "127.0.0.1:10249"
    assert cfg.detect_local_mode == "ClusterCIDR"
    assert cfg.cluster_cidrs == ()
    assert cfg.nodeport_addresses == ()
    assert cfg.masquerade_all is False
    assert cfg.iptables_masquerade_bit == 14
    assert cfg.iptables_sync_period == 30.0
    assert cfg.iptables_min_sync_period == 1.0
    assert cfg.iptables_localhost_nodeports is True
    assert cfg.ipvs_scheduler == "rr"
    assert cfg.ipvs_sync_period == 30.0
    assert cfg.ipvs_min_sync_period == 0.0
    assert cfg.ipvs_strict_arp is False
    assert (cfg.ipvs_tcp_timeout, cfg.ipvs_tcpfin_timeout, cfg.ipvs_udp_timeout) == (0, 0, 0)
    assert cfg.conntrack_max_per_core == 32768
    assert cfg.conntrack_min == 131072
    assert cfg.conntrack_tcp_timeout_established == 24 * 3600
    assert cfg.conntrack_tcp_timeout_close_wait == 3600
    assert cfg.conntrack_tcp_be_liberal is False
    assert cfg.conntrack_udp_timeout == 0
    assert cfg.conntrack_udp_timeout_stream == 0
    assert cfg.config_sync_period == 15 * 60
    assert cfg.kube_api_qps == 5.0
    assert cfg.kube_api_burst == 10
    assert cfg.oom_score_adj == -999
    assert cfg.verbosity == 0
    assert cfg.cleanup is False
    assert cfg.sync_period == 30.0 and cfg.min_sync_period == 1.0
    assert cfg.health_timeout == 60.0
    assert cfg == ProxyConfig()


def test_empty_config_file_gets_upstream_defaults(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(f"apiVersion: {API_VERSION}\nkind: KubeProxyConfiguration\n")
    cfg = load_config(["--config", str(f)])
    assert cfg == ProxyConfig(config_file=str(f))


# -- flags --------------------------------------------------------------------------------


def test_flags_are_parsed() -> None:
    cfg = load_config(
        [
            "--proxy-mode=nftables",
            "--cluster-cidr",
            "10.244.0.0/16,fd00:10:244::/56",
            "--detect-local-mode",
            "InterfaceNamePrefix",
            "--pod-interface-name-prefix",
            "veth",
            "--nodeport-addresses",
            "10.0.0.0/8",
            "--nodeport-addresses=192.168.0.0/16,172.16.0.0/12",
            "--masquerade-all",
            "--iptables-masquerade-bit",
            "5",
            "--iptables-sync-period",
            "1m",
            "--iptables-min-sync-period=500ms",
            "--iptables-localhost-nodeports=false",
            "--conntrack-max-per-core",
            "0",
            "--conntrack-tcp-timeout-established",
            "2h",
            "--conntrack-tcp-be-liberal",
            "--conntrack-udp-timeout-stream",
            "2m",
            "--config-sync-period",
            "5m",
            "--manifests",
            "a.yaml",
            "--manifests",
            "dir/",
            "--kube-api-qps",
            "20",
            "--v",
            "3",
        ]
    )
    assert cfg.mode == "nftables"
    assert cfg.cluster_cidrs == ("10.244.0.0/16", "fd00:10:244::/56")
    assert cfg.detect_local_mode == "InterfaceNamePrefix"
    assert cfg.pod_interface_name_prefix == "veth"
    assert cfg.nodeport_addresses == ("10.0.0.0/8", "192.168.0.0/16", "172.16.0.0/12")
    assert cfg.masquerade_all is True
    assert cfg.masquerade_bit == 5
    assert cfg.sync_period == 60.0 and cfg.min_sync_period == 0.5
    assert cfg.iptables_localhost_nodeports is False
    assert cfg.conntrack_max_per_core == 0
    assert cfg.conntrack_tcp_timeout_established == 7200
    assert cfg.conntrack_tcp_be_liberal is True
    assert cfg.conntrack_udp_timeout_stream == 120
    assert cfg.config_sync_period == 300
    assert cfg.manifests == ("a.yaml", "dir/")
    assert cfg.kube_api_qps == 20.0
    assert cfg.verbosity == 3


@pytest.mark.parametrize("argv", [["-v", "4"], ["-v4"], ["--v", "4"], ["--v=4"], ["-v=4"]])
def test_verbosity_spellings(argv: list[str]) -> None:
    assert load_config(argv).verbosity == 4


def test_ipvs_flags_drive_ipvs_mode_and_iptables_flags_the_others() -> None:
    cfg = load_config(
        ["--proxy-mode", "ipvs", "--ipvs-sync-period", "10s", "--iptables-sync-period", "20s"]
    )
    assert cfg.sync_period == 10.0
    assert cfg.min_sync_period == 0.0
    cfg = load_config(["--ipvs-sync-period", "10s", "--iptables-sync-period", "20s"])
    assert cfg.sync_period == 20.0


def test_ipvs_flags() -> None:
    cfg = load_config(
        [
            "--proxy-mode=ipvs",
            "--ipvs-scheduler=wrr",
            "--ipvs-strict-arp",
            "--ipvs-exclude-cidrs=10.1.0.0/16,10.2.0.0/16",
            "--ipvs-tcp-timeout=900s",
            "--ipvs-tcpfin-timeout=120s",
            "--ipvs-udp-timeout=300s",
            "--ipvs-min-sync-period=2s",
        ]
    )
    assert cfg.ipvs_scheduler == "wrr"
    assert cfg.ipvs_strict_arp is True
    assert cfg.ipvs_exclude_cidrs == ("10.1.0.0/16", "10.2.0.0/16")
    assert (cfg.ipvs_tcp_timeout, cfg.ipvs_tcpfin_timeout, cfg.ipvs_udp_timeout) == (
        900,
        120,
        300,
    )
    assert cfg.min_sync_period == 2.0


def test_bind_addresses_without_port_get_the_default_port() -> None:
    cfg = load_config(["--healthz-bind-address", "0.0.0.0", "--metrics-bind-address", "::1"])
    assert cfg.healthz_bind_address == "0.0.0.0:10256"
    assert cfg.metrics_bind_address == "[::1]:10249"


def test_empty_metrics_address_or_port_zero_disables() -> None:
    assert load_config(["--metrics-bind-address="]).metrics_bind_address == ""
    assert load_config(["--healthz-port=0"]).healthz_bind_address == ""


def test_userspace_mode_is_allowed() -> None:
    assert load_config(["--proxy-mode", "userspace"]).mode == "userspace"


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["--iptables-masquerade-bit", "32"], "--iptables-masquerade-bit: must be within [0, 31]"),
        (["--iptables-masquerade-bit", "-1"], "--iptables-masquerade-bit"),
        (["--iptables-sync-period", "0"], "--iptables-sync-period: must be greater than 0"),
        (["--iptables-sync-period", "soon"], "--iptables-sync-period"),
        (["--iptables-min-sync-period", "1m"], "--iptables-sync-period"),
        (["--iptables-min-sync-period", "-1s"], "--iptables-min-sync-period"),
        (["--proxy-mode", "kernelspace"], "--proxy-mode"),
        (["--cluster-cidr", "10.0.0.0/33"], "--cluster-cidr"),
        (["--cluster-cidr", "10.0.0.0/8,10.1.0.0/16"], "--cluster-cidr"),
        (["--cluster-cidr", "10.0.0.0/8,fd00::/8,fd01::/8"], "--cluster-cidr"),
        (["--detect-local-mode", "Magic"], "--detect-local-mode"),
        (["--detect-local-mode", "BridgeInterface"], "--pod-bridge-interface"),
        (["--detect-local-mode", "InterfaceNamePrefix"], "--pod-interface-name-prefix"),
        (["--nodeport-addresses", "10.0.0.1"], "--nodeport-addresses"),
        (["--nodeport-addresses", "primary,10.0.0.0/8"], "--nodeport-addresses"),
        (["--bind-address", "nope"], "--bind-address"),
        (["--healthz-bind-address", "1.2.3.4:99999"], "--healthz-bind-address"),
        (["--metrics-bind-address", "localhost:10249"], "--metrics-bind-address"),
        (["--config-sync-period", "0s"], "--config-sync-period"),
        (["--conntrack-min", "-1"], "--conntrack-min"),
        (["--conntrack-tcp-timeout-close-wait", "-1s"], "--conntrack-tcp-timeout-close-wait"),
        (["--proxy-mode=ipvs", "--ipvs-scheduler", "fifo"], "--ipvs-scheduler"),
        (["--proxy-mode=ipvs", "--ipvs-sync-period", "0s"], "--ipvs-sync-period"),
        (["--ipvs-exclude-cidrs", "bad"], "--ipvs-exclude-cidrs"),
        (["--hostname-override", "   "], "--hostname-override"),
        (["--masquerade-all=maybe"], "--masquerade-all"),
        (["--no-such-flag"], "--no-such-flag"),
    ],
)
def test_bad_flags_name_the_flag(argv: list[str], names: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(argv)
    assert names in str(exc.value)


def test_parser_does_not_exit() -> None:
    with pytest.raises(ConfigError):
        build_parser().parse_args(["--iptables-masquerade-bit"])


# -- node name ----------------------------------------------------------------------------


def test_node_name() -> None:
    assert load_config(["--hostname-override", "  Node-A "]).node_name == "node-a"
    assert load_config([]).node_name == socket.gethostname().strip().lower()
    assert node_name("") == socket.gethostname().strip().lower()


# -- config files -------------------------------------------------------------------------


def write(tmp_path: Path, body: str) -> str:
    f = tmp_path / "kube-proxy.yaml"
    f.write_text(f"apiVersion: {API_VERSION}\nkind: KubeProxyConfiguration\n{body}")
    return str(f)


def test_config_file_fields(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
mode: ipvs
bindAddress: 10.0.0.5
clusterCIDR: 10.244.0.0/16
hostnameOverride: file-node
healthzBindAddress: 0.0.0.0:12345
metricsBindAddress: 0.0.0.0
detectLocalMode: BridgeInterface
detectLocal:
  bridgeInterface: cbr0
nodePortAddresses: [primary]
clientConnection:
  kubeconfig: /etc/kubeconfig
  qps: 50
  burst: 100
iptables:
  masqueradeAll: true
  masqueradeBit: 12
ipvs:
  scheduler: lc
  syncPeriod: 45s
  minSyncPeriod: 5s
  strictARP: true
  excludeCIDRs: [10.9.0.0/16]
conntrack:
  maxPerCore: 0
  tcpEstablishedTimeout: 0s
  udpTimeout: 30s
configSyncPeriod: 1m
logging:
  verbosity: 2
""",
    )
    cfg = load_config(["--config", path])
    assert cfg.mode == "ipvs"
    assert cfg.bind_address == "10.0.0.5"
    assert cfg.cluster_cidrs == ("10.244.0.0/16",)
    assert cfg.hostname_override == "file-node"
    assert cfg.healthz_bind_address == "0.0.0.0:12345"
    assert cfg.metrics_bind_address == "0.0.0.0:10249"
    assert cfg.detect_local_mode == "BridgeInterface"
    assert cfg.pod_bridge_interface == "cbr0"
    assert cfg.nodeport_addresses == ("primary",)
    assert cfg.kubeconfig == "/etc/kubeconfig"
    assert (cfg.kube_api_qps, cfg.kube_api_burst) == (50.0, 100)
    assert cfg.masquerade_all is True
    assert cfg.iptables_masquerade_bit == 12
    assert cfg.ipvs_scheduler == "lc"
    assert cfg.sync_period == 45.0 and cfg.min_sync_period == 5.0
    assert cfg.ipvs_strict_arp is True
    assert cfg.ipvs_exclude_cidrs == ("10.9.0.0/16",)
    assert cfg.conntrack_max_per_core == 0  # explicit 0 kept (pointer field upstream)
    assert cfg.conntrack_tcp_timeout_established == 0
    assert cfg.conntrack_min == 131072
    assert cfg.conntrack_udp_timeout == 30
    assert cfg.config_sync_period == 60
    assert cfg.verbosity == 2


def test_config_file_zero_periods_mean_default_as_upstream(tmp_path: Path) -> None:
    path = write(tmp_path, "iptables:\n  syncPeriod: 0s\n  minSyncPeriod: 0s\n")
    cfg = load_config_file(path)
    assert (cfg.iptables_sync_period, cfg.iptables_min_sync_period) == (30.0, 1.0)


def test_config_file_ipv6_bind_address_defaults(tmp_path: Path) -> None:
    cfg = load_config_file(write(tmp_path, "bindAddress: '::'\n"))
    assert cfg.healthz_bind_address == "[::]:10256"
    assert cfg.metrics_bind_address == "[::1]:10249"


def test_config_file_userspace_and_nftables(tmp_path: Path) -> None:
    assert load_config_file(write(tmp_path, "mode: userspace\n")).mode == "userspace"
    cfg = load_config_file(
        write(tmp_path, "mode: nftables\nnftables:\n  masqueradeAll: true\n  syncPeriod: 10s\n")
    )
    assert cfg.mode == "nftables"
    assert cfg.masquerade_all is True
    assert cfg.sync_period == 10.0


def test_upstream_generated_default_file_loads(tmp_path: Path) -> None:
    # what `kube-proxy --write-config-to` writes (upstream testdata after/v1alpha1.yaml)
    text = """apiVersion: kubeproxy.config.k8s.io/v1alpha1
bindAddress: 0.0.0.0
bindAddressHardFail: false
clientConnection:
  acceptContentTypes: ""
  burst: 10
  contentType: application/vnd.kubernetes.protobuf
  kubeconfig: ""
  qps: 5
clusterCIDR: ""
configSyncPeriod: 15m0s
conntrack:
  maxPerCore: 32768
  min: 131072
  tcpBeLiberal: false
  tcpCloseWaitTimeout: 1h0m0s
  tcpEstablishedTimeout: 24h0m0s
  udpStreamTimeout: 0s
  udpTimeout: 0s
detectLocal:
  bridgeInterface: ""
  interfaceNamePrefix: ""
detectLocalMode: ""
enableProfiling: false
healthzBindAddress: 0.0.0.0:10256
hostnameOverride: ""
iptables:
  localhostNodePorts: true
  masqueradeAll: false
  masqueradeBit: 14
  minSyncPeriod: 1s
  syncPeriod: 30s
ipvs:
  excludeCIDRs: null
  minSyncPeriod: 0s
  scheduler: ""
  strictARP: false
  syncPeriod: 30s
  tcpFinTimeout: 0s
  tcpTimeout: 0s
  udpTimeout: 0s
kind: KubeProxyConfiguration
logging:
  flushFrequency: 5s
  format: text
  options:
    json:
      infoBufferSize: "0"
    text:
      infoBufferSize: "0"
  verbosity: 0
metricsBindAddress: 127.0.0.1:10249
mode: ""
nftables:
  masqueradeAll: false
  masqueradeBit: 14
  minSyncPeriod: 1s
  syncPeriod: 30s
nodePortAddresses: null
oomScoreAdj: -999
portRange: ""
showHiddenMetricsForVersion: ""
winkernel:
  enableDSR: false
  networkName: ""
  sourceVip: ""
"""
    f = tmp_path / "upstream.yaml"
    f.write_text(text)
    assert load_config_file(f) == ProxyConfig(config_file=str(f))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("iptables:\n  masqueradeBit: 40\n", "iptables.masqueradeBit: must be within [0, 31]"),
        ("iptables:\n  masqueradeBit: x\n", "iptables.masqueradeBit: must be an integer"),
        ("iptables:\n  syncPeriod: 30\n", "iptables.syncPeriod: must be a duration"),
        ("iptables:\n  syncPeriod: 5s\n  minSyncPeriod: 10s\n", "iptables.syncPeriod"),
        ("iptables:\n  bogus: 1\n", "iptables.bogus: unknown field"),
        ("bogus: 1\n", "bogus: unknown field"),
        ("mode: kernelspace\n", "mode: must be one of"),
        ("clusterCIDR: nope\n", "clusterCIDR"),
        ("nodePortAddresses: [10.0.0.0]\n", "nodePortAddresses"),
        ("nodePortAddresses: 10.0.0.0/8\n", "nodePortAddresses: must be a list"),
        ("conntrack:\n  min: -5\n", "conntrack.min"),
        ("conntrack:\n  tcpBeLiberal: 'yes'\n", "conntrack.tcpBeLiberal: must be a boolean"),
        ("healthzBindAddress: 'a:b'\n", "healthzBindAddress"),
        ("ipvs: []\n", "ipvs: must be an object"),
        ("configSyncPeriod: forever\n", "configSyncPeriod: invalid duration"),
        ("detectLocalMode: BridgeInterface\n", "detectLocal.bridgeInterface"),
        ("mode: ipvs\nipvs:\n  scheduler: fifo\n", "ipvs.scheduler"),
        ("oomScoreAdj: 5000\n", "oomScoreAdj"),
    ],
)
def test_bad_config_file_names_the_field(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(["--config", write(tmp_path, body)])
    assert message in str(exc.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("apiVersion: v1\nkind: KubeProxyConfiguration\n", "apiVersion"),
        (f"apiVersion: {API_VERSION}\nkind: Pod\n", "kind"),
        ("kind: KubeProxyConfiguration\n", "apiVersion"),
        ("- a\n- b\n", "KubeProxyConfiguration"),
        ("a: [\n", "not valid YAML"),
    ],
)
def test_bad_config_documents(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config_file(f)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--config"):
        load_config(["--config", str(tmp_path / "absent.yaml")])


def test_flags_with_config_follow_upstream(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path, "mode: nftables\nhostnameOverride: from-file\n")
    cfg = load_config(
        [
            "--config",
            path,
            "--proxy-mode",
            "ipvs",  # ignored: the file has the mode
            "--iptables-masquerade-bit",
            "3",  # ignored
            "--hostname-override",
            "From-Flag",  # takes precedence
            "-v",
            "5",  # takes precedence
            "--master",
            "https://api:6443",  # not in the file: applies
            "--manifests",
            "x.yaml",  # not in the file: applies
            "--cleanup",
        ]
    )
    assert cfg.mode == "nftables"
    assert cfg.iptables_masquerade_bit == 14
    assert cfg.hostname_override == "from-flag"
    assert cfg.node_name == "from-flag"
    assert cfg.verbosity == 5
    assert cfg.master == "https://api:6443"
    assert cfg.manifests == ("x.yaml",)
    assert cfg.cleanup is True
    assert "--proxy-mode" in caplog.text and "--iptables-masquerade-bit" in caplog.text


# -- writing the effective configuration -------------------------------------------------


def test_write_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(
        [
            "--proxy-mode=ipvs",
            "--cluster-cidr=10.244.0.0/16,fd00::/64",
            "--ipvs-scheduler=sh",
            "--ipvs-sync-period=1m",
            "--ipvs-min-sync-period=2s",
            "--ipvs-exclude-cidrs=10.9.0.0/16",
            "--nodeport-addresses=primary",
            "--masquerade-all",
            "--conntrack-max-per-core=0",
            "--conntrack-udp-timeout=45s",
            "--hostname-override=n1",
            "--metrics-bind-address=0.0.0.0:9999",
            "-v=3",
        ]
    )
    out = tmp_path / "out.yaml"
    write_config(cfg, out)
    doc = yaml.safe_load(out.read_text())
    assert doc["apiVersion"] == API_VERSION
    assert doc["kind"] == "KubeProxyConfiguration"
    assert doc["ipvs"]["syncPeriod"] == "1m0s"
    assert doc["conntrack"]["tcpEstablishedTimeout"] == "24h0m0s"
    assert doc["clusterCIDR"] == "10.244.0.0/16,fd00::/64"
    again = load_config_file(out)
    for f in ProxyConfig.__dataclass_fields__:
        if f in ("config_file", "source", "write_config_to"):
            continue
        assert getattr(again, f) == getattr(cfg, f), f


def test_to_kube_proxy_configuration_of_defaults() -> None:
    doc = to_kube_proxy_configuration(ProxyConfig())
    assert doc["mode"] == "iptables"
    assert doc["iptables"] == {
        "localhostNodePorts": True,
        "masqueradeAll": False,
        "masqueradeBit": 14,
        "minSyncPeriod": "1s",
        "syncPeriod": "30s",
    }
    assert doc["configSyncPeriod"] == "15m0s"
    assert doc["healthzBindAddress"] == "0.0.0.0:10256"
    assert doc["metricsBindAddress"] == "127.0.0.1:10249"
    assert doc["conntrack"]["tcpCloseWaitTimeout"] == "1h0m0s"
    assert doc["nodePortAddresses"] is None


def test_write_config_unwritable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--write-config-to"):
        write_config(ProxyConfig(), tmp_path / "no" / "such" / "dir.yaml")
