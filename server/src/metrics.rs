//! Prometheus metrics, declared in one place with fixed label sets.
//!
//! - `quiver_requests_total{protocol, method, code}`: finished requests.
//! - `quiver_request_duration_seconds{protocol, method}`: latency.
//! - `quiver_online_store_duration_seconds{backend, op}`: online-store calls.
//! - `quiver_online_store_errors_total{backend, op}`: failed store calls.
//! - `quiver_events_total{outcome}`: pushed events, `accepted` or `rejected`.
//! - `quiver_ready`: 1 when the online store answered the last health check.
//!
//! `method` is the RPC name for gRPC and the route template for REST
//! (`/api/v1/features/:entity/:id`), never a raw path, so cardinality stays
//! bounded.

use std::time::Duration;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

/// Latency buckets from 100 µs to 5 s: online serving lives below 10 ms.
const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// The process's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    latency: HistogramVec,
    store_latency: HistogramVec,
    store_errors: IntCounterVec,
    events: IntCounterVec,
    ready: IntGauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "quiver_requests_total",
                "Finished requests by protocol, method and status code",
            ),
            &["protocol", "method", "code"],
        )
        .expect("valid metric");
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "quiver_request_duration_seconds",
                "Request latency in seconds",
            )
            .buckets(BUCKETS.to_vec()),
            &["protocol", "method"],
        )
        .expect("valid metric");
        let store_latency = HistogramVec::new(
            HistogramOpts::new(
                "quiver_online_store_duration_seconds",
                "Online-store call latency in seconds",
            )
            .buckets(BUCKETS.to_vec()),
            &["backend", "op"],
        )
        .expect("valid metric");
        let store_errors = IntCounterVec::new(
            Opts::new(
                "quiver_online_store_errors_total",
                "Failed online-store calls",
            ),
            &["backend", "op"],
        )
        .expect("valid metric");
        let events = IntCounterVec::new(
            Opts::new("quiver_events_total", "Pushed events by outcome"),
            &["outcome"],
        )
        .expect("valid metric");
        let ready = IntGauge::new(
            "quiver_ready",
            "1 when the online store answered the last health check",
        )
        .expect("valid metric");
        for m in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(latency.clone()),
            Box::new(store_latency.clone()),
            Box::new(store_errors.clone()),
            Box::new(events.clone()),
            Box::new(ready.clone()),
        ] {
            registry.register(m).expect("metric registered once");
        }
        Metrics {
            registry,
            requests,
            latency,
            store_latency,
            store_errors,
            events,
            ready,
        }
    }

    /// Records one finished request.
    pub fn observe_request(&self, protocol: &str, method: &str, code: &str, elapsed: Duration) {
        self.requests
            .with_label_values(&[protocol, method, code])
            .inc();
        self.latency
            .with_label_values(&[protocol, method])
            .observe(elapsed.as_secs_f64());
    }

    /// Counts one finished request (see [`Metrics::observe_request`]).
    pub fn count_request(&self, protocol: &str, method: &str, code: &str) {
        self.requests
            .with_label_values(&[protocol, method, code])
            .inc();
    }

    /// Records one request's latency (see [`Metrics::observe_request`]).
    pub fn observe_latency(&self, protocol: &str, method: &str, elapsed: Duration) {
        self.latency
            .with_label_values(&[protocol, method])
            .observe(elapsed.as_secs_f64());
    }

    /// Records one online-store call.
    pub fn observe_store(&self, backend: &str, op: &str, ok: bool, elapsed: Duration) {
        self.store_latency
            .with_label_values(&[backend, op])
            .observe(elapsed.as_secs_f64());
        if !ok {
            self.store_errors.with_label_values(&[backend, op]).inc();
        }
    }

    /// Records the outcome of one `PushEvents` call.
    pub fn observe_events(&self, accepted: u64, rejected: u64) {
        self.events
            .with_label_values(&["accepted"])
            .inc_by(accepted);
        self.events
            .with_label_values(&["rejected"])
            .inc_by(rejected);
    }

    /// Sets the readiness gauge.
    pub fn set_ready(&self, ready: bool) {
        self.ready.set(i64::from(ready));
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding into a Vec cannot fail");
        String::from_utf8(buf).unwrap_or_default()
    }
}
