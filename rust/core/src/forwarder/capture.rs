//! The kernel half of userspace mode: an nftables table that redirects new flows to
//! Service addresses into the forwarder, and rejects or drops the ones the kernel
//! modes would reject or drop.
//!
//! - TCP: every Service address (ClusterIP, externalIP, LB IP; NodePorts on local
//!   addresses) is redirected to the one TCP listener; the forwarder reads the original
//!   destination with `SO_ORIGINAL_DST` and looks the service port up.
//! - UDP: the kernel keeps no original destination for a redirected datagram socket,
//!   so each UDP service port gets its own listener port (one for ClusterIP traffic,
//!   one for external access) and a verdict map sends each address there. Replies
//!   leave from the listener and conntrack rewrites their source back to the Service
//!   address the client used.
//! - No endpoints: `reject` (TCP RST, ICMP port unreachable) for new flows only, so
//!   established flows finish. ETP Local without a local endpoint drops off-cluster
//!   clients; ITP Local without one drops; loadBalancerSourceRanges drop other sources.
//!
//! The table is rewritten whole in one `nft -f` transaction (delete + add), so a sync
//! is atomic and established connections (whose NAT lives in conntrack) are untouched.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::net::IpAddr;

use crate::model::Protocol;
use crate::net::{Cidr, Family};

use super::table::PortSpec;

pub const TABLE: &str = "kproxy-userspace";
/// Before upstream's nat priorities (dstnat = -100), so we see flows first.
const NAT_PRIORITY: i32 = -110;
/// The filter chains run before NAT (mangle priority).
const FILTER_PRIORITY: i32 = -150;

/// UDP listener ports of one service port: (ClusterIP listener, external listener).
pub type UdpPorts = BTreeMap<(crate::model::ServicePortName, Family), (u16, u16)>;

fn fam(f: Family) -> (&'static str, &'static str) {
    match f {
        Family::V4 => ("ip", "ipv4_addr"),
        Family::V6 => ("ip6", "ipv6_addr"),
    }
}

fn proto(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
    }
}

fn ip_text(ip: &IpAddr) -> String {
    ip.to_string()
}

fn set_block(out: &mut String, kind: &str, name: &str, ty: &str, elems: &[String]) {
    let _ = writeln!(out, "  {kind} {name} {{\n    type {ty}");
    if !elems.is_empty() {
        let _ = writeln!(out, "    elements = {{ {} }}", elems.join(", "));
    }
    out.push_str("  }\n");
}

