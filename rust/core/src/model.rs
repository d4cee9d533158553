//! The service/endpoint model: Services become service ports, EndpointSlices are
//! merged per Service, with upstream kube-proxy's skipping rules and condition defaults.
//!
//! Objects arrive as the JSON of the Kubernetes API (what a watch or a manifest gives);
//! parsing is done by hand so every error can name the object and the field.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::IpAddr;

use serde::Serialize;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::net::{join_host_port, parse_ip, Cidr, Family};

/// Label that hands a Service to another proxy (upstream's informer selector skips it).
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// Label on EndpointSlices of headless Services (skipped by upstream's selector).
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
pub const ANNOTATION_LB_ALGORITHM: &str = "kproxy.io/lb-algorithm";
pub const ANNOTATION_IPVS_SCHEDULER: &str = "kproxy.io/ipvs-scheduler";
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10800;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Protocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    #[serde(rename = "SCTP")]
    Sctp,
}

impl Protocol {
    pub fn parse(s: &str) -> Option<Protocol> {
        match s {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }

    pub fn lower(&self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }

    pub fn upper(&self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

/// Identifies one port of one Service, as upstream's ServicePortName.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ServicePortName {
    pub namespace: String,
    pub name: String,
    pub port: String,
    pub protocol: Protocol,
}

impl ServicePortName {
    pub fn service_key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

impl fmt::Display for ServicePortName {
    /// "ns/name:port" (":port" only when the port is named), as upstream.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.port.is_empty() {
            write!(f, "{}/{}", self.namespace, self.name)
        } else {
            write!(f, "{}/{}:{}", self.namespace, self.name, self.port)
        }
    }
}

/// One service port with everything the dataplanes need.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServicePort {
    pub name: ServicePortName,
    pub cluster_ips: Vec<IpAddr>,
    pub port: u16,
    pub node_port: u16,
    pub external_ips: Vec<IpAddr>,
    pub load_balancer_ips: Vec<IpAddr>,
    #[serde(serialize_with = "ser_cidrs")]
    pub load_balancer_source_ranges: Vec<Cidr>,
    /// ClientIP session affinity timeout in seconds, when affinity is on.
    pub affinity_timeout: Option<u32>,
    pub external_policy_local: bool,
    pub internal_policy_local: bool,
    pub health_check_node_port: u16,
    pub lb_algorithm: Option<String>,
    pub ipvs_scheduler: Option<String>,
}

fn ser_cidrs<S: serde::Serializer>(v: &[Cidr], s: S) -> std::result::Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(|c| c.to_string()))
}

impl ServicePort {
    /// NodePort, LoadBalancer IPs or externalIPs: reachable from outside the cluster.
    pub fn externally_accessible(&self) -> bool {
        self.node_port != 0 || !self.load_balancer_ips.is_empty() || !self.external_ips.is_empty()
    }

    /// Cluster endpoints are needed for ITP Cluster, and for any external access
    /// (even with ETP Local, to short-circuit pod and node traffic).
    pub fn uses_cluster_endpoints(&self) -> bool {
        !self.internal_policy_local || self.externally_accessible()
    }

    pub fn uses_local_endpoints(&self) -> bool {
        self.internal_policy_local || (self.external_policy_local && self.externally_accessible())
    }

    pub fn cluster_ip(&self, family: Family) -> Option<IpAddr> {
        self.cluster_ips
            .iter()
            .copied()
            .find(|ip| Family::of(ip) == family)
    }
}

/// One endpoint of one service port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub port: u16,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node_name: Option<String>,
    pub zone: Option<String>,
    pub zone_hints: Vec<String>,
    pub node_hints: Vec<String>,
}

impl Endpoint {
    /// "ip:port" (IPv6 bracketed), the endpoint's identity in chain names and logs.
    pub fn addr(&self) -> String {
        join_host_port(&self.ip, self.port)
    }

    pub fn is_local(&self, node_name: &str) -> bool {
        self.node_name.as_deref() == Some(node_name)
    }
}

/// A Service as kproxy keeps it: its ports, or nothing when it is skipped.
#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    pub key: String,
    pub ports: Vec<ServicePort>,
}

