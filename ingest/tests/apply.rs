//! The applier against the embedded store (and Redis), without Kafka: tile
//! retention with events dated ahead of the clock, time arithmetic at the
//! ends of the supported range, and events sent twice (client retries).

use std::sync::Arc;
use std::time::Duration;

use quiver_core::aggregate::finish_row;
use quiver_core::aggregate::{parse_ids_field, IDS_PER_FIELD};
use quiver_core::codec::{entity_key, event_ids_key, row_key};
use quiver_core::event::Event;
use quiver_core::registry::ViewSource;
use quiver_core::store::{EmbeddedStore, Lookup, RedisConfig, RedisStore};
use quiver_core::time::{ManualClock, Micros, MAX_MICROS, MIN_MICROS};
use quiver_core::{OnlineStore, Registry, Value};
use quiver_ingest::{Applier, Record};
use quiver_testkit::RedisServer;

const HOUR: Micros = 3_600_000_000;
const MINUTE: Micros = 60_000_000;

const REGISTRY: &str = r#"
[[entities]]
name = "user"
join_key = "user_id"

[[event_types]]
name = "click"
entities = ["user"]

[[feature_views]]
name = "clicks"
entities = ["user"]
tile = "1h"
aggregations = [{ name = "clicks_1h", function = "count", events = ["click"], window = "1h" }]

[[event_types]]
name = "tick"
entities = ["user"]

[[feature_views]]
name = "ticks"
entities = ["user"]
tile = "1s"
aggregations = [{ name = "ticks_10000s", function = "count", events = ["tick"], window = "10000s" }]

[[feature_views]]
name = "decade"
entities = ["user"]
tile = "1d"
aggregations = [{ name = "clicks_3650d", function = "count", events = ["click"], window = "3650d" }]
"#;

fn click(id: &str, at: Micros) -> Event {
    event("click", id, at)
}

fn event(event_type: &str, id: &str, at: Micros) -> Event {
    Event {
        event_id: id.into(),
        event_type: event_type.into(),
        entities: vec![("user_id".into(), Value::String("u".into()))],
        event_time: at,
        attributes: vec![],
    }
}

fn records(events: &[Event], first_offset: i64) -> Vec<Record> {
    events
        .iter()
        .enumerate()
        .map(|(i, e)| Record {
            source: Arc::from("events:0"),
            offset: first_offset + i as i64,
            event: e.clone(),
        })
        .collect()
}

async fn count_at(store: &dyn OnlineStore, reg: &Registry, view: &str, at: Micros) -> Value {
    let v = reg.view(reg.view_index(view).unwrap());
    let ViewSource::Aggregations { tile, aggregations } = &v.source else {
        unreachable!()
    };
    let k = row_key(
        &entity_key(&[("user_id", &Value::String("u".into()))]).unwrap(),
        view,
    );
    let raw = store
        .read(&[Lookup::tiles(&k, &[])])
        .await
        .unwrap()
        .pop()
        .unwrap()
        .map(|r| r.raw)
        .unwrap_or_default();
    finish_row(aggregations, *tile, at, &[0], &raw)
        .unwrap()
        .map_or(Value::Null, |r| r.1[0].clone())
}

fn redis_store(redis: &RedisServer) -> Arc<dyn OnlineStore> {
    Arc::new(
        RedisStore::new(&RedisConfig {
            url: redis.url(),
            pool_size: 2,
            timeout: Duration::from_secs(10),
            tls: Default::default(),
        })
        .unwrap(),
    )
}

fn open(dir: &std::path::Path, now: Micros) -> Arc<dyn OnlineStore> {
    Arc::new(
        EmbeddedStore::open(&dir.join("online.redb"), Arc::new(ManualClock::new(now))).unwrap(),
    )
}

