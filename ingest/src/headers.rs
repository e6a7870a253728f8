//! W3C trace context in Kafka message headers (`traceparent`,
//! `tracestate`), as the OpenTelemetry messaging conventions carry it:
//! the producer writes its span's context into every message it sends
//! ([`TraceHeaders`]), the consumer reads it back ([`message_context`]) to
//! link its batch span to the producing spans.

use quiver_core::telemetry::{self, Extractor, Injector, SpanContext};
use rdkafka::message::{BorrowedHeaders, Header, Headers, OwnedHeaders};

/// The trace headers one span's messages carry.
#[derive(Debug, Default)]
pub(crate) struct TraceHeaders(Vec<(String, String)>);

impl Injector for TraceHeaders {
    fn set(&mut self, key: &str, value: String) {
        // An empty `tracestate` says nothing.
        if !value.is_empty() {
            self.0.push((key.to_owned(), value));
        }
    }
}

impl TraceHeaders {
    /// The context of `span` (none when it is not traced).
    pub(crate) fn of(span: &tracing::Span) -> TraceHeaders {
        let mut h = TraceHeaders::default();
        telemetry::inject(span, &mut h);
        h
    }

    /// `headers` with the trace context a consumed message carried (a
    /// dead-lettered event keeps its producer's trace).
    pub(crate) fn append(headers: OwnedHeaders, sc: Option<&SpanContext>) -> OwnedHeaders {
        let Some(sc) = sc else { return headers };
        let mut h = TraceHeaders::default();
        telemetry::inject_context(sc, &mut h);
        TraceHeaders::append_all(headers, &h.0)
    }

    fn append_all(headers: OwnedHeaders, pairs: &[(String, String)]) -> OwnedHeaders {
        pairs.iter().fold(headers, |headers, (k, v)| {
            headers.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            })
        })
    }

    /// As Kafka headers, or `None` when there is nothing to carry.
    pub(crate) fn to_kafka(&self) -> Option<OwnedHeaders> {
        if self.0.is_empty() {
            return None;
        }
        Some(self.0.iter().fold(
            OwnedHeaders::new_with_capacity(self.0.len()),
            |h, (k, v)| {
                h.insert(Header {
                    key: k,
                    value: Some(v.as_bytes()),
                })
            },
        ))
    }
}

struct KafkaHeaders<'a>(&'a BorrowedHeaders);

impl Extractor for KafkaHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|h| h.key.eq_ignore_ascii_case(key))
            .and_then(|h| std::str::from_utf8(h.value?).ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|h| h.key).collect()
    }
}

/// The producing span's context a message carries, if any (a missing or
/// malformed `traceparent` is none: tracing never rejects an event).
pub(crate) fn message_context(headers: Option<&BorrowedHeaders>) -> Option<SpanContext> {
    telemetry::extract(&KafkaHeaders(headers?))
}
