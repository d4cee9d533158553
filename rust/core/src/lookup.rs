//! Route lookup: where a flow to a Service goes, with the iptables mode's semantics
//! (the same decisions as `iptables.rs`, read as a decision tree instead of rules),
//! and per-service-port backend selection for `pick`.
//!
//! Hairpin masquerading (an endpoint reaching itself through its Service) depends on
//! the endpoint chosen, so `Route::masquerade` covers everything else and callers
//! check `endpoint ip == source ip` after a pick (`masquerade_for` in Python).

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use serde_json::Value;

use crate::categorize::{categorize, Categorized, TopologyMode};
use crate::error::{Error, Result};
use crate::model::{Model, Protocol, ServicePort, ServicePortName};
use crate::net::{Cidr, Family};
use crate::selection::{algorithm_for, AlgorithmKind, Selector, SelectorConfig};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A pod on this node (its source IP decides, as the local-traffic detector does).
    Pod,
    /// The node itself (`--src-type LOCAL`).
    Node,
    /// Arriving from outside the node.
    External,
}

impl Origin {
    pub fn parse(s: &str) -> Result<Origin> {
        match s {
            "pod" => Ok(Origin::Pod),
            "node" => Ok(Origin::Node),
            "external" => Ok(Origin::External),
            _ => Err(Error::config(
                "origin",
                format!("{s:?} is not one of \"pod\", \"node\", \"external\""),
            )),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Forward,
    Reject,
    Drop,
    NotHandled,
}

impl Verdict {
    pub fn name(&self) -> &'static str {
        match self {
            Verdict::Forward => "forward",
            Verdict::Reject => "reject",
            Verdict::Drop => "drop",
            Verdict::NotHandled => "not-handled",
        }
    }
}

/// Which endpoint set a forwarded flow uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EndpointSet {
    Cluster,
    Local,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub verdict: Verdict,
    pub endpoints: Vec<String>,
    pub masquerade: bool,
    pub reason: String,
    /// The service port that matched ("ns/name:port"), if any.
    pub service: Option<String>,
    set: Option<(ServicePortName, Family, EndpointSet)>,
}

