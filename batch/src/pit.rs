//! The point-in-time (as-of) join behind historical retrieval.
//!
//! For every entity row `(key, t)` and one feature view, pick the feature
//! row with the same key and the greatest feature time `<= t`; if that row
//! is older than `t - ttl`, nothing. Feature rows after `t` are never
//! looked at, so nothing from the future leaks into a training row.
//!
//! Ties (several rows of one key with the same feature time) go to the row
//! with the greatest tie digest of its feature values
//! ([`quiver_core::codec::tie_digest`]), the rule the online store applies
//! to writes ([`quiver_core::store::replaces`]): the answer depends only on
//! the data, never on file layout or thread scheduling, and a training row
//! sees the value serving sees.
//!
//! # How
//! Entity keys are encoded once with Arrow's row format and numbered;
//! feature rows whose key no entity row asks for are dropped while
//! scanning. The rest are sorted by (key number, time) and each entity row
//! binary-searches its key's run. Values are gathered with one `interleave`
//! per feature column. Cost: O(F + E log F) for F feature rows and E entity
//! rows, memory 24 bytes per kept feature row.

use arrow::array::{
    new_null_array, Array, ArrayRef, Int64Array, RecordBatch, StringArray,
    TimestampMicrosecondArray,
};
use arrow::compute::interleave;
use arrow::datatypes::DataType;
use arrow::row::{RowConverter, Rows, SortField};
// hashbrown with foldhash: several times faster than SipHash on row bytes.
use datafusion::common::HashMap;
use quiver_core::codec::{digest_order, tie_digest};
use quiver_core::columnar::{arrow_type, value_at};
use quiver_core::par::par_map;
use quiver_core::time::Micros;
use quiver_core::{Error, Result, Value, ValueType};

fn arrow_err(what: &str, e: arrow::error::ArrowError) -> Error {
    Error::internal(format!("{what}: {e}"))
}

/// Entity keys numbered by distinct value.
///
/// A single string or int64 key (the common case) is looked up by its
/// bytes; other keys by Arrow's row encoding of all key columns.
#[derive(Debug)]
pub struct KeyIndex {
    converter: Option<RowConverter>,
    ids: HashMap<Box<[u8]>, u32>,
    /// Per entity row: its key number, `None` when a key column is null.
    pub row_ids: Vec<Option<u32>>,
}

/// Key columns of some rows, ready for [`KeyIndex::id`].
#[derive(Debug)]
pub enum EncodedKeys<'a> {
    /// One string key.
    Utf8(&'a StringArray),
    /// One int64 key.
    Int64(&'a Int64Array),
    /// Arrow rows of several (or other) key columns.
    Rows(Rows),
}

impl EncodedKeys<'_> {
    /// Calls `f` with the bytes that identify row `i`'s key.
    fn with_bytes<R>(&self, i: usize, f: impl FnOnce(&[u8]) -> R) -> R {
        match self {
            EncodedKeys::Utf8(a) => f(a.value(i).as_bytes()),
            EncodedKeys::Int64(a) => f(&a.value(i).to_le_bytes()),
            EncodedKeys::Rows(r) => f(r.row(i).data()),
        }
    }
}

impl KeyIndex {
    /// Numbers the distinct keys of the entity rows (`keys`: one array per
    /// join key, all the same length).
    pub fn new(keys: &[ArrayRef]) -> Result<KeyIndex> {
        let simple =
            keys.len() == 1 && matches!(keys[0].data_type(), DataType::Utf8 | DataType::Int64);
        let converter = if simple {
            None
        } else {
            let fields = keys
                .iter()
                .map(|k| SortField::new(k.data_type().clone()))
                .collect();
            Some(RowConverter::new(fields).map_err(|e| arrow_err("key encoding", e))?)
        };
        let mut index = KeyIndex {
            converter,
            ids: HashMap::new(),
            row_ids: Vec::new(),
        };
        let encoded = index.encode(keys)?;
        let n = keys.first().map_or(0, |k| k.len());
        let mut row_ids = Vec::with_capacity(n);
        for i in 0..n {
            if keys.iter().any(|k| k.is_null(i)) {
                row_ids.push(None);
                continue;
            }
            let next = index.ids.len() as u32;
            let id = encoded.with_bytes(i, |b| *index.ids.entry(b.into()).or_insert(next));
            row_ids.push(Some(id));
        }
        drop(encoded);
        index.row_ids = row_ids;
        Ok(index)
    }

