//! The ingest loop: a Kafka consumer-group member that turns event
//! messages into online features and archived Parquet.
//!
//! Per batch (cut at `batch_max` messages or `batch_wait` after its first):
//! 1. decode and validate each message (its event time too, see
//!    [`IngestConfig::event_time_bounds`]); the ones that fail go to the
//!    dead-letter topic with the reason in headers, once per batch (awaited,
//!    so they are durable there before their offset can be committed);
//! 2. apply the events to the online store (see [`crate::apply`]);
//! 3. hand them to the archiver, which rolls Parquet files by size or age;
//! 4. commit, per partition, the offset after the last archived one.
//!
//! The first batch of a partition after it was assigned is checked against
//! the partition's marker first (see [`crate::sources`]): a topic recreated
//! under the same name stops ingest instead of being skipped as replays.
//!
//! A step that fails because a backend is unavailable is retried with
//! backoff (the batch is kept) while the partitions are paused and the
//! consumer keeps polling, so it keeps its group membership through an
//! outage of any length; any other failure stops ingest with the error.
//! Nothing is committed past data that is not durable. Replays after a
//! crash are harmless: tiles skip offsets they hold, latest values are
//! last-write-wins by event time, the archiver drops offsets it has
//! archived.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use quiver_core::event::EventTimeBounds;
use quiver_core::metrics::Metrics;
use quiver_core::par::par_map;
use quiver_core::registry::ViewSource;
use quiver_core::telemetry::{self, SpanContext};
use quiver_core::time::{Clock, Micros, SystemClock};
use quiver_core::wire::decode_event;
use quiver_core::{Error, ErrorKind, Registry, Result};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};
use tokio::time::Instant;
use tracing::field::Empty;
use tracing::Instrument;

use crate::apply::{row_tiles, Applier, ApplyStats, Record, RowTiles, SourceStats};
use crate::archive::{Archiver, FlushStats};
use crate::headers::{message_context, TraceHeaders};
use crate::producer::kafka_error;
use crate::sources::{fingerprint, probe, read_markers, write_markers, Check, Held, Marker};
use crate::{source_topic, KafkaConfig};

/// Start of a dead letter's reason when the event time was out of bounds.
const OUT_OF_RANGE: &str = "event time out of range: ";

/// Batching and retry settings of the ingest loop.
#[derive(Debug, Clone)]
pub struct IngestConfig {
    /// Most messages per batch.
    pub batch_max: usize,
    /// Longest wait for a batch to fill after its first message.
    pub batch_wait: Duration,
    /// Dead-letter topic for undecodable messages.
    pub dead_letter_topic: String,
    /// Longest pause between retries of a failing batch.
    pub max_backoff: Duration,
    /// Accepted event times; events outside are dead-lettered with the
    /// reason. The reference clock is the message's Kafka timestamp, capped
    /// at this process's clock (the wall clock when the message has none).
    /// For a message stamped when it was produced (PushEvents and
    /// `quiver generate` leave the stamping to Kafka) that is fixed, so a
    /// replay decides as the first delivery did; a producer that stamps
    /// messages with their event time makes `max_age` check nothing.
    pub event_time_bounds: EventTimeBounds,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            batch_max: 50_000,
            batch_wait: Duration::from_millis(250),
            dead_letter_topic: "quiver-events-dlq".into(),
            max_backoff: Duration::from_secs(10),
            event_time_bounds: EventTimeBounds::default(),
        }
    }
}

/// Running totals of an ingest process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IngestStats {
    /// Messages consumed (including replays and dead letters).
    pub messages: u64,
    /// Events applied to the online store.
    pub events: u64,
    /// Messages sent to the dead-letter topic (all reasons).
    pub dead_letters: u64,
    /// Of the dead letters, events whose time was outside
    /// [`IngestConfig::event_time_bounds`].
    pub out_of_range: u64,
    /// Batches processed.
    pub batches: u64,
    /// Partitions taken from this process by rebalances.
    pub partitions_revoked: u64,
    /// Failed attempts of a batch that were retried (store, object storage
    /// or Kafka unavailable).
    pub retries: u64,
    /// Online-store effect.
    pub online: ApplyStats,
    /// Archive files and events written.
    pub archived: FlushStats,
    /// Outcome counters per partition (`topic:partition`).
    pub partitions: BTreeMap<Arc<str>, PartitionStats>,
}

/// What happened to one partition's messages since the process started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PartitionStats {
    /// Messages consumed.
    pub messages: u64,
    /// Events decoded and applied.
    pub events: u64,
    /// Messages dead-lettered (all reasons).
    pub dead_letters: u64,
    /// Of those, events whose time was out of bounds.
    pub out_of_range: u64,
    /// Events older than every window behind their row's newest event.
    pub too_late: u64,
    /// Events whose id their tile had already counted (retried sends), per
    /// tile row: an event feeding two aggregation views counts twice here.
    pub duplicates: u64,
    /// Tile rows updated.
    pub tiles_written: u64,
    /// Tile rows skipped as replays (they held these offsets).
    pub tiles_replayed: u64,
    /// Failed attempts of batches holding this partition's messages.
    pub retries: u64,
}

/// Rebalance hook: remembers revoked partitions so the loop can drop their
/// archive buffers (the new owner replays them from the committed offset).
pub struct IngestContext {
    revoked: Arc<Mutex<Vec<(String, i32)>>>,
    /// Where consumer lag goes, once [`Ingestor::with_metrics`] set it.
    metrics: Arc<std::sync::OnceLock<Arc<Metrics>>>,
    /// The partitions whose lag was last reported.
    lagging: Mutex<HashSet<(String, i32)>>,
}

impl ClientContext for IngestContext {
    /// librdkafka's statistics (every `statistics.interval.ms`): each
    /// assigned partition's consumer lag (see [`consumer_lag`]).
    /// Partitions no longer reported are dropped.
    fn stats(&self, statistics: Statistics) {
        let Some(m) = self.metrics.get() else {
            return;
        };
        let lag = &m.ingest.lag;
        let mut now: HashSet<(String, i32)> = HashSet::new();
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                let Some(behind) = consumer_lag(p) else {
                    continue;
                };
                if *partition < 0 {
                    continue;
                }
                lag.with_label_values(&[topic, &partition.to_string()])
                    .set(behind);
                now.insert((topic.clone(), *partition));
            }
        }
        if let Ok(mut before) = self.lagging.lock() {
            for (topic, partition) in before.difference(&now) {
                let _ = lag.remove_label_values(&[topic, &partition.to_string()]);
            }
            *before = now;
        }
    }
}

