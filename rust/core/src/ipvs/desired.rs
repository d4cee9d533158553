//! The service model as IPVS wants it, for one IP family, with upstream kube-proxy's
//! IPVS proxier layout: one virtual server per ClusterIP, externalIP, LoadBalancer IP
//! and (node IP, NodePort); the addresses to bind on kube-ipvs0; the members of
//! upstream's ipsets that the companion iptables rules match on; health check ports.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::{
    Destination, ServiceKey, VirtualServer, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP,
    IP_VS_SVC_F_PERSISTENT, IP_VS_SVC_F_SCHED1, IP_VS_SVC_F_SCHED2, IP_VS_SVC_F_SCHED3,
};
use crate::categorize::categorize;
use crate::error::{Error, Result};
use crate::model::{Model, Protocol, ServicePort};
use crate::net::{join_host_port, Family};

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
            Family::V6 => name.replacen("KUBE-", "KUBE-6-", 1),
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

pub fn plan(model: &Model, cfg: &IpvsConfig) -> Result<Plan> {
    let default_sched = parse_scheduler(&cfg.scheduler)?;
    let mut out = Plan::default();
    let fam = cfg.family;
    let of_family = |ip: &&IpAddr| Family::of(ip) == fam;
    for svc in model.services() {
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
            let _ = join_host_port;
            let _: &ServicePort = sp;
        }
    }
    for ip in &out.bind_addrs.clone() {
        out.set(fam, "KUBE-IPVS-IPS", ip.to_string());
    }
    Ok(out)
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
}
