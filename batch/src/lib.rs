//! quiver's batch layer: DataFusion over the offline store.
//!
//! # Layout
//! - [`offline`]: the offline store as a DataFusion session (`events`,
//!   declared tables) and the atomically committed feature tables.
//! - [`run`]: `quiver batch run`, SQL feature views into feature tables.
//! - [`aggregate`]: the registry's windowed aggregations computed from the
//!   archived events as of any time, with the online semantics
//!   (`quiver_core::aggregate`).
//! - [`entities`]: entity tables from protobuf, Arrow IPC, Parquet and
//!   CSV, typed by the registry.
//! - [`pit`]: the point-in-time join.
//! - [`retrieve`]: historical retrieval (training sets) over every kind of
//!   view.
//! - [`materialize`]: latest values per entity into the online store.
//! - [`ondemand`]: request-time features, evaluated alike online and
//!   offline.
//!
//! DataFusion is used only in this crate (it is the heaviest dependency of
//! the workspace); errors come back as [`quiver_core::Error`].

pub mod aggregate;
pub mod entities;
pub mod materialize;
pub mod offline;
pub mod ondemand;
pub mod pit;
pub mod retrieve;
pub mod run;

/// The Arrow version of the batch layer's record batches.
pub use arrow;
pub use offline::Offline;