impl ConsumerContext for IngestContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                // A pause (while a batch backs off) outlives rebalances in
                // librdkafka: lift it, or the partition would stay stalled
                // if it came back to this process.
                if let Err(e) = consumer.resume(tpl) {
                    tracing::warn!(error = %e, "resuming revoked partitions failed");
                }
                let parts: Vec<(String, i32)> = tpl
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_owned(), e.partition()))
                    .collect();
                tracing::info!(partitions = ?parts, "partitions revoked");
                if let Ok(mut r) = self.revoked.lock() {
                    r.extend(parts);
                }
            }
            Rebalance::Assign(tpl) => {
                let parts: Vec<(String, i32)> = tpl
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_owned(), e.partition()))
                    .collect();
                tracing::info!(count = parts.len(), partitions = ?parts, "partitions assigned");
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }
}

/// How many messages of a partition this member has yet to consume: the
/// high watermark minus the position (librdkafka's `app_offset`, the offset
/// after the last message handed to ingest). Before the first message,
/// librdkafka's `consumer_lag` (from the committed offset), or everything
/// from the log start when nothing was committed. Commits trail the
/// position by up to `archive.roll_interval` (offsets are committed once
/// archived), so committed-offset lag would grow with the roll interval
/// rather than with a backlog. `None` for partitions this member does not
/// fetch or whose watermarks are not known yet.
fn consumer_lag(p: &rdkafka::statistics::Partition) -> Option<i64> {
    if p.fetch_state == "none" || p.hi_offset < 0 {
        return None;
    }
    if p.app_offset >= 0 {
        return Some((p.hi_offset - p.app_offset).max(0));
    }
    if p.consumer_lag >= 0 {
        return Some(p.consumer_lag);
    }
    Some(p.hi_offset - p.committed_offset.max(p.lo_offset.max(0)))
}

/// One consumed message, owned.
struct Msg {
    topic: Arc<str>,
    partition: i32,
    offset: i64,
    payload: Option<Vec<u8>>,
    key: Option<Vec<u8>>,
    /// The message's Kafka timestamp (create or log-append time), micros.
    timestamp: Option<Micros>,
    /// The producing span's context (`traceparent` header), read only
    /// when traces are exported.
    trace: Option<SpanContext>,
}

/// The ingest process: consumer, dead-letter producer, online applier and
/// archiver.
pub struct Ingestor {
    /// Shared with the thread of the last commit (see [`Ingestor::run`]).
    consumer: Arc<StreamConsumer<IngestContext>>,
    dlq: FutureProducer,
    registry: Arc<Registry>,
    applier: Applier,
    archiver: Option<Archiver>,
    cfg: IngestConfig,
    kafka_timeout: Duration,
    revoked: Arc<Mutex<Vec<(String, i32)>>>,
    committed: HashMap<(String, i32), i64>,
    /// Messages received while a failing batch was backing off (polling
    /// keeps the group membership); they start the next batch.
    carry: Vec<Msg>,
    stats: IngestStats,
    logged: std::time::Instant,
    /// See [`KafkaConfig::topic_epoch`].
    topic_epoch: u32,
    /// Partitions checked against their markers since assigned.
    verified: HashSet<(String, i32)>,
    /// Per partition, the last offset of a processed batch.
    processed: HashMap<(String, i32), i64>,
    /// Client settings of the marker checks' own consumer.
    probe_client: ClientConfig,
    /// Prometheus metrics, when set ([`Ingestor::with_metrics`]).
    metrics: Option<Arc<Metrics>>,
    /// Shared with the consumer's context (consumer lag).
    lag_metrics: Arc<std::sync::OnceLock<Arc<Metrics>>>,
    /// The totals last exported to `metrics`.
    exported: IngestStats,
}

/// A batch decoded once: its events, and its dead letters with the
/// reasons (sent once, however often the rest is retried).
struct Prepared {
    records: Vec<Record>,
    /// Index in the batch of each record's message.
    origin: Vec<usize>,
    /// Index in the batch and reason of each dead letter.
    dead: Vec<(usize, String)>,
    dead_sent: bool,
    /// Events decoded (records move to the archiver once applied).
    events: u64,
    /// The online-store effect (total and per source), once applied.
    applied: Option<(ApplyStats, SourceStats)>,
    /// Whether the partitions' markers were written.
    marked: bool,
}

impl Prepared {
    /// Keeps what belongs to the batch messages whose `keep` is true,
    /// re-indexed as the batch will be after the same filter; decisions
    /// (dead letters, sent or not) stay as made.
    fn retain(&mut self, keep: &[bool]) {
        let mut new_index = Vec::with_capacity(keep.len());
        let mut n = 0;
        for &k in keep {
            new_index.push(n);
            n += usize::from(k);
        }
        let moved = self.records.len() != self.origin.len();
        let mut records = std::mem::take(&mut self.records).into_iter();
        let mut kept_records = Vec::new();
        let mut kept_origin = Vec::new();
        for &i in &self.origin {
            let r = if moved { None } else { records.next() };
            if keep[i] {
                kept_origin.push(new_index[i]);
                kept_records.extend(r);
            }
        }
        self.events = kept_origin.len() as u64;
        self.origin = kept_origin;
        self.records = kept_records;
        self.dead = std::mem::take(&mut self.dead)
            .into_iter()
            .filter(|(i, _)| keep[*i])
            .map(|(i, why)| (new_index[i], why))
            .collect();
    }
}

/// Most tiles an entity's aggregation row keeps per state: the longest
/// window's (at most [`quiver_core::registry::MAX_TILES_PER_WINDOW`]) plus
/// those of the accepted future skew (see [`crate::apply`]).
pub const MAX_ROW_TILES: i64 = 2 * quiver_core::registry::MAX_TILES_PER_WINDOW;

/// Refuses a future skew that would make rows of an aggregation view keep
/// more than [`MAX_ROW_TILES`] tiles (short tiles, long skew).
fn check_row_tiles(registry: &Registry, skew: Duration) -> Result<()> {
    let skew_micros = quiver_core::time::duration_micros(skew);
    for v in registry.views() {
        let ViewSource::Aggregations { tile, aggregations } = &v.source else {
            continue;
        };
        let RowTiles {
            retention,
            lead,
            keep,
        } = row_tiles(*tile, aggregations, skew_micros);
        if keep > MAX_ROW_TILES {
            return Err(Error::invalid(format!(
                "feature view {:?}: with its tile of {} and ingest.max_future_skew of {}, an entity's row would keep {keep} tiles per aggregation (the longest window's {retention} plus {lead} for events ahead of the clock); at most {MAX_ROW_TILES} are supported: lower ingest.max_future_skew or lengthen the tile",
                v.name,
                humantime::format_duration(std::time::Duration::from_micros(*tile as u64)),
                humantime::format_duration(skew),
            )));
        }
    }
    Ok(())
}

