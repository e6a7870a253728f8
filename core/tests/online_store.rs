//! One behaviour suite for every online store backend: the same checks run
//! against a real `redis-server` (started on an ephemeral port) and the
//! embedded store.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use quiver_core::codec::{entity_key, event_ids_key, row_key};
use quiver_core::store::{
    replaces, EmbeddedStore, Lookup, RedisClusterStore, RedisConfig, RedisStore, RedisTls,
    TileWrite, WriteRow,
};
use quiver_core::time::system_time_to_micros;
use quiver_core::{ErrorKind, OnlineStore, SystemClock, Value};
use quiver_testkit::{Pki, RedisCluster, RedisServer};

const HOUR: i64 = 3_600_000_000;

fn now() -> i64 {
    system_time_to_micros(SystemTime::now())
}

fn key(user: &str) -> String {
    row_key(
        &entity_key(&[("user_id", &Value::String(user.into()))]).unwrap(),
        "profile",
    )
}

fn row(user: &str, ts: i64, age: i64) -> WriteRow {
    WriteRow {
        key: key(user),
        event_ts: ts,
        expire_at: None,
        features: vec![
            ("age".into(), Value::Int64(age)),
            ("country".into(), Value::String("NL".into())),
            ("nick".into(), Value::Null),
            ("emb".into(), Value::FloatList(vec![0.5, -1.0, 2.25])),
        ],
    }
}

async fn read_one(
    store: &dyn OnlineStore,
    user: &str,
    features: &[&str],
) -> Option<(i64, Vec<Option<Value>>)> {
    let k = key(user);
    let mut rows = store.read(&[Lookup::row(&k, features)]).await.unwrap();
    rows.pop().unwrap().map(|r| (r.event_ts, r.values))
}

async fn round_trips_typed_values(store: &dyn OnlineStore) {
    let t = now();
    let out = store.write(&[row("u1", t, 34)]).await.unwrap();
    assert_eq!((out.written, out.stale), (1, 0));
    let (ts, values) = read_one(store, "u1", &["age", "nick", "emb", "missing", "country"])
        .await
        .unwrap();
    assert_eq!(ts, t);
    assert_eq!(
        values,
        vec![
            Some(Value::Int64(34)),
            Some(Value::Null),
            Some(Value::FloatList(vec![0.5, -1.0, 2.25])),
            None,
            Some(Value::String("NL".into())),
        ]
    );
    assert_eq!(read_one(store, "nobody", &["age"]).await, None);
}

async fn newer_event_time_wins(store: &dyn OnlineStore) {
    let t = now();
    store.write(&[row("u2", t, 30)]).await.unwrap();
    let out = store.write(&[row("u2", t - HOUR, 99)]).await.unwrap();
    assert_eq!(
        (out.written, out.stale),
        (0, 1),
        "older row must not replace a newer one"
    );
    assert_eq!(
        read_one(store, "u2", &["age"]).await.unwrap(),
        (t, vec![Some(Value::Int64(30))])
    );
    // Replaying the same row is idempotent; a newer one replaces it.
    assert_eq!(store.write(&[row("u2", t, 30)]).await.unwrap().written, 1);
    store.write(&[row("u2", t + HOUR, 31)]).await.unwrap();
    assert_eq!(
        read_one(store, "u2", &["age"]).await.unwrap(),
        (t + HOUR, vec![Some(Value::Int64(31))])
    );
}

async fn a_write_replaces_the_whole_row(store: &dyn OnlineStore) {
    let t = now();
    store.write(&[row("u3", t, 1)]).await.unwrap();
    let mut slim = row("u3", t + 1, 2);
    slim.features.truncate(1);
    store.write(&[slim]).await.unwrap();
    let (_, values) = read_one(store, "u3", &["age", "country"]).await.unwrap();
    assert_eq!(values, vec![Some(Value::Int64(2)), None]);
}

