//! quiver's speed layer: events in, fresh features out.
//!
//! # Layout
//! - [`producer`]: [`KafkaEventSink`], the idempotent Kafka producer behind
//!   `PushEvents` and `quiver generate`.
//! - [`consumer`]: [`Ingestor`], the consumer-group member of `quiver
//!   ingest`: batches, dead letters, commits after durable writes.
//! - [`apply`]: [`Applier`], latest-value rows and windowed-aggregation
//!   tiles in the online store, exactly once per source offset.
//! - [`archive`]: [`Archiver`], raw events as Parquet on object storage,
//!   partitioned by date, rolled by size and age, exactly once.
//!
//! The same code runs against a Kafka cluster and, in the embedded default,
//! against librdkafka's in-process mock cluster.

use std::time::Duration;

use rdkafka::config::ClientConfig;

pub mod apply;
pub mod archive;
pub mod consumer;
pub mod generate;
mod headers;
pub mod producer;
mod sources;

pub use apply::{Applier, ApplyStats, Record};
pub use archive::{ArchiveConfig, Archiver};
pub use consumer::{IngestConfig, IngestStats, Ingestor, PartitionStats};
pub use generate::{Generator, GeneratorConfig};
pub use producer::KafkaEventSink;

/// Inputs smaller than this are mapped inline: per-message work is too
/// small to pay for threads.
pub(crate) const PAR_MIN_ITEMS: usize = 512;

/// Kafka connection settings shared by producer and consumer.
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    /// `host:port[,host:port...]`.
    pub brokers: String,
    /// The event topic.
    pub topic: String,
    /// Consumer group of `quiver ingest`.
    pub group_id: String,
    /// Deadline of a produce (delivery report) and of blocking calls.
    pub timeout: Duration,
    /// Extra librdkafka properties (`security.protocol`, `sasl.*`, ...).
    pub extra: Vec<(String, String)>,
    /// The topic's generation: raise it by one each time the topic is
    /// deleted and recreated (its offsets start again at 0), so that tile
    /// rows and the archive treat it as a new source (see
    /// [`source_topic`]). `quiver ingest` stops with a message saying so
    /// when it finds the topic recreated under the same epoch.
    pub topic_epoch: u32,
}

/// How tile rows and the archive name a topic: `topic` for epoch 0,
/// `topic@{epoch}` after it was recreated (`@` cannot occur in Kafka topic
/// names).
pub fn source_topic(topic: &str, epoch: u32) -> std::borrow::Cow<'_, str> {
    if epoch == 0 {
        topic.into()
    } else {
        format!("{topic}@{epoch}").into()
    }
}

impl KafkaConfig {
    /// Settings for `brokers` with quiver's defaults.
    pub fn new(brokers: impl Into<String>) -> KafkaConfig {
        KafkaConfig {
            brokers: brokers.into(),
            topic: "quiver-events".into(),
            group_id: "quiver-ingest".into(),
            timeout: Duration::from_secs(10),
            extra: Vec::new(),
            topic_epoch: 0,
        }
    }

    pub(crate) fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        for (k, v) in &self.extra {
            c.set(k, v);
        }
        c
    }
}
