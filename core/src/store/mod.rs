//! The online store: the latest feature row per entity and feature view.
//!
//! [`OnlineStore`] has two implementations with the same behaviour, proven
//! by one test suite (`core/tests/online_store.rs`):
//! - [`RedisStore`]: pooled connections, one pipelined round trip per read
//!   call, writes ordered by event time by a server-side script, keys
//!   expiring after the view's TTL plus a grace period.
//! - [`RedisClusterStore`]: the same on a Redis Cluster, one pipeline per
//!   hash slot (entity), run concurrently.
//! - [`EmbeddedStore`]: a persistent single-file database (redb) for the
//!   zero-dependency default mode.
//!
//! Contract shared by all:
//! - a write replaces the stored row by the rule of [`replaces`]: a later
//!   event time wins; at the same event time the row with the greater
//!   [`tie_digest`](crate::codec::tie_digest) wins, whichever was written
//!   first, and the same row written again is rewritten (replays are
//!   idempotent). The outcome never depends on the order of writes;
//! - an expired row counts as absent;
//! - a row written with an expiry is gone (reads as missing) after it;
//! - a read returns, per lookup, the row's event time and the requested
//!   features in request order (`None` where the row lacks the feature);
//! - tile rows (windowed aggregations) are maps of raw fields; a
//!   [`TileWrite`] is applied only if its source offset is newer than the
//!   one the row recorded for that source, so a replayed Kafka batch is
//!   never counted twice. Reads of feature rows and tile rows mix in one
//!   call (one round trip).

use std::time::Duration;

use async_trait::async_trait;

use crate::error::Result;
use crate::time::Micros;
use crate::value::Value;

mod cluster;
mod embedded;
mod redis;

pub use self::cluster::RedisClusterStore;
pub use self::embedded::EmbeddedStore;
pub use self::redis::{redact as redis_url_redacted, RedisConfig, RedisStore, RedisTls};

/// One row to read: its key (see [`crate::codec::row_key`]) and features.
#[derive(Debug, Clone, Copy)]
pub struct Lookup<'a> {
    /// Full row key.
    pub key: &'a str,
    /// Feature names to return, in order. For raw lookups: the fields to
    /// return, or every field when empty.
    pub features: &'a [&'a str],
    /// A raw lookup of a tile row (see [`TileWrite`]) instead of a feature row.
    pub raw: bool,
}

impl<'a> Lookup<'a> {
    /// A feature-row lookup.
    pub fn row(key: &'a str, features: &'a [&'a str]) -> Self {
        Lookup {
            key,
            features,
            raw: false,
        }
    }

    /// A tile-row lookup: `fields`, or all fields when empty.
    pub fn tiles(key: &'a str, fields: &'a [&'a str]) -> Self {
        Lookup {
            key,
            features: fields,
            raw: true,
        }
    }
}

/// A stored row as read back.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StoredRow {
    /// Event time of the row (0 for tile rows).
    pub event_ts: Micros,
    /// One entry per requested feature: `None` if the row lacks it.
    pub values: Vec<Option<Value>>,
    /// Tile rows: the present fields and their raw bytes.
    pub raw: Vec<(String, Vec<u8>)>,
}

/// One source's update of a tile row (aggregation partial states, see
/// [`crate::aggregate`]), applied at most once: it is skipped when the row
/// already holds an offset of `source` at or past `offset`.
#[derive(Debug, Clone, PartialEq)]
pub struct TileWrite {
    /// Full row key.
    pub key: String,
    /// The writer's source (Kafka topic and partition).
    pub source: String,
    /// The newest source offset the update includes.
    pub offset: i64,
    /// Newest event time in the update; the row keeps the maximum.
    pub event_ts: Micros,
    /// Fields to set (whole partial states).
    pub fields: Vec<(String, Vec<u8>)>,
    /// Fields to delete (tiles that left every window).
    pub delete: Vec<String>,
    /// Fields to set in the row's event-id row
    /// ([`crate::codec::event_ids_key`]; digests of counted events, see
    /// [`crate::aggregate::ids_field`]), in the same atomic update and only
    /// when it applies; the event-id row expires with the row.
    pub ids: Vec<(String, Vec<u8>)>,
    /// Fields to delete from the event-id row.
    pub ids_delete: Vec<String>,
    /// Expiry instant (epoch micros); the row keeps the latest one.
    pub expire_at: Micros,
}

/// One row to write: all features of the view for one entity.
#[derive(Debug, Clone, PartialEq)]
pub struct WriteRow {
    /// Full row key.
    pub key: String,
    /// Event time; decides which write wins.
    pub event_ts: Micros,
    /// When the row expires (epoch micros), `None` for never.
    pub expire_at: Option<Micros>,
    /// Feature name and value pairs, each name once.
    pub features: Vec<(String, Value)>,
}

/// What a write call did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteOutcome {
    /// Rows stored.
    pub written: u64,
    /// Rows skipped because a newer row was already stored (or one with
    /// the same event time that wins the tie, see [`replaces`]).
    pub stale: u64,
    /// Rows not written because they would have expired already (counted
    /// by callers that know the clock, such as `WriteFeatures`).
    pub expired: u64,
}