impl Route {
    fn new(verdict: Verdict, reason: String) -> Route {
        Route {
            verdict,
            endpoints: Vec::new(),
            masquerade: false,
            reason,
            service: None,
            set: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    pub protocol: Protocol,
    pub dst: IpAddr,
    pub dst_port: u16,
    pub src: IpAddr,
    pub origin: Origin,
}

impl Flow {
    /// Parse a flow from its text parts ("tcp"/"TCP", IPs as text).
    pub fn parse(
        protocol: &str,
        dst: &str,
        dst_port: i64,
        src: &str,
        origin: &str,
    ) -> Result<Flow> {
        let protocol = Protocol::parse(&protocol.to_ascii_uppercase()).ok_or_else(|| {
            Error::config(
                "protocol",
                format!("{protocol:?} is not one of TCP, UDP, SCTP"),
            )
        })?;
        let ip = |field: &str, s: &str| {
            s.parse::<IpAddr>()
                .map_err(|_| Error::config(field, format!("{s:?} is not an IP address")))
        };
        let dst = ip("dst_ip", dst)?;
        let src = ip("src_ip", src)?;
        if Family::of(&dst) != Family::of(&src) {
            return Err(Error::config(
                "src_ip",
                format!("{src} and {dst} are of different IP families"),
            ));
        }
        if !(1..=65535).contains(&dst_port) {
            return Err(Error::config(
                "dst_port",
                format!("{dst_port} is not within [1, 65535]"),
            ));
        }
        Ok(Flow {
            protocol,
            dst,
            dst_port: dst_port as u16,
            src,
            origin: Origin::parse(origin)?,
        })
    }
}

/// The node and cluster facts a lookup needs (what the daemon's config gives the
/// iptables renderer).
#[derive(Debug, Clone)]
pub struct TableConfig {
    pub node_name: String,
    pub zone: Option<String>,
    /// Cluster CIDRs: the local-traffic detector (pod traffic = source inside one).
    pub cluster_cidrs: Vec<Cidr>,
    /// Node IPs: NodePorts are reachable on these.
    pub node_ips: Vec<IpAddr>,
    pub masquerade_all: bool,
    /// NodePorts on 127.0.0.1 from the node itself (IPv4 only).
    pub localhost_nodeports: bool,
    pub default_algorithm: AlgorithmKind,
}

impl TableConfig {
    pub fn new(node_name: &str) -> Self {
        TableConfig {
            node_name: node_name.to_string(),
            zone: None,
            cluster_cidrs: Vec::new(),
            node_ips: Vec::new(),
            masquerade_all: false,
            localhost_nodeports: true,
            default_algorithm: AlgorithmKind::Random,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    ClusterIp,
    ExternalIp,
    LoadBalancerIp,
    NodePort,
}

impl Access {
    fn words(&self) -> &'static str {
        match self {
            Access::ClusterIp => "cluster IP",
            Access::ExternalIp => "external IP",
            Access::LoadBalancerIp => "load balancer IP",
            Access::NodePort => "NodePort",
        }
    }
}

type PortRef = (String, usize);

#[derive(Default)]
struct Index {
    vips: HashMap<(IpAddr, u16, Protocol), (PortRef, Access)>,
    service_ips: HashSet<IpAddr>,
    nodeports: HashMap<(Family, u16, Protocol), PortRef>,
}

/// Services and endpoints of a cluster as seen from one node, answering lookups.
pub struct Table {
    model: Model,
    cfg: TableConfig,
    index: Option<Index>,
    selectors: HashMap<(ServicePortName, Family, EndpointSet), Selector>,
    algorithm_warnings: HashMap<String, String>,
}

impl Table {
    pub fn new(cfg: TableConfig) -> Table {
        Table {
            model: Model::new(),
            cfg,
            index: None,
            selectors: HashMap::new(),
            algorithm_warnings: HashMap::new(),
        }
    }

    pub fn config(&self) -> &TableConfig {
        &self.cfg
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Set or delete a Service; returns warnings (including an unknown
    /// `kproxy.io/lb-algorithm`, for which the default is used).
    pub fn set_service(&mut self, key: &str, obj: Option<&Value>) -> Result<Vec<String>> {
        let mut warnings: Vec<String> = self
            .model
            .set_service(key, obj)?
            .into_iter()
            .map(|w| w.to_string())
            .collect();
        self.index = None;
        self.algorithm_warnings.remove(key);
        if let Some(svc) = self.model.service(key) {
            if let Some(p) = svc.ports.first() {
                let (_, w) = algorithm_for(p.lb_algorithm.as_deref(), self.cfg.default_algorithm);
                if let Some(w) = w {
                    let w = format!("Service {key}: {w}");
                    warnings.push(w.clone());
                    self.algorithm_warnings.insert(key.to_string(), w);
                }
            }
        }
        Ok(warnings)
    }

    pub fn set_endpoint_slice(&mut self, key: &str, obj: Option<&Value>) -> Result<Vec<String>> {
        Ok(self
            .model
            .set_endpoint_slice(key, obj)?
            .into_iter()
            .map(|w| w.to_string())
            .collect())
    }

    /// Build the lookup index (lazily, after changes).
    pub fn prepare(&mut self) {
        if self.index.is_some() {
            return;
        }
        let mut ix = Index::default();
        for svc in self.model.services() {
            for (i, sp) in svc.ports.iter().enumerate() {
                let r = (svc.key.clone(), i);
                let proto = sp.name.protocol;
                for ip in &sp.cluster_ips {
                    ix.service_ips.insert(*ip);
                    ix.vips
                        .entry((*ip, sp.port, proto))
                        .or_insert((r.clone(), Access::ClusterIp));
                }
                for ip in &sp.external_ips {
                    if sp.cluster_ip(Family::of(ip)).is_none() {
                        continue;
                    }
                    ix.service_ips.insert(*ip);
                    ix.vips
                        .entry((*ip, sp.port, proto))
                        .or_insert((r.clone(), Access::ExternalIp));
                }
                for ip in &sp.load_balancer_ips {
                    if sp.cluster_ip(Family::of(ip)).is_none() {
                        continue;
                    }
                    ix.service_ips.insert(*ip);
                    ix.vips
                        .entry((*ip, sp.port, proto))
                        .or_insert((r.clone(), Access::LoadBalancerIp));
                }
                if sp.node_port != 0 {
                    for ip in &sp.cluster_ips {
                        ix.nodeports
                            .entry((Family::of(ip), sp.node_port, proto))
                            .or_insert(r.clone());
                    }
                }
            }
        }
        self.index = Some(ix);
    }

    fn is_node_address(&self, flow: &Flow) -> bool {
        self.cfg.node_ips.contains(&flow.dst)
            || (flow.dst.is_loopback()
                && flow.origin == Origin::Node
                && Family::of(&flow.dst) == Family::V4
                && self.cfg.localhost_nodeports)
    }

    /// Where a flow goes. Needs `prepare` after changes (lookup_prepared does not).
    pub fn lookup(&mut self, flow: &Flow) -> Route {
        self.prepare();
        self.lookup_prepared(flow)
    }

    /// `lookup` on a prepared table (read-only, so it can run without the GIL).
    pub fn lookup_prepared(&self, flow: &Flow) -> Route {
        let Some(ix) = self.index.as_ref() else {
            return Route::new(Verdict::NotHandled, "the table is not prepared".into());
        };
        let family = Family::of(&flow.dst);
        let dst = crate::net::join_host_port(&flow.dst, flow.dst_port);
        let proto = flow.protocol.upper();
        let found = ix
            .vips
            .get(&(flow.dst, flow.dst_port, flow.protocol))
            .cloned()
            .or_else(|| {
                if self.is_node_address(flow) {
                    ix.nodeports
                        .get(&(family, flow.dst_port, flow.protocol))
                        .map(|r| (r.clone(), Access::NodePort))
                } else {
                    None
                }
            });
        let Some(((key, i), access)) = found else {
            let reason = if ix.service_ips.contains(&flow.dst) {
                format!(
                    "{} is a Service IP but no Service port matches {dst}/{proto}, so kproxy does not handle the flow",
                    flow.dst
                )
            } else {
                format!("no Service has {dst}/{proto}, so kproxy does not handle the flow")
            };
            return Route::new(Verdict::NotHandled, reason);
        };
        let Some(sp) = self.model.service(&key).and_then(|s| s.ports.get(i)) else {
            return Route::new(Verdict::NotHandled, format!("no Service has {dst}/{proto}"));
        };
        let mut route = self.route_service_port(sp, family, access, flow);
        route.service = Some(sp.name.to_string());
        route
    }

    /// Is the source a pod, as the local-traffic detector (first cluster CIDR of the
    /// family) sees it? None when there is no detector.
    fn source_is_pod(&self, flow: &Flow) -> Option<bool> {
        let family = Family::of(&flow.src);
        self.cfg
            .cluster_cidrs
            .iter()
            .find(|c| c.family() == family)
            .map(|c| c.contains(&flow.src))
    }

    fn route_service_port(
        &self,
        sp: &ServicePort,
        family: Family,
        access: Access,
        flow: &Flow,
    ) -> Route {
        let spn = sp.name.to_string();
        let endpoints = self.model.endpoints(&sp.name, family);
        let node = self.cfg.node_name.as_str();
        let cat = categorize(&endpoints, sp, node, self.cfg.zone.as_deref());
        let via = format!("{spn} {}", access.words());
        if !cat.has_any {
            return Route::new(
                Verdict::Reject,
                format!("{via}: the Service has no endpoints, so the connection is rejected"),
            );
        }
        let forward = |set: EndpointSet, masquerade: bool, why: String| -> Route {
            let eps = match set {
                EndpointSet::Cluster => &cat.cluster,
                EndpointSet::Local => &cat.local,
            };
            if eps.is_empty() {
                return Route::new(
                    Verdict::Drop,
                    format!("{via}: {why}, but that endpoint set is empty"),
                );
            }
            let endpoints: Vec<String> = eps.iter().map(|e| e.addr()).collect();
            let mut reason = format!("{via}: {why}");
            reason.push_str(&endpoint_words(&cat, set, endpoints.len(), &self.cfg));
            if let Some(t) = sp.affinity_timeout {
                reason.push_str(&format!(
                    "; ClientIP session affinity keeps a client on one endpoint for {t} s"
                ));
            }
            let mut masquerade = masquerade;
            if eps.iter().all(|e| e.ip == flow.src) {
                masquerade = true;
                reason.push_str(
                    "; hairpin: the only endpoint is the client itself, so it is masqueraded",
                );
            }
            Route {
                verdict: Verdict::Forward,
                endpoints,
                masquerade,
                reason,
                service: None,
                set: Some((sp.name.clone(), family, set)),
            }
        };
        let from_pod = self.source_is_pod(flow);
        if access == Access::ClusterIp {
            let (masq, masq_why) = if self.cfg.masquerade_all {
                (true, "masqueraded (masqueradeAll)")
            } else {
                match from_pod {
                    Some(true) => (false, "not masqueraded (source in the cluster CIDR)"),
                    Some(false) => (true, "masqueraded (source outside the cluster CIDR)"),
                    None => (
                        false,
                        "not masqueraded (no cluster CIDR to tell pods from others)",
                    ),
                }
            };
            if sp.internal_policy_local {
                if cat.local.is_empty() {
                    return Route::new(
                        Verdict::Drop,
                        format!(
                            "{via}: internalTrafficPolicy Local and no endpoint on node {node}, so the packet is dropped"
                        ),
                    );
                }
                return forward(
                    EndpointSet::Local,
                    masq,
                    format!("internalTrafficPolicy Local, {masq_why}"),
                );
            }
            return forward(
                EndpointSet::Cluster,
                masq,
                format!("internalTrafficPolicy Cluster, {masq_why}"),
            );
        }
        // Source ranges guard load balancer IPs (only when the Service has endpoints).
        if access == Access::LoadBalancerIp {
            let ranges: Vec<&Cidr> = sp
                .load_balancer_source_ranges
                .iter()
                .filter(|c| c.family() == family)
                .collect();
            if !ranges.is_empty() {
                let node_ip = self.cfg.node_ips.iter().find(|ip| Family::of(ip) == family);
                let allowed = ranges.iter().any(|c| c.contains(&flow.src))
                    || (node_ip.is_some_and(|n| ranges.iter().any(|c| c.contains(n)))
                        && sp.load_balancer_ips.contains(&flow.src));
                if !allowed {
                    let list: Vec<String> = ranges.iter().map(|c| c.to_string()).collect();
                    return Route::new(
                        Verdict::Drop,
                        format!(
                            "{via}: source {} is not in loadBalancerSourceRanges [{}], so the packet is dropped",
                            flow.src,
                            list.join(", ")
                        ),
                    );
                }
            }
        }
        if !sp.external_policy_local {
            return forward(
                EndpointSet::Cluster,
                true,
                "externalTrafficPolicy Cluster, masqueraded (external destinations are always masqueraded)".into(),
            );
        }
        if from_pod == Some(true) {
            return forward(
                EndpointSet::Cluster,
                false,
                "externalTrafficPolicy Local, but pod traffic to an external destination is short-circuited to all cluster endpoints, not masqueraded".into(),
            );
        }
        if flow.origin == Origin::Node {
            return forward(
                EndpointSet::Cluster,
                true,
                "externalTrafficPolicy Local, but node traffic to an external destination is short-circuited to all cluster endpoints and masqueraded".into(),
            );
        }
        if cat.local.is_empty() {
            return Route::new(
                Verdict::Drop,
                format!(
                    "{via}: externalTrafficPolicy Local and no endpoint on node {node}, so the packet is dropped"
                ),
            );
        }
        forward(
            EndpointSet::Local,
            false,
            "externalTrafficPolicy Local, not masqueraded (the client IP is preserved)".into(),
        )
    }

    /// The Service's algorithm (annotation or default).
    pub fn algorithm(&self, sp: &ServicePort) -> AlgorithmKind {
        algorithm_for(sp.lb_algorithm.as_deref(), self.cfg.default_algorithm).0
    }

    /// Look up a flow and, when it is forwarded, choose one endpoint with the Service's
    /// algorithm and affinity (state kept per service port, family and endpoint set).
    pub fn pick(&mut self, flow: &Flow, now: f64) -> (Route, Option<String>) {
        let route = self.lookup(flow);
        let Some((spn, family, set)) = route.set.clone() else {
            return (route, None);
        };
        let Some(sp) = self
            .model
            .service(&spn.service_key())
            .and_then(|s| s.ports.iter().find(|p| p.name == spn))
        else {
            return (route, None);
        };
        let mut cfg = SelectorConfig::new(self.algorithm(sp));
        cfg.affinity_timeout = sp.affinity_timeout.map(|t| t as f64);
        let key = (spn, family, set);
        let stale = self.selectors.get(&key).is_some_and(|s| {
            s.kind() != cfg.kind || s.config().affinity_timeout != cfg.affinity_timeout
        });
        if stale {
            self.selectors.remove(&key);
        }
        let sel = match self.selectors.entry(key) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => match Selector::new(cfg) {
                Ok(s) => v.insert(s),
                Err(_) => return (route, None),
            },
        };
        if sel.set_endpoints(&route.endpoints, None).is_err() {
            return (route, None);
        }
        let chosen = sel.pick_name(&flow.src, now).map(|s| s.to_string());
        (route, chosen)
    }

    pub fn algorithm_warnings(&self) -> Vec<String> {
        let mut v: Vec<String> = self.algorithm_warnings.values().cloned().collect();
        v.sort();
        v
    }
}

fn endpoint_words(cat: &Categorized, set: EndpointSet, n: usize, cfg: &TableConfig) -> String {
    let plural = if n == 1 { "endpoint" } else { "endpoints" };
    match set {
        EndpointSet::Local => {
            if cat.local_terminating_fallback {
                format!(
                    "; no ready endpoint on node {}, so it falls back to {n} serving terminating local {plural}",
                    cfg.node_name
                )
            } else {
                format!("; {n} ready local {plural} on node {}", cfg.node_name)
            }
        }
        EndpointSet::Cluster => {
            if cat.cluster_terminating_fallback {
                format!("; no ready endpoint, so it falls back to {n} serving terminating {plural}")
            } else {
                match cat.topology {
                    TopologyMode::Zone => format!(
                        "; topology hints for zone {} leave {n} {plural}",
                        cfg.zone.as_deref().unwrap_or("?")
                    ),
                    TopologyMode::Node => format!(
                        "; topology hints for node {} leave {n} {plural}",
                        cfg.node_name
                    ),
                    TopologyMode::None => format!("; {n} ready {plural} in the cluster"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn table() -> Table {
        let mut cfg = TableConfig::new("node1");
        cfg.cluster_cidrs = vec![Cidr::parse("10.244.0.0/16").unwrap()];
        cfg.node_ips = vec!["172.18.0.2".parse().unwrap()];
        let mut t = Table::new(cfg);
        t.set_service(
            "demo/web",
            Some(&json!({"metadata": {"name": "web", "namespace": "demo",
                "annotations": {"kproxy.io/lb-algorithm": "round-robin"}},
                "spec": {"type": "NodePort", "clusterIP": "10.96.0.10",
                "ports": [{"name": "http", "port": 80, "nodePort": 30080}]}})),
        )
        .unwrap();
        t.set_endpoint_slice(
            "demo/web-1",
            Some(&json!({"metadata": {"name": "web-1", "namespace": "demo",
                "labels": {"kubernetes.io/service-name": "web"}},
                "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
                "endpoints": [{"addresses": ["10.244.0.11"], "nodeName": "node1"},
                              {"addresses": ["10.244.1.12"], "nodeName": "node2"}]})),
        )
        .unwrap();
        t
    }

    fn flow(dst: &str, port: i64, src: &str, origin: &str) -> Flow {
        Flow::parse("tcp", dst, port, src, origin).unwrap()
    }

    #[test]
    fn cluster_ip_from_pod_and_node() {
        let mut t = table();
        let r = t.lookup(&flow("10.96.0.10", 80, "10.244.0.5", "pod"));
        assert_eq!(r.verdict, Verdict::Forward);
        assert_eq!(r.endpoints, vec!["10.244.0.11:8080", "10.244.1.12:8080"]);
        assert!(!r.masquerade);
        let r = t.lookup(&flow("10.96.0.10", 80, "172.18.0.2", "node"));
        assert!(r.masquerade);
        let r = t.lookup(&flow("10.96.0.10", 81, "10.244.0.5", "pod"));
        assert_eq!(r.verdict, Verdict::NotHandled);
    }

    #[test]
    fn nodeport_and_pick_round_robin() {
        let mut t = table();
        let f = flow("172.18.0.2", 30080, "1.2.3.4", "external");
        let (r, a) = t.pick(&f, 0.0);
        assert!(r.masquerade);
        let (_, b) = t.pick(&f, 0.0);
        assert_eq!(a.unwrap(), "10.244.0.11:8080");
        assert_eq!(b.unwrap(), "10.244.1.12:8080");
        let r = t.lookup(&flow("172.18.0.3", 30080, "1.2.3.4", "external"));
        assert_eq!(r.verdict, Verdict::NotHandled);
    }

    #[test]
    fn bad_flows_are_errors() {
        assert!(Flow::parse("icmp", "10.0.0.1", 80, "10.0.0.2", "pod").is_err());
        assert!(Flow::parse("tcp", "10.0.0.1", 80, "::1", "pod").is_err());
        assert!(Flow::parse("tcp", "10.0.0.1", 0, "10.0.0.2", "pod").is_err());
        assert!(Flow::parse("tcp", "10.0.0.1", 80, "10.0.0.2", "space").is_err());
    }
}
