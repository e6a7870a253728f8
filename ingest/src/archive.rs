//! The raw-event archive: every ingested event as Parquet on object storage
//! (local disk or S3), for the batch layer.
//!
//! # Layout
//! `{root}/events/date=YYYY-MM-DD/{topic}-{partition}-{first offset}-{last offset}.parquet`
//! (`{topic}@{epoch}-...` on a raised `kafka.topic_epoch`),
//! partitioned by the event's UTC date, one column per event field, join key
//! and attribute of the registry (see [`archive_schema`]), plus `_source`
//! (`topic:partition`) and `_offset`.
//!
//! # Exactly once, never a partial file
//! Events are buffered per partition and written when the buffer reaches
//! `roll_bytes` or `roll_interval`. A roll writes its files under
//! `{root}/_quiver/staging/`, then records them in the partition's state
//! (see below), then renames them into place and marks the state done. A
//! crash at any point is repaired by the next roll of that partition: a
//! recorded roll is finished (roll forward), an unrecorded one is redone
//! from Kafka. The state's `archived_through` offset is what the consumer
//! may commit: an offset is committed only once its event is in a visible
//! file (or in the dead-letter topic).
//!
//! # One owner per partition (fencing)
//! A partition's state is a sequence of generations,
//! `{root}/_quiver/archive/{topic}-{partition}/{generation:020}.json`; the
//! newest is the state. Each write creates the next generation with a
//! create-if-absent put (`PutMode::Create`: a hard link on local disk,
//! `If-None-Match: *` on S3), so of two processes that both think they own
//! the partition (an evicted "zombie" and the new owner) only one can move
//! the state on from a generation; the other gets
//! [`quiver_core::ErrorKind::FailedPrecondition`] and ingest stops instead
//! of archiving offsets a second time. Older generations are deleted; a
//! state written by an earlier version (`{topic}-{partition}.json`) is read
//! as generation 0.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_array::builder::{Int64Builder, StringBuilder, TimestampMicrosecondBuilder};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::SchemaRef;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
pub use quiver_core::columnar::archive_schema;
use quiver_core::columnar::{archive_columns, value_array, ArchiveColumnSource};
use quiver_core::event::Event;
pub use quiver_core::storage::open_store;
use quiver_core::storage::{EVENTS_DIR, INTERNAL_DIR};
use quiver_core::{Error, Registry, Result, Value};
use serde::{Deserialize, Serialize};

use crate::apply::Record;
use crate::source_topic;

/// Where and how the archive writes.
#[derive(Debug, Clone)]
pub struct ArchiveConfig {
    /// Roll a partition's file at this many buffered bytes (estimated).
    pub roll_bytes: usize,
    /// Roll a partition's file when its oldest buffered event is this old.
    pub roll_interval: Duration,
}

impl Default for ArchiveConfig {
    fn default() -> Self {
        ArchiveConfig {
            roll_bytes: 64 * 1024 * 1024,
            roll_interval: Duration::from_secs(60),
        }
    }
}

fn storage_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::unavailable(format!("raw-event archive: {what}: {e}"))
}

/// Builds one record batch of events in archive form.
pub fn events_to_batch(
    reg: &Registry,
    schema: &SchemaRef,
    records: &[&Record],
) -> Result<RecordBatch> {
    let mut arrays: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
    let mut ids = StringBuilder::new();
    let mut types = StringBuilder::new();
    let mut times = TimestampMicrosecondBuilder::new().with_timezone("UTC");
    let mut sources = StringBuilder::new();
    let mut offsets = Int64Builder::new();
    for r in records {
        ids.append_value(&r.event.event_id);
        types.append_value(&r.event.event_type);
        times.append_value(r.event.event_time);
        sources.append_value(&*r.source);
        offsets.append_value(r.offset);
    }
    arrays.push(Arc::new(ids.finish()));
    arrays.push(Arc::new(types.finish()));
    arrays.push(Arc::new(times.finish()));
    for c in archive_columns(reg) {
        let values: Vec<Option<&Value>> = records
            .iter()
            .map(|r| match c.source {
                ArchiveColumnSource::JoinKey => r.event.entity(&c.name),
                ArchiveColumnSource::Attribute => r.event.attribute(&c.name),
            })
            .collect();
        arrays.push(value_array(c.ty, &values));
    }
    arrays.push(Arc::new(sources.finish()));
    arrays.push(Arc::new(offsets.finish()));
    RecordBatch::try_new(schema.clone(), arrays)
        .map_err(|e| Error::internal(format!("building the archive batch: {e}")))
}

