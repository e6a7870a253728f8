//! Events: what producers push and `quiver ingest` turns into features.
//!
//! An event has an id (unique per event; replays with the same id are the
//! same event), a type declared in the registry, the join keys of the type's
//! entities, an event time and typed attributes. [`validate`] checks one
//! against the registry; the wire forms are protobuf (`quiver.v1.Event`) and
//! JSON ([`Event::to_json`] / [`Event::from_json`]), both accepted on Kafka.

use async_trait::async_trait;
use serde_json::{Map, Value as Json};

use crate::codec::entity_key;
use crate::error::{quote, Error, Result};
use crate::json::{value_from_json, value_to_json};
use crate::registry::{EventType, Registry};
use crate::time::{duration_micros, format_rfc3339, parse_rfc3339, Micros};
use crate::value::{Value, ValueType};

/// Where pushed events go: the event log that `quiver ingest` consumes
/// (Kafka, or the embedded mode's in-process broker).
#[async_trait]
pub trait EventSink: Send + Sync + 'static {
    /// Appends validated events durably (acknowledged by the log) and
    /// returns one result per event, in order. An `Err` of the whole call
    /// means nothing can be appended (log unreachable).
    async fn publish(&self, events: &[Event]) -> Result<Vec<Result<()>>>;
}

/// The event times quiver accepts, relative to a reference clock (the
/// server's for `PushEvents`; for events read from Kafka, the message's
/// Kafka timestamp capped at the ingest process's clock): at most
/// `max_future_skew` ahead of it and, when `max_age` is set, at most
/// `max_age` behind it. Events outside are refused by
/// `PushEvents` and dead-lettered by `quiver ingest`, with the reason.
///
/// The defaults follow Kafka's own bounds on message timestamps (KIP-937:
/// `log.message.timestamp.after.max.ms` = 1 hour,
/// `log.message.timestamp.before.max.ms` = unbounded): a producer's clock
/// may run an hour fast, and any history may be replayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventTimeBounds {
    /// Largest accepted lead of an event time over the reference clock.
    pub max_future_skew: std::time::Duration,
    /// Largest accepted age of an event time behind the reference clock;
    /// `None` accepts any past time in the supported range.
    pub max_age: Option<std::time::Duration>,
}

impl Default for EventTimeBounds {
    fn default() -> Self {
        EventTimeBounds {
            max_future_skew: std::time::Duration::from_secs(3600),
            max_age: None,
        }
    }
}

impl EventTimeBounds {
    /// `max_future_skew` in microseconds.
    pub fn max_future_skew_micros(&self) -> Micros {
        duration_micros(self.max_future_skew)
    }

    /// Checks `event_time` against the reference time `now` (both epoch
    /// micros); the error says by how much and which setting refuses it.
    pub fn check(&self, event_time: Micros, now: Micros) -> std::result::Result<(), String> {
        let ahead = i128::from(event_time) - i128::from(now);
        if ahead > i128::from(self.max_future_skew_micros()) {
            return Err(format!(
                "event_time {} is {} ahead of the clock ({}); events more than {} in the future are refused (ingest.max_future_skew)",
                format_rfc3339(event_time),
                span(ahead),
                format_rfc3339(now),
                humantime::format_duration(self.max_future_skew)
            ));
        }
        if let Some(max_age) = self.max_age {
            if -ahead > i128::from(duration_micros(max_age)) {
                return Err(format!(
                    "event_time {} is {} older than the clock ({}); events older than {} are refused (ingest.max_event_age)",
                    format_rfc3339(event_time),
                    span(-ahead),
                    format_rfc3339(now),
                    humantime::format_duration(max_age)
                ));
            }
        }
        Ok(())
    }
}

/// A positive span of micros in days, hours, minutes and seconds
/// ("2d 3h 0m 5s" without the zero parts: "2d 3h 5s"), or "less than a
/// second".
fn span(micros: i128) -> String {
    let secs = micros / 1_000_000;
    if secs <= 0 {
        return "less than a second".to_owned();
    }
    let parts = [
        (secs / 86_400, "d"),
        (secs % 86_400 / 3600, "h"),
        (secs % 3600 / 60, "m"),
        (secs % 60, "s"),
    ];
    parts
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, unit)| format!("{n}{unit}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Longest accepted event id, in bytes.
pub const MAX_EVENT_ID_LEN: usize = 256;

/// One event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Unique id.
    pub event_id: String,
    /// Registry event type.
    pub event_type: String,
    /// Join key and value pairs.
    pub entities: Vec<(String, Value)>,
    /// When it happened.
    pub event_time: Micros,
    /// Attribute name and value pairs.
    pub attributes: Vec<(String, Value)>,
}

impl Event {
    /// The value of join key `join_key`.
    pub fn entity(&self, join_key: &str) -> Option<&Value> {
        self.entities
            .iter()
            .find(|(k, _)| k == join_key)
            .map(|(_, v)| v)
    }