    /// Number of distinct keys.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// True when no entity row has a key.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Prepares the key columns of other rows (same types) for [`Self::id`].
    pub fn encode<'a>(&self, keys: &'a [ArrayRef]) -> Result<EncodedKeys<'a>> {
        match &self.converter {
            Some(c) => c
                .convert_columns(keys)
                .map(EncodedKeys::Rows)
                .map_err(|e| arrow_err("key encoding", e)),
            None => {
                let k = keys[0].as_any();
                if let Some(a) = k.downcast_ref::<StringArray>() {
                    Ok(EncodedKeys::Utf8(a))
                } else if let Some(a) = k.downcast_ref::<Int64Array>() {
                    Ok(EncodedKeys::Int64(a))
                } else {
                    Err(Error::internal(format!(
                        "key column of type {} where string or int64 was expected",
                        keys[0].data_type()
                    )))
                }
            }
        }
    }

    /// The key number of row `i` of `keys`, `None` for keys no entity row has.
    pub fn id(&self, keys: &EncodedKeys<'_>, i: usize) -> Option<u32> {
        keys.with_bytes(i, |b| self.ids.get(b).copied())
    }
}

/// One candidate feature row.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    key: u32,
    ts: Micros,
    batch: u32,
    row: u32,
}

/// Feature rows of one view: batches whose first `n_keys` columns are the
/// join keys (same types as the entity keys), then `event_timestamp`
/// (microseconds), then the features.
#[derive(Debug)]
pub struct FeatureRows<'a> {
    /// The batches.
    pub batches: &'a [RecordBatch],
    /// Number of leading join-key columns.
    pub n_keys: usize,
    /// Names and types of the feature columns, in column order (names for
    /// the tie digest, types for reading values and for null columns when
    /// there are no batches).
    pub features: Vec<(String, ValueType)>,
}

/// Joins entity rows (`index`, `times`) as of their times against `rows`;
/// returns one array per feature column, one value per entity row.
pub fn asof_join(
    index: &KeyIndex,
    times: &TimestampMicrosecondArray,
    rows: &FeatureRows<'_>,
    ttl: Option<Micros>,
) -> Result<Vec<ArrayRef>> {
    let n = times.len();
    let n_features = rows.features.len();
    let ts_col = rows.n_keys;
    let max_t = times.iter().flatten().max().unwrap_or(Micros::MIN);

    // Scan the feature batches on all cores: each encodes its keys and
    // keeps the rows some entity row asks for.
    let scanned = par_map((0..rows.batches.len()).collect(), 2, |bi| {
        scan_batch(index, rows, bi, max_t)
    });
    let scanned = scanned.into_iter().collect::<Result<Vec<_>>>()?;

    // Counting sort by key, then each key's (short) run by time.
    let starts = run_starts(index.len(), scanned.iter().flatten().map(|c| c.key));
    let total = starts[index.len()];
    let mut next = starts.clone();
    let mut cands = vec![
        Candidate {
            key: 0,
            ts: 0,
            batch: 0,
            row: 0
        };
        total
    ];
    for c in scanned.into_iter().flatten() {
        let slot = &mut next[c.key as usize];
        cands[*slot] = c;
        *slot += 1;
    }
    for k in 0..index.len() {
        cands[starts[k]..starts[k + 1]].sort_unstable_by_key(|c| c.ts);
    }

    // Feature columns in the byte order of their names: the tie digest's.
    let digest_order = digest_order(&rows.features, |f| f.0.as_str());
    let null_source = rows.batches.len();
    let mut picks: Vec<(usize, usize)> = Vec::with_capacity(n);
    for i in 0..n {
        let (Some(key), false) = (index.row_ids[i], times.is_null(i)) else {
            picks.push((null_source, 0));
            continue;
        };
        let t = times.value(i);
        let run = &cands[starts[key as usize]..starts[key as usize + 1]];
        let j = run.partition_point(|c| c.ts <= t);
        if j == 0 {
            picks.push((null_source, 0));
            continue;
        }
        let newest = run[j - 1];
        if ttl.is_some_and(|ttl| t.saturating_sub(newest.ts) > ttl) {
            picks.push((null_source, 0));
            continue;
        }
        let tied = run[..j]
            .iter()
            .rev()
            .take_while(|c| c.ts == newest.ts)
            .count();
        let best = if tied == 1 {
            newest
        } else {
            tie_winner(rows, &digest_order, &run[j - tied..j])?
        };
        picks.push((best.batch as usize, best.row as usize));
    }

    (0..n_features)
        .map(|f| {
            let col = ts_col + 1 + f;
            let nulls = new_null_array(&arrow_type(rows.features[f].1), 1);
            let mut sources: Vec<&dyn Array> = rows
                .batches
                .iter()
                .map(|b| b.column(col).as_ref())
                .collect();
            sources.push(nulls.as_ref());
            interleave(&sources, &picks).map_err(|e| arrow_err("gathering feature values", e))
        })
        .collect()
}

