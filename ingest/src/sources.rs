//! Recognising a recreated topic: which message each partition held at the
//! last offset ingest applied from it.
//!
//! Tile rows skip every offset of a source at or below the one they hold
//! (that is what makes replays harmless). A topic deleted and recreated
//! under the same name starts its offsets at 0 again, so its new events
//! would be skipped as replays of the old ones, silently. To notice, every
//! batch records per source, in the online store, its last offset and a
//! fingerprint of the message there (a marker, written like a tile row:
//! only forwards). When a process first sees a partition (start, or a
//! rebalance), it reads the marker and compares it with what the partition
//! holds now:
//! - the partition ends before the marker's offset: the topic was recreated
//!   (or its log truncated by an unclean leader election) — stop;
//! - the message at that offset has another fingerprint: recreated — stop;
//! - same fingerprint: the same log (a restart, a rebalance, consumer
//!   offsets reset to replay: replays are skipped as usual);
//! - the offset was deleted by retention or compaction: nothing to compare,
//!   logged, and ingest goes on.
//!
//! The recovery after a deliberate recreation is a new `kafka.topic_epoch`
//! (see [`crate::source_topic`]): the new topic is a new source.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use quiver_core::aggregate::offset_field;
use quiver_core::codec::KEY_PREFIX;
use quiver_core::store::{Lookup, TileWrite};
use quiver_core::time::Micros;
use quiver_core::{Error, OnlineStore, Result};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::producer::kafka_error;

/// The markers' row (fields per source). The hash tag keeps it and its
/// event-id row (unused, but part of every tile write) in one Redis
/// Cluster slot.
pub(crate) fn markers_key() -> String {
    format!("{KEY_PREFIX}:{{_quiver}}:sources")
}

fn fingerprint_field(source: &str) -> String {
    format!("_f:{source}")
}

/// The pseudo-source whose "offset" is the highest `kafka.topic_epoch` used
/// with `topic` (`#` cannot occur in topic names).
fn epoch_source(topic: &str) -> String {
    format!("{topic}#epoch")
}

/// Fingerprint of a message: xxHash64 of its payload (a message without
/// one hashes as empty).
pub(crate) fn fingerprint(payload: Option<&[u8]>) -> u64 {
    twox_hash::XxHash64::oneshot(0, payload.unwrap_or_default())
}

/// The last applied offset of a source and its message's fingerprint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Marker {
    pub offset: i64,
    pub fingerprint: u64,
}

/// What the online store says about a topic's sources.
#[derive(Debug, Default)]
pub(crate) struct Markers {
    /// Per source asked about, when it has one.
    pub by_source: HashMap<String, Marker>,
    /// The highest epoch any process used with the topic.
    pub epoch_in_use: Option<u32>,
}

/// Markers of `sources` of `topic`.
///
/// # Errors
/// `INTERNAL` for a marker that is not quiver's format; the store's errors.
pub(crate) async fn read_markers(
    store: &dyn OnlineStore,
    topic: &str,
    sources: &[String],
) -> Result<Markers> {
    let key = markers_key();
    let row = store
        .read(&[Lookup::tiles(&key, &[])])
        .await?
        .pop()
        .flatten();
    let raw: HashMap<String, Vec<u8>> =
        row.map(|r| r.raw).unwrap_or_default().into_iter().collect();
    let text =
        |f: &str| -> Option<String> { raw.get(f).map(|v| String::from_utf8_lossy(v).into_owned()) };
    let corrupt = |what: &str, v: &str| {
        Error::internal(format!(
            "corrupt {what} in the online store ({key} field value {v:?}); \
             delete that field (Redis: HDEL) to skip the recreation check once"
        ))
    };
    let mut out = Markers::default();
    if let Some(e) = text(&offset_field(&epoch_source(topic))) {
        out.epoch_in_use = Some(e.parse().map_err(|_| corrupt("topic epoch", &e))?);
    }
    for s in sources {
        let (Some(o), Some(f)) = (text(&offset_field(s)), text(&fingerprint_field(s))) else {
            continue;
        };
        let offset = o.parse().map_err(|_| corrupt("source marker", &o))?;
        let fingerprint = f.parse().map_err(|_| corrupt("source marker", &f))?;
        out.by_source.insert(
            s.clone(),
            Marker {
                offset,
                fingerprint,
            },
        );
    }
    Ok(out)
}

/// Markers outlive tile rows: ten years, refreshed by every batch.
const MARKER_LIFE: Micros = 3650 * 86_400 * 1_000_000;

