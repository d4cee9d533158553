//! Desired virtual servers in, minimal IPVS changes out. The reconciler remembers what
//! it programmed; a full sync (and the first one, and the one after any failure)
//! refreshes that memory from one service dump plus the real servers of the services
//! that are desired or owned, so a one-endpoint change costs one message, not a dump.
//!
//! Graceful termination as upstream: a TCP real server that is no longer wanted gets
//! weight 0 and is deleted once it has no active or inactive connections; UDP and
//! SCTP real servers are deleted at once. Only virtual servers kproxy owns (an address
//! it bound, outside the excluded CIDRs) are ever deleted.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;

use serde::Serialize;

use super::desired::Desired;
use super::{
    Destination, IpvsError, Kernel, Op, ServiceKey, VirtualServer, IPPROTO_SCTP, IPPROTO_UDP,
};
use crate::net::Cidr;

/// Which kernel virtual servers belong to kproxy.
#[derive(Debug, Clone, Default)]
pub struct Ownership {
    pub addrs: HashSet<IpAddr>,
    pub exclude: Vec<Cidr>,
}

impl Ownership {
    pub fn excluded(&self, key: &ServiceKey) -> bool {
        self.exclude.iter().any(|c| c.contains(&key.addr))
    }

    pub fn owns(&self, key: &ServiceKey) -> bool {
        key.fwmark == 0 && self.addrs.contains(&key.addr) && !self.excluded(key)
    }
}

#[derive(Debug, Clone)]
struct Applied {
    vs: VirtualServer,
    dests: HashMap<(IpAddr, u16), Destination>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct SyncReport {
    pub full: bool,
    pub ops: usize,
    pub dumps: usize,
    pub services: usize,
    pub destinations: usize,
    pub terminating: usize,
    /// One line per failed change, naming the object and the kernel's error.
    pub errors: Vec<String>,
}

#[derive(Debug, Default)]
pub struct Reconciler {
    applied: HashMap<ServiceKey, Applied>,
    terminating: BTreeSet<(ServiceKey, (IpAddr, u16))>,
    needs_full: bool,
    synced: bool,
}

fn graceful(protocol: u16) -> bool {
    protocol != IPPROTO_UDP && protocol != IPPROTO_SCTP
}

impl Reconciler {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn needs_full(&self) -> bool {
        self.needs_full || !self.synced
    }

    /// Forget what was programmed; the next sync re-reads the kernel.
    pub fn invalidate(&mut self) {
        self.needs_full = true;
    }

    fn refresh<K: Kernel>(
        &mut self,
        k: &mut K,
        desired: &BTreeMap<&ServiceKey, &Desired>,
        own: &Ownership,
        report: &mut SyncReport,
    ) -> Result<(), IpvsError> {
        let services = k.services()?;
        report.dumps += 1;
        self.applied.clear();
        for vs in services {
            if !desired.contains_key(&vs.key) && !own.owns(&vs.key) {
                continue;
            }
            let dests = k.destinations(&vs.key)?;
            report.dumps += 1;
            self.applied.insert(
                vs.key.clone(),
                Applied {
                    dests: dests.into_iter().map(|d| (d.id(), d)).collect(),
                    vs,
                },
            );
        }
        let applied = &self.applied;
        self.terminating
            .retain(|(k, id)| applied.get(k).is_some_and(|a| a.dests.contains_key(id)));
        Ok(())
    }

    /// Program `desired` (virtual server -> real servers), diffed against everything
    /// programmed. Kernel errors on single objects are reported, not raised; the rest
    /// of the sync is applied and the next sync starts from a fresh dump. Errors of
    /// the socket itself are raised.
    pub fn sync<K: Kernel>(
        &mut self,
        k: &mut K,
        desired: &[Desired],
        own: &Ownership,
        full: bool,
    ) -> Result<SyncReport, IpvsError> {
        let mut report = SyncReport {
            full: full || self.needs_full(),
            ..Default::default()
        };
        let want: BTreeMap<&ServiceKey, &Desired> = desired.iter().map(|e| (&e.0.key, e)).collect();
        if report.full {
            self.refresh(k, &want, own, &mut report)?;
        }
        let mut stale: Vec<&ServiceKey> = self
            .applied
            .keys()
            .filter(|k| !want.contains_key(k) && own.owns(k))
            .collect();
        stale.sort();
        let mut changes: Vec<(ServiceKey, Option<&Desired>)> = want
            .iter()
            .map(|(key, d)| ((*key).clone(), Some(*d)))
            .collect();
        changes.extend(stale.into_iter().map(|key| (key.clone(), None)));
        self.program(k, &changes, own, report)
    }

