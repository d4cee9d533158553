//! Rendering tests: shape, incremental output and element bookkeeping.

use super::*;
use serde_json::{json, Value};

fn cfg() -> NftablesConfig {
    serde_json::from_value(json!({
        "family": "v4", "node_name": "node1", "node_ips": ["172.18.0.2"],
        "local_detector": {"kind": "cidr", "cidrs": ["10.244.0.0/16"]},
        "nodeport_addresses": ["172.18.0.2"]
    }))
    .unwrap()
}

fn service(i: usize, extra: Value) -> Value {
    let mut svc = json!({"metadata": {"name": format!("s{i}"), "namespace": "ns"},
        "spec": {"clusterIP": format!("10.96.{}.{}", i / 250, i % 250 + 1),
            "ports": [{"name": "p", "port": 80}]}});
    if let (Some(a), Value::Object(b)) = (svc.as_object_mut(), extra) {
        for (k, v) in b {
            match (a.get_mut(&k), v) {
                (Some(Value::Object(x)), Value::Object(y)) => x.extend(y),
                (_, v) => {
                    a.insert(k, v);
                }
            }
        }
    }
    svc
}

fn model(n: usize, eps: usize) -> Model {
    let mut m = Model::new();
    for i in 0..n {
        m.set_service(&format!("ns/s{i}"), Some(&service(i, json!({}))))
            .unwrap();
        set_slice(&mut m, i, eps, 0);
    }
    m
}

fn set_slice(m: &mut Model, i: usize, eps: usize, offset: usize) {
    let endpoints: Vec<_> = (0..eps)
        .map(|j| {
            let k = i * 4 + j + offset;
            json!({"addresses": [format!("10.244.{}.{}", k / 250, k % 250 + 1)], "nodeName": "node2"})
        })
        .collect();
    let slice = json!({"metadata": {"name": format!("s{i}-x"), "namespace": "ns",
        "labels": {"kubernetes.io/service-name": format!("s{i}")}},
        "addressType": "IPv4", "ports": [{"name": "p", "port": 8080}], "endpoints": endpoints});
    m.set_endpoint_slice(&format!("ns/s{i}-x"), Some(&slice))
        .unwrap();
}

fn spn(m: &Model, i: usize) -> ServicePortName {
    m.service(&format!("ns/s{i}")).unwrap().ports[0]
        .name
        .clone()
}

#[test]
fn full_sync_has_upstream_layout() {
    let m = model(2, 2);
    let mut r = NftablesRenderer::new(cfg()).unwrap();
    let out = r.render(&m, true);
    let t = &out.text;
    assert!(t.starts_with("add table ip kube-proxy\ndelete table ip kube-proxy\n"));
    assert!(t.contains(
        "add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }"
    ));
    assert!(t.contains("add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ;"));
    assert!(t.contains(
        "add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips"
    ));
    assert!(t.contains("add rule ip kube-proxy services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports"));
    assert!(t.contains("add element ip kube-proxy nodeport-ips { 172.18.0.2 }"));
    let svc = service_chains(&spn(&m, 0)).cluster;
    assert!(
        svc.starts_with("service-") && svc.ends_with("-ns/s0/tcp/p"),
        "{svc}"
    );
    assert!(t.contains(&format!("add rule ip kube-proxy {svc} ip daddr 10.96.0.1 tcp dport 80 ip saddr != 10.244.0.0/16 jump mark-for-masquerade")));
    assert!(t.contains(&format!("add rule ip kube-proxy {svc} numgen random mod 2 0 meta l4proto tcp dnat to 10.244.0.1:8080")));
    assert!(t.contains(&format!(
        "add rule ip kube-proxy {svc} meta l4proto tcp dnat to 10.244.0.2:8080"
    )));
    assert!(t.contains(&format!("10.96.0.1 . tcp . 80 : goto {svc}")));
    assert!(t.contains("add rule ip kube-proxy masquerading meta mark & 0x00004000 == 0 return"));
    assert!(t.contains("10.244.0.1 . 10.244.0.1"), "hairpin pairs");
    // The linear shape: no anonymous sets or maps anywhere.
    for line in t.lines().filter(|l| l.starts_with("add rule")) {
        assert!(!line.contains('{'), "anonymous set in {line}");
    }
    assert_eq!(out.stats.service_ports, 2);
    assert_eq!(out.stats.chains, 2);
}

#[test]
fn nothing_changed_writes_nothing() {
    let m = model(3, 2);
    let mut r = NftablesRenderer::new(cfg()).unwrap();
    r.render(&m, true);
    r.commit();
    let out = r.render(&m, false);
    assert_eq!(out.text, "");
    assert_eq!(out.stats.rendered_service_ports, 0);
}

