"""The daemon's configuration: command-line flags and KubeProxyConfiguration files.

kproxy takes upstream kube-proxy's flags (``cmd/kube-proxy/app/options.go``) and its
``kubeproxy.config.k8s.io/v1alpha1`` ``KubeProxyConfiguration`` file, with upstream's
defaulting (``pkg/proxy/apis/config/v1alpha1/defaults.go``) and validation
(``pkg/proxy/apis/config/validation/validation.go``), into one frozen :class:`ProxyConfig`.

Flags given together with ``--config`` (as upstream ``Options.Complete`` does): the file
replaces every setting that has a field in KubeProxyConfiguration, and those flags are
ignored (a warning names them). Three kinds of flags still apply:

- ``--hostname-override`` and ``-v/--v`` take precedence over the file (upstream's
  ``processHostnameOverrideFlag`` and ``copyLogsFromFlags``);
- flags that have no field in the file: ``--master``, ``--manifests``, ``--cleanup``,
  ``--write-config-to`` (and ``--config`` itself);
- nothing else: e.g. ``--proxy-mode ipvs --config f.yaml`` runs the file's mode.

One deliberate difference from upstream: an unknown field in the file is an error
(upstream falls back to a lenient decode with a warning for v1alpha1). A typo in a
config file silently doing nothing is worse than refusing to start.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import logging
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kproxy.errors import ConfigError

__all__ = [
    "API_VERSION",
    "DETECT_LOCAL_MODES",
    "IPVS_SCHEDULERS",
    "KIND",
    "PROXY_MODES",
    "ProxyConfig",
    "build_parser",
    "format_duration",
    "load_config",
    "load_config_file",
    "node_name",
    "parse_duration",
    "to_kube_proxy_configuration",
    "validate",
    "write_config",
]

log = logging.getLogger(__name__)

API_VERSION = "kubeproxy.config.k8s.io/v1alpha1"
KIND = "KubeProxyConfiguration"
#: upstream's configz group name (``/configz`` is keyed by it)
GROUP_NAME = "kubeproxy.config.k8s.io"

PROXY_MODES = ("iptables", "nftables", "ipvs", "userspace")
DETECT_LOCAL_MODES = ("ClusterCIDR", "NodeCIDR", "BridgeInterface", "InterfaceNamePrefix")
#: upstream's IPVSSchedulerMethod values; "" means rr.
IPVS_SCHEDULERS = ("rr", "wrr", "lc", "wlc", "lblc", "lblcr", "sh", "dh", "sed", "nq", "mh")

PROXY_HEALTHZ_PORT = 10256  # pkg/cluster/ports.ProxyHealthzPort
PROXY_STATUS_PORT = 10249  # pkg/cluster/ports.ProxyStatusPort
KUBE_PROXY_OOM_SCORE_ADJ = -999  # pkg/kubelet/qos.KubeProxyOOMScoreAdj


# ---------------------------------------------------------------------------------------
# Durations (Go time.ParseDuration / Duration.String)
# ---------------------------------------------------------------------------------------

_UNIT_NS = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,  # U+00B5 micro sign
    "μs": 1_000,  # U+03BC greek mu
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60 * 1_000_000_000,
    "h": 3600 * 1_000_000_000,
}
_DURATION_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def _parse_duration_ns(text: str) -> int:
    s = text.strip()
    if not s:
        raise ConfigError("invalid duration '': empty")
    sign = 1
    body = s
    if body[0] in "+-":
        sign = -1 if body[0] == "-" else 1
        body = body[1:]
    if body == "0":
        return 0
    if not body:
        raise ConfigError(f"invalid duration {text!r}")
    total = 0
    pos = 0
    while pos < len(body):
        m = _DURATION_PART.match(body, pos)
        if m is None:
            if re.match(r"\d+\.?\d*|\.\d+", body[pos:]):
                raise ConfigError(
                    f"invalid duration {text!r}: missing unit (use ns, us, ms, s, m or h)"
                )
            raise ConfigError(f"invalid duration {text!r}")
        number, unit = m.group(1), m.group(2)
        whole, _, frac = number.partition(".")
        scale = _UNIT_NS[unit]
        value = int(whole or "0") * scale
        if frac:
            value += int(frac) * scale // 10 ** len(frac)
        total += value
        pos = m.end()
    return sign * total


def parse_duration(s: str) -> float:
    """Parse a Go duration (``500ms``, ``30s``, ``1h``, ``1m30s``, ``0``) into seconds.

    Raises ConfigError for anything Go's ``time.ParseDuration`` rejects.
    """
    if not isinstance(s, str):
        raise ConfigError(f"invalid duration {s!r}: must be a string such as '30s'")
    return _parse_duration_ns(s) / 1e9


def format_duration(seconds: float) -> str:
    """Format seconds like Go's ``time.Duration.String()`` (``30s``, ``1h0m0s``, ``250ms``)."""
    ns = round(seconds * 1e9)
    if ns == 0:
        return "0s"
    neg = ns < 0
    ns = abs(ns)
    if ns < 1_000_000_000:
        for unit, scale in (("ms", 1_000_000), ("µs", 1_000), ("ns", 1)):
            if ns >= scale:
                out = _frac(ns, scale) + unit
                break
    else:
        hours, rem = divmod(ns, 3600 * 1_000_000_000)
        minutes, rem = divmod(rem, 60 * 1_000_000_000)
        out = _frac(rem, 1_000_000_000) + "s"
        if hours:
            out = f"{hours}h{minutes}m{out}"
        elif minutes:
            out = f"{minutes}m{out}"
    return ("-" if neg else "") + out


def _frac(value: int, scale: int) -> str:
    whole, rest = divmod(value, scale)
    if not rest:
        return str(whole)
    digits = len(str(scale)) - 1
    return f"{whole}.{str(rest).rjust(digits, '0').rstrip('0')}"


