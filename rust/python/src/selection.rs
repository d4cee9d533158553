//! Binding of backend selection (`Selector`, `maglev_table`) and route lookup
//! (`RouteTable`). Bulk calls (`pick_many`, `lookup_many`) release the GIL.

use std::sync::OnceLock;
use std::time::Instant;

use pyo3::prelude::*;
use pyo3::types::PyModule;

use kproxy_core::lookup::{Flow, Route, Table, TableConfig};
use kproxy_core::net::Cidr;
use kproxy_core::selection::{AlgorithmKind, Selector as CoreSelector, SelectorConfig};
use kproxy_core::Error;

use crate::to_py;

/// (verdict, endpoints, masquerade, reason, service)
type RouteTuple = (String, Vec<String>, bool, String, Option<String>);

fn route_tuple(r: Route) -> RouteTuple {
    (
        r.verdict.name().to_string(),
        r.endpoints,
        r.masquerade,
        r.reason,
        r.service,
    )
}

fn no_route(py: Python<'_>, msg: String) -> PyErr {
    match PyModule::import(py, "kproxy.errors").and_then(|m| m.getattr("NoRouteError")) {
        Ok(cls) => match cls.call1((msg,)) {
            Ok(inst) => PyErr::from_value(inst),
            Err(e) => e,
        },
        Err(e) => e,
    }
}

/// Seconds on a process-wide monotonic clock (the default `now`).
fn monotonic() -> f64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs_f64()
}

fn parse_ip(py: Python<'_>, field: &str, s: &str) -> PyResult<std::net::IpAddr> {
    s.parse().map_err(|_| {
        to_py(
            py,
            Error::config(field, format!("{s:?} is not an IP address")),
        )
    })
}

/// One service port's endpoint selection: an algorithm, live connection counts and
/// optional ClientIP session affinity.
#[pyclass(module = "kproxy._core")]
struct Selector {
    inner: CoreSelector,
}

