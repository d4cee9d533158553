//! kproxy's core: the Service/EndpointSlice model, endpoint categorisation and rule
//! rendering. Pure Rust with no Python dependency; `kproxy-py` binds it.

pub mod categorize;
pub mod conntrack;
pub mod error;
pub mod forwarder;
pub mod hash;
pub mod iptables;
pub mod ipvs;
pub mod lookup;
pub mod model;
pub mod net;
pub mod nftables;
pub mod selection;

pub use error::{Error, Result};