/// A partition's archive state, stored as JSON.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
struct PartitionState {
    /// Highest offset whose event is in a visible file (or dead-lettered);
    /// -1 for none.
    archived_through: i64,
    /// A recorded roll not yet moved into place: (staging, final) paths and
    /// the offset it archives through.
    #[serde(default)]
    pending: Option<PendingRoll>,
    /// The archiver that wrote this generation (a random id per process):
    /// a write reported as failed that in fact landed is recognised as its
    /// own on retry, not taken for another owner's.
    #[serde(default)]
    writer: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
struct PendingRoll {
    through: i64,
    files: Vec<(String, String)>,
}

/// One partition's buffer.
#[derive(Debug)]
struct Buffer {
    /// Generation of the state this process last read or wrote.
    generation: u64,
    /// Offsets at or below this are archived (from the state object).
    archived_through: i64,
    /// Highest offset handed to the buffer (events or dead letters).
    through: i64,
    records: Vec<Record>,
    bytes: usize,
    since: Option<Instant>,
}

/// What a flush wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlushStats {
    /// Parquet files made visible.
    pub files: u64,
    /// Events in them.
    pub events: u64,
    /// Their size in bytes.
    pub bytes: u64,
}

impl std::ops::AddAssign for FlushStats {
    fn add_assign(&mut self, o: FlushStats) {
        self.files += o.files;
        self.events += o.events;
        self.bytes += o.bytes;
    }
}

/// Buffers events per partition and rolls them into Parquet files.
pub struct Archiver {
    store: Arc<dyn ObjectStore>,
    root: Path,
    registry: Arc<Registry>,
    schema: SchemaRef,
    cfg: ArchiveConfig,
    buffers: BTreeMap<(String, i32), Buffer>,
    /// This archiver's id in the state objects it writes.
    writer: String,
    /// The event topic's epoch (see [`crate::source_topic`]): state and
    /// files of a recreated topic never mix with the old one's.
    topic_epoch: u32,
}

impl std::fmt::Debug for Archiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Archiver")
            .field("store", &self.store.to_string())
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

fn approx_size(ev: &Event) -> usize {
    64 + ev.event_id.len()
        + ev.entities.iter().map(|(k, _)| k.len() + 16).sum::<usize>()
        + ev.attributes
            .iter()
            .map(|(k, _)| k.len() + 16)
            .sum::<usize>()
}

