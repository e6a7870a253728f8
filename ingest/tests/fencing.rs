//! Two archivers that both believe they own one partition (an evicted
//! ingest process that has not noticed, and the partition's new owner):
//! only one moves the partition's archive state on; the other stops with
//! FAILED_PRECONDITION, so no offset is archived twice. On local disk and
//! on S3.

use std::path::Path as FsPath;
use std::sync::Arc;

use futures::TryStreamExt;
use object_store::ObjectStore;
use quiver_core::event::Event;
use quiver_core::{ErrorKind, Registry};
use quiver_ingest::archive::{open_store, ArchiveConfig, Archiver};
use quiver_ingest::{Generator, GeneratorConfig, Record};

fn registry() -> Arc<Registry> {
    let path = FsPath::new(env!("CARGO_MANIFEST_DIR")).join("../registry/features.toml");
    Arc::new(Registry::load(&path).unwrap())
}

fn events(n: usize) -> Vec<Event> {
    let cfg = GeneratorConfig {
        seed: 3,
        users: 20,
        products: 5,
        start: 1_764_000_000_000_000,
        time_step: 1_000_000,
    };
    Generator::new(cfg, &registry()).unwrap().batch(n)
}

fn archiver(location: &str, options: &[(String, String)]) -> Archiver {
    let (store, root) = open_store(location, options).unwrap();
    Archiver::new(store, root, registry(), ArchiveConfig::default())
}

async fn add(a: &mut Archiver, evs: &[Event], first_offset: i64) {
    for (i, e) in evs.iter().enumerate() {
        let r = Record {
            source: Arc::from("events:0"),
            offset: first_offset + i as i64,
            event: e.clone(),
        };
        a.add("events", 0, r).await.unwrap();
    }
}

/// Parquet files under `events/` in `store`.
async fn event_files(store: &Arc<dyn ObjectStore>, root: &object_store::path::Path) -> Vec<String> {
    let all: Vec<object_store::ObjectMeta> = store.list(Some(root)).try_collect().await.unwrap();
    let mut out: Vec<String> = all
        .iter()
        .map(|m| m.location.to_string())
        .filter(|n| n.ends_with(".parquet") && !n.contains("/_quiver/"))
        .collect();
    out.sort();
    out
}

async fn two_owners(location: &str, options: &[(String, String)]) {
    let evs = events(200);
    // Both read the partition's state (nothing archived yet) ...
    let mut zombie = archiver(location, options);
    let mut owner = archiver(location, options);
    zombie.open("events", 0).await.unwrap();
    owner.open("events", 0).await.unwrap();
    // ... the new owner archives offsets 0..200 first, then 200..250 (two
    // rolls: the generations the zombie would write next are deleted) ...
    add(&mut owner, &evs, 0).await;
    let s = owner.flush(true).await.unwrap();
    assert_eq!(s.events, 200);
    add(&mut owner, &evs[..50], 200).await;
    owner.flush(true).await.unwrap();
    // ... and the zombie, still holding offsets 0..100, is refused.
    add(&mut zombie, &evs[..100], 0).await;
    let e = zombie.flush(true).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::FailedPrecondition, "{e}");
    assert!(
        e.message().contains("another ingest process") && e.message().contains("events-0"),
        "{e}"
    );
    let (store, root) = open_store(location, options).unwrap();
    let files = event_files(&store, &root).await;
    assert!(
        files
            .iter()
            .all(|f| f.contains("-00000000000000000199.parquet")
                || f.contains("-00000000000000000249.parquet")),
        "only the owner's rolls are visible: {files:?}"
    );
    assert!(!files
        .iter()
        .any(|f| f.contains("-00000000000000000099.parquet")));
    // A restarted process reads the owner's state.
    let mut restarted = archiver(location, options);
    restarted.open("events", 0).await.unwrap();
    assert_eq!(restarted.archived(), vec![(("events".to_owned(), 0), 249)]);
    // Old generations are deleted: at most two state objects remain.
    let states: Vec<object_store::ObjectMeta> = store
        .list(Some(&root.clone().join("_quiver").join("archive")))
        .try_collect()
        .await
        .unwrap();
    assert!(states.len() <= 2, "{states:?}");
}

#[tokio::test]
async fn a_stale_owner_cannot_archive_on_local_disk() {
    let dir = tempfile::tempdir().unwrap();
    two_owners(dir.path().to_str().unwrap(), &[]).await;
}

#[tokio::test]
async fn a_stale_owner_cannot_archive_on_s3() {
    let s3 = quiver_testkit::S3Server::start();
    s3.create_bucket("lake");
    two_owners("s3://lake/offline", &s3.options()).await;
}

/// A state written by the previous layout (one replaced object) is read as
/// generation 0 and moved to the new one on the next write.
#[tokio::test]
async fn the_previous_state_layout_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let legacy = dir.path().join("_quiver/archive/events-0.json");
    std::fs::create_dir_all(legacy.parent().unwrap()).unwrap();
    std::fs::write(&legacy, r#"{"archived_through": 41, "pending": null}"#).unwrap();
    let loc = dir.path().to_str().unwrap();
    let mut a = archiver(loc, &[]);
    a.open("events", 0).await.unwrap();
    assert_eq!(a.archived(), vec![(("events".to_owned(), 0), 41)]);
    // Offsets up to 41 are archived already: dropped as replays.
    add(&mut a, &events(50), 0).await;
    let s = a.flush(true).await.unwrap();
    assert_eq!(s.events, 8);
    assert!(!legacy.exists());
    let mut b = archiver(loc, &[]);
    b.open("events", 0).await.unwrap();
    assert_eq!(b.archived(), vec![(("events".to_owned(), 0), 49)]);
}
