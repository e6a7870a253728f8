//! Applies a batch of events to the online store: latest-value views
//! (event-time last-write-wins rows) and windowed aggregations (tile
//! states, at most once per source offset).
//!
//! # Exactly-once aggregation
//! Every tile row keeps, per source (Kafka topic and partition), the last
//! offset applied to it, and the partial states of that source. Only the
//! consumer of a partition writes that partition's fields, so after reading
//! a row once (whole, in one pipelined read per batch of new rows) the
//! applier keeps its source's part in memory and later batches only write.
//! It merges only the events past the row's offset and writes states and
//! the new offset in one atomic update that the store applies only if the
//! offset is newer than the stored one (see `OnlineStore::write_tiles`). A
//! batch replayed after a crash, or by another consumer after a rebalance,
//! is therefore skipped per row, never counted twice; Kafka offsets only say
//! where to resume. A write refused as stale, and every row of a revoked
//! partition, is dropped from memory and read again when next needed.
//!
//! An event sent twice (a client retry: same event id, new offset) counts
//! once: each tile keeps the digests of the event ids it counted per
//! source, in the row's event-id row, updated in the same atomic write (see
//! `quiver_core::aggregate` for the rule, which offline retrieval shares).

use std::collections::hash_map::Entry;
use std::collections::HashMap;

use foldhash::HashSet;
use std::sync::{Arc, Mutex};

use futures::future::try_join_all;
use quiver_core::aggregate::{
    decode_ids, encode_ids, event_id_hash, event_time_field, ids_field, offset_field,
    parse_ids_field, parse_tile_field, tile_field, tile_of, AggState, IDS_PER_FIELD,
};
use quiver_core::codec::{entity_key, event_ids_key, row_key};
use quiver_core::event::{Event, EventTimeBounds};
use quiver_core::metrics::Metrics;
use quiver_core::par::par_map;
use quiver_core::registry::{Aggregation, EventField, ViewSource};
use quiver_core::store::{replaces, Lookup, TileWrite, WriteRow};
use quiver_core::time::{duration_micros, Clock, Micros, SystemClock};
use quiver_core::{OnlineStore, Registry, Result, Value};

/// Rows or tile writes per online-store call; calls of one batch run a few
/// at a time so that a large batch keeps the store busy without one huge
/// pipeline.
const CHUNK: usize = 2_000;
/// Store calls in flight per batch.
const PARALLEL_CALLS: usize = 4;
/// Tile rows (per source) kept in memory between batches.
const DEFAULT_CACHE_ROWS: usize = 500_000;

/// One consumed event and where it came from.
#[derive(Debug, Clone)]
pub struct Record {
    /// Source id: `topic:partition`.
    pub source: Arc<str>,
    /// Offset in the source.
    pub offset: i64,
    /// The decoded, validated event.
    pub event: Event,
}

/// What one batch did to the online store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyStats {
    /// Latest-value rows written.
    pub rows_written: u64,
    /// Latest-value rows skipped because a newer row was stored.
    pub rows_stale: u64,
    /// Tile rows updated.
    pub tiles_written: u64,
    /// Tile rows skipped because they already held these offsets (replays).
    pub tiles_replayed: u64,
    /// Events older than every window of a view they aggregate into.
    pub events_too_late: u64,
    /// Events not counted again because their tile already counted their
    /// event id (client retries), per tile row.
    pub events_duplicate: u64,
}

impl std::ops::AddAssign for ApplyStats {
    fn add_assign(&mut self, o: ApplyStats) {
        self.rows_written += o.rows_written;
        self.rows_stale += o.rows_stale;
        self.tiles_written += o.tiles_written;
        self.tiles_replayed += o.tiles_replayed;
        self.events_too_late += o.events_too_late;
        self.events_duplicate += o.events_duplicate;
    }
}

/// How many tiles an aggregation view's row keeps behind its newest event.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RowTiles {
    /// The longest window's tiles (at most `MAX_TILES_PER_WINDOW`).
    pub retention: i64,
    /// The tiles of the accepted future skew.
    pub lead: i64,
    /// Both: an event up to the skew ahead of the clock must not drop
    /// tiles that reads at the clock (and offline retrieval as of it) still
    /// count.
    pub keep: i64,
}