/// The source id of a partition, as tile rows and the archive name it:
/// `topic:partition` (`topic@epoch:partition` after the topic was
/// recreated, see [`crate::source_topic`]).
fn source_id(topic: &str, partition: i32, epoch: u32) -> String {
    format!("{}:{partition}", source_topic(topic, epoch))
}

/// Each partition's message of `batch` with the highest offset.
fn last_per_partition(batch: &[Msg]) -> HashMap<(&str, i32), &Msg> {
    let mut last: HashMap<(&str, i32), &Msg> = HashMap::new();
    for m in batch {
        let e = last.entry((&*m.topic, m.partition)).or_insert(m);
        if m.offset > e.offset {
            *e = m;
        }
    }
    last
}

/// Whether `m` is of one of the partitions `parts`.
fn of(parts: &[(String, i32)], m: &Msg) -> bool {
    parts
        .iter()
        .any(|(t, p)| t.as_str() == &*m.topic && *p == m.partition)
}

/// Takes the partitions revoked since the last call.
fn take_revoked(revoked: &Mutex<Vec<(String, i32)>>) -> Vec<(String, i32)> {
    revoked
        .lock()
        .map(|mut r| std::mem::take(&mut *r))
        .unwrap_or_default()
}

/// Appends a consumed message to `to`. The rebalance callback runs inside
/// the poll that returned it, so partitions revoked by then lose their
/// earlier messages from `to` (and are added to `gone`, for the caller's
/// other buffers), and the message itself belongs to the current
/// assignment, even when its partition came straight back.
fn push_current(
    revoked: &Mutex<Vec<(String, i32)>>,
    gone: &mut Vec<(String, i32)>,
    to: &mut Vec<Msg>,
    m: rdkafka::error::KafkaResult<rdkafka::message::BorrowedMessage<'_>>,
) {
    let now_gone = take_revoked(revoked);
    if !now_gone.is_empty() {
        to.retain(|x| !of(&now_gone, x));
        gone.extend(now_gone);
    }
    push_msg(to, m);
}

/// Whether retrying may help: the store, object storage or Kafka was
/// unreachable or timed out. Anything else (a corrupt stored state, a write
/// the store rejects, a bug) would fail the same way again.
fn retryable(e: &Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::Unavailable | ErrorKind::DeadlineExceeded
    )
}

/// The error ingest stops with when retrying cannot help.
fn stopped(e: Error) -> Error {
    Error::new(
        e.kind(),
        format!(
            "ingest stopped: {} (retrying cannot help; nothing past the last committed offset is lost: fix the cause and restart)",
            e.message()
        ),
    )
}

