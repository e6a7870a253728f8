//! Conversions between `quiver.v1` wire types and domain types that more
//! than one crate needs: values and timestamps (server), events (server's
//! `PushEvents` and the Kafka messages that `quiver-ingest` produces and
//! consumes). Generated types stop here.

use pb::value::Kind;
use quiver_proto::prost::Message;
use quiver_proto::prost_types::Timestamp;
use quiver_proto::v1 as pb;

use crate::event::Event;
use crate::time::Micros;
use crate::{Error, Result, Value};

/// Epoch microseconds of a protobuf timestamp; rejects out-of-range nanos.
pub fn ts_to_micros(t: &Timestamp) -> Result<Micros> {
    if !(0..1_000_000_000).contains(&t.nanos) {
        return Err(Error::invalid(format!(
            "timestamp nanos {} out of range 0..1e9",
            t.nanos
        )));
    }
    t.seconds
        .checked_mul(1_000_000)
        .and_then(|s| s.checked_add(i64::from(t.nanos / 1000)))
        .ok_or_else(|| Error::invalid(format!("timestamp seconds {} out of range", t.seconds)))
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
    let event_time = ts_to_micros(
        e.event_time
            .as_ref()
            .ok_or_else(|| Error::invalid("event_time is required"))?,
    )?;
    let mut entities = e
        .entities
        .into_iter()
        .map(|(k, v)| Ok((k, value_from_pb(v)?)))
        .collect::<Result<Vec<_>>>()?;
    entities.sort_by(|a, b| a.0.cmp(&b.0));
    let mut attributes = e
        .attributes
        .into_iter()
        .map(|(k, v)| Ok((k, value_from_pb(v)?)))
        .collect::<Result<Vec<_>>>()?;
    attributes.sort_by(|a, b| a.0.cmp(&b.0));
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
    let mut ev = if first == Some(&b'{') {
        let json: serde_json::Value = serde_json::from_slice(payload)
            .map_err(|e| Error::invalid(format!("invalid JSON event: {e}")))?;
        Event::from_json(reg, &json)?
    } else {
        let pb = pb::Event::decode(payload)
            .map_err(|e| Error::invalid(format!("not a quiver.v1.Event protobuf message: {e}")))?;
        let ev = event_from_pb(pb)?;
        crate::event::validate(reg, &ev)?;
        ev
    };
    crate::event::normalize(reg, &mut ev);
    Ok(ev)
}
