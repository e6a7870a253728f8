//! Conversions between `quiver.v1` wire types and domain types that more
//! than one crate needs: values and timestamps (server), events (server's
//! `PushEvents` and the Kafka messages that `quiver-ingest` produces and
//! consumes). Generated types stop here.

use pb::value::Kind;
use quiver_proto::prost::Message;
use quiver_proto::prost_types::Timestamp;
use quiver_proto::v1 as pb;

use crate::error::cut;
use crate::event::Event;
use crate::time::Micros;
use crate::{Error, Result, Value};

/// Epoch microseconds of a protobuf timestamp. Nanoseconds past the
/// microsecond are dropped (rounded toward the past, like RFC 3339 digits
/// past the sixth); `nanos` outside `0..1e9` and instants outside
/// `google.protobuf.Timestamp`'s range (see [`crate::time::check_range`])
/// are refused.
pub fn ts_to_micros(t: &Timestamp) -> Result<Micros> {
    if !(0..1_000_000_000).contains(&t.nanos) {
        return Err(Error::invalid(format!(
            "timestamp nanos {} out of range 0..999999999",
            t.nanos
        )));
    }
    t.seconds
        .checked_mul(1_000_000)
        .and_then(|s| s.checked_add(i64::from(t.nanos / 1000)))
        .ok_or_else(|| {
            Error::invalid(format!(
                "timestamp seconds {} is outside the supported range {}",
                t.seconds,
                crate::time::RANGE_TEXT
            ))
        })
        .and_then(|m| crate::time::check_range(m).map_err(Error::invalid))
}

/// A protobuf timestamp of epoch microseconds.
pub fn micros_to_ts(m: Micros) -> Timestamp {
    Timestamp {
        seconds: m.div_euclid(1_000_000),
        nanos: (m.rem_euclid(1_000_000) * 1000) as i32,
    }
}

/// Domain value of a wire value.
pub fn value_from_pb(v: pb::Value) -> Result<Value> {
    Ok(match v.kind {
        None | Some(Kind::NullVal(_)) => Value::Null,
        Some(Kind::Int64Val(n)) => Value::Int64(n),
        Some(Kind::DoubleVal(d)) => Value::Double(d),
        Some(Kind::StringVal(s)) => Value::String(s),
        Some(Kind::BoolVal(b)) => Value::Bool(b),
        Some(Kind::BytesVal(b)) => Value::Bytes(b),
        Some(Kind::TimestampVal(t)) => Value::Timestamp(ts_to_micros(&t)?),
        Some(Kind::Int64ListVal(l)) => Value::Int64List(l.val),
        Some(Kind::DoubleListVal(l)) => Value::DoubleList(l.val),
        Some(Kind::StringListVal(l)) => Value::StringList(l.val),
        Some(Kind::BoolListVal(l)) => Value::BoolList(l.val),
        Some(Kind::BytesListVal(l)) => Value::BytesList(l.val),
        Some(Kind::FloatListVal(l)) => Value::FloatList(l.val),
    })
}

/// Wire value of a domain value.
pub fn value_to_pb(v: Value) -> pb::Value {
    let kind = match v {
        Value::Null => None,
        Value::Int64(n) => Some(Kind::Int64Val(n)),
        Value::Double(d) => Some(Kind::DoubleVal(d)),
        Value::String(s) => Some(Kind::StringVal(s)),
        Value::Bool(b) => Some(Kind::BoolVal(b)),
        Value::Bytes(b) => Some(Kind::BytesVal(b)),
        Value::Timestamp(t) => Some(Kind::TimestampVal(micros_to_ts(t))),
        Value::Int64List(val) => Some(Kind::Int64ListVal(pb::Int64List { val })),
        Value::DoubleList(val) => Some(Kind::DoubleListVal(pb::DoubleList { val })),
        Value::StringList(val) => Some(Kind::StringListVal(pb::StringList { val })),
        Value::BoolList(val) => Some(Kind::BoolListVal(pb::BoolList { val })),
        Value::BytesList(val) => Some(Kind::BytesListVal(pb::BytesList { val })),
        Value::FloatList(val) => Some(Kind::FloatListVal(pb::FloatList { val })),
    };
    pb::Value { kind }
}

