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
use crate::error::{Error, Result};
use crate::json::{value_from_json, value_to_json};
use crate::registry::{EventType, Registry};
use crate::time::{format_rfc3339, parse_rfc3339, Micros};
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
            Error::invalid(format!("event {:?} lacks join key {jk:?}", self.event_id))
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
            "unknown event_type {name:?}; declared event types: {}",
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
        "event type {:?} has no entity with join key {k:?}; it takes {}",
        et.name,
        et.join_keys.join(", ")
    ))
}

fn unknown_attribute(et: &EventType, k: &str) -> Error {
    Error::invalid(format!(
        "event type {:?} has no attribute {k:?}; its attributes: {}",
        et.name,
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
