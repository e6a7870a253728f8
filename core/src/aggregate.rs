//! Windowed aggregations: tile arithmetic and the mergeable partial states
//! that the speed layer stores online and the batch layer recomputes
//! offline. Both layers use this module, so a value means the same thing in
//! training and in serving.
//!
//! # Semantics
//! Time is cut into tiles of the view's `tile` length; tile `i` holds events
//! with `i * tile <= event_time < (i + 1) * tile`. A window of length `W` read
//! at time `t` covers the `W / tile` tiles ending with the tile of `t`, so it
//! starts at `window_start(t)`; the offline computation additionally counts
//! only events with `event_time <= t` (online, the newest tile holds what
//! has arrived so far).
//!
//! Each tile keeps one partial state per source (Kafka topic and partition)
//! so that a partition's consumer owns its states alone and can apply a
//! batch exactly once (see `quiver-ingest`). A read merges the states of the
//! window's tiles in (tile, source) order, then finishes them:
//! - `count`: events; `sum`/`mean`/`min`/`max`: over non-null numeric
//!   attribute values (int64 taken as double); an empty window gives 0 for
//!   count and sum, null for mean, min and max;
//! - `last_n`: the `n` newest non-null values, newest first (ties on event
//!   time broken by the larger event id);
//! - `approx_distinct`: HyperLogLog with 4096 registers (standard error
//!   about 1.6%), exact-by-construction small-range correction.
//!
//! # One event, counted once
//! An event counts once per (entity row, tile, source) however often it
//! was sent: a client that retries `PushEvents` after a timeout appends the
//! same events (same `event_id`) again, at new offsets. Each tile keeps the
//! digests ([`event_id_hash`]) of the event ids it counted, per source, and
//! an event whose digest is already there is skipped; the digests leave
//! with their tile, so memory is bounded by the longest window. The offline
//! computation applies the same rule (first offset wins). Retries land in
//! the same source because producers key messages by entity.

use crate::codec::{decode_value, encode_value};
use crate::error::{Error, Result};
use crate::registry::{AggFunction, Aggregation};
use crate::time::Micros;
use crate::value::Value;

/// Format version of encoded states.
const STATE_VERSION: u8 = 1;

/// The tile index holding instant `ts`.
pub fn tile_of(ts: Micros, tile: Micros) -> i64 {
    ts.div_euclid(tile)
}

/// First tile of a window of length `window` read at `now`.
pub fn window_first_tile(now: Micros, tile: Micros, window: Micros) -> i64 {
    tile_of(now, tile) - window / tile + 1
}

/// Earliest event time a window of length `window` read at `now` counts.
pub fn window_start(now: Micros, tile: Micros, window: Micros) -> Micros {
    window_first_tile(now, tile, window) * tile
}

/// The online hash field of one partial state: `state` is the
/// aggregation's [`Aggregation::state`] (aggregations that differ only in
/// their window share tiles).
pub fn tile_field(state: &str, tile: i64, source: &str) -> String {
    format!("{state}:{tile}:{source}")
}

/// Splits a tile field into aggregation name, tile and source; `None` for
/// internal fields (they start with `_`).
pub fn parse_tile_field(field: &str) -> Option<(&str, i64, &str)> {
    if field.starts_with('_') {
        return None;
    }
    let mut it = field.splitn(3, ':');
    let agg = it.next()?;
    let tile = it.next()?.parse().ok()?;
    let source = it.next()?;
    Some((agg, tile, source))
}

/// Internal field: the last Kafka offset of `source` applied to the row.
pub fn offset_field(source: &str) -> String {
    format!("_o:{source}")
}

/// Internal field: the newest event time of `source` applied to the row.
pub fn event_time_field(source: &str) -> String {
    format!("_t:{source}")
}

/// Event-id digests stored per online field: a tile with more counted
/// events has several fields, and an update rewrites only the last one.
pub const IDS_PER_FIELD: usize = 1024;

/// Format version of encoded event-id digests.
const IDS_VERSION: u8 = 1;

/// The digest that tells events apart for de-duplication: xxHash64 (seed 0)
/// of the event id's UTF-8 bytes, fixed so that online and offline, and
/// every quiver version, agree. Two distinct ids of one (row, tile, source)
/// collide with probability about `n^2 / 2^65` for `n` events.
pub fn event_id_hash(event_id: &str) -> u64 {
    twox_hash::XxHash64::oneshot(0, event_id.as_bytes())
}