#[pymethods]
impl Selector {
    #[new]
    #[pyo3(signature = (algorithm, endpoints, weights=None, *, table_size=16381, seed=0, affinity_timeout=None, affinity_capacity=65536))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        algorithm: &str,
        endpoints: Vec<String>,
        weights: Option<Vec<i64>>,
        table_size: usize,
        seed: u64,
        affinity_timeout: Option<f64>,
        affinity_capacity: usize,
    ) -> PyResult<Self> {
        let kind = AlgorithmKind::parse_or_err(algorithm).map_err(|e| to_py(py, e))?;
        let cfg = SelectorConfig {
            kind,
            table_size,
            seed,
            affinity_timeout,
            affinity_capacity,
        };
        let mut inner = CoreSelector::new(cfg).map_err(|e| to_py(py, e))?;
        py.allow_threads(|| inner.set_endpoints(&endpoints, weights.as_deref()))
            .map_err(|e| to_py(py, e))?;
        Ok(Selector { inner })
    }

    /// Replace the endpoints; returns False (and keeps all state) when unchanged.
    #[pyo3(signature = (endpoints, weights=None))]
    fn set_endpoints(
        &mut self,
        py: Python<'_>,
        endpoints: Vec<String>,
        weights: Option<Vec<i64>>,
    ) -> PyResult<bool> {
        let inner = &mut self.inner;
        py.allow_threads(|| inner.set_endpoints(&endpoints, weights.as_deref()))
            .map_err(|e| to_py(py, e))
    }

    /// One endpoint for a new flow from `src_ip`; raises NoRouteError when none has a weight.
    #[pyo3(signature = (src_ip, now=None))]
    fn pick(&mut self, py: Python<'_>, src_ip: &str, now: Option<f64>) -> PyResult<String> {
        let src = parse_ip(py, "src_ip", src_ip)?;
        let now = now.unwrap_or_else(monotonic);
        match self.inner.pick_name(&src, now) {
            Some(n) => Ok(n.to_string()),
            None => Err(no_route(py, "the selector has no endpoints".into())),
        }
    }

    /// `pick` for many flows at once, without the GIL.
    #[pyo3(signature = (src_ips, now=None))]
    fn pick_many(
        &mut self,
        py: Python<'_>,
        src_ips: Vec<String>,
        now: Option<f64>,
    ) -> PyResult<Vec<String>> {
        let mut srcs = Vec::with_capacity(src_ips.len());
        for s in &src_ips {
            srcs.push(parse_ip(py, "src_ips", s)?);
        }
        let now = now.unwrap_or_else(monotonic);
        let inner = &mut self.inner;
        let out: Option<Vec<String>> = py.allow_threads(|| {
            srcs.iter()
                .map(|s| inner.pick_name(s, now).map(|n| n.to_string()))
                .collect()
        });
        out.ok_or_else(|| no_route(py, "the selector has no endpoints".into()))
    }

    /// A connection to `endpoint` ended (least-conn counts it down).
    fn release(&mut self, endpoint: &str) {
        self.inner.release(endpoint);
    }

    /// Replace the live connection counts (endpoints not named get 0).
    fn set_connections(&mut self, counts: std::collections::HashMap<String, u64>) {
        let v: Vec<(String, u64)> = counts.into_iter().collect();
        self.inner.set_connections(&v);
    }

    fn connections(&self) -> std::collections::HashMap<String, u64> {
        self.inner.connections().into_iter().collect()
    }

    /// Maglev's lookup table as endpoint names per slot (None for other algorithms).
    fn maglev_table(&self) -> Option<Vec<String>> {
        let backends = self.inner.backends();
        self.inner.maglev_table().map(|t| {
            t.iter()
                .map(|&i| {
                    backends
                        .get(i as usize)
                        .map(|b| b.name.clone())
                        .unwrap_or_default()
                })
                .collect()
        })
    }

    #[getter]
    fn algorithm(&self) -> &'static str {
        self.inner.kind().name()
    }

    /// Endpoints that can be picked (weight >= 1), in order.
    #[getter]
    fn endpoints(&self) -> Vec<String> {
        self.inner
            .backends()
            .iter()
            .map(|b| b.name.clone())
            .collect()
    }

    /// How often the algorithm was rebuilt (only endpoint changes rebuild).
    #[getter]
    fn rebuilds(&self) -> u64 {
        self.inner.rebuilds()
    }

    #[getter]
    fn affinity_entries(&self) -> usize {
        self.inner.affinity_entries()
    }
}

/// Services and endpoints as seen from one node, answering "where does this flow go?".
#[pyclass(module = "kproxy._core")]
struct RouteTable {
    inner: Table,
}

