//! JSON form of typed values, shared by the REST gateway and the JSON form
//! of events: numbers, strings, booleans and arrays as themselves; bytes as
//! base64 strings; timestamps as RFC 3339 strings; NaN and infinities (which
//! JSON lacks) as the strings `"NaN"`, `"Infinity"`, `"-Infinity"`, like
//! protobuf's JSON mapping.

use base64::Engine;
use serde_json::{json, Value as Json_};

use crate::time::{format_rfc3339, parse_rfc3339};
use crate::value::{Value, ValueType};

/// How a JSON value is spelled in messages ("a string", "null", ...).
pub fn json_kind(v: &Json_) -> &'static str {
    match v {
        Json_::Null => "null",
        Json_::Bool(_) => "a boolean",
        Json_::Number(_) => "a number",
        Json_::String(_) => "a string",
        Json_::Array(_) => "an array",
        Json_::Object(_) => "an object",
    }
}

/// A JSON value read as the declared type `ty`. Bytes are base64 strings,
/// timestamps RFC 3339 strings.
pub fn value_from_json(v: &Json_, ty: ValueType) -> Result<Value, String> {
    if v.is_null() {
        return Ok(Value::Null);
    }
    let wrong = || format!("expected {ty}, got {}", json_kind(v));
    let int = |v: &Json_| v.as_i64().ok_or_else(wrong);
    let float = |v: &Json_| v.as_f64().ok_or_else(wrong);
    let string = |v: &Json_| v.as_str().map(str::to_owned).ok_or_else(wrong);
    let boolean = |v: &Json_| v.as_bool().ok_or_else(wrong);
    let bytes = |v: &Json_| {
        let s = v.as_str().ok_or_else(wrong)?;
        base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(|e| format!("expected base64 bytes: {e}"))
    };
    fn list<T>(
        v: &Json_,
        item: impl Fn(&Json_) -> Result<T, String>,
        wrong: impl Fn() -> String,
    ) -> Result<Vec<T>, String> {
        v.as_array().ok_or_else(&wrong)?.iter().map(item).collect()
    }
    Ok(match ty {
        ValueType::Int64 => Value::Int64(int(v)?),
        ValueType::Double => Value::Double(float(v)?),
        ValueType::String => Value::String(string(v)?),
        ValueType::Bool => Value::Bool(boolean(v)?),
        ValueType::Bytes => Value::Bytes(bytes(v)?),
        ValueType::Timestamp => {
            let s = string(v)?;
            Value::Timestamp(
                parse_rfc3339(&s).ok_or_else(|| format!("{s:?} is not an RFC 3339 timestamp"))?,
            )
        }
        ValueType::Int64List => Value::Int64List(list(v, int, wrong)?),
        ValueType::DoubleList => Value::DoubleList(list(v, float, wrong)?),
        ValueType::StringList => Value::StringList(list(v, string, wrong)?),
        ValueType::BoolList => Value::BoolList(list(v, boolean, wrong)?),
        ValueType::BytesList => Value::BytesList(list(v, bytes, wrong)?),
        ValueType::FloatList => Value::FloatList(list(v, |x| float(x).map(|f| f as f32), wrong)?),
    })
}

fn f64_json(d: f64) -> Json_ {
    // JSON has no NaN or infinities; spell them as strings like protobuf's JSON mapping.
    serde_json::Number::from_f64(d).map_or_else(
        || {
            Json_::String(
                if d.is_nan() {
                    "NaN"
                } else if d > 0.0 {
                    "Infinity"
                } else {
                    "-Infinity"
                }
                .to_owned(),
            )
        },
        Json_::Number,
    )
}

/// A domain value as JSON, see the module docs for the mapping.
pub fn value_to_json(v: &Value) -> Json_ {
    let b64 = |b: &[u8]| Json_::String(base64::engine::general_purpose::STANDARD.encode(b));
    // f32 -> shortest decimal -> f64, so 0.1f32 prints as 0.1, not 0.10000000149011612.
    let f32_json = |x: f32| f64_json(x.to_string().parse().unwrap_or(f64::from(x)));
    match v {
        Value::Null => Json_::Null,
        Value::Int64(n) => json!(n),
        Value::Double(d) => f64_json(*d),
        Value::String(s) => json!(s),
        Value::Bool(b) => json!(b),
        Value::Bytes(b) => b64(b),
        Value::Timestamp(t) => json!(format_rfc3339(*t)),
        Value::Int64List(l) => json!(l),
        Value::DoubleList(l) => Json_::Array(l.iter().map(|d| f64_json(*d)).collect()),
        Value::StringList(l) => json!(l),
        Value::BoolList(l) => json!(l),
        Value::BytesList(l) => Json_::Array(l.iter().map(|b| b64(b)).collect()),
        Value::FloatList(l) => Json_::Array(l.iter().map(|x| f32_json(*x)).collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_values_follow_the_declared_type() {
        assert_eq!(
            value_from_json(&json!(3), ValueType::Double).unwrap(),
            Value::Double(3.0)
        );
        assert_eq!(
            value_from_json(&json!(null), ValueType::Int64).unwrap(),
            Value::Null
        );
        assert!(value_from_json(&json!(1.5), ValueType::Int64)
            .unwrap_err()
            .contains("expected int64"));
        assert!(value_from_json(&json!("x"), ValueType::Bool).is_err());
        assert_eq!(
            value_from_json(&json!([0.5, 1]), ValueType::FloatList).unwrap(),
            Value::FloatList(vec![0.5, 1.0])
        );
        assert_eq!(
            value_from_json(&json!("AQI="), ValueType::Bytes).unwrap(),
            Value::Bytes(vec![1, 2])
        );
        let ts = value_from_json(&json!("2026-01-02T03:04:05Z"), ValueType::Timestamp).unwrap();
        assert_eq!(value_to_json(&ts), json!("2026-01-02T03:04:05.000000Z"));
    }

    #[test]
    fn json_output_is_readable() {
        assert_eq!(
            value_to_json(&Value::FloatList(vec![0.1, -2.5])),
            json!([0.1, -2.5])
        );
        assert_eq!(value_to_json(&Value::Double(f64::NAN)), json!("NaN"));
        assert_eq!(value_to_json(&Value::Bytes(vec![1, 2])), json!("AQI="));
    }
}