/// The field, in a row's event-id row (see
/// [`crate::codec::event_ids_key`]), of part `chunk` of the digests of
/// `tile` from `source`.
pub fn ids_field(tile: i64, chunk: usize, source: &str) -> String {
    format!("{tile}:{chunk}:{source}")
}

/// Splits an [`ids_field`] into tile, chunk and source.
pub fn parse_ids_field(field: &str) -> Option<(i64, usize, &str)> {
    let mut it = field.splitn(3, ':');
    let tile = it.next()?.parse().ok()?;
    let chunk = it.next()?.parse().ok()?;
    Some((tile, chunk, it.next()?))
}

/// Encodes digests: a version byte, then 8 little-endian bytes each.
pub fn encode_ids(ids: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + 8 * ids.len());
    out.push(IDS_VERSION);
    for id in ids {
        out.extend_from_slice(&id.to_le_bytes());
    }
    out
}

/// Decodes [`encode_ids`].
///
/// # Errors
/// `INTERNAL` when the bytes are not such an encoding.
pub fn decode_ids(buf: &[u8]) -> Result<Vec<u64>> {
    match buf.split_first() {
        Some((&IDS_VERSION, body)) if body.len() % 8 == 0 => Ok(body
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect()),
        Some((&v, _)) if v != IDS_VERSION => Err(Error::internal(format!(
            "event-id digest format {v} is not supported by this quiver version"
        ))),
        _ => Err(Error::internal(
            "corrupt event-id digests in the online store",
        )),
    }
}

/// One retained `last_n` value.
#[derive(Debug, Clone, PartialEq)]
pub struct LastEntry {
    /// Event time.
    pub ts: Micros,
    /// Event id, the tie-break between equal event times.
    pub event_id: String,
    /// The attribute value.
    pub value: Value,
}

/// A partial aggregation state: the events of one tile (or a merge of tiles).
#[derive(Debug, Clone, PartialEq)]
pub enum AggState {
    /// Number of events.
    Count(u64),
    /// Sum of values.
    Sum(f64),
    /// Sum and count of values.
    Mean(f64, u64),
    /// Smallest value so far.
    Min(Option<f64>),
    /// Largest value so far.
    Max(Option<f64>),
    /// The newest entries, newest first, at most `n`.
    LastN(u32, Vec<LastEntry>),
    /// HyperLogLog registers.
    Distinct(Hll),
}

/// The number `sum`, `mean`, `min` and `max` fold in: NaN and ±infinity
/// are skipped like null (one bad reading would otherwise make a week's
/// sum and mean NaN), the same online and offline (both fold through
/// [`AggState::update`]). `last_n` keeps such values as given.
fn numeric(v: &Value) -> Option<f64> {
    match v {
        Value::Int64(n) => Some(*n as f64),
        Value::Double(d) if d.is_finite() => Some(*d),
        _ => None,
    }
}

fn newer(a: &LastEntry, b: &LastEntry) -> std::cmp::Ordering {
    (b.ts, &b.event_id).cmp(&(a.ts, &a.event_id))
}

impl AggState {
    /// The empty state of `f`.
    pub fn new(f: AggFunction) -> AggState {
        match f {
            AggFunction::Count => AggState::Count(0),
            AggFunction::Sum => AggState::Sum(0.0),
            AggFunction::Mean => AggState::Mean(0.0, 0),
            AggFunction::Min => AggState::Min(None),
            AggFunction::Max => AggState::Max(None),
            AggFunction::LastN(n) => AggState::LastN(n, Vec::new()),
            AggFunction::ApproxDistinct => AggState::Distinct(Hll::default()),
        }
    }

    /// Adds one event; `value` is the aggregated attribute (ignored by
    /// count, skipped when null by the others).
    pub fn update(&mut self, ts: Micros, event_id: &str, value: Option<&Value>) {
        let value = value.filter(|v| !v.is_null());
        match self {
            AggState::Count(c) => *c += 1,
            AggState::Sum(s) => {
                if let Some(x) = value.and_then(numeric) {
                    *s += x;
                }
            }
            AggState::Mean(s, c) => {
                if let Some(x) = value.and_then(numeric) {
                    *s += x;
                    *c += 1;
                }
            }
            AggState::Min(m) => {
                if let Some(x) = value.and_then(numeric) {
                    *m = Some(m.map_or(x, |m| m.min(x)));
                }
            }
            AggState::Max(m) => {
                if let Some(x) = value.and_then(numeric) {
                    *m = Some(m.map_or(x, |m| m.max(x)));
                }
            }
            AggState::LastN(n, entries) => {
                if let Some(v) = value {
                    let e = LastEntry {
                        ts,
                        event_id: event_id.to_owned(),
                        value: v.clone(),
                    };
                    let pos = entries
                        .binary_search_by(|x| newer(x, &e))
                        .unwrap_or_else(|p| p);
                    if pos < *n as usize {
                        entries.insert(pos, e);
                        entries.truncate(*n as usize);
                    }
                }
            }
            AggState::Distinct(h) => {
                if let Some(v) = value {
                    h.insert(v);
                }
            }
        }
    }