/// The nft script for a sync (input of `nft -f`).
pub fn render(
    specs: &[PortSpec],
    tcp_port: u16,
    udp_ports: &UdpPorts,
    families: &[Family],
    cluster_cidrs: &[Cidr],
) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "table inet {TABLE}\ndelete table inet {TABLE}");
    let _ = writeln!(out, "table inet {TABLE} {{");
    let mut filter_pre = Vec::new();
    let mut filter_out = Vec::new();
    let mut nat = Vec::new();
    for &f in families {
        let (ipk, ty) = fam(f);
        let suffix = match f {
            Family::V4 => "4",
            Family::V6 => "6",
        };
        let mut tcp_vips = Vec::new();
        let mut tcp_nodeports = Vec::new();
        let mut udp_vips = Vec::new();
        let mut udp_nodeports = Vec::new();
        let mut reject = Vec::new();
        let mut reject_nodeports = Vec::new();
        let internal_cidrs: Vec<String> = cluster_cidrs
            .iter()
            .filter(|c| c.family() == f)
            .map(|c| c.to_string())
            .collect();
        for s in specs.iter().filter(|s| s.family == f) {
            let p = proto(s.name.protocol);
            let ext_ips: Vec<&IpAddr> = s.external_ips.iter().chain(&s.load_balancer_ips).collect();
            if !s.has_endpoints {
                reject.push(format!("{} . {p} . {}", ip_text(&s.cluster_ip), s.port));
                for ip in &ext_ips {
                    reject.push(format!("{} . {p} . {}", ip_text(ip), s.port));
                }
                if s.node_port != 0 {
                    reject_nodeports.push(format!("{p} . {}", s.node_port));
                }
                continue;
            }
            if s.internal_local && s.local.is_empty() {
                filter_pre.push(format!(
                    "{ipk} daddr {} {p} dport {} ct state new drop",
                    s.cluster_ip, s.port
                ));
                filter_out.push(filter_pre.last().cloned().unwrap_or_default());
            }
            // Off-cluster sources: not a local address, not a pod.
            let offcluster = if internal_cidrs.is_empty() {
                "fib saddr type != local".to_string()
            } else {
                format!(
                    "fib saddr type != local {ipk} saddr != {{ {} }}",
                    internal_cidrs.join(", ")
                )
            };
            if s.external_local && s.local.is_empty() {
                for ip in &ext_ips {
                    filter_pre.push(format!(
                        "{ipk} daddr {ip} {p} dport {} {offcluster} ct state new drop",
                        s.port
                    ));
                }
                if s.node_port != 0 {
                    filter_pre.push(format!(
                        "fib daddr type local meta nfproto {} {p} dport {} {offcluster} ct state new drop",
                        if f == Family::V4 { "ipv4" } else { "ipv6" },
                        s.node_port
                    ));
                }
            }
            if !s.load_balancer_source_ranges.is_empty() {
                let ranges: Vec<String> = s
                    .load_balancer_source_ranges
                    .iter()
                    .map(|c| c.to_string())
                    .collect();
                for ip in &s.load_balancer_ips {
                    filter_pre.push(format!(
                        "{ipk} daddr {ip} {p} dport {} fib saddr type != local {ipk} saddr != {{ {} }} ct state new drop",
                        s.port,
                        ranges.join(", ")
                    ));
                }
            }
            match s.name.protocol {
                Protocol::Tcp => {
                    tcp_vips.push(format!("{} . {}", s.cluster_ip, s.port));
                    for ip in &ext_ips {
                        tcp_vips.push(format!("{ip} . {}", s.port));
                    }
                    if s.node_port != 0 {
                        tcp_nodeports.push(s.node_port.to_string());
                    }
                }
                Protocol::Udp => {
                    let Some((lp_int, lp_ext)) = udp_ports.get(&s.key()) else {
                        continue;
                    };
                    udp_vips.push(format!("{} . {} : {lp_int}", s.cluster_ip, s.port));
                    for ip in &ext_ips {
                        udp_vips.push(format!("{ip} . {} : {lp_ext}", s.port));
                    }
                    if s.node_port != 0 {
                        udp_nodeports.push(format!("{} : {lp_ext}", s.node_port));
                    }
                }
                Protocol::Sctp => {}
            }
        }
        // nft refuses duplicate elements; a map keeps the first value of a key.
        for v in [
            &mut tcp_vips,
            &mut tcp_nodeports,
            &mut reject,
            &mut reject_nodeports,
        ] {
            v.sort();
            v.dedup();
        }
        for v in [&mut udp_vips, &mut udp_nodeports] {
            let mut seen = std::collections::BTreeSet::new();
            v.retain(|e| seen.insert(e.split(" : ").next().unwrap_or("").to_string()));
        }
        set_block(
            &mut out,
            "set",
            &format!("tcp_vips{suffix}"),
            &format!("{ty} . inet_service"),
            &tcp_vips,
        );
        set_block(
            &mut out,
            "set",
            &format!("tcp_nodeports{suffix}"),
            "inet_service",
            &tcp_nodeports,
        );
        set_block(
            &mut out,
            "map",
            &format!("udp_vips{suffix}"),
            &format!("{ty} . inet_service : inet_service"),
            &udp_vips,
        );
        set_block(
            &mut out,
            "map",
            &format!("udp_nodeports{suffix}"),
            "inet_service : inet_service",
            &udp_nodeports,
        );
        set_block(
            &mut out,
            "set",
            &format!("reject{suffix}"),
            &format!("{ty} . inet_proto . inet_service"),
            &reject,
        );
        set_block(
            &mut out,
            "set",
            &format!("reject_nodeports{suffix}"),
            "inet_proto . inet_service",
            &reject_nodeports,
        );
        let nfproto = if f == Family::V4 { "ipv4" } else { "ipv6" };
        for chain in [&mut filter_pre, &mut filter_out] {
            chain.push(format!("{ipk} daddr . meta l4proto . th dport @reject{suffix} ct state new meta l4proto tcp reject with tcp reset"));
            chain.push(format!("{ipk} daddr . meta l4proto . th dport @reject{suffix} ct state new reject with icmpx port-unreachable"));
            chain.push(format!("fib daddr type local meta nfproto {nfproto} meta l4proto . th dport @reject_nodeports{suffix} ct state new meta l4proto tcp reject with tcp reset"));
            chain.push(format!("fib daddr type local meta nfproto {nfproto} meta l4proto . th dport @reject_nodeports{suffix} ct state new reject with icmpx port-unreachable"));
        }
        nat.push(format!(
            "{ipk} daddr . tcp dport @tcp_vips{suffix} redirect to :{tcp_port}"
        ));
        nat.push(format!(
            "fib daddr type local meta nfproto {nfproto} tcp dport @tcp_nodeports{suffix} redirect to :{tcp_port}"
        ));
        nat.push(format!(
            "meta nfproto {nfproto} meta l4proto udp redirect to : {ipk} daddr . udp dport map @udp_vips{suffix}"
        ));
        nat.push(format!(
            "fib daddr type local meta nfproto {nfproto} meta l4proto udp redirect to : udp dport map @udp_nodeports{suffix}"
        ));
    }
    // Every filter rule matches only a connection's first packet: the rest of the
    // traffic (most packets) leaves after one conntrack state check, before any set or
    // fib lookup.
    for rules in [&mut filter_pre, &mut filter_out] {
        rules.insert(0, "ct state != new accept".to_string());
    }
    let chain =
        |out: &mut String, name: &str, hook: &str, ty: &str, prio: i32, rules: &[String]| {
            let _ = writeln!(
                out,
                "  chain {name} {{\n    type {ty} hook {hook} priority {prio}; policy accept;"
            );
            for r in rules {
                let _ = writeln!(out, "    {r}");
            }
            out.push_str("  }\n");
        };
    chain(
        &mut out,
        "filter-prerouting",
        "prerouting",
        "filter",
        FILTER_PRIORITY,
        &filter_pre,
    );
    chain(
        &mut out,
        "filter-output",
        "output",
        "filter",
        FILTER_PRIORITY,
        &filter_out,
    );
    chain(
        &mut out,
        "nat-prerouting",
        "prerouting",
        "nat",
        NAT_PRIORITY,
        &nat,
    );
    chain(&mut out, "nat-output", "output", "nat", NAT_PRIORITY, &nat);
    out.push_str("}\n");
    out
}

