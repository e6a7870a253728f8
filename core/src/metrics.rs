//! Every Prometheus metric quiver exports, declared in this one place with
//! fixed label sets (Prometheus naming conventions: base units in names,
//! `_total` for counters, `_seconds` for durations, `_timestamp_seconds` for
//! points in time; <https://prometheus.io/docs/practices/naming/>).
//!
//! [`Metrics`] is a process's registry, scraped at `/metrics` (serve's REST
//! port; ingest's `ingest.metrics_addr`; the demo shows both on one port):
//!
//! Serving
//! - `quiver_requests_total{protocol, method, code}`: finished requests.
//! - `quiver_request_duration_seconds{protocol, method}`: latency.
//! - `quiver_online_store_duration_seconds{backend, op}`: online-store calls.
//! - `quiver_online_store_errors_total{backend, op}`: failed store calls.
//! - `quiver_events_total{outcome}`: pushed events, `accepted` or `rejected`.
//! - `quiver_served_feature_age_seconds{feature_view}`: at read time, the
//!   age (now − event time) of each served row of a stored view.
//! - `quiver_ready`: 1 when the online store answered the last health check.
//!
//! Ingest (`partition` is the Kafka partition number; `topic` the event topic)
//! - `quiver_ingest_messages_total{topic, partition}`: messages consumed.
//! - `quiver_ingest_events_applied_total{topic, partition}`: events applied
//!   to the online store.
//! - `quiver_ingest_dead_letters_total{topic, partition, reason}`: messages
//!   sent to the dead-letter topic; `reason` is `out_of_range` (event time
//!   outside the accepted bounds) or `invalid` (every other reason).
//! - `quiver_ingest_events_too_late_total{topic, partition}`: events older
//!   than every window of an aggregation view they feed.
//! - `quiver_ingest_events_duplicate_total{topic, partition}`: events a tile
//!   had already counted (a producer's retry), per tile row.
//! - `quiver_ingest_tile_rows_total{topic, partition, outcome}`: tile rows
//!   `written`, or `replayed` (skipped: they already held these offsets).
//! - `quiver_ingest_retries_total{topic, partition}`: failed attempts of
//!   batches holding the partition's messages.
//! - `quiver_ingest_rows_total{outcome}`: latest-value rows `written`, or
//!   `stale` (the store held a newer row).
//! - `quiver_ingest_consumer_lag_messages{topic, partition}`: messages
//!   not yet consumed: the high watermark minus the consumer's position
//!   (librdkafka's statistics).
//! - `quiver_ingest_batch_duration_seconds`: one batch, consumed to applied
//!   and archived (retries included).
//! - `quiver_ingest_commit_duration_seconds`: one offset commit.
//! - `quiver_ingest_errors_total{stage}`: failed attempts by stage:
//!   `online_store`, `archive`, `kafka`.
//! - `quiver_archive_files_total`, `quiver_archive_events_total`,
//!   `quiver_archive_bytes_total`: Parquet files made visible, with their
//!   events and bytes.
//! - `quiver_ingest_up`: 1 while the consume loop runs.
//!
//! Freshness, per stored feature view
//! - `quiver_feature_freshness_seconds{feature_view}`: for each consumed
//!   event and view it feeds, the time from its event time to its value
//!   being visible online (the batch's store writes returned); replays after
//!   a restart or rebalance count too.
//! - `quiver_feature_newest_event_timestamp_seconds{feature_view}`: the event
//!   time of the newest value ingest wrote (its age is
//!   `time() - quiver_feature_newest_event_timestamp_seconds`: Prometheus
//!   exports points in time rather than ages, so that a process that stops
//!   updating does not look fresh).
//!
//! Batch layer ([`BatchMetrics`], pushed to a Pushgateway by `quiver batch
//! run` and `quiver materialize`, `job` `quiver_batch` or
//! `quiver_materialize`)
//! - `quiver_batch_view_duration_seconds{feature_view}`,
//!   `quiver_batch_view_rows{feature_view}`: the last run of each view
//!   (rows: committed by `batch run`, written online by `materialize`).
//! - `quiver_batch_duration_seconds`: the whole last run.
//! - `quiver_batch_success`: 1 when the last run succeeded, 0 when it failed.
//! - `quiver_batch_last_run_timestamp_seconds`,
//!   `quiver_batch_last_success_timestamp_seconds`: when runs ended.
//!
//! `method` is the RPC name for gRPC and the route template for REST
//! (`/api/v1/features/:entity/:id`), never a raw path; `feature_view` ranges
//! over the registry's views, `topic`/`partition` over the assigned
//! partitions: every label set is bounded.

