//! Binding of the nftables renderer (`NftablesRenderer`, `nftables_cleanup`).

use pyo3::prelude::*;
use pyo3::types::PyModule;

use kproxy_core::nftables::{
    render_cleanup, service_chains, NftablesConfig, NftablesRenderer as CoreRenderer,
};
use kproxy_core::Error;

use crate::{to_py, Model};

fn parse_config(py: Python<'_>, config_json: &str) -> PyResult<NftablesConfig> {
    serde_json::from_str(config_json)
        .map_err(|e| to_py(py, Error::config("nftables config", e.to_string())))
}

/// Renders `nft -f` input for one IP family and remembers what was applied.
#[pyclass(module = "kproxy._core")]
struct NftablesRenderer {
    inner: CoreRenderer,
}

#[pymethods]
impl NftablesRenderer {
    #[new]
    fn new(py: Python<'_>, config_json: &str) -> PyResult<Self> {
        let inner = CoreRenderer::new(parse_config(py, config_json)?).map_err(|e| to_py(py, e))?;
        Ok(NftablesRenderer { inner })
    }

    /// Render a sync: returns (nft -f text, JSON of stats/conntrack/health checks).
    #[pyo3(signature = (model, full=false))]
    fn render(
        &mut self,
        py: Python<'_>,
        model: PyRef<'_, Model>,
        full: bool,
    ) -> PyResult<(String, String)> {
        let m = &model.inner;
        let inner = &mut self.inner;
        let mut out = py.allow_threads(|| inner.render(m, full));
        let text = std::mem::take(&mut out.text);
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
        let cfg = parse_config(py, config_json)?;
        self.inner.set_config(cfg).map_err(|e| to_py(py, e))
    }

    /// (`nft list chain` argument, substrings its listing must contain).
    fn drift_probe(&self) -> (String, Vec<String>) {
        self.inner.drift_probe()
    }

    #[getter]
    fn needs_full(&self) -> bool {
        self.inner.needs_full()
    }
}

/// `nft -f` input deleting the `kube-proxy` tables of both families.
#[pyfunction]
fn nftables_cleanup() -> String {
    render_cleanup()
}

/// (service-, local-, external-, firewall-) chain names of a service port.
#[pyfunction]
fn nftables_chain_names(
    namespace: &str,
    name: &str,
    port: &str,
    protocol: &str,
) -> PyResult<(String, String, String, String)> {
    let protocol = kproxy_core::model::Protocol::parse(protocol).ok_or_else(|| {
        pyo3::exceptions::PyValueError::new_err(format!("unsupported protocol {protocol:?}"))
    })?;
    let spn = kproxy_core::model::ServicePortName {
        namespace: namespace.into(),
        name: name.into(),
        port: port.into(),
        protocol,
    };
    let c = service_chains(&spn);
    Ok((c.cluster, c.local, c.external, c.firewall))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<NftablesRenderer>()?;
    m.add_function(wrap_pyfunction!(nftables_cleanup, m)?)?;
    m.add_function(wrap_pyfunction!(nftables_chain_names, m)?)?;
    Ok(())
}
