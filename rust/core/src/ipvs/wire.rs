//! IPVS generic-netlink wire format (include/uapi/linux/ip_vs.h): encoding of requests
//! and decoding of replies, with no socket so it is tested byte for byte without a
//! kernel. Layout and attribute choices follow what upstream kube-proxy's IPVS library
//! (moby/ipvs) and pyroute2 send: IPv4 addresses as 4 bytes, ports in network order.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::{Destination, IpvsError, Op, ServiceKey, Timeouts, VirtualServer};

pub const NLMSG_HDRLEN: usize = 16;
pub const GENL_HDRLEN: usize = 4;
pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;
pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_MULTI: u16 = 0x2;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_DUMP: u16 = 0x300;
pub const NLA_F_NESTED: u16 = 0x8000;

pub const GENL_ID_CTRL: u16 = 0x10;
pub const CTRL_CMD_GETFAMILY: u8 = 3;
pub const CTRL_ATTR_FAMILY_ID: u16 = 1;
pub const CTRL_ATTR_FAMILY_NAME: u16 = 2;

pub const IPVS_GENL_NAME: &str = "IPVS";
pub const IPVS_GENL_VERSION: u8 = 1;

pub const IPVS_CMD_NEW_SERVICE: u8 = 1;
pub const IPVS_CMD_SET_SERVICE: u8 = 2;
pub const IPVS_CMD_DEL_SERVICE: u8 = 3;
pub const IPVS_CMD_GET_SERVICE: u8 = 4;
pub const IPVS_CMD_NEW_DEST: u8 = 5;
pub const IPVS_CMD_SET_DEST: u8 = 6;
pub const IPVS_CMD_DEL_DEST: u8 = 7;
pub const IPVS_CMD_GET_DEST: u8 = 8;
pub const IPVS_CMD_SET_CONFIG: u8 = 12;
pub const IPVS_CMD_GET_CONFIG: u8 = 13;
pub const IPVS_CMD_FLUSH: u8 = 17;

pub const IPVS_CMD_ATTR_SERVICE: u16 = 1;
pub const IPVS_CMD_ATTR_DEST: u16 = 2;
pub const IPVS_CMD_ATTR_TIMEOUT_TCP: u16 = 4;
pub const IPVS_CMD_ATTR_TIMEOUT_TCP_FIN: u16 = 5;
pub const IPVS_CMD_ATTR_TIMEOUT_UDP: u16 = 6;

pub const IPVS_SVC_ATTR_AF: u16 = 1;
pub const IPVS_SVC_ATTR_PROTOCOL: u16 = 2;
pub const IPVS_SVC_ATTR_ADDR: u16 = 3;
pub const IPVS_SVC_ATTR_PORT: u16 = 4;
pub const IPVS_SVC_ATTR_FWMARK: u16 = 5;
pub const IPVS_SVC_ATTR_SCHED_NAME: u16 = 6;
pub const IPVS_SVC_ATTR_FLAGS: u16 = 7;
pub const IPVS_SVC_ATTR_TIMEOUT: u16 = 8;
pub const IPVS_SVC_ATTR_NETMASK: u16 = 9;

pub const IPVS_DEST_ATTR_ADDR: u16 = 1;
pub const IPVS_DEST_ATTR_PORT: u16 = 2;
pub const IPVS_DEST_ATTR_FWD_METHOD: u16 = 3;
pub const IPVS_DEST_ATTR_WEIGHT: u16 = 4;
pub const IPVS_DEST_ATTR_U_THRESH: u16 = 5;
pub const IPVS_DEST_ATTR_L_THRESH: u16 = 6;
pub const IPVS_DEST_ATTR_ACTIVE_CONNS: u16 = 7;
pub const IPVS_DEST_ATTR_INACT_CONNS: u16 = 8;
pub const IPVS_DEST_ATTR_PERSIST_CONNS: u16 = 9;
pub const IPVS_DEST_ATTR_ADDR_FAMILY: u16 = 11;

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Flags the kernel sets on its own and reports in dumps; never part of a diff.
pub const IP_VS_SVC_F_HASHED: u32 = 0x2;

