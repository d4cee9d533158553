//! What the forwarder serves: one [`PortSpec`] per service port and IP family, derived
//! from the model with upstream's endpoint categorisation (pure, no I/O), and the live
//! [`PortState`] each spec is applied to (endpoint selection and counters).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::categorize::categorize;
use crate::model::{Endpoint, Model, Protocol, ServicePortName};
use crate::net::{Cidr, Family};
use crate::selection::{algorithm_for, AlgorithmKind, Selector, SelectorConfig};

use super::stats::PortStats;

/// Node facts the forwarder needs (the Python side fills it from NodeInfo and flags).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct TableConfig {
    pub node_name: String,
    #[serde(default)]
    pub node_zone: Option<String>,
    /// Pod CIDRs: sources inside count as in-cluster traffic (the local-traffic
    /// detector), as do the node's own addresses.
    #[serde(default)]
    pub cluster_cidrs: Vec<String>,
    #[serde(default)]
    pub node_ips: Vec<IpAddr>,
    #[serde(default = "default_families")]
    pub families: Vec<Family>,
}

fn default_families() -> Vec<Family> {
    vec![Family::V4]
}

/// One service port in one family, as the forwarder and the capture rules need it.
#[derive(Debug, Clone, PartialEq)]
pub struct PortSpec {
    pub name: ServicePortName,
    pub family: Family,
    pub port: u16,
    pub node_port: u16,
    pub cluster_ip: IpAddr,
    /// externalIPs and load-balancer IPs of this family.
    pub external_ips: Vec<IpAddr>,
    pub load_balancer_ips: Vec<IpAddr>,
    pub load_balancer_source_ranges: Vec<Cidr>,
    pub cluster: Vec<SocketAddr>,
    pub local: Vec<SocketAddr>,
    /// Any endpoint reachable from this node: none means REJECT everywhere.
    pub has_endpoints: bool,
    pub internal_local: bool,
    pub external_local: bool,
    pub algorithm: AlgorithmKind,
    pub affinity_timeout: Option<u32>,
    pub health_check_node_port: u16,
}

impl PortSpec {
    pub fn key(&self) -> (ServicePortName, Family) {
        (self.name.clone(), self.family)
    }

    /// Endpoints for traffic to the ClusterIP (internalTrafficPolicy).
    pub fn internal(&self) -> &[SocketAddr] {
        if self.internal_local {
            &self.local
        } else {
            &self.cluster
        }
    }

    pub fn is_external(&self) -> bool {
        self.node_port != 0 || !self.external_ips.is_empty() || !self.load_balancer_ips.is_empty()
    }
}

fn addrs(eps: &[Endpoint]) -> Vec<SocketAddr> {
    eps.iter().map(|e| SocketAddr::new(e.ip, e.port)).collect()
}

/// Every service port in every configured family; SCTP is not forwarded (documented).
pub fn build_specs(model: &Model, cfg: &TableConfig) -> (Vec<PortSpec>, Vec<String>) {
    let mut out = Vec::new();
    let mut warnings = Vec::new();
    for svc in model.services() {
        for sp in &svc.ports {
            if sp.name.protocol == Protocol::Sctp {
                continue;
            }
            for &family in &cfg.families {
                let Some(cluster_ip) = sp.cluster_ip(family) else {
                    continue;
                };
                let eps = model.endpoints(&sp.name, family);
                let cat = categorize(&eps, sp, &cfg.node_name, cfg.node_zone.as_deref());
                let (algorithm, warning) =
                    algorithm_for(sp.lb_algorithm.as_deref(), AlgorithmKind::RoundRobin);
                if let Some(w) = warning {
                    warnings.push(format!("{}: {w}", sp.name));
                }
                let of_family = |v: &[IpAddr]| {
                    v.iter()
                        .copied()
                        .filter(|ip| Family::of(ip) == family)
                        .collect::<Vec<_>>()
                };
                out.push(PortSpec {
                    name: sp.name.clone(),
                    family,
                    port: sp.port,
                    node_port: sp.node_port,
                    cluster_ip,
                    external_ips: of_family(&sp.external_ips),
                    load_balancer_ips: of_family(&sp.load_balancer_ips),
                    load_balancer_source_ranges: sp
                        .load_balancer_source_ranges
                        .iter()
                        .copied()
                        .filter(|c| c.family() == family)
                        .collect(),
                    cluster: addrs(&cat.cluster),
                    local: addrs(&cat.local),
                    has_endpoints: !cat.all_reachable.is_empty(),
                    internal_local: sp.internal_policy_local,
                    external_local: sp.external_policy_local,
                    algorithm,
                    affinity_timeout: sp.affinity_timeout,
                    health_check_node_port: sp.health_check_node_port,
                });
            }
        }
    }
    (out, warnings)
}

