//! iptables rule rendering with upstream kube-proxy's chain layout and hashed names
//! (pkg/proxy/iptables/proxier.go), so a node moving from kube-proxy is taken over in
//! place by one `iptables-restore --noflush`.
//!
//! Full desired state in, minimal change out: every sync renders the desired rules of
//! the Services whose generation changed, and emits only the chains whose content
//! differs from what was last applied. A one-endpoint change therefore writes the
//! Service's own KUBE-SVC/KUBE-SEP chains and not the 30k-rule KUBE-SERVICES chain,
//! which upstream's partial sync rewrites every time.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::categorize::categorize;
use crate::conntrack;
use crate::error::{Error, Result};
use crate::hash::{chain_hash, hash_lines};
use crate::model::{Model, ServicePort, ServicePortName};
use crate::net::{ips_of_family, Cidr, Family};

pub const KUBE_SERVICES: &str = "KUBE-SERVICES";
pub const KUBE_EXTERNAL_SERVICES: &str = "KUBE-EXTERNAL-SERVICES";
pub const KUBE_NODEPORTS: &str = "KUBE-NODEPORTS";
pub const KUBE_POSTROUTING: &str = "KUBE-POSTROUTING";
pub const KUBE_MARK_MASQ: &str = "KUBE-MARK-MASQ";
pub const KUBE_FORWARD: &str = "KUBE-FORWARD";
pub const KUBE_PROXY_FIREWALL: &str = "KUBE-PROXY-FIREWALL";
pub const KUBELET_FIREWALL: &str = "KUBE-FIREWALL";
/// An empty chain written on full syncs; its absence means someone flushed the
/// table, and the next sync must be full (upstream's iptables Monitor).
pub const KUBE_PROXY_CANARY: &str = "KUBE-PROXY-CANARY";

const SERVICE_CHAIN_PREFIXES: [&str; 5] = [
    "KUBE-SVC-",
    "KUBE-SVL-",
    "KUBE-EXT-",
    "KUBE-FW-",
    "KUBE-SEP-",
];
/// Upstream drops per-endpoint comments above this many endpoints ("large cluster mode").
pub const LARGE_CLUSTER_ENDPOINTS: usize = 1000;

