//! Embedded online store: one redb file, a table of row key -> row blob
//! (see [`crate::codec::RowBlob`]). Used by the default single-process mode.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};

use super::{Lookup, OnlineStore, StoredRow, WriteOutcome, WriteRow};
use crate::codec::{decode_row, encode_row, RowBlob};
use crate::error::{Error, Result};
use crate::time::Clock;

const ROWS: TableDefinition<&str, &[u8]> = TableDefinition::new("rows_v1");

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
                before - table.len().map_err(db_error)?
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
        lookups
            .iter()
            .map(|l| {
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
        tokio::task::spawn_blocking(move || -> Result<WriteOutcome> {
            let tx = db.begin_write().map_err(db_error)?;
            let mut out = WriteOutcome::default();
            {
                let mut table = tx.open_table(ROWS).map_err(db_error)?;
                for r in rows {
                    let current_ts = match table.get(r.key.as_str()).map_err(db_error)? {
                        Some(g) => Some(decode_row(g.value())?.event_ts),
                        None => None,
                    };
                    if current_ts.is_some_and(|c| c > r.event_ts) {
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

    async fn ping(&self) -> Result<()> {
        self.db.begin_read().map(drop).map_err(db_error)
    }
}