/// An event up to `max_future_skew` ahead of the clock must not drop the
/// tiles a read at the clock counts (offline retrieval as of the clock
/// counts them too): one event 20 minutes old, one 45 minutes ahead (the
/// next hour tile), in one batch and in two.
#[tokio::test]
async fn an_event_ahead_of_the_clock_keeps_the_tiles_reads_at_the_clock_count() {
    let reg = Arc::new(Registry::from_toml("r.toml", REGISTRY).unwrap());
    let now = 1_000_000 * HOUR + 30 * MINUTE;
    let evs = [
        click("past", now - 20 * MINUTE),
        click("ahead", now + 45 * MINUTE),
    ];
    for split in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), now);
        let applier = Applier::new(reg.clone(), store.clone(), Duration::ZERO)
            .with_max_future_skew(Duration::from_secs(3600));
        let recs = records(&evs, 0);
        let stats = if split {
            let mut s = applier.apply(&recs[..1]).await.unwrap();
            s += applier.apply(&recs[1..]).await.unwrap();
            s
        } else {
            applier.apply(&recs).await.unwrap()
        };
        assert_eq!(stats.events_too_late, 0, "split={split}");
        assert_eq!(
            count_at(&*store, &reg, "clicks", now).await,
            Value::Int64(1),
            "split={split}"
        );
        assert_eq!(
            count_at(&*store, &reg, "clicks", now + HOUR).await,
            Value::Int64(1)
        );
        // An event older than the window behind the newest event, plus
        // the skew, is counted by no read at or after the clock: dropped.
        let late = records(&[click("late", now - 2 * HOUR)], 2);
        let s = applier.apply(&late).await.unwrap();
        assert_eq!(s.events_too_late, 1, "split={split}");
    }
}

/// Events at the first and last supported instants with a 3650-day window:
/// tile and expiry arithmetic stays in range (no overflow panic in debug
/// builds), and the rows read back.
#[tokio::test]
async fn times_at_the_ends_of_the_range_do_not_overflow() {
    let reg = Arc::new(Registry::from_toml("r.toml", REGISTRY).unwrap());
    for (at, skew) in [
        (MAX_MICROS, Duration::from_secs(7 * 86_400)),
        (MIN_MICROS, Duration::from_secs(7 * 86_400)),
        (MAX_MICROS, Duration::MAX),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), at);
        let applier =
            Applier::new(reg.clone(), store.clone(), Duration::ZERO).with_max_future_skew(skew);
        let s = applier
            .apply(&records(&[click("a", at), click("b", at)], 0))
            .await
            .unwrap();
        assert_eq!(s.tiles_written, 2);
        assert_eq!(count_at(&*store, &reg, "decade", at).await, Value::Int64(2));
        // A jump from one end of the range to the other deletes the old
        // tiles without walking every tile in between.
        let other = if at == MAX_MICROS {
            MIN_MICROS
        } else {
            MAX_MICROS
        };
        let s = applier
            .apply(&records(&[click("c", other)], 2))
            .await
            .unwrap();
        if other == MAX_MICROS {
            assert_eq!(s.events_too_late, 0);
            assert_eq!(
                count_at(&*store, &reg, "decade", other).await,
                Value::Int64(1)
            );
        } else if skew == Duration::MAX {
            // Any history may be needed by a read: nothing is too late.
            assert_eq!(s.events_too_late, 0);
        } else {
            // Older than every window behind the newest event: one per view.
            assert_eq!(s.events_too_late, 2);
        }
    }
}

