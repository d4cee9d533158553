//! nftables rule rendering: upstream kube-proxy's `kube-proxy` tables (families ip and
//! ip6) with upstream's base chains, maps and chain-name prefixes
//! (pkg/proxy/nftables/proxier.go), but a rule shape whose kernel cost stays linear.
//!
//! # Why this shape
//!
//! Upstream writes, per service port, a `service-…` chain whose endpoint choice is an
//! anonymous verdict map (`numgen random mod N vmap { 0 : goto endpoint-…, … }`) and one
//! `endpoint-…` chain per endpoint. Measured on this machine (kernel 6.18, nft 1.0.6,
//! cold load of 30k Services x 2 endpoints into an empty namespace) that takes 252 s,
//! nearly all kernel time: every new anonymous set gets a name by scanning every set of
//! the table, and set lookups by name are linear, so N Services cost O(N²). The same
//! Services with no per-Service set load in 3.5 s. bench/bench_nftables.py measures
//! both shapes loaded the same way (one `nft -f`, fresh namespace, 2 shared CPUs,
//! bench/results/nftables.json): upstream's 0.42 s at 1k, 59.6 s at 10k, over the
//! 300 s cap at 30k; this shape 0.15 s, 1.8 s, 5.8 s and 14.2 s at 50k, within noise of
//! `nft -f` of the same text alone (render is 0.2 s per 10k Services).
//!
//! A second cost is the `nft` CLI itself: before any `add rule`/`add element` it dumps
//! every chain of the table (NFT_MSG_GETCHAIN), and the kernel's chain dump restarts
//! its walk for every netlink buffer, so it is quadratic in the number of chains
//! (1.2 s at 90k chains, i.e. with upstream's per-endpoint chains at 30k Services).
//! One chain per Service keeps that at ~0.2 s at 30k Services, which is what an
//! incremental sync costs today (render ~20 ms); programming the incremental path
//! over netlink (no cache dump) is the way below that.
//!
//! So, per service port:
//! - no anonymous sets and no per-endpoint chains. The `service-…` (and `local-…`)
//!   chain picks an endpoint with a cascade of plain rules, rule i of n matching with
//!   probability 1/(n-i): `numgen random mod 2 0 meta l4proto tcp dnat to 10.0.0.1:80`,
//!   then `meta l4proto tcp dnat to 10.0.0.2:80`. Each rule's own numgen makes the
//!   cascade uniform for random, an exact rotation for round-robin (`numgen inc`: rule
//!   i sees every (n-i)th packet that reaches it), and a per-source choice for
//!   source-hash (`jhash ip saddr mod (n-i) seed S_i`, a different seed per rule so
//!   the draws are independent). Cost per new connection is O(endpoints of that
//!   Service), as in iptables mode; established flows never leave conntrack.
//! - hairpin traffic (a pod reaching itself through its Service), which upstream
//!   masquerades in each endpoint chain, is caught by one rule in `masquerading`:
//!   `ct status dnat ip saddr . ip daddr @hairpin-endpoints`, a named set of
//!   `ip . ip` pairs, one per endpoint IP.
//! - everything that dispatches is an element of a few big named maps, exactly
//!   upstream's: `service-ips` (`ip daddr . meta l4proto . th dport vmap`),
//!   `service-nodeports`, `no-endpoint-services`, `no-endpoint-nodeports`,
//!   `firewall-ips`, and the sets `cluster-ips`, `nodeport-ips`. A Service change is
//!   element updates plus a rewrite of the Service's own chain(s).
//! - loadBalancerSourceRanges use one `return` rule per range in the `firewall-…`
//!   chain instead of an anonymous set.
//! - ClientIP affinity keeps upstream's per-endpoint `affinity-…` named sets with
//!   timeouts (only Services with affinity pay for them).
//!
//! # Syncs
//!
//! Full desired state in, minimal change out, as the iptables renderer: Services whose
//! model generation changed are re-rendered; only chains whose rules changed are
//! flushed and rewritten, and map elements are diffed (reference-counted: two service
//! ports may share an element, e.g. a ClusterIP in `cluster-ips`). The output is one
//! `nft -f` transaction. A full sync replaces the table atomically (`add table; delete
//! table; table …` in one transaction), so it needs no listing of the kernel state and
//! removes whatever someone else left in our table; conntrack keeps established flows.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::categorize::categorize;
use crate::conntrack::{self, ConntrackCleanup};
use crate::error::{Error, Result};
use crate::hash::{chain_hash, fnv1a, hash_lines, FNV_OFFSET};
use crate::iptables::{HealthCheck, LocalDetector};
use crate::model::{Endpoint, Model, ServicePort, ServicePortName};
use crate::net::{ips_of_family, Cidr, Family};

pub const TABLE: &str = "kube-proxy";

// Upstream's chain, set and map names.
pub const SERVICES: &str = "services";
pub const MARK_FOR_MASQUERADE: &str = "mark-for-masquerade";
pub const MASQUERADING: &str = "masquerading";
pub const SERVICE_ENDPOINTS_CHECK: &str = "service-endpoints-check";
pub const NODEPORT_ENDPOINTS_CHECK: &str = "nodeport-endpoints-check";
pub const CLUSTER_IPS_CHECK: &str = "cluster-ips-check";
pub const FIREWALL_CHECK: &str = "firewall-check";
pub const REJECT_CHAIN: &str = "reject-chain";
pub const CLUSTER_IPS: &str = "cluster-ips";
pub const NODEPORT_IPS: &str = "nodeport-ips";
pub const SERVICE_IPS: &str = "service-ips";
pub const SERVICE_NODEPORTS: &str = "service-nodeports";
pub const NO_ENDPOINT_SERVICES: &str = "no-endpoint-services";
pub const NO_ENDPOINT_NODEPORTS: &str = "no-endpoint-nodeports";
pub const FIREWALL_IPS: &str = "firewall-ips";
/// kproxy's own: `ip . ip` pairs of endpoint IPs, for hairpin masquerade.
pub const HAIRPIN_ENDPOINTS: &str = "hairpin-endpoints";