/// A key-value store of feature rows. See the module docs for the contract.
#[async_trait]
pub trait OnlineStore: Send + Sync + 'static {
    /// Backend name for metrics and logs (`redis`, `embedded`).
    fn backend(&self) -> &'static str;

    /// Reads many rows in one round trip. The result has one entry per
    /// lookup, `None` for rows that do not exist or have expired.
    async fn read(&self, lookups: &[Lookup<'_>]) -> Result<Vec<Option<StoredRow>>>;

    /// Writes rows, event-time last-write-wins, atomically per row.
    async fn write(&self, rows: &[WriteRow]) -> Result<WriteOutcome>;

    /// Applies tile updates, atomically and at most once per row and
    /// source offset. Returns, per write, whether it applied (`false`: the
    /// row already held that offset of the source).
    async fn write_tiles(&self, writes: &[TileWrite]) -> Result<Vec<bool>>;

    /// Checks that the backend answers.
    async fn ping(&self) -> Result<()>;
}

/// The feature names of two rows, each once, in byte order: what the tie
/// digests of the two rows cover.
fn digest_names<'a>(a: &'a [(String, Value)], b: &'a [(String, Value)]) -> Vec<&'a str> {
    let mut names: Vec<&str> = a.iter().chain(b).map(|(n, _)| n.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    names
}

/// The tie digest of `row` over the feature `names` (in byte order);
/// names the row lacks count as null.
fn row_digest(names: &[&str], row: &[(String, Value)]) -> [u8; 20] {
    crate::codec::tie_digest(
        names
            .iter()
            .map(|n| row.iter().find(|(f, _)| f == n).map(|(_, v)| v)),
    )
}

/// Whether a row with event time `new_ts` and `new` features replaces a
/// stored row (`cur_ts`, `cur`): the write rule of every online store,
/// also applied by ingest within a batch, by materialization and by the
/// point-in-time join, so that training and serving pick the same row.
///
/// A later event time wins. At the same event time the row with the
/// greater [`tie_digest`](crate::codec::tie_digest) wins, both digests
/// taken over the union of the two rows' feature names (a feature a row
/// lacks counts as null), and an equal digest (the same values) replaces.
/// So the result does not depend on which row arrives first. Feature names
/// within a row are unique (see [`WriteRow`]).
pub fn replaces(
    new_ts: Micros,
    new: &[(String, Value)],
    cur_ts: Micros,
    cur: &[(String, Value)],
) -> bool {
    match new_ts.cmp(&cur_ts) {
        std::cmp::Ordering::Greater => true,
        std::cmp::Ordering::Less => false,
        std::cmp::Ordering::Equal => {
            let names = digest_names(new, cur);
            row_digest(&names, new) >= row_digest(&names, cur)
        }
    }
}

/// Runs `fut` with a deadline, mapping expiry to `Unavailable`.
pub(crate) async fn with_deadline<T>(
    what: &str,
    deadline: Duration,
    fut: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(deadline, fut).await {
        Ok(r) => r,
        Err(_) => Err(crate::Error::unavailable(format!(
            "{what} did not answer within {deadline:?}; check that it is running and reachable"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::testing::value_of;
    use crate::value::ValueType;

    fn row() -> impl Strategy<Value = Vec<(String, Value)>> {
        // A few feature names, each present or not, with any values.
        proptest::collection::btree_map(
            prop::sample::select(vec!["a", "b", "emb", "z"]),
            prop::sample::select(vec![
                ValueType::Int64,
                ValueType::Double,
                ValueType::FloatList,
            ])
            .prop_flat_map(value_of),
            0..4,
        )
        .prop_map(|m| m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
    }

    proptest! {
        /// Of two rows with the same event time, one replaces the other
        /// whichever is stored; both replace each other only when they hold
        /// the same values (then either is right).
        #[test]
        fn ties_have_one_answer_whatever_the_order(a in row(), b in row()) {
            let (ab, ba) = (replaces(5, &a, 5, &b), replaces(5, &b, 5, &a));
            prop_assert!(ab || ba);
            if ab && ba {
                let names = digest_names(&a, &b);
                prop_assert_eq!(row_digest(&names, &a), row_digest(&names, &b));
            }
            prop_assert!(replaces(6, &a, 5, &b) && !replaces(4, &a, 5, &b));
        }
    }
}