/// `--cleanup`: the script that removes the table (harmless when absent).
pub fn render_cleanup() -> String {
    format!("table inet {TABLE}\ndelete table inet {TABLE}\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forwarder::table::{build_specs, TableConfig};
    use crate::model::Model;
    use serde_json::json;

    #[test]
    fn renders_redirects_rejects_and_drops() {
        let mut m = Model::new();
        for (name, ip, proto, extra) in [
            (
                "web",
                "10.96.0.10",
                "TCP",
                json!({"type": "NodePort", "externalTrafficPolicy": "Local"}),
            ),
            ("dns", "10.96.0.53", "UDP", json!({})),
            ("none", "10.96.0.19", "TCP", json!({})),
        ] {
            let mut spec = json!({"clusterIP": ip, "ports": [{"name": "p", "port": 80, "protocol": proto, "nodePort": 30080}]});
            for (k, v) in extra.as_object().unwrap() {
                spec[k] = v.clone();
            }
            m.set_service(
                &format!("t/{name}"),
                Some(&json!({"metadata": {"name": name, "namespace": "t"}, "spec": spec})),
            )
            .unwrap();
            if name != "none" {
                m.set_endpoint_slice(
                    &format!("t/{name}"),
                    Some(&json!({"metadata": {"name": name, "namespace": "t",
                        "labels": {"kubernetes.io/service-name": name}},
                        "addressType": "IPv4", "ports": [{"name": "p", "port": 8080, "protocol": proto}],
                        "endpoints": [{"addresses": ["10.244.1.5"], "nodeName": "other"}]})),
                )
                .unwrap();
            }
        }
        let cfg = TableConfig {
            node_name: "n1".into(),
            families: vec![Family::V4],
            ..Default::default()
        };
        let (specs, _) = build_specs(&m, &cfg);
        let dns = specs.iter().find(|s| s.name.name == "dns").unwrap().key();
        let udp: UdpPorts = [(dns, (41000, 41001))].into_iter().collect();
        let cidrs = [Cidr::parse("10.244.0.0/16").unwrap()];
        let text = render(&specs, 40000, &udp, &[Family::V4], &cidrs);
        assert!(
            text.starts_with("table inet kproxy-userspace\ndelete table inet kproxy-userspace\n")
        );
        assert!(text.contains("elements = { 10.96.0.10 . 80 }"), "{text}");
        assert!(
            text.contains("elements = { 10.96.0.53 . 80 : 41000 }"),
            "{text}"
        );
        assert!(
            text.contains("elements = { 10.96.0.19 . tcp . 80 }"),
            "{text}"
        );
        assert!(text.contains("redirect to :40000"));
        // ETP Local without a local endpoint: off-cluster clients of the NodePort drop.
        assert!(text.contains("tcp dport 30080 fib saddr type != local ip saddr != { 10.244.0.0/16 } ct state new drop"), "{text}");
        for chain in ["filter-prerouting", "filter-output"] {
            let body = &text[text.find(&format!("chain {chain} ")).unwrap()..];
            let first = body.lines().nth(2).unwrap().trim();
            assert_eq!(first, "ct state != new accept", "{chain}: {text}");
        }
        assert!(render_cleanup().contains("delete table inet kproxy-userspace"));
    }
}
