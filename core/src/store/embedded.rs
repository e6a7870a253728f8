//! Embedded online store: one redb file, a table of row key -> row blob
//! (see [`crate::codec::RowBlob`]). Used by the default single-process mode.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use async_trait::async_trait;
use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};

use super::{replaces, Lookup, OnlineStore, StoredRow, TileWrite, WriteOutcome, WriteRow};
use crate::aggregate::{event_time_field, offset_field};
use crate::codec::{
    decode_row, decode_tiles, decode_tiles_where, encode_row, encode_tiles, RowBlob, TileBlob,
    EVENT_IDS_SUFFIX,
};
use crate::error::{Error, Result};
use crate::time::Clock;

const ROWS: TableDefinition<&str, &[u8]> = TableDefinition::new("rows_v1");
const TILES: TableDefinition<&str, &[u8]> = TableDefinition::new("tiles_v1");

/// Opens the database file (again).
type Opener = Box<dyn Fn() -> std::result::Result<Database, redb::DatabaseError> + Send + Sync>;

/// Online store in a local file, see the module docs of [`crate::store`].
///
/// # Faults
/// After an I/O error (a full disk, say) redb refuses every later
/// operation ("Previous I/O error occurred") until the database is opened
/// again. The store notices such errors, reports itself broken through
/// [`OnlineStore::ping`] (so `/ready`, gRPC health and `quiver_ready` turn
/// not-ready and ingest retries), and reopens the file on a later use
/// (at most every second, off the async threads; redb repairs the file
/// first) once in-flight operations have let go of it: the store heals
/// itself when the fault is gone (space freed), with everything committed
/// before it intact.
pub struct EmbeddedStore {
    handle: Arc<Handle>,
    clock: Arc<dyn Clock>,
}

/// The open database and what it takes to reopen it.
struct Handle {
    /// The database and its epoch (counts reopens).
    db: RwLock<Option<(Arc<Database>, u64)>>,
    open: Opener,
    broken: AtomicBool,
    /// A reopen is running (one at a time, on the blocking pool).
    reopening: AtomicBool,
    last_attempt: Mutex<Option<std::time::Instant>>,
}

/// Shortest pause between two attempts to reopen a broken store (each
/// repairs the whole file).
const REOPEN_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

fn recovering(why: &str) -> Error {
    Error::unavailable(format!(
        "embedded online store: recovering from an I/O error (is the disk full?): {why}"
    ))
}

impl Handle {
    /// Reopens the file if it is broken (blocking: run on the blocking
    /// pool). Only one caller at a time gets here (`reopening`).
    fn reopen(&self) -> Result<(Arc<Database>, u64)> {
        let r = self.try_reopen();
        self.reopening.store(false, Ordering::Release);
        r
    }

    fn try_reopen(&self) -> Result<(Arc<Database>, u64)> {
        {
            let mut last = self.last_attempt.lock().unwrap_or_else(|e| e.into_inner());
            if last.is_some_and(|t| t.elapsed() < REOPEN_EVERY) {
                return Err(recovering("retrying at most every second"));
            }
            *last = Some(std::time::Instant::now());
        }
        let mut slot = self.db.write().unwrap_or_else(|e| e.into_inner());
        if !self.broken.load(Ordering::Acquire) {
            if let Some((db, epoch)) = slot.as_ref() {
                return Ok((db.clone(), *epoch));
            }
        }
        let mut epoch = 0;
        if let Some((old, e)) = slot.take() {
            epoch = e;
            // redb holds a lock on the file: the old handle must be gone
            // before the file can be opened again.
            if let Err(still_used) = Arc::try_unwrap(old) {
                *slot = Some((still_used, e));
                return Err(recovering("operations in flight still hold the file"));
            }
        }
        let db = (self.open)().map_err(|e| recovering(&format!("cannot reopen the file: {e}")))?;
        init(&db)
            .map_err(|e| recovering(&format!("reopened, but cannot write yet: {}", e.message())))?;
        let db = Arc::new(db);
        *slot = Some((db.clone(), epoch + 1));
        self.broken.store(false, Ordering::Release);
        tracing::info!("embedded online store reopened after an I/O error");
        Ok((db, epoch + 1))
    }
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore").finish_non_exhaustive()
    }
}