/// [`RowTiles`] of a view with tiles of `tile` micros and `aggregations`,
/// given the accepted future skew in micros.
pub(crate) fn row_tiles(tile: Micros, aggregations: &[Aggregation], skew: Micros) -> RowTiles {
    let retention = aggregations
        .iter()
        .map(|a| a.window / tile)
        .max()
        .unwrap_or(1);
    let lead = skew.saturating_add(tile - 1) / tile;
    RowTiles {
        retention,
        lead,
        keep: retention.saturating_add(lead),
    }
}

/// Tile outcomes per source (`topic:partition`).
pub type SourceStats = std::collections::BTreeMap<Arc<str>, ApplyStats>;

/// The views an event type feeds.
#[derive(Debug, Default, Clone)]
struct Routes {
    /// Latest-value views.
    latest: Vec<usize>,
    /// Aggregation views and, per view, the aggregations that count this type.
    aggs: Vec<(usize, Vec<usize>)>,
}

/// Applies batches of records; cheap to share.
pub struct Applier {
    registry: Arc<Registry>,
    store: Arc<dyn OnlineStore>,
    expiry_grace: Micros,
    /// Accepted lead of event times over the clock (micros); see
    /// [`Applier::with_max_future_skew`].
    max_future_skew: Micros,
    routes: HashMap<String, Routes>,
    /// This process's view of the tile rows it wrote, per (row key, source).
    cache: Mutex<HashMap<(String, Arc<str>), CachedRow>>,
    cache_rows: usize,
    /// Freshness per feature view, when set.
    metrics: Option<Arc<Metrics>>,
}

/// One source's part of a tile row: its offset, newest event time,
/// partial states (decoded) and counted event ids per tile, as last
/// written (or read).
#[derive(Debug, Clone, Default)]
struct CachedRow {
    offset: i64,
    event_ts: Option<Micros>,
    states: HashMap<String, AggState>,
    ids: HashMap<i64, TileIds>,
}

/// The event-id digests one tile counted from one source. The store holds
/// them in counting order, [`IDS_PER_FIELD`] per field (chunk 0, 1, ...);
/// in memory, all of them as a set and the ones after the last full chunk
/// in order (what an update rewrites).
#[derive(Debug, Clone, Default)]
struct TileIds {
    seen: HashSet<u64>,
    /// Full chunks before `tail`.
    full: usize,
    /// The ids after them, in order.
    tail: Vec<u64>,
    /// How many of `tail` the store holds.
    stored_tail: usize,
}

impl TileIds {
    fn push(&mut self, id: u64) {
        self.seen.insert(id);
        self.tail.push(id);
    }

    /// Chunk indices the store holds.
    fn stored_chunks(&self) -> std::ops::Range<usize> {
        0..self.full + self.stored_tail.div_ceil(IDS_PER_FIELD)
    }

    /// The fields to write (chunk index and ids): the chunks of `tail`,
    /// when it holds ids not stored yet.
    fn dirty(&self) -> impl Iterator<Item = (usize, &[u64])> {
        let dirty = self.tail.len() > self.stored_tail;
        self.tail
            .chunks(IDS_PER_FIELD)
            .enumerate()
            .filter(move |_| dirty)
            .map(|(i, c)| (self.full + i, c))
    }

    /// After the store took [`TileIds::dirty`]: full chunks leave `tail`.
    fn stored(&mut self) {
        let done = self.tail.len() / IDS_PER_FIELD;
        self.full += done;
        self.tail.drain(..done * IDS_PER_FIELD);
        self.stored_tail = self.tail.len();
    }
}