/// Endpoints an EndpointSlice contributes, per service port.
#[derive(Debug, Clone, PartialEq)]
pub struct Slice {
    pub service_key: String,
    pub family: Family,
    pub ports: Vec<(String, Protocol, Vec<Endpoint>)>,
}

impl Slice {
    fn endpoint_count(&self) -> usize {
        self.ports.iter().map(|(_, _, eps)| eps.len()).sum()
    }
}

fn get<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    if cur.is_null() {
        None
    } else {
        Some(cur)
    }
}

fn get_str<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    get(v, path).and_then(|x| x.as_str())
}

fn object_key(v: &Value) -> Option<String> {
    let name = get_str(v, &["metadata", "name"])?;
    let ns = get_str(v, &["metadata", "namespace"]).unwrap_or("default");
    Some(format!("{ns}/{name}"))
}

fn port_number(v: &Value) -> Option<i64> {
    v.as_i64()
}

/// The result of reading one object: its value (None = skipped, as upstream skips it)
/// and warnings naming fields that were dropped.
pub struct Parsed<T> {
    pub value: Option<T>,
    pub warnings: Vec<Error>,
}

/// Read a v1 Service. An error means the Service cannot be used at all; warnings
/// mean parts of it (one bad externalIP, one bad port) were dropped.
pub fn parse_service(obj: &Value) -> Result<Parsed<Service>> {
    let key = object_key(obj)
        .ok_or_else(|| Error::object("Service", "<unnamed>", "metadata.name", "missing"))?;
    let err = |field: &str, msg: String| Error::object("Service", &key, field, msg);
    let mut warnings = Vec::new();
    let skipped = Parsed {
        value: None,
        warnings: Vec::new(),
    };

    if get(obj, &["metadata", "labels", LABEL_SERVICE_PROXY_NAME]).is_some() {
        return Ok(skipped);
    }
    let spec = match get(obj, &["spec"]) {
        Some(s) => s,
        None => return Err(err("spec", "missing".into())),
    };
    let svc_type = get_str(spec, &["type"]).unwrap_or("ClusterIP");
    if svc_type == "ExternalName" {
        return Ok(skipped);
    }
    // clusterIPs (dual-stack) wins over clusterIP, as the API server keeps them in step.
    let mut raw_ips: Vec<&str> = Vec::new();
    if let Some(list) = get(spec, &["clusterIPs"]).and_then(|v| v.as_array()) {
        for ip in list {
            if let Some(s) = ip.as_str() {
                raw_ips.push(s);
            }
        }
    }
    if raw_ips.is_empty() {
        if let Some(ip) = get_str(spec, &["clusterIP"]) {
            raw_ips.push(ip);
        }
    }
    if raw_ips.is_empty() || raw_ips.iter().any(|ip| *ip == "None" || ip.is_empty()) {
        // Headless or not yet allocated: upstream's ShouldSkipService.
        return Ok(skipped);
    }
    let mut cluster_ips = Vec::new();
    for (i, raw) in raw_ips.iter().enumerate() {
        match parse_ip(raw) {
            Some(ip) => cluster_ips.push(ip),
            None => {
                return Err(err(
                    &format!("spec.clusterIPs[{i}]"),
                    format!("invalid IP address {raw:?}"),
                ))
            }
        }
    }

    let mut external_ips = Vec::new();
    if let Some(list) = get(spec, &["externalIPs"]).and_then(|v| v.as_array()) {
        for (i, ip) in list.iter().enumerate() {
            match ip.as_str().and_then(parse_ip) {
                Some(a) => external_ips.push(a),
                None => warnings.push(err(
                    &format!("spec.externalIPs[{i}]"),
                    format!("invalid IP address {ip}, ignored"),
                )),
            }
        }
    }
    let mut load_balancer_ips = Vec::new();
    if svc_type == "LoadBalancer" {
        if let Some(list) =
            get(obj, &["status", "loadBalancer", "ingress"]).and_then(|v| v.as_array())
        {
            for (i, ing) in list.iter().enumerate() {
                let Some(raw) = get_str(ing, &["ip"]) else {
                    continue;
                };
                // ipMode Proxy: the load balancer delivers to the node, not to the VIP.
                if get_str(ing, &["ipMode"]) == Some("Proxy") {
                    continue;
                }
                match parse_ip(raw) {
                    Some(a) => load_balancer_ips.push(a),
                    None => warnings.push(err(
                        &format!("status.loadBalancer.ingress[{i}].ip"),
                        format!("invalid IP address {raw:?}, ignored"),
                    )),
                }
            }
        }
    }
    let mut load_balancer_source_ranges = Vec::new();
    if let Some(list) = get(spec, &["loadBalancerSourceRanges"]).and_then(|v| v.as_array()) {
        for (i, r) in list.iter().enumerate() {
            match r.as_str().and_then(Cidr::parse) {
                Some(c) => load_balancer_source_ranges.push(c),
                None => warnings.push(err(
                    &format!("spec.loadBalancerSourceRanges[{i}]"),
                    format!("invalid CIDR {r}, ignored"),
                )),
            }
        }
    }
    let affinity_timeout = if get_str(spec, &["sessionAffinity"]) == Some("ClientIP") {
        let t = get(
            spec,
            &["sessionAffinityConfig", "clientIP", "timeoutSeconds"],
        )
        .and_then(|v| v.as_i64())
        .unwrap_or(DEFAULT_AFFINITY_TIMEOUT as i64);
        if !(1..=86400).contains(&t) {
            return Err(err(
                "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                format!("{t} is not within [1, 86400]"),
            ));
        }
        Some(t as u32)
    } else {
        None
    };
    let externally_reachable_type = svc_type == "NodePort" || svc_type == "LoadBalancer";
    let externally_accessible = externally_reachable_type || !external_ips.is_empty();
    let external_policy_local =
        externally_accessible && get_str(spec, &["externalTrafficPolicy"]) == Some("Local");
    let internal_policy_local = get_str(spec, &["internalTrafficPolicy"]) == Some("Local");
    let health_check_node_port = if svc_type == "LoadBalancer" && external_policy_local {
        get(spec, &["healthCheckNodePort"])
            .and_then(port_number)
            .filter(|p| (1..=65535).contains(p))
            .unwrap_or(0) as u16
    } else {
        0
    };
    let annotation = |name: &str| {
        get(obj, &["metadata", "annotations"])
            .and_then(|a| a.get(name))
            .and_then(|v| v.as_str())
            .map(|s| s.to_string())
    };
    let lb_algorithm = annotation(ANNOTATION_LB_ALGORITHM);
    let ipvs_scheduler = annotation(ANNOTATION_IPVS_SCHEDULER);
    let (namespace, name) = key.split_once('/').unwrap_or(("default", &key));

    let mut ports = Vec::new();
    let empty = Vec::new();
    let raw_ports = get(spec, &["ports"])
        .and_then(|v| v.as_array())
        .unwrap_or(&empty);
    let mut seen = BTreeSet::new();
    for (i, p) in raw_ports.iter().enumerate() {
        let field = |f: &str| format!("spec.ports[{i}].{f}");
        let port_name = get_str(p, &["name"]).unwrap_or("").to_string();
        let proto_raw = get_str(p, &["protocol"]).unwrap_or("TCP");
        let Some(protocol) = Protocol::parse(proto_raw) else {
            warnings.push(err(
                &field("protocol"),
                format!("unsupported protocol {proto_raw:?}, port ignored"),
            ));
            continue;
        };
        let port = match get(p, &["port"]).and_then(port_number) {
            Some(n) if (1..=65535).contains(&n) => n as u16,
            other => {
                warnings.push(err(
                    &field("port"),
                    format!(
                        "{} is not a valid port number, port ignored",
                        other
                            .map(|n| n.to_string())
                            .unwrap_or_else(|| "missing".into())
                    ),
                ));
                continue;
            }
        };
        let node_port = match get(p, &["nodePort"]) {
            None => 0,
            Some(v) => match port_number(v) {
                Some(n) if (1..=65535).contains(&n) => n as u16,
                Some(0) => 0,
                _ => {
                    warnings.push(err(
                        &field("nodePort"),
                        format!("{v} is not a valid port number, port ignored"),
                    ));
                    continue;
                }
            },
        };
        let node_port = if externally_reachable_type {
            node_port
        } else {
            0
        };
        let spn = ServicePortName {
            namespace: namespace.to_string(),
            name: name.to_string(),
            port: port_name,
            protocol,
        };
        if !seen.insert(spn.clone()) {
            warnings.push(err(
                &field("name"),
                format!("duplicate service port {spn}, ignored"),
            ));
            continue;
        }
        ports.push(ServicePort {
            name: spn,
            cluster_ips: cluster_ips.clone(),
            port,
            node_port,
            external_ips: external_ips.clone(),
            load_balancer_ips: load_balancer_ips.clone(),
            load_balancer_source_ranges: load_balancer_source_ranges.clone(),
            affinity_timeout,
            external_policy_local,
            internal_policy_local,
            health_check_node_port,
            lb_algorithm: lb_algorithm.clone(),
            ipvs_scheduler: ipvs_scheduler.clone(),
        });
    }
    Ok(Parsed {
        value: Some(Service { key, ports }),
        warnings,
    })
}