    /// Merges `other` (a state of the same function) into `self`.
    pub fn merge(&mut self, other: &AggState) -> Result<()> {
        match (self, other) {
            (AggState::Count(a), AggState::Count(b)) => *a += b,
            (AggState::Sum(a), AggState::Sum(b)) => *a += b,
            (AggState::Mean(s, c), AggState::Mean(s2, c2)) => {
                *s += s2;
                *c += c2;
            }
            (AggState::Min(a), AggState::Min(b)) => {
                if let Some(b) = b {
                    *a = Some(a.map_or(*b, |a| a.min(*b)));
                }
            }
            (AggState::Max(a), AggState::Max(b)) => {
                if let Some(b) = b {
                    *a = Some(a.map_or(*b, |a| a.max(*b)));
                }
            }
            (AggState::LastN(n, a), AggState::LastN(_, b)) => {
                a.extend(b.iter().cloned());
                a.sort_by(newer);
                a.truncate(*n as usize);
            }
            (AggState::Distinct(a), AggState::Distinct(b)) => a.merge(b),
            _ => {
                return Err(Error::internal(
                    "stored aggregation state has another function than the registry declares",
                ))
            }
        }
        Ok(())
    }

    /// The feature value of a (merged) state.
    pub fn finish(&self) -> Value {
        match self {
            AggState::Count(c) => Value::Int64(*c as i64),
            AggState::Sum(s) => Value::Double(*s),
            AggState::Mean(_, 0) => Value::Null,
            AggState::Mean(s, c) => Value::Double(s / *c as f64),
            AggState::Min(m) | AggState::Max(m) => m.map_or(Value::Null, Value::Double),
            AggState::LastN(_, entries) => last_n_value(entries),
            AggState::Distinct(h) => Value::Int64(h.estimate() as i64),
        }
    }

    /// Encodes the state for the online store.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![STATE_VERSION];
        match self {
            AggState::Count(c) => {
                out.push(1);
                out.extend_from_slice(&c.to_le_bytes());
            }
            AggState::Sum(s) => {
                out.push(2);
                out.extend_from_slice(&s.to_le_bytes());
            }
            AggState::Mean(s, c) => {
                out.push(3);
                out.extend_from_slice(&s.to_le_bytes());
                out.extend_from_slice(&c.to_le_bytes());
            }
            AggState::Min(m) | AggState::Max(m) => {
                out.push(if matches!(self, AggState::Min(_)) {
                    4
                } else {
                    5
                });
                if let Some(m) = m {
                    out.extend_from_slice(&m.to_le_bytes());
                }
            }
            AggState::LastN(n, entries) => {
                out.push(6);
                out.extend_from_slice(&n.to_le_bytes());
                for e in entries {
                    out.extend_from_slice(&e.ts.to_le_bytes());
                    put_bytes(&mut out, e.event_id.as_bytes());
                    put_bytes(&mut out, &encode_value(&e.value));
                }
            }
            AggState::Distinct(h) => {
                out.push(7);
                h.encode(&mut out);
            }
        }
        out
    }

    /// Decodes [`AggState::encode`]'s output.
    pub fn decode(buf: &[u8]) -> Result<AggState> {
        let corrupt = || Error::internal("corrupt aggregation state in the online store");
        let (&version, rest) = buf.split_first().ok_or_else(corrupt)?;
        if version != STATE_VERSION {
            return Err(Error::internal(format!(
                "aggregation state format {version} is not supported by this quiver version"
            )));
        }
        let (&tag, body) = rest.split_first().ok_or_else(corrupt)?;
        let mut r = Reader(body);
        let state = match tag {
            1 => AggState::Count(r.u64()?),
            2 => AggState::Sum(f64::from_bits(r.u64()?)),
            3 => AggState::Mean(f64::from_bits(r.u64()?), r.u64()?),
            4 | 5 => {
                let m = if r.0.is_empty() {
                    None
                } else {
                    Some(f64::from_bits(r.u64()?))
                };
                if tag == 4 {
                    AggState::Min(m)
                } else {
                    AggState::Max(m)
                }
            }
            6 => {
                let n = r.u32()?;
                let mut entries = Vec::new();
                while !r.0.is_empty() {
                    let ts = r.u64()? as i64;
                    let id = String::from_utf8(r.bytes()?.to_vec()).map_err(|_| corrupt())?;
                    let value = decode_value(r.bytes()?)?;
                    entries.push(LastEntry {
                        ts,
                        event_id: id,
                        value,
                    });
                }
                AggState::LastN(n, entries)
            }
            7 => AggState::Distinct(Hll::decode(r.0)?),
            _ => return Err(corrupt()),
        };
        Ok(state)
    }
}

