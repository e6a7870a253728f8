//! The Kafka producer behind `PushEvents` and `quiver generate`.
//!
//! Idempotent (`enable.idempotence`, `acks=all`): librdkafka's retries never
//! duplicate or reorder a message within a partition. Messages are keyed by
//! the event type's first entity (see `Event::partition_key`), so one user's
//! events stay in one partition, in order. The payload is a protobuf
//! `quiver.v1.Event`.

use std::time::Duration;

use async_trait::async_trait;
use futures::future::join_all;
use quiver_core::event::{Event, EventSink};
use quiver_core::telemetry;
use quiver_core::wire::encode_event;
use quiver_core::{Error, Registry, Result};
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use std::sync::Arc;
use tracing::Instrument;

use crate::headers::TraceHeaders;
use crate::KafkaConfig;

/// Appends events to a Kafka topic.
pub struct KafkaEventSink {
    producer: FutureProducer,
    topic: String,
    registry: Arc<Registry>,
    timeout: Duration,
}

impl std::fmt::Debug for KafkaEventSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaEventSink")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

/// Maps a Kafka error to ours: anything that stops appending is UNAVAILABLE.
pub(crate) fn kafka_error(what: &str, e: KafkaError) -> Error {
    use rdkafka::types::RDKafkaErrorCode as C;
    // What the broker or client refuses for this message or this client
    // every time; everything else (brokers down, timeouts, leader
    // elections) may pass.
    let permanent = matches!(
        e.rdkafka_error_code(),
        Some(
            C::MessageSizeTooLarge
                | C::InvalidMessageSize
                | C::InvalidMessage
                | C::MessageBatchTooLarge
                | C::TopicAuthorizationFailed
                | C::ClusterAuthorizationFailed
                | C::InvalidTopic
                | C::InvalidRecord
        )
    );
    if permanent {
        Error::internal(format!("{what}: {e}"))
    } else {
        Error::unavailable(format!("{what}: {e}"))
    }
}

impl KafkaEventSink {
    /// Creates the producer (connects lazily).
    pub fn new(cfg: &KafkaConfig, registry: Arc<Registry>) -> Result<KafkaEventSink> {
        let producer: FutureProducer = cfg
            .client_config()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("compression.type", "lz4")
            .set("message.timeout.ms", cfg.timeout.as_millis().to_string())
            .create()
            .map_err(|e| Error::invalid(format!("invalid Kafka producer settings: {e}")))?;
        Ok(KafkaEventSink {
            producer,
            topic: cfg.topic.clone(),
            registry,
            timeout: cfg.timeout,
        })
    }

    /// Waits until every queued message is delivered (or the timeout).
    pub fn flush(&self) -> Result<()> {
        self.producer
            .flush(self.timeout)
            .map_err(|e| kafka_error("flushing events to Kafka", e))
    }
}

#[async_trait]
impl EventSink for KafkaEventSink {
    async fn publish(&self, events: &[Event]) -> Result<Vec<Result<()>>> {
        let mut keys = Vec::with_capacity(events.len());
        for ev in events {
            let et = self
                .registry
                .event_type(&ev.event_type)
                .ok_or_else(|| Error::invalid(format!("unknown event_type {:?}", ev.event_type)))?;
            keys.push(ev.partition_key(et)?);
        }
        let payloads: Vec<Vec<u8>> = events.iter().map(encode_event).collect();
        // One producer span for the batch, inside a traced request; every
        // message carries its context, so that ingest can link its batch
        // span back to it.
        let span = telemetry::child_span(|| {
            tracing::info_span!(
                "kafka send",
                otel.name = format!("send {}", self.topic),
                otel.kind = "producer",
                messaging.system = "kafka",
                messaging.operation.type = "send",
                messaging.destination.name = self.topic.as_str(),
                messaging.batch.message_count = telemetry::int(events.len()),
            )
        });
        let headers = TraceHeaders::of(&span).to_kafka();
        // send() queues in librdkafka and resolves on delivery; waiting on
        // all of them together keeps the batch in one round of acks.
        let sends = payloads.iter().zip(&keys).map(|(payload, key)| {
            let mut record = FutureRecord::to(&self.topic).key(key).payload(payload);
            if let Some(h) = &headers {
                record = record.headers(h.clone());
            }
            self.producer.send(record, self.timeout)
        });
        let results = join_all(sends).instrument(span.clone()).await;
        let mut out = Vec::with_capacity(results.len());
        let mut failures = 0;
        for r in results {
            match r {
                Ok(_) => out.push(Ok(())),
                Err((e, _)) => {
                    failures += 1;
                    out.push(Err(kafka_error("Kafka did not accept the event", e)));
                }
            }
        }
        if failures > 0 {
            telemetry::set_error(
                &span,
                format!("{failures} of {} events not accepted", out.len()),
            );
        }
        if failures == out.len() {
            if let Some(Err(e)) = out.pop() {
                return Err(e);
            }
        }
        Ok(out)
    }
}
