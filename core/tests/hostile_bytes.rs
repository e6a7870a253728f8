//! Property tests: whatever bytes or text arrive where quiver decodes input
//! or stored data (stored values and aggregation states, Kafka payloads in
//! protobuf or JSON, JSON events, registry files), the answer is a value
//! or an error that says what is wrong; never a panic, never a hang.

use std::path::Path;
use std::sync::{Arc, LazyLock};

use proptest::prelude::*;
use quiver_core::aggregate::AggState;
use quiver_core::codec::decode_value;
use quiver_core::event::Event;
use quiver_core::wire::decode_event;
use quiver_core::Registry;
use serde_json::{json, Value as Json};

static REGISTRY_TEXT: LazyLock<String> = LazyLock::new(|| {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../registry/features.toml");
    std::fs::read_to_string(path).unwrap()
});

static REGISTRY: LazyLock<Arc<Registry>> =
    LazyLock::new(|| Arc::new(Registry::from_toml("features.toml", &REGISTRY_TEXT).unwrap()));

/// Any JSON value, nested a few levels.
fn any_json() -> impl Strategy<Value = Json> {
    let leaf = prop_oneof![
        Just(Json::Null),
        any::<bool>().prop_map(Json::from),
        any::<i64>().prop_map(Json::from),
        any::<f64>()
            .prop_filter("JSON has no NaN", |f| f.is_finite())
            .prop_map(Json::from),
        ".{0,12}".prop_map(Json::from),
        Just(json!("2026-11-30T12:00:00Z")),
        Just(json!("login")),
        Just(json!("user_id")),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Json::from),
            prop::collection::btree_map(
                prop_oneof![
                    Just("event_id".to_owned()),
                    Just("event_type".to_owned()),
                    Just("event_time".to_owned()),
                    Just("entities".to_owned()),
                    Just("attributes".to_owned()),
                    Just("user_id".to_owned()),
                    Just("device".to_owned()),
                    "[a-z_]{1,8}",
                ],
                inner,
                0..6
            )
            .prop_map(|m| Json::Object(m.into_iter().collect())),
        ]
    })
}

/// A valid login event with one field replaced by `v`.
fn mutated_event(field: usize, v: Json) -> Json {
    let mut e = json!({"event_id": "e1", "event_type": "login", "event_time": "2026-11-30T12:00:00Z",
                       "entities": {"user_id": "u1"}, "attributes": {"device": "ios", "country": "NL"}});
    let keys = [
        "event_id",
        "event_type",
        "event_time",
        "entities",
        "attributes",
    ];
    e[keys[field % keys.len()]] = v;
    e
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn stored_bytes_decode_or_fail_cleanly(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
        let _ = decode_value(&bytes);
        let _ = AggState::decode(&bytes);
    }

    #[test]
    fn kafka_payloads_decode_or_fail_cleanly(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Err(e) = decode_event(&REGISTRY, &bytes) {
            prop_assert!(!e.message().is_empty());
        }
    }

    #[test]
    fn json_payloads_and_events_decode_or_fail_cleanly(v in any_json(), field in 0usize..5) {
        let text = v.to_string();
        let _ = decode_event(&REGISTRY, text.as_bytes());
        let _ = Event::parse_json(&REGISTRY, &v);
        let mutated = mutated_event(field, v);
        match Event::parse_json(&REGISTRY, &mutated) {
            // What parses writes back as JSON that parses to the same event.
            Ok(e) => {
                let again = Event::parse_json(&REGISTRY, &e.to_json()).unwrap();
                prop_assert_eq!(again.to_json(), e.to_json());
            }
            Err(e) => prop_assert!(!e.message().is_empty()),
        }
    }

    #[test]
    fn registry_text_loads_or_fails_cleanly(
        cut_at in 0usize..4000,
        junk in ".{0,16}",
        line in 0usize..200,
    ) {
        // The sample registry with a line replaced, and cut short.
        let text = REGISTRY_TEXT.as_str();
        let mut lines: Vec<&str> = text.lines().collect();
        let i = line % lines.len();
        lines[i] = &junk;
        let edited = lines.join("\n");
        let _ = Registry::from_toml("edited.toml", &edited);
        let end = text.char_indices().map(|(i, _)| i).take_while(|i| *i <= cut_at).last().unwrap_or(0);
        let _ = Registry::from_toml("cut.toml", &text[..end]);
    }
}
