//! quiver's domain: everything that does not depend on a transport.
//!
//! # Layout
//! - [`registry`]: entities, feature views and feature services, loaded from
//!   TOML and validated with messages that name file, item and problem.
//! - [`json`]: the JSON form of typed values (REST gateway, JSON events).
//! - [`metrics`]: every Prometheus metric quiver exports, in one place.
//! - [`event`]: events pushed by producers, validated against the registry.
//! - [`aggregate`]: windowed aggregation states and tile arithmetic, shared
//!   by the online (ingest) and offline (batch) computations.
//! - [`columnar`]: typed values as Arrow columns (archive, feature tables,
//!   historical retrieval).
//! - [`storage`]: the offline store's object-store root and layout.
//! - [`par`]: order-preserving parallel map for CPU-bound batch steps.
//! - [`value`]: typed values ([`Value`], [`ValueType`]).
//! - [`codec`]: the online store's versioned key layout and value encoding.
//! - [`store`]: the [`OnlineStore`] trait with its Redis and embedded
//!   implementations.
//! - [`telemetry`]: the log subscriber, OpenTelemetry traces (OTLP) and
//!   W3C trace context across gRPC, HTTP and Kafka.
//! - [`time`]: epoch-microsecond time and the injectable [`Clock`].
//! - [`wire`]: conversions to and from the `quiver.v1` protobuf types.
//! - [`error`]: the crate error, with a transport-independent [`ErrorKind`].

pub mod aggregate;
pub mod codec;
pub mod columnar;
pub mod error;
pub mod event;
pub mod json;
pub mod metrics;
pub mod par;
pub mod registry;
pub mod storage;
pub mod store;
pub mod telemetry;
#[cfg(test)]
pub(crate) mod testing;
pub mod time;
pub mod value;
pub mod wire;

pub use error::{Error, ErrorKind, Result};
pub use registry::Registry;
pub use store::OnlineStore;
pub use time::{Clock, ManualClock, SystemClock};
pub use value::{Value, ValueType};