async fn batches_mix_entities_and_order(store: &dyn OnlineStore) {
    let t = now();
    let rows: Vec<WriteRow> = (0..50).map(|i| row(&format!("b{i}"), t, i)).collect();
    assert_eq!(store.write(&rows).await.unwrap().written, 50);
    // Same key twice in one batch: the later event time wins whatever the order.
    store
        .write(&[row("dup", t + 5, 5), row("dup", t + 1, 1)])
        .await
        .unwrap();
    assert_eq!(
        read_one(store, "dup", &["age"]).await.unwrap().1,
        vec![Some(Value::Int64(5))]
    );
    let keys: Vec<String> = (0..60).map(|i| key(&format!("b{i}"))).collect();
    let feats = ["age"];
    let lookups: Vec<Lookup> = keys.iter().map(|k| Lookup::row(k, &feats)).collect();
    let got = store.read(&lookups).await.unwrap();
    assert_eq!(got.len(), 60);
    for (i, r) in got.iter().enumerate() {
        match r {
            Some(r) if i < 50 => assert_eq!(r.values, vec![Some(Value::Int64(i as i64))]),
            None if i >= 50 => {}
            other => panic!("row {i}: unexpected {other:?}"),
        }
    }
    assert!(store.read(&[]).await.unwrap().is_empty());
}

async fn expired_rows_read_as_missing(store: &dyn OnlineStore) {
    let t = now();
    let mut expired = row("old", t - 2 * HOUR, 1);
    expired.expire_at = Some(t - HOUR);
    store.write(&[expired]).await.unwrap();
    assert_eq!(read_one(store, "old", &["age"]).await, None);
    let mut fresh = row("fresh", t, 1);
    fresh.expire_at = Some(t + HOUR);
    store.write(&[fresh]).await.unwrap();
    assert!(read_one(store, "fresh", &["age"]).await.is_some());
    // An expired row is absent: an older row that has not expired is taken.
    let mut older = row("old", t - 3 * HOUR, 2);
    older.expire_at = Some(t + HOUR);
    assert_eq!(store.write(&[older]).await.unwrap().written, 1);
    assert_eq!(
        read_one(store, "old", &["age"]).await.unwrap().1,
        vec![Some(Value::Int64(2))]
    );
}

/// Rows with the same event time: the one with the greater tie digest wins
/// in either write order, on every backend as in `store::replaces` (which
/// ingest, materialization and the point-in-time join use).
async fn equal_event_times_resolve_whatever_the_order(store: &dyn OnlineStore) {
    let t = now();
    let with = |age: i64, emb: Vec<f32>| {
        let mut r = row("x", t, age);
        r.features[3].1 = Value::FloatList(emb);
        r
    };
    let slim = |age: i64| {
        let mut r = row("x", t, age);
        r.features.truncate(1);
        r
    };
    let mut pairs = vec![
        (with(1, vec![1.0]), with(2, vec![1.0])),
        (with(7, vec![0.0]), with(7, vec![-0.0])),
        (with(7, vec![f32::NAN]), with(7, vec![1.0])),
    ];
    // Rows with different features (a view that gained one): the digests
    // cover both rows' features, so either order gives one answer.
    pairs.extend((0..6).map(|k| (row("x", t, k), slim(k + 1))));
    for (i, (a, b)) in pairs.into_iter().enumerate() {
        let rust_says_b = replaces(b.event_ts, &b.features, a.event_ts, &a.features);
        let rust_says_a = replaces(a.event_ts, &a.features, b.event_ts, &b.features);
        assert!(rust_says_a || rust_says_b, "pair {i}: one of them wins");
        let names = ["age", "country", "nick", "emb"];
        let mut finals = Vec::new();
        for (n, order) in [[&a, &b], [&b, &a]].into_iter().enumerate() {
            let k = format!("tie{i}-{n}");
            let mut first = order[0].clone();
            let mut second = order[1].clone();
            first.key = key(&k);
            second.key = key(&k);
            assert_eq!(store.write(&[first]).await.unwrap().written, 1);
            let out = store.write(&[second.clone()]).await.unwrap();
            let second_wins = replaces(
                second.event_ts,
                &second.features,
                order[0].event_ts,
                &order[0].features,
            );
            assert_eq!(
                (out.written, out.stale),
                if second_wins { (1, 0) } else { (0, 1) },
                "pair {i}, order {n}: the store and store::replaces disagree"
            );
            finals.push(read_one(store, &k, &names).await.unwrap());
        }
        // Same final row in both orders (NaN compared by bits via Debug).
        assert_eq!(
            format!("{:?}", finals[0]),
            format!("{:?}", finals[1]),
            "pair {i}"
        );
    }
    // Event times compare exactly, also where doubles cannot tell them
    // apart (around the year 5000, 1 µs is below a double's resolution).
    let far = 95_000_000_000_000_001;
    store.write(&[row("far", far, 1)]).await.unwrap();
    let out = store.write(&[row("far", far - 1, 2)]).await.unwrap();
    assert_eq!((out.written, out.stale), (0, 1));
    let out = store.write(&[row("far", far + 1, 3)]).await.unwrap();
    assert_eq!((out.written, out.stale), (1, 0));
    let out = store
        .write(&[row("neg", -5, 1), row("neg", -10, 2)])
        .await
        .unwrap();
    assert_eq!((out.written, out.stale), (1, 1));
}