/// One endpoint set (cluster or local) with its selector.
pub struct EndpointSet {
    selector: Selector,
    addrs: HashMap<String, SocketAddr>,
    /// (algorithm, affinity timeout) the selector was built for.
    shape: (AlgorithmKind, Option<u32>),
}

fn new_selector(kind: AlgorithmKind, affinity: Option<u32>) -> Selector {
    let mut cfg = SelectorConfig::new(kind);
    cfg.affinity_timeout = affinity.map(f64::from);
    // Valid by construction: a default table size and a timeout in [1, 86400].
    Selector::new(cfg).unwrap_or_else(|_| {
        Selector::new(SelectorConfig::new(AlgorithmKind::RoundRobin)).expect("round robin")
    })
}

impl EndpointSet {
    fn new(kind: AlgorithmKind, affinity: Option<u32>) -> EndpointSet {
        EndpointSet {
            selector: new_selector(kind, affinity),
            addrs: HashMap::new(),
            shape: (kind, affinity),
        }
    }

    /// Replace the endpoints; the selector keeps its state when nothing changed.
    fn set(&mut self, eps: &[SocketAddr], kind: AlgorithmKind, affinity: Option<u32>) -> bool {
        if self.shape != (kind, affinity) {
            self.selector = new_selector(kind, affinity);
            self.shape = (kind, affinity);
        }
        let names: Vec<String> = eps.iter().map(|a| a.to_string()).collect();
        self.addrs = names.iter().cloned().zip(eps.iter().copied()).collect();
        // Endpoints of one family and distinct by construction (the model merges them).
        self.selector.set_endpoints(&names, None).unwrap_or(false)
    }

    pub fn is_empty(&self) -> bool {
        self.selector.backends().is_empty()
    }

    pub fn contains(&self, a: &SocketAddr) -> bool {
        self.addrs.values().any(|x| x == a)
    }

    /// One endpoint for a new flow from `src`, avoiding `tried` (endpoints that already
    /// failed for this flow): when the algorithm repeats one, the first untried endpoint
    /// in order is taken instead.
    pub fn pick(&mut self, src: &IpAddr, now: f64, tried: &[SocketAddr]) -> Option<SocketAddr> {
        let name = self.selector.pick_name(src, now)?.to_string();
        let a = *self.addrs.get(&name)?;
        if !tried.contains(&a) {
            return Some(a);
        }
        self.selector.release(&name);
        let other = self
            .selector
            .backends()
            .iter()
            .filter_map(|b| self.addrs.get(&b.name).copied())
            .find(|x| !tried.contains(x))?;
        Some(other)
    }

    pub fn release(&mut self, a: &SocketAddr) {
        self.selector.release(&a.to_string());
    }
}

/// The live state of one service port in one family. It outlives table updates (an
/// update changes its endpoint sets in place), so counters, round-robin position and
/// affinity survive a sync, and open connections keep their endpoint.
pub struct PortState {
    pub name: ServicePortName,
    pub family: Family,
    pub cluster: Mutex<EndpointSet>,
    pub local: Mutex<EndpointSet>,
    internal_local: AtomicBool,
    external_local: AtomicBool,
    /// Bumped on every endpoint change (UDP sessions re-check their endpoint then).
    pub generation: AtomicU64,
    pub stats: PortStats,
}

/// Which endpoint set a flow uses: None means drop it (ETP Local, external client,
/// no local endpoint), as the kernel modes do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetChoice {
    Cluster,
    Local,
}

impl PortState {
    pub fn new(spec: &PortSpec) -> PortState {
        let st = PortState {
            name: spec.name.clone(),
            family: spec.family,
            cluster: Mutex::new(EndpointSet::new(spec.algorithm, spec.affinity_timeout)),
            local: Mutex::new(EndpointSet::new(spec.algorithm, spec.affinity_timeout)),
            internal_local: AtomicBool::new(false),
            external_local: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            stats: PortStats::default(),
        };
        st.apply(spec);
        st
    }

    /// Apply a new spec. Each set's lock is held only for the update itself.
    pub fn apply(&self, spec: &PortSpec) {
        let mut changed =
            lock(&self.cluster).set(&spec.cluster, spec.algorithm, spec.affinity_timeout);
        changed |= lock(&self.local).set(&spec.local, spec.algorithm, spec.affinity_timeout);
        self.internal_local.store(spec.internal_local, Relaxed);
        self.external_local.store(spec.external_local, Relaxed);
        if changed {
            self.generation.fetch_add(1, Relaxed);
        }
    }

    /// The set for a flow reaching the Service through `external` access (NodePort,
    /// externalIP, LB IP) or its ClusterIP, from an in-cluster source or not.
    pub fn choose(&self, external: bool, internal_src: bool) -> SetChoice {
        if external {
            // ETP Local applies to off-cluster clients; pods and the node short-circuit
            // to the cluster endpoints, as upstream does.
            if self.external_local.load(Relaxed) && !internal_src {
                SetChoice::Local
            } else {
                SetChoice::Cluster
            }
        } else if self.internal_local.load(Relaxed) {
            SetChoice::Local
        } else {
            SetChoice::Cluster
        }
    }