impl CachedRow {
    /// The part of a stored row (all its fields, and all fields of its
    /// event-id row) that belongs to `source`.
    fn of_source(
        raw: Vec<(String, Vec<u8>)>,
        ids: Vec<(String, Vec<u8>)>,
        source: &str,
    ) -> Result<CachedRow> {
        let (of, tf) = (offset_field(source), event_time_field(source));
        let num = |v: &[u8]| std::str::from_utf8(v).ok()?.parse::<i64>().ok();
        let mut row = CachedRow {
            offset: -1,
            ..CachedRow::default()
        };
        let mut chunks: Vec<(i64, usize, Vec<u64>)> = Vec::new();
        for (name, v) in ids {
            if let Some((t, c, _)) = parse_ids_field(&name).filter(|f| f.2 == source) {
                chunks.push((t, c, decode_ids(&v)?));
            }
        }
        chunks.sort_unstable_by_key(|c| (c.0, c.1));
        for (t, _, part) in chunks {
            // Every chunk but a tile's last is full: the last is its tail.
            let tile = row.ids.entry(t).or_default();
            if !tile.tail.is_empty() {
                tile.full += 1;
                tile.tail.clear();
            }
            for id in part {
                tile.push(id);
            }
            tile.stored_tail = tile.tail.len();
        }
        for (name, v) in raw {
            if name == of {
                row.offset = num(&v).unwrap_or(-1);
            } else if name == tf {
                row.event_ts = num(&v);
            } else if parse_tile_field(&name).is_some_and(|(_, _, s)| s == source) {
                let state = AggState::decode(&v)?;
                row.states.insert(name, state);
            }
        }
        Ok(row)
    }

    /// The row after `w` applied; `states` are the written states, decoded
    /// (the ids were updated in place by the merge).
    fn apply(&mut self, w: &TileWrite, states: Vec<(String, AggState)>) {
        for ids in self.ids.values_mut() {
            ids.stored();
        }
        self.offset = w.offset;
        self.event_ts = Some(self.event_ts.map_or(w.event_ts, |t| t.max(w.event_ts)));
        for d in &w.delete {
            self.states.remove(d);
        }
        self.states.extend(states);
    }
}

impl std::fmt::Debug for Applier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Applier")
            .field("backend", &self.store.backend())
            .finish_non_exhaustive()
    }
}

/// A merged group: the write, and the states it writes (decoded, for the
/// in-memory copy).
type Merged = (TileWrite, Vec<(String, AggState)>);

/// One tile row's pending update from one source.
struct TileGroup<'a> {
    key: String,
    source: &'a Arc<str>,
    view: usize,
    /// Records of this group, in offset order.
    records: Vec<&'a Record>,
}

impl Applier {
    /// Routes every event type of `registry` to the views it feeds.
    /// `expiry_grace` extends latest-value rows' life past their TTL, as for
    /// `WriteFeatures`.
    pub fn new(
        registry: Arc<Registry>,
        store: Arc<dyn OnlineStore>,
        expiry_grace: std::time::Duration,
    ) -> Applier {
        let mut routes: HashMap<String, Routes> = HashMap::new();
        for (vi, v) in registry.views().iter().enumerate() {
            match &v.source {
                ViewSource::Batch | ViewSource::Sql { .. } | ViewSource::OnDemand { .. } => {}
                ViewSource::Events { event_types, .. } => {
                    for t in event_types {
                        routes.entry(t.clone()).or_default().latest.push(vi);
                    }
                }
                ViewSource::Aggregations { aggregations, .. } => {
                    // One state per distinct (function, attribute, events):
                    // aggregations that differ only in window share it.
                    for (ai, a) in aggregations.iter().enumerate() {
                        if a.state != a.name {
                            continue;
                        }
                        for t in &a.event_types {
                            let r = routes.entry(t.clone()).or_default();
                            match r.aggs.iter_mut().find(|(v, _)| *v == vi) {
                                Some((_, list)) => list.push(ai),
                                None => r.aggs.push((vi, vec![ai])),
                            }
                        }
                    }
                }
            }
        }
        Applier {
            registry,
            store,
            expiry_grace: duration_micros(expiry_grace),
            max_future_skew: EventTimeBounds::default().max_future_skew_micros(),
            routes,
            cache: Mutex::new(HashMap::new()),
            cache_rows: DEFAULT_CACHE_ROWS,
            metrics: None,
        }
    }

