//! JSON form of typed values, shared by the REST gateway and the JSON form
//! of events (on Kafka too): numbers, strings, booleans and arrays as
//! themselves; bytes as base64 strings; timestamps as RFC 3339 strings
//! (written in UTC with six fractional digits, read in any RFC 3339 form,
//! see [`crate::time::parse_rfc3339`]); NaN and infinities (which JSON
//! lacks) as the strings `"NaN"`, `"Infinity"`, `"-Infinity"`, like
//! protobuf's JSON mapping. Reading also takes what that mapping allows
//! besides: int64 as decimal strings, base64 in the URL-safe alphabet or
//! without padding. Lists cannot hold nulls.

use base64::Engine;
use serde_json::{json, Value as Json_};

use crate::error::{cut, quote};
use crate::time::{format_rfc3339, parse_rfc3339};
use crate::value::{f64_to_f32, parse_int64};
use crate::value::{Value, ValueType};

/// Parses JSON text into a value, refusing an object with a key twice: a
/// JSON parser keeps one of them silently (serde_json the last), so
/// `{"user_id": "a", "user_id": "b"}` would write to `b` without a word.
/// RFC 8259 leaves duplicate names to the implementation; quiver says no.
/// Numbers keep the text sent (serde_json's `arbitrary_precision`).
pub fn parse_strict(text: &[u8]) -> Result<Json_, String> {
    // A first pass only looks at keys; the second builds the value.
    let mut de = serde_json::Deserializer::from_slice(text);
    serde::Deserialize::deserialize(&mut de)
        .map(|UniqueKeys| ())
        .map_err(|e| e.to_string())?;
    serde_json::from_slice(text).map_err(|e| e.to_string())
}

/// Walks a JSON document, failing on an object with a key twice.
struct UniqueKeys;

impl<'de> serde::Deserialize<'de> for UniqueKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<UniqueKeys, D::Error> {
        d.deserialize_any(UniqueKeysVisitor)
    }
}

struct UniqueKeysVisitor;

impl<'de> serde::de::Visitor<'de> for UniqueKeysVisitor {
    type Value = UniqueKeys;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_unit<E>(self) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }
    fn visit_bool<E>(self, _: bool) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }
    fn visit_i64<E>(self, _: i64) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }
    fn visit_u64<E>(self, _: u64) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }
    fn visit_f64<E>(self, _: f64) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }
    fn visit_str<E>(self, _: &str) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<UniqueKeys, A::Error> {
        while seq.next_element::<UniqueKeys>()?.is_some() {}
        Ok(UniqueKeys)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<UniqueKeys, A::Error> {
        let mut seen = std::collections::HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            map.next_value::<UniqueKeys>()?;
            if !seen.insert(key.clone()) {
                return Err(serde::de::Error::custom(format!(
                    "the key {} appears twice in one object",
                    quote(&key)
                )));
            }
        }
        Ok(UniqueKeys)
    }
}

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

/// The literal text of a JSON number, and whether it is an integer literal
/// (no fraction, no exponent).
fn literal(n: &serde_json::Number) -> (&str, bool) {
    let t = n.as_str();
    (t, !t.contains(['.', 'e', 'E']))
}

/// Reads a JSON int64: an integer literal (`42`, `-0`), or a decimal string
/// (`"42"`, as protobuf's JSON mapping writes int64 so that JavaScript
/// clients keep every digit). A number with a fraction or an exponent is
/// refused: it is a decimal, and `3.0` as an id or a count is more likely a
/// float that lost track of its type than an integer.
fn int64_from_json(v: &Json_) -> Result<i64, String> {
    match v {
        Json_::Number(n) => match literal(n) {
            (t, true) => parse_int64(t),
            (t, false) => Err(format!(
                "{} is not an int64: write an integer from -9223372036854775808 to 9223372036854775807 without a fraction or exponent",
                cut(t)
            )),
        },
        Json_::String(s) => {
            let digits = s.strip_prefix(['-', '+']).unwrap_or(s);
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!(
                    "expected int64 (an integer, or one as a decimal string), got the string {}",
                    quote(s)
                ));
            }
            parse_int64(s)
        }
        other => Err(format!("expected int64, got {}", json_kind(other))),
    }
}

