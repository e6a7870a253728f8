//! The registry's windowed aggregations computed offline from the archived
//! events, as of any time, with exactly the online semantics.
//!
//! Online, `quiver ingest` folds each (tile, source partition)'s events into
//! a partial state in offset order, and a read merges the window's states
//! in (tile, source) order (`quiver_core::aggregate`). This module does the
//! same from the archive (`_source`, `_offset` are archived with every
//! event), so float sums and ties come out bit for bit equal. As of time
//! `t` it counts only events with `event_time <= t`. An event id counts
//! once per (entity, tile, source), the first offset winning, as online
//! (a retried `PushEvents` archives the event twice).
//!
//! An entity with no event of the view in its longest window at `t` has no
//! values (nulls), as online, where such a tile row has expired
//! (`NOT_FOUND`).

use std::collections::{HashMap, HashSet};

use arrow::array::{
    new_null_array, Array, ArrayRef, AsArray, Int64Array, RecordBatch, TimestampMicrosecondArray,
};
use arrow::datatypes::DataType;
use datafusion::logical_expr::{col, ident, lit, Expr};
use datafusion::prelude::SessionContext;
use quiver_core::aggregate::{event_id_hash, tile_of, window_first_tile, window_start, AggState};
use quiver_core::columnar::{arrow_type, timestamp_type, value_array, value_at};
use quiver_core::par::par_map;
use quiver_core::registry::{agg_output_type, Aggregation, FeatureView, ViewSource};
use quiver_core::time::Micros;
use quiver_core::{Error, Result, Value};

use crate::offline::{df_error, ts_lit, typed, EVENTS_TABLE};
use crate::pit::{run_starts, KeyIndex};

/// One archived event of the view, in online merge order.
#[derive(Debug, Clone, Copy)]
struct Ev {
    key: u32,
    tile: i64,
    source: u32,
    offset: i64,
    ts: Micros,
    /// [`event_id_hash`] of the event id.
    id: u64,
    event_type: u16,
    batch: u32,
    row: u32,
}

