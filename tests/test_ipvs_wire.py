"""IPVS wire format without a kernel: kproxy's encoder against pyroute2's.

The same specs are encoded by kproxy (``_core.ipvs_encode``) and by pyroute2's IPVS
message class; each side decodes the other's bytes, and the attributes must be the
same TLVs (pyroute2 orders them differently and does not set NLA_F_NESTED, which the
kernel ignores). Golden bytes of single messages are in rust/core/src/ipvs/wire.rs.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

import pytest

from kproxy import _core

pyroute2 = pytest.importorskip("pyroute2", reason="pyroute2 is a dev dependency")
from pyroute2.ipvs import IPVSDest, IPVSService  # noqa: E402
from pyroute2.netlink.generic.ipvs import ipvsmsg  # noqa: E402

FAMILY = 0x20
CMD = {"add_service": 1, "edit_service": 2, "del_service": 3, "add_dest": 5, "del_dest": 7}

SERVICES: list[dict[str, Any]] = [
    {"addr": "10.96.0.10", "protocol": socket.IPPROTO_TCP, "port": 80, "scheduler": "rr"},
    {
        "addr": "fd00::10",
        "protocol": socket.IPPROTO_UDP,
        "port": 53,
        "scheduler": "mh",
        "flags": 0x1 | 0x8 | 0x10,  # persistent, mh-fallback, mh-port
        "timeout": 10800,
    },
    {"addr": "192.168.100.12", "protocol": 132, "port": 30081, "scheduler": "sh", "flags": 0x10},
]
DESTS: list[dict[str, Any]] = [
    {"addr": "10.244.1.5", "port": 8080, "weight": 1},
    {"addr": "fd00:1::5", "port": 5353, "weight": 0},
]


def pr2_service(spec: dict[str, Any], key_only: bool = False) -> Any:
    kw: dict[str, Any] = {"addr": spec["addr"], "port": spec["port"], "protocol": spec["protocol"]}
    if ":" in spec["addr"]:
        # ipvsadm's IPv6 netmask is the prefix length 128 as a host-order u32;
        # pyroute2 types the attribute as an IPv4 address, so spell those bytes.
        kw["netmask"] = socket.inet_ntoa(struct.pack("=I", 128))
    svc = IPVSService(
        **kw,
        sched_name=spec["scheduler"],
        timeout=spec.get("timeout", 0),
        flags={"flags": spec.get("flags", 0), "mask": 0xFFFFFFFF},
    )
    return svc.dump_key() if key_only else svc.dump_nla()


def pr2_dest(spec: dict[str, Any]) -> Any:
    return IPVSDest(addr=spec["addr"], port=spec["port"], weight=spec["weight"], fwd_method=0)


def pr2_encode(cmd: int, attrs: list[tuple[str, Any]], seq: int = 1) -> bytes:
    msg = ipvsmsg()
    msg["cmd"] = cmd
    msg["version"] = 1
    msg["attrs"] = attrs
    msg["header"]["type"] = FAMILY
    msg["header"]["flags"] = 5  # NLM_F_REQUEST | NLM_F_ACK
    msg["header"]["sequence_number"] = seq
    msg.encode()
    return bytes(msg.data)


def tlvs(buf: bytes) -> list[tuple[int, bytes]]:
    """Attributes as sorted (type without flags, payload); nests expanded recursively."""
    out: list[tuple[int, bytes]] = []
    while len(buf) >= 4:
        length, kind = struct.unpack_from("=HH", buf)
        payload = buf[4:length]
        if kind & 0x8000 or (kind in (1, 2) and len(payload) >= 4 and _looks_nested(payload)):
            nested = b"".join(t.to_bytes(2, "little") + p for t, p in tlvs(payload))
            out.append((kind & 0x3FFF, nested))
        else:
            out.append((kind & 0x3FFF, payload))
        buf = buf[(length + 3) & ~3 :]
    return sorted(out)


def _looks_nested(payload: bytes) -> bool:
    at = 0
    while at + 4 <= len(payload):
        length = struct.unpack_from("=H", payload, at)[0]
        if length < 4:
            return False
        at += (length + 3) & ~3
    return at == len(payload)


def split(msg: bytes) -> tuple[bytes, bytes, list[tuple[int, bytes]]]:
    """(nlmsghdr without length, genl header, sorted attributes)."""
    length = struct.unpack_from("=I", msg)[0]
    assert length == len(msg)
    return msg[4:16], msg[16:20], tlvs(msg[20:])


def kproxy_encode(op: str, *args: dict[str, Any], seq: int = 1) -> bytes:
    body: Any = args[0] if len(args) == 1 else list(args)
    return _core.ipvs_encode(json.dumps({op: body}), FAMILY, seq)


def key_of(spec: dict[str, Any]) -> dict[str, Any]:
    return {k: spec[k] for k in ("addr", "protocol", "port")}


@pytest.mark.parametrize("spec", SERVICES, ids=lambda s: f"{s['addr']}-{s['scheduler']}")
def test_add_service_same_tlvs_as_pyroute2(spec: dict[str, Any]) -> None:
    ours = kproxy_encode("add_service", spec)
    theirs = pr2_encode(1, [("IPVS_CMD_ATTR_SERVICE", pr2_service(spec))])
    assert split(ours) == split(theirs)


@pytest.mark.parametrize("spec", SERVICES, ids=lambda s: f"{s['addr']}-{s['scheduler']}")
def test_pyroute2_service_decodes_to_the_spec(spec: dict[str, Any]) -> None:
    theirs = pr2_encode(2, [("IPVS_CMD_ATTR_SERVICE", pr2_service(spec))])
    got = json.loads(_core.ipvs_decode(theirs))
    assert got["cmd"] == 2
    want = {"flags": 0, "timeout": 0, "fwmark": 0, **spec}
    assert got["service"] == want


@pytest.mark.parametrize("dest", DESTS, ids=lambda d: d["addr"])
def test_add_dest_round_trips_both_ways(dest: dict[str, Any]) -> None:
    svc = SERVICES[0] if ":" not in dest["addr"] else SERVICES[1]
    ours = kproxy_encode("add_dest", key_of(svc), dest)
    theirs = pr2_encode(
        5,
        [
            ("IPVS_CMD_ATTR_SERVICE", pr2_service(svc, key_only=True)),
            ("IPVS_CMD_ATTR_DEST", pr2_dest(dest).dump_nla()),
        ],
    )
    got = json.loads(_core.ipvs_decode(theirs))
    assert got["dest"]["addr"] == dest["addr"]
    assert got["dest"]["port"] == dest["port"]
    assert got["dest"]["weight"] == dest["weight"]
    assert got["service"]["addr"] == svc["addr"]
    # pyroute2 decodes ours to the same fields.
    m = ipvsmsg(ours)
    m.decode()
    d = m.get_attr("IPVS_CMD_ATTR_DEST")
    assert d.get_attr("IPVS_DEST_ATTR_ADDR") == dest["addr"]
    assert d.get_attr("IPVS_DEST_ATTR_PORT") == dest["port"]
    assert d.get_attr("IPVS_DEST_ATTR_WEIGHT") == dest["weight"]
    assert d.get_attr("IPVS_DEST_ATTR_FWD_METHOD") == 0
    s = m.get_attr("IPVS_CMD_ATTR_SERVICE")
    assert s.get_attr("IPVS_SVC_ATTR_ADDR") == svc["addr"]
    assert s.get_attr("IPVS_SVC_ATTR_PORT") == svc["port"]


def test_pyroute2_reads_flags_and_timeout() -> None:
    spec = SERVICES[1]
    m = ipvsmsg(kproxy_encode("add_service", spec))
    m.decode()
    s = m.get_attr("IPVS_CMD_ATTR_SERVICE")
    assert s.get_attr("IPVS_SVC_ATTR_FLAGS")["flags"] == spec["flags"]
    assert s.get_attr("IPVS_SVC_ATTR_TIMEOUT") == 10800
    assert s.get_attr("IPVS_SVC_ATTR_SCHED_NAME") == "mh"
    assert s.get_attr("IPVS_SVC_ATTR_AF") == socket.AF_INET6


def test_batch_is_concatenated_messages_with_their_own_sequence_numbers() -> None:
    a = kproxy_encode("del_service", key_of(SERVICES[0]), seq=7)
    b = kproxy_encode("del_dest", key_of(SERVICES[0]), DESTS[0], seq=8)
    for raw, seq, cmd in ((a, 7, 3), (b, 8, 7)):
        length, _, flags, s = struct.unpack_from("=IHHI", raw)
        assert (length, flags, s, raw[16]) == (len(raw), 5, seq, cmd)


def test_bad_input_is_a_kproxy_error() -> None:
    from kproxy.errors import KproxyError

    with pytest.raises(KproxyError):
        _core.ipvs_encode('{"add_service": {"addr": "not-an-ip"}}', FAMILY, 1)
    with pytest.raises(KproxyError):
        _core.ipvs_decode(b"\x05\x00")