impl std::fmt::Debug for Ingestor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ingestor")
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Ingestor {
    /// Joins the consumer group `kafka.group_id` on `kafka.topic`.
    /// Without an archiver, offsets are committed after the online write.
    pub fn new(
        kafka: &KafkaConfig,
        cfg: IngestConfig,
        registry: Arc<Registry>,
        applier: Applier,
        archiver: Option<Archiver>,
    ) -> Result<Ingestor> {
        check_row_tiles(&registry, cfg.event_time_bounds.max_future_skew)?;
        let applier = applier.with_max_future_skew(cfg.event_time_bounds.max_future_skew);
        let revoked = Arc::new(Mutex::new(Vec::new()));
        let mut client = kafka.client_config();
        // A member that dies without leaving (kill -9, a lost node) holds
        // its partitions until the group coordinator gives up on it:
        // librdkafka's default is 45 s. 10 s (heartbeats every 3 s, Kafka's
        // 1:3 ratio) bounds the stall; `kafka.properties` overrides both,
        // and `group.instance.id` (static membership) there lets a
        // restarted process take its partitions back without a rebalance.
        // (The KIP-848 protocol, `group.protocol = consumer`, takes these
        // from the broker and refuses them here.)
        let kip848 = kafka
            .extra
            .iter()
            .any(|(k, v)| k == "group.protocol" && v.eq_ignore_ascii_case("consumer"));
        for (key, value) in [
            ("session.timeout.ms", "10000"),
            ("heartbeat.interval.ms", "3000"),
        ] {
            if !kip848 && !kafka.extra.iter().any(|(k, _)| k == key) {
                client.set(key, value);
            }
        }
        // Consumer lag per partition comes from librdkafka's statistics.
        if !kafka
            .extra
            .iter()
            .any(|(k, _)| k == "statistics.interval.ms")
        {
            client.set("statistics.interval.ms", "5000");
        }
        let lag_metrics = Arc::new(std::sync::OnceLock::new());
        let consumer: StreamConsumer<IngestContext> = client
            .set("group.id", &kafka.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            .set("fetch.min.bytes", "65536")
            .set("fetch.wait.max.ms", "100")
            .set("queued.min.messages", "200000")
            .create_with_context(IngestContext {
                revoked: revoked.clone(),
                metrics: lag_metrics.clone(),
                lagging: Mutex::new(HashSet::new()),
            })
            .map_err(|e| Error::invalid(format!("invalid Kafka consumer settings: {e}")))?;
        consumer
            .subscribe(&[&kafka.topic])
            .map_err(|e| kafka_error("subscribing to the event topic", e))?;
        let dlq: FutureProducer = kafka
            .client_config()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .create()
            .map_err(|e| Error::invalid(format!("invalid Kafka producer settings: {e}")))?;
        let archiver = archiver.map(|a| a.with_topic_epoch(kafka.topic_epoch));
        Ok(Ingestor {
            consumer: Arc::new(consumer),
            dlq,
            registry,
            applier,
            archiver,
            cfg,
            kafka_timeout: kafka.timeout,
            revoked,
            committed: HashMap::new(),
            carry: Vec::new(),
            stats: IngestStats::default(),
            logged: std::time::Instant::now(),
            topic_epoch: kafka.topic_epoch,
            verified: HashSet::new(),
            processed: HashMap::new(),
            probe_client: kafka.client_config(),
            metrics: None,
            lag_metrics,
            exported: IngestStats::default(),
        })
    }

    /// Exports the ingest and freshness metrics (see
    /// [`quiver_core::metrics`]) to `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Ingestor {
        self.applier.set_metrics(metrics.clone());
        let _ = self.lag_metrics.set(metrics.clone());
        // Every stage's series exists from the start, at 0 (dashboards and
        // alerts then see "no errors", not "no data").
        for stage in ["online_store", "archive", "kafka"] {
            metrics.ingest.errors.with_label_values(&[stage]);
        }
        self.metrics = Some(metrics);
        self
    }

    /// Adds what the totals gained since the last call to the counters.
    fn export(&mut self) {
        let Some(m) = &self.metrics else {
            return;
        };
        let i = &m.ingest;
        let (s, e) = (&self.stats, &self.exported);
        for (source, p) in &s.partitions {
            let b = e.partitions.get(source).copied().unwrap_or_default();
            let (topic, partition) = source.rsplit_once(':').unwrap_or((source, ""));
            let l = [topic, partition];
            let add =
                |c: &quiver_core::metrics::IntCounterVec, labels: &[&str], now: u64, then: u64| {
                    c.with_label_values(labels).inc_by(now.saturating_sub(then));
                };
            add(&i.messages, &l, p.messages, b.messages);
            add(&i.applied, &l, p.events, b.events);
            add(
                &i.dead_letters,
                &[topic, partition, "out_of_range"],
                p.out_of_range,
                b.out_of_range,
            );
            add(
                &i.dead_letters,
                &[topic, partition, "invalid"],
                p.dead_letters - p.out_of_range,
                b.dead_letters - b.out_of_range,
            );
            add(&i.too_late, &l, p.too_late, b.too_late);
            add(&i.duplicates, &l, p.duplicates, b.duplicates);
            add(
                &i.tile_rows,
                &[topic, partition, "written"],
                p.tiles_written,
                b.tiles_written,
            );
            add(
                &i.tile_rows,
                &[topic, partition, "replayed"],
                p.tiles_replayed,
                b.tiles_replayed,
            );
            add(&i.retries, &l, p.retries, b.retries);
        }
        let rows = |outcome: &str, now: u64, then: u64| {
            i.rows
                .with_label_values(&[outcome])
                .inc_by(now.saturating_sub(then));
        };
        rows("written", s.online.rows_written, e.online.rows_written);
        rows("stale", s.online.rows_stale, e.online.rows_stale);
        i.archive_files
            .inc_by(s.archived.files.saturating_sub(e.archived.files));
        i.archive_events
            .inc_by(s.archived.events.saturating_sub(e.archived.events));
        i.archive_bytes
            .inc_by(s.archived.bytes.saturating_sub(e.archived.bytes));
        self.exported = self.stats.clone();
    }

    /// Counts a failed attempt at `stage` (`quiver_ingest_errors_total`).
    fn failed_at(metrics: &Option<Arc<Metrics>>, stage: &str) {
        if let Some(m) = metrics {
            m.ingest.errors.with_label_values(&[stage]).inc();
        }
    }

    /// Totals so far.
    pub fn stats(&self) -> IngestStats {
        self.stats.clone()
    }

    /// Consumes until `shutdown` resolves, then archives what is buffered,
    /// commits and returns the totals. `on_batch` sees the totals after
    /// every batch (progress, tests).
    pub async fn run(
        mut self,
        shutdown: impl std::future::Future<Output = ()>,
        mut on_batch: impl FnMut(&IngestStats),
    ) -> Result<IngestStats> {
        tokio::pin!(shutdown);
        if let Some(m) = &self.metrics {
            m.ingest.set_up(true);
        }
        let result = self.consume(&mut shutdown, &mut on_batch).await;
        if let Some(m) = &self.metrics {
            m.ingest.set_up(false);
        }
        result?;
        self.drop_revoked();
        if let Some(a) = self.archiver.as_mut() {
            let s = a.flush(true).await?;
            self.stats.archived += s;
        }
        self.final_commit().await?;
        self.export();
        self.log_partitions(true);
        Ok(self.stats)
    }

    /// The last commit, at shutdown: synchronous, so the offsets are on
    /// the broker when `run` returns, but on a thread of its own and
    /// awaited at most the Kafka timeout. librdkafka's synchronous commit
    /// waits without limit, e.g. for a group coordinator that is gone;
    /// then the thread is left behind (holding the consumer, which is
    /// never closed) and the partitions' next owner replays from the last
    /// committed offsets, skipping what was applied.
    async fn final_commit(&mut self) -> Result<()> {
        let Some(tpl) = self.commit_list()? else {
            return Ok(());
        };
        let consumer = self.consumer.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let started = std::time::Instant::now();
        std::thread::Builder::new()
            .name("quiver-commit".into())
            .spawn(move || {
                let committed = consumer.commit(&tpl, CommitMode::Sync);
                // Before answering: `run` then drops the last handle and
                // leaves the group itself, not this thread after it.
                drop(consumer);
                let _ = tx.send(committed);
            })
            .map_err(|e| Error::internal(format!("starting the commit thread: {e}")))?;
        let problem = match tokio::time::timeout(self.kafka_timeout, rx).await {
            Ok(Ok(committed)) => {
                self.observe_commit(started);
                match committed {
                    Ok(()) => return Ok(()),
                    Err(e) => format!("failed: {e}"),
                }
            }
            Ok(Err(_)) => "ended without an answer".to_owned(),
            Err(_) => format!("not answered within {:?}", self.kafka_timeout),
        };
        tracing::warn!(
            "offset commit at shutdown {problem}; the partitions' next owner replays from the last committed offsets"
        );
        Ok(())
    }

    /// The consume loop of [`Ingestor::run`], until `shutdown` resolves.
    async fn consume(
        &mut self,
        shutdown: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
        on_batch: &mut impl FnMut(&IngestStats),
    ) -> Result<()> {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            let mut batch: Vec<Msg> = std::mem::take(&mut self.carry);
            let mut gone: Vec<(String, i32)> = Vec::new();
            if batch.is_empty() {
                let mut stream = self.consumer.stream();
                tokio::select! {
                    _ = shutdown.as_mut() => break,
                    _ = tick.tick() => {}
                    m = stream.next() => {
                        if let Some(m) = m {
                            let collecting = std::time::Instant::now();
                            push_current(&self.revoked, &mut gone, &mut batch, m);
                            // One timer per batch, not one per message.
                            let deadline = tokio::time::sleep_until(Instant::now() + self.cfg.batch_wait);
                            tokio::pin!(deadline);
                            while batch.len() < self.cfg.batch_max {
                                tokio::select! {
                                    biased;
                                    m = stream.next() => match m {
                                        Some(m) => push_current(&self.revoked, &mut gone, &mut batch, m),
                                        None => break,
                                    },
                                    _ = &mut deadline => break,
                                }
                            }
                            tracing::debug!(
                                messages = batch.len(),
                                collect_ms = collecting.elapsed().as_millis() as u64,
                                "collected"
                            );
                        }
                    }
                }
            }
            // Revoked after the last message: all their messages here are
            // from before; their next owner (maybe us again) resumes from
            // the committed offset, handling them here would race with it.
            let late = take_revoked(&self.revoked);
            batch.retain(|m| !of(&late, m));
            gone.extend(late);
            self.forget(&gone);
            if batch.is_empty() {
                // Idle: roll archive files that are due by age, and commit.
                self.flush_idle().await?;
                self.export();
                continue;
            }
            let started = std::time::Instant::now();
            // The OpenTelemetry messaging conventions' batch "process" span,
            // linked to the spans that produced its messages.
            let span = telemetry::span(|| {
                let span = tracing::info_span!(
                    "ingest batch",
                    otel.name = "process events",
                    otel.kind = "consumer",
                    messaging.system = "kafka",
                    messaging.operation.type = "process",
                    messaging.batch.message_count = telemetry::int(batch.len()),
                    quiver.links_left_out = Empty,
                );
                let left_out =
                    telemetry::add_links(&span, batch.iter().filter_map(|m| m.trace.clone()));
                if left_out > 0 {
                    span.record("quiver.links_left_out", telemetry::int(left_out));
                }
                span
            });
            let messages = batch.len();
            telemetry::in_span(&span, self.with_retry(batch, shutdown)).await?;
            span.in_scope(|| tracing::debug!(messages, "batch applied"));
            if let Some(m) = &self.metrics {
                m.ingest
                    .batch_duration
                    .observe(started.elapsed().as_secs_f64());
            }
            self.export();
            on_batch(&self.stats);
            self.log_partitions(false);
        }
        Ok(())
    }

    /// Rolls archive files that are due by age, and commits. A roll that
    /// failed for a retryable reason is tried again on the next tick or
    /// batch; any other failure (e.g. the partition's archive state was
    /// taken over by another process) stops ingest.
    async fn flush_idle(&mut self) -> Result<()> {
        if let Some(a) = self.archiver.as_mut() {
            match a.flush(false).await {
                Ok(s) => {
                    self.stats.archived += s;
                }
                Err(e) if retryable(&e) => {
                    self.stats.retries += 1;
                    Self::failed_at(&self.metrics, "archive");
                    tracing::warn!(error = %e, "archive roll failed; retrying");
                }
                Err(e) => return Err(stopped(e)),
            }
        }
        let _ = self.commit();
        Ok(())
    }

    /// Forgets state of partitions revoked since the last call; returns them.
    fn drop_revoked(&mut self) -> Vec<(String, i32)> {
        let revoked = take_revoked(&self.revoked);
        self.forget(&revoked);
        revoked
    }

    /// Forgets the archive buffers, cached tile rows and pending commits of
    /// revoked partitions (their next owner replays from the committed
    /// offset).
    fn forget(&mut self, revoked: &[(String, i32)]) {
        if revoked.is_empty() {
            return;
        }
        self.stats.partitions_revoked += revoked.len() as u64;
        if let Some(a) = self.archiver.as_mut() {
            a.forget(revoked);
        }
        let sources: Vec<String> = revoked
            .iter()
            .map(|(t, p)| source_id(t, *p, self.topic_epoch))
            .collect();
        self.applier.forget_sources(&sources);
        for p in revoked {
            self.committed.remove(p);
            self.verified.remove(p);
            self.processed.remove(p);
        }
    }

    /// Processes a batch. A retryable failure (see [`retryable`]) is
    /// retried with backoff while the assigned partitions are paused and the
    /// consumer keeps polling, so it stays in the group however long the
    /// outage lasts; dead letters are sent once. Partitions revoked
    /// meanwhile are dropped from the batch (their new owner replays them).
    /// Any other failure stops ingest with the error, as does shutdown
    /// while retrying; nothing past the failing batch is committed.
    async fn with_retry(
        &mut self,
        mut batch: Vec<Msg>,
        shutdown: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
    ) -> Result<()> {
        let mut prep = self.prepare(&batch);
        let mut backoff = Duration::from_millis(100);
        let mut paused = false;
        loop {
            let e = match self.process(&batch, &mut prep).await {
                Ok(()) => break,
                Err(e) if !retryable(&e) => return Err(stopped(e)),
                Err(e) => e,
            };
            self.stats.retries += 1;
            let mut seen: Vec<(&str, i32)> = Vec::new();
            for m in &batch {
                if !seen.contains(&(&*m.topic, m.partition)) {
                    seen.push((&*m.topic, m.partition));
                    let source: Arc<str> =
                        Arc::from(source_id(&m.topic, m.partition, self.topic_epoch));
                    self.stats.partitions.entry(source).or_default().retries += 1;
                }
            }
            // Retries show while the outage lasts, not only after it.
            self.export();
            tracing::warn!(error = %e, retry_in = ?backoff, "ingest batch failed; retrying (partitions paused)");
            // Every round: partitions assigned since the last one too.
            if let Ok(tpl) = self.consumer.assignment() {
                if let Err(err) = self.consumer.pause(&tpl) {
                    tracing::warn!(error = %err, "pausing partitions failed");
                }
            }
            paused = true;
            let mut gone: Vec<(String, i32)> = Vec::new();
            {
                let mut stream = self.consumer.stream();
                let wait = tokio::time::sleep(backoff);
                tokio::pin!(wait);
                loop {
                    tokio::select! {
                        _ = shutdown.as_mut() => return Err(e),
                        _ = &mut wait => break,
                        // Polling serves heartbeats, rebalances and
                        // max.poll.interval.ms; a message that still
                        // arrives waits for the next batch.
                        m = stream.next() => if let Some(m) = m {
                            push_current(&self.revoked, &mut gone, &mut self.carry, m);
                        },
                    }
                }
            }
            backoff = (backoff * 2).min(self.cfg.max_backoff);
            let late = take_revoked(&self.revoked);
            self.carry.retain(|m| !of(&late, m));
            gone.extend(late);
            if !gone.is_empty() {
                // The batch's messages of revoked partitions all predate
                // the revocation (new ones went to `carry`).
                let keep: Vec<bool> = batch.iter().map(|m| !of(&gone, m)).collect();
                prep.retain(&keep);
                let mut k = keep.iter();
                batch.retain(|_| *k.next().unwrap_or(&true));
                self.forget(&gone);
                if batch.is_empty() {
                    break;
                }
            }
        }
        if paused {
            match self.consumer.assignment() {
                Ok(tpl) => {
                    if let Err(e) = self.consumer.resume(&tpl) {
                        tracing::warn!(error = %e, "resuming partitions failed");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "reading the assignment failed"),
            }
        }
        Ok(())
    }

    /// Decodes and checks a batch (see [`IngestConfig::event_time_bounds`]).
    fn prepare(&self, batch: &[Msg]) -> Prepared {
        let mut sources: HashMap<(Arc<str>, i32), Arc<str>> = HashMap::new();
        let registry = &self.registry;
        let epoch = self.topic_epoch;
        let bounds = self.cfg.event_time_bounds;
        let wall = SystemClock.now_micros();
        let decoded = par_map(batch.iter().collect(), crate::PAR_MIN_ITEMS, |m: &Msg| {
            let ev = match &m.payload {
                None => return Err(Error::invalid("empty message (no payload)")),
                Some(p) => decode_event(registry, p)?,
            };
            let reference = m.timestamp.map_or(wall, |t| t.min(wall));
            bounds
                .check(ev.event_time, reference)
                .map_err(|m| Error::invalid(format!("{OUT_OF_RANGE}{m}")))?;
            Ok(ev)
        });
        let mut prep = Prepared {
            records: Vec::with_capacity(batch.len()),
            origin: Vec::with_capacity(batch.len()),
            dead: Vec::new(),
            dead_sent: false,
            events: 0,
            applied: None,
            marked: false,
        };
        for (i, (m, decoded)) in batch.iter().zip(decoded).enumerate() {
            let source = sources
                .entry((m.topic.clone(), m.partition))
                .or_insert_with(|| Arc::from(source_id(&m.topic, m.partition, epoch)))
                .clone();
            match decoded {
                Ok(event) => {
                    prep.records.push(Record {
                        source,
                        offset: m.offset,
                        event,
                    });
                    prep.origin.push(i);
                }
                Err(e) => prep.dead.push((i, e.message().to_owned())),
            }
        }
        prep.events = prep.records.len() as u64;
        prep
    }

    async fn process<'b>(&mut self, batch: &'b [Msg], prep: &mut Prepared) -> Result<()> {
        let started = std::time::Instant::now();
        let metrics = self.metrics.clone();
        let failed = |stage: &'static str| {
            let metrics = &metrics;
            move |_: &Error| Self::failed_at(metrics, stage)
        };
        self.verify(batch)
            .await
            .inspect_err(failed("online_store"))?;
        if !prep.dead_sent {
            let dead: Vec<(&Msg, &str)> = prep
                .dead
                .iter()
                .map(|(i, why)| (&batch[*i], why.as_str()))
                .collect();
            self.dead_letter(&dead).await.inspect_err(failed("kafka"))?;
            prep.dead_sent = true;
        }
        let sent_at = started.elapsed();
        let (online, by_source) = match &prep.applied {
            Some(s) => s.clone(),
            None => {
                let span = telemetry::span(|| {
                    tracing::info_span!(
                        "ingest apply",
                        otel.name = "apply to online store",
                        quiver.records = telemetry::int(prep.records.len()),
                    )
                });
                let s = self
                    .applier
                    .apply_by_source(&prep.records)
                    .instrument(span)
                    .await
                    .inspect_err(failed("online_store"))?;
                prep.applied = Some(s.clone());
                s
            }
        };
        if !prep.marked {
            self.mark(batch).await.inspect_err(failed("online_store"))?;
            prep.marked = true;
        }
        let applied_at = started.elapsed();
        if let Some(a) = self.archiver.as_mut() {
            // Reading each partition's archive state is what can fail;
            // once all are open, records move to the buffers infallibly
            // (a retry finds them there: adds are idempotent per offset).
            let mut opened: Vec<(&str, i32)> = Vec::new();
            for m in batch {
                if !opened.contains(&(&*m.topic, m.partition)) {
                    a.open(&m.topic, m.partition)
                        .await
                        .inspect_err(failed("archive"))?;
                    opened.push((&*m.topic, m.partition));
                }
            }
            let records = std::mem::take(&mut prep.records);
            for (i, r) in prep.origin.iter().zip(records) {
                let m = &batch[*i];
                a.add(&m.topic, m.partition, r)
                    .await
                    .inspect_err(failed("archive"))?;
            }
            for (i, _) in &prep.dead {
                let m = &batch[*i];
                a.skip(&m.topic, m.partition, m.offset)
                    .await
                    .inspect_err(failed("archive"))?;
            }
            let s = a.flush(false).await.inspect_err(failed("archive"))?;
            self.stats.archived += s;
        } else {
            // The next offset per partition, one commit entry each.
            for ((topic, partition), m) in last_per_partition(batch) {
                let e = self
                    .committed
                    .entry((topic.to_owned(), partition))
                    .or_insert(-1);
                *e = (*e).max(m.offset + 1);
            }
        }
        tracing::debug!(
            messages = batch.len(),
            dead_letter_ms = sent_at.as_millis() as u64,
            online_ms = (applied_at - sent_at).as_millis() as u64,
            archive_ms = (started.elapsed() - applied_at).as_millis() as u64,
            tiles = online.tiles_written,
            rows = online.rows_written,
            "batch"
        );
        for ((t, p), m) in last_per_partition(batch) {
            self.processed.insert((t.to_owned(), p), m.offset);
        }
        self.stats.messages += batch.len() as u64;
        self.stats.events += prep.events;
        self.stats.dead_letters += prep.dead.len() as u64;
        self.stats.out_of_range += prep
            .dead
            .iter()
            .filter(|(_, why)| why.starts_with(OUT_OF_RANGE))
            .count() as u64;
        self.stats.batches += u64::from(!batch.is_empty());
        self.stats.online += online;
        // Per partition: messages, events, dead letters, out of range
        // (a batch holds few partitions: a short list beats a map).
        let mut counts: Vec<((&str, i32), [u64; 4])> = Vec::new();
        let mut count = |m: &'b Msg, k: usize| {
            let id = (&*m.topic, m.partition);
            match counts.iter_mut().find(|(p, _)| *p == id) {
                Some((_, c)) => c[k] += 1,
                None => {
                    let mut c = [0; 4];
                    c[k] = 1;
                    counts.push((id, c));
                }
            }
        };
        for m in batch {
            count(m, 0);
        }
        for i in &prep.origin {
            count(&batch[*i], 1);
        }
        for (i, why) in &prep.dead {
            count(&batch[*i], 2);
            if why.starts_with(OUT_OF_RANGE) {
                count(&batch[*i], 3);
            }
        }
        for ((topic, partition), c) in counts {
            let source: Arc<str> = Arc::from(source_id(topic, partition, self.topic_epoch));
            let p = self.stats.partitions.entry(source).or_default();
            p.messages += c[0];
            p.events += c[1];
            p.dead_letters += c[2];
            p.out_of_range += c[3];
        }
        for (source, s) in by_source {
            let p = self.stats.partitions.entry(source).or_default();
            p.too_late += s.events_too_late;
            p.duplicates += s.events_duplicate;
            p.tiles_written += s.tiles_written;
            p.tiles_replayed += s.tiles_replayed;
        }
        self.commit()
    }

    /// Checks each partition of `batch` not checked since it was assigned
    /// (or whose offsets went back since: librdkafka resets a position
    /// that fell out of range, e.g. of a recreated topic, without a
    /// rebalance) against its marker (see [`crate::sources`]); a partition
    /// that holds other messages than those applied from it stops ingest
    /// before anything of it is applied.
    async fn verify(&mut self, batch: &[Msg]) -> Result<()> {
        // Per partition of the batch: its first message, the highest
        // offset so far, and whether an offset went back (from the last
        // processed batch, or within this one).
        let mut parts: Vec<(&Msg, i64, bool)> = Vec::new();
        for m in batch {
            match parts
                .iter_mut()
                .find(|(x, _, _)| x.partition == m.partition && x.topic == m.topic)
            {
                Some((_, high, back)) => {
                    *back |= m.offset <= *high;
                    *high = (*high).max(m.offset);
                }
                None => {
                    let k = (m.topic.to_string(), m.partition);
                    let back = self.processed.get(&k).is_some_and(|&last| m.offset <= last);
                    parts.push((m, m.offset, back));
                }
            }
        }
        let mut todo: Vec<&Msg> = Vec::new();
        // Partitions whose offsets went back: the batch may hold two
        // messages at one offset (old and new log), so only Kafka itself
        // says what the partition holds now.
        let mut went_back: Vec<(&str, i32)> = Vec::new();
        for (m, _, back) in parts {
            let k = (m.topic.to_string(), m.partition);
            if back {
                self.verified.remove(&k);
                went_back.push((&*m.topic, m.partition));
            }
            if !self.verified.contains(&k) {
                todo.push(m);
            }
        }
        let Some(first) = todo.first() else {
            return Ok(());
        };
        let topic = first.topic.clone();
        let sources: Vec<String> = todo
            .iter()
            .map(|m| source_id(&m.topic, m.partition, self.topic_epoch))
            .collect();
        let markers = read_markers(&**self.applier.store(), &topic, &sources).await?;
        if let Some(used) = markers.epoch_in_use.filter(|&e| e > self.topic_epoch) {
            return Err(Error::precondition(format!(
                "kafka.topic_epoch is {} but epoch {used} of topic {topic} is already in use: \
                 another quiver ingest process was moved to the recreated topic; set \
                 kafka.topic_epoch = {used} here too",
                self.topic_epoch
            )));
        }
        let mut checks: Vec<(usize, i32, Check)> = Vec::new();
        for (i, (m, source)) in todo.iter().zip(&sources).enumerate() {
            match markers.by_source.get(source) {
                Some(&marker) => {
                    // The batch may hold the marker's message itself.
                    let here = batch
                        .iter()
                        .find(|x| {
                            x.topic == m.topic
                                && x.partition == m.partition
                                && x.offset == marker.offset
                        })
                        .filter(|_| !went_back.contains(&(&*m.topic, m.partition)));
                    match here {
                        Some(x) => {
                            let held = if fingerprint(x.payload.as_deref()) == marker.fingerprint {
                                Held::Same
                            } else {
                                Held::Different
                            };
                            self.check_held(source, Check::Marker(marker), held)?;
                        }
                        None => checks.push((i, m.partition, Check::Marker(marker))),
                    }
                }
                // A source new on a raised epoch must start at the
                // partition's beginning (the group may have kept the old
                // topic's offsets).
                None if self.topic_epoch > 0 => {
                    checks.push((i, m.partition, Check::StartsAt { first: m.offset }));
                }
                None => {}
            }
        }
        if !checks.is_empty() {
            let (client, t, timeout) = (
                self.probe_client.clone(),
                topic.to_string(),
                self.kafka_timeout,
            );
            let asked: Vec<(i32, Check)> = checks.iter().map(|c| (c.1, c.2)).collect();
            let found = tokio::task::spawn_blocking(move || probe(&client, &t, &asked, timeout))
                .await
                .map_err(|e| Error::internal(format!("recreation check failed: {e}")))??;
            for ((i, _, check), held) in checks.into_iter().zip(found) {
                self.check_held(&sources[i], check, held)?;
            }
        }
        for m in todo {
            self.verified.insert((m.topic.to_string(), m.partition));
        }
        Ok(())
    }

    /// The verdict on one partition (see [`Ingestor::verify`]).
    fn check_held(&self, source: &str, check: Check, held: Held) -> Result<()> {
        let next = self.topic_epoch.saturating_add(1);
        let (marker, what) = match (check, held) {
            (_, Held::Same) => return Ok(()),
            (Check::Marker(m), Held::Removed { low }) => {
                tracing::warn!(
                    partition = source,
                    applied_through = m.offset,
                    first_offset = low,
                    "the last applied offset was removed by retention or compaction: \
                     cannot check that the topic was not recreated"
                );
                return Ok(());
            }
            (Check::StartsAt { first }, Held::Skips { low }) => {
                return Err(Error::precondition(format!(
                    "partition {source} is new on kafka.topic_epoch = {}, but the consumer group \
                     resumes it at offset {first} while it begins at offset {low}: the group kept \
                     the old topic's offsets, and offsets {low}..{first} would never be applied. \
                     Reset the group's offsets to the earliest (kafka-consumer-groups.sh \
                     --bootstrap-server ... --group <kafka.group_id> --topic <kafka.topic> \
                     --reset-offsets --to-earliest --execute) or use a new kafka.group_id, \
                     and restart",
                    self.topic_epoch
                )));
            }
            (Check::Marker(m), Held::Ends { high: 0 }) => (m, "is empty".to_owned()),
            (Check::Marker(m), Held::Ends { high }) => {
                (m, format!("now ends at offset {}", high - 1))
            }
            (Check::Marker(m), _) => (m, format!("holds another message at offset {}", m.offset)),
            (Check::StartsAt { .. }, _) => return Ok(()),
        };
        Err(Error::precondition(format!(
            "partition {source} {what}, but ingest applied its messages through offset {}: \
             the topic was deleted and recreated (or its log truncated by an unclean leader \
             election), and its new messages would be skipped as replays of the old ones. \
             Nothing of it was applied. If the topic was recreated, set kafka.topic_epoch = \
             {next} (now {}) for every quiver ingest process, reset the group's offsets to the \
             earliest if the brokers kept them, and restart: the new topic is then a new \
             source (docs/streaming.md, \"Recreating the topic\")",
            marker.offset, self.topic_epoch,
        )))
    }

    /// Records each partition's last message of `batch` as its marker.
    async fn mark(&self, batch: &[Msg]) -> Result<()> {
        let marks: Vec<(String, Marker)> = last_per_partition(batch)
            .into_iter()
            .map(|((t, p), m)| {
                let marker = Marker {
                    offset: m.offset,
                    fingerprint: fingerprint(m.payload.as_deref()),
                };
                (source_id(t, p, self.topic_epoch), marker)
            })
            .collect();
        let Some(topic) = batch.first().map(|m| m.topic.clone()) else {
            return Ok(());
        };
        write_markers(
            &**self.applier.store(),
            &topic,
            self.topic_epoch,
            &marks,
            SystemClock.now_micros(),
        )
        .await
    }

    /// Logs each partition's counters (at most every 10 s unless `now`).
    fn log_partitions(&mut self, now: bool) {
        if !now && self.logged.elapsed() < Duration::from_secs(10) {
            return;
        }
        self.logged = std::time::Instant::now();
        for (source, p) in &self.stats.partitions {
            tracing::info!(
                partition = %source,
                messages = p.messages,
                events = p.events,
                dead_letters = p.dead_letters,
                out_of_range = p.out_of_range,
                too_late = p.too_late,
                duplicates = p.duplicates,
                tiles_written = p.tiles_written,
                tiles_replayed = p.tiles_replayed,
                retries = p.retries,
                "partition totals"
            );
        }
    }

    async fn dead_letter(&self, dead: &[(&Msg, &str)]) -> Result<()> {
        let sends = dead.iter().map(|(m, reason)| {
            let partition = m.partition.to_string();
            let offset = m.offset.to_string();
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: "quiver.error",
                    value: Some(*reason),
                })
                .insert(Header {
                    key: "quiver.source.topic",
                    value: Some(&*m.topic),
                })
                .insert(Header {
                    key: "quiver.source.partition",
                    value: Some(partition.as_str()),
                })
                .insert(Header {
                    key: "quiver.source.offset",
                    value: Some(offset.as_str()),
                });
            let headers = TraceHeaders::append(headers, m.trace.as_ref());
            let mut rec: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(&self.cfg.dead_letter_topic).headers(headers);
            if let Some(p) = &m.payload {
                rec = rec.payload(p.as_slice());
            }
            if let Some(k) = &m.key {
                rec = rec.key(k.as_slice());
            }
            self.dlq.send(rec, self.kafka_timeout)
        });
        for r in futures::future::join_all(sends).await {
            r.map_err(|(e, _)| kafka_error("writing to the dead-letter topic", e))?;
        }
        if !dead.is_empty() {
            tracing::warn!(count = dead.len(), topic = %self.cfg.dead_letter_topic, first_reason = %dead[0].1, "undecodable events dead-lettered");
        }
        Ok(())
    }

    /// Commits, per partition, the offset after the last durable one,
    /// asynchronously (librdkafka sends it; the next commit, or the
    /// partition's next owner, covers one that fails).
    fn commit(&mut self) -> Result<()> {
        let Some(tpl) = self.commit_list()? else {
            return Ok(());
        };
        let started = std::time::Instant::now();
        let committed = self.consumer.commit(&tpl, CommitMode::Async);
        self.observe_commit(started);
        if let Err(e) = committed {
            // Partitions moved to another member: its commits win; our
            // uncommitted work is replayed there and skipped as applied.
            tracing::warn!(error = %e, "offset commit failed; the next commit or the new owner covers it");
        }
        Ok(())
    }

    /// `quiver_ingest_commit_duration_seconds`: one commit call.
    fn observe_commit(&self, started: std::time::Instant) {
        if let Some(m) = &self.metrics {
            m.ingest
                .commit_duration
                .observe(started.elapsed().as_secs_f64());
        }
    }

    /// Per partition, the offset after the last durable one; `None` when
    /// there is nothing to commit.
    fn commit_list(&mut self) -> Result<Option<TopicPartitionList>> {
        if let Some(a) = &self.archiver {
            for (k, through) in a.archived() {
                self.committed.insert(k, through + 1);
            }
        }
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), next) in &self.committed {
            if *next >= 0 {
                tpl.add_partition_offset(topic, *partition, Offset::Offset(*next))
                    .map_err(|e| kafka_error("building the commit", e))?;
            }
        }
        Ok((tpl.count() > 0).then_some(tpl))
    }
}

fn push_msg(
    batch: &mut Vec<Msg>,
    m: rdkafka::error::KafkaResult<rdkafka::message::BorrowedMessage<'_>>,
) {
    match m {
        Ok(m) => batch.push(Msg {
            // Share the topic name with the previous message when it is the same.
            topic: match batch.last() {
                Some(prev) if &*prev.topic == m.topic() => prev.topic.clone(),
                _ => Arc::from(m.topic()),
            },
            partition: m.partition(),
            offset: m.offset(),
            payload: m.payload().map(<[u8]>::to_vec),
            key: m.key().map(<[u8]>::to_vec),
            // A timestamp at or before 1970 is a producer's placeholder.
            timestamp: m
                .timestamp()
                .to_millis()
                .filter(|ms| *ms > 0)
                .and_then(|ms| ms.checked_mul(1000)),
            trace: if telemetry::enabled() {
                message_context(m.headers())
            } else {
                None
            },
        }),
        Err(e) => tracing::warn!(error = %e, "Kafka consumer error"),
    }
}
