//! Embedded online store: one redb file, a table of row key -> row blob
//! (see [`crate::codec::RowBlob`]). Used by the default single-process mode.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};

use super::{replaces, Lookup, OnlineStore, StoredRow, TileWrite, WriteOutcome, WriteRow};
use crate::aggregate::{event_time_field, offset_field};
use crate::codec::{decode_row, decode_tiles, encode_row, encode_tiles, RowBlob, TileBlob};
use crate::error::{Error, Result};
use crate::time::Clock;

const ROWS: TableDefinition<&str, &[u8]> = TableDefinition::new("rows_v1");
const TILES: TableDefinition<&str, &[u8]> = TableDefinition::new("tiles_v1");

/// Online store in a local file, see the module docs of [`crate::store`].
pub struct EmbeddedStore {
    db: Arc<Database>,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore").finish_non_exhaustive()
    }
}

fn db_error(e: impl std::fmt::Display) -> Error {
    Error::unavailable(format!("embedded online store: {e}"))
}

impl EmbeddedStore {
    /// Opens or creates the store file at `path` (parent directories too).
    /// Fails if another process has it open.
    pub fn open(path: &Path, clock: Arc<dyn Clock>) -> Result<EmbeddedStore> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::invalid(format!("cannot create {}: {e}", dir.display())))?;
        }
        let db = Database::create(path).map_err(|e| {
            Error::invalid(format!(
                "cannot open embedded online store {}: {e} (is another quiver process using it?)",
                path.display()
            ))
        })?;
        let tx = db.begin_write().map_err(db_error)?;
        tx.open_table(ROWS).map_err(db_error)?;
        tx.open_table(TILES).map_err(db_error)?;
        tx.commit().map_err(db_error)?;
        Ok(EmbeddedStore {
            db: Arc::new(db),
            clock,
        })
    }

    /// Deletes expired rows; returns how many. The default mode runs it
    /// periodically so the file does not grow without bound.
    pub async fn sweep_expired(&self) -> Result<u64> {
        let db = self.db.clone();
        let now = self.clock.now_micros();
        tokio::task::spawn_blocking(move || -> Result<u64> {
            let tx = db.begin_write().map_err(db_error)?;
            let removed = {
                let mut table = tx.open_table(ROWS).map_err(db_error)?;
                let before = table.len().map_err(db_error)?;
                table
                    .retain(|_, blob| {
                        !decode_row(blob).is_ok_and(|r| r.expire_at.is_some_and(|e| e <= now))
                    })
                    .map_err(db_error)?;
                let mut tiles = tx.open_table(TILES).map_err(db_error)?;
                let tiles_before = tiles.len().map_err(db_error)?;
                tiles
                    .retain(|_, blob| {
                        !decode_tiles(blob).is_ok_and(|t| t.expire_at > 0 && t.expire_at <= now)
                    })
                    .map_err(db_error)?;
                before - table.len().map_err(db_error)? + tiles_before
                    - tiles.len().map_err(db_error)?
            };
            tx.commit().map_err(db_error)?;
            Ok(removed)
        })
        .await
        .map_err(|e| Error::internal(format!("sweep task failed: {e}")))?
    }
}