fn tile_write(
    user: &str,
    source: &str,
    offset: i64,
    ts: i64,
    fields: &[(&str, &str)],
) -> TileWrite {
    TileWrite {
        key: key(user),
        source: source.into(),
        offset,
        event_ts: ts,
        fields: fields
            .iter()
            .map(|(n, v)| ((*n).to_owned(), v.as_bytes().to_vec()))
            .collect(),
        delete: vec!["c:1:p0".into()],
        ids: Vec::new(),
        ids_delete: Vec::new(),
        expire_at: ts + HOUR,
    }
}

async fn read_tiles(store: &dyn OnlineStore, user: &str, fields: &[&str]) -> Vec<(String, String)> {
    let k = key(user);
    let mut rows = store.read(&[Lookup::tiles(&k, fields)]).await.unwrap();
    rows.pop()
        .unwrap()
        .map(|r| {
            r.raw
                .into_iter()
                .map(|(n, v)| (n, String::from_utf8(v).unwrap()))
                .collect()
        })
        .unwrap_or_default()
}

async fn tile_writes_apply_once_per_source_offset(store: &dyn OnlineStore) {
    let t = now();
    let w = tile_write("t1", "ev:0", 10, t, &[("c:1:p0", "a"), ("c:2:ev:0", "x")]);
    assert_eq!(store.write_tiles(&[w]).await.unwrap(), vec![true]);
    // A replay of the same or an older offset of that source is skipped...
    let replay = tile_write("t1", "ev:0", 10, t, &[("c:2:ev:0", "twice")]);
    let older = tile_write("t1", "ev:0", 3, t, &[("c:2:ev:0", "old")]);
    let out = store.write_tiles(&[replay, older]).await.unwrap();
    assert_eq!(out, vec![false, false]);
    // ...while another source's offsets are its own.
    let other = tile_write("t1", "ev:1", 2, t - HOUR, &[("c:2:ev:1", "y")]);
    assert_eq!(store.write_tiles(&[other]).await.unwrap(), vec![true]);
    let mut all = read_tiles(store, "t1", &[]).await;
    all.sort();
    let ts = t.to_string();
    let older_ts = (t - HOUR).to_string();
    assert_eq!(
        all,
        vec![
            ("_o:ev:0".to_owned(), "10".to_owned()),
            ("_o:ev:1".to_owned(), "2".to_owned()),
            ("_t:ev:0".to_owned(), ts.clone()),
            ("_t:ev:1".to_owned(), older_ts),
            ("c:2:ev:0".to_owned(), "x".to_owned()),
            ("c:2:ev:1".to_owned(), "y".to_owned()),
        ],
        "the deleted field is gone, the replay left nothing behind"
    );
    assert_eq!(
        read_tiles(store, "t1", &["c:2:ev:1", "nope"]).await,
        vec![("c:2:ev:1".to_owned(), "y".to_owned())]
    );
    assert!(read_tiles(store, "nobody", &[]).await.is_empty());
    // Feature rows and tile rows read in one call.
    store.write(&[row("t1row", t, 7)]).await.unwrap();
    let (rk, tk) = (key("t1row"), key("t1"));
    let got = store
        .read(&[
            Lookup::row(&rk, &["age"]),
            Lookup::tiles(&tk, &["c:2:ev:0"]),
        ])
        .await
        .unwrap();
    assert_eq!(got[0].as_ref().unwrap().values, vec![Some(Value::Int64(7))]);
    assert_eq!(
        got[1].as_ref().unwrap().raw,
        vec![("c:2:ev:0".to_owned(), b"x".to_vec())]
    );
    // Expired tile rows read as missing.
    let mut gone = tile_write("t2", "ev:0", 1, t - 3 * HOUR, &[("c:9:ev:0", "z")]);
    gone.expire_at = t - HOUR;
    store.write_tiles(&[gone]).await.unwrap();
    assert!(read_tiles(store, "t2", &[]).await.is_empty());
}

