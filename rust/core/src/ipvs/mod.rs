//! IPVS over generic netlink: the wire format (`wire`), a socket that batches many
//! requests per send (`socket`), and a reconciler that diffs the desired virtual
//! servers against what it programmed, refreshed from one dump on a full sync
//! (`reconcile`). `desired` turns the service model into virtual servers.

use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

pub mod desired;
pub mod reconcile;
pub mod socket;
pub mod wire;

pub const IPPROTO_TCP: u16 = 6;
pub const IPPROTO_UDP: u16 = 17;
pub const IPPROTO_SCTP: u16 = 132;

/// Service flags (include/uapi/linux/ip_vs.h).
pub const IP_VS_SVC_F_PERSISTENT: u32 = 0x1;
pub const IP_VS_SVC_F_ONEPACKET: u32 = 0x4;
/// Scheduler flag 1: mh-fallback / sh-fallback.
pub const IP_VS_SVC_F_SCHED1: u32 = 0x8;
/// Scheduler flag 2: mh-port / sh-port.
pub const IP_VS_SVC_F_SCHED2: u32 = 0x10;
pub const IP_VS_SVC_F_SCHED3: u32 = 0x20;

/// Forwarding methods; kproxy uses masquerading (NAT) as upstream does.
pub const IP_VS_CONN_F_MASQ: u32 = 0;
pub const IP_VS_CONN_F_TUNNEL: u32 = 2;
pub const IP_VS_CONN_F_DROUTE: u32 = 3;

/// Errors of the IPVS client. `Os` carries the errno so the binding can raise the
/// matching OSError subclass.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpvsError {
    #[error("{context}: {}", std::io::Error::from_raw_os_error(*errno))]
    Os { context: String, errno: i32 },
    #[error("netlink protocol error: {0}")]
    Protocol(String),
}

impl IpvsError {
    pub fn os(context: impl Into<String>, errno: i32) -> Self {
        IpvsError::Os {
            context: context.into(),
            errno,
        }
    }

    pub fn last_os(context: impl Into<String>) -> Self {
        let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        IpvsError::os(context, errno)
    }
}

pub fn protocol_name(p: u16) -> String {
    match p {
        IPPROTO_TCP => "TCP".into(),
        IPPROTO_UDP => "UDP".into(),
        IPPROTO_SCTP => "SCTP".into(),
        other => format!("proto{other}"),
    }
}

fn host_port(addr: &IpAddr, port: u16) -> String {
    match addr {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

/// What identifies a virtual server in the kernel.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ServiceKey {
    pub addr: IpAddr,
    pub protocol: u16,
    pub port: u16,
    #[serde(default)]
    pub fwmark: u32,
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.fwmark != 0 {
            write!(f, "FWM {}", self.fwmark)
        } else {
            write!(
                f,
                "{} {}",
                protocol_name(self.protocol),
                host_port(&self.addr, self.port)
            )
        }
    }
}

/// A virtual server (an `ipvsadm -A` line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtualServer {
    #[serde(flatten)]
    pub key: ServiceKey,
    pub scheduler: String,
    #[serde(default)]
    pub flags: u32,
    /// Persistence timeout in seconds (with IP_VS_SVC_F_PERSISTENT).
    #[serde(default)]
    pub timeout: u32,
}

impl VirtualServer {
    /// Netmask as ipvsadm sends it: all ones for IPv4, the prefix length for IPv6.
    pub fn netmask(&self) -> u32 {
        match self.key.addr {
            IpAddr::V4(_) => u32::MAX,
            IpAddr::V6(_) => 128,
        }
    }
}

/// A real server of a virtual server (an `ipvsadm -a` line), with the connection
/// counters a dump reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Destination {
    pub addr: IpAddr,
    pub port: u16,
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default)]
    pub fwd_method: u32,
    #[serde(default)]
    pub u_threshold: u32,
    #[serde(default)]
    pub l_threshold: u32,
    #[serde(default)]
    pub active_conns: u32,
    #[serde(default)]
    pub inactive_conns: u32,
    #[serde(default)]
    pub persist_conns: u32,
}

fn default_weight() -> u32 {
    1
}

impl Destination {
    pub fn new(addr: IpAddr, port: u16, weight: u32) -> Self {
        Destination {
            addr,
            port,
            weight,
            fwd_method: IP_VS_CONN_F_MASQ,
            u_threshold: 0,
            l_threshold: 0,
            active_conns: 0,
            inactive_conns: 0,
            persist_conns: 0,
        }
    }

    pub fn id(&self) -> (IpAddr, u16) {
        (self.addr, self.port)
    }

    /// The programmable part equals (counters are the kernel's, not ours).
    pub fn same_config(&self, other: &Destination) -> bool {
        self.weight == other.weight
            && self.fwd_method == other.fwd_method
            && self.u_threshold == other.u_threshold
            && self.l_threshold == other.l_threshold
    }
}

/// The three IPVS connection timeouts in seconds; 0 leaves a value unchanged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timeouts {
    pub tcp: u32,
    pub tcp_fin: u32,
    pub udp: u32,
}

/// One change to the kernel's IPVS table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    AddService(VirtualServer),
    EditService(VirtualServer),
    DelService(ServiceKey),
    AddDest(ServiceKey, Destination),
    EditDest(ServiceKey, Destination),
    DelDest(ServiceKey, Destination),
    SetTimeouts(Timeouts),
    Flush,
}

impl Op {
    /// Names the object, for error messages.
    pub fn describe(&self) -> String {
        match self {
            Op::AddService(vs) => format!("add virtual server {} ({})", vs.key, vs.scheduler),
            Op::EditService(vs) => format!("edit virtual server {} ({})", vs.key, vs.scheduler),
            Op::DelService(k) => format!("delete virtual server {k}"),
            Op::AddDest(k, d) => format!("add real server {} to {k}", host_port(&d.addr, d.port)),
            Op::EditDest(k, d) => format!(
                "set real server {} of {k} to weight {}",
                host_port(&d.addr, d.port),
                d.weight
            ),
            Op::DelDest(k, d) => {
                format!("delete real server {} of {k}", host_port(&d.addr, d.port))
            }
            Op::SetTimeouts(t) => format!(
                "set timeouts tcp={} tcpfin={} udp={}",
                t.tcp, t.tcp_fin, t.udp
            ),
            Op::Flush => "flush".into(),
        }
    }
}

/// The kernel side as the reconciler sees it; `socket::IpvsSocket` is the real one,
/// `reconcile::FakeKernel` the in-memory one for tests.
pub trait Kernel {
    fn services(&mut self) -> Result<Vec<VirtualServer>, IpvsError>;
    fn destinations(&mut self, key: &ServiceKey) -> Result<Vec<Destination>, IpvsError>;
    /// Apply ops in order, continuing past failures; returns (index, errno) of each failure.
    fn apply(&mut self, ops: &[Op]) -> Result<Vec<(usize, i32)>, IpvsError>;
}