#[test]
fn endpoint_change_writes_only_that_service_chain() {
    let mut m = model(50, 2);
    let mut r = NftablesRenderer::new(cfg()).unwrap();
    r.render(&m, true);
    r.commit();
    set_slice(&mut m, 7, 2, 1);
    let out = r.render(&m, false);
    r.commit();
    let svc = service_chains(&spn(&m, 7)).cluster;
    let lines: Vec<&str> = out.text.lines().collect();
    assert_eq!(
        lines[0],
        format!("flush chain ip kube-proxy {svc}"),
        "{}",
        out.text
    );
    assert!(
        lines[1..]
            .iter()
            .all(|l| l.starts_with(&format!("add rule ip kube-proxy {svc} "))
                || l.contains("hairpin-endpoints")),
        "{}",
        out.text
    );
    // 10.244.0.29 left, 10.244.0.31 came: one hairpin pair each way.
    assert!(
        out.text.contains(
            "delete element ip kube-proxy hairpin-endpoints { 10.244.0.29 . 10.244.0.29 }"
        ),
        "{}",
        out.text
    );
    assert!(out
        .text
        .contains("add element ip kube-proxy hairpin-endpoints { 10.244.0.31 . 10.244.0.31 }"));
    assert_eq!(out.changed_services, vec!["ns/s7".to_string()]);
    assert!(!out.text.contains("service-ips"));
}

#[test]
fn service_add_and_remove_are_element_and_chain_updates() {
    let mut m = model(5, 1);
    let mut r = NftablesRenderer::new(cfg()).unwrap();
    r.render(&m, true);
    r.commit();
    m.set_service("ns/s9", Some(&service(9, json!({}))))
        .unwrap();
    set_slice(&mut m, 9, 1, 0);
    let out = r.render(&m, false);
    r.commit();
    let svc = service_chains(&spn(&m, 9)).cluster;
    assert!(
        out.text
            .starts_with(&format!("add chain ip kube-proxy {svc}\n")),
        "{}",
        out.text
    );
    assert!(out.text.contains(&format!(
        "add element ip kube-proxy service-ips {{ 10.96.0.10 . tcp . 80 : goto {svc} }}"
    )));
    assert!(out
        .text
        .contains("add element ip kube-proxy cluster-ips { 10.96.0.10 }"));
    m.set_service("ns/s9", None).unwrap();
    let out = r.render(&m, false);
    r.commit();
    let del_el = out
        .text
        .find("delete element ip kube-proxy service-ips")
        .unwrap();
    let del_chain = out
        .text
        .find(&format!("delete chain ip kube-proxy {svc}"))
        .unwrap();
    assert!(
        del_el < del_chain,
        "elements go before the chain they reference:\n{}",
        out.text
    );
    assert!(out
        .text
        .contains("delete element ip kube-proxy cluster-ips { 10.96.0.10 }"));
    assert_eq!(out.stats.deleted_chains, 1);
    // The running totals match a fresh full render of the same model.
    let fresh = NftablesRenderer::new(cfg()).unwrap().render(&m, true).stats;
    assert_eq!(
        (out.stats.chains, out.stats.rules, out.stats.endpoints),
        (fresh.chains, fresh.rules, fresh.endpoints)
    );
    assert_eq!(out.stats.elements, fresh.elements);
}

#[test]
fn no_endpoints_rejects_and_recovers() {
    let mut m = model(2, 2);
    let mut r = NftablesRenderer::new(cfg()).unwrap();
    r.render(&m, true);
    r.commit();
    m.set_endpoint_slice("ns/s1-x", None).unwrap();
    let out = r.render(&m, false);
    r.commit();
    assert!(out.text.contains("add element ip kube-proxy no-endpoint-services { 10.96.0.2 . tcp . 80 : goto reject-chain }"), "{}", out.text);
    assert!(out
        .text
        .contains("delete element ip kube-proxy service-ips { 10.96.0.2 . tcp . 80 }"));
    assert!(out.text.contains("delete chain ip kube-proxy service-"));
    set_slice(&mut m, 1, 1, 0);
    let out = r.render(&m, false);
    assert!(out
        .text
        .contains("delete element ip kube-proxy no-endpoint-services { 10.96.0.2 . tcp . 80 }"));
}