/// A tile row's event-id row changes with the row, only when the write
/// applies, in any size, and reads of the row never return it.
async fn event_id_rows_follow_their_tile_row(store: &dyn OnlineStore) {
    let t = now();
    let ids_of = |user: &str| event_ids_key(&key(user));
    let read_ids = |user: &'static str| async move {
        let k = ids_of(user);
        let mut rows = store.read(&[Lookup::tiles(&k, &[])]).await.unwrap();
        let mut raw = rows.pop().unwrap().map(|r| r.raw).unwrap_or_default();
        raw.sort();
        raw
    };
    let mut w = tile_write("i1", "ev:0", 1, t, &[("c:5:ev:0", "s")]);
    w.ids = vec![
        ("5:0:ev:0".into(), b"a".to_vec()),
        ("4:0:ev:0".into(), b"b".to_vec()),
    ];
    assert_eq!(store.write_tiles(&[w]).await.unwrap(), vec![true]);
    assert_eq!(
        read_ids("i1").await,
        vec![
            ("4:0:ev:0".into(), b"b".to_vec()),
            ("5:0:ev:0".into(), b"a".to_vec())
        ]
    );
    let row_fields: Vec<String> = read_tiles(store, "i1", &[])
        .await
        .into_iter()
        .map(|f| f.0)
        .collect();
    assert!(
        !row_fields.iter().any(|f| f.contains(":0:ev:0")),
        "{row_fields:?}"
    );
    // A replayed offset changes neither row.
    let mut replay = tile_write("i1", "ev:0", 1, t, &[]);
    replay.ids = vec![("5:0:ev:0".into(), b"replayed".to_vec())];
    replay.ids_delete = vec!["4:0:ev:0".into()];
    assert_eq!(store.write_tiles(&[replay]).await.unwrap(), vec![false]);
    assert_eq!(read_ids("i1").await.len(), 2);
    assert_eq!(read_ids("i1").await[1].1, b"a".to_vec());
    // The next offset deletes and sets, thousands of fields at once.
    let mut big = tile_write("i1", "ev:0", 2, t, &[]);
    big.ids_delete = vec!["4:0:ev:0".into(), "5:0:ev:0".into()];
    big.ids = (0..2_500)
        .map(|i| (format!("{i}:0:ev:0"), vec![b'x'; 9]))
        .collect();
    assert_eq!(store.write_tiles(&[big]).await.unwrap(), vec![true]);
    let after = read_ids("i1").await;
    assert_eq!(after.len(), 2_500);
    assert!(after.iter().all(|(_, v)| v == &vec![b'x'; 9]));
    // Rows without ids have no event-id row.
    store
        .write_tiles(&[tile_write("i2", "ev:0", 1, t, &[("c:5:ev:0", "s")])])
        .await
        .unwrap();
    assert!(read_ids("i2").await.is_empty());
}

async fn suite(store: &dyn OnlineStore) {
    store.ping().await.unwrap();
    round_trips_typed_values(store).await;
    newer_event_time_wins(store).await;
    a_write_replaces_the_whole_row(store).await;
    batches_mix_entities_and_order(store).await;
    expired_rows_read_as_missing(store).await;
    equal_event_times_resolve_whatever_the_order(store).await;
    tile_writes_apply_once_per_source_offset(store).await;
    event_id_rows_follow_their_tile_row(store).await;
}

fn redis_store(url: String, timeout: Duration) -> RedisStore {
    RedisStore::new(&RedisConfig {
        url,
        pool_size: 4,
        timeout,
        tls: Default::default(),
    })
    .unwrap()
}

