"""Pure-Python reference models of kproxy's selection algorithms.

They follow rust/core/src/selection.rs step by step (same hashes, same tie-breaks) so
property tests can demand identical picks for identical inputs. Slow on purpose: clear
over fast.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Sequence

MASK = (1 << 64) - 1
FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3


def fnv1a(data: bytes, h: int = FNV_OFFSET) -> int:
    for b in data:
        h ^= b
        h = (h * FNV_PRIME) & MASK
    return h


def fmix64(h: int) -> int:
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & MASK
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) & MASK
    h ^= h >> 33
    return h


def stable_hash(prefix: bytes, data: bytes) -> int:
    return fmix64(fnv1a(data, fnv1a(prefix)))


def flow_hash(src_ip: str) -> int:
    return stable_hash(b"", ipaddress.ip_address(src_ip).packed)


class SplitMix64:
    def __init__(self, seed: int) -> None:
        self.state = seed & MASK

    def next(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        return z ^ (z >> 31)


def by_weight(weights: Sequence[int], r: int) -> int:
    for i, w in enumerate(weights):
        if r < w:
            return i
        r -= w
    return len(weights) - 1


def maglev_table(
    names: Sequence[str], size: int, weights: Sequence[int] | None = None
) -> list[int]:
    """Slot -> index into names (weights: claims per backend per round)."""
    weights = list(weights) if weights is not None else [1] * len(names)
    table = [-1] * size
    if not names:
        return table
    pos = [stable_hash(b"offset:", n.encode()) % size for n in names]
    skip = [stable_hash(b"skip:", n.encode()) % (size - 1) + 1 if size > 1 else 1 for n in names]
    filled = 0
    while True:
        for i in range(len(names)):
            for _ in range(weights[i]):
                c = pos[i]
                while table[c] != -1:
                    c = (c + skip[i]) % size
                table[c] = i
                pos[i] = (c + skip[i]) % size
                filled += 1
                if filled == size:
                    return table


class ReferenceSelector:
    """The Selector of selection.rs: algorithm + connection counts + ClientIP affinity."""

    def __init__(
        self,
        algorithm: str,
        endpoints: Sequence[str],
        weights: Sequence[int] | None = None,
        *,
        table_size: int = 16381,
        seed: int = 0,
        affinity_timeout: float | None = None,
        affinity_capacity: int = 65536,
    ) -> None:
        self.algorithm = algorithm
        self.table_size = table_size
        self.rng = SplitMix64(seed)
        self.affinity_timeout = affinity_timeout
        self.affinity_capacity = affinity_capacity
        # client ip -> (endpoint, last used); insertion order = least recently used first
        self.affinity: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self.names: list[str] = []
        self.weights: list[int] = []
        self.conns: list[int] = []
        self.current: list[int] = []
        self.table: list[int] = []
        self.set_endpoints(endpoints, weights)

    def set_endpoints(self, endpoints: Sequence[str], weights: Sequence[int] | None = None) -> None:
        ws = list(weights) if weights is not None else [1] * len(endpoints)
        old = dict(zip(self.names, self.conns, strict=True))
        kept = [(n, w) for n, w in zip(endpoints, ws, strict=True) if w > 0]
        self.names = [n for n, _ in kept]
        self.weights = [w for _, w in kept]
        self.conns = [old.get(n, 0) for n in self.names]
        self.current = [0] * len(self.names)
        if self.algorithm == "maglev":
            self.table = maglev_table(self.names, self.table_size, self.weights)
        live = set(self.names)
        for ip in [ip for ip, (ep, _) in self.affinity.items() if ep not in live]:
            del self.affinity[ip]

    def _algorithm_pick(self, src_ip: str) -> int:
        total = sum(self.weights)
        if self.algorithm == "random":
            return by_weight(self.weights, self.rng.next() % total)
        if self.algorithm == "round-robin":
            best = 0
            for i, w in enumerate(self.weights):
                self.current[i] += w
                if self.current[i] > self.current[best]:
                    best = i
            self.current[best] -= total
            return best
        if self.algorithm == "least-conn":
            best = 0
            for i in range(1, len(self.names)):
                if self.conns[i] * self.weights[best] < self.conns[best] * self.weights[i]:
                    best = i
            return best
        if self.algorithm == "source-hash":
            return by_weight(self.weights, flow_hash(src_ip) % total)
        if self.algorithm == "maglev":
            return self.table[flow_hash(src_ip) % self.table_size]
        raise ValueError(self.algorithm)

    def pick(self, src_ip: str, now: float = 0.0) -> str | None:
        if not self.names:
            return None
        src_ip = str(ipaddress.ip_address(src_ip))
        chosen: int | None = None
        if self.affinity_timeout is not None and src_ip in self.affinity:
            ep, last = self.affinity[src_ip]
            if now - last <= self.affinity_timeout:
                chosen = self.names.index(ep)
            else:
                del self.affinity[src_ip]
        if chosen is None:
            chosen = self._algorithm_pick(src_ip)
        if self.affinity_timeout is not None:
            self.affinity.pop(src_ip, None)
            while len(self.affinity) >= self.affinity_capacity:
                self.affinity.popitem(last=False)
            self.affinity[src_ip] = (self.names[chosen], now)
        self.conns[chosen] += 1
        return self.names[chosen]

    def release(self, endpoint: str) -> None:
        if endpoint in self.names:
            i = self.names.index(endpoint)
            self.conns[i] = max(0, self.conns[i] - 1)
