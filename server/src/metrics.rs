//! Prometheus metrics: the process's [`Metrics`], declared with every other
//! family of quiver in [`quiver_core::metrics`] (one place, fixed label
//! sets). The server renders them at `/metrics`.

pub use quiver_core::metrics::Metrics;