#[tokio::test]
async fn redis_store_behaves() {
    let redis = RedisServer::start();
    suite(&redis_store(redis.url(), Duration::from_secs(2))).await;
}

#[tokio::test]
async fn redis_over_tls_behaves() {
    let pki = Pki::new();
    let redis = RedisServer::start_tls(&pki, true);
    let url = format!("rediss://127.0.0.1:{}", redis.port());
    let tls = RedisTls {
        ca_file: Some(pki.ca_file()),
        cert_file: Some(pki.client_cert_file()),
        key_file: Some(pki.client_key_file()),
    };
    let open = |url: &str, tls: RedisTls| {
        RedisStore::new(&RedisConfig {
            url: url.to_owned(),
            pool_size: 4,
            timeout: Duration::from_secs(2),
            tls,
        })
    };
    suite(&open(&url, tls.clone()).unwrap()).await;

    // Refused without a client certificate, with a server certificate of
    // another CA, and in plain text: each an error, never a silent downgrade.
    let without_client = RedisTls {
        ca_file: Some(pki.ca_file()),
        ..Default::default()
    };
    let other = Pki::new();
    let other_ca = RedisTls {
        ca_file: Some(other.ca_file()),
        ..tls.clone()
    };
    let plain = url.replacen("rediss://", "redis://", 1);
    for (what, store) in [
        ("no client certificate", open(&url, without_client).unwrap()),
        ("untrusted server", open(&url, other_ca).unwrap()),
        ("plain text", open(&plain, RedisTls::default()).unwrap()),
    ] {
        let e = store.ping().await.unwrap_err();
        assert!(
            matches!(
                e.kind(),
                ErrorKind::Unavailable | ErrorKind::Internal | ErrorKind::DeadlineExceeded
            ),
            "{what}: {e}"
        );
    }

    // Misconfigurations are named before anything connects.
    let e = open(&plain, tls.clone()).unwrap_err();
    assert!(e.message().contains("not rediss://"), "{e}");
    let half = RedisTls {
        cert_file: Some(pki.client_cert_file()),
        ..Default::default()
    };
    let e = open(&url, half).unwrap_err();
    assert!(
        e.message().contains("both tls_cert_file and tls_key_file"),
        "{e}"
    );
    let missing = RedisTls {
        ca_file: Some(pki.ca_file().with_file_name("nope.pem")),
        ..Default::default()
    };
    let e = open(&url, missing).unwrap_err();
    assert!(
        e.message().contains("cannot read the redis TLS CA file"),
        "{e}"
    );
    let e = RedisClusterStore::new(
        &[url.clone(), plain.clone()],
        Duration::from_secs(1),
        &RedisTls::default(),
    )
    .unwrap_err();
    assert!(e.message().contains("mix redis:// and rediss://"), "{e}");
}

#[tokio::test]
async fn redis_cluster_over_tls_behaves() {
    let pki = Pki::new();
    let cluster = RedisCluster::start_tls(3, &pki);
    assert!(cluster.urls()[0].starts_with("rediss://"));
    let tls = RedisTls {
        ca_file: Some(pki.ca_file()),
        ..Default::default()
    };
    let store = RedisClusterStore::new(&cluster.urls(), Duration::from_secs(2), &tls).unwrap();
    suite(&store).await;
    // A CA that did not sign the nodes' certificates: refused.
    let other = Pki::new();
    let untrusting = RedisClusterStore::new(
        &cluster.urls(),
        Duration::from_secs(1),
        &RedisTls {
            ca_file: Some(other.ca_file()),
            ..Default::default()
        },
    )
    .unwrap();
    let e = untrusting.ping().await.unwrap_err();
    assert!(
        matches!(
            e.kind(),
            ErrorKind::Unavailable | ErrorKind::Internal | ErrorKind::DeadlineExceeded
        ),
        "{e}"
    );
}

#[tokio::test]
async fn redis_cluster_store_behaves() {
    let cluster = RedisCluster::start(3);
    let store =
        RedisClusterStore::new(&cluster.urls(), Duration::from_secs(2), &Default::default())
            .unwrap();
    suite(&store).await;
}