/// Records `marks` (source, marker; each moves only forwards) and `epoch`
/// as used with `topic` (the highest is kept).
pub(crate) async fn write_markers(
    store: &dyn OnlineStore,
    topic: &str,
    epoch: u32,
    marks: &[(String, Marker)],
    now: Micros,
) -> Result<()> {
    let key = markers_key();
    let write = |source: String, offset: i64, fields: Vec<(String, Vec<u8>)>| TileWrite {
        key: key.clone(),
        source,
        offset,
        event_ts: 0,
        fields,
        delete: Vec::new(),
        ids: Vec::new(),
        ids_delete: Vec::new(),
        expire_at: now.saturating_add(MARKER_LIFE),
    };
    let mut writes: Vec<TileWrite> = marks
        .iter()
        .map(|(source, m)| {
            let fp = (
                fingerprint_field(source),
                m.fingerprint.to_string().into_bytes(),
            );
            write(source.clone(), m.offset, vec![fp])
        })
        .collect();
    writes.push(write(epoch_source(topic), i64::from(epoch), Vec::new()));
    store.write_tiles(&writes).await?;
    Ok(())
}

/// What to check of one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Check {
    /// That it still holds the marker's message.
    Marker(Marker),
    /// That consumption starts at its first offset (a source new to the
    /// store on a raised epoch: nothing before `first` may be skipped).
    StartsAt { first: i64 },
}

/// What a partition holds, as found by [`probe`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Held {
    /// As expected.
    Same,
    /// Another message at the marker's offset.
    Different,
    /// The partition ends before the marker's offset (`high`: its next
    /// offset).
    Ends { high: i64 },
    /// Retention or compaction removed the marker's offset (`low`: the
    /// first offset the partition holds).
    Removed { low: i64 },
    /// Consumption starts after the partition's first offset `low`.
    Skips { low: i64 },
}

/// Checks partitions of `topic` with a consumer of its own (no group,
/// nothing committed). Blocking: run it off the async threads.
///
/// # Errors
/// `UNAVAILABLE` when the brokers do not answer within `timeout` per call.
pub(crate) fn probe(
    client: &ClientConfig,
    topic: &str,
    checks: &[(i32, Check)],
    timeout: Duration,
) -> Result<Vec<Held>> {
    let mut client = client.clone();
    // Never a group member (it assigns, never subscribes, and commits
    // nothing), but librdkafka's assign needs a group id.
    for group_setting in ["group.instance.id", "group.protocol"] {
        client.remove(group_setting);
    }
    let consumer: BaseConsumer = client
        .set("group.id", "quiver-recreation-check")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .create()
        .map_err(|e| Error::invalid(format!("invalid Kafka consumer settings: {e}")))?;
    checks
        .iter()
        .map(|&(partition, check)| {
            let (low, high) = consumer
                .fetch_watermarks(topic, partition, timeout)
                .map_err(|e| kafka_error("reading the partition's offsets", e))?;
            match check {
                Check::StartsAt { first } if first > low => Ok(Held::Skips { low }),
                Check::StartsAt { .. } => Ok(Held::Same),
                Check::Marker(m) if high <= m.offset => Ok(Held::Ends { high }),
                Check::Marker(m) if m.offset < low => Ok(Held::Removed { low }),
                Check::Marker(m) => read_at(&consumer, topic, partition, m, timeout),
            }
        })
        .collect()
}

fn read_at(
    consumer: &BaseConsumer,
    topic: &str,
    partition: i32,
    marker: Marker,
    timeout: Duration,
) -> Result<Held> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(marker.offset))
        .map_err(|e| kafka_error("seeking the partition", e))?;
    consumer
        .assign(&tpl)
        .map_err(|e| kafka_error("seeking the partition", e))?;
    let deadline = Instant::now() + timeout;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match consumer.poll(left.min(Duration::from_millis(500))) {
            Some(Ok(m)) if m.partition() != partition => {}
            Some(Ok(m)) if m.offset() == marker.offset => {
                return Ok(if fingerprint(m.payload()) == marker.fingerprint {
                    Held::Same
                } else {
                    Held::Different
                });
            }
            // Compaction removed it: the first message after it came.
            Some(Ok(m)) if m.offset() > marker.offset => {
                return Ok(Held::Removed { low: m.offset() })
            }
            Some(Ok(_)) | None => {}
            Some(Err(e)) => {
                return Err(kafka_error(
                    "reading the message at the last applied offset",
                    e,
                ))
            }
        }
    }
    Err(Error::unavailable(format!(
        "Kafka did not return offset {} of {topic}:{partition} within {timeout:?}",
        marker.offset
    )))
}