fn last_n_value(entries: &[LastEntry]) -> Value {
    fn all<T>(entries: &[LastEntry], f: impl Fn(&Value) -> Option<T>) -> Vec<T> {
        entries.iter().filter_map(|e| f(&e.value)).collect()
    }
    match entries.first().map(|e| &e.value) {
        Some(Value::Int64(_)) => Value::Int64List(all(entries, |v| match v {
            Value::Int64(n) => Some(*n),
            _ => None,
        })),
        Some(Value::Double(_)) => Value::DoubleList(all(entries, |v| match v {
            Value::Double(n) => Some(*n),
            _ => None,
        })),
        Some(Value::Bool(_)) => Value::BoolList(all(entries, |v| match v {
            Value::Bool(b) => Some(*b),
            _ => None,
        })),
        _ => Value::StringList(all(entries, |v| match v {
            Value::String(s) => Some(s.clone()),
            _ => None,
        })),
    }
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.0.len() < n {
            return Err(Error::internal(
                "corrupt aggregation state in the online store",
            ));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().unwrap_or([0; 8]),
        ))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().unwrap_or([0; 4]),
        ))
    }
    fn bytes(&mut self) -> Result<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
}

/// Number of HyperLogLog index bits.
const HLL_P: u32 = 12;
/// Number of HyperLogLog registers.
const HLL_M: usize = 1 << HLL_P;
/// Below this many non-zero registers the sparse encoding is smaller.
const HLL_SPARSE_MAX: usize = HLL_M / 3;

/// Above this many set registers an in-memory sketch is dense (4 bytes per
/// sparse entry: past a quarter of the registers, dense is smaller).
const HLL_SPARSE_MEM_MAX: usize = HLL_M / 4;
/// The largest rank a register can hold.
const HLL_MAX_RANK: u8 = (64 - HLL_P + 1) as u8;

/// A HyperLogLog sketch with 4096 registers. The hash is fixed (FNV-1a
/// with a murmur3 finalizer) so that sketches built online and offline, by
/// any quiver version with this state format, agree.
///
/// Small sketches (the usual per-tile state: a few values in an hour) keep
/// only their set registers; they turn dense past a quarter of the
/// registers. The representation changes nothing observable: equality,
/// encoding and the estimate depend only on the register values.
#[derive(Debug, Clone)]
pub struct Hll {
    repr: HllRepr,
}

#[derive(Debug, Clone)]
enum HllRepr {
    /// The set registers as (index, rank), sorted by index, no zero ranks.
    Sparse(Vec<(u16, u8)>),
    /// All registers.
    Dense(Vec<u8>),
}

impl Default for Hll {
    fn default() -> Self {
        Hll {
            repr: HllRepr::Sparse(Vec::new()),
        }
    }
}

impl PartialEq for Hll {
    fn eq(&self, other: &Hll) -> bool {
        self.set_registers().eq(other.set_registers())
    }
}

fn hash_value(v: &Value) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    match v {
        Value::String(s) => {
            feed(b"s");
            feed(s.as_bytes());
        }
        Value::Int64(n) => {
            feed(b"i");
            feed(&n.to_le_bytes());
        }
        other => feed(&encode_value(other)),
    }
    // murmur3 fmix64: FNV's low bits are weak, the index uses the high ones.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h
}

impl Hll {
    /// Adds a value.
    pub fn insert(&mut self, v: &Value) {
        let h = hash_value(v);
        let idx = (h >> (64 - HLL_P)) as u16;
        let rest = h << HLL_P;
        let rank = (rest.leading_zeros().min(64 - HLL_P) + 1) as u8;
        self.raise(idx, rank);
    }

