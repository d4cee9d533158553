//! Binding of the IPVS client: a generic-netlink socket, the reconciler, the planner
//! (model -> virtual servers, ipsets, kube-ipvs0 addresses) and the wire codec the
//! wire tests compare against pyroute2. Every call that touches the kernel goes
//! through `io`, which releases the GIL and maps errors.

use std::collections::HashSet;

use pyo3::exceptions::PyOSError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyModule};

use kproxy_core::ipvs::desired::{plan, Desired, IpvsConfig, PlanServices, Planner};
use kproxy_core::ipvs::reconcile::{Ownership, Reconciler};
use kproxy_core::ipvs::socket::IpvsSocket as CoreSocket;
use kproxy_core::ipvs::{wire, IpvsError, Kernel, Op, ServiceKey, Timeouts};
use kproxy_core::net::{parse_ip, Cidr};
use kproxy_core::Error;

use crate::{to_py, Model};

/// IPVS errors: an errno becomes the matching OSError subclass (ENOENT ->
/// FileNotFoundError, ...); a malformed reply becomes kproxy.SyncError.
fn ipvs_err(py: Python<'_>, e: IpvsError) -> PyErr {
    match e {
        IpvsError::Os { ref context, errno } => {
            let msg = format!("{context}: {}", std::io::Error::from_raw_os_error(errno));
            PyOSError::new_err((errno, msg))
        }
        IpvsError::Protocol(_) => {
            match PyModule::import(py, "kproxy.errors").and_then(|m| m.getattr("SyncError")) {
                Ok(cls) => match cls.call1((e.to_string(),)) {
                    Ok(inst) => PyErr::from_value(inst),
                    Err(err) => err,
                },
                Err(err) => err,
            }
        }
    }
}

/// The one GIL chokepoint of this module.
fn io<T: Send>(py: Python<'_>, f: impl FnOnce() -> Result<T, IpvsError> + Send) -> PyResult<T> {
    py.allow_threads(f).map_err(|e| ipvs_err(py, e))
}

/// Parse a JSON argument (macros, because this crate does not depend on serde itself).
macro_rules! json_arg {
    ($py:expr, $what:expr, $s:expr) => {
        serde_json::from_str($s).map_err(|e| to_py($py, Error::config($what, e.to_string())))
    };
}

macro_rules! to_json {
    ($py:expr, $v:expr) => {
        serde_json::to_string($v).map_err(|e| to_py($py, Error::from(e)))
    };
}

/// A generic-netlink socket bound to the kernel's IPVS family.
#[pyclass(module = "kproxy._core")]
struct IpvsSocket {
    inner: CoreSocket,
}

#[pymethods]
impl IpvsSocket {
    /// Raises FileNotFoundError when the kernel has no IPVS.
    #[new]
    fn new(py: Python<'_>) -> PyResult<Self> {
        let inner = io(py, CoreSocket::open)?;
        Ok(IpvsSocket { inner })
    }

    #[getter]
    fn family_id(&self) -> u16 {
        self.inner.family_id()
    }

    /// JSON list of virtual servers (one dump).
    fn services(&mut self, py: Python<'_>) -> PyResult<String> {
        let inner = &mut self.inner;
        let v = io(py, || inner.services())?;
        to_json!(py, &v)
    }

    /// JSON list of the real servers of one virtual server (given as JSON).
    fn destinations(&mut self, py: Python<'_>, service_json: &str) -> PyResult<String> {
        let key: ServiceKey = json_arg!(py, "ipvs service", service_json)?;
        let inner = &mut self.inner;
        let v = io(py, || inner.destinations(&key))?;
        to_json!(py, &v)
    }

    /// Apply a JSON list of ops in batches; returns (index, errno) of each failure.
    fn apply(&mut self, py: Python<'_>, ops_json: &str) -> PyResult<Vec<(usize, i32)>> {
        let ops: Vec<Op> = json_arg!(py, "ipvs ops", ops_json)?;
        let inner = &mut self.inner;
        io(py, || inner.apply(&ops))
    }