use std::time::Duration;

use prometheus::{
    Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, Opts, Registry, TextEncoder,
};
pub use prometheus::{Histogram, IntCounter, IntCounterVec, IntGauge, IntGaugeVec};

/// The content type of [`Metrics::render`]'s output (Prometheus text
/// exposition format 0.0.4), for every `/metrics` endpoint.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Latency buckets from 100 µs to 5 s: online serving lives below 10 ms.
const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Freshness and age buckets, 10 ms to 7 days: streaming views live in
/// seconds, batch-materialized ones in hours.
const AGE_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 21600.0,
    86400.0, 604800.0,
];

/// Batch and commit buckets, 1 ms to 60 s.
const BATCH_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let m = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(m.clone()))
        .expect("metric registered once");
    m
}

fn histogram(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> HistogramVec {
    let m = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )
    .expect("valid metric");
    r.register(Box::new(m.clone()))
        .expect("metric registered once");
    m
}

fn render(r: &Registry) -> String {
    let mut buf = Vec::new();
    TextEncoder::new()
        .encode(&r.gather(), &mut buf)
        .expect("text encoding into a Vec cannot fail");
    String::from_utf8(buf).unwrap_or_default()
}

/// A process's metrics (serving, ingest, freshness); see the module docs.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    latency: HistogramVec,
    store_latency: HistogramVec,
    store_errors: IntCounterVec,
    events: IntCounterVec,
    served_age: HistogramVec,
    ready: IntGaugeVec,
    /// The ingest families.
    pub ingest: IngestMetrics,
    freshness: HistogramVec,
    newest: GaugeVec,
}

/// The ingest families of [`Metrics`].
#[derive(Debug, Clone)]
pub struct IngestMetrics {
    /// `quiver_ingest_messages_total{topic, partition}`.
    pub messages: IntCounterVec,
    /// `quiver_ingest_events_applied_total{topic, partition}`.
    pub applied: IntCounterVec,
    /// `quiver_ingest_dead_letters_total{topic, partition, reason}`.
    pub dead_letters: IntCounterVec,
    /// `quiver_ingest_events_too_late_total{topic, partition}`.
    pub too_late: IntCounterVec,
    /// `quiver_ingest_events_duplicate_total{topic, partition}`.
    pub duplicates: IntCounterVec,
    /// `quiver_ingest_tile_rows_total{topic, partition, outcome}`.
    pub tile_rows: IntCounterVec,
    /// `quiver_ingest_retries_total{topic, partition}`.
    pub retries: IntCounterVec,
    /// `quiver_ingest_rows_total{outcome}`.
    pub rows: IntCounterVec,
    /// `quiver_ingest_consumer_lag_messages{topic, partition}`.
    pub lag: IntGaugeVec,
    /// `quiver_ingest_batch_duration_seconds`.
    pub batch_duration: Histogram,
    /// `quiver_ingest_commit_duration_seconds`.
    pub commit_duration: Histogram,
    /// `quiver_ingest_errors_total{stage}`.
    pub errors: IntCounterVec,
    /// `quiver_archive_files_total`.
    pub archive_files: IntCounter,
    /// `quiver_archive_events_total`.
    pub archive_events: IntCounter,
    /// `quiver_archive_bytes_total`.
    pub archive_bytes: IntCounter,
    /// `quiver_ingest_up` (exported once set: a process without a consume
    /// loop has none, rather than a 0 that reads as "down").
    up: IntGaugeVec,
}

impl IngestMetrics {
    /// Sets `quiver_ingest_up`.
    pub fn set_up(&self, up: bool) {
        self.up.with_label_values(&[]).set(i64::from(up));
    }