    /// The value of attribute `name`.
    pub fn attribute(&self, name: &str) -> Option<&Value> {
        self.attributes
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    }

    /// The Kafka message key: the event type's first entity, so that all
    /// events of one user (say) land in one partition, in order.
    pub fn partition_key(&self, et: &EventType) -> Result<String> {
        let jk = et
            .join_keys
            .first()
            .ok_or_else(|| Error::invalid(format!("event type {:?} has no entities", et.name)))?;
        let v = self.entity(jk).ok_or_else(|| {
            Error::invalid(format!(
                "event {} lacks join key {jk:?}",
                quote(&self.event_id)
            ))
        })?;
        entity_key(&[(jk.as_str(), v)])
    }

    /// The JSON form: `{"event_id", "event_type", "event_time" (RFC 3339),
    /// "entities": {join_key: value}, "attributes": {name: value}}`, values
    /// as in [`crate::json`] (the REST gateway's mapping).
    pub fn to_json(&self) -> Json {
        let mut entities = Map::new();
        for (k, v) in &self.entities {
            entities.insert(k.clone(), value_to_json(v));
        }
        let mut attributes = Map::new();
        for (k, v) in &self.attributes {
            attributes.insert(k.clone(), value_to_json(v));
        }
        serde_json::json!({
            "event_id": self.event_id,
            "event_type": self.event_type,
            "event_time": format_rfc3339(self.event_time),
            "entities": entities,
            "attributes": attributes,
        })
    }

    /// Parses and checks the JSON form (see [`checked`]). Errors name the
    /// offending field.
    pub fn from_json(reg: &Registry, json: &Json) -> Result<Event> {
        checked(reg, Event::parse_json(reg, json)?)
    }

    /// Parses the JSON form, typing values by the registry, without the
    /// checks of [`checked`] (for callers that check every event anyway).
    pub fn parse_json(reg: &Registry, json: &Json) -> Result<Event> {
        let obj = json
            .as_object()
            .ok_or_else(|| Error::invalid("an event must be a JSON object"))?;
        const FIELDS: [&str; 5] = [
            "event_id",
            "event_type",
            "event_time",
            "entities",
            "attributes",
        ];
        if let Some(k) = obj.keys().find(|k| !FIELDS.contains(&k.as_str())) {
            return Err(Error::invalid(format!(
                "unknown field {} in an event; its fields are {}",
                crate::error::quote(k),
                FIELDS.join(", ")
            )));
        }
        let str_field = |name: &str| -> Result<String> {
            match obj.get(name) {
                Some(Json::String(s)) => Ok(s.clone()),
                Some(_) => Err(Error::invalid(format!("{name} must be a string"))),
                None => Err(Error::invalid(format!("{name} is required"))),
            }
        };
        let event_id = str_field("event_id")?;
        let event_type = str_field("event_type")?;
        let et = require_type(reg, &event_type)?;
        let time_text = str_field("event_time")?;
        let event_time =
            parse_rfc3339(&time_text).map_err(|m| Error::invalid(format!("event_time: {m}")))?;
        let mut entities = Vec::new();
        if let Some(m) = obj.get("entities") {
            let m = m
                .as_object()
                .ok_or_else(|| Error::invalid("entities must be an object of join key to value"))?;
            for (k, v) in m {
                let ty = et
                    .join_keys
                    .iter()
                    .position(|jk| jk == k)
                    .map(|i| et.key_types[i])
                    .ok_or_else(|| unknown_key(et, k))?;
                entities.push((k.clone(), typed(v, ty, k)?));
            }
        }
        let mut attributes = Vec::new();
        if let Some(m) = obj.get("attributes") {
            let m = m
                .as_object()
                .ok_or_else(|| Error::invalid("attributes must be an object of name to value"))?;
            for (k, v) in m {
                let ty = et.attribute(k).ok_or_else(|| unknown_attribute(et, k))?;
                attributes.push((k.clone(), typed(v, ty, k)?));
            }
        }
        Ok(Event {
            event_id,
            event_type,
            entities,
            event_time,
            attributes,
        })
    }
}