    /// (tcp, tcpfin, udp) connection timeouts in seconds.
    fn timeouts(&mut self, py: Python<'_>) -> PyResult<(u32, u32, u32)> {
        let inner = &mut self.inner;
        let t = io(py, || inner.timeouts())?;
        Ok((t.tcp, t.tcp_fin, t.udp))
    }

    /// Set the timeouts; 0 leaves a value unchanged.
    fn set_timeouts(&mut self, py: Python<'_>, tcp: u32, tcpfin: u32, udp: u32) -> PyResult<()> {
        let op = Op::SetTimeouts(Timeouts {
            tcp,
            tcp_fin: tcpfin,
            udp,
        });
        let inner = &mut self.inner;
        let failures = io(py, || inner.apply(std::slice::from_ref(&op)))?;
        match failures.first() {
            Some((_, errno)) => Err(ipvs_err(py, IpvsError::os(op.describe(), *errno))),
            None => Ok(()),
        }
    }
}

/// Remembers what was programmed; diffs each plan against it (see kproxy-core).
#[pyclass(module = "kproxy._core")]
struct IpvsReconciler {
    inner: Reconciler,
}

#[pymethods]
impl IpvsReconciler {
    #[new]
    fn new() -> Self {
        IpvsReconciler {
            inner: Reconciler::new(),
        }
    }

    /// Program the plan's virtual servers. `owned` are the addresses whose virtual
    /// servers kproxy may delete, minus `exclude_cidrs`. Returns the report as JSON;
    /// per-object kernel errors are in its "errors", socket failures raise OSError.
    #[pyo3(signature = (sock, plan_json, owned, exclude_cidrs, full=false))]
    fn sync(
        &mut self,
        py: Python<'_>,
        mut sock: PyRefMut<'_, IpvsSocket>,
        plan_json: &str,
        owned: Vec<String>,
        exclude_cidrs: Vec<String>,
        full: bool,
    ) -> PyResult<String> {
        let plan: PlanServices = json_arg!(py, "ipvs plan", plan_json)?;
        let own = ownership(py, &owned, &exclude_cidrs)?;
        let inner = &mut self.inner;
        let sock = &mut sock.inner;
        let report = io(py, || inner.sync(sock, &plan.services, &own, full))?;
        to_json!(py, &report)
    }

    #[getter]
    fn needs_full(&self) -> bool {
        self.inner.needs_full()
    }

    fn invalidate(&mut self) {
        self.inner.invalidate();
    }
}

fn ownership(py: Python<'_>, owned: &[String], exclude_cidrs: &[String]) -> PyResult<Ownership> {
    let mut own = Ownership {
        addrs: HashSet::new(),
        exclude: Vec::new(),
    };
    for a in owned {
        let ip = parse_ip(a).ok_or_else(|| {
            to_py(
                py,
                Error::config("ipvs owned address", format!("{a:?} is not an IP")),
            )
        })?;
        own.addrs.insert(ip);
    }
    for c in exclude_cidrs {
        let cidr = Cidr::parse(c).ok_or_else(|| {
            to_py(
                py,
                Error::config("ipvs_exclude_cidrs", format!("{c:?} is not a CIDR")),
            )
        })?;
        own.exclude.push(cidr);
    }
    Ok(own)
}

/// The ipvs mode's state for one IP family: the planner (re-plans only the Services
/// the model's change log names) and the reconciler (what was programmed). A sync is
/// `plan` (returns the address and ipset changes for Python to apply) then
/// `program` (the virtual servers of that plan); the virtual servers never cross
/// into Python.
#[pyclass(module = "kproxy._core")]
struct IpvsProxier {
    planner: Planner,
    reconciler: Reconciler,
    pending: Vec<(ServiceKey, Option<Desired>)>,
    pending_full: bool,
}

#[pymethods]
impl IpvsProxier {
    #[new]
    fn new() -> Self {
        IpvsProxier {
            planner: Planner::new(),
            reconciler: Reconciler::new(),
            pending: Vec::new(),
            pending_full: false,
        }
    }