# ---------------------------------------------------------------------------------------
# The configuration
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProxyConfig:
    """Every setting of the daemon, with upstream's defaults. Durations are seconds."""

    mode: str = "iptables"
    manifests: tuple[str, ...] = ()
    kubeconfig: str = ""
    master: str = ""
    hostname_override: str = ""
    bind_address: str = "0.0.0.0"
    bind_address_hard_fail: bool = False
    #: "" disables the server
    healthz_bind_address: str = f"0.0.0.0:{PROXY_HEALTHZ_PORT}"
    #: "" disables the server
    metrics_bind_address: str = f"127.0.0.1:{PROXY_STATUS_PORT}"
    cluster_cidrs: tuple[str, ...] = ()
    detect_local_mode: str = "ClusterCIDR"
    pod_bridge_interface: str = ""
    pod_interface_name_prefix: str = ""
    #: CIDRs, or the single value "primary"; empty means all local addresses
    nodeport_addresses: tuple[str, ...] = ()
    masquerade_all: bool = False
    iptables_masquerade_bit: int = 14
    iptables_sync_period: float = 30.0
    iptables_min_sync_period: float = 1.0
    iptables_localhost_nodeports: bool = True
    nftables_masquerade_bit: int = 14
    nftables_sync_period: float = 30.0
    nftables_min_sync_period: float = 1.0
    #: upstream's default is "" which means rr
    ipvs_scheduler: str = "rr"
    ipvs_sync_period: float = 30.0
    ipvs_min_sync_period: float = 0.0
    ipvs_strict_arp: bool = False
    ipvs_exclude_cidrs: tuple[str, ...] = ()
    ipvs_tcp_timeout: float = 0.0
    ipvs_tcpfin_timeout: float = 0.0
    ipvs_udp_timeout: float = 0.0
    conntrack_max_per_core: int = 32 * 1024
    conntrack_min: int = 128 * 1024
    conntrack_tcp_timeout_established: float = 24 * 3600.0
    conntrack_tcp_timeout_close_wait: float = 3600.0
    conntrack_tcp_be_liberal: bool = False
    conntrack_udp_timeout: float = 0.0
    conntrack_udp_timeout_stream: float = 0.0
    config_sync_period: float = 15 * 60.0
    kube_api_qps: float = 5.0
    kube_api_burst: int = 10
    kube_api_content_type: str = "application/vnd.kubernetes.protobuf"
    oom_score_adj: int = KUBE_PROXY_OOM_SCORE_ADJ
    feature_gates: tuple[tuple[str, bool], ...] = ()
    cleanup: bool = False
    write_config_to: str = ""
    config_file: str = ""
    verbosity: int = 0
    #: where settings came from: "flags" or "file" (decides how errors name a field)
    source: str = field(default="flags", compare=False)

    # -- the values for the selected mode ------------------------------------------------

    @property
    def sync_period(self) -> float:
        """Full resync period of the selected mode (upstream's ``syncPeriod``)."""
        if self.mode == "ipvs":
            return self.ipvs_sync_period
        if self.mode == "nftables":
            return self.nftables_sync_period
        return self.iptables_sync_period

    @property
    def min_sync_period(self) -> float:
        """Minimum time between syncs of the selected mode."""
        if self.mode == "ipvs":
            return self.ipvs_min_sync_period
        if self.mode == "nftables":
            return self.nftables_min_sync_period
        return self.iptables_min_sync_period

    @property
    def masquerade_bit(self) -> int:
        """The fwmark bit marking packets for SNAT in the selected mode."""
        if self.mode == "nftables":
            return self.nftables_masquerade_bit
        return self.iptables_masquerade_bit

    @property
    def health_timeout(self) -> float:
        """Upstream's healthTimeout: the healthz server reports stale after 2 x syncPeriod."""
        return 2 * self.sync_period

    @property
    def node_name(self) -> str:
        """``--hostname-override`` else the host name, stripped and lowercased."""
        return node_name(self.hostname_override)


def node_name(hostname_override: str = "") -> str:
    """The node name: the override if set, else ``socket.gethostname()``; lowercased."""
    name = hostname_override.strip() or socket.gethostname().strip()
    return name.lower()


# ---------------------------------------------------------------------------------------
# Where each setting comes from: (flag, config file path); used to name bad values.
# ---------------------------------------------------------------------------------------

_NAMES: dict[str, tuple[str, str]] = {
    "mode": ("--proxy-mode", "mode"),
    "manifests": ("--manifests", "manifests"),
    "kubeconfig": ("--kubeconfig", "clientConnection.kubeconfig"),
    "master": ("--master", "master"),
    "hostname_override": ("--hostname-override", "hostnameOverride"),
    "bind_address": ("--bind-address", "bindAddress"),
    "healthz_bind_address": ("--healthz-bind-address", "healthzBindAddress"),
    "metrics_bind_address": ("--metrics-bind-address", "metricsBindAddress"),
    "cluster_cidrs": ("--cluster-cidr", "clusterCIDR"),
    "detect_local_mode": ("--detect-local-mode", "detectLocalMode"),
    "pod_bridge_interface": ("--pod-bridge-interface", "detectLocal.bridgeInterface"),
    "pod_interface_name_prefix": (
        "--pod-interface-name-prefix",
        "detectLocal.interfaceNamePrefix",
    ),
    "nodeport_addresses": ("--nodeport-addresses", "nodePortAddresses"),
    "iptables_masquerade_bit": ("--iptables-masquerade-bit", "iptables.masqueradeBit"),
    "iptables_sync_period": ("--iptables-sync-period", "iptables.syncPeriod"),
    "iptables_min_sync_period": ("--iptables-min-sync-period", "iptables.minSyncPeriod"),
    "nftables_masquerade_bit": ("--iptables-masquerade-bit", "nftables.masqueradeBit"),
    "nftables_sync_period": ("--iptables-sync-period", "nftables.syncPeriod"),
    "nftables_min_sync_period": ("--iptables-min-sync-period", "nftables.minSyncPeriod"),
    "ipvs_scheduler": ("--ipvs-scheduler", "ipvs.scheduler"),
    "ipvs_sync_period": ("--ipvs-sync-period", "ipvs.syncPeriod"),
    "ipvs_min_sync_period": ("--ipvs-min-sync-period", "ipvs.minSyncPeriod"),
    "ipvs_exclude_cidrs": ("--ipvs-exclude-cidrs", "ipvs.excludeCIDRs"),
    "ipvs_tcp_timeout": ("--ipvs-tcp-timeout", "ipvs.tcpTimeout"),
    "ipvs_tcpfin_timeout": ("--ipvs-tcpfin-timeout", "ipvs.tcpFinTimeout"),
    "ipvs_udp_timeout": ("--ipvs-udp-timeout", "ipvs.udpTimeout"),
    "conntrack_max_per_core": ("--conntrack-max-per-core", "conntrack.maxPerCore"),
    "conntrack_min": ("--conntrack-min", "conntrack.min"),
    "conntrack_tcp_timeout_established": (
        "--conntrack-tcp-timeout-established",
        "conntrack.tcpEstablishedTimeout",
    ),
    "conntrack_tcp_timeout_close_wait": (
        "--conntrack-tcp-timeout-close-wait",
        "conntrack.tcpCloseWaitTimeout",
    ),
    "conntrack_udp_timeout": ("--conntrack-udp-timeout", "conntrack.udpTimeout"),
    "conntrack_udp_timeout_stream": (
        "--conntrack-udp-timeout-stream",
        "conntrack.udpStreamTimeout",
    ),
    "config_sync_period": ("--config-sync-period", "configSyncPeriod"),
    "kube_api_qps": ("--kube-api-qps", "clientConnection.qps"),
    "kube_api_burst": ("--kube-api-burst", "clientConnection.burst"),
    "oom_score_adj": ("--oom-score-adj", "oomScoreAdj"),
    "verbosity": ("--v", "logging.verbosity"),
}