pub fn is_service_chain(name: &str) -> bool {
    SERVICE_CHAIN_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// How pod traffic is told from other traffic (--detect-local-mode, resolved).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum LocalDetector {
    #[default]
    None,
    /// ClusterCIDR or NodeCIDR: source address in the CIDR (first one of the family).
    Cidr { cidrs: Vec<String> },
    /// BridgeInterface: arriving on the pod bridge.
    Interface { name: String },
    /// InterfaceNamePrefix: arriving on an interface whose name starts with the prefix.
    Prefix { prefix: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IptablesConfig {
    pub family: Family,
    pub node_name: String,
    #[serde(default)]
    pub node_zone: Option<String>,
    /// The node's IPs (the first of this family is upstream's nodeIP).
    #[serde(default)]
    pub node_ips: Vec<String>,
    #[serde(default = "default_masq_bit")]
    pub masquerade_bit: u32,
    #[serde(default)]
    pub masquerade_all: bool,
    #[serde(default)]
    pub local_detector: LocalDetector,
    /// None: NodePorts on every local address; Some: only on these IPs.
    #[serde(default)]
    pub nodeport_addresses: Option<Vec<String>>,
    #[serde(default = "yes")]
    pub localhost_nodeports: bool,
    #[serde(default)]
    pub conntrack_tcp_liberal: bool,
    #[serde(default = "yes")]
    pub random_fully: bool,
}

fn default_masq_bit() -> u32 {
    14
}
fn yes() -> bool {
    true
}

struct Resolved {
    masq_mark: String,
    if_local: Option<String>,
    if_not_local: Option<String>,
    node_ip: Option<IpAddr>,
    nodeport_ips: Option<Vec<IpAddr>>,
    localhost_nodeports: bool,
}

impl IptablesConfig {
    fn resolve(&self) -> Result<Resolved> {
        if self.masquerade_bit > 31 {
            return Err(Error::config(
                "masquerade_bit",
                format!("{} is not within [0, 31]", self.masquerade_bit),
            ));
        }
        let (if_local, if_not_local) = match &self.local_detector {
            LocalDetector::None => (None, None),
            LocalDetector::Cidr { cidrs } => {
                let mut found = None;
                for c in cidrs {
                    let cidr = Cidr::parse(c).ok_or_else(|| {
                        Error::config("local_detector.cidrs", format!("invalid CIDR {c:?}"))
                    })?;
                    if cidr.family() == self.family {
                        found = Some(cidr);
                        break;
                    }
                }
                match found {
                    Some(c) => (Some(format!("-s {c}")), Some(format!("! -s {c}"))),
                    None => (None, None),
                }
            }
            LocalDetector::Interface { name } => {
                (Some(format!("-i {name}")), Some(format!("! -i {name}")))
            }
            LocalDetector::Prefix { prefix } => (
                Some(format!("-i {prefix}+")),
                Some(format!("! -i {prefix}+")),
            ),
        };
        let node_ip = ips_of_family(&self.node_ips, self.family, "node_ips")?
            .first()
            .copied();
        let nodeport_ips = self
            .nodeport_addresses
            .as_ref()
            .map(|list| ips_of_family(list, self.family, "nodeport_addresses"))
            .transpose()?;
        // Localhost NodePorts exist only for IPv4 and only when loopback is a
        // NodePort address.
        let localhost_nodeports = self.localhost_nodeports
            && self.family == Family::V4
            && nodeport_ips
                .as_ref()
                .is_none_or(|ips| ips.iter().any(|ip| ip.is_loopback()));
        Ok(Resolved {
            masq_mark: format!("{:#08x}", 1u64 << self.masquerade_bit),
            if_local,
            if_not_local,
            node_ip,
            nodeport_ips,
            localhost_nodeports,
        })
    }
}

/// The rules one service port contributes: lines of the shared top-level chains and
/// its own chains.
#[derive(Debug, Clone, Default, PartialEq)]
struct ServiceRules {
    nat_services: Vec<String>,
    nat_nodeports: Vec<String>,
    filter_services: Vec<String>,
    filter_external: Vec<String>,
    filter_nodeports: Vec<String>,
    filter_firewall: Vec<String>,
    /// nat chains owned by this service port, with their rule lines.
    chains: Vec<(String, Vec<String>)>,
    endpoint_count: usize,
    reachable: Vec<String>,
    no_local_internal: bool,
    no_local_external: bool,
}

/// (table, chain, rules) of a shared top-level chain.
type TopChain = (&'static str, &'static str, Vec<String>);

impl ServiceRules {
    /// Whether this service port's share of the top-level chains is unchanged.
    fn same_fragments(&self, other: &ServiceRules) -> bool {
        self.nat_services == other.nat_services
            && self.nat_nodeports == other.nat_nodeports
            && self.filter_services == other.filter_services
            && self.filter_external == other.filter_external
            && self.filter_nodeports == other.filter_nodeports
            && self.filter_firewall == other.filter_firewall
    }
}

struct CacheEntry {
    generation: u64,
    rules: ServiceRules,
    chain_hashes: HashMap<String, u64>,
    spn: ServicePortName,
    port: ServicePort,
}

/// Running totals over the cache, kept as entries change.
#[derive(Default)]
struct Counts {
    filter_fragments: usize,
    nat_fragments: usize,
    nat_own: usize,
    no_local_internal: usize,
    no_local_external: usize,
}

/// Restore input being assembled: chains to (re)write and chains to delete. A chain
/// written twice in one sync keeps its last content, so no chain is declared twice.
#[derive(Default)]
struct Emit {
    order: Vec<String>,
    chunks: HashMap<String, String>,
    deleted: BTreeSet<String>,
    changed_services: BTreeSet<String>,
    touched: HashSet<ServicePortName>,
}

impl Emit {
    fn chain(&mut self, name: &str, rules: &[String]) {
        let mut chunk = String::with_capacity(rules.iter().map(|r| r.len() + 1).sum());
        for r in rules {
            chunk.push_str(r);
            chunk.push('\n');
        }
        if self.chunks.insert(name.to_string(), chunk).is_none() {
            self.order.push(name.to_string());
        }
        self.deleted.remove(name);
    }

    fn delete(&mut self, name: &str) {
        self.chunks.remove(name);
        self.deleted.insert(name.to_string());
    }

    fn is_empty(&self) -> bool {
        self.chunks.is_empty() && self.deleted.is_empty()
    }

    fn written(&self) -> usize {
        self.chunks.len()
    }

    /// (chain declarations, rule and deletion lines).
    fn finish(&self) -> (String, String) {
        let mut decls = String::new();
        let mut text = String::new();
        for name in &self.order {
            if let Some(chunk) = self.chunks.get(name) {
                let _ = writeln!(decls, ":{name} - [0:0]");
                text.push_str(chunk);
            }
        }
        for name in &self.deleted {
            let _ = writeln!(decls, ":{name} - [0:0]");
            let _ = writeln!(text, "-X {name}");
        }
        (decls, text)
    }
}

pub use crate::conntrack::ConntrackCleanup;

#[derive(Debug, Clone, Serialize)]
pub struct HealthCheck {
    pub port: u16,
    pub service: String,
    pub local_endpoints: usize,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct RenderStats {
    pub full: bool,
    pub services: usize,
    pub service_ports: usize,
    pub rendered_service_ports: usize,
    pub endpoints: usize,
    pub filter_rules: usize,
    pub nat_rules: usize,
    pub written_chains: usize,
    pub deleted_chains: usize,
    pub no_local_endpoints_internal: usize,
    pub no_local_endpoints_external: usize,
    pub large_cluster_mode: bool,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct RenderOutput {
    /// Input for `iptables-restore --noflush`; empty when nothing changed. Not in the
    /// JSON: it is handed over as a string of its own.
    #[serde(skip)]
    pub text: String,
    pub stats: RenderStats,
    pub conntrack: Vec<ConntrackCleanup>,
    pub health_checks: Vec<HealthCheck>,
    /// Service keys whose rules were rewritten.
    pub changed_services: Vec<String>,
}

/// Renders and remembers what was applied, per family.
pub struct IptablesRenderer {
    cfg: IptablesConfig,
    res: Resolved,
    cache: BTreeMap<ServicePortName, CacheEntry>,
    by_service: HashMap<String, Vec<ServicePortName>>,
    /// The model generation this renderer has seen.
    seen_generation: u64,
    top_hashes: HashMap<(&'static str, &'static str), u64>,
    /// Some Service's share of the top-level chains changed since they were built.
    top_dirty: bool,
    counts: Counts,
    /// (filter, nat) rules of the top-level chains that belong to no Service.
    static_rules: (usize, usize),
    total_endpoints: usize,
    /// Health check node port and local ready endpoint IPs per service port.
    health: BTreeMap<ServicePortName, (u16, Vec<IpAddr>)>,
    needs_full: bool,
    large_cluster: bool,
}

fn cmt(s: &str) -> String {
    format!("\"{s}\"")
}

fn rule(chain: &str, parts: &[&str]) -> String {
    let mut s = String::with_capacity(128);
    s.push_str("-A ");
    s.push_str(chain);
    for p in parts {
        if p.is_empty() {
            continue;
        }
        s.push(' ');
        s.push_str(p);
    }
    s
}

pub struct ServiceChains {
    pub cluster: String,
    pub local: String,
    pub firewall: String,
    pub external: String,
}

pub fn service_chains(spn: &ServicePortName) -> ServiceChains {
    let h = chain_hash(&format!("{}{}", spn, spn.protocol.lower()));
    ServiceChains {
        cluster: format!("KUBE-SVC-{h}"),
        local: format!("KUBE-SVL-{h}"),
        firewall: format!("KUBE-FW-{h}"),
        external: format!("KUBE-EXT-{h}"),
    }
}

pub fn endpoint_chain(spn: &ServicePortName, endpoint: &str) -> String {
    format!(
        "KUBE-SEP-{}",
        chain_hash(&format!("{}{}{}", spn, spn.protocol.lower(), endpoint))
    )
}

fn probability(n: usize) -> String {
    format!("{:.10}", 1.0 / n as f64)
}

impl IptablesRenderer {
    pub fn new(cfg: IptablesConfig) -> Result<Self> {
        let res = cfg.resolve()?;
        Ok(IptablesRenderer {
            cfg,
            res,
            cache: BTreeMap::new(),
            by_service: HashMap::new(),
            seen_generation: 0,
            top_hashes: HashMap::new(),
            top_dirty: true,
            counts: Counts::default(),
            static_rules: (0, 0),
            total_endpoints: 0,
            health: BTreeMap::new(),
            needs_full: true,
            large_cluster: false,
        })
    }

    pub fn config(&self) -> &IptablesConfig {
        &self.cfg
    }

    /// Change the node-level config (e.g. node labels changed): forces a full sync.
    pub fn set_config(&mut self, cfg: IptablesConfig) -> Result<()> {
        let fresh = IptablesRenderer::new(cfg)?;
        *self = fresh;
        Ok(())
    }

    /// The last restore failed or the kernel state is unknown: next render is full.
    pub fn abort(&mut self) {
        self.needs_full = true;
    }

    pub fn needs_full(&self) -> bool {
        self.needs_full
    }

    /// Mark the last rendered state as applied.
    pub fn commit(&mut self) {
        self.needs_full = false;
    }

    fn render_service(&self, svc: &ServicePort, model: &Model) -> (ServiceRules, Vec<IpAddr>) {
        let family = self.cfg.family;
        let mut r = ServiceRules::default();
        let Some(cluster_ip) = svc.cluster_ip(family) else {
            return (r, Vec::new());
        };
        let node = self.cfg.node_name.as_str();
        let endpoints = model.endpoints(&svc.name, family);
        r.endpoint_count = endpoints.len();
        let local_ready_ips: Vec<IpAddr> = endpoints
            .iter()
            .filter(|e| e.ready && e.is_local(node))
            .map(|e| e.ip)
            .collect();
        let cat = categorize(&endpoints, svc, node, self.cfg.node_zone.as_deref());
        let spn = svc.name.to_string();
        let proto = svc.name.protocol.lower();
        let chains = service_chains(&svc.name);
        let fam_ips = |v: &Vec<IpAddr>| {
            v.iter()
                .copied()
                .filter(|ip| Family::of(ip) == family)
                .collect::<Vec<_>>()
        };
        let external_ips = fam_ips(&svc.external_ips);
        let lb_ips = fam_ips(&svc.load_balancer_ips);
        let source_ranges: Vec<Cidr> = svc
            .load_balancer_source_ranges
            .iter()
            .copied()
            .filter(|c| c.family() == family)
            .collect();
        let externally_accessible =
            svc.node_port != 0 || !external_ips.is_empty() || !lb_ips.is_empty();

        let uses_cluster_chain = !cat.cluster.is_empty() && svc.uses_cluster_endpoints();
        let uses_local_chain = !cat.local.is_empty() && svc.uses_local_endpoints();
        let has_endpoints = cat.has_any;
        let mut internal_chain = chains.cluster.as_str();
        let mut has_internal = has_endpoints;
        if svc.internal_policy_local {
            internal_chain = chains.local.as_str();
            if cat.local.is_empty() {
                has_internal = false;
            }
        }
        let mut external_policy_chain = chains.cluster.as_str();
        let mut has_external = has_endpoints;
        if svc.external_policy_local {
            external_policy_chain = chains.local.as_str();
            if cat.local.is_empty() {
                has_external = false;
            }
        }
        let ext_chain = chains.external.as_str();
        let uses_ext_chain = has_endpoints && externally_accessible;
        let uses_fw_chain = has_endpoints && !lb_ips.is_empty() && !source_ranges.is_empty();
        let lb_chain = if uses_fw_chain {
            chains.firewall.as_str()
        } else {
            ext_chain
        };

        let (internal_target, internal_comment, external_target, external_comment);
        if !has_endpoints {
            internal_target = "REJECT";
            internal_comment = cmt(&format!("{spn} has no endpoints"));
            external_target = "REJECT";
            external_comment = internal_comment.clone();
        } else {
            internal_target = "DROP";
            internal_comment = cmt(&format!("{spn} has no local endpoints"));
            external_target = "DROP";
            external_comment = internal_comment.clone();
            r.no_local_internal = !has_internal;
            r.no_local_external = !has_external;
        }
        let port = svc.port.to_string();
        let cip = cluster_ip.to_string();
        let mproto = format!("-m {proto} -p {proto}");

        // Most rules below match "this Service's address and port": one shape.
        let dst_rule = |chain: &str, comment: &str, ip: &str, target: &str| {
            rule(
                chain,
                &[
                    "-m comment --comment",
                    comment,
                    &mproto,
                    "-d",
                    ip,
                    "--dport",
                    &port,
                    "-j",
                    target,
                ],
            )
        };
        // ClusterIP.
        if has_internal {
            r.nat_services.push(dst_rule(
                KUBE_SERVICES,
                &cmt(&format!("{spn} cluster IP")),
                &cip,
                internal_chain,
            ));
        } else {
            r.filter_services.push(dst_rule(
                KUBE_SERVICES,
                &internal_comment,
                &cip,
                internal_target,
            ));
        }
        // externalIPs.
        for ip in &external_ips {
            let ip = ip.to_string();
            if has_endpoints {
                r.nat_services.push(dst_rule(
                    KUBE_SERVICES,
                    &cmt(&format!("{spn} external IP")),
                    &ip,
                    ext_chain,
                ));
            }
            if !has_external {
                r.filter_external.push(dst_rule(
                    KUBE_EXTERNAL_SERVICES,
                    &external_comment,
                    &ip,
                    external_target,
                ));
            }
        }
        // LoadBalancer ingress IPs.
        for ip in &lb_ips {
            let ip = ip.to_string();
            if has_endpoints {
                r.nat_services.push(dst_rule(
                    KUBE_SERVICES,
                    &cmt(&format!("{spn} loadbalancer IP")),
                    &ip,
                    lb_chain,
                ));
            }
            if uses_fw_chain {
                r.filter_firewall.push(rule(
                    KUBE_PROXY_FIREWALL,
                    &[
                        "-m comment --comment",
                        &cmt(&format!(
                            "{spn} traffic not accepted by {}",
                            chains.firewall
                        )),
                        &mproto,
                        "-d",
                        &ip,
                        "--dport",
                        &port,
                        "-j DROP",
                    ],
                ));
            }
        }
        if !has_external {
            for ip in &lb_ips {
                r.filter_external.push(dst_rule(
                    KUBE_EXTERNAL_SERVICES,
                    &external_comment,
                    &ip.to_string(),
                    external_target,
                ));
            }
        }
        // NodePorts.
        if svc.node_port != 0 {
            let np = svc.node_port.to_string();
            if has_endpoints {
                r.nat_nodeports.push(rule(
                    KUBE_NODEPORTS,
                    &[
                        "-m comment --comment",
                        &spn,
                        &mproto,
                        "--dport",
                        &np,
                        "-j",
                        ext_chain,
                    ],
                ));
            }
            if !has_external {
                r.filter_external.push(rule(
                    KUBE_EXTERNAL_SERVICES,
                    &[
                        "-m comment --comment",
                        &external_comment,
                        "-m addrtype --dst-type LOCAL",
                        &mproto,
                        "--dport",
                        &np,
                        "-j",
                        external_target,
                    ],
                ));
            }
        }
        // Health check node port: accepted whether or not there are local endpoints.
        if svc.health_check_node_port != 0 {
            r.filter_nodeports.push(rule(
                KUBE_NODEPORTS,
                &[
                    "-m comment --comment",
                    &cmt(&format!("{spn} health check node port")),
                    "-m tcp -p tcp --dport",
                    &svc.health_check_node_port.to_string(),
                    "-j ACCEPT",
                ],
            ));
        }

        // Internal traffic: masquerade off-cluster (or all) traffic to the ClusterIP.
        let mut internal_rules: Vec<String> = Vec::new();
        if has_internal {
            let head = [
                "-m comment --comment",
                &cmt(&format!("{spn} cluster IP")),
                &mproto,
                "-d",
                &cip,
                "--dport",
                &port,
            ];
            if self.cfg.masquerade_all {
                internal_rules.push(rule(
                    internal_chain,
                    &[&head[..], &["-j", KUBE_MARK_MASQ]].concat(),
                ));
            } else if let Some(not_local) = &self.res.if_not_local {
                internal_rules.push(rule(
                    internal_chain,
                    &[&head[..], &[not_local.as_str(), "-j", KUBE_MARK_MASQ]].concat(),
                ));
            }
        }

        let mut own: Vec<(String, Vec<String>)> = Vec::new();
        if uses_ext_chain {
            let mut rules = Vec::new();
            if !svc.external_policy_local {
                rules.push(rule(
                    ext_chain,
                    &[
                        "-m comment --comment",
                        &cmt(&format!(
                            "masquerade traffic for {spn} external destinations"
                        )),
                        "-j",
                        KUBE_MARK_MASQ,
                    ],
                ));
            } else {
                if let Some(local) = &self.res.if_local {
                    rules.push(rule(
                        ext_chain,
                        &[
                            "-m comment --comment",
                            &cmt(&format!("pod traffic for {spn} external destinations")),
                            local,
                            "-j",
                            &chains.cluster,
                        ],
                    ));
                }
                rules.push(rule(
                    ext_chain,
                    &[
                        "-m comment --comment",
                        &cmt(&format!(
                            "masquerade LOCAL traffic for {spn} external destinations"
                        )),
                        "-m addrtype --src-type LOCAL -j",
                        KUBE_MARK_MASQ,
                    ],
                ));
                rules.push(rule(
                    ext_chain,
                    &[
                        "-m comment --comment",
                        &cmt(&format!(
                            "route LOCAL traffic for {spn} external destinations"
                        )),
                        "-m addrtype --src-type LOCAL -j",
                        &chains.cluster,
                    ],
                ));
            }
            if has_external {
                rules.push(rule(ext_chain, &["-j", external_policy_chain]));
            }
            own.push((ext_chain.to_string(), rules));
        }
        if uses_fw_chain {
            let fw = chains.firewall.as_str();
            let head = [
                "-m comment --comment",
                &cmt(&format!("{spn} loadbalancer IP")),
            ];
            let mut rules = Vec::new();
            let mut allow_from_node = false;
            for c in &source_ranges {
                rules.push(rule(
                    fw,
                    &[&head[..], &["-s", &c.to_string(), "-j", ext_chain]].concat(),
                ));
                if self.res.node_ip.is_some_and(|ip| c.contains(&ip)) {
                    allow_from_node = true;
                }
            }
            if allow_from_node {
                for ip in &lb_ips {
                    rules.push(rule(
                        fw,
                        &[&head[..], &["-s", &ip.to_string(), "-j", ext_chain]].concat(),
                    ));
                }
            }
            rules.push(rule(
                fw,
                &[
                    "-m comment --comment",
                    &cmt(&format!(
                        "other traffic to {spn} will be dropped by KUBE-PROXY-FIREWALL"
                    )),
                ],
            ));
            own.push((fw.to_string(), rules));
        }
        let large = self.large_cluster;
        // sha256 per endpoint once, not once per rule that names its chain.
        let sep_names: HashMap<String, String> = cat
            .all_reachable
            .iter()
            .map(|e| {
                let addr = e.addr();
                let name = endpoint_chain(&svc.name, &addr);
                (addr, name)
            })
            .collect();
        let sep_of = |addr: &str| -> String {
            sep_names
                .get(addr)
                .cloned()
                .unwrap_or_else(|| endpoint_chain(&svc.name, addr))
        };
        let policy_rules =
            |chain: &str, eps: &[crate::model::Endpoint], mut rules: Vec<String>| -> Vec<String> {
                if let Some(timeout) = svc.affinity_timeout {
                    for ep in eps {
                        let sep = sep_of(&ep.addr());
                        let c = if large {
                            String::new()
                        } else {
                            format!(
                                "-m comment --comment {}",
                                cmt(&format!("{spn} -> {}", ep.addr()))
                            )
                        };
                        rules.push(rule(
                            chain,
                            &[
                                &c,
                                "-m recent --name",
                                &sep,
                                "--rcheck --seconds",
                                &timeout.to_string(),
                                "--reap -j",
                                &sep,
                            ],
                        ));
                    }
                }
                let n = eps.len();
                for (i, ep) in eps.iter().enumerate() {
                    let sep = sep_of(&ep.addr());
                    let c = if large {
                        String::new()
                    } else {
                        format!(
                            "-m comment --comment {}",
                            cmt(&format!("{spn} -> {}", ep.addr()))
                        )
                    };
                    if i < n - 1 {
                        rules.push(rule(
                            chain,
                            &[
                                &c,
                                "-m statistic --mode random --probability",
                                &probability(n - i),
                                "-j",
                                &sep,
                            ],
                        ));
                    } else {
                        rules.push(rule(chain, &[&c, "-j", &sep]));
                    }
                }
                rules
            };
        // The internal masquerade rule lives in the internal policy chain.
        let (mut cluster_pre, mut local_pre) = (Vec::new(), Vec::new());
        if internal_chain == chains.cluster {
            cluster_pre = internal_rules;
        } else {
            local_pre = internal_rules;
        }
        if uses_cluster_chain {
            own.push((
                chains.cluster.clone(),
                policy_rules(&chains.cluster, &cat.cluster, cluster_pre),
            ));
        }
        if uses_local_chain {
            own.push((
                chains.local.clone(),
                policy_rules(&chains.local, &cat.local, local_pre),
            ));
        }
        for ep in &cat.all_reachable {
            let addr = ep.addr();
            let sep = sep_of(&addr);
            let c = if large {
                String::new()
            } else {
                format!("-m comment --comment {spn}")
            };
            let ip = ep.ip.to_string();
            let mut rules = vec![rule(&sep, &[&c, "-s", &ip, "-j", KUBE_MARK_MASQ])];
            let recent = if svc.affinity_timeout.is_some() {
                format!("-m recent --name {sep} --set")
            } else {
                String::new()
            };
            rules.push(rule(
                &sep,
                &[&c, &recent, &mproto, "-j DNAT --to-destination", &addr],
            ));
            own.push((sep, rules));
        }
        r.chains = own;
        r.reachable = cat.all_reachable.iter().map(|e| e.addr()).collect();
        (r, local_ready_ips)
    }

    fn top_level(&self) -> Vec<TopChain> {
        let mut nat_services = Vec::new();
        let mut nat_nodeports = Vec::new();
        let mut f_services = Vec::new();
        let mut f_external = Vec::new();
        let mut f_nodeports = Vec::new();
        let mut f_firewall = Vec::new();
        for e in self.cache.values() {
            nat_services.extend_from_slice(&e.rules.nat_services);
            nat_nodeports.extend_from_slice(&e.rules.nat_nodeports);
            f_services.extend_from_slice(&e.rules.filter_services);
            f_external.extend_from_slice(&e.rules.filter_external);
            f_nodeports.extend_from_slice(&e.rules.filter_nodeports);
            f_firewall.extend_from_slice(&e.rules.filter_firewall);
        }
        // The tail call to KUBE-NODEPORTS must stay the last rule of KUBE-SERVICES.
        let np_comment =
            cmt("kubernetes service nodeports; NOTE: this must be the last rule in this chain");
        match &self.res.nodeport_ips {
            None => {
                let mut dst = String::from("-m addrtype --dst-type LOCAL");
                if self.cfg.family == Family::V6 {
                    dst.push_str(" ! -d ::1/128");
                } else if !self.res.localhost_nodeports {
                    dst.push_str(" ! -d 127.0.0.0/8");
                }
                nat_services.push(rule(
                    KUBE_SERVICES,
                    &[
                        "-m comment --comment",
                        &np_comment,
                        &dst,
                        "-j",
                        KUBE_NODEPORTS,
                    ],
                ));
            }
            Some(ips) => {
                for ip in ips {
                    if ip.is_loopback() && !self.res.localhost_nodeports {
                        continue;
                    }
                    nat_services.push(rule(
                        KUBE_SERVICES,
                        &[
                            "-m comment --comment",
                            &np_comment,
                            "-d",
                            &ip.to_string(),
                            "-j",
                            KUBE_NODEPORTS,
                        ],
                    ));
                }
            }
        }
        let mark = format!("{}/{}", self.res.masq_mark, self.res.masq_mark);
        let mut forward = Vec::new();
        if !self.cfg.conntrack_tcp_liberal {
            forward.push(rule(
                KUBE_FORWARD,
                &["-m conntrack --ctstate INVALID -j DROP"],
            ));
        }
        forward.push(rule(
            KUBE_FORWARD,
            &[
                "-m comment --comment",
                &cmt("kubernetes forwarding rules"),
                "-m mark --mark",
                &mark,
                "-j ACCEPT",
            ],
        ));
        forward.push(rule(
            KUBE_FORWARD,
            &[
                "-m comment --comment",
                &cmt("kubernetes forwarding conntrack rule"),
                "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
            ],
        ));
        let mut postrouting = vec![
            rule(KUBE_POSTROUTING, &["-m mark ! --mark", &mark, "-j RETURN"]),
            rule(
                KUBE_POSTROUTING,
                &["-j MARK --xor-mark", &self.res.masq_mark],
            ),
        ];
        postrouting.push(rule(
            KUBE_POSTROUTING,
            &[
                "-m comment --comment",
                &cmt("kubernetes service traffic requiring SNAT"),
                "-j MASQUERADE",
                if self.cfg.random_fully {
                    "--random-fully"
                } else {
                    ""
                },
            ],
        ));
        let mark_masq = vec![rule(
            KUBE_MARK_MASQ,
            &["-j MARK --or-mark", &self.res.masq_mark],
        )];

        let mut out = vec![
            ("filter", KUBE_SERVICES, f_services),
            ("filter", KUBE_EXTERNAL_SERVICES, f_external),
            ("filter", KUBE_FORWARD, forward),
            ("filter", KUBE_NODEPORTS, f_nodeports),
            ("filter", KUBE_PROXY_FIREWALL, f_firewall),
        ];
        if self.res.localhost_nodeports {
            // Mitigates the route_localnet hole (upstream issue 90259); kubelet writes
            // the identical rule.
            out.push(("filter", KUBELET_FIREWALL, vec![rule(KUBELET_FIREWALL, &["-m comment --comment", &cmt("block incoming localnet connections"), "-d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP"])]));
        }
        out.push(("filter", KUBE_PROXY_CANARY, Vec::new()));
        out.push(("nat", KUBE_PROXY_CANARY, Vec::new()));
        out.push(("nat", KUBE_SERVICES, nat_services));
        out.push(("nat", KUBE_NODEPORTS, nat_nodeports));
        out.push(("nat", KUBE_POSTROUTING, postrouting));
        out.push(("nat", KUBE_MARK_MASQ, mark_masq));
        out
    }

    /// Render a sync. `full` forces a full sync (also forced after `abort`);
    /// `saved` is `iptables-save` output of the filter and nat tables, read on full
    /// syncs to find stale service chains and missing jump rules.
    ///
    /// Cost is proportional to what changed: the model's change log names the
    /// Services changed since the last render, per-chain hashes decide what to write,
    /// and the shared top-level chains are rebuilt only when a Service's share of
    /// them changed. Counters and health checks are kept up to date incrementally.
    pub fn render(&mut self, model: &Model, full: bool, saved: Option<&str>) -> RenderOutput {
        let full = full || self.needs_full;
        let mut out = RenderOutput::default();
        let mut em = Emit::default();
        if full {
            // Forget what we believe is applied: every chain is written.
            self.top_hashes.clear();
        }
        // Large-cluster mode (upstream: more than 1000 endpoints) is decided before
        // rendering, from the model's running total, so a cold start renders once.
        let large = model.total_endpoints() > LARGE_CLUSTER_ENDPOINTS;
        let flipped = large != self.large_cluster;
        self.large_cluster = large;
        let changed: Vec<String> = model
            .changed_since(self.seen_generation)
            .map(|k| k.to_string())
            .collect();
        self.seen_generation = model.current_generation();
        let mut rendered = 0usize;
        for key in &changed {
            let generation = model.generation(key);
            let new_ports: Vec<&ServicePort> = model
                .service(key)
                .map(|s| {
                    s.ports
                        .iter()
                        .filter(|p| p.cluster_ip(self.cfg.family).is_some())
                        .collect()
                })
                .unwrap_or_default();
            let old_spns = self.by_service.remove(key).unwrap_or_default();
            for spn in old_spns {
                if !new_ports.iter().any(|p| p.name == spn) {
                    self.remove_entry(&spn, full, &mut em, &mut out);
                }
            }
            if !new_ports.is_empty() {
                self.by_service.insert(
                    key.clone(),
                    new_ports.iter().map(|p| p.name.clone()).collect(),
                );
            }
            for sp in new_ports {
                self.update_entry(sp, generation, model, full, &mut em, &mut out);
                rendered += 1;
            }
        }
        // When large-cluster mode flipped, comments change everywhere: render the
        // service ports that did not change above too.
        if flipped {
            let rest: Vec<(ServicePort, u64)> = self
                .cache
                .values()
                .filter(|e| !em.touched.contains(&e.spn))
                .map(|e| (e.port.clone(), e.generation))
                .collect();
            for (sp, generation) in rest {
                self.update_entry(&sp, generation, model, full, &mut em, &mut out);
                rendered += 1;
            }
        }
        // On a full sync, the chains of Services that did not change are written too.
        if full {
            for e in self.cache.values() {
                if em.touched.contains(&e.spn) {
                    continue;
                }
                for (name, r) in &e.rules.chains {
                    em.chain(name, r);
                }
            }
        }

        // Top-level chains: rebuilt when some Service's share changed, written when
        // their content differs from what was applied.
        let mut filter = Emit::default();
        let mut nat_top = Emit::default();
        if full || self.top_dirty {
            let top = self.top_level();
            let (mut f_total, mut n_total) = (0usize, 0usize);
            for (table, name, rules) in &top {
                if *table == "filter" {
                    f_total += rules.len();
                } else {
                    n_total += rules.len();
                }
                let h = hash_lines(rules);
                if !full && self.top_hashes.get(&(*table, *name)) == Some(&h) {
                    continue;
                }
                self.top_hashes.insert((*table, *name), h);
                if *table == "filter" {
                    filter.chain(name, rules);
                } else {
                    nat_top.chain(name, rules);
                }
            }
            self.static_rules = (
                f_total - self.counts.filter_fragments,
                n_total - self.counts.nat_fragments,
            );
            self.top_dirty = false;
        }

        // Full sync: delete stale service chains and add missing jumps found in `saved`.
        let mut jumps_filter = String::new();
        let mut jumps_nat = String::new();
        if full {
            let existing = saved.map(parse_saved);
            if let Some(nat) = existing.as_ref().and_then(|e| e.get("nat")) {
                let desired: HashSet<&str> = self
                    .cache
                    .values()
                    .flat_map(|e| e.rules.chains.iter().map(|(n, _)| n.as_str()))
                    .collect();
                for chain in &nat.chains {
                    if is_service_chain(chain) && !desired.contains(chain.as_str()) {
                        em.delete(chain);
                    }
                }
            }
            for j in jump_rules(self.res.localhost_nodeports) {
                let present = existing.as_ref().is_some_and(|ex| {
                    ex.get(j.table).is_some_and(|t| {
                        t.rules.iter().any(|r| {
                            r.starts_with(&format!("-A {} ", j.src))
                                && r.ends_with(&format!("-j {}", j.dst))
                                && (j.comment.is_empty() || r.contains(&cmt(j.comment)))
                        })
                    })
                });
                if !present {
                    let target = if j.table == "filter" {
                        &mut jumps_filter
                    } else {
                        &mut jumps_nat
                    };
                    let _ = writeln!(target, "-I {} 1 {}", j.src, j.spec());
                }
            }
        }

        let mut text = String::new();
        if !filter.is_empty() || !jumps_filter.is_empty() {
            let (decls, rules) = filter.finish();
            text.push_str("*filter\n");
            text.push_str(&decls);
            text.push_str(&rules);
            text.push_str(&jumps_filter);
            text.push_str("COMMIT\n");
        }
        if !nat_top.is_empty() || !em.is_empty() || !jumps_nat.is_empty() {
            let (top_decls, top_rules) = nat_top.finish();
            let (decls, rules) = em.finish();
            text.push_str("*nat\n");
            text.push_str(&top_decls);
            text.push_str(&decls);
            text.push_str(&top_rules);
            text.push_str(&rules);
            text.push_str(&jumps_nat);
            text.push_str("COMMIT\n");
        }
        out.text = text;

        let mut hc: BTreeMap<u16, (String, BTreeSet<IpAddr>)> = BTreeMap::new();
        for (spn, (port, ips)) in &self.health {
            let entry = hc
                .entry(*port)
                .or_insert_with(|| (spn.service_key(), BTreeSet::new()));
            entry.1.extend(ips.iter().copied());
        }
        out.health_checks = hc
            .into_iter()
            .map(|(port, (service, ips))| HealthCheck {
                port,
                service,
                local_endpoints: ips.len(),
            })
            .collect();
        out.changed_services = std::mem::take(&mut em.changed_services)
            .into_iter()
            .collect();
        out.stats = RenderStats {
            full,
            services: model.service_count(),
            service_ports: self.cache.len(),
            rendered_service_ports: rendered,
            endpoints: self.total_endpoints,
            filter_rules: self.counts.filter_fragments + self.static_rules.0,
            nat_rules: self.counts.nat_fragments + self.counts.nat_own + self.static_rules.1,
            written_chains: em.written() + filter.written() + nat_top.written(),
            deleted_chains: em.deleted.len(),
            no_local_endpoints_internal: self.counts.no_local_internal,
            no_local_endpoints_external: self.counts.no_local_external,
            large_cluster_mode: self.large_cluster,
        };
        // Until commit() says the restore worked, the next render must be full.
        self.needs_full = true;
        out
    }

    /// Account an entry's contribution to the running counters (sign +1 or -1).
    fn account(&mut self, e: &CacheEntry, add: bool) {
        let r = &e.rules;
        let c = &mut self.counts;
        let f = r.filter_services.len()
            + r.filter_external.len()
            + r.filter_nodeports.len()
            + r.filter_firewall.len();
        let n = r.nat_services.len() + r.nat_nodeports.len();
        let own: usize = r.chains.iter().map(|(_, rules)| rules.len()).sum();
        if add {
            c.filter_fragments += f;
            c.nat_fragments += n;
            c.nat_own += own;
            c.no_local_internal += r.no_local_internal as usize;
            c.no_local_external += r.no_local_external as usize;
            self.total_endpoints += r.endpoint_count;
        } else {
            c.filter_fragments -= f;
            c.nat_fragments -= n;
            c.nat_own -= own;
            c.no_local_internal -= r.no_local_internal as usize;
            c.no_local_external -= r.no_local_external as usize;
            self.total_endpoints -= r.endpoint_count;
        }
    }

    fn update_entry(
        &mut self,
        sp: &ServicePort,
        generation: u64,
        model: &Model,
        full: bool,
        em: &mut Emit,
        out: &mut RenderOutput,
    ) {
        let spn = &sp.name;
        let (rules, local_ready_ips) = self.render_service(sp, model);
        let new_hashes: HashMap<String, u64> = rules
            .chains
            .iter()
            .map(|(n, r)| (n.clone(), hash_lines(r)))
            .collect();
        let old = self.cache.remove(spn);
        em.touched.insert(spn.clone());
        if let Some(old) = &old {
            self.account(old, false);
            conntrack::changed(
                &mut out.conntrack,
                self.cfg.family,
                &old.port,
                &old.rules.reachable,
                sp,
                &rules.reachable,
            );
            if !full {
                for name in old.chain_hashes.keys() {
                    if !new_hashes.contains_key(name) {
                        em.delete(name);
                    }
                }
            }
            if !old.rules.same_fragments(&rules) {
                self.top_dirty = true;
            }
        } else {
            if !rules.reachable.is_empty() {
                conntrack::gained(&mut out.conntrack, self.cfg.family, sp);
            }
            self.top_dirty = true;
        }
        for (name, r) in &rules.chains {
            let same = !full
                && old.as_ref().and_then(|o| o.chain_hashes.get(name)) == new_hashes.get(name);
            if !same {
                em.chain(name, r);
                em.changed_services.insert(spn.service_key());
            }
        }
        if old.as_ref().map(|o| &o.rules) != Some(&rules) {
            em.changed_services.insert(spn.service_key());
        }
        if sp.health_check_node_port != 0 {
            self.health
                .insert(spn.clone(), (sp.health_check_node_port, local_ready_ips));
        } else {
            self.health.remove(spn);
        }
        let entry = CacheEntry {
            generation,
            rules,
            chain_hashes: new_hashes,
            spn: spn.clone(),
            port: sp.clone(),
        };
        self.account(&entry, true);
        self.cache.insert(spn.clone(), entry);
    }

    fn remove_entry(
        &mut self,
        spn: &ServicePortName,
        full: bool,
        em: &mut Emit,
        out: &mut RenderOutput,
    ) {
        let Some(old) = self.cache.remove(spn) else {
            return;
        };
        self.account(&old, false);
        self.health.remove(spn);
        self.top_dirty = true;
        em.changed_services.insert(spn.service_key());
        if !full {
            for name in old.chain_hashes.keys() {
                em.delete(name);
            }
        }
        conntrack::removed(&mut out.conntrack, self.cfg.family, &old.port);
    }
}

struct Jump {
    table: &'static str,
    dst: &'static str,
    src: &'static str,
    comment: &'static str,
    new_only: bool,
}

impl Jump {
    fn spec(&self) -> String {
        let mut s = String::new();
        if self.new_only {
            s.push_str("-m conntrack --ctstate NEW ");
        }
        if !self.comment.is_empty() {
            let _ = write!(s, "-m comment --comment {} ", cmt(self.comment));
        }
        let _ = write!(s, "-j {}", self.dst);
        s
    }
}

fn jump_rules(kubelet_firewall: bool) -> Vec<Jump> {
    let j = |table, dst, src, comment, new_only| Jump {
        table,
        dst,
        src,
        comment,
        new_only,
    };
    let mut v = vec![
        j(
            "filter",
            KUBE_EXTERNAL_SERVICES,
            "INPUT",
            "kubernetes externally-visible service portals",
            true,
        ),
        j(
            "filter",
            KUBE_EXTERNAL_SERVICES,
            "FORWARD",
            "kubernetes externally-visible service portals",
            true,
        ),
        j(
            "filter",
            KUBE_NODEPORTS,
            "INPUT",
            "kubernetes health check service ports",
            false,
        ),
        j(
            "filter",
            KUBE_SERVICES,
            "FORWARD",
            "kubernetes service portals",
            true,
        ),
        j(
            "filter",
            KUBE_SERVICES,
            "OUTPUT",
            "kubernetes service portals",
            true,
        ),
        j(
            "filter",
            KUBE_FORWARD,
            "FORWARD",
            "kubernetes forwarding rules",
            false,
        ),
        j(
            "filter",
            KUBE_PROXY_FIREWALL,
            "INPUT",
            "kubernetes load balancer firewall",
            true,
        ),
        j(
            "filter",
            KUBE_PROXY_FIREWALL,
            "OUTPUT",
            "kubernetes load balancer firewall",
            true,
        ),
        j(
            "filter",
            KUBE_PROXY_FIREWALL,
            "FORWARD",
            "kubernetes load balancer firewall",
            true,
        ),
        j(
            "nat",
            KUBE_SERVICES,
            "OUTPUT",
            "kubernetes service portals",
            false,
        ),
        j(
            "nat",
            KUBE_SERVICES,
            "PREROUTING",
            "kubernetes service portals",
            false,
        ),
        j(
            "nat",
            KUBE_POSTROUTING,
            "POSTROUTING",
            "kubernetes postrouting rules",
            false,
        ),
    ];
    if kubelet_firewall {
        v.push(j("filter", KUBELET_FIREWALL, "INPUT", "", false));
        v.push(j("filter", KUBELET_FIREWALL, "OUTPUT", "", false));
    }
    v
}

#[derive(Default)]
struct SavedTable {
    chains: Vec<String>,
    rules: Vec<String>,
}

fn parse_saved(saved: &str) -> HashMap<String, SavedTable> {
    let mut out: HashMap<String, SavedTable> = HashMap::new();
    let mut cur: Option<String> = None;
    for line in saved.lines() {
        let line = line.trim();
        if let Some(t) = line.strip_prefix('*') {
            cur = Some(t.to_string());
            out.entry(t.to_string()).or_default();
        } else if line == "COMMIT" {
            cur = None;
        } else if let Some(rest) = line.strip_prefix(':') {
            if let (Some(t), Some(name)) = (&cur, rest.split_whitespace().next()) {
                out.entry(t.clone())
                    .or_default()
                    .chains
                    .push(name.to_string());
            }
        } else if line.starts_with("-A ") {
            if let Some(t) = &cur {
                out.entry(t.clone())
                    .or_default()
                    .rules
                    .push(line.to_string());
            }
        }
    }
    out
}

const OWN_FILTER_CHAINS: [&str; 6] = [
    KUBE_SERVICES,
    KUBE_EXTERNAL_SERVICES,
    KUBE_FORWARD,
    KUBE_NODEPORTS,
    KUBE_PROXY_FIREWALL,
    KUBE_PROXY_CANARY,
];
const OWN_NAT_CHAINS: [&str; 4] = [
    KUBE_SERVICES,
    KUBE_NODEPORTS,
    KUBE_POSTROUTING,
    KUBE_PROXY_CANARY,
];

/// `--cleanup`: from `iptables-save` output, the restore input that removes our jump
/// rules and chains and nothing else (KUBE-MARK-MASQ and KUBE-FIREWALL are shared
/// with kubelet and stay, as upstream leaves them).
pub fn render_cleanup(saved: &str) -> String {
    let tables = parse_saved(saved);
    let mut text = String::new();
    for (table, own) in [
        ("filter", &OWN_FILTER_CHAINS[..]),
        ("nat", &OWN_NAT_CHAINS[..]),
    ] {
        let Some(t) = tables.get(table) else { continue };
        let doomed: Vec<&String> = t
            .chains
            .iter()
            .filter(|c| own.contains(&c.as_str()) || (table == "nat" && is_service_chain(c)))
            .collect();
        if doomed.is_empty() {
            continue;
        }
        let _ = writeln!(text, "*{table}");
        // Rules in chains that survive but jump into a doomed chain.
        for r in &t.rules {
            let mut words = r.split_whitespace();
            let _ = words.next();
            let chain = words.next().unwrap_or("");
            if doomed.iter().any(|d| d.as_str() == chain) {
                continue;
            }
            if let Some(target) = r
                .rsplit_once(" -j ")
                .map(|(_, t)| t.split_whitespace().next().unwrap_or(""))
            {
                if doomed.iter().any(|d| d.as_str() == target) {
                    let _ = writeln!(text, "-D {}", &r[3..]);
                }
            }
        }
        for c in &doomed {
            let _ = writeln!(text, ":{c} - [0:0]");
        }
        for c in &doomed {
            let _ = writeln!(text, "-X {c}");
        }
        text.push_str("COMMIT\n");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cfg() -> IptablesConfig {
        serde_json::from_value(json!({
            "family": "v4", "node_name": "node1", "node_ips": ["172.18.0.2"],
            "local_detector": {"kind": "cidr", "cidrs": ["10.244.0.0/16"]}
        }))
        .unwrap()
    }

    fn model(n: usize, eps: usize) -> Model {
        let mut m = Model::new();
        for i in 0..n {
            let svc = json!({"metadata": {"name": format!("s{i}"), "namespace": "ns"},
                "spec": {"clusterIP": format!("10.96.{}.{}", i / 250, i % 250 + 1),
                    "ports": [{"name": "p", "port": 80}]}});
            m.set_service(&format!("ns/s{i}"), Some(&svc)).unwrap();
            set_slice(&mut m, i, eps, 0);
        }
        m
    }

    fn set_slice(m: &mut Model, i: usize, eps: usize, offset: usize) {
        let endpoints: Vec<_> = (0..eps)
            .map(|j| json!({"addresses": [format!("10.244.{}.{}", (i * 4 + j + offset) / 250, (i * 4 + j + offset) % 250 + 1)], "nodeName": "node2"}))
            .collect();
        let slice = json!({"metadata": {"name": format!("s{i}-x"), "namespace": "ns",
            "labels": {"kubernetes.io/service-name": format!("s{i}")}},
            "addressType": "IPv4", "ports": [{"name": "p", "port": 8080}], "endpoints": endpoints});
        m.set_endpoint_slice(&format!("ns/s{i}-x"), Some(&slice))
            .unwrap();
    }

    #[test]
    fn full_sync_has_upstream_layout() {
        let m = model(2, 2);
        let mut r = IptablesRenderer::new(cfg()).unwrap();
        let out = r.render(&m, true, None);
        let t = &out.text;
        assert!(t.starts_with("*filter\n"));
        assert!(t.contains("-A KUBE-SERVICES -m comment --comment \"ns/s0:p cluster IP\" -m tcp -p tcp -d 10.96.0.1 --dport 80 -j KUBE-SVC-"));
        assert!(t.contains("! -s 10.244.0.0/16 -j KUBE-MARK-MASQ"));
        assert!(t.contains("-m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-"));
        assert!(t.contains("-j DNAT --to-destination 10.244.0.1:8080"));
        assert!(t.contains("-A KUBE-POSTROUTING -m mark ! --mark 0x004000/0x004000 -j RETURN"));
        assert!(t.contains(
            "-I PREROUTING 1 -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
        ));
        assert!(t.contains("-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"));
        assert_eq!(out.stats.service_ports, 2);
    }

    #[test]
    fn nothing_changed_writes_nothing() {
        let m = model(3, 2);
        let mut r = IptablesRenderer::new(cfg()).unwrap();
        r.render(&m, true, None);
        r.commit();
        let out = r.render(&m, false, None);
        assert_eq!(out.text, "");
        assert_eq!(out.stats.rendered_service_ports, 0);
    }

    #[test]
    fn endpoint_change_writes_only_that_service() {
        let mut m = model(50, 2);
        let mut r = IptablesRenderer::new(cfg()).unwrap();
        r.render(&m, true, None);
        r.commit();
        set_slice(&mut m, 7, 2, 1);
        let out = r.render(&m, false, None);
        r.commit();
        assert!(!out.text.contains(":KUBE-SERVICES"), "{}", out.text);
        assert!(!out.text.contains("*filter"));
        let svc = service_chains(&m.service("ns/s7").unwrap().ports[0].name).cluster;
        assert!(out.text.contains(&format!(":{svc} - [0:0]")));
        // One endpoint replaced: one SEP chain deleted, one added.
        assert_eq!(out.text.matches("-X KUBE-SEP-").count(), 1, "{}", out.text);
        assert_eq!(out.changed_services, vec!["ns/s7".to_string()]);
    }

    #[test]
    fn no_endpoints_rejects_in_filter_and_recovers() {
        let mut m = model(2, 2);
        let mut r = IptablesRenderer::new(cfg()).unwrap();
        r.render(&m, true, None);
        r.commit();
        m.set_endpoint_slice("ns/s1-x", None).unwrap();
        let out = r.render(&m, false, None);
        r.commit();
        assert!(
            out.text.contains(
                "ns/s1:p has no endpoints\" -m tcp -p tcp -d 10.96.0.2 --dport 80 -j REJECT"
            ),
            "{}",
            out.text
        );
        assert!(out.text.contains("-X KUBE-SVC-"));
        set_slice(&mut m, 1, 1, 0);
        let out = r.render(&m, false, None);
        assert!(!out.text.contains("REJECT"));
    }

    #[test]
    fn failed_restore_forces_full() {
        let mut m = model(2, 1);
        let mut r = IptablesRenderer::new(cfg()).unwrap();
        r.render(&m, true, None);
        // No commit: the restore failed.
        set_slice(&mut m, 0, 2, 0);
        let out = r.render(&m, false, None);
        assert!(out.stats.full);
        assert!(out.text.contains(":KUBE-SERVICES - [0:0]"));
    }

    #[test]
    fn full_sync_deletes_stale_chains_and_keeps_existing_jumps() {
        let m = model(1, 1);
        let mut r = IptablesRenderer::new(cfg()).unwrap();
        let saved = "*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SVC-STALESTALESTALE1 - [0:0]\n:OTHER - [0:0]\n-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\nCOMMIT\n";
        let out = r.render(&m, true, Some(saved));
        assert!(out.text.contains("-X KUBE-SVC-STALESTALESTALE1"));
        assert!(!out.text.contains("-X OTHER"));
        assert!(!out.text.contains("-I PREROUTING"));
        assert!(out.text.contains(
            "-I OUTPUT 1 -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
        ));
    }

    #[test]
    fn cleanup_removes_only_ours() {
        let saved = "*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-AAAA - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n:MINE - [0:0]\n-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n-A PREROUTING -j MINE\n-A KUBE-SERVICES -j KUBE-SVC-AAAA\nCOMMIT\n";
        let text = render_cleanup(saved);
        assert!(text.contains(
            "-D PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
        ));
        assert!(text.contains("-X KUBE-SERVICES") && text.contains("-X KUBE-SVC-AAAA"));
        assert!(!text.contains("MINE") && !text.contains("-X KUBE-MARK-MASQ"));
    }

    fn render_with(extra: serde_json::Value) -> String {
        let mut c = serde_json::to_value(cfg()).unwrap();
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        let mut r = IptablesRenderer::new(serde_json::from_value(c).unwrap()).unwrap();
        r.render(&model(1, 1), true, None).text
    }

    #[test]
    fn detect_local_modes() {
        let t = render_with(json!({"local_detector": {"kind": "interface", "name": "cbr0"}}));
        assert!(t.contains("! -i cbr0 -j KUBE-MARK-MASQ"), "{t}");
        let t = render_with(json!({"local_detector": {"kind": "prefix", "prefix": "veth"}}));
        assert!(t.contains("! -i veth+ -j KUBE-MARK-MASQ"), "{t}");
        let t = render_with(json!({"local_detector": {"kind": "none"}}));
        assert!(!t.contains("-d 10.96.0.1 --dport 80 ! -s"), "{t}");
        let t = render_with(json!({"masquerade_all": true}));
        assert!(
            t.contains("-d 10.96.0.1 --dport 80 -j KUBE-MARK-MASQ"),
            "{t}"
        );
    }

    #[test]
    fn nodeport_addresses_and_masquerade_bit() {
        let t = render_with(
            json!({"nodeport_addresses": ["172.18.0.2", "127.0.0.1"], "localhost_nodeports": false, "masquerade_bit": 5}),
        );
        assert!(t.contains("-d 172.18.0.2 -j KUBE-NODEPORTS"), "{t}");
        assert!(!t.contains("-d 127.0.0.1 -j KUBE-NODEPORTS"), "{t}");
        assert!(!t.contains("--dst-type LOCAL -j KUBE-NODEPORTS"));
        assert!(!t.contains("KUBE-FIREWALL"));
        assert!(t.contains("--or-mark 0x000020"), "{t}");
        let t = render_with(json!({"localhost_nodeports": false}));
        assert!(
            t.contains("--dst-type LOCAL ! -d 127.0.0.0/8 -j KUBE-NODEPORTS"),
            "{t}"
        );
        assert!(IptablesRenderer::new(
            serde_json::from_value(json!({"family": "v4", "node_name": "n", "masquerade_bit": 32}))
                .unwrap()
        )
        .is_err());
    }

    /// iptables-restore --noflush semantics for the lines the renderer writes.
    fn apply(state: &mut BTreeMap<String, Vec<String>>, text: &str) {
        let mut declared = BTreeSet::new();
        let mut table = String::new();
        for line in text.lines() {
            if let Some(t) = line.strip_prefix('*') {
                table = t.to_string();
                declared.clear();
            } else if let Some(c) = line.strip_prefix(':') {
                let name = format!("{table}/{}", c.split_whitespace().next().unwrap());
                assert!(declared.insert(name.clone()), "{name} declared twice");
                state.insert(name, Vec::new());
            } else if let Some(r) = line.strip_prefix("-A ") {
                let name = format!("{table}/{}", r.split_whitespace().next().unwrap());
                state
                    .get_mut(&name)
                    .expect("undeclared chain")
                    .push(line.to_string());
            } else if let Some(c) = line.strip_prefix("-X ") {
                state.remove(&format!("{table}/{c}"));
            }
        }
    }

    #[test]
    fn crossing_large_cluster_threshold_partially_converges() {
        let mut m = model(240, 4);
        let mut r = IptablesRenderer::new(cfg()).unwrap();
        let mut state = BTreeMap::new();
        apply(&mut state, &r.render(&m, true, None).text);
        r.commit();
        assert!(!r.large_cluster);
        for i in 240..260 {
            let svc = json!({"metadata": {"name": format!("s{i}"), "namespace": "ns"},
                "spec": {"clusterIP": format!("10.96.1.{}", i - 200), "ports": [{"name": "p", "port": 80}]}});
            m.set_service(&format!("ns/s{i}"), Some(&svc)).unwrap();
            set_slice(&mut m, i, 4, 0);
        }
        let out = r.render(&m, false, None);
        r.commit();
        assert!(out.stats.large_cluster_mode && !out.stats.full);
        apply(&mut state, &out.text);
        let mut fresh = BTreeMap::new();
        apply(
            &mut fresh,
            &IptablesRenderer::new(cfg())
                .unwrap()
                .render(&m, true, None)
                .text,
        );
        assert_eq!(state, fresh);
        // And back below the threshold.
        for i in 100..260 {
            m.set_service(&format!("ns/s{i}"), None).unwrap();
        }
        apply(&mut state, &r.render(&m, false, None).text);
        let mut fresh = BTreeMap::new();
        apply(
            &mut fresh,
            &IptablesRenderer::new(cfg())
                .unwrap()
                .render(&m, true, None)
                .text,
        );
        assert_eq!(state, fresh);
    }

    #[test]
    fn large_cluster_mode_drops_endpoint_comments() {
        let m = model(300, 4);
        let mut r = IptablesRenderer::new(cfg()).unwrap();
        let out = r.render(&m, true, None);
        assert!(out.stats.large_cluster_mode);
        assert!(!out.text.contains("-> 10.244"));
    }
}