/// One tile-row update with more fields than one Lua `unpack` takes (5,000
/// one-second tiles: 10,000 arguments), then one that deletes them all:
/// both apply on Redis (the script sets and deletes fields in chunks).
#[tokio::test]
async fn a_row_update_of_thousands_of_tiles_applies_on_redis() {
    let reg = Arc::new(Registry::from_toml("r.toml", REGISTRY).unwrap());
    let redis = RedisServer::start();
    let store = redis_store(&redis);
    let start = 1_800_000_000_000_000;
    let ticks: Vec<Event> = (0..5_000)
        .map(|i| event("tick", &format!("t{i}"), start + i * 1_000_000))
        .collect();
    let applier = Applier::new(reg.clone(), store.clone(), Duration::ZERO)
        .with_max_future_skew(Duration::ZERO);
    let s = applier.apply(&records(&ticks, 0)).await.unwrap();
    assert_eq!((s.tiles_written, s.events_too_late), (1, 0));
    let last = start + 4_999 * 1_000_000;
    assert_eq!(
        count_at(&*store, &reg, "ticks", last).await,
        Value::Int64(5_000)
    );
    // 20,000 s later every earlier tile has left the window: deleted.
    let later = last + 20_000 * 1_000_000;
    let s = applier
        .apply(&records(&[event("tick", "late", later)], 5_000))
        .await
        .unwrap();
    assert_eq!(s.tiles_written, 1);
    let k = row_key(
        &entity_key(&[("user_id", &Value::String("u".into()))]).unwrap(),
        "ticks",
    );
    let raw = store
        .read(&[Lookup::tiles(&k, &[])])
        .await
        .unwrap()
        .pop()
        .unwrap()
        .unwrap()
        .raw;
    let tiles = raw.iter().filter(|(f, _)| !f.starts_with('_')).count();
    assert_eq!(tiles, 1, "old tiles deleted");
    assert_eq!(
        count_at(&*store, &reg, "ticks", later).await,
        Value::Int64(1)
    );
}