fn db_error(e: impl std::fmt::Display) -> Error {
    Error::unavailable(format!("embedded online store: {e}"))
}

/// Whether an error means redb must be reopened (an I/O error, or the
/// "previous I/O error" it reports for every operation after one).
fn is_io_fault(e: &Error) -> bool {
    e.message().contains("I/O error")
}

/// Creates the tables if missing.
fn init(db: &Database) -> Result<()> {
    let tx = db.begin_write().map_err(db_error)?;
    tx.open_table(ROWS).map_err(db_error)?;
    tx.open_table(TILES).map_err(db_error)?;
    tx.commit().map_err(db_error)
}

impl EmbeddedStore {
    /// Opens or creates the store file at `path` (parent directories too).
    /// Fails if another process has it open.
    pub fn open(path: &Path, clock: Arc<dyn Clock>) -> Result<EmbeddedStore> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::invalid(format!("cannot create {}: {e}", dir.display())))?;
        }
        let owned = path.to_path_buf();
        EmbeddedStore::open_with(Box::new(move || Database::create(&owned)), clock).map_err(|e| {
            let hint = if e.message().contains("already open") {
                " (is another quiver process using it?)"
            } else if e.message().contains("ermission denied") || e.message().contains("Read-only")
            {
                " (the directory or file is not writable by this process)"
            } else {
                ""
            };
            let why = e.message();
            let why = why.strip_prefix("embedded online store: ").unwrap_or(why);
            Error::invalid(format!(
                "cannot open embedded online store {}: {why}{hint}",
                path.display()
            ))
        })
    }

    /// A store over the database `open` returns, called again to reopen it
    /// after an I/O fault (for custom redb storage backends, and tests that
    /// inject faults).
    pub fn open_with(open: Opener, clock: Arc<dyn Clock>) -> Result<EmbeddedStore> {
        let db = open().map_err(db_error)?;
        init(&db)?;
        Ok(EmbeddedStore {
            handle: Arc::new(Handle {
                db: RwLock::new(Some((Arc::new(db), 0))),
                open,
                broken: AtomicBool::new(false),
                reopening: AtomicBool::new(false),
                last_attempt: Mutex::new(None),
            }),
            clock,
        })
    }

    /// The open database and its epoch; after an I/O fault, reopened first
    /// (on the blocking pool, one attempt at a time, at most every
    /// [`REOPEN_EVERY`]; other callers fail fast meanwhile).
    async fn db(&self) -> Result<(Arc<Database>, u64)> {
        let h = &self.handle;
        if !h.broken.load(Ordering::Acquire) {
            if let Some((db, epoch)) = h.db.read().unwrap_or_else(|e| e.into_inner()).as_ref() {
                return Ok((db.clone(), *epoch));
            }
        }
        if h.reopening.swap(true, Ordering::AcqRel) {
            return Err(recovering("a reopen is in progress"));
        }
        let h = h.clone();
        tokio::task::spawn_blocking(move || h.reopen())
            .await
            .map_err(|e| Error::internal(format!("reopen task failed: {e}")))?
    }

    /// Marks the store broken when `r` is an I/O fault of the database of
    /// `epoch` (a late error of a handle already replaced is ignored).
    fn watch<T>(&self, epoch: u64, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            let current = self
                .handle
                .db
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .map(|(_, ep)| *ep);
            if is_io_fault(e)
                && current == Some(epoch)
                && !self.handle.broken.swap(true, Ordering::AcqRel)
            {
                tracing::error!(error = %e, "embedded online store hit an I/O error; not ready until it can be reopened");
            }
        }
        r
    }

    /// Deletes expired rows; returns how many. The default mode runs it
    /// periodically so the file does not grow without bound.
    pub async fn sweep_expired(&self) -> Result<u64> {
        let (db, epoch) = self.db().await?;
        let now = self.clock.now_micros();
        let r = tokio::task::spawn_blocking(move || -> Result<u64> {
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
                        !decode_tiles_where(blob, |_| false)
                            .is_ok_and(|t| t.expire_at > 0 && t.expire_at <= now)
                    })
                    .map_err(db_error)?;
                before - table.len().map_err(db_error)? + tiles_before
                    - tiles.len().map_err(db_error)?
            };
            tx.commit().map_err(db_error)?;
            Ok(removed)
        })
        .await
        .map_err(|e| Error::internal(format!("sweep task failed: {e}")))?;
        self.watch(epoch, r)
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
        let (db, epoch) = self.db().await?;
        self.watch(epoch, read_rows(&db, lookups, now))
    }

    async fn write(&self, rows: &[WriteRow]) -> Result<WriteOutcome> {
        if rows.is_empty() {
            return Ok(WriteOutcome::default());
        }
        let (db, epoch) = self.db().await?;
        let r = self.write_rows(db, rows).await;
        self.watch(epoch, r)
    }

    async fn write_tiles(&self, writes: &[TileWrite]) -> Result<Vec<bool>> {
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        let (db, epoch) = self.db().await?;
        let r = self.write_tile_rows(db, writes).await;
        self.watch(epoch, r)
    }

    /// Ready unless an I/O fault broke the store: then this reopens the
    /// file (with a durable write) and fails until that works.
    async fn ping(&self) -> Result<()> {
        let (db, epoch) = self.db().await?;
        self.watch(epoch, db.begin_read().map(drop).map_err(db_error))
    }
}