fn require_type<'r>(reg: &'r Registry, name: &str) -> Result<&'r EventType> {
    reg.event_type(name).ok_or_else(|| {
        Error::invalid(format!(
            "unknown event_type {}; declared event types: {}",
            quote(name),
            reg.event_types()
                .iter()
                .map(|e| e.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })
}

fn unknown_key(et: &EventType, k: &str) -> Error {
    Error::invalid(format!(
        "event type {:?} has no entity with join key {}; it takes {}",
        et.name,
        quote(k),
        et.join_keys.join(", ")
    ))
}

fn unknown_attribute(et: &EventType, k: &str) -> Error {
    Error::invalid(format!(
        "event type {:?} has no attribute {}; its attributes: {}",
        et.name,
        quote(k),
        et.attributes
            .iter()
            .map(|(n, t)| format!("{n} ({t})"))
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

/// Checks an event against the registry: known type, every join key of
/// the type present and typed, attributes declared and typed (int64 is
/// taken where double is declared), required attributes present.
pub fn validate(reg: &Registry, ev: &Event) -> Result<()> {
    if ev.event_id.is_empty() || ev.event_id.len() > MAX_EVENT_ID_LEN {
        return Err(Error::invalid(format!(
            "event_id must be 1-{MAX_EVENT_ID_LEN} bytes"
        )));
    }
    let et = require_type(reg, &ev.event_type)?;
    for (jk, ty) in et.join_keys.iter().zip(&et.key_types) {
        match ev.entity(jk) {
            None => {
                return Err(Error::invalid(format!(
                    "missing join key {jk:?}; event type {:?} takes {}",
                    et.name,
                    et.join_keys.join(", ")
                )))
            }
            Some(v) if v.value_type() != Some(*ty) => {
                return Err(Error::invalid(format!(
                    "join key {jk:?} takes {ty} values, got {}",
                    v.type_name()
                )))
            }
            Some(_) => {}
        }
    }
    for (k, _) in &ev.entities {
        if !et.join_keys.contains(k) {
            return Err(unknown_key(et, k));
        }
    }
    for (k, v) in &ev.attributes {
        let ty = et.attribute(k).ok_or_else(|| unknown_attribute(et, k))?;
        let ok = v.is_null()
            || v.value_type() == Some(ty)
            || (ty == ValueType::Double && matches!(v, Value::Int64(_)));
        if !ok {
            return Err(Error::invalid(format!(
                "attribute {k:?} is {ty}, got {}",
                v.type_name()
            )));
        }
        if v.is_null() && !et.optional.contains(k) {
            return Err(Error::invalid(format!(
                "attribute {k:?} is required (not optional) and cannot be null"
            )));
        }
    }
    for (name, _) in &et.attributes {
        if !et.optional.contains(name) && ev.attribute(name).is_none() {
            return Err(Error::invalid(format!(
                "missing attribute {name:?}; event type {:?} requires it",
                et.name
            )));
        }
    }
    Ok(())
}

/// An event ready to append: [`validate`]d, and with int64 values of
/// double attributes turned into doubles (exactly, see
/// [`crate::value::coerce`]), so stored and archived values have the
/// declared type.
pub fn checked(reg: &Registry, mut ev: Event) -> Result<Event> {
    validate(reg, &ev)?;
    let et = require_type(reg, &ev.event_type)?;
    for (k, v) in &mut ev.attributes {
        if let (Some(ValueType::Double), Value::Int64(_)) = (et.attribute(k), &*v) {
            let taken = std::mem::replace(v, Value::Null);
            *v = crate::value::coerce(taken, ValueType::Double)
                .map_err(|m| Error::invalid(format!("attribute {k:?}: {m}")))?;
        }
    }
    Ok(ev)
}

/// `j` read as `ty` (see [`crate::json`]); errors name the field.
fn typed(j: &Json, ty: ValueType, field: &str) -> Result<Value> {
    value_from_json(j, ty).map_err(|m| Error::invalid(format!("{field} takes {ty} values: {m}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const NOW: Micros = 1_764_500_000_000_000;
    const HOUR: Micros = 3_600_000_000;

    #[test]
    fn bounds_take_the_edges_and_refuse_past_them() {
        let b = EventTimeBounds {
            max_future_skew: Duration::from_secs(3600),
            max_age: Some(Duration::from_secs(7 * 86_400)),
        };
        assert!(b.check(NOW + HOUR, NOW).is_ok());
        assert!(b.check(NOW - 7 * 24 * HOUR, NOW).is_ok());
        let ahead = b.check(NOW + HOUR + 1, NOW).unwrap_err();
        assert!(ahead.contains("ingest.max_future_skew"), "{ahead}");
        assert!(ahead.contains("is 1h ahead of the clock"), "{ahead}");
        let old = b.check(NOW - 8 * 24 * HOUR, NOW).unwrap_err();
        assert!(old.contains("is 8d older than the clock"), "{old}");
        assert_eq!(
            span((2 * 86_400 + 3 * 3600 + 5) * 1_000_000_i128 + 7),
            "2d 3h 5s"
        );
        assert_eq!(span(999_999), "less than a second");
        assert!(old.contains("ingest.max_event_age"), "{old}");
        // The whole supported range, both ways, without overflow.
        let far = EventTimeBounds {
            max_future_skew: Duration::MAX,
            max_age: Some(Duration::MAX),
        };
        for (t, now) in [
            (crate::time::MAX_MICROS, crate::time::MIN_MICROS),
            (crate::time::MIN_MICROS, crate::time::MAX_MICROS),
        ] {
            assert!(far.check(t, now).is_ok());
            assert!(b.check(t, now).is_err());
        }
        // No age bound by default.
        assert!(EventTimeBounds::default()
            .check(crate::time::MIN_MICROS, NOW)
            .is_ok());
    }
}