    pub fn set(&self, c: SetChoice) -> &Mutex<EndpointSet> {
        match c {
            SetChoice::Cluster => &self.cluster,
            SetChoice::Local => &self.local,
        }
    }
}

pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A route: the service port and whether the address is an external one.
#[derive(Clone)]
pub struct Route {
    pub port: std::sync::Arc<PortState>,
    pub external: bool,
}

/// The lookup table of one sync: original destination -> service port. Replaced
/// whole on each sync (readers clone an Arc, so updates never block forwarding).
#[derive(Default)]
pub struct Table {
    pub vips: HashMap<(Protocol, SocketAddr), Route>,
    pub node_ports: HashMap<(Protocol, Family, u16), Route>,
    pub internal_cidrs: Vec<Cidr>,
    pub node_ips: Vec<IpAddr>,
}

impl Table {
    pub fn route(&self, proto: Protocol, dst: SocketAddr) -> Option<&Route> {
        self.vips.get(&(proto, dst)).or_else(|| {
            self.node_ports
                .get(&(proto, Family::of(&dst.ip()), dst.port()))
        })
    }

    /// In-cluster source: a pod (cluster CIDR) or the node itself.
    pub fn is_internal(&self, src: &IpAddr) -> bool {
        src.is_loopback()
            || self.node_ips.contains(src)
            || self.internal_cidrs.iter().any(|c| c.contains(src))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn model() -> Model {
        let mut m = Model::new();
        m.set_service(
            "demo/web",
            Some(&json!({"metadata": {"name": "web", "namespace": "demo"},
                "spec": {"type": "NodePort", "clusterIP": "10.96.0.10", "externalTrafficPolicy": "Local",
                "ports": [{"name": "http", "port": 80, "nodePort": 30080}]}})),
        )
        .unwrap();
        m.set_endpoint_slice(
            "demo/web-a",
            Some(&json!({"metadata": {"name": "web-a", "namespace": "demo",
                "labels": {"kubernetes.io/service-name": "web"}},
                "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
                "endpoints": [{"addresses": ["10.244.0.5"], "nodeName": "node1"},
                              {"addresses": ["10.244.1.5"], "nodeName": "node2"}]})),
        )
        .unwrap();
        m
    }

    fn cfg() -> TableConfig {
        TableConfig {
            node_name: "node1".into(),
            cluster_cidrs: vec!["10.244.0.0/16".into()],
            ..Default::default()
        }
    }

    #[test]
    fn specs_follow_policies() {
        let (specs, w) = build_specs(
            &model(),
            &TableConfig {
                families: vec![Family::V4],
                ..cfg()
            },
        );
        assert!(w.is_empty());
        assert_eq!(specs.len(), 1);
        let s = &specs[0];
        assert_eq!(s.cluster.len(), 2);
        assert_eq!(s.local, vec!["10.244.0.5:8080".parse().unwrap()]);
        assert!(s.has_endpoints && s.external_local && s.is_external());
        let st = PortState::new(s);
        assert_eq!(st.choose(true, false), SetChoice::Local);
        assert_eq!(st.choose(true, true), SetChoice::Cluster);
        assert_eq!(st.choose(false, false), SetChoice::Cluster);
    }

    #[test]
    fn pick_round_robin_and_avoid_tried() {
        let (specs, _) = build_specs(
            &model(),
            &TableConfig {
                families: vec![Family::V4],
                ..cfg()
            },
        );
        let st = PortState::new(&specs[0]);
        let src: IpAddr = "10.244.0.9".parse().unwrap();
        let mut set = lock(&st.cluster);
        let a = set.pick(&src, 0.0, &[]).unwrap();
        let b = set.pick(&src, 0.0, &[]).unwrap();
        assert_ne!(a, b);
        let c = set.pick(&src, 0.0, &[a]).unwrap();
        assert_ne!(c, a);
        assert_eq!(set.pick(&src, 0.0, &[a, b]), None);
    }

    #[test]
    fn internal_sources() {
        let t = Table {
            internal_cidrs: vec![Cidr::parse("10.244.0.0/16").unwrap()],
            node_ips: vec!["172.18.0.2".parse().unwrap()],
            ..Default::default()
        };
        assert!(t.is_internal(&"10.244.3.4".parse().unwrap()));
        assert!(t.is_internal(&"172.18.0.2".parse().unwrap()));
        assert!(t.is_internal(&"127.0.0.1".parse().unwrap()));
        assert!(!t.is_internal(&"172.18.0.3".parse().unwrap()));
    }
}
