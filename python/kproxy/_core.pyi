"""Type stubs for kproxy's Rust core (kept in step with the binary by stubtest)."""

from typing import final

_RouteTuple = tuple[str, list[str], bool, str, str | None]

__version__: str
__all__ = [
    "Forwarder",
    "IptablesRenderer",
    "IpvsProxier",
    "IpvsReconciler",
    "IpvsSocket",
    "Model",
    "NftablesRenderer",
    "RouteTable",
    "Selector",
    "__version__",
    "iptables_cleanup",
    "ipvs_decode",
    "ipvs_encode",
    "ipvs_plan",
    "nftables_chain_names",
    "nftables_cleanup",
    "service_chain_names",
    "userspace_cleanup_script",
]

@final
class Model:
    """Services and EndpointSlices, keyed by "namespace/name"."""

    def __new__(cls) -> Model: ...
    def set_service(self, key: str, obj: str | None) -> list[str]:
        """Set a Service from its JSON, or delete it with None. Returns warnings;
        raises kproxy.ObjectError (keeping the previous state) when it is unusable."""
    def set_endpoint_slice(self, key: str, obj: str | None) -> list[str]:
        """Set an EndpointSlice from its JSON, or delete it with None."""
    def service_count(self) -> int: ...
    def __len__(self) -> int: ...

@final
class IptablesRenderer:
    """Renders iptables-restore input for one IP family and remembers what was applied."""

    def __new__(cls, config_json: str) -> IptablesRenderer: ...
    def render(self, model: Model, full: bool = False, saved: str | None = None) -> tuple[str, str]:
        """(restore text, JSON with stats, conntrack cleanups and health checks)."""
    def commit(self) -> None: ...
    def abort(self) -> None: ...
    def set_config(self, config_json: str) -> None: ...
    @property
    def needs_full(self) -> bool: ...

def iptables_cleanup(saved: str) -> str:
    """Restore input that removes kproxy's chains and jumps from `iptables-save` output."""

def service_chain_names(
    namespace: str, name: str, port: str, protocol: str
) -> tuple[str, str, str, str]:
    """(KUBE-SVC-*, KUBE-SVL-*, KUBE-EXT-*, KUBE-FW-*) of a service port."""

@final
class Selector:
    """One service port's endpoint selection: an algorithm ("random", "round-robin",
    "least-conn", "source-hash", "maglev"), live connection counts and optional ClientIP
    session affinity. Weights are integers in [0, 1000000]; 0 drains an endpoint.
    Bad input raises kproxy.ConfigError."""

    def __new__(
        cls,
        algorithm: str,
        endpoints: list[str],
        weights: list[int] | None = None,
        *,
        table_size: int = 16381,
        seed: int = 0,
        affinity_timeout: float | None = None,
        affinity_capacity: int = 65536,
    ) -> Selector: ...
    def set_endpoints(self, endpoints: list[str], weights: list[int] | None = None) -> bool:
        """Replace the endpoints; False (all state kept) when unchanged."""
    def pick(self, src_ip: str, now: float | None = None) -> str:
        """One endpoint for a new flow (counted as a connection); NoRouteError when empty."""
    def pick_many(self, src_ips: list[str], now: float | None = None) -> list[str]:
        """`pick` for many flows, without the GIL."""
    def release(self, endpoint: str) -> None:
        """A connection to `endpoint` ended."""
    def set_connections(self, counts: dict[str, int]) -> None:
        """Replace the live connection counts (endpoints not named get 0)."""
    def connections(self) -> dict[str, int]: ...
    def maglev_table(self) -> list[str] | None:
        """Maglev's lookup table as endpoint per slot (None for other algorithms)."""
    @property
    def algorithm(self) -> str: ...
    @property
    def endpoints(self) -> list[str]: ...
    @property
    def rebuilds(self) -> int: ...
    @property
    def affinity_entries(self) -> int: ...

@final
class RouteTable:
    """Services and endpoints as seen from one node (use kproxy.ServiceTable)."""

    def __new__(
        cls,
        node_name: str,
        *,
        zone: str | None = None,
        cluster_cidrs: list[str] = ...,
        node_ips: list[str] = ...,
        masquerade_all: bool = False,
        localhost_nodeports: bool = True,
        default_algorithm: str = "random",
    ) -> RouteTable: ...
    def set_service(self, key: str, obj: str | None) -> list[str]: ...
    def set_endpoint_slice(self, key: str, obj: str | None) -> list[str]: ...
    def lookup(
        self, protocol: str, dst_ip: str, dst_port: int, src_ip: str, origin: str
    ) -> _RouteTuple:
        """(verdict, endpoints, masquerade, reason, service)."""
    def lookup_many(self, flows: list[tuple[str, str, int, str, str]]) -> list[_RouteTuple]:
        """`lookup` for many flows, without the GIL."""
    def pick(
        self,
        protocol: str,
        dst_ip: str,
        dst_port: int,
        src_ip: str,
        origin: str,
        now: float | None = None,
    ) -> tuple[_RouteTuple, str | None]: ...
    def algorithms(self) -> dict[str, str]: ...
    def __len__(self) -> int: ...