impl Archiver {
    /// An archiver writing under `root` of `store`.
    pub fn new(
        store: Arc<dyn ObjectStore>,
        root: Path,
        registry: Arc<Registry>,
        cfg: ArchiveConfig,
    ) -> Archiver {
        let schema = archive_schema(&registry);
        let writer = format!(
            "{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        );
        Archiver {
            store,
            root,
            registry,
            schema,
            cfg,
            buffers: BTreeMap::new(),
            writer,
            topic_epoch: 0,
        }
    }

    /// Names state and files after the topic's epoch `epoch` (set by
    /// [`crate::Ingestor::new`] from [`crate::KafkaConfig::topic_epoch`]).
    pub fn with_topic_epoch(mut self, epoch: u32) -> Archiver {
        self.topic_epoch = epoch;
        self
    }

    /// The state object of earlier versions (one object, replaced).
    fn legacy_state_path(&self, topic: &str, partition: i32) -> Path {
        self.root
            .clone()
            .join(INTERNAL_DIR)
            .join("archive")
            .join(format!("{topic}-{partition}.json").as_str())
    }

    fn state_dir(&self, topic: &str, partition: i32) -> Path {
        self.root
            .clone()
            .join(INTERNAL_DIR)
            .join("archive")
            .join(format!("{}-{partition}", source_topic(topic, self.topic_epoch)).as_str())
    }

    fn generation_path(&self, topic: &str, partition: i32, generation: u64) -> Path {
        self.state_dir(topic, partition)
            .join(format!("{generation:020}.json").as_str())
    }

    /// The state's generations present, oldest first.
    async fn generations(&self, topic: &str, partition: i32) -> Result<Vec<u64>> {
        use futures::TryStreamExt;
        let dir = self.state_dir(topic, partition);
        let metas: Vec<object_store::ObjectMeta> = self
            .store
            .list(Some(&dir))
            .try_collect()
            .await
            .map_err(|e| storage_error("listing state", e))?;
        let mut out: Vec<u64> = metas
            .iter()
            .filter_map(|m| m.location.filename()?.strip_suffix(".json")?.parse().ok())
            .collect();
        out.sort_unstable();
        Ok(out)
    }

    async fn get_json(&self, path: &Path) -> Result<Option<PartitionState>> {
        match self.store.get(path).await {
            Ok(r) => {
                let bytes = r
                    .bytes()
                    .await
                    .map_err(|e| storage_error("reading state", e))?;
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| Error::internal(format!("corrupt archive state {path}: {e}")))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(storage_error("reading state", e)),
        }
    }

    /// The partition's newest state and its generation.
    async fn read_state(&self, topic: &str, partition: i32) -> Result<(PartitionState, u64)> {
        let fresh = PartitionState {
            archived_through: -1,
            pending: None,
            writer: String::new(),
        };
        // The newest generation can be deleted between listing and reading
        // it (a newer one was written): list again.
        for _ in 0..3 {
            let Some(&g) = self.generations(topic, partition).await?.last() else {
                break;
            };
            if let Some(s) = self
                .get_json(&self.generation_path(topic, partition, g))
                .await?
            {
                return Ok((s, g));
            }
        }
        if !self.generations(topic, partition).await?.is_empty() {
            return Err(Error::unavailable(format!(
                "archive state of {}-{partition}: its newest generation kept changing while read; another ingest process is archiving this partition",
                source_topic(topic, self.topic_epoch)
            )));
        }
        // Earlier versions knew no epochs: their state is epoch 0's.
        if self.topic_epoch > 0 {
            return Ok((fresh, 0));
        }
        let legacy = self
            .get_json(&self.legacy_state_path(topic, partition))
            .await?;
        Ok((legacy.unwrap_or(fresh), 0))
    }

    /// Writes `s` as the generation after `*generation`, only if no other
    /// process has written it first (see the module docs); then deletes
    /// generations older than the previous one (best effort).
    async fn write_state(
        &self,
        topic: &str,
        partition: i32,
        s: &PartitionState,
        generation: &mut u64,
    ) -> Result<()> {
        let mut s = s.clone();
        s.writer.clone_from(&self.writer);
        let body = serde_json::to_vec(&s).map_err(|e| Error::internal(e.to_string()))?;
        let next = *generation + 1;
        let path = self.generation_path(topic, partition, next);
        let taken = || {
            Error::precondition(format!(
                "archive state of {}-{partition}: generation {next} was written by another ingest process, so this one no longer owns the partition; stopping so that no offset is archived twice (restart it to rejoin the consumer group)",
                source_topic(topic, self.topic_epoch)
            ))
        };
        let opts = object_store::PutOptions::from(object_store::PutMode::Create);
        match self
            .store
            .put_opts(&path, PutPayload::from(body), opts)
            .await
        {
            Ok(_) => {}
            Err(object_store::Error::AlreadyExists { .. }) => {
                // Ours if an earlier attempt landed but was reported as
                // failed (a timeout, a retried 5xx).
                if self.get_json(&path).await?.as_ref() != Some(&s) {
                    return Err(taken());
                }
            }
            Err(e) => return Err(storage_error("writing state", e)),
        }
        *generation = next;
        // Older generations are deleted (below), so a process that has not
        // noticed it lost the partition could re-create a deleted one: a
        // newer generation than ours means exactly that. (If listing fails,
        // the create above was the fence.)
        match self.generations(topic, partition).await {
            Ok(all) => {
                if all.iter().any(|&g| g > next) {
                    let _ = self.store.delete(&path).await;
                    return Err(taken());
                }
                for old in all.into_iter().filter(|&g| g + 1 < next) {
                    let _ = self
                        .store
                        .delete(&self.generation_path(topic, partition, old))
                        .await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "listing archive state generations failed"),
        }
        if next == 1 && self.topic_epoch == 0 {
            let _ = self
                .store
                .delete(&self.legacy_state_path(topic, partition))
                .await;
        }
        Ok(())
    }

    /// Moves a recorded roll's files into place and marks it done.
    async fn finish_pending(
        &self,
        topic: &str,
        partition: i32,
        s: &mut PartitionState,
        generation: &mut u64,
    ) -> Result<()> {
        let Some(p) = s.pending.take() else {
            return Ok(());
        };
        for (staging, fin) in &p.files {
            let (from, to) = (Path::from(staging.as_str()), Path::from(fin.as_str()));
            match self.store.rename(&from, &to).await {
                Ok(()) => {}
                // Already moved before a crash: the final file is there.
                Err(object_store::Error::NotFound { .. }) if self.store.head(&to).await.is_ok() => {
                }
                Err(e) => return Err(storage_error("moving a file into place", e)),
            }
        }
        s.archived_through = s.archived_through.max(p.through);
        self.write_state(topic, partition, s, generation).await
    }

    /// Loads (and repairs) a partition's state when first seen.
    async fn buffer(&mut self, topic: &str, partition: i32) -> Result<&mut Buffer> {
        let k = (topic.to_owned(), partition);
        if !self.buffers.contains_key(&k) {
            let (mut s, mut generation) = self.read_state(topic, partition).await?;
            self.finish_pending(topic, partition, &mut s, &mut generation)
                .await?;
            self.buffers.insert(
                k.clone(),
                Buffer {
                    generation,
                    archived_through: s.archived_through,
                    through: s.archived_through,
                    records: Vec::new(),
                    bytes: 0,
                    since: None,
                },
            );
        }
        Ok(self.buffers.get_mut(&k).expect("inserted above"))
    }

    /// Reads a partition's archive state (and finishes a roll a crash left
    /// half done) unless already open; afterwards [`Archiver::add`] and
    /// [`Archiver::skip`] for it do no I/O and cannot fail.
    pub async fn open(&mut self, topic: &str, partition: i32) -> Result<()> {
        self.buffer(topic, partition).await.map(|_| ())
    }

    /// Adds a record; records at or below the archived offset (replays)
    /// are dropped. Returns whether it was buffered.
    pub async fn add(&mut self, topic: &str, partition: i32, r: Record) -> Result<bool> {
        let b = self.buffer(topic, partition).await?;
        if r.offset <= b.through {
            return Ok(false);
        }
        b.through = r.offset;
        b.bytes += approx_size(&r.event);
        b.since.get_or_insert_with(Instant::now);
        b.records.push(r);
        Ok(true)
    }

    /// Marks an offset handled without an event (it went to the dead-letter
    /// topic), so that it can be committed.
    pub async fn skip(&mut self, topic: &str, partition: i32, offset: i64) -> Result<()> {
        let b = self.buffer(topic, partition).await?;
        if offset > b.through {
            b.through = offset;
            b.since.get_or_insert_with(Instant::now);
        }
        Ok(())
    }

    /// Forgets partitions this consumer no longer owns (after a rebalance):
    /// their unwritten events will be replayed by the new owner.
    pub fn forget(&mut self, partitions: &[(String, i32)]) {
        for p in partitions {
            self.buffers.remove(p);
        }
    }

    /// Rolls buffers that are due (or all with `force`). Returns what was
    /// written.
    pub async fn flush(&mut self, force: bool) -> Result<FlushStats> {
        let due: Vec<(String, i32)> = self
            .buffers
            .iter()
            .filter(|(_, b)| {
                b.through > b.archived_through
                    && (force
                        || b.bytes >= self.cfg.roll_bytes
                        || b.since
                            .is_some_and(|s| s.elapsed() >= self.cfg.roll_interval))
            })
            .map(|(k, _)| k.clone())
            .collect();
        let mut stats = FlushStats::default();
        for (topic, partition) in due {
            stats += self.roll(&topic, partition).await?;
        }
        Ok(stats)
    }

    async fn roll(&mut self, topic: &str, partition: i32) -> Result<FlushStats> {
        let k = (topic.to_owned(), partition);
        let Some(b) = self.buffers.get(&k) else {
            return Ok(FlushStats::default());
        };
        let through = b.through;
        let mut by_date: BTreeMap<String, Vec<&Record>> = BTreeMap::new();
        for r in &b.records {
            by_date
                .entry(quiver_core::time::utc_date(r.event.event_time))
                .or_default()
                .push(r);
        }
        let mut files = Vec::new();
        let mut stats = FlushStats::default();
        for (date, recs) in &by_date {
            let first = recs.first().map_or(0, |r| r.offset);
            let name = format!(
                "{}-{partition}-{first:020}-{through:020}.parquet",
                source_topic(topic, self.topic_epoch)
            );
            let staging = self
                .root
                .clone()
                .join(INTERNAL_DIR)
                .join("staging")
                .join(format!("{date}-{name}").as_str());
            let fin = self
                .root
                .clone()
                .join(EVENTS_DIR)
                .join(format!("date={date}").as_str())
                .join(name.as_str());
            let batch = events_to_batch(&self.registry, &self.schema, recs)?;
            let bytes = write_parquet(&batch)?;
            let size = bytes.len() as u64;
            self.store
                .put(&staging, PutPayload::from(bytes))
                .await
                .map_err(|e| storage_error("writing a staging file", e))?;
            files.push((staging.to_string(), fin.to_string()));
            stats.files += 1;
            stats.events += recs.len() as u64;
            stats.bytes += size;
        }
        let mut state = PartitionState {
            archived_through: b.archived_through,
            pending: Some(PendingRoll { through, files }),
            writer: String::new(),
        };
        let mut generation = b.generation;
        // The roll is decided once recorded; finishing it is idempotent.
        let recorded = self
            .write_state(topic, partition, &state, &mut generation)
            .await;
        let finished = match recorded {
            Ok(()) => {
                self.finish_pending(topic, partition, &mut state, &mut generation)
                    .await
            }
            Err(e) => Err(e),
        };
        if let Some(b) = self.buffers.get_mut(&k) {
            b.generation = generation;
        }
        finished?;
        if let Some(b) = self.buffers.get_mut(&k) {
            b.archived_through = through;
            b.records.clear();
            b.bytes = 0;
            b.since = None;
        }
        Ok(stats)
    }

    /// Per partition, the highest offset that is archived (safe to commit).
    pub fn archived(&self) -> Vec<((String, i32), i64)> {
        self.buffers
            .iter()
            .filter(|(_, b)| b.archived_through >= 0)
            .map(|(k, b)| (k.clone(), b.archived_through))
            .collect()
    }
}

/// Encodes a batch as one Parquet file (zstd).
pub fn write_parquet(batch: &RecordBatch) -> Result<Vec<u8>> {
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .build();
    let mut out = Vec::new();
    let mut w = ArrowWriter::try_new(&mut out, batch.schema(), Some(props))
        .map_err(|e| Error::internal(format!("parquet writer: {e}")))?;
    w.write(batch)
        .map_err(|e| Error::internal(format!("parquet write: {e}")))?;
    w.close()
        .map_err(|e| Error::internal(format!("parquet close: {e}")))?;
    Ok(out)
}
