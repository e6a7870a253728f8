//! The embedded store after an I/O fault (a full disk): it reports itself
//! not ready, keeps what was committed, and heals by itself once the fault
//! is gone. The fault is injected below the database (a redb storage
//! backend over the real file whose writes fail on demand, as they do with
//! ENOSPC), so the test needs no mount privileges.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use quiver_core::store::{EmbeddedStore, Lookup, OnlineStore, WriteRow};
use quiver_core::{ErrorKind, SystemClock, Value};
use redb::backends::FileBackend;
use redb::StorageBackend;

/// The file, with writes that fail while `full` is set.
#[derive(Debug)]
struct FillableDisk {
    file: FileBackend,
    full: Arc<AtomicBool>,
}

impl FillableDisk {
    fn check(&self) -> Result<(), io::Error> {
        if self.full.load(Ordering::SeqCst) {
            Err(io::Error::new(
                io::ErrorKind::StorageFull,
                "No space left on device",
            ))
        } else {
            Ok(())
        }
    }
}

impl StorageBackend for FillableDisk {
    fn len(&self) -> Result<u64, io::Error> {
        self.file.len()
    }
    fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, io::Error> {
        self.file.read(offset, len)
    }
    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        self.check()?;
        self.file.set_len(len)
    }
    fn sync_data(&self, eventual: bool) -> Result<(), io::Error> {
        self.check()?;
        self.file.sync_data(eventual)
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        self.check()?;
        self.file.write(offset, data)
    }
}

fn row(key: &str, v: i64) -> WriteRow {
    WriteRow {
        key: key.into(),
        event_ts: v,
        expire_at: None,
        features: vec![("v".into(), Value::Int64(v))],
    }
}

async fn value(store: &EmbeddedStore, key: &str) -> Option<Value> {
    let feats = ["v"];
    store
        .read(&[Lookup::row(key, &feats)])
        .await
        .unwrap()
        .pop()
        .unwrap()
        .and_then(|r| r.values[0].clone())
}

#[tokio::test]
async fn a_full_disk_makes_the_store_unready_and_it_heals_when_space_returns() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("online.redb");
    let full = Arc::new(AtomicBool::new(false));
    let disk = full.clone();
    let store = EmbeddedStore::open_with(
        Box::new(move || {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|e| redb::DatabaseError::Storage(redb::StorageError::Io(e)))?;
            redb::Database::builder().create_with_backend(FillableDisk {
                file: FileBackend::new(file)?,
                full: disk.clone(),
            })
        }),
        Arc::new(SystemClock),
    )
    .unwrap();
    store.write(&[row("a", 1)]).await.unwrap();
    store.ping().await.unwrap();

    full.store(true, Ordering::SeqCst);
    let e = store.write(&[row("b", 2)]).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    // Not ready while the disk is full (readiness follows the store).
    for _ in 0..3 {
        let e = store.ping().await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    }

    // Space is back: the store reopens by itself; what was committed
    // before the fault is there, and writes work again.
    full.store(false, Ordering::SeqCst);
    // (Reopen attempts are at most a second apart.)
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while let Err(e) = store.ping().await {
        assert!(std::time::Instant::now() < deadline, "never recovered: {e}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(value(&store, "a").await, Some(Value::Int64(1)));
    assert_eq!(value(&store, "b").await, None);
    store.write(&[row("b", 2)]).await.unwrap();
    assert_eq!(value(&store, "b").await, Some(Value::Int64(2)));
}

#[tokio::test]
async fn opening_a_store_in_use_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("online.redb");
    let _first = EmbeddedStore::open(&path, Arc::new(SystemClock)).unwrap();
    let e = EmbeddedStore::open(&path, Arc::new(SystemClock)).unwrap_err();
    assert!(e.message().contains("another quiver process"), "{e}");
}