    /// Records each applied event's freshness per feature view in
    /// `metrics` (`quiver_feature_freshness_seconds`: event time to the
    /// store write returning; `quiver_feature_newest_event_timestamp_seconds`).
    pub fn set_metrics(&mut self, metrics: Arc<Metrics>) {
        self.metrics = Some(metrics);
    }

    /// The largest lead of an event time over the clock that events may
    /// have (the consumer's `ingest.max_future_skew`, set by
    /// [`crate::Ingestor::new`]): tile rows keep that much more history so
    /// that such an event never drops tiles a read at the clock counts.
    pub fn with_max_future_skew(mut self, skew: std::time::Duration) -> Applier {
        self.max_future_skew = duration_micros(skew);
        self
    }

    /// The online store it writes.
    pub(crate) fn store(&self) -> &Arc<dyn OnlineStore> {
        &self.store
    }

    /// Applies records (several sources, each in offset order).
    pub async fn apply(&self, records: &[Record]) -> Result<ApplyStats> {
        Ok(self.apply_by_source(records).await?.0)
    }

    /// [`Applier::apply`], with the tile outcomes (rows written and
    /// replayed, events too late) also per source; latest-value rows are
    /// counted in the total only (a row's winner may come from any source).
    pub async fn apply_by_source(&self, records: &[Record]) -> Result<(ApplyStats, SourceStats)> {
        let started = std::time::Instant::now();
        let mut stats = self.apply_latest(records).await?;
        let latest = started.elapsed();
        let by_source = self.apply_tiles(records).await?;
        for s in by_source.values() {
            stats += *s;
        }
        if let Some(m) = &self.metrics {
            self.observe_freshness(m, records);
        }
        tracing::debug!(
            latest_ms = latest.as_millis() as u64,
            tiles_ms = (started.elapsed() - latest).as_millis() as u64,
            "applied"
        );
        Ok((stats, by_source))
    }

    /// Every event of `records` is visible online now, in each view it
    /// feeds: one freshness observation per (event, view). Events replayed
    /// after a restart or rebalance are observed too (as old as they are):
    /// a replay shows as a freshness spike.
    fn observe_freshness(&self, m: &Metrics, records: &[Record]) {
        let now = SystemClock.now_micros();
        let mut per_view: HashMap<usize, (Vec<f64>, Micros)> = HashMap::new();
        for r in records {
            let Some(routes) = self.routes.get(&r.event.event_type) else {
                continue;
            };
            let t = r.event.event_time;
            for vi in routes
                .latest
                .iter()
                .chain(routes.aggs.iter().map(|(v, _)| v))
            {
                let e = per_view.entry(*vi).or_insert((Vec::new(), Micros::MIN));
                e.0.push(now.saturating_sub(t) as f64 / 1e6);
                e.1 = e.1.max(t);
            }
        }
        for (vi, (freshness, newest)) in per_view {
            // An event dated ahead of the clock (within the accepted skew)
            // must not make the view look fresh for that long.
            let newest = newest.min(now);
            m.observe_freshness(&self.registry.view(vi).name, freshness, newest as f64 / 1e6);
        }
    }

    fn view_key(&self, view: usize, ev: &Event) -> Result<String> {
        let v = self.registry.view(view);
        let pairs: Vec<(&str, &Value)> = v
            .join_keys
            .iter()
            .map(|jk| (jk.as_str(), ev.entity(jk).unwrap_or(&Value::Null)))
            .collect();
        Ok(row_key(&entity_key(&pairs)?, &v.name))
    }