/// Domain event of a wire event (not yet validated against the registry).
pub fn event_from_pb(e: pb::Event) -> Result<Event> {
    let about = |field: &str, e: Error| Error::new(e.kind(), format!("{field}: {}", e.message()));
    let event_time = ts_to_micros(
        e.event_time
            .as_ref()
            .ok_or_else(|| Error::invalid("event_time is required"))?,
    )
    .map_err(|e| about("event_time", e))?;
    let typed = |m: std::collections::BTreeMap<String, pb::Value>| {
        m.into_iter()
            .map(|(k, v)| {
                let v = value_from_pb(v).map_err(|e| about(&cut(&k), e))?;
                Ok((k, v))
            })
            .collect::<Result<Vec<_>>>()
    };
    // Protobuf maps arrive as BTreeMaps: entities and attributes in name order.
    let entities = typed(e.entities)?;
    let attributes = typed(e.attributes)?;
    Ok(Event {
        event_id: e.event_id,
        event_type: e.event_type,
        entities,
        event_time,
        attributes,
    })
}

/// Wire event of a domain event.
pub fn event_to_pb(e: &Event) -> pb::Event {
    pb::Event {
        event_id: e.event_id.clone(),
        event_type: e.event_type.clone(),
        entities: e
            .entities
            .iter()
            .map(|(k, v)| (k.clone(), value_to_pb(v.clone())))
            .collect(),
        event_time: Some(micros_to_ts(e.event_time)),
        attributes: e
            .attributes
            .iter()
            .map(|(k, v)| (k.clone(), value_to_pb(v.clone())))
            .collect(),
    }
}

/// Encodes an event as a protobuf message (the Kafka payload quiver writes).
pub fn encode_event(e: &Event) -> Vec<u8> {
    event_to_pb(e).encode_to_vec()
}