@final
class Forwarder:
    """userspace mode's TCP/UDP forwarder, running on its own threads once built."""

    def __new__(cls, config_json: str) -> Forwarder: ...
    @property
    def tcp_port(self) -> int: ...
    @property
    def running(self) -> bool: ...
    def sync(self, model: Model, table_config_json: str) -> str:
        """Apply the model; JSON {nft, warnings, health_checks, service_ports}."""
    def stats_json(self) -> str: ...
    def stop(self) -> None: ...

def userspace_cleanup_script() -> str:
    """`nft -f` input removing userspace mode's capture table."""

@final
class NftablesRenderer:
    """Renders `nft -f` input (one transaction) for one IP family's `kube-proxy` table
    and remembers what was applied."""

    def __new__(cls, config_json: str) -> NftablesRenderer: ...
    def render(self, model: Model, full: bool = False) -> tuple[str, str]:
        """(nft -f text, JSON with stats, conntrack cleanups and health checks)."""
    def commit(self) -> None: ...
    def abort(self) -> None: ...
    def set_config(self, config_json: str) -> None: ...
    def drift_probe(self) -> tuple[str, list[str]]:
        """(`nft list chain` argument, substrings its listing must contain)."""
    @property
    def needs_full(self) -> bool: ...

def nftables_cleanup() -> str:
    """`nft -f` input deleting the `kube-proxy` tables of families ip and ip6."""

def nftables_chain_names(
    namespace: str, name: str, port: str, protocol: str
) -> tuple[str, str, str, str]:
    """(service-*, local-*, external-*, firewall-*) nftables chains of a service port."""

# --- IPVS (rust/python/src/ipvs.rs) ---

@final
class IpvsSocket:
    """A generic-netlink socket bound to the kernel's IPVS family (requests batched)."""

    def __new__(cls) -> IpvsSocket:
        """Raises FileNotFoundError when the kernel has no IPVS."""
    @property
    def family_id(self) -> int: ...
    def services(self) -> str:
        """JSON list of the kernel's virtual servers (one dump)."""
    def destinations(self, service_json: str) -> str:
        """JSON list of the real servers of one virtual server."""
    def apply(self, ops_json: str) -> list[tuple[int, int]]:
        """Apply a JSON list of ops; returns (index, errno) of each failed one."""
    def timeouts(self) -> tuple[int, int, int]:
        """(tcp, tcpfin, udp) connection timeouts in seconds."""
    def set_timeouts(self, tcp: int, tcpfin: int, udp: int) -> None: ...

@final
class IpvsReconciler:
    """Remembers what was programmed and diffs each plan against it."""

    def __new__(cls) -> IpvsReconciler: ...
    def sync(
        self,
        sock: IpvsSocket,
        plan_json: str,
        owned: list[str],
        exclude_cidrs: list[str],
        full: bool = False,
    ) -> str:
        """Program the plan's virtual servers; returns the report as JSON."""
    @property
    def needs_full(self) -> bool: ...
    def invalidate(self) -> None: ...

@final
class IpvsProxier:
    """The ipvs mode's planner and reconciler for one IP family: `plan` re-plans only
    the Services changed since the last plan; `program` programs that plan's virtual
    servers (a full plan reconciles against one kernel dump)."""

    def __new__(cls) -> IpvsProxier: ...
    def plan(self, model: Model, config_json: str, full: bool = False) -> str:
        """JSON {full, bind_add, bind_del, ipset_add, ipset_del, health_checks,
        warnings, conntrack, replanned}."""
    def program(self, sock: IpvsSocket, owned: list[str], exclude_cidrs: list[str]) -> str:
        """Program the last plan's virtual servers; returns the report as JSON."""
    def invalidate(self) -> None: ...

def ipvs_plan(model: Model, config_json: str) -> str:
    """The IPVS plan of a model for one family as JSON (services, bind_addrs, ipsets,
    health_checks, warnings)."""

def ipvs_encode(op_json: str, family: int, seq: int) -> bytes:
    """The netlink request kproxy sends for one op (JSON)."""

def ipvs_decode(data: bytes) -> str:
    """Decode one IPVS netlink message into JSON {cmd, service, dest, timeouts}."""