fn string_list(v: Option<&Value>, field: &str) -> Vec<String> {
    v.and_then(|x| x.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|h| h.get(field).and_then(|n| n.as_str()).map(|s| s.to_string()))
                .collect()
        })
        .unwrap_or_default()
}

/// Read a discovery.k8s.io/v1 EndpointSlice.
pub fn parse_endpoint_slice(obj: &Value) -> Result<Parsed<Slice>> {
    let key = object_key(obj)
        .ok_or_else(|| Error::object("EndpointSlice", "<unnamed>", "metadata.name", "missing"))?;
    let err = |field: &str, msg: String| Error::object("EndpointSlice", &key, field, msg);
    let skipped = Parsed {
        value: None,
        warnings: Vec::new(),
    };
    if get(obj, &["metadata", "labels", LABEL_HEADLESS]).is_some() {
        return Ok(skipped);
    }
    let Some(svc_name) = get_str(obj, &["metadata", "labels", LABEL_SERVICE_NAME]) else {
        return Err(err(
            &format!("metadata.labels[{LABEL_SERVICE_NAME}]"),
            "missing: the slice belongs to no Service".into(),
        ));
    };
    let ns = key.split_once('/').map(|(n, _)| n).unwrap_or("default");
    let family = match get_str(obj, &["addressType"]) {
        Some("IPv4") => Family::V4,
        Some("IPv6") => Family::V6,
        // FQDN slices carry no IPs a proxy can use.
        Some("FQDN") => return Ok(skipped),
        other => {
            return Err(err(
                "addressType",
                format!("unsupported address type {other:?}"),
            ));
        }
    };
    let mut warnings = Vec::new();
    let mut endpoints = Vec::new();
    let empty = Vec::new();
    let raw_eps = get(obj, &["endpoints"])
        .and_then(|v| v.as_array())
        .unwrap_or(&empty);
    for (i, ep) in raw_eps.iter().enumerate() {
        let Some(addrs) = get(ep, &["addresses"]).and_then(|v| v.as_array()) else {
            continue;
        };
        // Upstream uses the first address only.
        let Some(first) = addrs.first() else {
            continue;
        };
        let raw = first.as_str().unwrap_or("");
        let ip = match parse_ip(raw) {
            Some(ip) if Family::of(&ip) == family => ip,
            Some(_) => {
                warnings.push(err(
                    &format!("endpoints[{i}].addresses[0]"),
                    format!("{raw:?} is not of the slice's addressType, endpoint ignored"),
                ));
                continue;
            }
            None => {
                warnings.push(err(
                    &format!("endpoints[{i}].addresses[0]"),
                    format!("invalid IP address {raw:?}, endpoint ignored"),
                ));
                continue;
            }
        };
        let cond = |c: &str| get(ep, &["conditions", c]).and_then(|v| v.as_bool());
        let ready = cond("ready").unwrap_or(true);
        let serving = cond("serving").unwrap_or(true);
        let terminating = cond("terminating").unwrap_or(false);
        endpoints.push((
            ip,
            ready,
            serving,
            terminating,
            get_str(ep, &["nodeName"]).map(|s| s.to_string()),
            get_str(ep, &["zone"]).map(|s| s.to_string()),
            string_list(get(ep, &["hints", "forZones"]), "name"),
            string_list(get(ep, &["hints", "forNodes"]), "name"),
        ));
    }
    let mut ports = Vec::new();
    let raw_ports = get(obj, &["ports"])
        .and_then(|v| v.as_array())
        .unwrap_or(&empty);
    for (i, p) in raw_ports.iter().enumerate() {
        let Some(num) = get(p, &["port"]) else {
            continue;
        };
        let port = match port_number(num) {
            Some(n) if (1..=65535).contains(&n) => n as u16,
            _ => {
                warnings.push(err(
                    &format!("ports[{i}].port"),
                    format!("{num} is not a valid port number, ignored"),
                ));
                continue;
            }
        };
        let proto_raw = get_str(p, &["protocol"]).unwrap_or("TCP");
        let Some(protocol) = Protocol::parse(proto_raw) else {
            warnings.push(err(
                &format!("ports[{i}].protocol"),
                format!("unsupported protocol {proto_raw:?}, ignored"),
            ));
            continue;
        };
        let name = get_str(p, &["name"]).unwrap_or("").to_string();
        let eps = endpoints
            .iter()
            .map(
                |(ip, ready, serving, terminating, node, zone, zh, nh)| Endpoint {
                    ip: *ip,
                    port,
                    ready: *ready,
                    serving: *serving,
                    terminating: *terminating,
                    node_name: node.clone(),
                    zone: zone.clone(),
                    zone_hints: zh.clone(),
                    node_hints: nh.clone(),
                },
            )
            .collect();
        ports.push((name, protocol, eps));
    }
    Ok(Parsed {
        value: Some(Slice {
            service_key: format!("{ns}/{svc_name}"),
            family,
            ports,
        }),
        warnings,
    })
}