#[tokio::test]
async fn embedded_store_behaves() {
    let dir = tempfile::tempdir().unwrap();
    let store =
        EmbeddedStore::open(&dir.path().join("online.redb"), Arc::new(SystemClock)).unwrap();
    suite(&store).await;
}

#[tokio::test]
async fn embedded_store_persists_across_reopen_and_sweeps() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub/online.redb");
    let t = now();
    {
        let store = EmbeddedStore::open(&path, Arc::new(SystemClock)).unwrap();
        let mut expired = row("old", t - 2 * HOUR, 1);
        expired.expire_at = Some(t - HOUR);
        store.write(&[row("kept", t, 7), expired]).await.unwrap();
        assert!(
            EmbeddedStore::open(&path, Arc::new(SystemClock)).is_err(),
            "second opener must be refused"
        );
    }
    let store = EmbeddedStore::open(&path, Arc::new(SystemClock)).unwrap();
    assert_eq!(
        read_one(&store, "kept", &["age"]).await.unwrap().1,
        vec![Some(Value::Int64(7))]
    );
    assert_eq!(store.sweep_expired().await.unwrap(), 1);
    assert_eq!(store.sweep_expired().await.unwrap(), 0);
}

#[tokio::test]
async fn redis_keys_expire_in_redis() {
    let redis = RedisServer::start();
    let store = redis_store(redis.url(), Duration::from_secs(2));
    let mut r = row("ttl", now(), 1);
    r.expire_at = Some(now() + HOUR);
    store.write(&[r]).await.unwrap();
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let pttl: i64 = redis::cmd("PTTL")
        .arg(key("ttl"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(pttl > 3_500_000 && pttl <= 3_600_000, "pttl {pttl}");
    let no_ttl: i64 = {
        store.write(&[row("forever", now(), 1)]).await.unwrap();
        redis::cmd("PTTL")
            .arg(key("forever"))
            .query_async(&mut conn)
            .await
            .unwrap()
    };
    assert_eq!(no_ttl, -1);
    // A tile row's event-id row expires with it.
    let mut w = tile_write("tiles", "ev:0", 1, now(), &[("c:1:ev:0", "s")]);
    w.ids = vec![("1:0:ev:0".into(), b"d".to_vec())];
    w.expire_at = now() + 2 * HOUR;
    store.write_tiles(&[w]).await.unwrap();
    let mut expiry = Vec::new();
    for k in [key("tiles"), event_ids_key(&key("tiles"))] {
        let at: i64 = redis::cmd("PEXPIRETIME")
            .arg(k)
            .query_async(&mut conn)
            .await
            .unwrap();
        expiry.push(at);
    }
    assert!(expiry[0] > 0 && expiry[0] == expiry[1], "{expiry:?}");
}

#[tokio::test]
async fn redis_down_is_unavailable_within_the_deadline_and_recovers() {
    let mut redis = RedisServer::start();
    let store = redis_store(redis.url(), Duration::from_millis(300));
    store.write(&[row("r", now(), 1)]).await.unwrap();
    redis.stop();
    let started = std::time::Instant::now();
    let err = store.ping().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    let k = key("r");
    let err = store.read(&[Lookup::row(&k, &["age"])]).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    redis.restart();
    // Same store object, no restart of ours: the pool reconnects, and the
    // write script is re-cached after Redis lost it.
    store.ping().await.unwrap();
    assert_eq!(store.write(&[row("r", now(), 2)]).await.unwrap().written, 1);
    assert_eq!(
        read_one(&store, "r", &["age"]).await.unwrap().1,
        vec![Some(Value::Int64(2))]
    );
}

/// `(calls to EVAL, calls to SCRIPT LOAD)` on one Redis node since its
/// last `CONFIG RESETSTAT`, from `INFO commandstats`.
async fn script_calls(url: &str) -> (u64, u64) {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .unwrap();
    let calls = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(&format!("cmdstat_{name}:calls=")))
            .map_or(0, |rest| rest.split(',').next().unwrap().parse().unwrap())
    };
    (calls("eval"), calls("script|load"))
}