    /// Whether the consume loop runs (`quiver_ingest_up` is 1).
    pub fn is_up(&self) -> bool {
        self.up
            .get_metric_with_label_values(&[])
            .is_ok_and(|g| g.get() == 1)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Metrics {
        let r = Registry::new();
        let pp = &["topic", "partition"];
        let single = |name: &str, help: &str, buckets: &[f64]| {
            let m = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
                .expect("valid metric");
            r.register(Box::new(m.clone()))
                .expect("metric registered once");
            m
        };
        let one = |name: &str, help: &str| {
            let m = IntCounter::new(name, help).expect("valid metric");
            r.register(Box::new(m.clone()))
                .expect("metric registered once");
            m
        };
        let ingest = IngestMetrics {
            messages: counter(
                &r,
                "quiver_ingest_messages_total",
                "Kafka messages consumed",
                pp,
            ),
            applied: counter(
                &r,
                "quiver_ingest_events_applied_total",
                "Events applied to the online store",
                pp,
            ),
            dead_letters: counter(
                &r,
                "quiver_ingest_dead_letters_total",
                "Messages sent to the dead-letter topic, by reason (out_of_range or invalid)",
                &["topic", "partition", "reason"],
            ),
            too_late: counter(
                &r,
                "quiver_ingest_events_too_late_total",
                "Events older than every window of an aggregation view they feed",
                pp,
            ),
            duplicates: counter(
                &r,
                "quiver_ingest_events_duplicate_total",
                "Events a tile had already counted (producer retries), per tile row",
                pp,
            ),
            tile_rows: counter(
                &r,
                "quiver_ingest_tile_rows_total",
                "Aggregation tile rows written or skipped as replays",
                &["topic", "partition", "outcome"],
            ),
            retries: counter(
                &r,
                "quiver_ingest_retries_total",
                "Failed attempts of batches holding the partition's messages",
                pp,
            ),
            rows: counter(
                &r,
                "quiver_ingest_rows_total",
                "Latest-value rows written, or stale (the store held a newer row)",
                &["outcome"],
            ),
            lag: {
                let m = IntGaugeVec::new(
                    Opts::new(
                        "quiver_ingest_consumer_lag_messages",
                        "Messages not yet consumed: the partition's high watermark minus the position",
                    ),
                    pp,
                )
                .expect("valid metric");
                r.register(Box::new(m.clone()))
                    .expect("metric registered once");
                m
            },
            batch_duration: single(
                "quiver_ingest_batch_duration_seconds",
                "One ingest batch, consumed to applied and archived, retries included",
                BATCH_BUCKETS,
            ),
            commit_duration: single(
                "quiver_ingest_commit_duration_seconds",
                "One Kafka offset commit",
                BATCH_BUCKETS,
            ),
            errors: counter(
                &r,
                "quiver_ingest_errors_total",
                "Failed ingest attempts by stage (online_store, archive, kafka)",
                &["stage"],
            ),
            archive_files: one(
                "quiver_archive_files_total",
                "Raw-event Parquet files made visible",
            ),
            archive_events: one(
                "quiver_archive_events_total",
                "Events in archived Parquet files",
            ),
            archive_bytes: one(
                "quiver_archive_bytes_total",
                "Bytes of archived Parquet files",
            ),
            up: {
                let m = IntGaugeVec::new(
                    Opts::new("quiver_ingest_up", "1 while the ingest consume loop runs"),
                    &[],
                )
                .expect("valid metric");
                r.register(Box::new(m.clone()))
                    .expect("metric registered once");
                m
            },
        };
        let newest = GaugeVec::new(
            Opts::new(
                "quiver_feature_newest_event_timestamp_seconds",
                "Event time (Unix seconds) of the newest value ingest wrote, per feature view",
            ),
            &["feature_view"],
        )
        .expect("valid metric");
        r.register(Box::new(newest.clone()))
            .expect("metric registered once");
        // Exported once set (by serve's health loop): ingest has none.
        let ready = IntGaugeVec::new(
            Opts::new(
                "quiver_ready",
                "1 when the online store answered the last health check",
            ),
            &[],
        )
        .expect("valid metric");
        r.register(Box::new(ready.clone()))
            .expect("metric registered once");
        let events = counter(
            &r,
            "quiver_events_total",
            "Pushed events by outcome",
            &["outcome"],
        );
        // Known label values start at 0 (dashboards see "none", not "no data").
        for outcome in ["accepted", "rejected"] {
            events.with_label_values(&[outcome]);
        }
        Metrics {
            requests: counter(
                &r,
                "quiver_requests_total",
                "Finished requests by protocol, method and status code",
                &["protocol", "method", "code"],
            ),
            latency: histogram(
                &r,
                "quiver_request_duration_seconds",
                "Request latency in seconds",
                &["protocol", "method"],
                BUCKETS,
            ),
            store_latency: histogram(
                &r,
                "quiver_online_store_duration_seconds",
                "Online-store call latency in seconds",
                &["backend", "op"],
                BUCKETS,
            ),
            store_errors: counter(
                &r,
                "quiver_online_store_errors_total",
                "Failed online-store calls",
                &["backend", "op"],
            ),
            events,
            served_age: histogram(
                &r,
                "quiver_served_feature_age_seconds",
                "Age (now - event time) of served rows, per feature view",
                &["feature_view"],
                AGE_BUCKETS,
            ),
            freshness: histogram(
                &r,
                "quiver_feature_freshness_seconds",
                "Time from an event's event time to its value being visible online, per feature view",
                &["feature_view"],
                AGE_BUCKETS,
            ),
            ingest,
            newest,
            ready,
            registry: r,
        }
    }

    /// Records one finished request.
    pub fn observe_request(&self, protocol: &str, method: &str, code: &str, elapsed: Duration) {
        self.count_request(protocol, method, code);
        self.observe_latency(protocol, method, elapsed);
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

    /// Records the ages (seconds) of rows of `view` served by one read.
    pub fn observe_served_ages(&self, view: &str, ages: impl IntoIterator<Item = f64>) {
        let h = self.served_age.with_label_values(&[view]);
        for a in ages {
            h.observe(a.max(0.0));
        }
    }

    /// Records, for `view`, the freshness (seconds from event time to
    /// visible online) of each applied event, and the newest event time
    /// written (Unix seconds).
    pub fn observe_freshness(
        &self,
        view: &str,
        freshness: impl IntoIterator<Item = f64>,
        newest_event: f64,
    ) {
        let h = self.freshness.with_label_values(&[view]);
        for f in freshness {
            h.observe(f.max(0.0));
        }
        let g = self.newest.with_label_values(&[view]);
        if newest_event > g.get() {
            g.set(newest_event);
        }
    }

    /// Sets the readiness gauge.
    pub fn set_ready(&self, ready: bool) {
        self.ready.with_label_values(&[]).set(i64::from(ready));
    }

    /// The Prometheus text exposition of every metric with samples.
    pub fn render(&self) -> String {
        render(&self.registry)
    }
}

/// Which batch-layer command a [`BatchMetrics`] describes; its name is the
/// metric prefix's job (`quiver_batch`, `quiver_materialize`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchJob {
    /// `quiver batch run`.
    Run,
    /// `quiver materialize`.
    Materialize,
}

impl BatchJob {
    /// The Pushgateway job name.
    pub fn job(self) -> &'static str {
        match self {
            BatchJob::Run => "quiver_batch",
            BatchJob::Materialize => "quiver_materialize",
        }
    }
}