    /// Plan the Services changed since the last plan (all when `full`, on the first
    /// call, or when the config changed). Returns JSON {full, bind_add, bind_del,
    /// ipset_add, ipset_del, health_checks, warnings, conntrack, replanned}; on a full
    /// plan the additions are everything and the removals empty.
    #[pyo3(signature = (model, config_json, full=false))]
    fn plan(
        &mut self,
        py: Python<'_>,
        model: PyRef<'_, Model>,
        config_json: &str,
        full: bool,
    ) -> PyResult<String> {
        let cfg: IpvsConfig = json_arg!(py, "ipvs config", config_json)?;
        let m = &model.inner;
        let planner = &mut self.planner;
        let mut delta = py
            .allow_threads(|| planner.plan(m, &cfg, full))
            .map_err(|e| to_py(py, e))?;
        self.pending_full = delta.full;
        self.pending = std::mem::take(&mut delta.services);
        to_json!(py, &delta)
    }

    /// Program the virtual servers of the last plan. A full plan (or a reconciler
    /// that lost track after an error) reconciles against one kernel dump, deleting
    /// kproxy's virtual servers that are no longer wanted: those on `owned` addresses
    /// and on the addresses the plan binds, minus `exclude_cidrs`. Otherwise only
    /// the changed virtual servers are programmed. Returns the report as JSON.
    fn program(
        &mut self,
        py: Python<'_>,
        mut sock: PyRefMut<'_, IpvsSocket>,
        owned: Vec<String>,
        exclude_cidrs: Vec<String>,
    ) -> PyResult<String> {
        let mut own = ownership(py, &owned, &exclude_cidrs)?;
        let changes = std::mem::take(&mut self.pending);
        let full = self.pending_full || self.reconciler.needs_full();
        self.pending_full = false;
        let sock = &mut sock.inner;
        let reconciler = &mut self.reconciler;
        let planner = &self.planner;
        let report = if full {
            own.addrs.extend(planner.bind_addrs().copied());
            let desired: Vec<Desired> = planner.desired().cloned().collect();
            io(py, || reconciler.sync(sock, &desired, &own, true))?
        } else {
            io(py, || reconciler.sync_changes(sock, &changes, &own))?
        };
        to_json!(py, &report)
    }

    /// Forget what was planned and programmed: the next sync is full.
    fn invalidate(&mut self) {
        self.planner.invalidate();
        self.reconciler.invalidate();
        self.pending.clear();
    }
}

/// The IPVS plan of a model for one family, as JSON (services, bind_addrs, ipsets,
/// health_checks, warnings).
#[pyfunction]
fn ipvs_plan(py: Python<'_>, model: PyRef<'_, Model>, config_json: &str) -> PyResult<String> {
    let cfg: IpvsConfig = json_arg!(py, "ipvs config", config_json)?;
    let m = &model.inner;
    let p = py
        .allow_threads(|| plan(m, &cfg))
        .map_err(|e| to_py(py, e))?;
    to_json!(py, &p)
}

/// Encode one op (JSON) as the netlink request kproxy sends.
#[pyfunction]
fn ipvs_encode<'py>(
    py: Python<'py>,
    op_json: &str,
    family: u16,
    seq: u32,
) -> PyResult<Bound<'py, PyBytes>> {
    let op: Op = json_arg!(py, "ipvs op", op_json)?;
    let b = wire::encode_op(Vec::new(), family, seq, &op);
    Ok(PyBytes::new(py, &b))
}

/// Decode one IPVS netlink message into JSON {cmd, service, dest, timeouts}.
#[pyfunction]
fn ipvs_decode(py: Python<'_>, data: &[u8]) -> PyResult<String> {
    let d = wire::decode_message(data).map_err(|e| ipvs_err(py, e))?;
    let v = serde_json::json!({
        "cmd": d.cmd,
        "service": d.service,
        "dest": d.dest,
        "timeouts": d.timeouts,
    });
    Ok(v.to_string())
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<IpvsSocket>()?;
    m.add_class::<IpvsReconciler>()?;
    m.add_class::<IpvsProxier>()?;
    m.add_function(wrap_pyfunction!(ipvs_plan, m)?)?;
    m.add_function(wrap_pyfunction!(ipvs_encode, m)?)?;
    m.add_function(wrap_pyfunction!(ipvs_decode, m)?)?;
    Ok(())
}