    async fn apply_latest(&self, records: &[Record]) -> Result<ApplyStats> {
        // The winning row per key within the batch, by the store's own rule
        // (`store::replaces`: newest, ties by digest); the store applies the
        // same rule across batches, so the order of events never matters.
        let mut rows: Vec<WriteRow> = Vec::new();
        let mut by_key: HashMap<String, usize> = HashMap::new();
        for r in records {
            let Some(routes) = self.routes.get(&r.event.event_type) else {
                continue;
            };
            for &vi in &routes.latest {
                let view = self.registry.view(vi);
                let ViewSource::Events { fields, .. } = &view.source else {
                    continue;
                };
                let key = self.view_key(vi, &r.event)?;
                let features = view
                    .features
                    .iter()
                    .zip(fields)
                    .map(|(f, src)| {
                        let v = match src {
                            EventField::EventTime => Value::Timestamp(r.event.event_time),
                            EventField::Attribute(a) => {
                                r.event.attribute(a).cloned().unwrap_or(Value::Null)
                            }
                        };
                        (f.name.clone(), v)
                    })
                    .collect();
                let row = WriteRow {
                    key: key.clone(),
                    event_ts: r.event.event_time,
                    expire_at: view.online_expiry(r.event.event_time, self.expiry_grace),
                    features,
                };
                match by_key.get(&key) {
                    Some(&i) => {
                        let cur = &rows[i];
                        if replaces(row.event_ts, &row.features, cur.event_ts, &cur.features) {
                            rows[i] = row;
                        }
                    }
                    None => {
                        by_key.insert(key, rows.len());
                        rows.push(row);
                    }
                }
            }
        }
        let mut stats = ApplyStats::default();
        for wave in rows.chunks(CHUNK * PARALLEL_CALLS) {
            let outs = try_join_all(wave.chunks(CHUNK).map(|c| self.store.write(c))).await?;
            for o in outs {
                stats.rows_written += o.written;
                stats.rows_stale += o.stale;
            }
        }
        Ok(stats)
    }

    async fn apply_tiles(&self, records: &[Record]) -> Result<SourceStats> {
        let mut groups: Vec<TileGroup> = Vec::new();
        let mut index: HashMap<(String, &str), usize> = HashMap::new();
        for r in records {
            let Some(routes) = self.routes.get(&r.event.event_type) else {
                continue;
            };
            for (vi, _) in &routes.aggs {
                let key = self.view_key(*vi, &r.event)?;
                // The key is copied only for a new group, not for every event.
                let gi = match index.entry((key, &*r.source)) {
                    Entry::Occupied(e) => *e.get(),
                    Entry::Vacant(e) => {
                        groups.push(TileGroup {
                            key: e.key().0.clone(),
                            source: &r.source,
                            view: *vi,
                            records: Vec::new(),
                        });
                        *e.insert(groups.len() - 1)
                    }
                };
                groups[gi].records.push(r);
            }
        }
        let mut stats = SourceStats::new();
        for wave in groups.chunks(CHUNK * PARALLEL_CALLS) {
            let outs = try_join_all(wave.chunks(CHUNK).map(|c| self.apply_tile_chunk(c))).await?;
            for o in outs {
                for (source, s) in o {
                    *stats.entry(source).or_default() += s;
                }
            }
        }
        Ok(stats)
    }

    fn aggs_of(&self, view: usize, event_type: &str) -> &[usize] {
        self.routes
            .get(event_type)
            .and_then(|r| r.aggs.iter().find(|(v, _)| *v == view))
            .map_or(&[], |(_, a)| a.as_slice())
    }