/// A message being built: header placeholders patched by `finish`.
pub struct MsgBuilder {
    buf: Vec<u8>,
    start: usize,
    nests: Vec<usize>,
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

impl MsgBuilder {
    /// Start a message at the end of `buf` (so a batch is one buffer).
    pub fn new(
        mut buf: Vec<u8>,
        msg_type: u16,
        flags: u16,
        seq: u32,
        cmd: u8,
        version: u8,
    ) -> Self {
        let start = buf.len();
        buf.extend_from_slice(&0u32.to_ne_bytes());
        buf.extend_from_slice(&msg_type.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
        buf.extend_from_slice(&[cmd, version, 0, 0]);
        MsgBuilder {
            buf,
            start,
            nests: Vec::new(),
        }
    }

    pub fn attr(&mut self, kind: u16, payload: &[u8]) {
        let len = 4 + payload.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.buf.resize(self.buf.len() + (align4(len) - len), 0);
    }

    pub fn u16(&mut self, kind: u16, v: u16) {
        self.attr(kind, &v.to_ne_bytes());
    }

    pub fn be16(&mut self, kind: u16, v: u16) {
        self.attr(kind, &v.to_be_bytes());
    }

    pub fn u32(&mut self, kind: u16, v: u32) {
        self.attr(kind, &v.to_ne_bytes());
    }

    pub fn cstr(&mut self, kind: u16, s: &str) {
        let mut b = s.as_bytes().to_vec();
        b.push(0);
        self.attr(kind, &b);
    }

    pub fn begin_nest(&mut self, kind: u16) {
        self.nests.push(self.buf.len());
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
    }

    pub fn end_nest(&mut self) {
        let at = self.nests.pop().expect("end_nest without begin_nest");
        let len = (self.buf.len() - at) as u16;
        self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
    }

    pub fn finish(mut self) -> Vec<u8> {
        let len = (self.buf.len() - self.start) as u32;
        self.buf[self.start..self.start + 4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

fn addr_bytes(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

pub fn af_of(ip: &IpAddr) -> u16 {
    match ip {
        IpAddr::V4(_) => AF_INET,
        IpAddr::V6(_) => AF_INET6,
    }
}

fn put_service_key(m: &mut MsgBuilder, key: &ServiceKey) {
    m.u16(IPVS_SVC_ATTR_AF, af_of(&key.addr));
    if key.fwmark != 0 {
        m.u32(IPVS_SVC_ATTR_FWMARK, key.fwmark);
    } else {
        m.u16(IPVS_SVC_ATTR_PROTOCOL, key.protocol);
        m.attr(IPVS_SVC_ATTR_ADDR, &addr_bytes(&key.addr));
        m.be16(IPVS_SVC_ATTR_PORT, key.port);
    }
}

fn put_service(m: &mut MsgBuilder, vs: &VirtualServer) {
    m.begin_nest(IPVS_CMD_ATTR_SERVICE);
    put_service_key(m, &vs.key);
    m.cstr(IPVS_SVC_ATTR_SCHED_NAME, &vs.scheduler);
    let mut flags = vs.flags.to_ne_bytes().to_vec();
    flags.extend_from_slice(&u32::MAX.to_ne_bytes()); // mask: every flag is set or cleared
    m.attr(IPVS_SVC_ATTR_FLAGS, &flags);
    m.u32(IPVS_SVC_ATTR_TIMEOUT, vs.timeout);
    m.u32(IPVS_SVC_ATTR_NETMASK, vs.netmask());
    m.end_nest();
}

fn put_key_only(m: &mut MsgBuilder, key: &ServiceKey) {
    m.begin_nest(IPVS_CMD_ATTR_SERVICE);
    put_service_key(m, key);
    m.end_nest();
}

fn put_dest(m: &mut MsgBuilder, d: &Destination, full: bool) {
    m.begin_nest(IPVS_CMD_ATTR_DEST);
    m.u16(IPVS_DEST_ATTR_ADDR_FAMILY, af_of(&d.addr));
    m.attr(IPVS_DEST_ATTR_ADDR, &addr_bytes(&d.addr));
    m.be16(IPVS_DEST_ATTR_PORT, d.port);
    if full {
        m.u32(IPVS_DEST_ATTR_FWD_METHOD, d.fwd_method);
        m.u32(IPVS_DEST_ATTR_WEIGHT, d.weight);
        m.u32(IPVS_DEST_ATTR_U_THRESH, d.u_threshold);
        m.u32(IPVS_DEST_ATTR_L_THRESH, d.l_threshold);
    }
    m.end_nest();
}

/// Append one operation as a request (with NLM_F_ACK) to `buf`.
pub fn encode_op(buf: Vec<u8>, family: u16, seq: u32, op: &Op) -> Vec<u8> {
    let flags = NLM_F_REQUEST | NLM_F_ACK;
    let v = IPVS_GENL_VERSION;
    let mut m;
    match op {
        Op::AddService(vs) | Op::EditService(vs) => {
            let cmd = if matches!(op, Op::AddService(_)) {
                IPVS_CMD_NEW_SERVICE
            } else {
                IPVS_CMD_SET_SERVICE
            };
            m = MsgBuilder::new(buf, family, flags, seq, cmd, v);
            put_service(&mut m, vs);
        }
        Op::DelService(key) => {
            m = MsgBuilder::new(buf, family, flags, seq, IPVS_CMD_DEL_SERVICE, v);
            put_key_only(&mut m, key);
        }
        Op::AddDest(key, d) | Op::EditDest(key, d) => {
            let cmd = if matches!(op, Op::AddDest(..)) {
                IPVS_CMD_NEW_DEST
            } else {
                IPVS_CMD_SET_DEST
            };
            m = MsgBuilder::new(buf, family, flags, seq, cmd, v);
            put_key_only(&mut m, key);
            put_dest(&mut m, d, true);
        }
        Op::DelDest(key, d) => {
            m = MsgBuilder::new(buf, family, flags, seq, IPVS_CMD_DEL_DEST, v);
            put_key_only(&mut m, key);
            put_dest(&mut m, d, false);
        }
        Op::SetTimeouts(t) => {
            m = MsgBuilder::new(buf, family, flags, seq, IPVS_CMD_SET_CONFIG, v);
            m.u32(IPVS_CMD_ATTR_TIMEOUT_TCP, t.tcp);
            m.u32(IPVS_CMD_ATTR_TIMEOUT_TCP_FIN, t.tcp_fin);
            m.u32(IPVS_CMD_ATTR_TIMEOUT_UDP, t.udp);
        }
        Op::Flush => {
            m = MsgBuilder::new(buf, family, flags, seq, IPVS_CMD_FLUSH, v);
        }
    }
    m.finish()
}

/// A dump request for all services, or for the destinations of one service.
pub fn encode_dump_services(family: u16, seq: u32) -> Vec<u8> {
    let m = MsgBuilder::new(
        Vec::new(),
        family,
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        IPVS_CMD_GET_SERVICE,
        IPVS_GENL_VERSION,
    );
    m.finish()
}

pub fn encode_dump_dests(family: u16, seq: u32, key: &ServiceKey) -> Vec<u8> {
    let mut m = MsgBuilder::new(
        Vec::new(),
        family,
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        IPVS_CMD_GET_DEST,
        IPVS_GENL_VERSION,
    );
    put_key_only(&mut m, key);
    m.finish()
}

pub fn encode_get_config(family: u16, seq: u32) -> Vec<u8> {
    MsgBuilder::new(
        Vec::new(),
        family,
        NLM_F_REQUEST,
        seq,
        IPVS_CMD_GET_CONFIG,
        IPVS_GENL_VERSION,
    )
    .finish()
}

pub fn encode_get_family(seq: u32, name: &str) -> Vec<u8> {
    let mut m = MsgBuilder::new(
        Vec::new(),
        GENL_ID_CTRL,
        NLM_F_REQUEST,
        seq,
        CTRL_CMD_GETFAMILY,
        1,
    );
    m.cstr(CTRL_ATTR_FAMILY_NAME, name);
    m.finish()
}

/// One netlink message of a reply buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawMsg<'a> {
    pub msg_type: u16,
    pub flags: u16,
    pub seq: u32,
    pub payload: &'a [u8],
}

fn rd_u16(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

fn rd_u32(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Split a receive buffer into messages.
pub fn split_msgs(buf: &[u8]) -> Result<Vec<RawMsg<'_>>, IpvsError> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + NLMSG_HDRLEN <= buf.len() {
        let len = rd_u32(buf, at) as usize;
        if len < NLMSG_HDRLEN || at + len > buf.len() {
            return Err(IpvsError::Protocol(format!(
                "bad netlink message length {len}"
            )));
        }
        out.push(RawMsg {
            msg_type: rd_u16(buf, at + 4),
            flags: rd_u16(buf, at + 6),
            seq: rd_u32(buf, at + 8),
            payload: &buf[at + NLMSG_HDRLEN..at + len],
        });
        at += align4(len);
    }
    Ok(out)
}

/// The errno of an NLMSG_ERROR payload (0 = ack).
pub fn error_code(payload: &[u8]) -> Result<i32, IpvsError> {
    if payload.len() < 4 {
        return Err(IpvsError::Protocol("short NLMSG_ERROR".into()));
    }
    Ok(-(rd_u32(payload, 0) as i32))
}

/// Attributes of a payload as (type without flags, value).
pub fn attrs(mut b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let len = rd_u16(b, 0) as usize;
        if len < 4 || len > b.len() {
            break;
        }
        out.push((rd_u16(b, 2) & 0x3fff, &b[4..len]));
        b = &b[align4(len).min(b.len())..];
    }
    out
}

fn as_u16(v: &[u8]) -> u16 {
    if v.len() >= 2 {
        rd_u16(v, 0)
    } else {
        0
    }
}

fn as_u32(v: &[u8]) -> u32 {
    if v.len() >= 4 {
        rd_u32(v, 0)
    } else {
        0
    }
}

fn as_be16(v: &[u8]) -> u16 {
    if v.len() >= 2 {
        u16::from_be_bytes([v[0], v[1]])
    } else {
        0
    }
}

fn as_addr(af: u16, v: &[u8]) -> IpAddr {
    if af == AF_INET6 && v.len() >= 16 {
        let mut o = [0u8; 16];
        o.copy_from_slice(&v[..16]);
        IpAddr::V6(Ipv6Addr::from(o))
    } else if v.len() >= 4 {
        IpAddr::V4(Ipv4Addr::new(v[0], v[1], v[2], v[3]))
    } else {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    }
}

fn as_cstr(v: &[u8]) -> String {
    let end = v.iter().position(|&c| c == 0).unwrap_or(v.len());
    String::from_utf8_lossy(&v[..end]).into_owned()
}

/// The family id from a CTRL_CMD_NEWFAMILY reply payload.
pub fn decode_family_id(payload: &[u8]) -> Option<u16> {
    if payload.len() < GENL_HDRLEN {
        return None;
    }
    attrs(&payload[GENL_HDRLEN..])
        .into_iter()
        .find(|(k, _)| *k == CTRL_ATTR_FAMILY_ID)
        .map(|(_, v)| as_u16(v))
}

/// The genl command of a payload.
pub fn genl_cmd(payload: &[u8]) -> u8 {
    payload.first().copied().unwrap_or(0)
}

pub fn decode_service_nest(v: &[u8]) -> VirtualServer {
    let a = attrs(v);
    let af = a
        .iter()
        .find(|(k, _)| *k == IPVS_SVC_ATTR_AF)
        .map(|(_, v)| as_u16(v))
        .unwrap_or(AF_INET);
    let mut vs = VirtualServer {
        key: ServiceKey {
            addr: if af == AF_INET6 {
                IpAddr::V6(Ipv6Addr::UNSPECIFIED)
            } else {
                IpAddr::V4(Ipv4Addr::UNSPECIFIED)
            },
            protocol: 0,
            port: 0,
            fwmark: 0,
        },
        scheduler: String::new(),
        flags: 0,
        timeout: 0,
    };
    for (k, v) in a {
        match k {
            IPVS_SVC_ATTR_PROTOCOL => vs.key.protocol = as_u16(v),
            IPVS_SVC_ATTR_ADDR => vs.key.addr = as_addr(af, v),
            IPVS_SVC_ATTR_PORT => vs.key.port = as_be16(v),
            IPVS_SVC_ATTR_FWMARK => vs.key.fwmark = as_u32(v),
            IPVS_SVC_ATTR_SCHED_NAME => vs.scheduler = as_cstr(v),
            IPVS_SVC_ATTR_FLAGS => vs.flags = as_u32(v) & !IP_VS_SVC_F_HASHED,
            IPVS_SVC_ATTR_TIMEOUT => vs.timeout = as_u32(v),
            _ => {}
        }
    }
    vs
}

pub fn decode_dest_nest(v: &[u8], default_af: u16) -> Destination {
    let a = attrs(v);
    let af = a
        .iter()
        .find(|(k, _)| *k == IPVS_DEST_ATTR_ADDR_FAMILY)
        .map(|(_, v)| as_u16(v))
        .unwrap_or(default_af);
    let mut d = Destination::new(as_addr(af, &[]), 0, 0);
    for (k, v) in a {
        match k {
            IPVS_DEST_ATTR_ADDR => d.addr = as_addr(af, v),
            IPVS_DEST_ATTR_PORT => d.port = as_be16(v),
            IPVS_DEST_ATTR_FWD_METHOD => d.fwd_method = as_u32(v),
            IPVS_DEST_ATTR_WEIGHT => d.weight = as_u32(v),
            IPVS_DEST_ATTR_U_THRESH => d.u_threshold = as_u32(v),
            IPVS_DEST_ATTR_L_THRESH => d.l_threshold = as_u32(v),
            IPVS_DEST_ATTR_ACTIVE_CONNS => d.active_conns = as_u32(v),
            IPVS_DEST_ATTR_INACT_CONNS => d.inactive_conns = as_u32(v),
            IPVS_DEST_ATTR_PERSIST_CONNS => d.persist_conns = as_u32(v),
            _ => {}
        }
    }
    d
}

/// A decoded IPVS message (a dump reply, or a request for the wire tests).
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    pub cmd: u8,
    pub service: Option<VirtualServer>,
    pub dest: Option<Destination>,
    pub timeouts: Option<Timeouts>,
}

/// Decode a genl payload (genl header + attributes) of the IPVS family.
pub fn decode_ipvs(payload: &[u8]) -> Result<Decoded, IpvsError> {
    if payload.len() < GENL_HDRLEN {
        return Err(IpvsError::Protocol("short genl message".into()));
    }
    let mut out = Decoded {
        cmd: payload[0],
        service: None,
        dest: None,
        timeouts: None,
    };
    let mut t = Timeouts::default();
    let mut has_t = false;
    for (k, v) in attrs(&payload[GENL_HDRLEN..]) {
        match k {
            IPVS_CMD_ATTR_SERVICE => out.service = Some(decode_service_nest(v)),
            IPVS_CMD_ATTR_DEST => {
                let af = out
                    .service
                    .as_ref()
                    .map(|s| af_of(&s.key.addr))
                    .unwrap_or(AF_INET);
                out.dest = Some(decode_dest_nest(v, af))
            }
            IPVS_CMD_ATTR_TIMEOUT_TCP => {
                t.tcp = as_u32(v);
                has_t = true
            }
            IPVS_CMD_ATTR_TIMEOUT_TCP_FIN => {
                t.tcp_fin = as_u32(v);
                has_t = true
            }
            IPVS_CMD_ATTR_TIMEOUT_UDP => {
                t.udp = as_u32(v);
                has_t = true
            }
            _ => {}
        }
    }
    if has_t {
        out.timeouts = Some(t);
    }
    Ok(out)
}

/// Decode one full netlink message (header included), as the wire tests feed it.
pub fn decode_message(buf: &[u8]) -> Result<Decoded, IpvsError> {
    let msgs = split_msgs(buf)?;
    let m = msgs
        .first()
        .ok_or_else(|| IpvsError::Protocol("empty buffer".into()))?;
    decode_ipvs(m.payload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipvs::{IPPROTO_TCP, IPPROTO_UDP, IP_VS_SVC_F_PERSISTENT};

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    fn key(ip: &str, proto: u16, port: u16) -> ServiceKey {
        ServiceKey {
            addr: ip.parse().unwrap(),
            protocol: proto,
            port,
            fwmark: 0,
        }
    }

    fn vs(ip: &str) -> VirtualServer {
        VirtualServer {
            key: key(ip, IPPROTO_TCP, 80),
            scheduler: "rr".into(),
            flags: 0,
            timeout: 0,
        }
    }

    // Golden bytes, laid out by hand from include/uapi/linux/ip_vs.h (x86-64, little
    // endian): nlmsghdr, genlmsghdr, then the nested IPVS_CMD_ATTR_SERVICE.
    #[test]
    fn golden_add_service_v4() {
        let b = encode_op(Vec::new(), 0x20, 1, &Op::AddService(vs("10.96.0.10")));
        let want = concat!(
            "5c000000",
            "2000",
            "0500",
            "01000000",
            "00000000",                 // nlmsghdr: len 92, NEW|ACK
            "01010000",                 // cmd NEW_SERVICE, version 1
            "48000180",                 // SERVICE, nested, len 72
            "0600010002000000",         // AF_INET
            "0600020006000000",         // IPPROTO_TCP
            "080003000a60000a",         // 10.96.0.10
            "0600040000500000",         // port 80, big endian
            "0700060072720000",         // "rr\0"
            "0c00070000000000ffffffff", // flags 0, mask all
            "0800080000000000",         // timeout 0
            "08000900ffffffff",         // netmask /32
        );
        assert_eq!(hex(&b), want);
    }

    #[test]
    fn golden_add_dest_v4() {
        let d = Destination::new("10.244.1.5".parse().unwrap(), 8080, 1);
        let b = encode_op(
            Vec::new(),
            0x20,
            7,
            &Op::AddDest(key("10.96.0.10", IPPROTO_TCP, 80), d),
        );
        let want = concat!(
            "74000000",
            "2000",
            "0500",
            "07000000",
            "00000000",
            "05010000", // cmd NEW_DEST
            "24000180", // SERVICE key: len 36
            "0600010002000000",
            "0600020006000000",
            "080003000a60000a",
            "0600040000500000",
            "3c000280",         // DEST, nested, len 60
            "06000b0002000000", // ADDR_FAMILY AF_INET
            "080001000af40105", // 10.244.1.5
            "060002001f900000", // port 8080
            "0800030000000000", // FWD_METHOD masq
            "0800040001000000", // WEIGHT 1
            "0800050000000000", // U_THRESH
            "0800060000000000", // L_THRESH
        );
        assert_eq!(hex(&b), want);
    }

    #[test]
    fn golden_timeouts_and_family_lookup() {
        let t = Timeouts {
            tcp: 900,
            tcp_fin: 120,
            udp: 300,
        };
        let b = encode_op(Vec::new(), 0x20, 2, &Op::SetTimeouts(t));
        assert_eq!(
            hex(&b),
            concat!(
                "2c000000",
                "2000",
                "0500",
                "02000000",
                "00000000",
                "0c010000",
                "0800040084030000",
                "0800050078000000",
                "080006002c010000",
            )
        );
        let g = encode_get_family(3, "IPVS");
        assert_eq!(
            hex(&g),
            concat!(
                "20000000",
                "1000",
                "0100",
                "03000000",
                "00000000",
                "03010000",
                "0900020049505653",
                "00000000",
            )
        );
    }

    #[test]
    fn roundtrip_v6_persistent_and_batch() {
        let mut v = vs("fd00::10");
        v.key.protocol = IPPROTO_UDP;
        v.flags = IP_VS_SVC_F_PERSISTENT;
        v.timeout = 10800;
        v.scheduler = "mh".into();
        let d = Destination::new("fd00:1::5".parse().unwrap(), 53, 3);
        let mut buf = encode_op(Vec::new(), 0x21, 10, &Op::AddService(v.clone()));
        buf = encode_op(buf, 0x21, 11, &Op::AddDest(v.key.clone(), d.clone()));
        let msgs = split_msgs(&buf).unwrap();
        assert_eq!(msgs.len(), 2);
        assert_eq!(msgs[1].seq, 11);
        let a = decode_ipvs(msgs[0].payload).unwrap();
        assert_eq!(a.cmd, IPVS_CMD_NEW_SERVICE);
        assert_eq!(a.service.unwrap(), v);
        let b = decode_ipvs(msgs[1].payload).unwrap();
        assert_eq!(b.service.unwrap().key, v.key);
        assert_eq!(b.dest.unwrap(), d);
    }

    #[test]
    fn decodes_kernel_style_dump_with_16_byte_v4_address_and_hashed_flag() {
        let mut m = MsgBuilder::new(Vec::new(), 0x20, NLM_F_MULTI, 5, IPVS_CMD_NEW_SERVICE, 1);
        m.begin_nest(IPVS_CMD_ATTR_SERVICE);
        m.u16(IPVS_SVC_ATTR_AF, AF_INET);
        m.u16(IPVS_SVC_ATTR_PROTOCOL, IPPROTO_TCP);
        m.attr(
            IPVS_SVC_ATTR_ADDR,
            &[10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        );
        m.be16(IPVS_SVC_ATTR_PORT, 443);
        m.cstr(IPVS_SVC_ATTR_SCHED_NAME, "wlc");
        m.attr(IPVS_SVC_ATTR_FLAGS, &[3, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
        m.u32(IPVS_SVC_ATTR_TIMEOUT, 60);
        m.end_nest();
        let b = m.finish();
        let d = decode_message(&b).unwrap();
        let s = d.service.unwrap();
        assert_eq!(s.key, key("10.0.0.1", IPPROTO_TCP, 443));
        assert_eq!(s.flags, IP_VS_SVC_F_PERSISTENT);
        assert_eq!(s.scheduler, "wlc");
    }

    #[test]
    fn ack_and_error_codes() {
        let mut b = Vec::new();
        b.extend_from_slice(&36u32.to_ne_bytes());
        b.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        b.extend_from_slice(&0u16.to_ne_bytes());
        b.extend_from_slice(&9u32.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        b.extend_from_slice(&(-17i32).to_ne_bytes());
        b.extend_from_slice(&[0u8; 16]);
        let m = split_msgs(&b).unwrap();
        assert_eq!(m[0].seq, 9);
        assert_eq!(error_code(m[0].payload).unwrap(), 17);
        assert!(split_msgs(&b[..20]).is_err()); // truncated
        let mut bad = b.clone();
        bad[0] = 200;
        assert!(split_msgs(&bad).is_err());
    }
}