#[pymethods]
impl RouteTable {
    #[new]
    #[pyo3(signature = (node_name, *, zone=None, cluster_cidrs=Vec::new(), node_ips=Vec::new(), masquerade_all=false, localhost_nodeports=true, default_algorithm="random"))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        node_name: &str,
        zone: Option<String>,
        cluster_cidrs: Vec<String>,
        node_ips: Vec<String>,
        masquerade_all: bool,
        localhost_nodeports: bool,
        default_algorithm: &str,
    ) -> PyResult<Self> {
        let mut cfg = TableConfig::new(node_name);
        cfg.zone = zone;
        for c in &cluster_cidrs {
            let cidr = Cidr::parse(c).ok_or_else(|| {
                to_py(
                    py,
                    Error::config("cluster_cidrs", format!("invalid CIDR {c:?}")),
                )
            })?;
            cfg.cluster_cidrs.push(cidr);
        }
        for ip in &node_ips {
            cfg.node_ips.push(parse_ip(py, "node_ips", ip)?);
        }
        cfg.masquerade_all = masquerade_all;
        cfg.localhost_nodeports = localhost_nodeports;
        cfg.default_algorithm =
            AlgorithmKind::parse_or_err(default_algorithm).map_err(|e| to_py(py, e))?;
        Ok(RouteTable {
            inner: Table::new(cfg),
        })
    }

    /// Set a Service from its JSON, or delete it with None. Returns warnings.
    #[pyo3(signature = (key, obj))]
    fn set_service(
        &mut self,
        py: Python<'_>,
        key: &str,
        obj: Option<&str>,
    ) -> PyResult<Vec<String>> {
        let value = obj
            .map(|s| serde_json::from_str(s).map_err(|e| to_py(py, Error::from(e))))
            .transpose()?;
        self.inner
            .set_service(key, value.as_ref())
            .map_err(|e| to_py(py, e))
    }

    /// Set an EndpointSlice from its JSON, or delete it with None. Returns warnings.
    #[pyo3(signature = (key, obj))]
    fn set_endpoint_slice(
        &mut self,
        py: Python<'_>,
        key: &str,
        obj: Option<&str>,
    ) -> PyResult<Vec<String>> {
        let value = obj
            .map(|s| serde_json::from_str(s).map_err(|e| to_py(py, Error::from(e))))
            .transpose()?;
        self.inner
            .set_endpoint_slice(key, value.as_ref())
            .map_err(|e| to_py(py, e))
    }

    /// (verdict, endpoints, masquerade, reason, service) of one flow.
    fn lookup(
        &mut self,
        py: Python<'_>,
        protocol: &str,
        dst_ip: &str,
        dst_port: i64,
        src_ip: &str,
        origin: &str,
    ) -> PyResult<RouteTuple> {
        let flow =
            Flow::parse(protocol, dst_ip, dst_port, src_ip, origin).map_err(|e| to_py(py, e))?;
        Ok(route_tuple(self.inner.lookup(&flow)))
    }

    /// `lookup` for many (protocol, dst_ip, dst_port, src_ip, origin) flows, without the GIL.
    fn lookup_many(
        &mut self,
        py: Python<'_>,
        flows: Vec<(String, String, i64, String, String)>,
    ) -> PyResult<Vec<RouteTuple>> {
        let inner = &mut self.inner;
        let out: Result<Vec<RouteTuple>, Error> = py.allow_threads(|| {
            inner.prepare();
            let t: &Table = inner;
            flows
                .iter()
                .map(|(p, d, dp, s, o)| {
                    Flow::parse(p, d, *dp, s, o).map(|f| route_tuple(t.lookup_prepared(&f)))
                })
                .collect()
        });
        out.map_err(|e| to_py(py, e))
    }

    /// (route, endpoint or None): look up and pick with the Service's algorithm.
    #[pyo3(signature = (protocol, dst_ip, dst_port, src_ip, origin, now=None))]
    #[allow(clippy::too_many_arguments)]
    fn pick(
        &mut self,
        py: Python<'_>,
        protocol: &str,
        dst_ip: &str,
        dst_port: i64,
        src_ip: &str,
        origin: &str,
        now: Option<f64>,
    ) -> PyResult<(RouteTuple, Option<String>)> {
        let flow =
            Flow::parse(protocol, dst_ip, dst_port, src_ip, origin).map_err(|e| to_py(py, e))?;
        let (route, ep) = self.inner.pick(&flow, now.unwrap_or_else(monotonic));
        Ok((route_tuple(route), ep))
    }

    /// The algorithm each Service port uses: {"ns/name:port": algorithm}.
    fn algorithms(&self) -> std::collections::HashMap<String, String> {
        let mut out = std::collections::HashMap::new();
        for svc in self.inner.model().services() {
            for sp in &svc.ports {
                out.insert(
                    sp.name.to_string(),
                    self.inner.algorithm(sp).name().to_string(),
                );
            }
        }
        out
    }

    fn __len__(&self) -> usize {
        self.inner.model().service_count()
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Selector>()?;
    m.add_class::<RouteTable>()?;
    Ok(())
}
