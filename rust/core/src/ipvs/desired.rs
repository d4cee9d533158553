//! The service model as IPVS wants it, for one IP family, with upstream kube-proxy's
//! IPVS proxier layout: one virtual server per ClusterIP, externalIP, LoadBalancer IP
//! and (node IP, NodePort); the addresses to bind on kube-ipvs0; the members of
//! upstream's ipsets that the companion iptables rules match on; health check ports.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::{
    Destination, ServiceKey, VirtualServer, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP,
    IP_VS_SVC_F_PERSISTENT, IP_VS_SVC_F_SCHED1, IP_VS_SVC_F_SCHED2, IP_VS_SVC_F_SCHED3,
};
use crate::categorize::categorize;
use crate::conntrack::ConntrackCleanup;
use crate::error::{Error, Result};
use crate::model::{Model, Protocol};
use crate::net::Family;

pub const SCHEDULERS: &[&str] = &[
    "rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "fo", "ovf", "mh", "twos",
];

#[derive(Debug, Clone, Deserialize)]
pub struct IpvsConfig {
    pub family: Family,
    pub node_name: String,
    #[serde(default)]
    pub zone: Option<String>,
    #[serde(default = "default_scheduler")]
    pub scheduler: String,
    /// Node addresses NodePorts are served on (`--nodeport-addresses` applied).
    #[serde(default)]
    pub nodeport_ips: Vec<IpAddr>,
}

fn default_scheduler() -> String {
    "rr".into()
}

/// A scheduler spec, "name" or "name:flag,flag" (flags mh-fallback, mh-port,
/// sh-fallback, sh-port, flag-1, flag-2, flag-3), into (name, service flags).
pub fn parse_scheduler(spec: &str) -> Result<(String, u32)> {
    let (name, flags) = spec.split_once(':').unwrap_or((spec, ""));
    let name = name.trim();
    if !SCHEDULERS.contains(&name) {
        return Err(Error::config(
            "ipvs scheduler",
            format!(
                "unknown scheduler {name:?} (one of {})",
                SCHEDULERS.join(", ")
            ),
        ));
    }
    let mut bits = 0;
    for f in flags.split(',').map(str::trim).filter(|f| !f.is_empty()) {
        bits |= match f {
            "mh-fallback" | "sh-fallback" | "flag-1" => IP_VS_SVC_F_SCHED1,
            "mh-port" | "sh-port" | "flag-2" => IP_VS_SVC_F_SCHED2,
            "flag-3" => IP_VS_SVC_F_SCHED3,
            other => {
                return Err(Error::config(
                    "ipvs scheduler",
                    format!("unknown scheduler flag {other:?}"),
                ))
            }
        };
    }
    Ok((name.to_string(), bits))
}

/// ipset's limit on set names (IPSET_MAXNAMELEN - 1).
pub const IPSET_NAME_MAX: usize = 31;