/// The strings that stand for the doubles JSON cannot write, as in
/// protobuf's JSON mapping.
fn special_f64(s: &str) -> Option<f64> {
    match s {
        "NaN" => Some(f64::NAN),
        "Infinity" => Some(f64::INFINITY),
        "-Infinity" => Some(f64::NEG_INFINITY),
        _ => None,
    }
}

/// Reads a JSON double: a number, or `"NaN"`, `"Infinity"`, `"-Infinity"`.
/// An integer literal must be one the double holds exactly; a decimal
/// (with a fraction or exponent) reads as the nearest double, but one
/// beyond the double range is refused rather than read as an infinity.
fn f64_from_json(v: &Json_, ty: &str) -> Result<f64, String> {
    match v {
        Json_::Number(n) => {
            let (t, integer) = literal(n);
            let d: f64 = t.parse().map_err(|_| format!("{} is not a {ty}", cut(t)))?;
            if integer && format!("{d:.0}") != t {
                Err(format!("the integer {} has no exact double; send it as a double", cut(t)))
            } else if !d.is_finite() {
                Err(format!("{} is out of range for a double", cut(t)))
            } else {
                Ok(d)
            }
        }
        Json_::String(s) => special_f64(s).ok_or_else(|| {
            format!(
                "expected {ty} (a number, or \"NaN\", \"Infinity\", \"-Infinity\"), got the string {}",
                quote(s)
            )
        }),
        other => Err(format!("expected {ty}, got {}", json_kind(other))),
    }
}

/// Reads a JSON float32: an integer literal the float32 holds exactly, or a
/// double (see [`f64_from_json`]) rounded to the nearest float32; finite
/// numbers beyond float32's range are refused rather than turned into
/// infinities.
fn f32_from_json(v: &Json_) -> Result<f32, String> {
    if let Json_::Number(n) = v {
        if let (t, true) = literal(n) {
            let f: f32 = t
                .parse()
                .map_err(|_| format!("{} is not a float32", cut(t)))?;
            if format!("{f:.0}") != t {
                return Err(format!(
                    "the integer {} has no exact float32; send it as a number with a fraction",
                    cut(t)
                ));
            }
            return Ok(f);
        }
    }
    f64_to_f32(f64_from_json(v, "float32")?)
}

/// Reads base64 bytes: the standard or the URL-safe alphabet, padded or
/// not (protobuf's JSON mapping accepts all four).
fn bytes_from_json(v: &Json_) -> Result<Vec<u8>, String> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    let s = v
        .as_str()
        .ok_or_else(|| format!("expected base64 bytes, got {}", json_kind(v)))?;
    let url = s.contains(['-', '_']);
    let padded = s.ends_with('=');
    let engine = match (url, padded) {
        (false, true) => &STANDARD,
        (false, false) => &STANDARD_NO_PAD,
        (true, true) => &URL_SAFE,
        (true, false) => &URL_SAFE_NO_PAD,
    };
    engine
        .decode(s)
        .map_err(|e| format!("expected base64 bytes, got {} ({e})", quote(s)))
}