    async fn apply_tile_chunk(&self, groups: &[TileGroup<'_>]) -> Result<SourceStats> {
        // Rows this process has not seen (since start or since it lost the
        // partition) are read whole, once; afterwards it owns its source's
        // fields of the row and keeps them in memory.
        let mut rows: Vec<Option<CachedRow>> = {
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            groups
                .iter()
                .map(|g| cache.remove(&(g.key.clone(), g.source.clone())))
                .collect()
        };
        let missing: Vec<usize> = (0..groups.len()).filter(|&i| rows[i].is_none()).collect();
        if !missing.is_empty() {
            let id_keys: Vec<String> = missing
                .iter()
                .map(|&i| event_ids_key(&groups[i].key))
                .collect();
            let lookups: Vec<Lookup> = missing
                .iter()
                .zip(&id_keys)
                .flat_map(|(&i, ik)| [Lookup::tiles(&groups[i].key, &[]), Lookup::tiles(ik, &[])])
                .collect();
            let mut stored = self.store.read(&lookups).await?.into_iter();
            for &i in &missing {
                let mut raw = || stored.next().flatten().map(|r| r.raw).unwrap_or_default();
                let (row, ids) = (raw(), raw());
                let key = &groups[i].key;
                let cached = CachedRow::of_source(row, ids, groups[i].source).map_err(|e| {
                    quiver_core::Error::new(e.kind(), format!("tile row {key}: {}", e.message()))
                })?;
                rows[i] = Some(cached);
            }
        }
        // Merging is CPU work on data this chunk owns: spread it over cores.
        let merged = par_map(
            groups.iter().zip(rows).collect(),
            crate::PAR_MIN_ITEMS,
            |(g, row)| {
                let mut row = row.unwrap_or_default();
                let mut stats = ApplyStats::default();
                let m = self.merge_group(g, &mut row, &mut stats);
                (g, row, stats, m)
            },
        );
        let mut stats = SourceStats::new();
        let mut writes = Vec::with_capacity(groups.len());
        let mut kept = Vec::with_capacity(groups.len());
        for (g, row, s, m) in merged {
            let of = stats.entry(g.source.clone()).or_default();
            *of += s;
            match m? {
                Some((w, states)) => {
                    writes.push(w);
                    kept.push((g, row, states));
                }
                None => {
                    of.tiles_replayed += 1;
                    self.remember(g, row);
                }
            }
        }
        let applied = self.store.write_tiles(&writes).await?;
        for ((w, (g, mut row, states)), ok) in writes.iter().zip(kept).zip(applied) {
            let of = stats.entry(g.source.clone()).or_default();
            if ok {
                of.tiles_written += 1;
                row.apply(w, states);
                self.remember(g, row);
            } else {
                // Another writer holds a newer offset of this source (a
                // rebalance in flight): forget the row, read it next time.
                of.tiles_replayed += 1;
            }
        }
        Ok(stats)
    }

    fn remember(&self, g: &TileGroup, row: CachedRow) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= self.cache_rows {
            // Crude but bounded: start over; rows are re-read on demand.
            cache.clear();
        }
        cache.insert((g.key.clone(), g.source.clone()), row);
    }