def _name(cfg: ProxyConfig, attr: str) -> str:
    flag, path = _NAMES.get(attr, (attr, attr))
    return path if cfg.source == "file" else flag


# ---------------------------------------------------------------------------------------
# Validation (upstream validation.go)
# ---------------------------------------------------------------------------------------


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _is_cidr(text: str) -> bool:
    # Go's net.ParseCIDR accepts host bits ("10.0.0.1/8"); strict=False does the same.
    if "/" not in text:
        return False
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        return False
    return True


def split_host_port(text: str) -> tuple[str, int]:
    """Split ``host:port`` / ``[v6]:port`` like Go's net.SplitHostPort; validate both."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise ConfigError(f"{text!r}: must be IP:port")
        host, port_text = text[1:end], text[end + 2 :]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            raise ConfigError(f"{text!r}: must be IP:port")
    if not _is_ip(host):
        raise ConfigError(f"{host!r}: must be a valid IP")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ConfigError(f"{port_text!r}: must be a valid port")
    return host, int(port_text)


def append_port_if_needed(addr: str, port: int) -> str:
    """Upstream ``proxyutil.AppendPortIfNeeded``: add ``port`` to a bare IP."""
    if not _is_ip(addr.strip("[]")) or (addr.startswith("[") and "]:" in addr):
        return addr
    ip = ipaddress.ip_address(addr.strip("[]"))
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def validate(cfg: ProxyConfig) -> None:
    """Check ``cfg`` as upstream's validation.go does; raise one ConfigError naming the
    bad flag (or config file field) for each problem, joined with ``; ``."""
    errs: list[str] = []

    def bad(attr: str, msg: str) -> None:
        errs.append(f"{_name(cfg, attr)}: {msg}")

    if cfg.mode not in PROXY_MODES:
        bad("mode", f"must be one of {', '.join(PROXY_MODES)} (got {cfg.mode!r})")

    for prefix in ("iptables", "nftables", "ipvs"):
        if prefix == "ipvs" and cfg.mode != "ipvs":
            continue
        if prefix == "nftables" and cfg.mode != "nftables":
            continue
        sync = getattr(cfg, f"{prefix}_sync_period")
        min_sync = getattr(cfg, f"{prefix}_min_sync_period")
        if sync <= 0:
            bad(f"{prefix}_sync_period", "must be greater than 0")
        if min_sync < 0:
            bad(f"{prefix}_min_sync_period", "must be greater than or equal to 0")
        elif sync > 0 and min_sync > sync:
            bad(
                f"{prefix}_sync_period",
                f"must be greater than or equal to {_name(cfg, f'{prefix}_min_sync_period')}",
            )
        if prefix != "ipvs":
            bit = getattr(cfg, f"{prefix}_masquerade_bit")
            if not 0 <= bit <= 31:
                bad(f"{prefix}_masquerade_bit", "must be within [0, 31]")

    if cfg.mode == "ipvs":
        if cfg.ipvs_scheduler not in (*IPVS_SCHEDULERS, ""):
            bad(
                "ipvs_scheduler",
                f"must be one of {', '.join(IPVS_SCHEDULERS)} or blank"
                f" (got {cfg.ipvs_scheduler!r})",
            )
        for attr in ("ipvs_tcp_timeout", "ipvs_tcpfin_timeout", "ipvs_udp_timeout"):
            if getattr(cfg, attr) < 0:
                bad(attr, "must be greater than or equal to 0")
    for cidr in cfg.ipvs_exclude_cidrs:
        if not _is_cidr(cidr):
            bad("ipvs_exclude_cidrs", f"{cidr!r} must be a valid IP block")

    for attr in ("conntrack_max_per_core", "conntrack_min"):
        if getattr(cfg, attr) < 0:
            bad(attr, "must be greater than or equal to 0")
    for attr in (
        "conntrack_tcp_timeout_established",
        "conntrack_tcp_timeout_close_wait",
        "conntrack_udp_timeout",
        "conntrack_udp_timeout_stream",
    ):
        if getattr(cfg, attr) < 0:
            bad(attr, "must be greater than or equal to 0")

    if cfg.kube_api_burst < 0:
        bad("kube_api_burst", "must be greater than or equal to 0")
    if not -1000 <= cfg.oom_score_adj <= 1000:
        bad("oom_score_adj", "must be within the range [-1000, 1000]")
    if cfg.config_sync_period <= 0:
        bad("config_sync_period", "must be greater than 0")
    if cfg.verbosity < 0:
        bad("verbosity", "must be greater than or equal to 0")

    if not _is_ip(cfg.bind_address):
        bad("bind_address", f"{cfg.bind_address!r} is not a valid IP address")
    for attr in ("healthz_bind_address", "metrics_bind_address"):
        value = getattr(cfg, attr)
        if value:  # empty disables the server
            try:
                split_host_port(value)
            except ConfigError as exc:
                bad(attr, str(exc))

    cidrs = cfg.cluster_cidrs
    if len(cidrs) > 2:
        bad(
            "cluster_cidrs",
            "only one CIDR allowed or a valid DualStack CIDR"
            " (e.g. 10.100.0.0/16,fde4:8dba:82e1::/48)",
        )
    elif any(not _is_cidr(c) for c in cidrs):
        bad("cluster_cidrs", f"{','.join(cidrs)!r} must be a valid CIDR block")
    elif len(cidrs) == 2:
        families = {ipaddress.ip_network(c, strict=False).version for c in cidrs}
        if families != {4, 6}:
            bad("cluster_cidrs", "must be a valid DualStack CIDR (one IPv4 and one IPv6)")

    if cfg.detect_local_mode not in DETECT_LOCAL_MODES:
        bad(
            "detect_local_mode",
            f"must be one of {', '.join(DETECT_LOCAL_MODES)} (got {cfg.detect_local_mode!r})",
        )
    elif cfg.detect_local_mode == "BridgeInterface" and not cfg.pod_bridge_interface:
        bad("pod_bridge_interface", "must not be empty when detect-local-mode is BridgeInterface")
    elif cfg.detect_local_mode == "InterfaceNamePrefix" and not cfg.pod_interface_name_prefix:
        bad(
            "pod_interface_name_prefix",
            "must not be empty when detect-local-mode is InterfaceNamePrefix",
        )

    for addr in cfg.nodeport_addresses:
        if addr == "primary":
            if len(cfg.nodeport_addresses) != 1:
                bad("nodeport_addresses", "'primary' cannot be combined with other values")
                break
        elif not _is_cidr(addr):
            bad("nodeport_addresses", f"{addr!r} must be a valid IP block or 'primary'")
            break

    if cfg.hostname_override and not cfg.hostname_override.strip():
        bad("hostname_override", "must not be empty")

    if errs:
        raise ConfigError("; ".join(errs))


# ---------------------------------------------------------------------------------------
# KubeProxyConfiguration files
# ---------------------------------------------------------------------------------------

# Field types of v1alpha1 KubeProxyConfiguration. A nested dict is a struct; "any" is a
# field upstream has that kproxy accepts and ignores (Windows and profiling settings).
_Schema = Mapping[str, Any]
_SCHEMA: _Schema = {
    "apiVersion": "str",
    "kind": "str",
    "bindAddress": "str",
    "bindAddressHardFail": "bool",
    "clientConnection": {
        "acceptContentTypes": "str",
        "burst": "int",
        "contentType": "str",
        "kubeconfig": "str",
        "qps": "float",
    },
    "clusterCIDR": "str",
    "configSyncPeriod": "duration",
    "conntrack": {
        "maxPerCore": "int",
        "min": "int",
        "tcpBeLiberal": "bool",
        "tcpCloseWaitTimeout": "duration",
        "tcpEstablishedTimeout": "duration",
        "udpStreamTimeout": "duration",
        "udpTimeout": "duration",
    },
    "detectLocal": {"bridgeInterface": "str", "interfaceNamePrefix": "str"},
    "detectLocalMode": "str",
    "enableProfiling": "bool",
    "featureGates": "boolmap",
    "healthzBindAddress": "str",
    "hostnameOverride": "str",
    "iptables": {
        "localhostNodePorts": "bool",
        "masqueradeAll": "bool",
        "masqueradeBit": "int",
        "minSyncPeriod": "duration",
        "syncPeriod": "duration",
    },
    "ipvs": {
        "excludeCIDRs": "strlist",
        "minSyncPeriod": "duration",
        "scheduler": "str",
        "strictARP": "bool",
        "syncPeriod": "duration",
        "tcpFinTimeout": "duration",
        "tcpTimeout": "duration",
        "udpTimeout": "duration",
    },
    "logging": "any",
    "metricsBindAddress": "str",
    "mode": "str",
    "nftables": {
        "masqueradeAll": "bool",
        "masqueradeBit": "int",
        "minSyncPeriod": "duration",
        "syncPeriod": "duration",
    },
    "nodePortAddresses": "strlist",
    "oomScoreAdj": "int",
    "portRange": "str",
    "showHiddenMetricsForVersion": "str",
    "udpIdleTimeout": "duration",
    "winkernel": "any",
}


def _check_type(path: str, kind: str, value: Any) -> Any:
    if kind == "any":
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{path}: must be a string")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: must be a boolean")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: must be an integer")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: must be a number")
        return float(value)
    if kind == "duration":
        if not isinstance(value, str):
            raise ConfigError(f"{path}: must be a duration string such as '30s'")
        try:
            return parse_duration(value)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    if kind == "strlist":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{path}: must be a list of strings")
        return tuple(value)
    if kind == "boolmap":
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, bool) for k, v in value.items()
        ):
            raise ConfigError(f"{path}: must be a map of feature names to booleans")
        return tuple(sorted(value.items()))
    raise AssertionError(kind)  # pragma: no cover


def _walk(obj: Mapping[Any, Any], schema: _Schema, prefix: str, out: dict[str, Any]) -> None:
    for key, value in obj.items():
        path = f"{prefix}{key}"
        if not isinstance(key, str) or key not in schema:
            raise ConfigError(f"{path}: unknown field")
        kind = schema[key]
        if value is None:  # a null field is an unset field (Go nil pointer / zero value)
            continue
        if isinstance(kind, Mapping):
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: must be an object")
            _walk(value, kind, f"{path}.", out)
        else:
            out[path] = _check_type(path, kind, value)


def _parse_document(doc: Any) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise ConfigError("config file: must be a KubeProxyConfiguration object")
    api_version = doc.get("apiVersion")
    if api_version != API_VERSION:
        raise ConfigError(f"apiVersion: must be {API_VERSION!r} (got {api_version!r})")
    if doc.get("kind") != KIND:
        raise ConfigError(f"kind: must be {KIND!r} (got {doc.get('kind')!r})")
    values: dict[str, Any] = {}
    _walk(doc, _SCHEMA, "", values)
    return values


def _from_file_values(v: Mapping[str, Any]) -> dict[str, Any]:
    """Apply upstream's SetDefaults_KubeProxyConfiguration to parsed file values."""

    def zero_default(path: str, default: Any) -> Any:
        # upstream defaults these when they are the zero value, so "0s" means "default"
        value = v.get(path)
        return default if not value else value

    def nil_default(path: str, default: Any) -> Any:
        value = v.get(path)
        return default if value is None else value

    d = ProxyConfig()
    bind = zero_default("bindAddress", "0.0.0.0")
    ipv4 = _is_ip(bind) and ipaddress.ip_address(bind).version == 4
    healthz_host, metrics_host = ("0.0.0.0", "127.0.0.1") if ipv4 else ("[::]", "[::1]")
    healthz = v.get("healthzBindAddress", "")
    metrics = v.get("metricsBindAddress", "")
    mode = v.get("mode", "") or "iptables"
    section = "nftables" if mode == "nftables" else "iptables"
    logging_cfg = v.get("logging")
    verbosity = d.verbosity
    if isinstance(logging_cfg, dict):
        raw_v = logging_cfg.get("verbosity", 0)
        if isinstance(raw_v, bool) or not isinstance(raw_v, int):
            raise ConfigError("logging.verbosity: must be an integer")
        verbosity = raw_v
    elif logging_cfg is not None:
        raise ConfigError("logging: must be an object")
    cluster_cidr = v.get("clusterCIDR", "")
    return {
        "mode": mode,
        "kubeconfig": v.get("clientConnection.kubeconfig", ""),
        "hostname_override": v.get("hostnameOverride", ""),
        "bind_address": bind,
        "bind_address_hard_fail": v.get("bindAddressHardFail", False),
        "healthz_bind_address": (
            append_port_if_needed(healthz, PROXY_HEALTHZ_PORT)
            if healthz
            else f"{healthz_host}:{PROXY_HEALTHZ_PORT}"
        ),
        "metrics_bind_address": (
            append_port_if_needed(metrics, PROXY_STATUS_PORT)
            if metrics
            else f"{metrics_host}:{PROXY_STATUS_PORT}"
        ),
        "cluster_cidrs": tuple(c.strip() for c in cluster_cidr.split(",")) if cluster_cidr else (),
        "detect_local_mode": v.get("detectLocalMode", "") or "ClusterCIDR",
        "pod_bridge_interface": v.get("detectLocal.bridgeInterface", ""),
        "pod_interface_name_prefix": v.get("detectLocal.interfaceNamePrefix", ""),
        "nodeport_addresses": v.get("nodePortAddresses", ()),
        "masquerade_all": v.get(f"{section}.masqueradeAll", False),
        "iptables_masquerade_bit": nil_default("iptables.masqueradeBit", 14),
        "iptables_sync_period": zero_default("iptables.syncPeriod", 30.0),
        "iptables_min_sync_period": zero_default("iptables.minSyncPeriod", 1.0),
        "iptables_localhost_nodeports": nil_default("iptables.localhostNodePorts", True),
        "nftables_masquerade_bit": nil_default("nftables.masqueradeBit", 14),
        "nftables_sync_period": zero_default("nftables.syncPeriod", 30.0),
        "nftables_min_sync_period": zero_default("nftables.minSyncPeriod", 1.0),
        "ipvs_scheduler": v.get("ipvs.scheduler", "") or "rr",
        "ipvs_sync_period": zero_default("ipvs.syncPeriod", 30.0),
        "ipvs_min_sync_period": v.get("ipvs.minSyncPeriod", 0.0),
        "ipvs_strict_arp": v.get("ipvs.strictARP", False),
        "ipvs_exclude_cidrs": v.get("ipvs.excludeCIDRs", ()),
        "ipvs_tcp_timeout": v.get("ipvs.tcpTimeout", 0.0),
        "ipvs_tcpfin_timeout": v.get("ipvs.tcpFinTimeout", 0.0),
        "ipvs_udp_timeout": v.get("ipvs.udpTimeout", 0.0),
        "conntrack_max_per_core": nil_default("conntrack.maxPerCore", d.conntrack_max_per_core),
        "conntrack_min": nil_default("conntrack.min", d.conntrack_min),
        "conntrack_tcp_timeout_established": nil_default(
            "conntrack.tcpEstablishedTimeout", d.conntrack_tcp_timeout_established
        ),
        "conntrack_tcp_timeout_close_wait": nil_default(
            "conntrack.tcpCloseWaitTimeout", d.conntrack_tcp_timeout_close_wait
        ),
        "conntrack_tcp_be_liberal": v.get("conntrack.tcpBeLiberal", False),
        "conntrack_udp_timeout": v.get("conntrack.udpTimeout", 0.0),
        "conntrack_udp_timeout_stream": v.get("conntrack.udpStreamTimeout", 0.0),
        "config_sync_period": zero_default("configSyncPeriod", d.config_sync_period),
        "kube_api_qps": zero_default("clientConnection.qps", d.kube_api_qps),
        "kube_api_burst": zero_default("clientConnection.burst", d.kube_api_burst),
        "kube_api_content_type": zero_default(
            "clientConnection.contentType", d.kube_api_content_type
        ),
        "oom_score_adj": nil_default("oomScoreAdj", d.oom_score_adj),
        "feature_gates": v.get("featureGates", ()),
        "verbosity": verbosity,
    }