#[test]
fn shared_cluster_ip_element_is_reference_counted() {
    let mut m = Model::new();
    let svc = json!({"metadata": {"name": "dns", "namespace": "ns"},
        "spec": {"clusterIP": "10.96.0.53", "ports": [
            {"name": "dns", "port": 53, "protocol": "UDP"},
            {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]}});
    m.set_service("ns/dns", Some(&svc)).unwrap();
    let mut r = NftablesRenderer::new(cfg()).unwrap();
    let out = r.render(&m, true);
    r.commit();
    assert_eq!(
        out.text
            .matches("10.96.0.53 . udp . 53 : goto reject-chain")
            .count(),
        1
    );
    // Dropping one port keeps the ClusterIP in cluster-ips.
    let svc2 = json!({"metadata": {"name": "dns", "namespace": "ns"},
        "spec": {"clusterIP": "10.96.0.53", "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}]}});
    m.set_service("ns/dns", Some(&svc2)).unwrap();
    let out = r.render(&m, false);
    assert!(!out.text.contains("cluster-ips"), "{}", out.text);
    assert!(out
        .text
        .contains("delete element ip kube-proxy no-endpoint-services { 10.96.0.53 . tcp . 53 }"));
}

#[test]
fn algorithms_from_annotation() {
    let mut m = Model::new();
    for (i, algo) in ["round-robin", "source-hash", "maglev"].iter().enumerate() {
        let svc = service(
            i,
            json!({"metadata": {"annotations": {"kproxy.io/lb-algorithm": algo}}}),
        );
        m.set_service(&format!("ns/s{i}"), Some(&svc)).unwrap();
        set_slice(&mut m, i, 3, 0);
    }
    let mut r = NftablesRenderer::new(cfg()).unwrap();
    let out = r.render(&m, true);
    assert!(out
        .text
        .contains("numgen inc mod 3 0 meta l4proto tcp dnat to 10.244.0.1:8080"));
    assert!(out
        .text
        .contains("numgen inc mod 2 0 meta l4proto tcp dnat to 10.244.0.2:8080"));
    assert!(out.text.contains(
        "jhash ip saddr mod 3 seed 0x9e3779b9 0 meta l4proto tcp dnat to 10.244.0.5:8080"
    ));
    assert!(out.text.contains("jhash ip saddr mod 2 seed 0x3c6ef372 0"));
    // maglev cannot be expressed: random, and reported.
    assert!(out
        .text
        .contains("numgen random mod 3 0 meta l4proto tcp dnat to 10.244.0.10:8080"));
    assert_eq!(
        out.unsupported_algorithms,
        vec![("ns/s2:p".to_string(), "maglev".to_string())]
    );
}

#[test]
fn affinity_uses_named_timeout_sets() {
    let mut m = Model::new();
    let svc = service(
        0,
        json!({"spec": {"sessionAffinity": "ClientIP",
        "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}}}),
    );
    m.set_service("ns/s0", Some(&svc)).unwrap();
    set_slice(&mut m, 0, 2, 0);
    let mut r = NftablesRenderer::new(cfg()).unwrap();
    let out = r.render(&m, true);
    let sp = spn(&m, 0);
    let eps = m.endpoints(&sp, Family::V4);
    let set = affinity_set(&sp, &eps[0]);
    assert!(out.text.contains(&format!("add set ip kube-proxy {set} {{ type ipv4_addr ; flags dynamic,timeout ; timeout 60s ; }}")), "{}", out.text);
    assert!(out.text.contains(&format!(
        "ip saddr @{set} meta l4proto tcp dnat to 10.244.0.1:8080"
    )));
    assert!(out.text.contains(&format!("numgen random mod 2 0 update @{set} {{ ip saddr }} meta l4proto tcp dnat to 10.244.0.1:8080")));
}

#[test]
fn external_traffic_policy_local_and_source_ranges() {
    let mut m = Model::new();
    let svc = service(
        0,
        json!({"spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Local",
        "loadBalancerSourceRanges": ["192.168.0.0/16"],
        "ports": [{"name": "p", "port": 80, "nodePort": 30080}]},
        "status": {"loadBalancer": {"ingress": [{"ip": "5.5.5.5"}]}}}),
    );
    m.set_service("ns/s0", Some(&svc)).unwrap();
    let slice = json!({"metadata": {"name": "s0-x", "namespace": "ns",
        "labels": {"kubernetes.io/service-name": "s0"}}, "addressType": "IPv4",
        "ports": [{"name": "p", "port": 8080}],
        "endpoints": [{"addresses": ["10.244.0.1"], "nodeName": "node1"},
                      {"addresses": ["10.244.0.2"], "nodeName": "node2"}]});
    m.set_endpoint_slice("ns/s0-x", Some(&slice)).unwrap();
    let mut r = NftablesRenderer::new(cfg()).unwrap();
    let out = r.render(&m, true);
    let c = service_chains(&spn(&m, 0));
    let t = &out.text;
    assert!(t.contains(&format!(
        "add rule ip kube-proxy {} ip saddr 10.244.0.0/16 goto {}",
        c.external, c.cluster
    )));
    assert!(t.contains(&format!(
        "add rule ip kube-proxy {} fib saddr type local jump mark-for-masquerade",
        c.external
    )));
    assert!(t.contains(&format!(
        "add rule ip kube-proxy {} goto {}",
        c.external, c.local
    )));
    assert!(t.contains(&format!(
        "add rule ip kube-proxy {} meta l4proto tcp dnat to 10.244.0.1:8080",
        c.local
    )));
    assert!(t.contains(&format!("tcp . 30080 : goto {}", c.external)));
    assert!(t.contains(&format!("5.5.5.5 . tcp . 80 : goto {}", c.firewall)));
    assert!(t.contains(&format!(
        "add rule ip kube-proxy {} ip saddr 192.168.0.0/16 return",
        c.firewall
    )));
    assert!(t.contains(&format!("add rule ip kube-proxy {} drop", c.firewall)));
}

#[test]
fn failed_sync_forces_full() {
    let mut m = model(2, 1);
    let mut r = NftablesRenderer::new(cfg()).unwrap();
    r.render(&m, true);
    // No commit: the transaction failed.
    set_slice(&mut m, 0, 2, 0);
    let out = r.render(&m, false);
    assert!(out.stats.full);
    assert!(out
        .text
        .starts_with("add table ip kube-proxy\ndelete table ip kube-proxy\n"));
    assert!(out.text.contains("10.96.0.2 . tcp . 80 : goto service-"));
}

#[test]
fn ipv6_names_and_dnat() {
    let mut c = cfg();
    c.family = Family::V6;
    c.node_ips = vec!["fd00::2".into()];
    c.nodeport_addresses = None;
    c.local_detector = LocalDetector::Cidr {
        cidrs: vec!["fd00:10:244::/64".into()],
    };
    let mut m = Model::new();
    let svc = json!({"metadata": {"name": "s", "namespace": "ns"},
        "spec": {"clusterIPs": ["fd00:96::1"], "ports": [{"name": "p", "port": 80}],
            "sessionAffinity": "ClientIP"}});
    m.set_service("ns/s", Some(&svc)).unwrap();
    let slice = json!({"metadata": {"name": "s-x", "namespace": "ns",
        "labels": {"kubernetes.io/service-name": "s"}}, "addressType": "IPv6",
        "ports": [{"name": "p", "port": 8080}], "endpoints": [{"addresses": ["fd00:10:244::5"]}]});
    m.set_endpoint_slice("ns/s-x", Some(&slice)).unwrap();
    let mut r = NftablesRenderer::new(c).unwrap();
    let out = r.render(&m, true);
    let t = &out.text;
    assert!(t.contains("add table ip6 kube-proxy"));
    assert!(t.contains("meta l4proto tcp dnat to [fd00:10:244::5]:8080"));
    assert!(t.contains(
        "fib daddr type local ip6 daddr != ::1/128 meta l4proto . th dport vmap @service-nodeports"
    ));
    assert!(t.contains("ip6 saddr != fd00:10:244::/64 jump mark-for-masquerade"));
    // nft identifiers cannot hold ':'.
    for l in t.lines().filter(|l| l.contains("affinity-")) {
        let name = l
            .split_whitespace()
            .find(|w| w.contains("affinity-"))
            .unwrap();
        assert!(!name.contains(':'), "{name}");
    }
}

#[test]
fn cleanup_deletes_both_tables() {
    let t = render_cleanup();
    assert!(t.contains("delete table ip kube-proxy") && t.contains("delete table ip6 kube-proxy"));
}

#[test]
fn partial_render_visits_only_changed_services() {
    let mut m = model(200, 2);
    let mut r = NftablesRenderer::new(cfg()).unwrap();
    r.render(&m, true);
    r.commit();
    set_slice(&mut m, 7, 2, 1);
    m.set_service("ns/s9", None).unwrap();
    let out = r.render(&m, false);
    r.commit();
    assert_eq!(out.stats.rendered_service_ports, 1, "{}", out.text);
    assert_eq!(out.stats.services, 199);
    assert_eq!(out.stats.service_ports, 199);
    let gone = service_chains(&spn(&model(10, 2), 9)).cluster;
    assert!(out
        .text
        .contains(&format!("delete chain ip kube-proxy {gone}")));
}

#[test]
fn a_new_model_is_rendered_from_scratch() {
    // A renderer follows one model; handed a younger one, it must not trust its position
    // in the old one's change log: Services missing from the new model are removed.
    let mut m = model(5, 2);
    for round in 0..3 {
        set_slice(&mut m, 1, 2, round); // push the old model's generation well ahead
    }
    let mut r = NftablesRenderer::new(cfg()).unwrap();
    r.render(&m, true);
    r.commit();
    let fresh = model(2, 2);
    let out = r.render(&fresh, false);
    r.commit();
    assert_eq!(out.stats.service_ports, 2, "{}", out.text);
    let gone = service_chains(&spn(&m, 4)).cluster;
    assert!(out
        .text
        .contains(&format!("delete chain ip kube-proxy {gone}")));
}