    /// Sets register `idx` to at least `rank` (> 0).
    fn raise(&mut self, idx: u16, rank: u8) {
        match &mut self.repr {
            HllRepr::Dense(regs) => {
                let r = &mut regs[idx as usize];
                *r = (*r).max(rank);
            }
            HllRepr::Sparse(set) => match set.binary_search_by_key(&idx, |e| e.0) {
                Ok(i) => set[i].1 = set[i].1.max(rank),
                Err(i) => {
                    set.insert(i, (idx, rank));
                    if set.len() > HLL_SPARSE_MEM_MAX {
                        self.densify();
                    }
                }
            },
        }
    }

    fn densify(&mut self) {
        if let HllRepr::Sparse(set) = &self.repr {
            let mut regs = vec![0; HLL_M];
            for &(i, r) in set {
                regs[i as usize] = r;
            }
            self.repr = HllRepr::Dense(regs);
        }
    }

    /// The non-zero registers as (index, rank), by index.
    fn set_registers(&self) -> Box<dyn Iterator<Item = (u16, u8)> + '_> {
        match &self.repr {
            HllRepr::Sparse(set) => Box::new(set.iter().copied()),
            HllRepr::Dense(regs) => Box::new(
                regs.iter()
                    .enumerate()
                    .filter(|(_, &r)| r > 0)
                    .map(|(i, &r)| (i as u16, r)),
            ),
        }
    }

    /// Register-wise maximum: the sketch of the union.
    pub fn merge(&mut self, other: &Hll) {
        match (&mut self.repr, &other.repr) {
            (HllRepr::Dense(a), HllRepr::Dense(b)) => {
                for (a, b) in a.iter_mut().zip(b) {
                    *a = (*a).max(*b);
                }
            }
            (HllRepr::Dense(a), HllRepr::Sparse(b)) => {
                for &(i, r) in b {
                    let x = &mut a[i as usize];
                    *x = (*x).max(r);
                }
            }
            (HllRepr::Sparse(a), HllRepr::Sparse(b)) => {
                // Merge the two sorted lists.
                let mut out = Vec::with_capacity(a.len() + b.len());
                let (mut i, mut j) = (0, 0);
                while i < a.len() && j < b.len() {
                    match a[i].0.cmp(&b[j].0) {
                        std::cmp::Ordering::Less => {
                            out.push(a[i]);
                            i += 1;
                        }
                        std::cmp::Ordering::Greater => {
                            out.push(b[j]);
                            j += 1;
                        }
                        std::cmp::Ordering::Equal => {
                            out.push((a[i].0, a[i].1.max(b[j].1)));
                            i += 1;
                            j += 1;
                        }
                    }
                }
                out.extend_from_slice(&a[i..]);
                out.extend_from_slice(&b[j..]);
                *a = out;
                if a.len() > HLL_SPARSE_MEM_MAX {
                    self.densify();
                }
            }
            (HllRepr::Sparse(_), HllRepr::Dense(_)) => {
                self.densify();
                self.merge(other);
            }
        }
    }

    /// Estimated number of distinct values. Computed from how many
    /// registers hold each rank, so it depends only on the register values.
    pub fn estimate(&self) -> u64 {
        let mut by_rank = [0u32; HLL_MAX_RANK as usize + 1];
        match &self.repr {
            HllRepr::Sparse(set) => {
                for &(_, r) in set {
                    by_rank[r as usize] += 1;
                }
                by_rank[0] = (HLL_M - set.len()) as u32;
            }
            HllRepr::Dense(regs) => {
                for &r in regs {
                    by_rank[r as usize] += 1;
                }
            }
        }
        let zeros = by_rank[0] as usize;
        // Each term is exact (a count times a power of two); summed by rank.
        let sum: f64 = by_rank
            .iter()
            .enumerate()
            .map(|(r, &n)| f64::from(n) * 2f64.powi(-(r as i32)))
            .sum();
        let m = HLL_M as f64;
        let alpha = 0.7213 / (1.0 + 1.079 / m);
        let raw = alpha * m * m / sum;
        let e = if raw <= 2.5 * m && zeros > 0 {
            m * (m / zeros as f64).ln()
        } else {
            raw
        };
        e.round() as u64
    }

    /// The dense encoding past [`HLL_SPARSE_MAX`] set registers, else the
    /// sparse one; a sparse sketch never holds that many
    /// ([`HLL_SPARSE_MEM_MAX`] is smaller).
    fn encode(&self, out: &mut Vec<u8>) {
        match &self.repr {
            HllRepr::Dense(regs) if regs.iter().filter(|&&r| r > 0).count() > HLL_SPARSE_MAX => {
                out.push(1);
                out.extend_from_slice(regs);
            }
            _ => {
                out.push(0);
                for (i, r) in self.set_registers() {
                    out.extend_from_slice(&i.to_le_bytes());
                    out.push(r);
                }
            }
        }
    }

    fn decode(buf: &[u8]) -> Result<Hll> {
        let corrupt = || Error::internal("corrupt HyperLogLog state in the online store");
        let (&kind, body) = buf.split_first().ok_or_else(corrupt)?;
        let mut h = Hll::default();
        match kind {
            0 if body.len() % 3 == 0 => {
                for c in body.chunks_exact(3) {
                    let i = u16::from_le_bytes([c[0], c[1]]);
                    if i as usize >= HLL_M || c[2] > HLL_MAX_RANK {
                        return Err(corrupt());
                    }
                    if c[2] > 0 {
                        h.raise(i, c[2]);
                    }
                }
            }
            1 if body.len() == HLL_M => {
                if body.iter().any(|&r| r > HLL_MAX_RANK) {
                    return Err(corrupt());
                }
                h.repr = HllRepr::Dense(body.to_vec());
            }
            _ => return Err(corrupt()),
        }
        Ok(h)
    }
}