def load_config_file(path: str | Path) -> ProxyConfig:
    """Read a KubeProxyConfiguration (YAML or JSON) with upstream defaulting; validate it."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--config: cannot read {str(path)!r}: {exc.strerror}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config: {str(path)!r} is not valid YAML: {exc}") from None
    values = _parse_document(doc)
    cfg = ProxyConfig(**_from_file_values(values), config_file=str(path), source="file")
    validate(cfg)
    return cfg


# ---------------------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises ConfigError instead of exiting (exit code is the
    caller's business: 2 for usage errors, as SPEC says)."""

    def error(self, message: str) -> Any:
        raise ConfigError(message)


def _duration_arg(text: str) -> float:
    try:
        return parse_duration(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _bool_arg(text: str) -> bool:
    # Go's strconv.ParseBool
    if text in ("1", "t", "T", "true", "TRUE", "True"):
        return True
    if text in ("0", "f", "F", "false", "FALSE", "False"):
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean {text!r}")


def _ip_arg(text: str) -> str:
    if not _is_ip(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid IP address")
    return text


def _ip_port_arg(text: str) -> str:
    # upstream IPPortVar: an IP, or IP:port; "" disables the server
    if text == "" or _is_ip(text.strip("[]")):
        return text
    try:
        split_host_port(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _feature_gates_arg(text: str) -> tuple[tuple[str, bool], ...]:
    out: dict[str, bool] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"missing bool value for {key}")
        out[key.strip()] = _bool_arg(value.strip())
    return tuple(sorted(out.items()))


def build_parser() -> argparse.ArgumentParser:
    """The kube-proxy command line (upstream flag names) plus ``--manifests``.

    Only the flags actually given appear in the parsed namespace (defaults are
    ``argparse.SUPPRESS``), so :func:`load_config` can tell "given" from "default".
    """
    p = _Parser(
        prog="kproxy",
        description="kproxy: a drop-in Kubernetes service proxy (kube-proxy).",
        argument_default=argparse.SUPPRESS,
        allow_abbrev=False,
    )
    boolean: dict[str, Any] = {"nargs": "?", "const": True, "type": _bool_arg, "metavar": "BOOL"}
    duration: dict[str, Any] = {"type": _duration_arg, "metavar": "DURATION"}
    add = p.add_argument

    add("--config", dest="config_file", metavar="FILE", help="The path to the configuration file.")
    add(
        "--write-config-to",
        metavar="FILE",
        help="If set, write the configuration values to this file and exit.",
    )
    add("--cleanup", **boolean, help="If true cleanup all rules kproxy created and exit.")
    add(
        "--manifests",
        action="append",
        metavar="PATH",
        help="Read Services, EndpointSlices and Nodes from this YAML/JSON file or directory "
        "(repeatable) instead of an API server.",
    )
    add("--kubeconfig", help="Path to kubeconfig file with authorization information.")
    add("--master", help="The address of the Kubernetes API server (overrides kubeconfig).")
    add("--kube-api-qps", type=float, help="QPS to use while talking with the API server.")
    add("--kube-api-burst", type=int, help="Burst to use while talking with the API server.")
    add("--kube-api-content-type", help="Content type of requests sent to the API server.")
    add("--hostname-override", help="If non-empty, use this as the name of the Node.")
    add("--bind-address", type=_ip_arg, help="The node's primary IP (default 0.0.0.0).")
    add(
        "--healthz-bind-address",
        type=_ip_port_arg,
        metavar="IP:PORT",
        help='The IP address and port for the health check server (default "0.0.0.0:10256").',
    )
    add(
        "--metrics-bind-address",
        type=_ip_port_arg,
        metavar="IP:PORT",
        help='The IP address and port for the metrics server (default "127.0.0.1:10249"); '
        "empty disables it.",
    )
    add("--healthz-port", type=int, help="Deprecated: use --healthz-bind-address; 0 disables.")
    add("--metrics-port", type=int, help="Deprecated: use --metrics-bind-address; 0 disables.")
    add(
        "--bind-address-hard-fail",
        **boolean,
        help="If true, failure to bind a server port is fatal.",
    )
    add("--profiling", **boolean, help="Accepted for compatibility; ignored.")
    add("--feature-gates", type=_feature_gates_arg, help="key=value pairs of feature gates.")
    add(
        "--proxy-mode",
        dest="mode",
        metavar="MODE",
        help="Which proxy mode to use: iptables (default), nftables, ipvs or userspace.",
    )
    add("--iptables-masquerade-bit", type=int, help="fwmark bit for SNAT, in [0, 31] (14).")
    add("--masquerade-all", **boolean, help="SNAT all traffic sent via Service cluster IPs.")
    add(
        "--iptables-localhost-nodeports",
        **boolean,
        help="If false, disable NodePorts on localhost (iptables mode, IPv4).",
    )
    add("--iptables-sync-period", **duration, help="Full resync interval (30s).")
    add("--iptables-min-sync-period", **duration, help="Minimum interval between syncs (1s).")
    add("--ipvs-sync-period", **duration, help="Full resync interval in ipvs mode (30s).")
    add("--ipvs-min-sync-period", **duration, help="Minimum interval between IPVS syncs (0s).")
    add("--ipvs-scheduler", help="The IPVS scheduler (rr).")
    add(
        "--ipvs-exclude-cidrs",
        action="append",
        metavar="CIDRS",
        help="Comma-separated CIDRs the ipvs proxier must not touch when cleaning up.",
    )
    add("--ipvs-strict-arp", **boolean, help="Set arp_ignore=1 and arp_announce=2.")
    add("--ipvs-tcp-timeout", **duration, help="Idle IPVS TCP timeout, 0 to leave as-is.")
    add("--ipvs-tcpfin-timeout", **duration, help="IPVS TCP FIN timeout, 0 to leave as-is.")
    add("--ipvs-udp-timeout", **duration, help="IPVS UDP timeout, 0 to leave as-is.")
    add(
        "--detect-local-mode", help="ClusterCIDR, NodeCIDR, BridgeInterface or InterfaceNamePrefix."
    )
    add("--pod-bridge-interface", help="Bridge interface for --detect-local-mode=BridgeInterface.")
    add(
        "--pod-interface-name-prefix",
        help="Interface name prefix for --detect-local-mode=InterfaceNamePrefix.",
    )
    add("--cluster-cidr", help="The pod CIDR (or a comma-separated dual-stack pair).")
    add(
        "--nodeport-addresses",
        action="append",
        metavar="CIDRS",
        help="Comma-separated CIDRs of node IPs that accept NodePorts, or 'primary'.",
    )
    add("--oom-score-adj", type=int, help="The oom-score-adj of the process, [-1000, 1000].")
    add("--conntrack-max-per-core", type=int, help="Max NAT connections tracked per CPU core.")
    add("--conntrack-min", type=int, help="Minimum number of conntrack entries.")
    add(
        "--conntrack-tcp-timeout-established",
        **duration,
        help="Idle timeout for established TCP connections (0 to leave as-is).",
    )
    add(
        "--conntrack-tcp-timeout-close-wait",
        **duration,
        help="NAT timeout for TCP connections in the CLOSE_WAIT state.",
    )
    add("--conntrack-tcp-be-liberal", **boolean, help="Set nf_conntrack_tcp_be_liberal to 1.")
    add("--conntrack-udp-timeout", **duration, help="Idle timeout for UNREPLIED UDP (0 = as-is).")
    add(
        "--conntrack-udp-timeout-stream",
        **duration,
        help="Idle timeout for ASSURED UDP connections (0 to leave as-is).",
    )
    add("--config-sync-period", **duration, help="How often the API state is relisted (15m).")
    add("-v", "--v", dest="verbosity", type=int, metavar="N", help="Log level verbosity.")
    return p


def _split_list(items: Sequence[str]) -> tuple[str, ...]:
    # pflag StringSlice: comma-separated, repeatable
    return tuple(part.strip() for item in items for part in item.split(",") if part.strip())


# flags with no field in KubeProxyConfiguration: they apply even with --config
_NON_CONFIG_FLAGS = frozenset(
    {"config_file", "write_config_to", "cleanup", "manifests", "master", "hostname_override"}
)
_FLAG_TO_ATTR: dict[str, str] = {
    "kube_api_qps": "kube_api_qps",
    "kube_api_burst": "kube_api_burst",
    "kube_api_content_type": "kube_api_content_type",
    "kubeconfig": "kubeconfig",
    "bind_address": "bind_address",
    "healthz_bind_address": "healthz_bind_address",
    "metrics_bind_address": "metrics_bind_address",
    "bind_address_hard_fail": "bind_address_hard_fail",
    "feature_gates": "feature_gates",
    "mode": "mode",
    "masquerade_all": "masquerade_all",
    "iptables_localhost_nodeports": "iptables_localhost_nodeports",
    "ipvs_scheduler": "ipvs_scheduler",
    "ipvs_strict_arp": "ipvs_strict_arp",
    "ipvs_tcp_timeout": "ipvs_tcp_timeout",
    "ipvs_tcpfin_timeout": "ipvs_tcpfin_timeout",
    "ipvs_udp_timeout": "ipvs_udp_timeout",
    "detect_local_mode": "detect_local_mode",
    "pod_bridge_interface": "pod_bridge_interface",
    "pod_interface_name_prefix": "pod_interface_name_prefix",
    "oom_score_adj": "oom_score_adj",
    "conntrack_max_per_core": "conntrack_max_per_core",
    "conntrack_min": "conntrack_min",
    "conntrack_tcp_timeout_established": "conntrack_tcp_timeout_established",
    "conntrack_tcp_timeout_close_wait": "conntrack_tcp_timeout_close_wait",
    "conntrack_tcp_be_liberal": "conntrack_tcp_be_liberal",
    "conntrack_udp_timeout": "conntrack_udp_timeout",
    "conntrack_udp_timeout_stream": "conntrack_udp_timeout_stream",
    "config_sync_period": "config_sync_period",
}


def _from_flags(given: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, attr in _FLAG_TO_ATTR.items():
        if key in given:
            out[attr] = given[key]
    if "iptables_masquerade_bit" in given:
        out["iptables_masquerade_bit"] = given["iptables_masquerade_bit"]
        out["nftables_masquerade_bit"] = given["iptables_masquerade_bit"]
    # upstream processV1Alpha1Flags: the --iptables-* periods drive iptables and nftables
    # and the --ipvs-* periods drive ipvs; kproxy keeps each mode's value in its own field.
    for suffix in ("sync_period", "min_sync_period"):
        if f"iptables_{suffix}" in given:
            out[f"iptables_{suffix}"] = given[f"iptables_{suffix}"]
            out[f"nftables_{suffix}"] = given[f"iptables_{suffix}"]
        if f"ipvs_{suffix}" in given:
            out[f"ipvs_{suffix}"] = given[f"ipvs_{suffix}"]
    if "cluster_cidr" in given:
        out["cluster_cidrs"] = _split_list([given["cluster_cidr"]])
    if "nodeport_addresses" in given:
        out["nodeport_addresses"] = _split_list(given["nodeport_addresses"])
    if "ipvs_exclude_cidrs" in given:
        out["ipvs_exclude_cidrs"] = _split_list(given["ipvs_exclude_cidrs"])
    if "detect_local_mode" in given and not given["detect_local_mode"]:
        out["detect_local_mode"] = "ClusterCIDR"
    if "mode" in given and not given["mode"]:
        out["mode"] = "iptables"
    if "ipvs_scheduler" in given and not given["ipvs_scheduler"]:
        out["ipvs_scheduler"] = "rr"
    # IPPortVar accepts a bare IP; upstream defaulting appends the port.
    for attr, port, port_flag in (
        ("healthz_bind_address", PROXY_HEALTHZ_PORT, "healthz_port"),
        ("metrics_bind_address", PROXY_STATUS_PORT, "metrics_port"),
    ):
        if out.get(attr):
            out[attr] = append_port_if_needed(out[attr], port)
        # upstream addressFromDeprecatedFlags: port 0 disables the server
        if given.get(port_flag) == 0:
            out[attr] = ""
    return out


def load_config(argv: Sequence[str]) -> ProxyConfig:
    """Parse the command line (without the program name) into a validated ProxyConfig.

    With ``--config FILE`` the file is the configuration and the flags that map to its
    fields are ignored, as upstream does; ``--hostname-override`` and ``-v`` still take
    precedence, and ``--master``, ``--manifests``, ``--cleanup``, ``--write-config-to``
    still apply (see the module docstring). Raises ConfigError naming the bad flag or
    field.
    """
    parser = build_parser()
    flag_of = {a.dest: max(a.option_strings, key=len) for a in parser._actions if a.option_strings}
    given: dict[str, Any] = vars(parser.parse_args(list(argv)))

    hostname = given.get("hostname_override")
    if hostname is not None and not hostname.strip():
        raise ConfigError("--hostname-override: empty hostname-override is invalid")

    config_file = given.get("config_file", "")
    if config_file:
        cfg = load_config_file(config_file)
        ignored = sorted(k for k in given if k not in _NON_CONFIG_FLAGS and k != "verbosity")
        if ignored:
            log.warning(
                "flags ignored because --config is given: %s",
                ", ".join(flag_of.get(k, k) for k in ignored),
            )
        overrides: dict[str, Any] = {}
        if "verbosity" in given:
            overrides["verbosity"] = given["verbosity"]
    else:
        cfg = ProxyConfig()
        overrides = _from_flags(given)
        if "verbosity" in given:
            overrides["verbosity"] = given["verbosity"]

    if hostname:
        overrides["hostname_override"] = hostname.strip().lower()
    if "master" in given:
        overrides["master"] = given["master"]
    if "manifests" in given:
        overrides["manifests"] = tuple(given["manifests"])
    if "cleanup" in given:
        overrides["cleanup"] = given["cleanup"]
    if "write_config_to" in given:
        overrides["write_config_to"] = given["write_config_to"]
    cfg = dataclasses.replace(cfg, **overrides)
    validate(cfg)
    return cfg


# ---------------------------------------------------------------------------------------
# Writing the effective configuration
# ---------------------------------------------------------------------------------------


def to_kube_proxy_configuration(cfg: ProxyConfig) -> dict[str, Any]:
    """The effective configuration as a v1alpha1 KubeProxyConfiguration object.

    Loading the result with ``--config`` yields the same settings, except those that
    have no field in the file (``--master``, ``--manifests``, ...) and upstream's
    defaulting quirk that a zero ``iptables.minSyncPeriod`` in a file means 1s.
    """
    masq_all = cfg.masquerade_all
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "bindAddress": cfg.bind_address,
        "bindAddressHardFail": cfg.bind_address_hard_fail,
        "clientConnection": {
            "acceptContentTypes": "",
            "burst": cfg.kube_api_burst,
            "contentType": cfg.kube_api_content_type,
            "kubeconfig": cfg.kubeconfig,
            "qps": cfg.kube_api_qps,
        },
        "clusterCIDR": ",".join(cfg.cluster_cidrs),
        "configSyncPeriod": format_duration(cfg.config_sync_period),
        "conntrack": {
            "maxPerCore": cfg.conntrack_max_per_core,
            "min": cfg.conntrack_min,
            "tcpBeLiberal": cfg.conntrack_tcp_be_liberal,
            "tcpCloseWaitTimeout": format_duration(cfg.conntrack_tcp_timeout_close_wait),
            "tcpEstablishedTimeout": format_duration(cfg.conntrack_tcp_timeout_established),
            "udpStreamTimeout": format_duration(cfg.conntrack_udp_timeout_stream),
            "udpTimeout": format_duration(cfg.conntrack_udp_timeout),
        },
        "detectLocal": {
            "bridgeInterface": cfg.pod_bridge_interface,
            "interfaceNamePrefix": cfg.pod_interface_name_prefix,
        },
        "detectLocalMode": cfg.detect_local_mode,
        "enableProfiling": False,
        "featureGates": dict(cfg.feature_gates),
        "healthzBindAddress": cfg.healthz_bind_address,
        "hostnameOverride": cfg.hostname_override,
        "iptables": {
            "localhostNodePorts": cfg.iptables_localhost_nodeports,
            "masqueradeAll": masq_all,
            "masqueradeBit": cfg.iptables_masquerade_bit,
            "minSyncPeriod": format_duration(cfg.iptables_min_sync_period),
            "syncPeriod": format_duration(cfg.iptables_sync_period),
        },
        "ipvs": {
            "excludeCIDRs": list(cfg.ipvs_exclude_cidrs) or None,
            "minSyncPeriod": format_duration(cfg.ipvs_min_sync_period),
            "scheduler": cfg.ipvs_scheduler,
            "strictARP": cfg.ipvs_strict_arp,
            "syncPeriod": format_duration(cfg.ipvs_sync_period),
            "tcpFinTimeout": format_duration(cfg.ipvs_tcpfin_timeout),
            "tcpTimeout": format_duration(cfg.ipvs_tcp_timeout),
            "udpTimeout": format_duration(cfg.ipvs_udp_timeout),
        },
        "logging": {"verbosity": cfg.verbosity},
        "metricsBindAddress": cfg.metrics_bind_address,
        "mode": cfg.mode,
        "nftables": {
            "masqueradeAll": masq_all,
            "masqueradeBit": cfg.nftables_masquerade_bit,
            "minSyncPeriod": format_duration(cfg.nftables_min_sync_period),
            "syncPeriod": format_duration(cfg.nftables_sync_period),
        },
        "nodePortAddresses": list(cfg.nodeport_addresses) or None,
        "oomScoreAdj": cfg.oom_score_adj,
        "portRange": "",
        "showHiddenMetricsForVersion": "",
    }


def write_config(cfg: ProxyConfig, path: str | Path) -> None:
    """Write the effective configuration as KubeProxyConfiguration YAML (``--write-config-to``)."""
    text = yaml.safe_dump(to_kube_proxy_configuration(cfg), sort_keys=True)
    try:
        Path(path).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"--write-config-to: cannot write {str(path)!r}: {exc.strerror}"
        ) from None