/// Values of the aggregations `wanted` (indices into the view's
/// aggregations) of an aggregation view for every entity row, as of the
/// row's time: one array per wanted aggregation.
pub async fn aggregations_asof(
    ctx: &SessionContext,
    view: &FeatureView,
    index: &KeyIndex,
    times: &TimestampMicrosecondArray,
    wanted: &[usize],
) -> Result<Vec<ArrayRef>> {
    let ViewSource::Aggregations { tile, aggregations } = &view.source else {
        return Err(Error::internal(format!(
            "{:?} is not an aggregation view",
            view.name
        )));
    };
    let tile = *tile;
    let longest = aggregations.iter().map(|a| a.window).max().unwrap_or(tile);
    let mut types: Vec<&str> = aggregations
        .iter()
        .flat_map(|a| a.event_types.iter().map(String::as_str))
        .collect();
    types.sort_unstable();
    types.dedup();
    let mut attrs: Vec<&str> = wanted
        .iter()
        .filter_map(|&i| aggregations[i].attribute.as_deref())
        .collect();
    attrs.sort_unstable();
    attrs.dedup();

    let (Some(min_t), Some(max_t)) = (times.iter().flatten().min(), times.iter().flatten().max())
    else {
        return Ok(null_columns(aggregations, wanted, times.len()));
    };
    let mut select: Vec<Expr> = view
        .join_keys
        .iter()
        .zip(&view.key_types)
        .map(|(k, t)| typed(k, arrow_type(*t)))
        .collect();
    select.extend([
        typed("event_type", DataType::Utf8),
        typed("event_id", DataType::Utf8),
        typed("event_time", timestamp_type()),
        typed("_source", DataType::Utf8),
        typed("_offset", DataType::Int64),
    ]);
    // A join key aggregated as an attribute is already selected.
    select.extend(
        attrs
            .iter()
            .filter(|a| !view.join_keys.iter().any(|k| k == *a))
            .map(|a| {
                let ty = aggregations
                    .iter()
                    .find(|x| x.attribute.as_deref() == Some(*a))
                    .and_then(|x| x.attribute_type)
                    .expect("attributes come from aggregations");
                typed(a, arrow_type(ty))
            }),
    );
    let at = |what: &str| format!("aggregations of {:?}: {what}", view.name);
    let started = std::time::Instant::now();
    let batches: Vec<RecordBatch> = ctx
        .table(EVENTS_TABLE)
        .await
        .map_err(|e| df_error(&at("events"), e))?
        .filter(
            col("event_type")
                .in_list(types.iter().map(|t| lit(*t)).collect(), false)
                // Whole tiles: event-id de-duplication below needs every
                // copy in a tile, the as-of filter comes after it.
                .and(ident("event_time").lt(ts_lit(
                    tile_of(max_t, tile).saturating_add(1).saturating_mul(tile),
                )))
                .and(ident("event_time").gt_eq(ts_lit(window_start(min_t, tile, longest)))),
        )
        .and_then(|df| df.select(select))
        .map_err(|e| df_error(&at("query"), e))?
        .collect()
        .await
        .map_err(|e| df_error(&at("reading events"), e))?;

    let read = started.elapsed();
    let nk = view.join_keys.len();
    let mut source_ids: HashMap<String, u32> = HashMap::new();
    let mut evs: Vec<Ev> = Vec::new();
    for (bi, b) in batches.iter().enumerate() {
        let encoded = index.encode(&b.columns()[..nk])?;
        let etype = b.column(nk).as_string::<i32>();
        let event_id = b.column(nk + 1).as_string::<i32>();
        let time = b
            .column(nk + 2)
            .as_primitive::<arrow::datatypes::TimestampMicrosecondType>();
        let source = b.column(nk + 3).as_string::<i32>();
        let offset = b
            .column(nk + 4)
            .as_any()
            .downcast_ref::<Int64Array>()
            .ok_or_else(|| Error::internal("archive _offset is not int64"))?;
        for r in 0..b.num_rows() {
            let Some(key) = index.id(&encoded, r) else {
                continue;
            };
            let name = source.value(r);
            let src = match source_ids.get(name) {
                Some(id) => *id,
                None => {
                    let id = source_ids.len() as u32;
                    source_ids.insert(name.to_owned(), id);
                    id
                }
            };
            let ts = time.value(r);
            evs.push(Ev {
                key,
                tile: tile_of(ts, tile),
                source: src,
                offset: offset.value(r),
                ts,
                id: event_id_hash(event_id.value(r)),
                event_type: types.iter().position(|t| *t == etype.value(r)).unwrap_or(0) as u16,
                batch: bi as u32,
                row: r as u32,
            });
        }
    }
    // Online merges sources in name order: rank the ids by name.
    let mut names: Vec<(&String, &u32)> = source_ids.iter().collect();
    names.sort();
    let mut rank = vec![0u32; names.len()];
    for (r, (_, id)) in names.iter().enumerate() {
        rank[**id as usize] = r as u32;
    }
    for e in &mut evs {
        e.source = rank[e.source as usize];
    }
    evs.sort_unstable_by_key(|e| (e.key, e.tile, e.source, e.offset));
    // An offset archived twice (two processes that both rolled it, which
    // the archive's fencing prevents) counts once, as online, where tiles
    // hold each offset once: its copies are the same event, so they sort
    // next to each other.
    evs.dedup_by_key(|e| (e.key, e.source, e.offset));
    // An event sent twice (same id, later offset) counts once per (entity,
    // tile, source), as online, where each tile keeps the ids it counted.
    let mut group = None;
    let mut seen: HashSet<u64> = HashSet::new();
    evs.retain(|e| {
        if group != Some((e.key, e.tile, e.source)) {
            group = Some((e.key, e.tile, e.source));
            seen.clear();
        }
        seen.insert(e.id)
    });
    let starts = run_starts(index.len(), evs.iter().map(|e| e.key));

    // Where each wanted aggregation's attribute sits in the batches.
    let attr_col = |a: &Aggregation| -> Option<usize> {
        let name = a.attribute.as_deref()?;
        if let Some(k) = view.join_keys.iter().position(|k| k == name) {
            return Some(k);
        }
        let extra = attrs
            .iter()
            .filter(|x| !view.join_keys.iter().any(|k| k == *x))
            .position(|x| *x == name)?;
        Some(nk + 5 + extra)
    };
    let plans: Vec<(&Aggregation, Option<usize>, Vec<u16>)> = wanted
        .iter()
        .map(|&i| {
            let a = &aggregations[i];
            let ts: Vec<u16> = a
                .event_types
                .iter()
                .filter_map(|t| types.iter().position(|x| x == t).map(|p| p as u16))
                .collect();
            (a, attr_col(a), ts)
        })
        .collect();

    let row_values = |range: std::ops::Range<usize>| -> Result<Vec<Vec<Value>>> {
        let mut out: Vec<Vec<Value>> = vec![Vec::with_capacity(range.len()); wanted.len()];
        for i in range {
            let (Some(key), false) = (index.row_ids[i], times.is_null(i)) else {
                out.iter_mut().for_each(|o| o.push(Value::Null));
                continue;
            };
            let t = times.value(i);
            let run = &evs[starts[key as usize]..starts[key as usize + 1]];
            let first_kept = window_first_tile(t, tile, longest);
            let last = tile_of(t, tile);
            let exists = run
                .iter()
                .any(|e| e.tile >= first_kept && e.tile <= last && e.ts <= t);
            if !exists {
                out.iter_mut().for_each(|o| o.push(Value::Null));
                continue;
            }
            for (o, (a, col, types)) in out.iter_mut().zip(&plans) {
                let first = window_first_tile(t, tile, a.window);
                let lo = run.partition_point(|e| e.tile < first);
                let mut acc = AggState::new(a.function);
                let mut group: Option<(i64, u32, AggState)> = None;
                for e in run[lo..].iter().take_while(|e| e.tile <= last) {
                    if e.ts > t || !types.contains(&e.event_type) {
                        continue;
                    }
                    if group
                        .as_ref()
                        .is_some_and(|g| (g.0, g.1) != (e.tile, e.source))
                    {
                        let (_, _, s) = group.take().expect("checked");
                        acc.merge(&s)?;
                    }
                    let g =
                        group.get_or_insert_with(|| (e.tile, e.source, AggState::new(a.function)));
                    let b = &batches[e.batch as usize];
                    let id = b.column(nk + 1).as_string::<i32>().value(e.row as usize);
                    let value = match (col, a.attribute_type) {
                        (Some(c), Some(ty)) => {
                            Some(value_at(b.column(*c).as_ref(), ty, e.row as usize)?)
                        }
                        _ => None,
                    };
                    g.2.update(e.ts, id, value.as_ref());
                }
                if let Some((_, _, s)) = group {
                    acc.merge(&s)?;
                }
                o.push(acc.finish());
            }
        }
        Ok(out)
    };
    // Entity rows are independent: fold chunks of them on all cores.
    let n = times.len();
    const CHUNK: usize = 4096;
    let chunks: Vec<std::ops::Range<usize>> = (0..n)
        .step_by(CHUNK)
        .map(|lo| lo..(lo + CHUNK).min(n))
        .collect();
    let parts = par_map(chunks, 2, row_values);
    let mut out: Vec<Vec<Value>> = vec![Vec::with_capacity(n); wanted.len()];
    for part in parts {
        for (o, p) in out.iter_mut().zip(part?) {
            o.extend(p);
        }
    }
    tracing::debug!(
        view = %view.name,
        events = evs.len(),
        read_ms = read.as_millis() as u64,
        compute_ms = (started.elapsed() - read).as_millis() as u64,
        "aggregations as of entity rows"
    );
    Ok(plans
        .iter()
        .zip(out)
        .map(|((a, _, _), vals)| {
            let refs: Vec<Option<&Value>> = vals.iter().map(Some).collect();
            value_array(agg_output_type(a), &refs)
        })
        .collect())
}

fn null_columns(aggregations: &[Aggregation], wanted: &[usize], n: usize) -> Vec<ArrayRef> {
    wanted
        .iter()
        .map(|&i| new_null_array(&arrow_type(agg_output_type(&aggregations[i])), n))
        .collect()
}