/// The metrics of one batch-layer run, pushed to a Pushgateway (see the
/// module docs). Metric names are the same for both jobs; the `job` label
/// the Pushgateway adds tells them apart.
#[derive(Debug)]
pub struct BatchMetrics {
    registry: Registry,
}

impl BatchMetrics {
    /// The metrics of one run that ended at `ended` (Unix seconds):
    /// `views` are (feature view, rows, duration) of the views it ran;
    /// `ok` whether the run succeeded.
    pub fn of_run(
        views: &[(String, u64, Duration)],
        duration: Duration,
        ok: bool,
        ended: f64,
    ) -> BatchMetrics {
        let r = Registry::new();
        let gauge_vec = |name: &str, help: &str| {
            let m = GaugeVec::new(Opts::new(name, help), &["feature_view"]).expect("valid metric");
            r.register(Box::new(m.clone()))
                .expect("metric registered once");
            m
        };
        let gauge = |name: &str, help: &str| {
            let m = Gauge::new(name, help).expect("valid metric");
            r.register(Box::new(m.clone()))
                .expect("metric registered once");
            m
        };
        let view_duration = gauge_vec(
            "quiver_batch_view_duration_seconds",
            "Duration of the last run of the feature view",
        );
        let view_rows = gauge_vec(
            "quiver_batch_view_rows",
            "Rows of the last run of the feature view (committed, or written online)",
        );
        let duration_g = gauge("quiver_batch_duration_seconds", "Duration of the last run");
        let success = IntGauge::new(
            "quiver_batch_success",
            "1 when the last run succeeded, 0 when it failed",
        )
        .expect("valid metric");
        r.register(Box::new(success.clone()))
            .expect("metric registered once");
        let last_run = gauge(
            "quiver_batch_last_run_timestamp_seconds",
            "When the last run ended (Unix seconds)",
        );
        let last_success = gauge(
            "quiver_batch_last_success_timestamp_seconds",
            "When the last successful run ended (Unix seconds)",
        );
        for (view, rows, d) in views {
            view_duration
                .with_label_values(&[view])
                .set(d.as_secs_f64());
            view_rows.with_label_values(&[view]).set(*rows as f64);
        }
        duration_g.set(duration.as_secs_f64());
        success.set(i64::from(ok));
        last_run.set(ended);
        if ok {
            last_success.set(ended);
        } else {
            // Left out of a failed run's push: the Pushgateway keeps the
            // previous success's value (the push replaces only the metrics
            // it carries).
            r.unregister(Box::new(last_success.clone()))
                .expect("registered above");
        }
        BatchMetrics { registry: r }
    }