/// Resets a node's command statistics and, when `flush`, does to it what
/// a restart, a failover or `SCRIPT FLUSH` does: its script cache is empty.
async fn lose_scripts(url: &str, flush: bool) {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let commands = [["SCRIPT", "FLUSH"], ["CONFIG", "RESETSTAT"]];
    for c in &commands[usize::from(!flush)..] {
        let () = redis::cmd(c[0])
            .arg(c[1])
            .query_async(&mut conn)
            .await
            .unwrap();
    }
}

/// A large write and a large tile write on a store whose nodes in
/// `flushed` lost their scripts (the others of `all` keep theirs): each
/// script is loaded once per node (`SCRIPT LOAD`) and called by its SHA-1,
/// never sent with every call (`EVAL`, megabytes for a large write, which
/// missed the 250 ms store deadline); everything is applied.
async fn large_writes_after_the_scripts_were_lost(
    store: &dyn OnlineStore,
    flushed: &[String],
    all: &[String],
) {
    // Every node has both scripts, as in a running deployment.
    let t = now();
    let warm: Vec<WriteRow> = (0..64).map(|i| row(&format!("warm{i}"), t, i)).collect();
    store.write(&warm).await.unwrap();
    let warm: Vec<TileWrite> = (0..64)
        .map(|i| tile_write(&format!("warm{i}"), "ev:0", 1, t, &[("c:1:ev:0", "1")]))
        .collect();
    store.write_tiles(&warm).await.unwrap();
    for url in all {
        lose_scripts(url, flushed.contains(url)).await;
    }
    let rows: Vec<WriteRow> = (0..5_000).map(|i| row(&format!("cold{i}"), t, i)).collect();
    assert_eq!(store.write(&rows).await.unwrap().written, 5_000);
    let tiles: Vec<TileWrite> = (0..1_000)
        .map(|i| tile_write(&format!("cold{i}"), "ev:0", 1, t, &[("c:1:ev:0", "1")]))
        .collect();
    let applied = store.write_tiles(&tiles).await.unwrap();
    assert!(applied.iter().all(|&a| a), "{applied:?}");
    for url in all {
        let (eval, load) = script_calls(url).await;
        assert_eq!(eval, 0, "EVAL on node {url}");
        if flushed.contains(url) {
            assert_eq!(load, 2, "SCRIPT LOAD on node {url}");
        }
    }
    assert_eq!(
        read_one(store, "cold4999", &["age"]).await.unwrap().1,
        vec![Some(Value::Int64(4_999))]
    );
    assert_eq!(
        read_tiles(store, "cold999", &["c:1:ev:0"]).await,
        vec![("c:1:ev:0".to_owned(), "1".to_owned())]
    );
}

#[tokio::test]
async fn redis_reloads_lost_scripts_once() {
    let redis = RedisServer::start();
    let store = redis_store(redis.url(), Duration::from_secs(10));
    large_writes_after_the_scripts_were_lost(&store, &[redis.url()], &[redis.url()]).await;
}

#[tokio::test]
async fn redis_cluster_reloads_lost_scripts_once_per_node() {
    let cluster = RedisCluster::start(3);
    let store = RedisClusterStore::new(
        &cluster.urls(),
        Duration::from_secs(10),
        &Default::default(),
    )
    .unwrap();
    // One node restarted: only its slots' calls miss the scripts.
    let urls = cluster.urls();
    large_writes_after_the_scripts_were_lost(&store, &urls[1..2], &urls).await;
}

/// The Redis ACL docs/configuration.md gives a quiver user.
const QUIVER_ACL: &[&str] = &[
    "~qv1:*",
    "+hmget",
    "+hgetall",
    "+hget",
    "+hset",
    "+hdel",
    "+del",
    "+pexpireat",
    "+pttl",
    "+evalsha",
    "+eval",
    "+script|load",
    "+ping",
];

/// Makes user `name` (password `secret`) on the node at `url` with the
/// documented ACL, and `extra` rules; returns the URL to log in as it.
async fn make_user(url: &str, name: &str, extra: &[&str]) -> String {
    let client = redis::Client::open(url).unwrap();
    let mut admin = client.get_multiplexed_async_connection().await.unwrap();
    let () = redis::cmd("ACL")
        .arg(&["SETUSER", name, "on", ">secret"])
        .arg(QUIVER_ACL)
        .arg(extra)
        .query_async(&mut admin)
        .await
        .unwrap();
    url.replacen("redis://", &format!("redis://{name}:secret@"), 1)
}