pub fn ipproto(p: Protocol) -> u16 {
    match p {
        Protocol::Tcp => IPPROTO_TCP,
        Protocol::Udp => IPPROTO_UDP,
        Protocol::Sctp => IPPROTO_SCTP,
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Plan {
    pub services: Vec<(VirtualServer, Vec<Destination>)>,
    /// Addresses kube-ipvs0 must hold (ClusterIPs, externalIPs, LoadBalancer IPs).
    pub bind_addrs: BTreeSet<IpAddr>,
    /// Upstream's ipset name (IPv6 sets are "KUBE-6-...") -> members in ipset syntax.
    pub ipsets: BTreeMap<String, BTreeSet<String>>,
    /// Health check node port -> (Service "ns/name", local ready endpoints).
    pub health_checks: BTreeMap<u16, (String, usize)>,
    /// Service ports skipped, naming the object (e.g. an unknown scheduler).
    pub warnings: Vec<String>,
}

/// The part of a serialized `Plan` the reconciler needs (the binding passes plans
/// to Python as JSON and back).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct PlanServices {
    pub services: Vec<(VirtualServer, Vec<Destination>)>,
}

impl Plan {
    fn set(&mut self, family: Family, name: &str, member: String) {
        let name = match family {
            Family::V4 => name.to_string(),
            Family::V6 => {
                // As upstream: "KUBE-6-...", cut to ipset's 31 characters.
                let mut n = name.replacen("KUBE-", "KUBE-6-", 1);
                n.truncate(IPSET_NAME_MAX);
                n
            }
        };
        self.ipsets.entry(name).or_default().insert(member);
    }
}

fn ip_proto_port(ip: &IpAddr, p: Protocol, port: u16) -> String {
    format!("{ip},{}:{port}", p.lower())
}

fn dests(eps: &[crate::model::Endpoint]) -> Vec<Destination> {
    eps.iter()
        .map(|e| Destination::new(e.ip, e.port, 1))
        .collect()
}

/// The whole plan of a model for one family (the planner below keeps it up to date
/// incrementally; this is the reference and the debugging view).
pub fn plan(model: &Model, cfg: &IpvsConfig) -> Result<Plan> {
    let default_sched = parse_scheduler(&cfg.scheduler)?;
    let mut out = Plan::default();
    for svc in model.services() {
        let share = plan_service(model, svc, cfg, &default_sched);
        out.services.extend(share.services);
        out.bind_addrs.extend(share.bind_addrs);
        for (name, members) in share.ipsets {
            out.ipsets.entry(name).or_default().extend(members);
        }
        out.health_checks.extend(share.health_checks);
        out.warnings.extend(share.warnings);
    }
    Ok(out)
}

/// What one Service contributes to the plan (its virtual servers, addresses, ipset
/// members, health check ports and warnings).
fn plan_service(
    model: &Model,
    svc: &crate::model::Service,
    cfg: &IpvsConfig,
    default_sched: &(String, u32),
) -> Plan {
    let mut out = Plan::default();
    let fam = cfg.family;
    let of_family = |ip: &&IpAddr| Family::of(ip) == fam;
    for sp in &svc.ports {
        let Some(cip) = sp.cluster_ip(fam) else {
            continue;
        };
        let (sched, mut flags) = match sp.ipvs_scheduler.as_deref() {
            None | Some("") => default_sched.clone(),
            Some(spec) => match parse_scheduler(spec) {
                Ok(s) => s,
                Err(e) => {
                    out.warnings.push(format!(
                        "Service {}: metadata.annotations[{}]: {e}; using {}",
                        svc.key,
                        crate::model::ANNOTATION_IPVS_SCHEDULER,
                        default_sched.0
                    ));
                    default_sched.clone()
                }
            },
        };
        let mut timeout = 0;
        if let Some(t) = sp.affinity_timeout {
            flags |= IP_VS_SVC_F_PERSISTENT;
            timeout = t;
        }
        let eps = model.endpoints(&sp.name, fam);
        let cat = categorize(&eps, sp, &cfg.node_name, cfg.zone.as_deref());
        let internal = dests(if sp.internal_policy_local {
            &cat.local
        } else {
            &cat.cluster
        });
        let external = dests(if sp.external_policy_local {
            &cat.local
        } else {
            &cat.cluster
        });
        let proto = ipproto(sp.name.protocol);
        let p = sp.name.protocol;
        let add = |out: &mut Plan, addr: IpAddr, port: u16, ds: &Vec<Destination>| {
            out.services.push((
                VirtualServer {
                    key: ServiceKey {
                        addr,
                        protocol: proto,
                        port,
                        fwmark: 0,
                    },
                    scheduler: sched.clone(),
                    flags,
                    timeout,
                },
                ds.clone(),
            ));
        };
        add(&mut out, cip, sp.port, &internal);
        out.bind_addrs.insert(cip);
        out.set(fam, "KUBE-CLUSTER-IP", ip_proto_port(&cip, p, sp.port));
        for ip in sp.external_ips.iter().filter(of_family) {
            add(&mut out, *ip, sp.port, &external);
            out.bind_addrs.insert(*ip);
            let m = ip_proto_port(ip, p, sp.port);
            if sp.external_policy_local {
                out.set(fam, "KUBE-EXTERNAL-IP-LOCAL", m.clone());
            }
            out.set(fam, "KUBE-EXTERNAL-IP", m);
        }
        for ip in sp.load_balancer_ips.iter().filter(of_family) {
            add(&mut out, *ip, sp.port, &external);
            out.bind_addrs.insert(*ip);
            let m = ip_proto_port(ip, p, sp.port);
            out.set(fam, "KUBE-LOAD-BALANCER", m.clone());
            if sp.external_policy_local {
                out.set(fam, "KUBE-LOAD-BALANCER-LOCAL", m.clone());
            }
            let ranges: Vec<_> = sp
                .load_balancer_source_ranges
                .iter()
                .filter(|c| c.family() == fam)
                .collect();
            if !ranges.is_empty() {
                out.set(fam, "KUBE-LOAD-BALANCER-FW", m.clone());
                for c in ranges {
                    out.set(fam, "KUBE-LOAD-BALANCER-SOURCE-CIDR", format!("{m},{c}"));
                }
                // Endpoints reaching their own LB IP (hairpin) pass the firewall.
                for d in &external {
                    out.set(
                        fam,
                        "KUBE-LOAD-BALANCER-SOURCE-IP",
                        format!("{m},{}", d.addr),
                    );
                }
            }
        }
        if sp.node_port != 0 {
            for ip in cfg.nodeport_ips.iter().filter(of_family) {
                add(&mut out, *ip, sp.node_port, &external);
            }
            let (set, member) = match p {
                Protocol::Tcp => ("KUBE-NODE-PORT-TCP", sp.node_port.to_string()),
                Protocol::Udp => ("KUBE-NODE-PORT-UDP", sp.node_port.to_string()),
                Protocol::Sctp => (
                    "KUBE-NODE-PORT-SCTP-HASH",
                    format!("{},sctp:{}", cip, sp.node_port),
                ),
            };
            if sp.external_policy_local {
                let local = set.replacen("KUBE-NODE-PORT-", "KUBE-NODE-PORT-LOCAL-", 1);
                out.set(fam, &local, member.clone());
            }
            out.set(fam, set, member);
        }
        if sp.external_policy_local && sp.health_check_node_port != 0 {
            let ready = cat.local.iter().filter(|e| e.ready).count();
            out.health_checks
                .insert(sp.health_check_node_port, (svc.key.clone(), ready));
            out.set(
                fam,
                "KUBE-HEALTH-CHECK-NODE-PORT",
                sp.health_check_node_port.to_string(),
            );
        }
        for e in cat.all_reachable.iter() {
            out.set(
                fam,
                "KUBE-LOOP-BACK",
                format!("{},{}:{},{}", e.ip, p.lower(), e.port, e.ip),
            );
        }
    }
    for ip in &out.bind_addrs.clone() {
        out.set(fam, "KUBE-IPVS-IPS", ip.to_string());
    }
    out
}

/// A virtual server with its real servers, as the reconciler programs it.
pub type Desired = (VirtualServer, Vec<Destination>);

/// What a sync changes, from the planner: the virtual servers to (re)program, and
/// the additions and removals of kube-ipvs0 addresses and ipset members. On a full
/// plan, `bind_add` and `ipset_add` hold everything and the removals are empty (the
/// caller replaces what it holds).
#[derive(Debug, Clone, Default, Serialize)]
pub struct PlanDelta {
    pub full: bool,
    /// Changed virtual servers: Some(desired) or None (no longer wanted). On a full
    /// plan, every desired virtual server.
    #[serde(skip)]
    pub services: Vec<(ServiceKey, Option<Desired>)>,
    pub bind_add: Vec<IpAddr>,
    pub bind_del: Vec<IpAddr>,
    pub ipset_add: BTreeMap<String, Vec<String>>,
    pub ipset_del: BTreeMap<String, Vec<String>>,
    /// Every health check node port, when any changed (None: unchanged).
    pub health_checks: Option<BTreeMap<u16, (String, usize)>>,
    pub warnings: Vec<String>,
    /// UDP conntrack entries made stale (a UDP virtual server gained its first real
    /// server, or lost one), to clear once the change is programmed.
    pub conntrack: Vec<ConntrackCleanup>,
    /// Services planned by this sync.
    pub replanned: usize,
}

/// Keeps the plan of every Service and, per sync, re-plans only the Services the
/// model's change log names: a one-endpoint change costs O(that Service), not a
/// walk over every Service. Members shared between Services (an externalIP on two
/// Services, an endpoint behind two ports) are reference-counted, so a Service
/// going away removes only what no other Service still needs.
#[derive(Debug, Default)]
pub struct Planner {
    /// The config of the last plan; any change re-plans everything.
    config: Option<String>,
    seen: u64,
    shares: HashMap<String, Plan>,
    /// Virtual server -> Services wanting it (the last one by key wins, as the
    /// whole plan's order does).
    owners: HashMap<ServiceKey, BTreeSet<String>>,
    desired: HashMap<ServiceKey, Desired>,
    bind_refs: HashMap<IpAddr, usize>,
    ipset_refs: HashMap<(String, String), usize>,
    health: BTreeMap<u16, (String, usize)>,
}

impl Planner {
    pub fn new() -> Self {
        Self::default()
    }

    /// Every desired virtual server (for a full reconcile).
    pub fn desired(&self) -> impl Iterator<Item = &Desired> {
        self.desired.values()
    }

    /// The kube-ipvs0 addresses currently wanted.
    pub fn bind_addrs(&self) -> impl Iterator<Item = &IpAddr> {
        self.bind_refs.keys()
    }

    /// Forget everything: the next plan is full.
    pub fn invalidate(&mut self) {
        self.config = None;
    }

    /// Plan the Services changed since the last call (all of them when `full`, on the
    /// first call, or when the config changed).
    pub fn plan(&mut self, model: &Model, cfg: &IpvsConfig, full: bool) -> Result<PlanDelta> {
        let default_sched = parse_scheduler(&cfg.scheduler)?;
        let cfg_key = format!("{cfg:?}");
        let full = full || self.config.as_deref() != Some(cfg_key.as_str());
        let mut delta = PlanDelta {
            full,
            ..Default::default()
        };
        let changed: Vec<String> = if full {
            let mut keys: BTreeSet<String> = self.shares.keys().cloned().collect();
            keys.extend(model.services().map(|s| s.key.clone()));
            keys.into_iter().collect()
        } else {
            model.changed_since(self.seen).map(str::to_string).collect()
        };
        self.seen = model.current_generation();
        if full {
            self.bind_refs.clear();
            self.ipset_refs.clear();
            self.health.clear();
            self.owners.clear();
        }
        let mut affected: BTreeSet<ServiceKey> = BTreeSet::new();
        let mut bind_touched: BTreeSet<IpAddr> = BTreeSet::new();
        let mut bind_before: HashMap<IpAddr, bool> = HashMap::new();
        let mut sets_before: HashMap<(String, String), bool> = HashMap::new();
        let mut health_changed = full;
        for key in &changed {
            let old = self.shares.remove(key);
            let new = model
                .service(key)
                .map(|svc| plan_service(model, svc, cfg, &default_sched));
            if let Some(old) = &old {
                for (vs, _) in &old.services {
                    affected.insert(vs.key.clone());
                    if !full {
                        if let Some(o) = self.owners.get_mut(&vs.key) {
                            o.remove(key);
                            if o.is_empty() {
                                self.owners.remove(&vs.key);
                            }
                        }
                    }
                }
                if !full {
                    for ip in &old.bind_addrs {
                        bind_before
                            .entry(*ip)
                            .or_insert_with(|| self.bind_refs.contains_key(ip));
                        bind_touched.insert(*ip);
                        release(&mut self.bind_refs, ip);
                    }
                    for (name, members) in &old.ipsets {
                        for m in members {
                            let id = (name.clone(), m.clone());
                            sets_before
                                .entry(id.clone())
                                .or_insert_with(|| self.ipset_refs.contains_key(&id));
                            release(&mut self.ipset_refs, &id);
                        }
                    }
                    for port in old.health_checks.keys() {
                        self.health.remove(port);
                        health_changed = true;
                    }
                }
            }
            let Some(new) = new else { continue };
            delta.replanned += 1;
            delta.warnings.extend(new.warnings.iter().cloned());
            for (vs, _) in &new.services {
                affected.insert(vs.key.clone());
                self.owners
                    .entry(vs.key.clone())
                    .or_default()
                    .insert(key.clone());
            }
            for ip in &new.bind_addrs {
                if !full {
                    bind_before
                        .entry(*ip)
                        .or_insert_with(|| self.bind_refs.contains_key(ip));
                }
                bind_touched.insert(*ip);
                *self.bind_refs.entry(*ip).or_default() += 1;
            }
            for (name, members) in &new.ipsets {
                for m in members {
                    let id = (name.clone(), m.clone());
                    if !full {
                        sets_before
                            .entry(id.clone())
                            .or_insert_with(|| self.ipset_refs.contains_key(&id));
                    }
                    *self.ipset_refs.entry(id).or_default() += 1;
                }
            }
            if !new.health_checks.is_empty() {
                health_changed = true;
                self.health.extend(new.health_checks.clone());
            }
            self.shares.insert(key.clone(), new);
        }
        if full {
            let old_desired = std::mem::take(&mut self.desired);
            affected.extend(old_desired.keys().cloned());
            for key in affected {
                let new = self.resolve(&key);
                conntrack_of(&mut delta.conntrack, old_desired.get(&key), new.as_ref());
                if let Some(n) = new {
                    self.desired.insert(key.clone(), n.clone());
                    delta.services.push((key, Some(n)));
                }
            }
            let mut binds: Vec<IpAddr> = self.bind_refs.keys().copied().collect();
            binds.sort();
            delta.bind_add = binds;
            for (name, m) in self.ipset_refs.keys() {
                delta
                    .ipset_add
                    .entry(name.clone())
                    .or_default()
                    .push(m.clone());
            }
        } else {
            for key in affected {
                let new = self.resolve(&key);
                let old = self.desired.get(&key);
                if old == new.as_ref() {
                    continue;
                }
                conntrack_of(&mut delta.conntrack, old, new.as_ref());
                match &new {
                    Some(n) => self.desired.insert(key.clone(), n.clone()),
                    None => self.desired.remove(&key),
                };
                delta.services.push((key, new));
            }
            for ip in bind_touched {
                let before = bind_before.get(&ip).copied().unwrap_or(false);
                let now = self.bind_refs.contains_key(&ip);
                if now && !before {
                    delta.bind_add.push(ip);
                } else if before && !now {
                    delta.bind_del.push(ip);
                }
            }
            for (id, before) in sets_before {
                let now = self.ipset_refs.contains_key(&id);
                let side = match (before, now) {
                    (false, true) => &mut delta.ipset_add,
                    (true, false) => &mut delta.ipset_del,
                    _ => continue,
                };
                side.entry(id.0).or_default().push(id.1);
            }
        }
        for members in delta
            .ipset_add
            .values_mut()
            .chain(delta.ipset_del.values_mut())
        {
            members.sort();
        }
        if health_changed {
            delta.health_checks = Some(self.health.clone());
        }
        self.config = Some(cfg_key);
        Ok(delta)
    }

    /// The virtual server `key` as its last owning Service (by key) wants it.
    fn resolve(&self, key: &ServiceKey) -> Option<Desired> {
        let owner = self.owners.get(key)?.iter().next_back()?;
        self.shares
            .get(owner)?
            .services
            .iter()
            .rev()
            .find(|(vs, _)| vs.key == *key)
            .cloned()
    }
}

fn release<K: std::hash::Hash + Eq>(refs: &mut HashMap<K, usize>, k: &K) {
    if let Some(n) = refs.get_mut(k) {
        *n -= 1;
        if *n == 0 {
            refs.remove(k);
        }
    }
}

/// As upstream's ipvs proxier: a UDP virtual server that gained its first real
/// server has its stale entries cleared (they blackholed clients resending from the
/// same port), and flows to a UDP real server that went away are cleared.
fn conntrack_of(out: &mut Vec<ConntrackCleanup>, old: Option<&Desired>, new: Option<&Desired>) {
    let Some((vs, dests)) = new else { return };
    if vs.key.protocol != IPPROTO_UDP {
        return;
    }
    let old: &[Destination] = old.map(|o| o.1.as_slice()).unwrap_or(&[]);
    let entry = |kind: &str, endpoint_ip: Option<String>| ConntrackCleanup {
        kind: kind.into(),
        ip: Some(vs.key.addr.to_string()),
        port: vs.key.port,
        endpoint_ip,
        protocol: "udp".into(),
    };
    if !dests.is_empty() && old.is_empty() {
        out.push(entry("service-ip", None));
    }
    for o in old {
        if !dests.iter().any(|d| d.id() == o.id()) {
            out.push(entry("endpoint", Some(o.addr.to_string())));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheduler_specs() {
        assert_eq!(parse_scheduler("rr").unwrap(), ("rr".into(), 0));
        assert_eq!(
            parse_scheduler("mh:mh-fallback,mh-port").unwrap(),
            ("mh".into(), IP_VS_SVC_F_SCHED1 | IP_VS_SVC_F_SCHED2)
        );
        assert!(parse_scheduler("bogus").is_err());
        assert!(parse_scheduler("mh:nope").is_err());
    }

    #[test]
    fn plan_of_a_clusterip_service_with_affinity() {
        let mut m = Model::new();
        let svc = serde_json::json!({
            "kind": "Service", "metadata": {"name": "web", "namespace": "default",
              "annotations": {"kproxy.io/ipvs-scheduler": "mh:mh-port"}},
            "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"], "type": "NodePort",
              "sessionAffinity": "ClientIP",
              "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}},
              "ports": [{"port": 80, "targetPort": 8080, "protocol": "TCP", "nodePort": 30080}]}
        });
        m.set_service("default/web", Some(&svc)).unwrap();
        let slice = serde_json::json!({
            "kind": "EndpointSlice", "metadata": {"name": "web-abc", "namespace": "default",
              "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.244.0.5"], "conditions": {"ready": true}, "nodeName": "n1"}],
            "ports": [{"port": 8080, "protocol": "TCP", "name": ""}]
        });
        m.set_endpoint_slice("default/web-abc", Some(&slice))
            .unwrap();
        let cfg = IpvsConfig {
            family: Family::V4,
            node_name: "n1".into(),
            zone: None,
            scheduler: "rr".into(),
            nodeport_ips: vec!["172.18.0.2".parse().unwrap()],
        };
        let p = plan(&m, &cfg).unwrap();
        assert_eq!(p.services.len(), 2);
        let (vs, ds) = &p.services[0];
        assert_eq!(vs.scheduler, "mh");
        assert_eq!(vs.flags, IP_VS_SVC_F_PERSISTENT | IP_VS_SVC_F_SCHED2);
        assert_eq!(vs.timeout, 60);
        assert_eq!(ds.len(), 1);
        assert_eq!(p.services[1].0.key.port, 30080);
        assert!(p.ipsets["KUBE-CLUSTER-IP"].contains("10.96.0.10,tcp:80"));
        assert!(p.ipsets["KUBE-NODE-PORT-TCP"].contains("30080"));
        assert!(p.ipsets["KUBE-LOOP-BACK"].contains("10.244.0.5,tcp:8080,10.244.0.5"));
        assert_eq!(p.bind_addrs.len(), 1);
    }

    fn svc(name: &str, ip: &str, ext: &[&str], proto: &str) -> serde_json::Value {
        serde_json::json!({
            "kind": "Service", "metadata": {"name": name, "namespace": "ns"},
            "spec": {"clusterIP": ip, "clusterIPs": [ip], "type": "ClusterIP",
              "externalIPs": ext,
              "ports": [{"port": 80, "targetPort": 8080, "protocol": proto}]}
        })
    }

    fn slice(name: &str, ips: &[&str], proto: &str) -> serde_json::Value {
        let eps: Vec<_> = ips
            .iter()
            .map(|ip| serde_json::json!({"addresses": [ip], "conditions": {"ready": true}, "nodeName": "n1"}))
            .collect();
        serde_json::json!({
            "kind": "EndpointSlice", "metadata": {"name": format!("{name}-x"), "namespace": "ns",
              "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4", "endpoints": eps,
            "ports": [{"port": 8080, "protocol": proto, "name": ""}]
        })
    }

    fn cfg() -> IpvsConfig {
        IpvsConfig {
            family: Family::V4,
            node_name: "n1".into(),
            zone: None,
            scheduler: "rr".into(),
            nodeport_ips: vec![],
        }
    }

    /// What the planner holds after partial plans equals a whole plan of the model.
    fn assert_matches_whole_plan(p: &Planner, m: &Model) {
        let whole = plan(m, &cfg()).unwrap();
        let mut want: BTreeMap<ServiceKey, Desired> = BTreeMap::new();
        for (vs, ds) in whole.services {
            want.insert(vs.key.clone(), (vs, ds));
        }
        let have: BTreeMap<ServiceKey, Desired> = p
            .desired
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        assert_eq!(have, want);
        let binds: BTreeSet<IpAddr> = p.bind_refs.keys().copied().collect();
        assert_eq!(binds, whole.bind_addrs);
        let mut sets: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (name, m) in p.ipset_refs.keys() {
            sets.entry(name.clone()).or_default().insert(m.clone());
        }
        assert_eq!(sets, whole.ipsets);
    }

    #[test]
    fn planner_replans_only_changed_services_and_counts_shared_members() {
        let mut m = Model::new();
        for i in 0..50 {
            let name = format!("s{i}");
            let ip = format!("10.96.0.{}", i + 1);
            m.set_service(&format!("ns/{name}"), Some(&svc(&name, &ip, &[], "TCP")))
                .unwrap();
            m.set_endpoint_slice(
                &format!("ns/{name}-x"),
                Some(&slice(&name, &["10.244.0.1", "10.244.0.2"], "TCP")),
            )
            .unwrap();
        }
        // Two Services share an externalIP:port (the later key wins, as in plan()).
        m.set_service("ns/a", Some(&svc("a", "10.96.1.1", &["192.0.2.9"], "TCP")))
            .unwrap();
        m.set_service("ns/b", Some(&svc("b", "10.96.1.2", &["192.0.2.9"], "TCP")))
            .unwrap();
        m.set_endpoint_slice("ns/b-x", Some(&slice("b", &["10.244.9.9"], "TCP")))
            .unwrap();
        let mut p = Planner::new();
        let d = p.plan(&m, &cfg(), false).unwrap();
        assert!(d.full);
        assert_eq!(d.replanned, 52);
        assert_matches_whole_plan(&p, &m);
        // Nothing changed: nothing planned.
        let d = p.plan(&m, &cfg(), false).unwrap();
        assert!(!d.full);
        assert_eq!(d.replanned, 0);
        assert!(d.services.is_empty() && d.bind_add.is_empty() && d.ipset_add.is_empty());
        // One endpoint replaced: one Service planned, one virtual server changed.
        m.set_endpoint_slice(
            "ns/s7-x",
            Some(&slice("s7", &["10.244.0.1", "10.244.0.3"], "TCP")),
        )
        .unwrap();
        let d = p.plan(&m, &cfg(), false).unwrap();
        assert_eq!(d.replanned, 1);
        assert_eq!(d.services.len(), 1);
        assert_eq!(d.services[0].1.as_ref().unwrap().1.len(), 2);
        assert_eq!(
            d.ipset_add["KUBE-LOOP-BACK"],
            vec!["10.244.0.3,tcp:8080,10.244.0.3"]
        );
        // 10.244.0.2 is still behind 49 other Services: not removed from the set.
        assert!(d.ipset_del.is_empty(), "{:?}", d.ipset_del);
        assert_matches_whole_plan(&p, &m);
        // b goes: the shared externalIP stays (a wants it) with a's real servers.
        m.set_service("ns/b", None).unwrap();
        let d = p.plan(&m, &cfg(), false).unwrap();
        assert_eq!(d.bind_del, vec!["10.96.1.2".parse::<IpAddr>().unwrap()]);
        let ext = d
            .services
            .iter()
            .find(|(k, _)| k.addr.to_string() == "192.0.2.9")
            .unwrap();
        assert_eq!(ext.1.as_ref().unwrap().1.len(), 0);
        assert!(d
            .services
            .iter()
            .any(|(k, v)| k.addr.to_string() == "10.96.1.2" && v.is_none()));
        assert!(!d.ipset_del.contains_key("KUBE-EXTERNAL-IP"));
        assert_matches_whole_plan(&p, &m);
        // a goes too: now the externalIP is released.
        m.set_service("ns/a", None).unwrap();
        let d = p.plan(&m, &cfg(), false).unwrap();
        assert!(d.bind_del.contains(&"192.0.2.9".parse::<IpAddr>().unwrap()));
        assert_eq!(d.ipset_del["KUBE-EXTERNAL-IP"], vec!["192.0.2.9,tcp:80"]);
        assert_matches_whole_plan(&p, &m);
        // A config change re-plans everything.
        let mut c = cfg();
        c.scheduler = "wrr".into();
        let d = p.plan(&m, &c, false).unwrap();
        assert!(d.full);
        assert!(d
            .services
            .iter()
            .all(|(_, v)| v.as_ref().unwrap().0.scheduler == "wrr"));
    }

    #[test]
    fn ipv6_set_names_as_upstream() {
        let mut p = Plan::default();
        p.set(Family::V6, "KUBE-CLUSTER-IP", "x".into());
        p.set(Family::V6, "KUBE-LOAD-BALANCER-SOURCE-CIDR", "y".into());
        p.set(Family::V6, "KUBE-NODE-PORT-LOCAL-SCTP-HASH", "z".into());
        let names: Vec<&str> = p.ipsets.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            [
                "KUBE-6-CLUSTER-IP",
                "KUBE-6-LOAD-BALANCER-SOURCE-CID",
                "KUBE-6-NODE-PORT-LOCAL-SCTP-HAS"
            ]
        );
    }

    #[test]
    fn udp_conntrack_on_first_real_server_and_removed_ones() {
        let mut m = Model::new();
        m.set_service("ns/dns", Some(&svc("dns", "10.96.0.10", &[], "UDP")))
            .unwrap();
        let mut p = Planner::new();
        let d = p.plan(&m, &cfg(), false).unwrap();
        assert!(d.conntrack.is_empty());
        m.set_endpoint_slice(
            "ns/dns-x",
            Some(&slice("dns", &["10.244.0.1", "10.244.0.2"], "UDP")),
        )
        .unwrap();
        let d = p.plan(&m, &cfg(), false).unwrap();
        assert_eq!(d.conntrack.len(), 1);
        assert_eq!(d.conntrack[0].kind, "service-ip");
        m.set_endpoint_slice("ns/dns-x", Some(&slice("dns", &["10.244.0.1"], "UDP")))
            .unwrap();
        let d = p.plan(&m, &cfg(), false).unwrap();
        assert_eq!(d.conntrack.len(), 1);
        assert_eq!(d.conntrack[0].kind, "endpoint");
        assert_eq!(d.conntrack[0].endpoint_ip.as_deref(), Some("10.244.0.2"));
    }
}