/// All Services and EndpointSlices, with a generation per Service so renderers can
/// re-render only what changed.
#[derive(Default)]
pub struct Model {
    services: BTreeMap<String, Service>,
    slices: HashMap<String, Slice>,
    slices_by_service: HashMap<String, BTreeSet<String>>,
    generations: HashMap<String, u64>,
    /// generation -> service key, one entry per key (its latest change), so a
    /// renderer finds what changed since its last sync in O(changes).
    change_log: BTreeMap<u64, String>,
    next_generation: u64,
    /// Endpoints over all slices, counted once per slice port (upstream's
    /// endpointsMap size, which decides large-cluster mode).
    total_endpoints: usize,
}

impl Model {
    pub fn new() -> Self {
        Self::default()
    }

    fn bump(&mut self, service_key: &str) {
        self.next_generation += 1;
        if let Some(old) = self
            .generations
            .insert(service_key.to_string(), self.next_generation)
        {
            self.change_log.remove(&old);
        }
        self.change_log
            .insert(self.next_generation, service_key.to_string());
    }

    pub fn total_endpoints(&self) -> usize {
        self.total_endpoints
    }

    /// The generation of the latest change (0 before any).
    pub fn current_generation(&self) -> u64 {
        self.next_generation
    }

    /// Keys of Services (present or deleted) changed after generation `since`.
    pub fn changed_since(&self, since: u64) -> impl Iterator<Item = &str> {
        self.change_log
            .range(since.saturating_add(1)..)
            .map(|(_, k)| k.as_str())
    }

