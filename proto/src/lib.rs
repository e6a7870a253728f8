//! Generated code for the `quiver.v1` protobuf package.
//!
//! The generated module is included once here and re-exported under stable
//! names. Domain crates convert these types at the edge (see
//! `quiver-server`'s `convert` module); they never flow into domain logic.
//! `tonic` and `prost` are re-exported so every crate uses the same versions.

pub use prost;
pub use prost_types;
pub use tonic;

/// The generated `quiver.v1` messages and services.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("quiver.v1");
}

/// Encoded `FileDescriptorSet` of every quiver proto, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/quiver_descriptor.bin"));

pub use v1::feature_service_client::FeatureServiceClient;
pub use v1::feature_service_server::{FeatureService, FeatureServiceServer};
