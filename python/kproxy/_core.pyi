"""Type stubs for kproxy's Rust core (kept in step with the binary by stubtest)."""

from typing import final

__version__: str
__all__ = ["IptablesRenderer", "Model", "__version__", "iptables_cleanup", "service_chain_names"]

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
