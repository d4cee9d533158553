"""A small model of iptables-restore input, to build upstream kube-proxy's partial-sync
shape from kproxy's own output.

`Tables.apply(text)` follows `iptables-restore --noflush` semantics for the lines kproxy
emits: `:CHAIN` creates or flushes a chain, `-A CHAIN ...` appends, `-X CHAIN` deletes.
Other lines (`-I INPUT 1 ...` jumps from built-in chains) are kept apart: upstream
installs those with separate iptables calls on full syncs only, never in a partial one."""

from __future__ import annotations

from collections.abc import Iterable

# The nat chains upstream rewrites completely on every sync, partial or not.
UPSTREAM_NAT_CHAINS = ("KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ")


class Tables:
    """table -> chain -> rule lines, in the order the chains were declared."""

    def __init__(self) -> None:
        self.chains: dict[str, dict[str, list[str]]] = {}

    def apply(self, text: str) -> None:
        table: dict[str, list[str]] | None = None
        for line in text.splitlines():
            if line.startswith("*"):
                table = self.chains.setdefault(line[1:], {})
            elif table is None or line in ("COMMIT", "") or line.startswith("#"):
                continue
            elif line.startswith(":"):
                table[line[1:].split()[0]] = []
            elif line.startswith("-A "):
                chain = line.split(maxsplit=2)[1]
                table.setdefault(chain, []).append(line)
            elif line.startswith("-X "):
                table.pop(line.split()[1], None)

    def section(self, table: str, chains: Iterable[str] | None = None) -> str:
        """`*table`, the chains' declarations and all their rules, `COMMIT`."""
        have = self.chains.get(table, {})
        names = list(have) if chains is None else [c for c in chains if c in have]
        out = [f"*{table}"]
        out += [f":{c} - [0:0]" for c in names]
        for c in names:
            out += have[c]
        out.append("COMMIT")
        return "\n".join(out) + "\n"

    def jump_targets(self, table: str, chain: str, prefix: str) -> list[str]:
        """Chains named `prefix...` that `chain` jumps to, in rule order, once each."""
        seen: list[str] = []
        for rule in self.chains.get(table, {}).get(chain, []):
            words = rule.split()
            for i, w in enumerate(words[:-1]):
                if w in ("-j", "-g") and words[i + 1].startswith(prefix):
                    if words[i + 1] not in seen:
                        seen.append(words[i + 1])
        return seen


def upstream_partial(tables: Tables, service_chains: Iterable[str]) -> str:
    """Upstream's partial-sync restore input for a change of one Service: every filter
    chain in full, the KUBE-SERVICES/KUBE-NODEPORTS/KUBE-POSTROUTING/KUBE-MARK-MASQ nat
    chains in full, and the Service's own chains (SVC/SVL/EXT/FW and the SEP chains they
    reach)."""
    nat = tables.chains.get("nat", {})
    own: list[str] = []
    for chain in service_chains:
        if chain in nat and chain not in own:
            own.append(chain)
    for chain in list(own):
        for sep in tables.jump_targets("nat", chain, "KUBE-SEP-"):
            if sep not in own:
                own.append(sep)
    return tables.section("filter") + tables.section("nat", [*UPSTREAM_NAT_CHAINS, *own])