/// Rows keep the longest window's tiles plus the future skew's: `quiver
/// ingest` refuses a skew that would make them hold more than
/// `MAX_ROW_TILES` (1 s tiles, 10,000 s window: 1 h is fine, 3 h is not).
#[tokio::test]
async fn a_future_skew_too_long_for_short_tiles_is_refused_at_start() {
    use quiver_core::event::EventTimeBounds;
    use quiver_ingest::{IngestConfig, Ingestor, KafkaConfig};
    let reg = Arc::new(Registry::from_toml("r.toml", REGISTRY).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let ingestor = |hours: u64| {
        let cfg = IngestConfig {
            event_time_bounds: EventTimeBounds {
                max_future_skew: Duration::from_secs(hours * 3600),
                max_age: None,
            },
            ..IngestConfig::default()
        };
        let store = open(dir.path(), 0);
        Ingestor::new(
            &KafkaConfig::new("127.0.0.1:1"),
            cfg,
            reg.clone(),
            Applier::new(reg.clone(), store, Duration::ZERO),
            None,
        )
    };
    ingestor(1).unwrap();
    let e = ingestor(3).unwrap_err();
    assert!(
        e.message().contains("feature view \"ticks\"")
            && e.message().contains("would keep 20800 tiles")
            && e.message().contains("lower ingest.max_future_skew"),
        "{e}"
    );
}

/// Fields of the user's event-id row of `view`.
async fn id_fields(store: &dyn OnlineStore, view: &str) -> Vec<String> {
    let k = event_ids_key(&row_key(
        &entity_key(&[("user_id", &Value::String("u".into()))]).unwrap(),
        view,
    ));
    let mut f: Vec<String> = store
        .read(&[Lookup::tiles(&k, &[])])
        .await
        .unwrap()
        .pop()
        .unwrap()
        .map(|r| r.raw.into_iter().map(|(n, _)| n).collect())
        .unwrap_or_default();
    f.sort();
    f
}

/// A retried send (same event id, new offset) counts once: within a
/// batch, across batches, after a restart (a new applier reads the ids
/// back), beyond one stored field of ids; the ids leave with their tile,
/// and the rule is per tile (the same id in another tile is another event).
async fn retried_events_count_once(store: Arc<dyn OnlineStore>, now: Micros) {
    let reg = Arc::new(Registry::from_toml("r.toml", REGISTRY).unwrap());
    let fresh = || {
        Applier::new(reg.clone(), store.clone(), Duration::ZERO)
            .with_max_future_skew(Duration::ZERO)
    };
    let t = now - 10 * MINUTE;
    let a = fresh();
    let s = a
        .apply(&records(&[click("e1", t), click("e2", t)], 0))
        .await
        .unwrap();
    assert_eq!(s.events_duplicate, 0);
    let s = a
        .apply(&records(
            &[click("e1", t), click("e3", t + 1), click("e3", t + 1)],
            2,
        ))
        .await
        .unwrap();
    // Two views count clicks: each duplicate is skipped in both rows.
    assert_eq!(s.events_duplicate, 4, "{s:?}");
    assert_eq!(
        count_at(&*store, &reg, "clicks", now).await,
        Value::Int64(3)
    );
    assert_eq!(
        count_at(&*store, &reg, "decade", now).await,
        Value::Int64(3)
    );

    // A restarted process reads the ids back.
    let s = fresh().apply(&records(&[click("e2", t)], 5)).await.unwrap();
    assert_eq!((s.events_duplicate, s.tiles_written), (2, 2));
    assert_eq!(
        count_at(&*store, &reg, "clicks", now).await,
        Value::Int64(3)
    );

    // More ids than one field holds, over several processes, then all of
    // them again.
    let many: Vec<Event> = (0..2_500).map(|i| click(&format!("m{i}"), t + 2)).collect();
    let mut offset = 6;
    for part in many.chunks(700) {
        let s = fresh().apply(&records(part, offset)).await.unwrap();
        assert_eq!(s.events_duplicate, 0);
        offset += part.len() as i64;
    }
    let s = fresh().apply(&records(&many, offset)).await.unwrap();
    offset += many.len() as i64;
    assert_eq!(s.events_duplicate, 2 * 2_500);
    assert_eq!(
        count_at(&*store, &reg, "clicks", now).await,
        Value::Int64(2_503)
    );
    let fields = id_fields(&*store, "clicks").await;
    assert_eq!(
        fields.len(),
        2_503usize.div_ceil(IDS_PER_FIELD),
        "{fields:?}"
    );

    // The same id in another tile is another event (the hour view); in
    // the same tile it is the same (the day view, unless the hour
    // crossed midnight).
    let day = 24 * HOUR;
    let same_day = t.div_euclid(day) == (t + HOUR).div_euclid(day);
    let s = fresh()
        .apply(&records(&[click("e1", t + HOUR)], offset))
        .await
        .unwrap();
    offset += 1;
    assert_eq!(s.events_duplicate, u64::from(same_day));
    assert_eq!(
        count_at(&*store, &reg, "clicks", t + HOUR).await,
        Value::Int64(1)
    );
    // The old tile has left the 1 h window: its ids went with it, and a
    // retry of its events is too late, not counted.
    let fields = id_fields(&*store, "clicks").await;
    let tiles: Vec<i64> = fields
        .iter()
        .filter_map(|f| parse_ids_field(f).map(|p| p.0))
        .collect();
    assert_eq!(tiles, vec![(t + HOUR).div_euclid(HOUR)], "{fields:?}");
    let s = fresh()
        .apply(&records(&[click("e3", t + 1)], offset))
        .await
        .unwrap();
    assert_eq!((s.events_too_late, s.events_duplicate), (1, 1), "{s:?}");
    assert_eq!(
        count_at(&*store, &reg, "clicks", t + HOUR).await,
        Value::Int64(1)
    );
    // The ten-year view still holds the old tile and its ids.
    assert_eq!(
        count_at(&*store, &reg, "decade", t + HOUR).await,
        Value::Int64(2_503 + i64::from(!same_day))
    );
}

#[tokio::test]
async fn retried_events_count_once_on_the_embedded_store() {
    let now = 1_000_000 * HOUR + 30 * MINUTE;
    let dir = tempfile::tempdir().unwrap();
    retried_events_count_once(open(dir.path(), now), now).await;
}

#[tokio::test]
async fn retried_events_count_once_on_redis() {
    let redis = RedisServer::start();
    let store = redis_store(&redis);
    // Rows expire in Redis by the wall clock: date the events hours ahead
    // so that none expires during the test, half past an hour like the
    // embedded case (the checks read within the same hour tile).
    let wall = quiver_core::time::system_time_to_micros(std::time::SystemTime::now());
    let now = (wall.div_euclid(HOUR) + 3) * HOUR + 30 * MINUTE;
    retried_events_count_once(store, now).await;
}
