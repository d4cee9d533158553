//! Binding of userspace mode's forwarder: it runs on its own tokio threads; `sync`
//! applies a model (releasing the GIL) and returns the capture rules to program.

use pyo3::prelude::*;
use pyo3::types::PyModule;

use kproxy_core::forwarder::capture;
use kproxy_core::forwarder::table::TableConfig;
use kproxy_core::forwarder::{Forwarder as CoreForwarder, ForwarderConfig};
use kproxy_core::Error;

use crate::{to_py, Model};

/// The userspace L4 forwarder (TCP + UDP), started on construction.
#[pyclass(module = "kproxy._core")]
struct Forwarder {
    inner: Option<CoreForwarder>,
}

impl Forwarder {
    fn get(&self, py: Python<'_>) -> PyResult<&CoreForwarder> {
        self.inner
            .as_ref()
            .ok_or_else(|| to_py(py, Error::config("forwarder", "stopped")))
    }
}

#[pymethods]
impl Forwarder {
    /// Start with a JSON ForwarderConfig (`{}` for the defaults).
    #[new]
    fn new(py: Python<'_>, config_json: &str) -> PyResult<Self> {
        let cfg: ForwarderConfig = serde_json::from_str(config_json)
            .map_err(|e| to_py(py, Error::config("forwarder config", e.to_string())))?;
        let inner = py
            .allow_threads(|| CoreForwarder::start(cfg))
            .map_err(|e| to_py(py, e))?;
        Ok(Forwarder { inner: Some(inner) })
    }

    #[getter]
    fn tcp_port(&self, py: Python<'_>) -> PyResult<u16> {
        Ok(self.get(py)?.tcp_port())
    }

    #[getter]
    fn running(&self) -> bool {
        self.inner.as_ref().is_some_and(|f| f.running())
    }

    /// Apply the model; returns the JSON of {nft, warnings, health_checks, service_ports}.
    fn sync(
        &self,
        py: Python<'_>,
        model: PyRef<'_, Model>,
        table_config_json: &str,
    ) -> PyResult<String> {
        let tcfg: TableConfig = serde_json::from_str(table_config_json)
            .map_err(|e| to_py(py, Error::config("table config", e.to_string())))?;
        let fwd = self.get(py)?;
        let m = &model.inner;
        let out = py
            .allow_threads(|| fwd.sync(m, &tcfg))
            .map_err(|e| to_py(py, e))?;
        serde_json::to_string(&out).map_err(|e| to_py(py, Error::from(e)))
    }

    /// Counters as JSON: {ports: [...], global: {...}}.
    fn stats_json(&self, py: Python<'_>) -> PyResult<String> {
        let snap = self.get(py)?.snapshot();
        serde_json::to_string(&snap).map_err(|e| to_py(py, Error::from(e)))
    }

    /// Stop the runtime and close every connection. Idempotent.
    fn stop(&mut self, py: Python<'_>) {
        if let Some(mut f) = self.inner.take() {
            py.allow_threads(|| f.stop());
        }
    }
}

/// `nft -f` input that removes userspace mode's capture table.
#[pyfunction]
fn userspace_cleanup_script() -> String {
    capture::render_cleanup()
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Forwarder>()?;
    m.add_function(wrap_pyfunction!(userspace_cleanup_script, m)?)?;
    Ok(())
}
