//! Endpoint categorisation with upstream kube-proxy's semantics
//! (pkg/proxy/topology.go: CategorizeEndpoints).

use crate::model::{Endpoint, ServicePort};

/// Which topology hints decide the cluster endpoints for this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TopologyMode {
    #[default]
    None,
    Zone,
    Node,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Categorized {
    /// Endpoints for "Cluster" traffic policy (after topology and terminating fallback).
    pub cluster: Vec<Endpoint>,
    /// Endpoints for "Local" traffic policy (local ready, else local serving-terminating).
    pub local: Vec<Endpoint>,
    /// Every endpoint some rule may reach from this node (cluster ∪ local).
    pub all_reachable: Vec<Endpoint>,
    /// The Service has usable endpoints somewhere in the cluster.
    pub has_any: bool,
    /// How topology was applied, for explanations.
    pub topology: TopologyMode,
    /// Cluster endpoints fell back to serving-and-terminating ones.
    pub cluster_terminating_fallback: bool,
    /// Local endpoints fell back to serving-and-terminating ones.
    pub local_terminating_fallback: bool,
}

/// Hints are used only when every ready endpoint carries them (all-or-nothing per
/// Service), and only when they leave this node at least one endpoint.
pub fn topology_mode(endpoints: &[Endpoint], node_name: &str, zone: Option<&str>) -> TopologyMode {
    let mut has_for_node = false;
    let mut all_node_hints = true;
    let mut has_for_zone = false;
    let mut all_zone_hints = true;
    let mut any_ready = false;
    for ep in endpoints.iter().filter(|e| e.ready) {
        any_ready = true;
        if ep.node_hints.is_empty() {
            all_node_hints = false;
        } else if ep.node_hints.iter().any(|n| n == node_name) {
            has_for_node = true;
        }
        if ep.zone_hints.is_empty() {
            all_zone_hints = false;
        } else if zone.is_some_and(|z| ep.zone_hints.iter().any(|h| h == z)) {
            has_for_zone = true;
        }
    }
    if !any_ready {
        return TopologyMode::None;
    }
    if all_node_hints && has_for_node {
        return TopologyMode::Node;
    }
    if all_zone_hints && has_for_zone {
        return TopologyMode::Zone;
    }
    TopologyMode::None
}

fn available_for_topology(
    ep: &Endpoint,
    mode: TopologyMode,
    node_name: &str,
    zone: Option<&str>,
) -> bool {
    match mode {
        TopologyMode::None => true,
        TopologyMode::Node => ep.node_hints.iter().any(|n| n == node_name),
        TopologyMode::Zone => zone.is_some_and(|z| ep.zone_hints.iter().any(|h| h == z)),
    }
}