#[async_trait]
impl OnlineStore for EmbeddedStore {
    fn backend(&self) -> &'static str {
        "embedded"
    }

    async fn read(&self, lookups: &[Lookup<'_>]) -> Result<Vec<Option<StoredRow>>> {
        // Reads are MVCC snapshots that never wait for writers; a few page
        // lookups are cheaper inline than a hop to the blocking pool.
        let now = self.clock.now_micros();
        let tx = self.db.begin_read().map_err(db_error)?;
        let table = tx.open_table(ROWS).map_err(db_error)?;
        let tiles = tx.open_table(TILES).map_err(db_error)?;
        lookups
            .iter()
            .map(|l| {
                if l.raw {
                    let Some(guard) = tiles.get(l.key).map_err(db_error)? else {
                        return Ok(None);
                    };
                    let t = decode_tiles(guard.value())?;
                    if t.expire_at > 0 && t.expire_at <= now {
                        return Ok(None);
                    }
                    let raw: Vec<(String, Vec<u8>)> = if l.features.is_empty() {
                        t.fields
                    } else {
                        t.fields
                            .into_iter()
                            .filter(|(n, _)| l.features.contains(&n.as_str()))
                            .collect()
                    };
                    return Ok((!raw.is_empty()).then(|| StoredRow {
                        raw,
                        ..StoredRow::default()
                    }));
                }
                let Some(guard) = table.get(l.key).map_err(db_error)? else {
                    return Ok(None);
                };
                let row = decode_row(guard.value())?;
                if row.expire_at.is_some_and(|e| e <= now) {
                    return Ok(None);
                }
                let values = l
                    .features
                    .iter()
                    .map(|f| {
                        row.features
                            .iter()
                            .find(|(n, _)| n == f)
                            .map(|(_, v)| v.clone())
                    })
                    .collect();
                Ok(Some(StoredRow {
                    event_ts: row.event_ts,
                    values,
                    raw: Vec::new(),
                }))
            })
            .collect()
    }

    async fn write(&self, rows: &[WriteRow]) -> Result<WriteOutcome> {
        if rows.is_empty() {
            return Ok(WriteOutcome::default());
        }
        let db = self.db.clone();
        let rows = rows.to_vec();
        let now = self.clock.now_micros();
        tokio::task::spawn_blocking(move || -> Result<WriteOutcome> {
            let tx = db.begin_write().map_err(db_error)?;
            let mut out = WriteOutcome::default();
            {
                let mut table = tx.open_table(ROWS).map_err(db_error)?;
                for r in rows {
                    let current = match table.get(r.key.as_str()).map_err(db_error)? {
                        Some(g) => Some(decode_row(g.value())?),
                        None => None,
                    };
                    // An expired row is absent, as in Redis.
                    let current = current.filter(|c| c.expire_at.is_none_or(|e| e > now));
                    if current.is_some_and(|c| {
                        !replaces(r.event_ts, &r.features, c.event_ts, &c.features)
                    }) {
                        out.stale += 1;
                        continue;
                    }
                    let blob = encode_row(&RowBlob {
                        event_ts: r.event_ts,
                        expire_at: r.expire_at,
                        features: r.features,
                    });
                    table
                        .insert(r.key.as_str(), blob.as_slice())
                        .map_err(db_error)?;
                    out.written += 1;
                }
            }
            tx.commit().map_err(db_error)?;
            Ok(out)
        })
        .await
        .map_err(|e| Error::internal(format!("write task failed: {e}")))?
    }

    async fn write_tiles(&self, writes: &[TileWrite]) -> Result<Vec<bool>> {
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        let db = self.db.clone();
        let now = self.clock.now_micros();
        let writes = writes.to_vec();
        tokio::task::spawn_blocking(move || -> Result<Vec<bool>> {
            let tx = db.begin_write().map_err(db_error)?;
            let mut out = Vec::with_capacity(writes.len());
            {
                let mut table = tx.open_table(TILES).map_err(db_error)?;
                for w in writes {
                    let mut t = match table.get(w.key.as_str()).map_err(db_error)? {
                        Some(g) => decode_tiles(g.value())?,
                        None => TileBlob::default(),
                    };
                    if t.expire_at > 0 && t.expire_at <= now {
                        t = TileBlob::default();
                    }
                    let key = w.key.clone();
                    let applied = apply_tile_write(&mut t, w);
                    if applied {
                        table
                            .insert(key.as_str(), encode_tiles(&t).as_slice())
                            .map_err(db_error)?;
                    }
                    out.push(applied);
                }
            }
            tx.commit().map_err(db_error)?;
            Ok(out)
        })
        .await
        .map_err(|e| Error::internal(format!("write task failed: {e}")))?
    }

    async fn ping(&self) -> Result<()> {
        self.db.begin_read().map(drop).map_err(db_error)
    }
}

/// The tile-write contract of [`OnlineStore::write_tiles`] on an in-memory
/// row; returns whether the write applied.
fn apply_tile_write(t: &mut TileBlob, w: TileWrite) -> bool {
    let parse = |b: &[u8]| {
        std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse::<i64>().ok())
    };
    let of = offset_field(&w.source);
    let tf = event_time_field(&w.source);
    let get = |t: &TileBlob, name: &str| {
        t.fields
            .binary_search_by(|(n, _)| n.as_str().cmp(name))
            .ok()
            .and_then(|i| parse(&t.fields[i].1))
    };
    if get(t, &of).is_some_and(|o| o >= w.offset) {
        return false;
    }
    let set = |t: &mut TileBlob, name: String, v: Vec<u8>| match t
        .fields
        .binary_search_by(|(n, _)| n.as_str().cmp(&name))
    {
        Ok(i) => t.fields[i].1 = v,
        Err(i) => t.fields.insert(i, (name, v)),
    };
    t.fields.retain(|(n, _)| !w.delete.contains(n));
    if get(t, &tf).is_none_or(|ts| ts < w.event_ts) {
        set(t, tf, w.event_ts.to_string().into_bytes());
    }
    set(t, of, w.offset.to_string().into_bytes());
    for (n, v) in w.fields {
        set(t, n, v);
    }
    t.expire_at = t.expire_at.max(w.expire_at);
    true
}