    pub fn generation(&self, service_key: &str) -> u64 {
        self.generations.get(service_key).copied().unwrap_or(0)
    }

    /// Set (or with None delete) a Service by its "namespace/name" key. Returns the
    /// warnings; on error the previous state of the Service is kept, so a bad update
    /// never removes the rules of a Service that worked.
    pub fn set_service(&mut self, key: &str, obj: Option<&Value>) -> Result<Vec<Error>> {
        match obj {
            None => {
                if self.services.remove(key).is_some() {
                    self.bump(key);
                }
                Ok(Vec::new())
            }
            Some(v) => {
                let parsed = parse_service(v)?;
                match parsed.value {
                    Some(svc) => {
                        let svc = Service {
                            key: key.to_string(),
                            ..svc
                        };
                        if self.services.get(key) != Some(&svc) {
                            self.services.insert(key.to_string(), svc);
                            self.bump(key);
                        }
                    }
                    None => {
                        if self.services.remove(key).is_some() {
                            self.bump(key);
                        }
                    }
                }
                Ok(parsed.warnings)
            }
        }
    }

    /// Set (or delete) an EndpointSlice by its "namespace/name" key.
    pub fn set_endpoint_slice(&mut self, key: &str, obj: Option<&Value>) -> Result<Vec<Error>> {
        let (new, warnings) = match obj {
            None => (None, Vec::new()),
            Some(v) => {
                let parsed = parse_endpoint_slice(v)?;
                (parsed.value, parsed.warnings)
            }
        };
        let old = self.slices.get(key).cloned();
        if old == new {
            return Ok(warnings);
        }
        if let Some(old) = old {
            if let Some(set) = self.slices_by_service.get_mut(&old.service_key) {
                set.remove(key);
                if set.is_empty() {
                    self.slices_by_service.remove(&old.service_key);
                }
            }
            self.slices.remove(key);
            self.total_endpoints -= old.endpoint_count();
            self.bump(&old.service_key);
        }
        if let Some(new) = new {
            self.slices_by_service
                .entry(new.service_key.clone())
                .or_default()
                .insert(key.to_string());
            self.bump(&new.service_key);
            self.total_endpoints += new.endpoint_count();
            self.slices.insert(key.to_string(), new);
        }
        Ok(warnings)
    }