/// Combines stored partial states of one aggregation into its feature
/// value at `now`: tiles outside the window are ignored; the rest merge in
/// (tile, source) order.
pub fn combine<'a>(
    agg: &Aggregation,
    tile: Micros,
    now: Micros,
    states: impl IntoIterator<Item = (i64, &'a str, &'a [u8])>,
) -> Result<Value> {
    let first = window_first_tile(now, tile, agg.window);
    let last = tile_of(now, tile);
    let mut parts: Vec<(i64, &str, &[u8])> = states
        .into_iter()
        .filter(|(t, _, _)| (first..=last).contains(t))
        .collect();
    parts.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    let mut acc = AggState::new(agg.function);
    for (_, _, bytes) in parts {
        acc.merge(&AggState::decode(bytes)?)?;
    }
    Ok(acc.finish())
}

/// Turns a tile row (raw fields as stored) into feature values at `now`:
/// one value per entry of `wanted` (indices into `aggregations`), and the
/// newest event time applied to the row. `None` when the row's newest
/// event has left the longest window: the row is expired (the store drops
/// it about then too; deciding here makes reads exact at any clock).
pub fn finish_row(
    aggregations: &[Aggregation],
    tile: Micros,
    now: Micros,
    wanted: &[usize],
    raw: &[(String, Vec<u8>)],
) -> Result<Option<(Micros, Vec<Value>)>> {
    let Some(event_ts) = raw
        .iter()
        .filter(|(n, _)| n.starts_with("_t:"))
        .filter_map(|(_, v)| std::str::from_utf8(v).ok()?.parse::<Micros>().ok())
        .max()
    else {
        return Ok(None);
    };
    let longest = aggregations.iter().map(|a| a.window).max().unwrap_or(tile);
    if tile_of(event_ts, tile) < window_first_tile(now, tile, longest) {
        return Ok(None);
    }
    let values = wanted
        .iter()
        .map(|&i| {
            let agg = &aggregations[i];
            let states = raw.iter().filter_map(|(n, v)| {
                let (name, t, src) = parse_tile_field(n)?;
                (name == agg.state).then_some((t, src, v.as_slice()))
            });
            combine(agg, tile, now, states)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Some((event_ts, values)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Micros = 3_600_000_000;

    #[test]
    fn event_id_digests_are_fixed_and_round_trip() {
        // xxHash64 reference values (seed 0): a change of hash would make
        // stored digests miss their retries.
        assert_eq!(event_id_hash(""), 0xef46_db37_51d8_e999);
        assert_eq!(event_id_hash("a"), 0xd24e_c4f1_a98c_6e5b);
        let ids = [0, 1, u64::MAX, event_id_hash("evt_1")];
        assert_eq!(decode_ids(&encode_ids(&ids)).unwrap(), ids);
        assert_eq!(decode_ids(&encode_ids(&[])).unwrap(), Vec::<u64>::new());
        assert!(decode_ids(&[IDS_VERSION, 1, 2]).is_err());
        assert!(decode_ids(&[9]).is_err());
        assert!(decode_ids(&[]).is_err());
        let f = ids_field(-3, 2, "events:7");
        assert_eq!(parse_ids_field(&f), Some((-3, 2, "events:7")));
    }

    #[test]
    fn windows_cover_whole_tiles_ending_with_now() {
        let now = 10 * HOUR + 5;
        assert_eq!(tile_of(now, HOUR), 10);
        assert_eq!(window_first_tile(now, HOUR, 24 * HOUR), 10 - 23);
        assert_eq!(window_start(now, HOUR, HOUR), 10 * HOUR);
        assert_eq!(tile_of(-1, HOUR), -1);
    }

    #[test]
    fn tile_fields_round_trip() {
        let f = tile_field("spend_7d", 493_000, "events:3");
        assert_eq!(
            parse_tile_field(&f),
            Some(("spend_7d", 493_000, "events:3"))
        );
        assert_eq!(parse_tile_field(&offset_field("events:3")), None);
    }

    const FUNCTIONS: [AggFunction; 7] = [
        AggFunction::Count,
        AggFunction::Sum,
        AggFunction::Mean,
        AggFunction::Min,
        AggFunction::Max,
        AggFunction::LastN(3),
        AggFunction::ApproxDistinct,
    ];

    /// The i-th sample value for function `f`.
    fn sample(f: AggFunction, i: i64) -> Value {
        if matches!(f, AggFunction::LastN(_) | AggFunction::ApproxDistinct) {
            Value::String(format!("p{}", i % 4))
        } else {
            Value::Double(i as f64 * 1.5)
        }
    }

    fn states() -> Vec<AggState> {
        FUNCTIONS
            .iter()
            .map(|&f| {
                let mut s = AggState::new(f);
                for i in 0..5 {
                    s.update(i * 10, &format!("e{i}"), Some(&sample(f, i)));
                }
                s
            })
            .collect()
    }

    #[test]
    fn states_round_trip_and_finish() {
        let finished: Vec<Value> = states().iter().map(AggState::finish).collect();
        assert_eq!(
            finished,
            vec![
                Value::Int64(5),
                Value::Double(15.0),
                Value::Double(3.0),
                Value::Double(0.0),
                Value::Double(6.0),
                Value::StringList(vec!["p0".into(), "p3".into(), "p2".into()]),
                Value::Int64(4),
            ]
        );
        for s in states() {
            assert_eq!(AggState::decode(&s.encode()).unwrap(), s);
        }
        assert!(AggState::decode(&[STATE_VERSION, 1, 0]).is_err());
        assert!(AggState::decode(&[9, 1]).is_err());
    }

    #[test]
    fn merging_equals_updating_in_one_state() {
        for (whole, f) in states().into_iter().zip(FUNCTIONS) {
            let (mut a, mut b) = (AggState::new(f), AggState::new(f));
            for i in 0..5 {
                let target = if i % 2 == 0 { &mut a } else { &mut b };
                target.update(i * 10, &format!("e{i}"), Some(&sample(f, i)));
            }
            a.merge(&b).unwrap();
            assert_eq!(a.finish(), whole.finish(), "{f:?}");
        }
    }

    #[test]
    fn empty_windows_and_nulls() {
        assert_eq!(AggState::new(AggFunction::Mean).finish(), Value::Null);
        assert_eq!(AggState::new(AggFunction::Sum).finish(), Value::Double(0.0));
        let mut m = AggState::new(AggFunction::Max);
        m.update(1, "a", Some(&Value::Null));
        m.update(1, "a", None);
        assert_eq!(m.finish(), Value::Null);
        // Non-finite values are skipped like null by the numeric folds.
        for f in [
            AggFunction::Sum,
            AggFunction::Mean,
            AggFunction::Min,
            AggFunction::Max,
        ] {
            let mut s = AggState::new(f);
            for (i, x) in [2.0, f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 4.0]
                .into_iter()
                .enumerate()
            {
                s.update(i as i64, "e", Some(&Value::Double(x)));
            }
            let want = match f {
                AggFunction::Sum => 6.0,
                AggFunction::Mean => 3.0,
                AggFunction::Min => 2.0,
                _ => 4.0,
            };
            assert_eq!(s.finish(), Value::Double(want), "{f:?}");
        }
        let mut last = AggState::new(AggFunction::LastN(1));
        last.update(1, "e", Some(&Value::Double(f64::NAN)));
        assert!(matches!(last.finish(), Value::DoubleList(v) if v[0].is_nan()));
        assert!(AggState::new(AggFunction::Sum)
            .merge(&AggState::new(AggFunction::Count))
            .is_err());
    }

    #[test]
    fn last_n_breaks_time_ties_by_event_id() {
        let mut s = AggState::new(AggFunction::LastN(2));
        s.update(5, "b", Some(&Value::Int64(2)));
        s.update(5, "c", Some(&Value::Int64(3)));
        s.update(5, "a", Some(&Value::Int64(1)));
        s.update(1, "z", Some(&Value::Int64(9)));
        assert_eq!(s.finish(), Value::Int64List(vec![3, 2]));
    }

    #[test]
    fn hll_is_close_and_sparse_when_small() {
        let mut h = Hll::default();
        for i in 0..100_000 {
            h.insert(&Value::String(format!("user_{i}")));
        }
        let e = h.estimate() as f64;
        assert!((e - 100_000.0).abs() / 100_000.0 < 0.05, "estimate {e}");
        let mut small = Hll::default();
        for i in 0..50 {
            small.insert(&Value::Int64(i));
        }
        assert_eq!(small.estimate(), 50);
        let s = AggState::Distinct(small);
        assert!(s.encode().len() < 200);
        assert_eq!(AggState::decode(&s.encode()).unwrap(), s);
    }

    /// The sketch with every register in the dense form.
    fn dense(h: &Hll) -> Hll {
        let mut d = h.clone();
        d.densify();
        d
    }

    #[test]
    fn hll_sparse_and_dense_forms_agree() {
        // Sizes on both sides of the in-memory and the encoding thresholds.
        for n in [0u64, 1, 7, 300, 1_000, 1_100, 1_500, 3_000, 20_000] {
            let mut h = Hll::default();
            for i in 0..n {
                h.insert(&Value::String(format!("p{i}")));
                h.insert(&Value::String(format!("p{}", i / 2))); // repeats
            }
            let d = dense(&h);
            assert!(matches!(d.repr, HllRepr::Dense(_)));
            assert_eq!(h, d, "{n}");
            assert_eq!(h.estimate(), d.estimate(), "{n}");
            let (mut eh, mut ed) = (Vec::new(), Vec::new());
            h.encode(&mut eh);
            d.encode(&mut ed);
            assert_eq!(eh, ed, "{n}: one encoding whatever the form");
            let back = Hll::decode(&eh).unwrap();
            assert_eq!(back, h);
            assert_eq!(back.estimate(), h.estimate());
            if n > 0 {
                let e = h.estimate() as f64;
                assert!((e - n as f64).abs() / n as f64 <= 0.05, "{n}: {e}");
            }
        }
    }

    #[test]
    fn hll_merges_across_forms_are_unions() {
        let sketch = |lo: u64, hi: u64| {
            let mut h = Hll::default();
            for i in lo..hi {
                h.insert(&Value::Int64(i as i64));
            }
            h
        };
        let union = sketch(0, 6_000);
        for (a, b) in [(0, 3_000), (0, 200), (5_900, 6_000)] {
            let (x, y) = (sketch(a, b), sketch(0, 6_000));
            for (left, right) in [
                (x.clone(), y.clone()),
                (dense(&x), y.clone()),
                (x.clone(), dense(&y)),
                (y.clone(), x.clone()),
                (dense(&y), x.clone()),
            ] {
                let mut m = left;
                m.merge(&right);
                assert_eq!(m, union);
                assert_eq!(m.estimate(), union.estimate());
            }
        }
        // Two small sketches stay sparse and equal the sketch of all values.
        let (mut a, b) = (sketch(0, 100), sketch(50, 200));
        a.merge(&b);
        assert!(matches!(a.repr, HllRepr::Sparse(_)));
        assert_eq!(a, sketch(0, 200));
    }

    #[test]
    fn hll_rejects_corrupt_states() {
        for bad in [
            vec![0, 0xff, 0xff, 1], // register index out of range
            vec![0, 1, 0, 60],      // impossible rank
            vec![0, 1, 0],          // truncated entry
            vec![1, 0, 0],          // dense of the wrong length
            vec![2],                // unknown form
        ] {
            assert!(Hll::decode(&bad).is_err(), "{bad:?}");
        }
    }
}