/// A JSON value read as the declared type `ty` (see the module docs for
/// the mapping). Every value [`value_to_json`] writes reads back as itself.
/// Errors name what is wrong: the JSON kind that was sent, an integer out
/// of int64's range, a null or mistyped element of a list and its index.
pub fn value_from_json(v: &Json_, ty: ValueType) -> Result<Value, String> {
    if v.is_null() {
        return Ok(Value::Null);
    }
    let string = |v: &Json_| match v {
        Json_::String(s) => Ok(s.clone()),
        other => Err(format!("expected string, got {}", json_kind(other))),
    };
    let boolean = |v: &Json_| match v {
        Json_::Bool(b) => Ok(*b),
        other => Err(format!("expected bool, got {}", json_kind(other))),
    };
    fn list<T>(
        v: &Json_,
        ty: ValueType,
        item: impl Fn(&Json_) -> Result<T, String>,
    ) -> Result<Vec<T>, String> {
        let Json_::Array(items) = v else {
            return Err(format!("expected {ty} (an array), got {}", json_kind(v)));
        };
        items
            .iter()
            .enumerate()
            .map(|(i, x)| {
                if x.is_null() {
                    return Err(format!(
                        "null element at index {i}; {ty} values cannot hold nulls"
                    ));
                }
                item(x).map_err(|m| format!("element {i}: {m}"))
            })
            .collect()
    }
    Ok(match ty {
        ValueType::Int64 => Value::Int64(int64_from_json(v)?),
        ValueType::Double => Value::Double(f64_from_json(v, "double")?),
        ValueType::String => Value::String(string(v)?),
        ValueType::Bool => Value::Bool(boolean(v)?),
        ValueType::Bytes => Value::Bytes(bytes_from_json(v)?),
        ValueType::Timestamp => match v {
            Json_::String(s) => Value::Timestamp(parse_rfc3339(s)?),
            other => {
                return Err(format!(
                    "expected an RFC 3339 timestamp string, got {}",
                    json_kind(other)
                ))
            }
        },
        ValueType::Int64List => Value::Int64List(list(v, ty, int64_from_json)?),
        ValueType::DoubleList => Value::DoubleList(list(v, ty, |x| f64_from_json(x, "double"))?),
        ValueType::StringList => Value::StringList(list(v, ty, string)?),
        ValueType::BoolList => Value::BoolList(list(v, ty, boolean)?),
        ValueType::BytesList => Value::BytesList(list(v, ty, bytes_from_json)?),
        ValueType::FloatList => Value::FloatList(list(v, ty, f32_from_json)?),
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
    use proptest::prelude::*;

    use super::*;
    use crate::testing::{same_modulo_nan, typed_value};

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
            .contains("is not an int64"));
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
    fn what_json_writes_for_doubles_it_reads() {
        for (text, ty) in [
            ("NaN", ValueType::Double),
            ("Infinity", ValueType::Double),
            ("-Infinity", ValueType::Double),
        ] {
            let v = value_from_json(&json!(text), ty).unwrap();
            assert_eq!(value_to_json(&v), json!(text));
        }
        assert_eq!(
            value_to_json(
                &value_from_json(&json!(["NaN", 1.5, "-Infinity"]), ValueType::DoubleList).unwrap()
            ),
            json!(["NaN", 1.5, "-Infinity"])
        );
        assert_eq!(
            value_to_json(
                &value_from_json(&json!(["Infinity", 0.25]), ValueType::FloatList).unwrap()
            ),
            json!(["Infinity", 0.25])
        );
        let e = value_from_json(&json!("nan"), ValueType::Double).unwrap_err();
        assert!(e.contains("\"NaN\""), "{e}");
    }

    #[test]
    fn timestamps_with_offsets_are_converted() {
        let v =
            value_from_json(&json!("2026-06-01T12:00:00.5+02:00"), ValueType::Timestamp).unwrap();
        assert_eq!(value_to_json(&v), json!("2026-06-01T10:00:00.500000Z"));
    }

    #[test]
    fn messages_name_what_is_wrong() {
        let msg = |v: Json_, ty| value_from_json(&v, ty).unwrap_err();
        // An integer too large is out of range, not "not an integer".
        let e = msg(
            serde_json::from_str("9223372036854775808").unwrap(),
            ValueType::Int64,
        );
        assert!(e.contains("out of range for int64"), "{e}");
        let e = msg(
            serde_json::from_str("-9223372036854775809").unwrap(),
            ValueType::Int64,
        );
        assert!(
            e.contains("\"-9223372036854775809\" is out of range for int64"),
            "{e}"
        );
        // Literals are read as written: -0 is the integer 0, a literal
        // beyond u64 is checked exactly, a decimal beyond the double range
        // is refused.
        let int = |t: &str| value_from_json(&serde_json::from_str(t).unwrap(), ValueType::Int64);
        assert_eq!(int("-0"), Ok(Value::Int64(0)));
        let e = int("100000000000000000000000000000").unwrap_err();
        assert!(e.contains("out of range for int64"), "{e}");
        let dbl = |t: &str| value_from_json(&serde_json::from_str(t).unwrap(), ValueType::Double);
        let e = dbl("18446744073709551617").unwrap_err();
        assert!(
            e.contains("the integer 18446744073709551617 has no exact double"),
            "{e}"
        );
        assert_eq!(dbl("1e30"), Ok(Value::Double(1e30)));
        assert_eq!(
            dbl("36893488147419103232"),
            Ok(Value::Double(2f64.powi(65)))
        );
        let e = dbl("1e400").unwrap_err();
        assert!(e.contains("is out of range for a double"), "{e}");
        assert_eq!(dbl("1e-400"), Ok(Value::Double(0.0)));
        let e = msg(json!("9223372036854775808"), ValueType::Int64);
        assert!(e.contains("out of range for int64"), "{e}");
        let e = msg(
            json!([1, 9_223_372_036_854_775_808u64]),
            ValueType::Int64List,
        );
        assert!(e.contains("element 1") && e.contains("out of range"), "{e}");
        // A null inside a list is named with its index.
        let e = msg(json!(["a", null]), ValueType::StringList);
        assert!(e.contains("null element at index 1"), "{e}");
        let e = msg(json!(["a", 5]), ValueType::StringList);
        assert!(
            e.contains("element 1: expected string, got a number"),
            "{e}"
        );
        let e = msg(json!(1e300), ValueType::FloatList);
        assert!(e.contains("an array"), "{e}");
        let e = msg(json!([1e300]), ValueType::FloatList);
        assert!(e.contains("out of range for float32"), "{e}");
        let e = msg(json!("abc"), ValueType::Int64);
        assert!(
            e.contains(
                "expected int64 (an integer, or one as a decimal string), got the string \"abc\""
            ),
            "{e}"
        );
        // A fraction or exponent: the literal was read as a double.
        for literal in ["42.0", "4.2e1", "9007199254740993.0", "1.0000000000000001"] {
            let e = msg(serde_json::from_str(literal).unwrap(), ValueType::Int64);
            assert!(
                e.contains("without a fraction or exponent"),
                "{literal}: {e}"
            );
        }
        // An integer literal a double cannot hold is not rounded.
        let e = msg(json!(9_007_199_254_740_993i64), ValueType::Double);
        assert!(
            e.contains("the integer 9007199254740993 has no exact double"),
            "{e}"
        );
        let e = msg(json!([1, 16_777_217]), ValueType::FloatList);
        assert!(
            e.contains("element 1: the integer 16777217 has no exact float32"),
            "{e}"
        );
        let e = msg(json!(u64::MAX), ValueType::Double);
        assert!(e.contains("no exact double"), "{e}");
        let e = msg(json!([1e308]), ValueType::FloatList);
        assert!(e.contains("1e308 is out of range for float32"), "{e}");
        let e = msg(json!("x".repeat(5000)), ValueType::Timestamp);
        assert!(e.len() < 400, "{e}");
    }

    #[test]
    fn lenient_forms_of_protobufs_json_mapping() {
        let int = |v| value_from_json(&v, ValueType::Int64).unwrap();
        assert_eq!(int(json!("-42")), Value::Int64(-42));
        assert_eq!(int(json!("9223372036854775807")), Value::Int64(i64::MAX));
        assert_eq!(int(json!("+007")), Value::Int64(7));
        assert_eq!(
            value_from_json(&json!("_-8"), ValueType::Bytes).unwrap(),
            Value::Bytes(vec![0xff, 0xef])
        );
        assert_eq!(
            value_from_json(&json!("AQI"), ValueType::Bytes).unwrap(),
            Value::Bytes(vec![1, 2])
        );
    }

    #[test]
    fn duplicate_keys_are_refused_at_any_depth() {
        assert_eq!(
            parse_strict(br#"{"a": [1, {"b": 2.5}], "c": null}"#).unwrap(),
            json!({"a": [1, {"b": 2.5}], "c": null})
        );
        for text in [
            &br#"{"a": 1, "a": 2}"#[..],
            br#"{"rows": [{"entity_key": {"user_id": "x", "user_id": "y"}}]}"#,
        ] {
            let e = parse_strict(text).unwrap_err();
            assert!(e.contains("appears twice in one object"), "{e}");
        }
        assert!(parse_strict(b"{} x").is_err());
        assert!(parse_strict(b"{").is_err());
        // Floats parse exactly (the same parser as everywhere else).
        assert_eq!(
            parse_strict(b"-7.905429746524368e-59").unwrap(),
            json!(-7.905429746524368e-59)
        );
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

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// For every type, what the JSON API writes it reads back as the
        /// same value (every NaN is "NaN").
        #[test]
        fn value_to_json_to_value((ty, v) in typed_value()) {
            let json = value_to_json(&v);
            // Through text, as a client sends it.
            let text = serde_json::to_string(&json).unwrap();
            let back = value_from_json(&serde_json::from_str(&text).unwrap(), ty)
                .map_err(|e| TestCaseError::fail(format!("{v:?} -> {text}: {e}")))?;
            prop_assert!(same_modulo_nan(&v, &back), "{:?} -> {} -> {:?}", v, text, back);
        }
    }
}