/// Where each key's run starts in rows sorted by key: `starts[k]..starts[k +
/// 1]` holds key `k`, for keys `0..n` (`keys`: the key of every row).
pub(crate) fn run_starts(n: usize, keys: impl Iterator<Item = u32>) -> Vec<usize> {
    let mut starts = vec![0usize; n + 1];
    for k in keys {
        starts[k as usize + 1] += 1;
    }
    for k in 0..n {
        starts[k + 1] += starts[k];
    }
    starts
}

/// The rows of batch `bi` that an entity row may pick.
fn scan_batch(
    index: &KeyIndex,
    rows: &FeatureRows<'_>,
    bi: usize,
    max_t: Micros,
) -> Result<Vec<Candidate>> {
    let b = &rows.batches[bi];
    let encoded = index.encode(&b.columns()[..rows.n_keys])?;
    let ts = b
        .column(rows.n_keys)
        .as_any()
        .downcast_ref::<TimestampMicrosecondArray>()
        .ok_or_else(|| Error::internal("feature time column is not microseconds"))?;
    let mut out = Vec::new();
    for r in 0..b.num_rows() {
        if ts.is_null(r) || ts.value(r) > max_t {
            continue;
        }
        if let Some(key) = index.id(&encoded, r) {
            out.push(Candidate {
                key,
                ts: ts.value(r),
                batch: bi as u32,
                row: r as u32,
            });
        }
    }
    Ok(out)
}