/// Decodes a Kafka payload: a protobuf `quiver.v1.Event`, or the JSON form
/// of [`Event::to_json`] (a payload starting with `{`), so that any producer
/// can write events. Validates against the registry.
pub fn decode_event(reg: &crate::Registry, payload: &[u8]) -> Result<Event> {
    let first = payload.iter().find(|b| !b.is_ascii_whitespace());
    if first == Some(&b'{') {
        let json = crate::json::parse_strict(payload)
            .map_err(|e| Error::invalid(format!("invalid JSON event: {e}")))?;
        return Event::from_json(reg, &json);
    }
    let pb = pb::Event::decode(payload)
        .map_err(|e| Error::invalid(format!("not a quiver.v1.Event protobuf message: {e}")))?;
    crate::event::checked(reg, event_from_pb(pb)?)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::codec::{decode_value, encode_value};
    use crate::testing::{same_bits, typed_value};
    use crate::time::{MAX_MICROS, MIN_MICROS};

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// A value sent over gRPC, stored online and read back is the same
        /// value, bit for bit (NaN payloads and -0.0 included).
        #[test]
        fn protobuf_to_stored_bytes_to_protobuf((_ty, v) in typed_value()) {
            let wire = value_to_pb(v.clone()).encode_to_vec();
            let received = value_from_pb(pb::Value::decode(wire.as_slice()).unwrap()).unwrap();
            let stored = decode_value(&encode_value(&received)).unwrap();
            prop_assert!(same_bits(&v, &stored), "{:?} -> {:?}", v, stored);
            let served = value_from_pb(value_to_pb(stored)).unwrap();
            prop_assert!(same_bits(&v, &served));
        }

        /// Every accepted instant survives a protobuf timestamp.
        #[test]
        fn timestamps_in_range_round_trip(m in MIN_MICROS..=MAX_MICROS) {
            prop_assert_eq!(ts_to_micros(&micros_to_ts(m)).unwrap(), m);
        }
    }

    #[test]
    fn timestamps_outside_protobufs_range_are_refused() {
        for m in [MIN_MICROS - 1, MAX_MICROS + 1] {
            let e = ts_to_micros(&micros_to_ts(m)).unwrap_err();
            assert!(e.message().contains("outside the supported range"), "{e}");
        }
        // Sub-microsecond digits are dropped toward the past.
        let t = Timestamp {
            seconds: -1,
            nanos: 999_999_999,
        };
        assert_eq!(ts_to_micros(&t).unwrap(), -1);
    }

    #[test]
    fn timestamps_round_trip_including_negative() {
        for m in [0, 1, -1, 1_764_000_000_123_456, -86_400_000_001] {
            assert_eq!(ts_to_micros(&micros_to_ts(m)).unwrap(), m);
        }
        assert!(ts_to_micros(&Timestamp {
            seconds: 0,
            nanos: -1
        })
        .is_err());
        assert!(ts_to_micros(&Timestamp {
            seconds: i64::MAX,
            nanos: 0
        })
        .is_err());
    }

    #[test]
    fn events_round_trip_in_protobuf_and_json() {
        let reg = crate::Registry::from_toml(
            "r.toml",
            r#"
[[entities]]
name = "user"
join_key = "user_id"

[[event_types]]
name = "purchase"
entities = ["user"]
attributes = [{ name = "amount", dtype = "double" }, { name = "note", dtype = "string", optional = true }]
"#,
        )
        .unwrap();
        let ev = Event {
            event_id: "e1".into(),
            event_type: "purchase".into(),
            entities: vec![("user_id".into(), Value::String("u1".into()))],
            event_time: 1_764_000_000_000_001,
            attributes: vec![("amount".into(), Value::Double(9.5))],
        };
        assert_eq!(decode_event(&reg, &encode_event(&ev)).unwrap(), ev);
        let json = serde_json::to_vec(&ev.to_json()).unwrap();
        assert_eq!(decode_event(&reg, &json).unwrap(), ev);
        // int64 where double is declared is taken and stored as double.
        let loose = br#"{"event_id":"e1","event_type":"purchase","event_time":"2025-11-24T16:00:00.000001Z","entities":{"user_id":"u1"},"attributes":{"amount":9}}"#;
        let e = decode_event(&reg, loose).unwrap();
        assert_eq!(e.attributes, vec![("amount".into(), Value::Double(9.0))]);
        // A JSON payload from any producer: the offset names the instant
        // (the tile the event counts in), NaN is spelled as in the REST API.
        let offset = br#"{"event_id":"e1","event_type":"purchase","event_time":"2025-11-24T21:30:00.000001+05:30","entities":{"user_id":"u1"},"attributes":{"amount":"NaN"}}"#;
        let e = decode_event(&reg, offset).unwrap();
        assert_eq!(
            e.event_time,
            crate::time::parse_rfc3339("2025-11-24T16:00:00.000001Z").unwrap()
        );
        assert!(matches!(e.attributes[0].1, Value::Double(d) if d.is_nan()));
        for (bad, needle) in [
            (&b"\x08\x01garbage"[..], "not a quiver.v1.Event"),
            (br#"{"event_id":"e1"}"#, "event_type is required"),
            (br#"{"event_id":"e1","event_type":"purchase","event_time":"2025-11-24T16:00:00Z","entities":{"user_id":"u1"}}"#, "missing attribute \"amount\""),
            (br#"{"event_id":"e1","event_type":"purchase","event_time":"2025-11-24T16:00:00Z","entities":{"user_id":5},"attributes":{"amount":1}}"#, "user_id takes string"),
            (br#"{"event_id":"","event_type":"purchase","event_time":"2025-11-24T16:00:00Z","entities":{"user_id":"u"},"attributes":{"amount":1}}"#, "event_id must be"),
            (br#"{"event_id":"e","event_type":"purchase","event_time":"2025-11-24T16:00:00Z","entities":{"user_id":"u"},"attributes":{"amount":1,"x":2}}"#, "has no attribute \"x\""),
        ] {
            let e = decode_event(&reg, bad).unwrap_err();
            assert!(e.message().contains(needle), "{needle:?} not in {e}");
        }
    }

    #[test]
    fn values_round_trip() {
        for v in [
            Value::Null,
            Value::Int64(-3),
            Value::Double(2.5),
            Value::String("x".into()),
            Value::Bool(true),
            Value::Bytes(vec![1, 2]),
            Value::Timestamp(1_764_000_000_000_001),
            Value::Int64List(vec![1]),
            Value::DoubleList(vec![1.5]),
            Value::StringList(vec!["a".into()]),
            Value::BoolList(vec![false]),
            Value::BytesList(vec![vec![9]]),
            Value::FloatList(vec![0.25]),
        ] {
            assert_eq!(value_from_pb(value_to_pb(v.clone())).unwrap(), v);
        }
    }
}