/// Upstream's chain-name prefixes for service-port chains.
pub const SERVICE_PREFIX: &str = "service-";
pub const LOCAL_PREFIX: &str = "local-";
pub const EXTERNAL_PREFIX: &str = "external-";
pub const FIREWALL_PREFIX: &str = "firewall-";
pub const AFFINITY_PREFIX: &str = "affinity-";

/// How a service port picks an endpoint in the kernel (`kproxy.io/lb-algorithm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum NftAlgorithm {
    Random,
    RoundRobin,
    SourceHash,
}

impl NftAlgorithm {
    /// The algorithm for an annotation value; None when nftables cannot express it
    /// (the caller logs it and uses random).
    pub fn from_annotation(value: Option<&str>) -> Option<NftAlgorithm> {
        match value.map(str::trim) {
            None | Some("") | Some("random") => Some(NftAlgorithm::Random),
            Some("round-robin") => Some(NftAlgorithm::RoundRobin),
            Some("source-hash") => Some(NftAlgorithm::SourceHash),
            Some(_) => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NftablesConfig {
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
    /// None: NodePorts on every local address (`fib daddr type local`); Some: only on
    /// these IPs (upstream's default in nftables mode is the node's primary IPs).
    #[serde(default)]
    pub nodeport_addresses: Option<Vec<String>>,
    #[serde(default)]
    pub conntrack_tcp_liberal: bool,
}

fn default_masq_bit() -> u32 {
    14
}

struct Resolved {
    masq_mark: String,
    /// `ip` or `ip6`: the table family and the address payload keyword.
    fam: &'static str,
    addr_type: &'static str,
    if_local: Option<String>,
    if_not_local: Option<String>,
    node_ip: Option<IpAddr>,
    nodeport_ips: Option<Vec<IpAddr>>,
}

impl NftablesConfig {
    fn resolve(&self) -> Result<Resolved> {
        if self.masquerade_bit > 31 {
            return Err(Error::config(
                "masquerade_bit",
                format!("{} is not within [0, 31]", self.masquerade_bit),
            ));
        }
        let fam = match self.family {
            Family::V4 => "ip",
            Family::V6 => "ip6",
        };
        let (if_local, if_not_local) = match &self.local_detector {
            LocalDetector::None => (None, None),
            LocalDetector::Cidr { cidrs } => {
                let mut found = None;
                for c in cidrs {
                    let cidr = Cidr::parse(c).ok_or_else(|| {
                        Error::config("local_detector.cidrs", format!("invalid CIDR {c:?}"))
                    })?;
                    if cidr.family() == self.family && found.is_none() {
                        found = Some(cidr);
                    }
                }
                match found {
                    Some(c) => (
                        Some(format!("{fam} saddr {c}")),
                        Some(format!("{fam} saddr != {c}")),
                    ),
                    None => (None, None),
                }
            }
            LocalDetector::Interface { name } => (
                Some(format!("iifname {}", quote(name))),
                Some(format!("iifname != {}", quote(name))),
            ),
            LocalDetector::Prefix { prefix } => (
                Some(format!("iifname {}", quote(&format!("{prefix}*")))),
                Some(format!("iifname != {}", quote(&format!("{prefix}*")))),
            ),
        };
        let node_ip = ips_of_family(&self.node_ips, self.family, "node_ips")?
            .first()
            .copied();
        let nodeport_ips = match &self.nodeport_addresses {
            None => None,
            Some(list) => {
                // Upstream's nftables mode never serves NodePorts on loopback.
                let mut v: Vec<IpAddr> = ips_of_family(list, self.family, "nodeport_addresses")?
                    .into_iter()
                    .filter(|ip| !ip.is_loopback())
                    .collect();
                v.sort();
                v.dedup();
                Some(v)
            }
        };
        Ok(Resolved {
            masq_mark: format!("{:#010x}", 1u64 << self.masquerade_bit),
            fam,
            addr_type: if self.family == Family::V4 {
                "ipv4_addr"
            } else {
                "ipv6_addr"
            },
            if_local,
            if_not_local,
            node_ip,
            nodeport_ips,
        })
    }
}

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('"', ""))
}

/// An address as nft writes it in `dnat to` (IPv6 in brackets).
fn dnat_addr(ip: &IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

/// nft identifiers cannot hold ':' (IPv6); upstream's names use "ip/port".
fn name_ip(ip: &IpAddr) -> String {
    ip.to_string().replace(':', ".")
}

/// Upstream's hashAndTruncate: 8 base32 characters of sha256, then the readable name
/// (nft allows 256 characters; truncated to leave room for prefixes).
fn hashed(base: &str) -> String {
    let mut name = format!("{}-{}", &chain_hash(base)[..8], base);
    if name.len() > 200 {
        name.truncate(200);
    }
    name
}

/// "ns/name/proto/port": the readable part of a service port's chain names.
pub fn service_port_base(spn: &ServicePortName) -> String {
    hashed(&format!(
        "{}/{}/{}/{}",
        spn.namespace,
        spn.name,
        spn.protocol.lower(),
        spn.port
    ))
}

pub struct ServiceChains {
    pub cluster: String,
    pub local: String,
    pub external: String,
    pub firewall: String,
}

pub fn service_chains(spn: &ServicePortName) -> ServiceChains {
    let base = service_port_base(spn);
    ServiceChains {
        cluster: format!("{SERVICE_PREFIX}{base}"),
        local: format!("{LOCAL_PREFIX}{base}"),
        external: format!("{EXTERNAL_PREFIX}{base}"),
        firewall: format!("{FIREWALL_PREFIX}{base}"),
    }
}

pub fn affinity_set(spn: &ServicePortName, ep: &Endpoint) -> String {
    format!(
        "{AFFINITY_PREFIX}{}",
        hashed(&format!(
            "{}/{}/{}/{}__{}/{}",
            spn.namespace,
            spn.name,
            spn.protocol.lower(),
            spn.port,
            name_ip(&ep.ip),
            ep.port
        ))
    )
}

/// What one service port contributes to the table.
#[derive(Debug, Clone, Default, PartialEq)]
struct PortRules {
    /// Chains owned by this service port, with their rules.
    chains: Vec<(String, Vec<String>)>,
    /// (set or map, key, value) elements; value is empty for plain sets.
    elements: Vec<(&'static str, String, String)>,
    /// Named affinity sets owned by this service port: (name, declaration body).
    sets: Vec<(String, String)>,
    endpoint_count: usize,
    reachable: Vec<String>,
    no_local_internal: bool,
    no_local_external: bool,
    /// The annotation asked for an algorithm nftables cannot express.
    unsupported_algorithm: Option<String>,
}

struct CacheEntry {
    rules: PortRules,
    chain_hashes: HashMap<String, u64>,
    port: ServicePort,
    local_ready_ips: Vec<IpAddr>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct RenderStats {
    pub full: bool,
    pub services: usize,
    pub service_ports: usize,
    pub rendered_service_ports: usize,
    pub endpoints: usize,
    pub chains: usize,
    pub rules: usize,
    pub elements: usize,
    pub written_chains: usize,
    pub deleted_chains: usize,
    pub added_elements: usize,
    pub deleted_elements: usize,
    pub no_local_endpoints_internal: usize,
    pub no_local_endpoints_external: usize,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct RenderOutput {
    /// Input for `nft -f`: one transaction; empty when nothing changed.
    pub text: String,
    pub stats: RenderStats,
    pub conntrack: Vec<ConntrackCleanup>,
    pub health_checks: Vec<HealthCheck>,
    /// Service keys whose rules were rewritten.
    pub changed_services: Vec<String>,
    /// (service port, annotation value) that fell back to random (rendered this sync).
    pub unsupported_algorithms: Vec<(String, String)>,
}

type ElementKey = (&'static str, String);

/// FNV-1a for the per-sync generation scan (SipHash costs more than the rest of it).
#[derive(Default)]
struct Fnv(u64);

impl std::hash::Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let h = if self.0 == 0 { FNV_OFFSET } else { self.0 };
        self.0 = fnv1a(bytes, h);
    }
}

type FnvBuild = std::hash::BuildHasherDefault<Fnv>;

/// Aggregates over the cache, kept up to date on every insert and removal so a sync
/// costs O(changed Services), not O(Services).
#[derive(Default)]
struct Totals {
    chains: i64,
    rules: i64,
    endpoints: i64,
    no_local_internal: i64,
    no_local_external: i64,
    health_checked: BTreeSet<ServicePortName>,
}

impl Totals {
    fn account(&mut self, spn: &ServicePortName, e: &CacheEntry, sign: i64) {
        self.chains += sign * e.rules.chains.len() as i64;
        self.rules += sign * e.rules.chains.iter().map(|(_, r)| r.len()).sum::<usize>() as i64;
        self.endpoints += sign * e.rules.endpoint_count as i64;
        self.no_local_internal += sign * e.rules.no_local_internal as i64;
        self.no_local_external += sign * e.rules.no_local_external as i64;
        if e.port.health_check_node_port != 0 {
            if sign > 0 {
                self.health_checked.insert(spn.clone());
            } else {
                self.health_checked.remove(spn);
            }
        }
    }
}

/// Renders `nft -f` input for one family and remembers what was applied.
pub struct NftablesRenderer {
    cfg: NftablesConfig,
    res: Resolved,
    cache: BTreeMap<ServicePortName, CacheEntry>,
    /// Every desired element with its owners (service port -> value); the value in the
    /// kernel is the first owner's.
    elements: HashMap<ElementKey, Owners, FnvBuild>,
    /// A small id per service port: element owners are kept as (id, value), sorted.
    ids: HashMap<ServicePortName, u32, FnvBuild>,
    next_id: u32,
    totals: Totals,
    /// The model's change-log position last rendered (see `Model::changed_since`), and
    /// this family's service ports per Service.
    seen_generation: u64,
    svc_ports: HashMap<String, Vec<ServicePortName>, FnvBuild>,
    needs_full: bool,
}

/// The service ports wanting an element, as (id, value) sorted by id; the kernel holds
/// the first one's value.
type Owners = Vec<(u32, String)>;

fn effective(owners: Option<&Owners>) -> Option<String> {
    owners.and_then(|o| o.first().map(|(_, v)| v.clone()))
}

impl NftablesRenderer {
    pub fn new(cfg: NftablesConfig) -> Result<Self> {
        let res = cfg.resolve()?;
        Ok(NftablesRenderer {
            cfg,
            res,
            cache: BTreeMap::new(),
            elements: HashMap::default(),
            ids: HashMap::default(),
            next_id: 0,
            totals: Totals::default(),
            seen_generation: 0,
            svc_ports: HashMap::default(),
            needs_full: true,
        })
    }

    pub fn config(&self) -> &NftablesConfig {
        &self.cfg
    }

    /// Node-level config changed: everything is rendered again in a full sync.
    pub fn set_config(&mut self, cfg: NftablesConfig) -> Result<()> {
        self.res = cfg.resolve()?;
        self.cfg = cfg;
        self.cache.clear();
        self.elements.clear();
        self.ids.clear();
        self.totals = Totals::default();
        self.seen_generation = 0;
        self.svc_ports.clear();
        self.needs_full = true;
        Ok(())
    }

    /// The last transaction failed or the kernel state is unknown: next render is full.
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

    fn family_ips(&self, v: &[IpAddr]) -> Vec<IpAddr> {
        v.iter()
            .copied()
            .filter(|ip| Family::of(ip) == self.cfg.family)
            .collect()
    }

    /// The endpoint-choice rules of a policy chain (`service-…` or `local-…`).
    fn pick_rules(&self, svc: &ServicePort, eps: &[Endpoint], algo: NftAlgorithm) -> Vec<String> {
        let fam = self.res.fam;
        let proto = svc.name.protocol.lower();
        let mut rules = Vec::with_capacity(eps.len() * 2);
        let affinity: Vec<String> = if svc.affinity_timeout.is_some() {
            eps.iter().map(|e| affinity_set(&svc.name, e)).collect()
        } else {
            Vec::new()
        };
        for (i, ep) in eps.iter().enumerate() {
            if let Some(set) = affinity.get(i) {
                rules.push(format!(
                    "{fam} saddr @{set} meta l4proto {proto} dnat to {}",
                    dnat_addr(&ep.ip, ep.port)
                ));
            }
        }
        let n = eps.len();
        for (i, ep) in eps.iter().enumerate() {
            let mut r = String::with_capacity(96);
            let left = n - i;
            if left > 1 {
                match algo {
                    NftAlgorithm::Random => {
                        let _ = write!(r, "numgen random mod {left} 0 ");
                    }
                    NftAlgorithm::RoundRobin => {
                        let _ = write!(r, "numgen inc mod {left} 0 ");
                    }
                    NftAlgorithm::SourceHash => {
                        // A different seed per rule keeps the draws independent.
                        let seed = 0x9e37_79b9u32.wrapping_mul(i as u32 + 1);
                        let _ = write!(r, "jhash {fam} saddr mod {left} seed {seed:#x} 0 ");
                    }
                }
            }
            if let Some(set) = affinity.get(i) {
                let _ = write!(r, "update @{set} {{ {fam} saddr }} ");
            }
            let _ = write!(
                r,
                "meta l4proto {proto} dnat to {}",
                dnat_addr(&ep.ip, ep.port)
            );
            rules.push(r);
        }
        rules
    }

    fn render_port(&self, svc: &ServicePort, model: &Model) -> (PortRules, Vec<IpAddr>) {
        let family = self.cfg.family;
        let fam = self.res.fam;
        let mut r = PortRules::default();
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
        let algo = match NftAlgorithm::from_annotation(svc.lb_algorithm.as_deref()) {
            Some(a) => a,
            None => {
                r.unsupported_algorithm = svc.lb_algorithm.clone();
                NftAlgorithm::Random
            }
        };
        let proto = svc.name.protocol.lower();
        let chains = service_chains(&svc.name);
        let external_ips = self.family_ips(&svc.external_ips);
        let lb_ips = self.family_ips(&svc.load_balancer_ips);
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
        let mut has_internal = has_endpoints && uses_cluster_chain;
        if svc.internal_policy_local {
            internal_chain = chains.local.as_str();
            has_internal = uses_local_chain;
        }
        let mut external_policy_chain = chains.cluster.as_str();
        let mut has_external = has_endpoints && uses_cluster_chain;
        if svc.external_policy_local {
            external_policy_chain = chains.local.as_str();
            has_external = uses_local_chain;
        }
        let uses_ext_chain = has_endpoints && externally_accessible;
        let uses_fw_chain = has_endpoints && !lb_ips.is_empty() && !source_ranges.is_empty();
        // No endpoints at all: reject; endpoints elsewhere but none usable here: drop.
        let (no_ep_verdict, no_ep_drop) = if has_endpoints {
            ("drop".to_string(), true)
        } else {
            (format!("goto {REJECT_CHAIN}"), false)
        };
        if no_ep_drop {
            r.no_local_internal = !has_internal;
            r.no_local_external = !has_external;
        }
        let key = |ip: &IpAddr, port: u16| format!("{ip} . {proto} . {port}");

        // ClusterIP.
        r.elements
            .push((CLUSTER_IPS, cluster_ip.to_string(), String::new()));
        if has_internal {
            r.elements.push((
                SERVICE_IPS,
                key(&cluster_ip, svc.port),
                format!("goto {internal_chain}"),
            ));
        } else {
            r.elements.push((
                NO_ENDPOINT_SERVICES,
                key(&cluster_ip, svc.port),
                no_ep_verdict.clone(),
            ));
        }
        // externalIPs and LoadBalancer IPs.
        let lb_target = chains.external.as_str();
        for ip in external_ips.iter().chain(lb_ips.iter()) {
            if has_endpoints && uses_ext_chain {
                r.elements
                    .push((SERVICE_IPS, key(ip, svc.port), format!("goto {lb_target}")));
            }
            if !has_external {
                r.elements.push((
                    NO_ENDPOINT_SERVICES,
                    key(ip, svc.port),
                    no_ep_verdict.clone(),
                ));
            }
        }
        if uses_fw_chain {
            for ip in &lb_ips {
                r.elements.push((
                    FIREWALL_IPS,
                    key(ip, svc.port),
                    format!("goto {}", chains.firewall),
                ));
            }
        }
        // NodePort.
        if svc.node_port != 0 {
            let k = format!("{proto} . {}", svc.node_port);
            if uses_ext_chain {
                r.elements.push((
                    SERVICE_NODEPORTS,
                    k.clone(),
                    format!("goto {}", chains.external),
                ));
            }
            if !has_external {
                r.elements
                    .push((NO_ENDPOINT_NODEPORTS, k, no_ep_verdict.clone()));
            }
        }

        // Internal traffic: masquerade off-cluster (or all) traffic to the ClusterIP.
        let mut internal_pre = Vec::new();
        if has_internal {
            let head = format!("{fam} daddr {cluster_ip} {proto} dport {}", svc.port);
            if self.cfg.masquerade_all {
                internal_pre.push(format!("{head} jump {MARK_FOR_MASQUERADE}"));
            } else if let Some(not_local) = &self.res.if_not_local {
                internal_pre.push(format!("{head} {not_local} jump {MARK_FOR_MASQUERADE}"));
            }
        }
        let mut own: Vec<(String, Vec<String>)> = Vec::new();
        if uses_ext_chain {
            let mut rules = Vec::new();
            if !svc.external_policy_local {
                rules.push(format!("jump {MARK_FOR_MASQUERADE}"));
            } else {
                if uses_cluster_chain {
                    if let Some(local) = &self.res.if_local {
                        // Short-circuit pod traffic: pods see every endpoint.
                        rules.push(format!("{local} goto {}", chains.cluster));
                    }
                }
                rules.push(format!("fib saddr type local jump {MARK_FOR_MASQUERADE}"));
                if uses_cluster_chain {
                    rules.push(format!("fib saddr type local goto {}", chains.cluster));
                }
            }
            if has_external {
                rules.push(format!("goto {external_policy_chain}"));
            }
            own.push((chains.external.clone(), rules));
        }
        if uses_fw_chain {
            let mut rules = Vec::new();
            let mut allow_from_node = false;
            for c in &source_ranges {
                rules.push(format!("{fam} saddr {c} return"));
                if self.res.node_ip.is_some_and(|ip| c.contains(&ip)) {
                    allow_from_node = true;
                }
            }
            if allow_from_node {
                for ip in &lb_ips {
                    rules.push(format!("{fam} saddr {ip} return"));
                }
            }
            rules.push("drop".to_string());
            own.push((chains.firewall.clone(), rules));
        }
        let (mut cluster_pre, mut local_pre) = (Vec::new(), Vec::new());
        if internal_chain == chains.cluster {
            cluster_pre = internal_pre;
        } else {
            local_pre = internal_pre;
        }
        if uses_cluster_chain {
            let mut rules = cluster_pre;
            rules.extend(self.pick_rules(svc, &cat.cluster, algo));
            own.push((chains.cluster.clone(), rules));
        }
        if uses_local_chain {
            let mut rules = local_pre;
            rules.extend(self.pick_rules(svc, &cat.local, algo));
            own.push((chains.local.clone(), rules));
        }
        if let Some(timeout) = svc.affinity_timeout {
            for ep in &cat.all_reachable {
                r.sets.push((
                    affinity_set(&svc.name, ep),
                    format!(
                        "type {} ; flags dynamic,timeout ; timeout {timeout}s ;",
                        self.res.addr_type
                    ),
                ));
            }
        }
        for ep in &cat.all_reachable {
            r.elements.push((
                HAIRPIN_ENDPOINTS,
                format!("{} . {}", ep.ip, ep.ip),
                String::new(),
            ));
        }
        r.chains = own;
        r.reachable = cat.all_reachable.iter().map(|e| e.addr()).collect();
        (r, local_ready_ips)
    }

    /// Declarations and rules of the table's fixed part.
    fn static_part(&self) -> String {
        let fam = self.res.fam;
        let at = self.res.addr_type;
        let t = format!("{fam} {TABLE}");
        let mut s = String::new();
        let base = [
            ("filter-prerouting", "filter", "prerouting", "-110"),
            ("filter-input", "filter", "input", "-110"),
            ("filter-forward", "filter", "forward", "-110"),
            ("filter-output", "filter", "output", "-110"),
            ("filter-output-post-dnat", "filter", "output", "-90"),
            ("nat-prerouting", "nat", "prerouting", "-100"),
            ("nat-output", "nat", "output", "-100"),
            ("nat-postrouting", "nat", "postrouting", "100"),
        ];
        for (name, ty, hook, prio) in base {
            let _ = writeln!(
                s,
                "add chain {t} {name} {{ type {ty} hook {hook} priority {prio} ; }}"
            );
        }
        for name in [
            MARK_FOR_MASQUERADE,
            MASQUERADING,
            SERVICES,
            SERVICE_ENDPOINTS_CHECK,
            NODEPORT_ENDPOINTS_CHECK,
            CLUSTER_IPS_CHECK,
            FIREWALL_CHECK,
            REJECT_CHAIN,
        ] {
            let _ = writeln!(s, "add chain {t} {name}");
        }
        let ip_proto_port = format!("{at} . inet_proto . inet_service");
        for (name, decl, comment) in [
            (CLUSTER_IPS, format!("type {at}"), "Active ClusterIPs"),
            (
                NODEPORT_IPS,
                format!("type {at}"),
                "IPs that accept NodePort traffic",
            ),
            (
                SERVICE_IPS,
                format!("type {ip_proto_port} : verdict"),
                "ClusterIP, ExternalIP and LoadBalancer IP traffic",
            ),
            (
                SERVICE_NODEPORTS,
                "type inet_proto . inet_service : verdict".to_string(),
                "NodePort traffic",
            ),
            (
                NO_ENDPOINT_SERVICES,
                format!("type {ip_proto_port} : verdict"),
                "vmap to drop or reject packets to services with no endpoints",
            ),
            (
                NO_ENDPOINT_NODEPORTS,
                "type inet_proto . inet_service : verdict".to_string(),
                "vmap to drop or reject packets to service nodeports with no endpoints",
            ),
            (
                FIREWALL_IPS,
                format!("type {ip_proto_port} : verdict"),
                "destinations that are subject to LoadBalancerSourceRanges",
            ),
            (
                HAIRPIN_ENDPOINTS,
                format!("type {at} . {at}"),
                "endpoint IP . endpoint IP, to masquerade hairpin traffic",
            ),
        ] {
            let kind = if decl.contains(": verdict") {
                "map"
            } else {
                "set"
            };
            let _ = writeln!(
                s,
                "add {kind} {t} {name} {{ {decl} ; comment {} ; }}",
                quote(comment)
            );
        }
        let mut rule = |chain: &str, r: &str| {
            let _ = writeln!(s, "add rule {t} {chain} {r}");
        };
        let m = &self.res.masq_mark;
        rule(
            MARK_FOR_MASQUERADE,
            &format!("meta mark set meta mark or {m}"),
        );
        rule(
            MASQUERADING,
            &format!(
                "ct status dnat {fam} saddr . {fam} daddr @{HAIRPIN_ENDPOINTS} jump {MARK_FOR_MASQUERADE}"
            ),
        );
        rule(MASQUERADING, &format!("meta mark & {m} == 0 return"));
        rule(MASQUERADING, &format!("meta mark set meta mark xor {m}"));
        rule(MASQUERADING, "masquerade fully-random");
        rule(
            SERVICES,
            &format!("{fam} daddr . meta l4proto . th dport vmap @{SERVICE_IPS}"),
        );
        let nodeport_match = match &self.res.nodeport_ips {
            Some(_) => format!("{fam} daddr @{NODEPORT_IPS}"),
            None => {
                let lo = if fam == "ip" {
                    "127.0.0.0/8"
                } else {
                    "::1/128"
                };
                format!("fib daddr type local {fam} daddr != {lo}")
            }
        };
        rule(
            SERVICES,
            &format!("{nodeport_match} meta l4proto . th dport vmap @{SERVICE_NODEPORTS}"),
        );
        rule(
            SERVICE_ENDPOINTS_CHECK,
            &format!("{fam} daddr . meta l4proto . th dport vmap @{NO_ENDPOINT_SERVICES}"),
        );
        rule(
            NODEPORT_ENDPOINTS_CHECK,
            &format!("{nodeport_match} meta l4proto . th dport vmap @{NO_ENDPOINT_NODEPORTS}"),
        );
        rule(
            CLUSTER_IPS_CHECK,
            &format!(
                "{fam} daddr @{CLUSTER_IPS} reject comment {}",
                quote("Reject traffic to invalid ports of ClusterIPs")
            ),
        );
        rule(
            FIREWALL_CHECK,
            &format!("{fam} daddr . meta l4proto . th dport vmap @{FIREWALL_IPS}"),
        );
        rule(REJECT_CHAIN, "reject");
        rule(
            "filter-prerouting",
            &format!("ct state new jump {FIREWALL_CHECK}"),
        );
        rule(
            "filter-input",
            &format!("ct state new jump {NODEPORT_ENDPOINTS_CHECK}"),
        );
        rule(
            "filter-input",
            &format!("ct state new jump {SERVICE_ENDPOINTS_CHECK}"),
        );
        if !self.cfg.conntrack_tcp_liberal {
            rule("filter-forward", "ct state invalid drop");
        }
        rule(
            "filter-forward",
            &format!("ct state new jump {SERVICE_ENDPOINTS_CHECK}"),
        );
        rule(
            "filter-forward",
            &format!("ct state new jump {CLUSTER_IPS_CHECK}"),
        );
        rule(
            "filter-output",
            &format!("ct state new jump {SERVICE_ENDPOINTS_CHECK}"),
        );
        rule(
            "filter-output",
            &format!("ct state new jump {FIREWALL_CHECK}"),
        );
        rule(
            "filter-output-post-dnat",
            &format!("ct state new jump {CLUSTER_IPS_CHECK}"),
        );
        rule("nat-prerouting", &format!("jump {SERVICES}"));
        rule("nat-output", &format!("jump {SERVICES}"));
        rule("nat-postrouting", &format!("jump {MASQUERADING}"));
        if let Some(ips) = &self.res.nodeport_ips {
            if !ips.is_empty() {
                let list: Vec<String> = ips.iter().map(|ip| ip.to_string()).collect();
                let _ = writeln!(
                    s,
                    "add element {t} {NODEPORT_IPS} {{ {} }}",
                    list.join(", ")
                );
            }
        }
        s
    }

    /// Render a sync. `full` (also forced after `abort`) replaces the whole table.
    pub fn render(&mut self, model: &Model, full: bool) -> RenderOutput {
        let full = full || self.needs_full;
        let family = self.cfg.family;
        let t = format!("{} {TABLE}", self.res.fam);
        let mut out = RenderOutput::default();

        // Pass 1: which service ports changed. The model's change log names the
        // Services changed (or deleted) since the last render, so a sync costs what
        // changed, not the number of Services.
        let mut dirty: Vec<ServicePort> = Vec::new();
        let mut removed: Vec<ServicePortName> = Vec::new();
        let services = model.service_count();
        if model.current_generation() < self.seen_generation {
            // A renderer follows one model; a younger one (a new Model) starts over.
            self.seen_generation = 0;
            let gone: Vec<String> = self
                .svc_ports
                .keys()
                .filter(|k| model.service(k).is_none())
                .cloned()
                .collect();
            for k in gone {
                removed.extend(self.svc_ports.remove(&k).unwrap_or_default());
            }
        }
        let changed: Vec<String> = model
            .changed_since(self.seen_generation)
            .map(str::to_string)
            .collect();
        self.seen_generation = model.current_generation();
        for key in &changed {
            let old_ports = self.svc_ports.remove(key).unwrap_or_default();
            let mut new_ports = Vec::new();
            if let Some(svc) = model.service(key) {
                for sp in &svc.ports {
                    if sp.cluster_ip(family).is_none() {
                        continue;
                    }
                    new_ports.push(sp.name.clone());
                    dirty.push(sp.clone());
                }
            }
            removed.extend(old_ports.into_iter().filter(|p| !new_ports.contains(p)));
            if !new_ports.is_empty() {
                self.svc_ports.insert(key.clone(), new_ports);
            }
        }

        // Element keys touched this sync, with the value the kernel held before.
        let mut touched: HashMap<ElementKey, Option<String>, FnvBuild> = HashMap::default();
        let mut add_chains = String::new();
        let mut chain_rules = String::new();
        let mut add_sets = String::new();
        let mut del_chains = String::new();
        let mut del_sets = String::new();
        let mut written = 0usize;
        let mut deleted = 0usize;
        let mut changed_services: BTreeSet<String> = BTreeSet::new();

        let emit_rules = |text: &mut String, name: &str, rules: &[String]| {
            for r in rules {
                let _ = writeln!(text, "add rule {t} {name} {r}");
            }
        };

        // On a full sync every element is written anyway: no diff bookkeeping.
        let drop_owner = |elements: &mut HashMap<ElementKey, Owners, FnvBuild>,
                          touched: &mut HashMap<ElementKey, Option<String>, FnvBuild>,
                          id: u32,
                          set: &'static str,
                          key: &str| {
            let k = (set, key.to_string());
            if !full {
                touched
                    .entry(k.clone())
                    .or_insert_with(|| effective(elements.get(&k)));
            }
            if let Some(o) = elements.get_mut(&k) {
                o.retain(|(i, _)| *i != id);
                if o.is_empty() {
                    elements.remove(&k);
                }
            }
        };

        for sp in &dirty {
            let (rules, local_ready_ips) = self.render_port(sp, model);
            let id = match self.ids.get(&sp.name) {
                Some(id) => *id,
                None => {
                    self.next_id += 1;
                    self.ids.insert(sp.name.clone(), self.next_id);
                    self.next_id
                }
            };
            if let Some(v) = &rules.unsupported_algorithm {
                out.unsupported_algorithms
                    .push((sp.name.to_string(), v.clone()));
            }
            let new_hashes: HashMap<String, u64> = rules
                .chains
                .iter()
                .map(|(n, r)| (n.clone(), hash_lines(r)))
                .collect();
            let old = self.cache.remove(&sp.name);
            if let Some(old) = &old {
                self.totals.account(&sp.name, old, -1);
                conntrack::changed(
                    &mut out.conntrack,
                    family,
                    &old.port,
                    &old.rules.reachable,
                    sp,
                    &rules.reachable,
                );
                for (set, key, _) in &old.rules.elements {
                    drop_owner(&mut self.elements, &mut touched, id, set, key);
                }
                if !full {
                    for name in old.chain_hashes.keys() {
                        if !new_hashes.contains_key(name) {
                            let _ = writeln!(del_chains, "flush chain {t} {name}");
                            let _ = writeln!(del_chains, "delete chain {t} {name}");
                            deleted += 1;
                        }
                    }
                    for (name, _) in &old.rules.sets {
                        if !rules.sets.iter().any(|(n, _)| n == name) {
                            let _ = writeln!(del_sets, "delete set {t} {name}");
                        }
                    }
                }
            } else if !rules.reachable.is_empty() {
                conntrack::gained(&mut out.conntrack, family, sp);
            }
            for (set, key, value) in &rules.elements {
                let k = (*set, key.clone());
                if !full {
                    touched
                        .entry(k.clone())
                        .or_insert_with(|| effective(self.elements.get(&k)));
                }
                let owners = self.elements.entry(k).or_default();
                match owners.binary_search_by_key(&id, |(i, _)| *i) {
                    Ok(pos) => owners[pos].1 = value.clone(),
                    Err(pos) => owners.insert(pos, (id, value.clone())),
                }
            }
            if !full {
                for (name, decl) in &rules.sets {
                    let existed = old
                        .as_ref()
                        .is_some_and(|o| o.rules.sets.iter().any(|(n, _)| n == name));
                    if !existed {
                        let _ = writeln!(add_sets, "add set {t} {name} {{ {decl} }}");
                    }
                }
                for (name, r) in &rules.chains {
                    let old_hash = old.as_ref().and_then(|o| o.chain_hashes.get(name));
                    if old_hash == new_hashes.get(name) {
                        continue;
                    }
                    if old_hash.is_some() {
                        let _ = writeln!(chain_rules, "flush chain {t} {name}");
                    } else {
                        let _ = writeln!(add_chains, "add chain {t} {name}");
                    }
                    emit_rules(&mut chain_rules, name, r);
                    written += 1;
                    changed_services.insert(sp.name.service_key());
                }
            }
            if old.as_ref().map(|o| &o.rules) != Some(&rules) {
                changed_services.insert(sp.name.service_key());
            }
            let entry = CacheEntry {
                rules,
                chain_hashes: new_hashes,
                port: sp.clone(),
                local_ready_ips,
            };
            self.totals.account(&sp.name, &entry, 1);
            self.cache.insert(sp.name.clone(), entry);
        }
        for spn in &removed {
            let Some(old) = self.cache.remove(spn) else {
                continue;
            };
            self.totals.account(spn, &old, -1);
            changed_services.insert(spn.service_key());
            let id = self.ids.remove(spn).unwrap_or(0);
            for (set, key, _) in &old.rules.elements {
                drop_owner(&mut self.elements, &mut touched, id, set, key);
            }
            if !full {
                for name in old.chain_hashes.keys() {
                    let _ = writeln!(del_chains, "flush chain {t} {name}");
                    let _ = writeln!(del_chains, "delete chain {t} {name}");
                    deleted += 1;
                }
                for (name, _) in &old.rules.sets {
                    let _ = writeln!(del_sets, "delete set {t} {name}");
                }
            }
            conntrack::removed(&mut out.conntrack, family, &old.port);
        }

        let mut text = String::new();
        let (mut added_elements, mut deleted_elements) = (0usize, 0usize);
        if full {
            // Atomic replacement: whatever is in the table (ours, stale, or someone
            // else's) goes, in the same transaction that writes the new state.
            let _ = writeln!(text, "add table {t}");
            let _ = writeln!(text, "delete table {t}");
            let _ = writeln!(
                text,
                "add table {t} {{ comment {} ; }}",
                quote("rules for kube-proxy")
            );
            text.push_str(&self.static_part());
            let mut rules_text = String::new();
            for e in self.cache.values() {
                for (name, decl) in &e.rules.sets {
                    let _ = writeln!(text, "add set {t} {name} {{ {decl} }}");
                }
                for (name, r) in &e.rules.chains {
                    let _ = writeln!(text, "add chain {t} {name}");
                    emit_rules(&mut rules_text, name, r);
                    written += 1;
                }
            }
            text.push_str(&rules_text);
            let mut per_set: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();
            for ((set, key), owners) in &self.elements {
                if let Some((_, v)) = owners.first() {
                    per_set.entry(set).or_default().push(element(key, v));
                }
            }
            for (set, mut els) in per_set {
                els.sort();
                added_elements += els.len();
                // Chunks keep each command (and nft's error messages) bounded.
                for chunk in els.chunks(2000) {
                    let _ = writeln!(text, "add element {t} {set} {{ {} }}", chunk.join(", "));
                }
            }
        } else {
            let mut dels: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();
            let mut adds: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();
            for ((set, key), before) in &touched {
                let k = (*set, key.clone());
                let after = effective(self.elements.get(&k));
                if *before == after {
                    continue;
                }
                if before.is_some() {
                    dels.entry(set).or_default().push(key.clone());
                }
                if let Some(v) = after {
                    adds.entry(set).or_default().push(element(key, &v));
                }
            }
            text.push_str(&add_sets);
            text.push_str(&add_chains);
            text.push_str(&chain_rules);
            for (set, mut keys) in dels {
                keys.sort();
                deleted_elements += keys.len();
                let _ = writeln!(text, "delete element {t} {set} {{ {} }}", keys.join(", "));
            }
            for (set, mut els) in adds {
                els.sort();
                added_elements += els.len();
                let _ = writeln!(text, "add element {t} {set} {{ {} }}", els.join(", "));
            }
            text.push_str(&del_chains);
            text.push_str(&del_sets);
        }
        out.text = text;

        let mut hc: BTreeMap<u16, (String, BTreeSet<IpAddr>)> = BTreeMap::new();
        for spn in &self.totals.health_checked {
            let Some(e) = self.cache.get(spn) else {
                continue;
            };
            let entry = hc
                .entry(e.port.health_check_node_port)
                .or_insert_with(|| (spn.service_key(), BTreeSet::new()));
            entry.1.extend(e.local_ready_ips.iter().copied());
        }
        let tot = &self.totals;
        out.health_checks = hc
            .into_iter()
            .map(|(port, (service, ips))| HealthCheck {
                port,
                service,
                local_endpoints: ips.len(),
            })
            .collect();
        out.changed_services = changed_services.into_iter().collect();
        out.stats = RenderStats {
            full,
            services,
            service_ports: self.cache.len(),
            rendered_service_ports: dirty.len(),
            endpoints: tot.endpoints.max(0) as usize,
            chains: tot.chains.max(0) as usize,
            rules: tot.rules.max(0) as usize,
            elements: self.elements.len(),
            written_chains: written,
            deleted_chains: deleted,
            added_elements,
            deleted_elements,
            no_local_endpoints_internal: tot.no_local_internal.max(0) as usize,
            no_local_endpoints_external: tot.no_local_external.max(0) as usize,
        };
        // Until commit() says the transaction worked, the next render must be full.
        self.needs_full = true;
        out
    }

    /// The small, fixed chain whose listing the drift check compares (see
    /// `drift_probe`): `nft list chain <fam> kube-proxy services`.
    pub fn drift_probe(&self) -> (String, Vec<String>) {
        let fam = self.res.fam;
        let mut expect = vec![format!(
            "{fam} daddr . meta l4proto . th dport vmap @{SERVICE_IPS}"
        )];
        expect.push(format!("vmap @{SERVICE_NODEPORTS}"));
        (format!("{fam} {TABLE} {SERVICES}"), expect)
    }
}

fn element(key: &str, value: &str) -> String {
    if value.is_empty() {
        key.to_string()
    } else {
        format!("{key} : {value}")
    }
}

/// `--cleanup` (and leaving nftables mode): the transaction deleting both tables.
pub fn render_cleanup() -> String {
    let mut s = String::new();
    for fam in ["ip", "ip6"] {
        let _ = writeln!(s, "add table {fam} {TABLE}");
        let _ = writeln!(s, "delete table {fam} {TABLE}");
    }
    s
}

#[cfg(test)]
mod tests;