/// Of rows tied on key and feature time, the one whose feature values have
/// the greatest tie digest (the online store's rule); rows with equal
/// digests hold equal values, so either is right.
fn tie_winner(rows: &FeatureRows<'_>, order: &[usize], tied: &[Candidate]) -> Result<Candidate> {
    let first = rows.n_keys + 1;
    let mut best: Option<([u8; 20], Candidate)> = None;
    for c in tied {
        let b = &rows.batches[c.batch as usize];
        let values = order
            .iter()
            .map(|&f| {
                value_at(
                    b.column(first + f).as_ref(),
                    rows.features[f].1,
                    c.row as usize,
                )
            })
            .collect::<Result<Vec<Value>>>()?;
        let d = tie_digest(values.iter().map(Some));
        if best.as_ref().is_none_or(|(bd, _)| d > *bd) {
            best = Some((d, *c));
        }
    }
    Ok(best.expect("at least one tied row").1)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Float64Array, Int64Array, StringArray};
    use arrow::datatypes::{Field, Schema};
    use quiver_core::columnar::timestamp_type;

    use super::*;

    fn features(keys: &[&str], ts: &[i64], vals: &[f64]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("user_id", DataType::Utf8, false),
            Field::new("event_timestamp", timestamp_type(), false),
            Field::new("x", DataType::Float64, true),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(keys.to_vec())),
                Arc::new(TimestampMicrosecondArray::from(ts.to_vec()).with_timezone("UTC")),
                Arc::new(Float64Array::from(vals.to_vec())),
            ],
        )
        .unwrap()
    }

    fn join(
        ekeys: &[Option<&str>],
        et: &[i64],
        batches: &[RecordBatch],
        ttl: Option<i64>,
    ) -> Vec<Option<f64>> {
        let keys: Vec<ArrayRef> = vec![Arc::new(StringArray::from(ekeys.to_vec()))];
        let index = KeyIndex::new(&keys).unwrap();
        let times = TimestampMicrosecondArray::from(et.to_vec());
        let rows = FeatureRows {
            batches,
            n_keys: 1,
            features: vec![("x".into(), ValueType::Double)],
        };
        let out = asof_join(&index, &times, &rows, ttl).unwrap();
        let a = out[0].as_any().downcast_ref::<Float64Array>().unwrap();
        a.iter().collect()
    }

    #[test]
    fn newest_at_or_before_the_row_time_within_ttl() {
        let b = features(
            &["a", "a", "a", "b"],
            &[10, 20, 30, 5],
            &[1.0, 2.0, 3.0, 9.0],
        );
        let got = join(
            &[
                Some("a"),
                Some("a"),
                Some("a"),
                Some("a"),
                Some("b"),
                Some("c"),
                None,
            ],
            &[9, 10, 25, 100, 5, 50, 50],
            std::slice::from_ref(&b),
            None,
        );
        assert_eq!(
            got,
            vec![None, Some(1.0), Some(2.0), Some(3.0), Some(9.0), None, None]
        );
        // TTL 50: at 100 the value from 30 is 70 old.
        let got = join(&[Some("a"), Some("a")], &[80, 100], &[b], Some(50));
        assert_eq!(got, vec![Some(3.0), None]);
    }

    #[test]
    fn ties_resolve_like_the_online_store_whatever_the_batch_order() {
        let b1 = features(&["a"], &[10], &[1.0]);
        let b2 = features(&["a", "a"], &[10, 10], &[7.0, 3.0]);
        // The online store's rule decides among the three tied rows.
        let row = |x: f64| vec![("x".to_owned(), Value::Double(x))];
        let winner = [1.0, 7.0, 3.0]
            .into_iter()
            .reduce(|cur, new| {
                if quiver_core::store::replaces(10, &row(new), 10, &row(cur)) {
                    new
                } else {
                    cur
                }
            })
            .unwrap();
        for batches in [vec![b1.clone(), b2.clone()], vec![b2, b1]] {
            assert_eq!(
                join(&[Some("a")], &[10], &batches, None),
                vec![Some(winner)]
            );
        }
    }

    #[test]
    fn no_feature_rows_gives_nulls_of_the_declared_type() {
        let keys: Vec<ArrayRef> = vec![Arc::new(Int64Array::from(vec![1, 2]))];
        let index = KeyIndex::new(&keys).unwrap();
        let rows = FeatureRows {
            batches: &[],
            n_keys: 1,
            features: vec![("x".into(), ValueType::String)],
        };
        let out = asof_join(
            &index,
            &TimestampMicrosecondArray::from(vec![1, 2]),
            &rows,
            None,
        )
        .unwrap();
        assert_eq!(out[0].data_type(), &DataType::Utf8);
        assert_eq!(out[0].null_count(), 2);
    }

    #[test]
    fn composite_keys_match_on_every_column() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("user_id", DataType::Utf8, false),
            Field::new("shop", DataType::Int64, false),
            Field::new("event_timestamp", timestamp_type(), false),
            Field::new("x", DataType::Float64, true),
        ]));
        let b = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(vec!["a", "a", "b"])),
                Arc::new(Int64Array::from(vec![1, 2, 1])),
                Arc::new(TimestampMicrosecondArray::from(vec![1, 1, 1]).with_timezone("UTC")),
                Arc::new(Float64Array::from(vec![10.0, 20.0, 30.0])),
            ],
        )
        .unwrap();
        let keys: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from(vec!["a", "a", "b", "b"])),
            Arc::new(Int64Array::from(vec![2, 1, 1, 2])),
        ];
        let index = KeyIndex::new(&keys).unwrap();
        let rows = FeatureRows {
            batches: std::slice::from_ref(&b),
            n_keys: 2,
            features: vec![("x".into(), ValueType::Double)],
        };
        let out = asof_join(
            &index,
            &TimestampMicrosecondArray::from(vec![5; 4]),
            &rows,
            None,
        )
        .unwrap();
        let got: Vec<Option<f64>> = out[0]
            .as_any()
            .downcast_ref::<Float64Array>()
            .unwrap()
            .iter()
            .collect();
        assert_eq!(got, vec![Some(20.0), Some(10.0), Some(30.0), None]);
    }
}