    /// The Prometheus text exposition (what is pushed).
    pub fn render(&self) -> String {
        render(&self.registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_renders_with_its_labels() {
        let m = Metrics::new();
        m.observe_request("grpc", "GetOnlineFeatures", "OK", Duration::from_millis(2));
        m.observe_served_ages("user_stream", [1.5, -0.2]);
        m.observe_freshness("user_stream", [0.3, 0.4], 1_700_000_000.5);
        m.observe_freshness("user_stream", [0.1], 1_600_000_000.0);
        m.ingest
            .dead_letters
            .with_label_values(&["events", "0", "invalid"])
            .inc();
        let text = m.render();
        assert!(text.contains(
            "quiver_requests_total{code=\"OK\",method=\"GetOnlineFeatures\",protocol=\"grpc\"} 1"
        ));
        assert!(text
            .contains("quiver_served_feature_age_seconds_count{feature_view=\"user_stream\"} 2"));
        assert!(
            text.contains("quiver_feature_freshness_seconds_count{feature_view=\"user_stream\"} 3")
        );
        // The newest event time only moves forward.
        assert!(text.contains(
            "quiver_feature_newest_event_timestamp_seconds{feature_view=\"user_stream\"} 1700000000.5"
        ));
        assert!(text.contains(
            "quiver_ingest_dead_letters_total{partition=\"0\",reason=\"invalid\",topic=\"events\"} 1"
        ));
        // Gauges of a part the process does not run are absent, not 0.
        assert!(!text.contains("quiver_ingest_up"), "{text}");
        assert!(!text.contains("quiver_ready"), "{text}");
        m.ingest.set_up(true);
        m.set_ready(false);
        let text = m.render();
        assert!(text.contains("quiver_ingest_up 1"), "{text}");
        assert!(text.contains("quiver_ready 0"), "{text}");
        assert!(m.ingest.is_up());
    }

    #[test]
    fn a_failed_batch_run_leaves_out_the_last_success() {
        let views = vec![("v".to_owned(), 7, Duration::from_millis(1500))];
        let ok = BatchMetrics::of_run(&views, Duration::from_secs(2), true, 100.0).render();
        assert!(ok.contains("quiver_batch_view_rows{feature_view=\"v\"} 7"));
        assert!(ok.contains("quiver_batch_view_duration_seconds{feature_view=\"v\"} 1.5"));
        assert!(ok.contains("quiver_batch_success 1"));
        assert!(ok.contains("quiver_batch_last_success_timestamp_seconds 100"));
        let failed = BatchMetrics::of_run(&[], Duration::from_secs(1), false, 200.0).render();
        assert!(failed.contains("quiver_batch_success 0"));
        assert!(failed.contains("quiver_batch_last_run_timestamp_seconds 200"));
        assert!(!failed.contains("quiver_batch_last_success_timestamp_seconds"));
    }
}
