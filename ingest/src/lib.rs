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
pub mod producer;

pub use apply::{Applier, ApplyStats, Record};
pub use archive::{ArchiveConfig, Archiver};
pub use consumer::{IngestConfig, IngestStats, Ingestor};
pub use generate::{Generator, GeneratorConfig};
pub use producer::KafkaEventSink;

/// Maps `f` over `items` on up to `available_parallelism` scoped threads,
/// keeping order. The CPU-bound steps of a batch (decoding, merging tile
/// states) use it so that one ingest process can use more than one core
/// while its async I/O stays on the runtime. Small inputs run inline.
pub(crate) fn par_map<T: Send, R: Send>(items: Vec<T>, f: impl Fn(T) -> R + Sync) -> Vec<R> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    if threads < 2 || items.len() < 512 {
        return items.into_iter().map(f).collect();
    }
    let per = items.len().div_ceil(threads);
    let mut parts: Vec<Vec<T>> = Vec::with_capacity(threads);
    let mut it = items.into_iter();
    loop {
        let part: Vec<T> = it.by_ref().take(per).collect();
        if part.is_empty() {
            break;
        }
        parts.push(part);
    }
    let f = &f;
    std::thread::scope(|s| {
        let handles: Vec<_> = parts
            .into_iter()
            .map(|part| s.spawn(move || part.into_iter().map(f).collect::<Vec<R>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| match h.join() {
                Ok(v) => v,
                Err(panic) => std::panic::resume_unwind(panic),
            })
            .collect()
    })
}

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

#[cfg(test)]
mod tests {
    #[test]
    fn par_map_keeps_order_small_and_large() {
        let small: Vec<u64> = (0..10).collect();
        assert_eq!(
            super::par_map(small, |x| x * 2),
            (0..10).map(|x| x * 2).collect::<Vec<_>>()
        );
        let large: Vec<u64> = (0..10_001).collect();
        let out = super::par_map(large, |x| x + 1);
        assert_eq!(out, (1..10_002).collect::<Vec<_>>());
    }
}