pub fn categorize(
    endpoints: &[Endpoint],
    svc: &ServicePort,
    node_name: &str,
    zone: Option<&str>,
) -> Categorized {
    let mut out = Categorized {
        topology: TopologyMode::None,
        ..Default::default()
    };
    if svc.uses_cluster_endpoints() {
        out.topology = topology_mode(endpoints, node_name, zone);
        out.cluster = endpoints
            .iter()
            .filter(|e| e.ready && available_for_topology(e, out.topology, node_name, zone))
            .cloned()
            .collect();
        if out.cluster.is_empty() {
            out.cluster = endpoints
                .iter()
                .filter(|e| e.serving && e.terminating)
                .cloned()
                .collect();
            out.cluster_terminating_fallback = !out.cluster.is_empty();
        }
        if !out.cluster.is_empty() {
            out.has_any = true;
        }
    }
    if !svc.uses_local_endpoints() {
        out.all_reachable = out.cluster.clone();
        return out;
    }
    let mut local_ready = false;
    let mut local_serving_terminating = false;
    for ep in endpoints {
        if ep.ready {
            out.has_any = true;
            if ep.is_local(node_name) {
                local_ready = true;
            }
        } else if ep.serving && ep.terminating {
            out.has_any = true;
            if ep.is_local(node_name) {
                local_serving_terminating = true;
            }
        }
    }
    if local_ready {
        out.local = endpoints
            .iter()
            .filter(|e| e.is_local(node_name) && e.ready)
            .cloned()
            .collect();
    } else if local_serving_terminating {
        out.local_terminating_fallback = true;
        out.local = endpoints
            .iter()
            .filter(|e| e.is_local(node_name) && e.serving && e.terminating)
            .cloned()
            .collect();
    }
    if !svc.uses_cluster_endpoints() {
        out.all_reachable = out.local.clone();
        return out;
    }
    let mut all = out.cluster.clone();
    for ep in &out.local {
        if !all.iter().any(|e| e.ip == ep.ip && e.port == ep.port) {
            all.push(ep.clone());
        }
    }
    all.sort_by_key(|e| e.addr());
    out.all_reachable = all;
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Protocol, ServicePortName};

    fn ep(
        ip: &str,
        node: &str,
        ready: bool,
        serving: bool,
        terminating: bool,
        zones: &[&str],
    ) -> Endpoint {
        Endpoint {
            ip: ip.parse().unwrap(),
            port: 80,
            ready,
            serving,
            terminating,
            node_name: Some(node.into()),
            zone: None,
            zone_hints: zones.iter().map(|s| s.to_string()).collect(),
            node_hints: vec![],
        }
    }

    fn sp(itp_local: bool, etp_local: bool, node_port: u16) -> ServicePort {
        ServicePort {
            name: ServicePortName {
                namespace: "ns".into(),
                name: "s".into(),
                port: "".into(),
                protocol: Protocol::Tcp,
            },
            cluster_ips: vec!["10.96.0.1".parse().unwrap()],
            port: 80,
            node_port,
            external_ips: vec![],
            load_balancer_ips: vec![],
            load_balancer_source_ranges: vec![],
            affinity_timeout: None,
            external_policy_local: etp_local,
            internal_policy_local: itp_local,
            health_check_node_port: 0,
            lb_algorithm: None,
            ipvs_scheduler: None,
        }
    }

    #[test]
    fn terminating_fallback() {
        let eps = vec![
            ep("10.0.0.1", "a", false, true, true, &[]),
            ep("10.0.0.2", "b", false, false, true, &[]),
        ];
        let c = categorize(&eps, &sp(false, false, 0), "a", None);
        assert_eq!(c.cluster.len(), 1);
        assert!(c.cluster_terminating_fallback);
        assert!(c.has_any);
    }

    #[test]
    fn zone_hints_all_or_nothing() {
        let eps = vec![
            ep("10.0.0.1", "a", true, true, false, &["z1"]),
            ep("10.0.0.2", "b", true, true, false, &["z2"]),
        ];
        let c = categorize(&eps, &sp(false, false, 0), "a", Some("z1"));
        assert_eq!(c.cluster.len(), 1);
        assert_eq!(c.topology, TopologyMode::Zone);
        let mut eps2 = eps.clone();
        eps2[1].zone_hints.clear();
        let c = categorize(&eps2, &sp(false, false, 0), "a", Some("z1"));
        assert_eq!(c.cluster.len(), 2);
        // No endpoint hinted for our zone: hints are ignored.
        let c = categorize(&eps, &sp(false, false, 0), "a", Some("z3"));
        assert_eq!(c.cluster.len(), 2);
    }

    #[test]
    fn local_policies() {
        let eps = vec![
            ep("10.0.0.1", "a", true, true, false, &[]),
            ep("10.0.0.2", "b", true, true, false, &[]),
        ];
        let c = categorize(&eps, &sp(true, false, 0), "a", None);
        assert!(c.cluster.is_empty());
        assert_eq!(c.local.len(), 1);
        assert_eq!(c.all_reachable.len(), 1);
        let c = categorize(&eps, &sp(false, true, 30000), "b", None);
        assert_eq!(c.cluster.len(), 2);
        assert_eq!(c.local.len(), 1);
        assert_eq!(c.all_reachable.len(), 2);
        let c = categorize(&eps, &sp(true, false, 0), "c", None);
        assert!(c.local.is_empty());
        assert!(c.has_any);
    }
}