/// A store on `redis` as user `name`, see [`make_user`].
async fn store_as_user(redis: &RedisServer, name: &str, extra: &[&str]) -> RedisStore {
    redis_store(
        make_user(&redis.url(), name, extra).await,
        Duration::from_secs(10),
    )
}

/// A cluster store as user `name`, made on every node with the documented
/// cluster rules and `extra`.
async fn cluster_as_user(cluster: &RedisCluster, name: &str, extra: &[&str]) -> RedisClusterStore {
    let mut urls = Vec::new();
    for url in cluster.urls() {
        let rules = [&["+cluster|info", "+cluster|slots", "+asking"], extra].concat();
        urls.push(make_user(&url, name, &rules).await);
    }
    RedisClusterStore::new(&urls, Duration::from_secs(10), &Default::default()).unwrap()
}

/// The documented ACL is enough: the whole suite, and writes after the
/// scripts were lost, as a user with exactly those rights.
#[tokio::test]
async fn redis_with_the_documented_acl_behaves() {
    let redis = RedisServer::start();
    let store = store_as_user(&redis, "quiver", &[]).await;
    suite(&store).await;
    large_writes_after_the_scripts_were_lost(&store, &[redis.url()], &[redis.url()]).await;
}

#[tokio::test]
async fn redis_cluster_with_the_documented_acl_behaves() {
    let cluster = RedisCluster::start(3);
    let store = cluster_as_user(&cluster, "quiver", &[]).await;
    suite(&store).await;
    let urls = cluster.urls();
    large_writes_after_the_scripts_were_lost(&store, &urls[..1], &urls).await;
}

/// A user whose ACL refuses `SCRIPT LOAD` still writes: the scripts go
/// with their source (`EVAL`) once, which caches them, and later calls use
/// `EVALSHA` again.
#[tokio::test]
async fn redis_without_script_load_sends_the_source_once() {
    let redis = RedisServer::start();
    let store = store_as_user(&redis, "writer", &["-script|load"]).await;
    lose_scripts(&redis.url(), true).await;
    let t = now();
    for round in 0..2 {
        let rows: Vec<WriteRow> = (0..50)
            .map(|i| row(&format!("acl{i}"), t + round, i))
            .collect();
        assert_eq!(store.write(&rows).await.unwrap().written, 50);
        let tiles: Vec<TileWrite> = (0..10)
            .map(|i| {
                tile_write(
                    &format!("acl{i}"),
                    "ev:0",
                    round + 1,
                    t,
                    &[("c:1:ev:0", "1")],
                )
            })
            .collect();
        assert!(store.write_tiles(&tiles).await.unwrap().iter().all(|&a| a));
    }
    // One EVAL per pipeline (the write's and the tiles'), in the first
    // round only: the later calls of each found the script it cached.
    assert_eq!(script_calls(&redis.url()).await, (2, 0));
}

/// The same on a cluster: the load fails on every node, and each slot
/// group that missed the script sends it once, in its first call.
#[tokio::test]
async fn redis_cluster_without_script_load_sends_the_source_once_per_group() {
    let cluster = RedisCluster::start(3);
    let store = cluster_as_user(&cluster, "writer", &["-script|load"]).await;
    for url in cluster.urls() {
        lose_scripts(&url, true).await;
    }
    let t = now();
    let mut evals = Vec::new();
    for round in 0..2 {
        // Four rows per user: 40 rows in 10 slot groups.
        let rows: Vec<WriteRow> = (0..40)
            .map(|i| {
                let mut r = row(&format!("acl{}", i % 10), t + round, i);
                r.key = format!("{}:{i}", r.key);
                r
            })
            .collect();
        assert_eq!(store.write(&rows).await.unwrap().written, 40);
        let mut total = 0;
        for url in cluster.urls() {
            let (eval, load) = script_calls(&url).await;
            assert_eq!(load, 0);
            total += eval;
        }
        evals.push(total);
    }
    assert_eq!(
        evals,
        vec![10, 10],
        "one EVAL per slot group, first round only"
    );
}