fn read_rows(db: &Database, lookups: &[Lookup<'_>], now: i64) -> Result<Vec<Option<StoredRow>>> {
    let tx = db.begin_read().map_err(db_error)?;
    let table = tx.open_table(ROWS).map_err(db_error)?;
    let tiles = tx.open_table(TILES).map_err(db_error)?;
    lookups
        .iter()
        .map(|l| {
            if l.raw {
                // An event-id row is the `#` fields of its row's blob.
                let (key, ids) = match l.key.strip_suffix(EVENT_IDS_SUFFIX) {
                    Some(row) => (row, true),
                    None => (l.key, false),
                };
                let Some(guard) = tiles.get(key).map_err(db_error)? else {
                    return Ok(None);
                };
                let mut t = decode_tiles_where(guard.value(), |n| n.starts_with(ID_PREFIX) == ids)?;
                if ids {
                    for (n, _) in &mut t.fields {
                        n.remove(0);
                    }
                }
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

impl EmbeddedStore {
    async fn write_rows(&self, db: Arc<Database>, rows: &[WriteRow]) -> Result<WriteOutcome> {
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

    async fn write_tile_rows(&self, db: Arc<Database>, writes: &[TileWrite]) -> Result<Vec<bool>> {
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
    // The event-id row lives in the row's own blob (one B-tree entry per
    // row), under `#`-prefixed names that reads of the row skip.
    if !w.ids_delete.is_empty() {
        let gone: std::collections::HashSet<String> = w
            .ids_delete
            .iter()
            .map(|n| format!("{ID_PREFIX}{n}"))
            .collect();
        t.fields.retain(|(n, _)| !gone.contains(n));
    }
    for (n, v) in w.ids {
        set(t, format!("{ID_PREFIX}{n}"), v);
    }
    t.expire_at = t.expire_at.max(w.expire_at);
    true
}

/// Prefix of a row's event-id fields inside its blob (see
/// [`crate::codec::event_ids_key`]: a lookup of that key reads them).
const ID_PREFIX: char = '#';