    /// Program only the virtual servers that changed (Some: desired now, None: no
    /// longer wanted; deleted unless excluded), plus the drained real servers of any
    /// virtual server: O(change), no dump. Call `sync` instead when `needs_full`.
    pub fn sync_changes<K: Kernel>(
        &mut self,
        k: &mut K,
        changes: &[(ServiceKey, Option<Desired>)],
        own: &Ownership,
    ) -> Result<SyncReport, IpvsError> {
        let changes: Vec<(ServiceKey, Option<&Desired>)> = changes
            .iter()
            .map(|(key, d)| (key.clone(), d.as_ref()))
            .collect();
        self.program(k, &changes, own, SyncReport::default())
    }

    fn program<K: Kernel>(
        &mut self,
        k: &mut K,
        changes: &[(ServiceKey, Option<&Desired>)],
        own: &Ownership,
        mut report: SyncReport,
    ) -> Result<SyncReport, IpvsError> {
        let mut ops: Vec<Op> = Vec::new();
        let mut deleted: HashSet<&ServiceKey> = HashSet::new();
        for (key, want) in changes {
            let Some((vs, dests)) = want else {
                if self.applied.contains_key(key) && !own.excluded(key) {
                    ops.push(Op::DelService(key.clone()));
                    deleted.insert(key);
                }
                continue;
            };
            let Some(cur) = self.applied.get(key) else {
                ops.push(Op::AddService(vs.clone()));
                for d in dests {
                    ops.push(Op::AddDest(key.clone(), d.clone()));
                }
                continue;
            };
            if cur.vs != *vs {
                ops.push(Op::EditService(vs.clone()));
            }
            let mut wanted_ids = HashSet::with_capacity(dests.len());
            for d in dests {
                wanted_ids.insert(d.id());
                // Wanted again: no longer draining (the edit below restores it).
                self.terminating.remove(&(key.clone(), d.id()));
                match cur.dests.get(&d.id()) {
                    None => ops.push(Op::AddDest(key.clone(), d.clone())),
                    Some(c) if !c.same_config(d) => ops.push(Op::EditDest(key.clone(), d.clone())),
                    Some(_) => {}
                }
            }
            let mut gone: Vec<&Destination> = cur
                .dests
                .values()
                .filter(|c| !wanted_ids.contains(&c.id()))
                .collect();
            gone.sort_by_key(|c| c.id());
            for c in gone {
                if !graceful(key.protocol) || c.active_conns + c.inactive_conns == 0 && report.full
                {
                    ops.push(Op::DelDest(key.clone(), c.clone()));
                } else if c.weight != 0 {
                    let mut z = c.clone();
                    z.weight = 0;
                    ops.push(Op::EditDest(key.clone(), z));
                } else {
                    self.terminating.insert((key.clone(), c.id()));
                }
            }
        }
        // Draining real servers (weight 0) of every virtual server, changed in this
        // sync or not: one dump of each virtual server that has any, and the drained
        // ones go. Periodic syncs make this the timed re-check of graceful
        // termination. A full sync just read fresh counters and deleted them above.
        if !report.full {
            let check: BTreeSet<ServiceKey> = self
                .terminating
                .iter()
                .map(|(key, _)| key)
                .filter(|key| self.applied.contains_key(*key) && !deleted.contains(key))
                .cloned()
                .collect();
            for key in &check {
                let fresh = match k.destinations(key) {
                    Ok(f) => f,
                    Err(e @ IpvsError::Os { .. }) => {
                        report.errors.push(e.to_string());
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                report.dumps += 1;
                for d in fresh {
                    if self.terminating.contains(&(key.clone(), d.id()))
                        && d.weight == 0
                        && d.active_conns + d.inactive_conns == 0
                    {
                        ops.push(Op::DelDest(key.clone(), d));
                    }
                }
            }
        }
        let failures: HashMap<usize, i32> = if ops.is_empty() {
            HashMap::new()
        } else {
            k.apply(&ops)?.into_iter().collect()
        };
        report.ops = ops.len();
        for (i, op) in ops.into_iter().enumerate() {
            if let Some(errno) = failures.get(&i) {
                report
                    .errors
                    .push(IpvsError::os(op.describe(), *errno).to_string());
                continue;
            }
            self.record(op);
        }
        self.needs_full = !report.errors.is_empty();
        self.synced = true;
        report.services = self.applied.len();
        report.destinations = self.applied.values().map(|a| a.dests.len()).sum();
        report.terminating = self.terminating.len();
        Ok(report)
    }

    fn record(&mut self, op: Op) {
        match op {
            Op::AddService(vs) => {
                self.applied.insert(
                    vs.key.clone(),
                    Applied {
                        vs,
                        dests: HashMap::new(),
                    },
                );
            }
            Op::EditService(vs) => {
                if let Some(a) = self.applied.get_mut(&vs.key) {
                    a.vs = vs;
                }
            }
            Op::DelService(key) => {
                self.applied.remove(&key);
                self.terminating.retain(|(k, _)| *k != key);
            }
            Op::AddDest(key, d) | Op::EditDest(key, d) => {
                let id = (key.clone(), d.id());
                if d.weight == 0 {
                    self.terminating.insert(id);
                } else {
                    self.terminating.remove(&id);
                }
                if let Some(a) = self.applied.get_mut(&key) {
                    a.dests.insert(d.id(), d);
                }
            }
            Op::DelDest(key, d) => {
                self.terminating.remove(&(key.clone(), d.id()));
                if let Some(a) = self.applied.get_mut(&key) {
                    a.dests.remove(&d.id());
                }
            }
            Op::SetTimeouts(_) | Op::Flush => {}
        }
    }
}

/// Real servers of one virtual server in the fake, by (address, port).
pub type FakeDests = BTreeMap<(IpAddr, u16), Destination>;

/// An in-memory IPVS table with the kernel's error behaviour, for tests (as
/// upstream's ipvs `testing/fake.go`).
#[derive(Debug, Default)]
pub struct FakeKernel {
    pub services: BTreeMap<ServiceKey, (VirtualServer, FakeDests)>,
    /// Schedulers whose module is "missing" (ENOENT on add).
    pub missing_schedulers: HashSet<String>,
    /// Real server addresses the kernel refuses (EINVAL).
    pub refused: HashSet<IpAddr>,
    pub applied_ops: usize,
    pub dumps: usize,
}

impl Kernel for FakeKernel {
    fn services(&mut self) -> Result<Vec<VirtualServer>, IpvsError> {
        self.dumps += 1;
        Ok(self.services.values().map(|s| s.0.clone()).collect())
    }

    fn destinations(&mut self, key: &ServiceKey) -> Result<Vec<Destination>, IpvsError> {
        self.dumps += 1;
        match self.services.get(key) {
            Some(s) => Ok(s.1.values().cloned().collect()),
            None => Err(IpvsError::os(
                format!("dump real servers of {key}"),
                libc::ESRCH,
            )),
        }
    }

    fn apply(&mut self, ops: &[Op]) -> Result<Vec<(usize, i32)>, IpvsError> {
        let mut failures = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            self.applied_ops += 1;
            let r = match op {
                Op::AddService(vs) => {
                    if self.missing_schedulers.contains(&vs.scheduler) {
                        Err(libc::ENOENT)
                    } else if self.services.contains_key(&vs.key) {
                        Err(libc::EEXIST)
                    } else {
                        self.services
                            .insert(vs.key.clone(), (vs.clone(), BTreeMap::new()));
                        Ok(())
                    }
                }
                Op::EditService(vs) => match self.services.get_mut(&vs.key) {
                    Some(s) => {
                        s.0 = vs.clone();
                        Ok(())
                    }
                    None => Err(libc::ESRCH),
                },
                Op::DelService(key) => match self.services.remove(key) {
                    Some(_) => Ok(()),
                    None => Err(libc::ESRCH),
                },
                Op::AddDest(key, d) => match self.services.get_mut(key) {
                    None => Err(libc::ESRCH),
                    Some(_) if self.refused.contains(&d.addr) => Err(libc::EINVAL),
                    Some(s) if s.1.contains_key(&d.id()) => Err(libc::EEXIST),
                    Some(s) => {
                        s.1.insert(d.id(), d.clone());
                        Ok(())
                    }
                },
                Op::EditDest(key, d) => match self
                    .services
                    .get_mut(key)
                    .and_then(|s| s.1.get_mut(&d.id()))
                {
                    None => Err(libc::ENOENT),
                    Some(cur) => {
                        cur.weight = d.weight;
                        cur.fwd_method = d.fwd_method;
                        cur.u_threshold = d.u_threshold;
                        cur.l_threshold = d.l_threshold;
                        Ok(())
                    }
                },
                Op::DelDest(key, d) => {
                    match self.services.get_mut(key).and_then(|s| s.1.remove(&d.id())) {
                        None => Err(libc::ENOENT),
                        Some(_) => Ok(()),
                    }
                }
                Op::SetTimeouts(_) => Ok(()),
                Op::Flush => {
                    self.services.clear();
                    Ok(())
                }
            };
            if let Err(e) = r {
                failures.push((i, e));
            }
        }
        Ok(failures)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipvs::{Destination, IPPROTO_TCP};

    fn vs(ip: &str, port: u16, proto: u16) -> VirtualServer {
        VirtualServer {
            key: ServiceKey {
                addr: ip.parse().unwrap(),
                protocol: proto,
                port,
                fwmark: 0,
            },
            scheduler: "rr".into(),
            flags: 0,
            timeout: 0,
        }
    }

    fn d(ip: &str, port: u16) -> Destination {
        Destination::new(ip.parse().unwrap(), port, 1)
    }

    fn own(addrs: &[&str]) -> Ownership {
        Ownership {
            addrs: addrs.iter().map(|a| a.parse().unwrap()).collect(),
            exclude: vec![],
        }
    }

    #[test]
    fn first_sync_adds_everything_then_nothing() {
        let mut k = FakeKernel::default();
        let mut r = Reconciler::new();
        let want = vec![(
            vs("10.96.0.1", 80, IPPROTO_TCP),
            vec![d("10.1.0.1", 8080), d("10.1.0.2", 8080)],
        )];
        let o = own(&["10.96.0.1"]);
        let rep = r.sync(&mut k, &want, &o, false).unwrap();
        assert_eq!(rep.ops, 3);
        assert!(rep.errors.is_empty());
        assert_eq!(k.services.len(), 1);
        let rep = r.sync(&mut k, &want, &o, false).unwrap();
        assert_eq!(rep.ops, 0);
        assert_eq!(rep.dumps, 0);
        // A full sync re-reads but changes nothing.
        let rep = r.sync(&mut k, &want, &o, true).unwrap();
        assert_eq!(rep.ops, 0);
        assert_eq!(rep.dumps, 2);
    }

    #[test]
    fn one_endpoint_change_costs_one_op_without_dumps() {
        let mut k = FakeKernel::default();
        let mut r = Reconciler::new();
        let mut want: Vec<_> = (0..1000)
            .map(|i| {
                let ip = format!("10.96.{}.{}", i / 250, i % 250 + 1);
                (
                    vs(&ip, 80, IPPROTO_TCP),
                    vec![d("10.1.0.1", 80), d("10.1.0.2", 80)],
                )
            })
            .collect();
        let o = Ownership::default();
        r.sync(&mut k, &want, &o, false).unwrap();
        want[500].1.push(d("10.1.0.3", 80));
        let dumps = k.dumps;
        let rep = r.sync(&mut k, &want, &o, false).unwrap();
        assert_eq!(rep.ops, 1);
        assert_eq!(k.dumps, dumps);
    }

    #[test]
    fn tcp_real_server_drains_udp_goes_at_once() {
        let mut k = FakeKernel::default();
        let mut r = Reconciler::new();
        let o = own(&["10.96.0.1"]);
        let mut want = vec![
            (
                vs("10.96.0.1", 80, IPPROTO_TCP),
                vec![d("10.1.0.1", 80), d("10.1.0.2", 80)],
            ),
            (
                vs("10.96.0.1", 53, IPPROTO_UDP),
                vec![d("10.1.0.1", 53), d("10.1.0.2", 53)],
            ),
        ];
        r.sync(&mut k, &want, &o, false).unwrap();
        want[0].1.pop();
        want[1].1.pop();
        let rep = r.sync(&mut k, &want, &o, false).unwrap();
        assert_eq!(rep.terminating, 1);
        let tcp = &k.services[&want[0].0.key].1;
        assert_eq!(tcp[&("10.1.0.2".parse().unwrap(), 80)].weight, 0);
        assert_eq!(k.services[&want[1].0.key].1.len(), 1);
        // Connections still open: kept.
        k.services
            .get_mut(&want[0].0.key)
            .unwrap()
            .1
            .get_mut(&("10.1.0.2".parse().unwrap(), 80))
            .unwrap()
            .active_conns = 2;
        r.sync(&mut k, &want, &o, false).unwrap();
        assert_eq!(k.services[&want[0].0.key].1.len(), 2);
        // Drained: deleted.
        k.services
            .get_mut(&want[0].0.key)
            .unwrap()
            .1
            .get_mut(&("10.1.0.2".parse().unwrap(), 80))
            .unwrap()
            .active_conns = 0;
        let rep = r.sync(&mut k, &want, &o, false).unwrap();
        assert_eq!(k.services[&want[0].0.key].1.len(), 1);
        assert_eq!(rep.terminating, 0);
        // Coming back while terminating restores the weight.
        want[0].1.push(d("10.1.0.2", 80));
        r.sync(&mut k, &want, &o, false).unwrap();
        assert_eq!(k.services[&want[0].0.key].1.len(), 2);
    }

    #[test]
    fn deletes_only_owned_and_not_excluded() {
        let mut k = FakeKernel::default();
        for ip in ["10.96.0.1", "192.168.5.5", "10.96.0.2"] {
            let v = vs(ip, 80, IPPROTO_TCP);
            k.services.insert(v.key.clone(), (v, BTreeMap::new()));
        }
        let mut r = Reconciler::new();
        let o = Ownership {
            addrs: ["10.96.0.1", "10.96.0.2"]
                .iter()
                .map(|a| a.parse().unwrap())
                .collect(),
            exclude: vec![Cidr::parse("10.96.0.2/32").unwrap()],
        };
        let rep = r.sync(&mut k, &[], &o, true).unwrap();
        assert_eq!(rep.ops, 1);
        let left: Vec<String> = k.services.keys().map(|k| k.addr.to_string()).collect();
        assert_eq!(left, vec!["10.96.0.2", "192.168.5.5"]);
    }

    #[test]
    fn failures_name_the_object_rest_applied_next_sync_retries() {
        let mut k = FakeKernel::default();
        k.missing_schedulers.insert("mh".into());
        k.refused.insert("10.1.0.9".parse().unwrap());
        let mut r = Reconciler::new();
        let mut bad = vs("10.96.0.3", 80, IPPROTO_TCP);
        bad.scheduler = "mh".into();
        let want = vec![
            (
                vs("10.96.0.1", 80, IPPROTO_TCP),
                vec![d("10.1.0.1", 80), d("10.1.0.9", 80)],
            ),
            (bad, vec![d("10.1.0.1", 80)]),
            (vs("10.96.0.2", 80, IPPROTO_TCP), vec![d("10.1.0.1", 80)]),
        ];
        let o = Ownership::default();
        let rep = r.sync(&mut k, &want, &o, false).unwrap();
        assert_eq!(rep.errors.len(), 3, "{:?}", rep.errors);
        assert!(
            rep.errors[0].contains("10.1.0.9:80 to TCP 10.96.0.1:80"),
            "{:?}",
            rep.errors
        );
        assert!(
            rep.errors[1].contains("TCP 10.96.0.3:80 (mh)"),
            "{:?}",
            rep.errors
        );
        assert_eq!(k.services.len(), 2);
        assert!(r.needs_full());
        k.missing_schedulers.clear();
        k.refused.clear();
        let rep = r.sync(&mut k, &want, &o, false).unwrap();
        assert!(rep.full);
        assert!(rep.errors.is_empty(), "{:?}", rep.errors);
        assert_eq!(k.services.len(), 3);
        assert_eq!(k.services[&want[0].0.key].1.len(), 2);
    }

    #[test]
    fn changes_only_touch_their_services_and_draining_is_rechecked() {
        let mut k = FakeKernel::default();
        let mut r = Reconciler::new();
        let o = own(&["10.96.0.1", "10.96.0.2"]);
        let a = (
            vs("10.96.0.1", 80, IPPROTO_TCP),
            vec![d("10.1.0.1", 80), d("10.1.0.2", 80)],
        );
        let b = (vs("10.96.0.2", 80, IPPROTO_TCP), vec![d("10.1.0.1", 80)]);
        r.sync(&mut k, &[a.clone(), b.clone()], &o, true).unwrap();
        // a loses a real server with open connections: weight 0, kept.
        let mut a2 = a.clone();
        a2.1.pop();
        let rep = r
            .sync_changes(&mut k, &[(a.0.key.clone(), Some(a2.clone()))], &o)
            .unwrap();
        assert_eq!((rep.ops, rep.dumps, rep.terminating), (1, 0, 1));
        let id = ("10.1.0.2".parse().unwrap(), 80);
        let conns = |k: &mut FakeKernel, n: u32| {
            k.services
                .get_mut(&a.0.key)
                .unwrap()
                .1
                .get_mut(&id)
                .unwrap()
                .active_conns = n;
        };
        conns(&mut k, 3);
        // A change of b only: a's draining real server is re-checked (one dump), kept.
        let mut b2 = b.clone();
        b2.1.push(d("10.1.0.7", 80));
        let rep = r
            .sync_changes(&mut k, &[(b.0.key.clone(), Some(b2.clone()))], &o)
            .unwrap();
        assert_eq!((rep.ops, rep.dumps), (1, 1));
        assert_eq!(k.services[&a.0.key].1.len(), 2);
        // Drained: a sync without any change deletes it.
        conns(&mut k, 0);
        let rep = r.sync_changes(&mut k, &[], &o).unwrap();
        assert_eq!((rep.ops, rep.dumps, rep.terminating), (1, 1, 0));
        assert_eq!(k.services[&a.0.key].1.len(), 1);
        // Nothing draining: a sync without changes costs nothing.
        let rep = r.sync_changes(&mut k, &[], &o).unwrap();
        assert_eq!((rep.ops, rep.dumps), (0, 0));
        // A removed virtual server goes; an excluded one stays.
        let o2 = Ownership {
            addrs: o.addrs.clone(),
            exclude: vec![Cidr::parse("10.96.0.2/32").unwrap()],
        };
        let rep = r
            .sync_changes(
                &mut k,
                &[(a.0.key.clone(), None), (b.0.key.clone(), None)],
                &o2,
            )
            .unwrap();
        assert_eq!(rep.ops, 1);
        let left: Vec<String> = k.services.keys().map(|k| k.addr.to_string()).collect();
        assert_eq!(left, vec!["10.96.0.2"]);
    }

    #[test]
    fn a_draining_real_server_wanted_again_is_restored_not_deleted() {
        let mut k = FakeKernel::default();
        let mut r = Reconciler::new();
        let o = own(&["10.96.0.1"]);
        let a = (
            vs("10.96.0.1", 80, IPPROTO_TCP),
            vec![d("10.1.0.1", 80), d("10.1.0.2", 80)],
        );
        r.sync(&mut k, std::slice::from_ref(&a), &o, true).unwrap();
        let mut a2 = a.clone();
        a2.1.pop();
        r.sync_changes(&mut k, &[(a.0.key.clone(), Some(a2))], &o)
            .unwrap();
        let rep = r
            .sync_changes(&mut k, &[(a.0.key.clone(), Some(a.clone()))], &o)
            .unwrap();
        assert_eq!((rep.ops, rep.terminating), (1, 0));
        let dests = &k.services[&a.0.key].1;
        assert_eq!(dests.len(), 2);
        assert!(dests.values().all(|d| d.weight == 1));
    }
}
