//! The thin pyo3 binding that builds `kproxy._core`. All logic lives in kproxy-core;
//! this crate converts types, releases the GIL for long calls and maps errors.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyModule;

use kproxy_core::iptables::{render_cleanup, IptablesConfig, IptablesRenderer as CoreRenderer};
use kproxy_core::model::Model as CoreModel;
use kproxy_core::Error;

mod forwarder;
mod ipvs;
mod nftables;
mod selection;

/// The one error funnel: core errors become kproxy's Python exceptions.
pub(crate) fn to_py(py: Python<'_>, e: Error) -> PyErr {
    let class = match &e {
        Error::InvalidConfig { .. } => "ConfigError",
        Error::InvalidObject { .. } | Error::Json(_) => "ObjectError",
    };
    match PyModule::import(py, "kproxy.errors").and_then(|m| m.getattr(class)) {
        Ok(cls) => match cls.call1((e.to_string(),)) {
            Ok(inst) => PyErr::from_value(inst),
            Err(err) => err,
        },
        Err(_) => PyValueError::new_err(e.to_string()),
    }
}

fn parse_json(py: Python<'_>, s: &str) -> PyResult<serde_json::Value> {
    serde_json::from_str(s).map_err(|e| to_py(py, Error::from(e)))
}

/// Parse an object's JSON (None = delete), apply it, and return warnings as text.
fn set_object(
    py: Python<'_>,
    obj: Option<&str>,
    apply: impl FnOnce(Option<&serde_json::Value>) -> kproxy_core::Result<Vec<Error>>,
) -> PyResult<Vec<String>> {
    let value = obj.map(|s| parse_json(py, s)).transpose()?;
    let warnings = apply(value.as_ref()).map_err(|e| to_py(py, e))?;
    Ok(warnings.into_iter().map(|w| w.to_string()).collect())
}

/// Services and EndpointSlices, keyed by "namespace/name".
#[pyclass(module = "kproxy._core")]
struct Model {
    inner: CoreModel,
}

#[pymethods]
impl Model {
    #[new]
    fn new() -> Self {
        Model {
            inner: CoreModel::new(),
        }
    }

    /// Set a Service from its JSON, or delete it with None. Returns warnings.
    #[pyo3(signature = (key, obj))]
    fn set_service(
        &mut self,
        py: Python<'_>,
        key: &str,
        obj: Option<&str>,
    ) -> PyResult<Vec<String>> {
        set_object(py, obj, |v| self.inner.set_service(key, v))
    }

    /// Set an EndpointSlice from its JSON, or delete it with None. Returns warnings.
    #[pyo3(signature = (key, obj))]
    fn set_endpoint_slice(
        &mut self,
        py: Python<'_>,
        key: &str,
        obj: Option<&str>,
    ) -> PyResult<Vec<String>> {
        set_object(py, obj, |v| self.inner.set_endpoint_slice(key, v))
    }

    fn service_count(&self) -> usize {
        self.inner.service_count()
    }

    fn __len__(&self) -> usize {
        self.inner.service_count()
    }
}

/// Renders iptables-restore input for one IP family and remembers what was applied.
#[pyclass(module = "kproxy._core")]
struct IptablesRenderer {
    inner: CoreRenderer,
}

#[pymethods]
impl IptablesRenderer {
    #[new]
    fn new(py: Python<'_>, config_json: &str) -> PyResult<Self> {
        let cfg: IptablesConfig = serde_json::from_str(config_json)
            .map_err(|e| to_py(py, Error::config("iptables config", e.to_string())))?;
        let inner = CoreRenderer::new(cfg).map_err(|e| to_py(py, e))?;
        Ok(IptablesRenderer { inner })
    }

    /// Render a sync: returns (restore text, JSON of stats/conntrack/health checks).
    #[pyo3(signature = (model, full=false, saved=None))]
    fn render(
        &mut self,
        py: Python<'_>,
        model: PyRef<'_, Model>,
        full: bool,
        saved: Option<String>,
    ) -> PyResult<(String, String)> {
        let m = &model.inner;
        let inner = &mut self.inner;
        let out = py.allow_threads(|| inner.render(m, full, saved.as_deref()));
        let text = out.text.clone();
        let meta = serde_json::to_string(&out).map_err(|e| to_py(py, Error::from(e)))?;
        Ok((text, meta))
    }

    fn commit(&mut self) {
        self.inner.commit();
    }

    fn abort(&mut self) {
        self.inner.abort();
    }

    fn set_config(&mut self, py: Python<'_>, config_json: &str) -> PyResult<()> {
        let cfg: IptablesConfig = serde_json::from_str(config_json)
            .map_err(|e| to_py(py, Error::config("iptables config", e.to_string())))?;
        self.inner.set_config(cfg).map_err(|e| to_py(py, e))
    }

    #[getter]
    fn needs_full(&self) -> bool {
        self.inner.needs_full()
    }
}

/// `--cleanup` for iptables: restore input removing kproxy's chains and jumps.
#[pyfunction]
fn iptables_cleanup(py: Python<'_>, saved: &str) -> String {
    py.allow_threads(|| render_cleanup(saved))
}

/// The chain names upstream derives for a service port.
#[pyfunction]
fn service_chain_names(
    namespace: &str,
    name: &str,
    port: &str,
    protocol: &str,
) -> PyResult<(String, String, String, String)> {
    let protocol = kproxy_core::model::Protocol::parse(protocol)
        .ok_or_else(|| PyValueError::new_err(format!("unsupported protocol {protocol:?}")))?;
    let spn = kproxy_core::model::ServicePortName {
        namespace: namespace.into(),
        name: name.into(),
        port: port.into(),
        protocol,
    };
    let c = kproxy_core::iptables::service_chains(&spn);
    Ok((c.cluster, c.local, c.external, c.firewall))
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Model>()?;
    m.add_class::<IptablesRenderer>()?;
    m.add_function(wrap_pyfunction!(iptables_cleanup, m)?)?;
    m.add_function(wrap_pyfunction!(service_chain_names, m)?)?;
    selection::register(m)?;
    nftables::register(m)?;
    forwarder::register(m)?;
    ipvs::register(m)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
