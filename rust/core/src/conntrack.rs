//! Which UDP conntrack entries a sync makes stale (upstream pkg/proxy/conntrack):
//! shared by every dataplane that DNATs in the kernel. The caller deletes them after
//! the new rules are in.

use serde::Serialize;

use crate::model::{Protocol, ServicePort};
use crate::net::Family;

/// A UDP conntrack cleanup the caller should run after a successful sync.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConntrackCleanup {
    /// "service-ip" (delete flows to dst ip:port) or "nodeport" (to any local IP on
    /// port) or "endpoint" (flows to `ip`, DNATed to `endpoint_ip`).
    pub kind: String,
    pub ip: Option<String>,
    pub port: u16,
    pub endpoint_ip: Option<String>,
    pub protocol: String,
}

fn cleanup(
    kind: &str,
    ip: Option<String>,
    port: u16,
    endpoint_ip: Option<String>,
) -> ConntrackCleanup {
    ConntrackCleanup {
        kind: kind.into(),
        ip,
        port,
        endpoint_ip,
        protocol: "udp".into(),
    }
}

/// (destination IP or None for "any local address", port) of every way in.
fn frontends(sp: &ServicePort, family: Family) -> Vec<(Option<String>, u16)> {
    let mut out = Vec::new();
    if let Some(ip) = sp.cluster_ip(family) {
        out.push((Some(ip.to_string()), sp.port));
    }
    for ip in sp.external_ips.iter().chain(sp.load_balancer_ips.iter()) {
        if Family::of(ip) == family {
            out.push((Some(ip.to_string()), sp.port));
        }
    }
    if sp.node_port != 0 {
        out.push((None, sp.node_port));
    }
    out
}

/// A UDP service port gained its first reachable endpoint: packets were rejected
/// until now and conntrack may hold an entry that would blackhole the flow.
pub fn gained(out: &mut Vec<ConntrackCleanup>, family: Family, sp: &ServicePort) {
    if sp.name.protocol != Protocol::Udp {
        return;
    }
    for (ip, port) in frontends(sp, family) {
        let kind = if ip.is_some() {
            "service-ip"
        } else {
            "nodeport"
        };
        out.push(cleanup(kind, ip, port, None));
    }
}

/// A UDP service port changed: flows DNATed to endpoints that went away must not
/// stick, and a port that had no endpoints is handled as `gained`.
pub fn changed(
    out: &mut Vec<ConntrackCleanup>,
    family: Family,
    old_sp: &ServicePort,
    old_reachable: &[String],
    sp: &ServicePort,
    new_reachable: &[String],
) {
    if sp.name.protocol != Protocol::Udp {
        return;
    }
    if old_reachable.is_empty() {
        if !new_reachable.is_empty() {
            gained(out, family, sp);
        }
        return;
    }
    let targets = frontends(old_sp, family);
    for addr in old_reachable {
        if new_reachable.contains(addr) {
            continue;
        }
        let ep_ip = addr
            .rsplit_once(':')
            .map(|(h, _)| h.trim_matches(|c| c == '[' || c == ']').to_string());
        for (ip, port) in &targets {
            out.push(cleanup("endpoint", ip.clone(), *port, ep_ip.clone()));
        }
    }
}

/// A UDP service port was removed: flows to its ClusterIP go.
pub fn removed(out: &mut Vec<ConntrackCleanup>, family: Family, old_sp: &ServicePort) {
    if old_sp.name.protocol != Protocol::Udp {
        return;
    }
    if let Some(ip) = old_sp.cluster_ip(family) {
        out.push(cleanup(
            "service-ip",
            Some(ip.to_string()),
            old_sp.port,
            None,
        ));
    }
}