    pub fn services(&self) -> impl Iterator<Item = &Service> {
        self.services.values()
    }

    pub fn service(&self, key: &str) -> Option<&Service> {
        self.services.get(key)
    }

    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    /// Endpoints of a service port in one family, merged over the Service's slices:
    /// an address in several slices is kept once, preferring a non-terminating copy;
    /// sorted by "ip:port" as upstream sorts them.
    pub fn endpoints(&self, spn: &ServicePortName, family: Family) -> Vec<Endpoint> {
        let mut merged: BTreeMap<String, Endpoint> = BTreeMap::new();
        let Some(keys) = self.slices_by_service.get(&spn.service_key()) else {
            return Vec::new();
        };
        for k in keys {
            let Some(slice) = self.slices.get(k) else {
                continue;
            };
            if slice.family != family {
                continue;
            }
            for (pname, proto, eps) in &slice.ports {
                if *pname != spn.port || *proto != spn.protocol {
                    continue;
                }
                for ep in eps {
                    let addr = ep.addr();
                    match merged.get(&addr) {
                        Some(existing) if !existing.terminating || ep.terminating => {}
                        _ => {
                            merged.insert(addr, ep.clone());
                        }
                    }
                }
            }
        }
        merged.into_values().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn svc(extra: Value) -> Value {
        let mut base = json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "demo"},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}
        });
        merge(&mut base, extra);
        base
    }

    fn merge(a: &mut Value, b: Value) {
        match (a, b) {
            (Value::Object(a), Value::Object(b)) => {
                for (k, v) in b {
                    merge(a.entry(k).or_insert(Value::Null), v);
                }
            }
            (a, b) => *a = b,
        }
    }

    #[test]
    fn headless_and_external_name_skipped() {
        let p = parse_service(&svc(json!({"spec": {"clusterIP": "None"}}))).unwrap();
        assert!(p.value.is_none());
        let p = parse_service(&svc(json!({"spec": {"type": "ExternalName"}}))).unwrap();
        assert!(p.value.is_none());
        let p = parse_service(&svc(
            json!({"metadata": {"labels": {LABEL_SERVICE_PROXY_NAME: "other"}}}),
        ))
        .unwrap();
        assert!(p.value.is_none());
    }

    #[test]
    fn invalid_cluster_ip_names_field() {
        let e = parse_service(&svc(json!({"spec": {"clusterIP": "10.96.0.300"}})))
            .err()
            .unwrap();
        assert!(e.to_string().contains("demo/web"), "{e}");
        assert!(e.to_string().contains("spec.clusterIPs[0]"), "{e}");
    }

    #[test]
    fn bad_port_dropped_with_warning() {
        let p = parse_service(&svc(json!({"spec": {"ports": [
            {"name": "a", "port": 70000},
            {"name": "b", "port": 81, "protocol": "ICMP"},
            {"name": "c", "port": 82}
        ]}})))
        .unwrap();
        let s = p.value.unwrap();
        assert_eq!(s.ports.len(), 1);
        assert_eq!(p.warnings.len(), 2);
        assert!(p.warnings[0].to_string().contains("spec.ports[0].port"));
    }

    #[test]
    fn policies_and_health_check() {
        let p = parse_service(&svc(json!({"spec": {"type": "LoadBalancer",
            "externalTrafficPolicy": "Local", "healthCheckNodePort": 30000,
            "ports": [{"port": 80, "nodePort": 31000}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "5.5.5.5"}, {"ip": "6.6.6.6", "ipMode": "Proxy"}]}}})))
        .unwrap();
        let sp = &p.value.unwrap().ports[0];
        assert!(sp.external_policy_local);
        assert_eq!(sp.health_check_node_port, 30000);
        assert_eq!(
            sp.load_balancer_ips,
            vec!["5.5.5.5".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(sp.node_port, 31000);
        // ETP Local on a ClusterIP service without externalIPs means nothing.
        let p = parse_service(&svc(json!({"spec": {"externalTrafficPolicy": "Local"}}))).unwrap();
        assert!(!p.value.unwrap().ports[0].external_policy_local);
    }

    fn slice(name: &str, eps: Value) -> Value {
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": "demo", "labels": {LABEL_SERVICE_NAME: "web"}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": eps})
    }

    #[test]
    fn slices_merge_and_prefer_non_terminating() {
        let mut m = Model::new();
        m.set_service("demo/web", Some(&svc(json!({})))).unwrap();
        m.set_endpoint_slice(
            "demo/web-a",
            Some(&slice("web-a", json!([
                {"addresses": ["10.244.0.5"], "conditions": {"ready": false, "serving": true, "terminating": true}},
                {"addresses": ["10.244.0.6", "10.244.0.99"]}
            ]))),
        )
        .unwrap();
        m.set_endpoint_slice(
            "demo/web-b",
            Some(&slice(
                "web-b",
                json!([{"addresses": ["10.244.0.5"], "conditions": {"ready": true}}]),
            )),
        )
        .unwrap();
        let spn = m.service("demo/web").unwrap().ports[0].name.clone();
        let eps = m.endpoints(&spn, Family::V4);
        assert_eq!(eps.len(), 2);
        assert_eq!(eps[0].addr(), "10.244.0.5:8080");
        assert!(eps[0].ready && !eps[0].terminating);
        assert_eq!(eps[1].addr(), "10.244.0.6:8080");
        // Defaults: ready and serving true, terminating false.
        assert!(eps[1].ready && eps[1].serving && !eps[1].terminating);
    }

    #[test]
    fn leading_zero_endpoint_dropped_rest_kept() {
        let p = parse_endpoint_slice(&slice(
            "w",
            json!([{"addresses": ["010.244.0.5"]}, {"addresses": ["10.244.0.7"]}]),
        ))
        .unwrap();
        assert_eq!(p.warnings.len(), 1);
        assert!(p.warnings[0]
            .to_string()
            .contains("endpoints[0].addresses[0]"));
        assert_eq!(p.value.unwrap().ports[0].2.len(), 1);
    }

    #[test]
    fn no_op_changes_do_not_bump_generation() {
        let mut m = Model::new();
        m.set_service("demo/web", Some(&svc(json!({})))).unwrap();
        let g = m.generation("demo/web");
        m.set_service("demo/web", Some(&svc(json!({})))).unwrap();
        assert_eq!(g, m.generation("demo/web"));
        m.set_endpoint_slice("demo/x", Some(&slice("x", json!([]))))
            .unwrap();
        assert!(m.generation("demo/web") > g);
    }
}
