//! Counters: per service port (connections, bytes, failures by kind) and global ones.
//! Plain relaxed atomics: the forwarding path never takes a lock to count.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

use serde::Serialize;

#[derive(Default)]
pub struct PortStats {
    /// TCP connections accepted / UDP sessions opened for this service port.
    pub connections: AtomicU64,
    pub active: AtomicI64,
    /// Client -> endpoint bytes.
    pub bytes_to_endpoints: AtomicU64,
    /// Endpoint -> client bytes.
    pub bytes_from_endpoints: AtomicU64,
    /// A connect to one endpoint failed (the flow was retried on another).
    pub connect_failures: AtomicU64,
    /// No endpoint could take the flow (none usable, or every attempt failed).
    pub no_endpoint: AtomicU64,
    /// A peer reset the connection (or an I/O error ended it); the other side got a RST.
    pub resets: AtomicU64,
    /// UDP datagrams dropped: session limit reached, or the endpoint refused them.
    pub udp_dropped: AtomicU64,
}

#[derive(Serialize)]
pub struct PortSnapshot {
    pub service: String,
    pub protocol: &'static str,
    pub family: &'static str,
    pub connections: u64,
    pub active: i64,
    pub bytes_to_endpoints: u64,
    pub bytes_from_endpoints: u64,
    pub connect_failures: u64,
    pub no_endpoint: u64,
    pub resets: u64,
    pub udp_dropped: u64,
}

impl PortStats {
    pub fn snapshot(
        &self,
        service: String,
        protocol: &'static str,
        family: &'static str,
    ) -> PortSnapshot {
        PortSnapshot {
            service,
            protocol,
            family,
            connections: self.connections.load(Relaxed),
            active: self.active.load(Relaxed),
            bytes_to_endpoints: self.bytes_to_endpoints.load(Relaxed),
            bytes_from_endpoints: self.bytes_from_endpoints.load(Relaxed),
            connect_failures: self.connect_failures.load(Relaxed),
            no_endpoint: self.no_endpoint.load(Relaxed),
            resets: self.resets.load(Relaxed),
            udp_dropped: self.udp_dropped.load(Relaxed),
        }
    }
}

/// Failures that belong to no service port.
#[derive(Default)]
pub struct GlobalStats {
    /// accept(2) failed (e.g. EMFILE); the listener backs off briefly.
    pub accept_errors: AtomicU64,
    /// A connection whose original destination is no Service (or unknown).
    pub unknown_destination: AtomicU64,
    pub relays_spliced: AtomicU64,
    pub relays_copied: AtomicU64,
}

#[derive(Serialize)]
pub struct GlobalSnapshot {
    pub accept_errors: u64,
    pub unknown_destination: u64,
    pub relays_spliced: u64,
    pub relays_copied: u64,
    pub open_fds: Option<usize>,
    pub idle_pipes: usize,
}

impl GlobalStats {
    pub fn snapshot(&self, idle_pipes: usize) -> GlobalSnapshot {
        GlobalSnapshot {
            accept_errors: self.accept_errors.load(Relaxed),
            unknown_destination: self.unknown_destination.load(Relaxed),
            relays_spliced: self.relays_spliced.load(Relaxed),
            relays_copied: self.relays_copied.load(Relaxed),
            open_fds: super::sys::open_fds(),
            idle_pipes,
        }
    }
}