    /// Forgets the rows of sources this process no longer consumes (after
    /// a rebalance), so that their next owner's writes are read back first.
    pub fn forget_sources(&self, sources: &[String]) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.retain(|(_, src), _| !sources.iter().any(|s| s.as_str() == &**src));
    }

    /// Merges a group's new events into its stored states; `None` when the
    /// row already holds every offset of the group.
    fn merge_group(
        &self,
        g: &TileGroup,
        row: &mut CachedRow,
        stats: &mut ApplyStats,
    ) -> Result<Option<Merged>> {
        let ViewSource::Aggregations { tile, aggregations } = &self.registry.view(g.view).source
        else {
            return Ok(None);
        };
        let tile = *tile;
        let applied = row.offset;
        let prev_ts = row.event_ts;
        let fresh: Vec<&Record> = g
            .records
            .iter()
            .copied()
            .filter(|r| r.offset > applied)
            .collect();
        let Some(last) = fresh.last() else {
            return Ok(None);
        };
        // An event id the tile already counted (a retried send) is skipped
        // before anything else, so that it moves neither the row's newest
        // event time nor its window, as offline.
        // (A set of this batch's ids only for groups large enough to
        // need one: most groups hold a few events.)
        let mut in_batch: Option<HashSet<(i64, u64)>> = None;
        let mut counted: Vec<(&Record, i64, u64)> = Vec::with_capacity(fresh.len());
        for r in &fresh {
            let t = tile_of(r.event.event_time, tile);
            let id = event_id_hash(&r.event.event_id);
            let stored = row.ids.get(&t).is_some_and(|ids| ids.seen.contains(&id));
            let repeated = match &mut in_batch {
                Some(set) => !set.insert((t, id)),
                None => {
                    let found = counted.iter().any(|c| (c.1, c.2) == (t, id));
                    if counted.len() >= 32 {
                        in_batch = Some(
                            counted
                                .iter()
                                .map(|c| (c.1, c.2))
                                .chain([(t, id)])
                                .collect(),
                        );
                    }
                    found
                }
            };
            if stored || repeated {
                stats.events_duplicate += 1;
                continue;
            }
            counted.push((r, t, id));
        }
        let max_ts = counted
            .iter()
            .map(|(r, _, _)| r.event.event_time)
            .chain(prev_ts)
            .max()
            .unwrap_or(last.event.event_time);
        let max_tile = tile_of(max_ts, tile);
        let RowTiles {
            retention, keep, ..
        } = row_tiles(tile, aggregations, self.max_future_skew);
        let first_kept = max_tile.saturating_sub(keep).saturating_add(1);

        // States by (aggregation, tile); field names are built once per state.
        let mut states: Vec<((usize, i64), AggState)> = Vec::new();
        for &(r, t, id) in &counted {
            if t < first_kept {
                stats.events_too_late += 1;
                continue;
            }
            row.ids.entry(t).or_default().push(id);
            for &ai in self.aggs_of(g.view, &r.event.event_type) {
                let agg = &aggregations[ai];
                let pos = match states.iter().position(|(k, _)| *k == (ai, t)) {
                    Some(p) => p,
                    None => {
                        let field = tile_field(&agg.state, t, g.source);
                        let state = row
                            .states
                            .remove(&field)
                            .unwrap_or_else(|| AggState::new(agg.function));
                        states.push(((ai, t), state));
                        states.len() - 1
                    }
                };
                let value = agg
                    .attribute
                    .as_deref()
                    .and_then(|a| r.event.attribute(a).or_else(|| r.event.entity(a)));
                states[pos]
                    .1
                    .update(r.event.event_time, &r.event.event_id, value);
            }
        }

        // Tiles that were kept before this update and have now left every
        // window; older ones were deleted by earlier updates (or expired).
        let mut delete = Vec::new();
        if let Some(prev) = prev_ts {
            let prev_first = tile_of(prev, tile).saturating_sub(keep).saturating_add(1);
            let lo = prev_first;
            let n_states = aggregations.iter().filter(|a| a.state == a.name).count();
            let span = usize::try_from(first_kept.saturating_sub(lo)).unwrap_or(usize::MAX);
            if span.saturating_mul(n_states) <= row.states.len() {
                for t in lo..first_kept {
                    for a in aggregations.iter().filter(|a| a.state == a.name) {
                        delete.push(tile_field(&a.state, t, g.source));
                    }
                }
            } else {
                // A jump of many tiles: the row's own fields are fewer.
                delete.extend(
                    row.states
                        .keys()
                        .filter(|f| parse_tile_field(f).is_some_and(|(_, t, _)| t < first_kept))
                        .cloned(),
                );
            }
        }
        // Event ids of tiles that left every window go with them.
        let mut ids_delete = Vec::new();
        let gone: Vec<i64> = row
            .ids
            .keys()
            .copied()
            .filter(|t| *t < first_kept)
            .collect();
        for t in gone {
            let ids = row.ids.remove(&t).expect("listed");
            ids_delete.extend(ids.stored_chunks().map(|c| ids_field(t, c, g.source)));
        }
        let mut ids = Vec::new();
        for (&t, tile_ids) in &row.ids {
            for (c, part) in tile_ids.dirty() {
                ids.push((ids_field(t, c, g.source), encode_ids(part)));
            }
        }
        let new_ts = counted
            .iter()
            .map(|(r, _, _)| r.event.event_time)
            .max()
            .unwrap_or(max_ts);
        let states: Vec<(String, AggState)> = states
            .into_iter()
            .map(|((ai, t), s)| (tile_field(&aggregations[ai].state, t, g.source), s))
            .collect();
        let write = TileWrite {
            key: g.key.clone(),
            source: g.source.to_string(),
            offset: last.offset,
            event_ts: new_ts,
            fields: states
                .iter()
                .map(|(f, s)| (f.clone(), s.encode()))
                .collect(),
            delete,
            ids,
            ids_delete,
            // The row leaves every window when its newest tile does.
            expire_at: max_tile.saturating_add(retention).saturating_mul(tile),
        };
        Ok(Some((write, states)))
    }
}
