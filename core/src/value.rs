//! Typed feature and entity values.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::quote;
use crate::time::Micros;

/// The declared type of a feature or a join key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueType {
    /// 64-bit signed integer.
    Int64,
    /// 64-bit float.
    Double,
    /// UTF-8 string.
    String,
    /// Boolean.
    Bool,
    /// Opaque bytes.
    Bytes,
    /// Instant, microsecond precision.
    Timestamp,
    /// List of int64.
    Int64List,
    /// List of doubles.
    DoubleList,
    /// List of strings.
    StringList,
    /// List of booleans.
    BoolList,
    /// List of byte strings.
    BytesList,
    /// List of float32, the type of embeddings.
    FloatList,
}

impl ValueType {
    /// Every type, in declaration order.
    pub const ALL: [ValueType; 12] = [
        ValueType::Int64,
        ValueType::Double,
        ValueType::String,
        ValueType::Bool,
        ValueType::Bytes,
        ValueType::Timestamp,
        ValueType::Int64List,
        ValueType::DoubleList,
        ValueType::StringList,
        ValueType::BoolList,
        ValueType::BytesList,
        ValueType::FloatList,
    ];

    /// The registry spelling of this type (`int64`, `float_list`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            ValueType::Int64 => "int64",
            ValueType::Double => "double",
            ValueType::String => "string",
            ValueType::Bool => "bool",
            ValueType::Bytes => "bytes",
            ValueType::Timestamp => "timestamp",
            ValueType::Int64List => "int64_list",
            ValueType::DoubleList => "double_list",
            ValueType::StringList => "string_list",
            ValueType::BoolList => "bool_list",
            ValueType::BytesList => "bytes_list",
            ValueType::FloatList => "float_list",
        }
    }

    /// Parses the registry spelling; see [`ValueType::as_str`].
    pub fn parse(s: &str) -> Option<ValueType> {
        ValueType::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// Whether values of this type are lists.
    pub fn is_list(self) -> bool {
        matches!(
            self,
            ValueType::Int64List
                | ValueType::DoubleList
                | ValueType::StringList
                | ValueType::BoolList
                | ValueType::BytesList
                | ValueType::FloatList
        )
    }

    /// Whether this type can be a join key.
    pub fn is_key_type(self) -> bool {
        matches!(self, ValueType::Int64 | ValueType::String)
    }
}

impl fmt::Display for ValueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A typed value; `Null` is the absence of a value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Explicit null.
    Null,
    /// See [`ValueType::Int64`].
    Int64(i64),
    /// See [`ValueType::Double`].
    Double(f64),
    /// See [`ValueType::String`].
    String(String),
    /// See [`ValueType::Bool`].
    Bool(bool),
    /// See [`ValueType::Bytes`].
    Bytes(Vec<u8>),
    /// See [`ValueType::Timestamp`].
    Timestamp(Micros),
    /// See [`ValueType::Int64List`].
    Int64List(Vec<i64>),
    /// See [`ValueType::DoubleList`].
    DoubleList(Vec<f64>),
    /// See [`ValueType::StringList`].
    StringList(Vec<String>),
    /// See [`ValueType::BoolList`].
    BoolList(Vec<bool>),
    /// See [`ValueType::BytesList`].
    BytesList(Vec<Vec<u8>>),
    /// See [`ValueType::FloatList`].
    FloatList(Vec<f32>),
}

impl Value {
    /// The type of this value, `None` for null.
    pub fn value_type(&self) -> Option<ValueType> {
        Some(match self {
            Value::Null => return None,
            Value::Int64(_) => ValueType::Int64,
            Value::Double(_) => ValueType::Double,
            Value::String(_) => ValueType::String,
            Value::Bool(_) => ValueType::Bool,
            Value::Bytes(_) => ValueType::Bytes,
            Value::Timestamp(_) => ValueType::Timestamp,
            Value::Int64List(_) => ValueType::Int64List,
            Value::DoubleList(_) => ValueType::DoubleList,
            Value::StringList(_) => ValueType::StringList,
            Value::BoolList(_) => ValueType::BoolList,
            Value::BytesList(_) => ValueType::BytesList,
            Value::FloatList(_) => ValueType::FloatList,
        })
    }

    /// Whether this is null.
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    /// Length of a list value, `None` for scalars and null.
    pub fn list_len(&self) -> Option<usize> {
        match self {
            Value::Int64List(v) => Some(v.len()),
            Value::DoubleList(v) => Some(v.len()),
            Value::StringList(v) => Some(v.len()),
            Value::BoolList(v) => Some(v.len()),
            Value::BytesList(v) => Some(v.len()),
            Value::FloatList(v) => Some(v.len()),
            _ => None,
        }
    }

    /// Short description for error messages: the type name, or `null`.
    pub fn type_name(&self) -> &'static str {
        self.value_type().map_or("null", ValueType::as_str)
    }
}

// Numbers change only their type, never their value: the one set of
// conversions for every path (JSON, protobuf, entity tables).

/// The range of int64, as written in error messages.
pub const INT64_RANGE: &str =
    "out of range for int64 (-9223372036854775808 to 9223372036854775807)";

/// Parses a decimal int64 (`42`, `-7`, `+7`, `007`: ASCII digits with an
/// optional sign); errors tell an out-of-range integer from text that is
/// not an integer.
pub fn parse_int64(s: &str) -> Result<i64, String> {
    use std::num::IntErrorKind;
    s.parse::<i64>().map_err(|e| match e.kind() {
        IntErrorKind::PosOverflow | IntErrorKind::NegOverflow => {
            format!("{} is {INT64_RANGE}", quote(s))
        }
        _ => format!("{} is not an integer", quote(s)),
    })
}

/// An integer as a double, only if the double holds it exactly (every
/// integer up to 2^53 in magnitude, and some beyond).
pub fn exact_f64(n: i128) -> Result<f64, String> {
    let d = n as f64;
    if d as i128 == n {
        Ok(d)
    } else {
        Err(format!(
            "the integer {n} has no exact double; send it as a double"
        ))
    }
}

/// An integer as a float32, only if the float32 holds it exactly (every
/// integer up to 2^24 in magnitude, and some beyond).
pub fn exact_f32(n: i128) -> Result<f32, String> {
    let f = n as f32;
    if f as i128 == n {
        Ok(f)
    } else {
        Err(format!(
            "the integer {n} has no exact float32; send it as a number with a fraction"
        ))
    }
}

/// A float as an int64, only if it is an integer that no rounding can have
/// touched: magnitude below 2^53, where doubles hold every integer.
pub fn exact_i64(f: f64) -> Option<i64> {
    (f.fract() == 0.0 && f.abs() < 9_007_199_254_740_992.0).then_some(f as i64)
}

/// A double as the nearest float32; a finite double beyond float32's range
/// is refused rather than turned into an infinity (NaN and infinities stay).
pub fn f64_to_f32(d: f64) -> Result<f32, String> {
    let f = d as f32;
    if d.is_finite() && !f.is_finite() {
        return Err(format!(
            "{d:?} is out of range for float32 (largest magnitude {:?})",
            f32::MAX
        ));
    }
    Ok(f)
}

/// `v` as a value of the declared type `ty`: the same type or null as is;
/// numbers of another type only where nothing changes but the type.
///
/// - int64 to double (and int64 lists to double lists): only integers a
///   double holds exactly ([`exact_f64`]), since JSON and many clients do
///   not tell 3 from 3.0;
/// - int64 lists to float lists: only integers a float32 holds exactly;
/// - double lists to float lists (embeddings sent as doubles): rounded to
///   the nearest float32 ([`f64_to_f32`]);
/// - an empty list of any element type to an empty list of `ty` (a client
///   cannot tell the element type of `[]`).
///
/// Errors say which value cannot be taken and why.
pub fn coerce(v: Value, ty: ValueType) -> Result<Value, String> {
    fn each<T, U>(l: Vec<T>, f: impl Fn(T) -> Result<U, String>) -> Result<Vec<U>, String> {
        l.into_iter()
            .enumerate()
            .map(|(i, x)| f(x).map_err(|m| format!("element {i}: {m}")))
            .collect()
    }
    let int = |n: i64| i128::from(n);
    match (v, ty) {
        (v, ty) if v.is_null() || v.value_type() == Some(ty) => Ok(v),
        (v, ty) if ty.is_list() && v.list_len() == Some(0) => Ok(empty_list(ty)),
        (Value::Int64(n), ValueType::Double) => exact_f64(int(n)).map(Value::Double),
        (Value::Int64List(l), ValueType::DoubleList) => {
            each(l, |n| exact_f64(int(n))).map(Value::DoubleList)
        }
        (Value::Int64List(l), ValueType::FloatList) => {
            each(l, |n| exact_f32(int(n))).map(Value::FloatList)
        }
        (Value::DoubleList(l), ValueType::FloatList) => each(l, f64_to_f32).map(Value::FloatList),
        (v, ty) => Err(format!("expected {ty}, got {}", v.type_name())),
    }
}

/// The empty list of list type `ty` (`Null` for scalar types).
fn empty_list(ty: ValueType) -> Value {
    match ty {
        ValueType::Int64List => Value::Int64List(Vec::new()),
        ValueType::DoubleList => Value::DoubleList(Vec::new()),
        ValueType::StringList => Value::StringList(Vec::new()),
        ValueType::BoolList => Value::BoolList(Vec::new()),
        ValueType::BytesList => Value::BytesList(Vec::new()),
        ValueType::FloatList => Value::FloatList(Vec::new()),
        _ => Value::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coercion_never_changes_a_number() {
        assert_eq!(
            coerce(Value::Int64(3), ValueType::Double),
            Ok(Value::Double(3.0))
        );
        let e = coerce(Value::Int64(9_007_199_254_740_993), ValueType::Double).unwrap_err();
        assert!(e.contains("no exact double"), "{e}");
        assert!(coerce(Value::Int64(i64::MAX), ValueType::Double).is_err());
        assert_eq!(
            coerce(Value::Int64List(vec![1, -2]), ValueType::FloatList),
            Ok(Value::FloatList(vec![1.0, -2.0]))
        );
        let e = coerce(Value::Int64List(vec![1, 16_777_217]), ValueType::FloatList).unwrap_err();
        assert!(
            e.contains("element 1") && e.contains("no exact float32"),
            "{e}"
        );
        let e = coerce(Value::DoubleList(vec![1e300]), ValueType::FloatList).unwrap_err();
        assert!(e.contains("out of range for float32"), "{e}");
        assert_eq!(
            coerce(
                Value::DoubleList(vec![f64::INFINITY, 0.5]),
                ValueType::FloatList
            ),
            Ok(Value::FloatList(vec![f32::INFINITY, 0.5]))
        );
        assert_eq!(coerce(Value::Null, ValueType::Bytes), Ok(Value::Null));
        assert_eq!(
            coerce(Value::DoubleList(vec![]), ValueType::StringList),
            Ok(Value::StringList(vec![]))
        );
        assert_eq!(exact_i64(3.0), Some(3));
        assert_eq!(exact_i64(9_007_199_254_740_992.0), None);
        assert_eq!(exact_i64(1.5), None);
        let e = coerce(Value::Double(1.0), ValueType::Int64).unwrap_err();
        assert_eq!(e, "expected int64, got double");
    }

    #[test]
    fn type_names_round_trip() {
        for t in ValueType::ALL {
            assert_eq!(ValueType::parse(t.as_str()), Some(t));
        }
        assert_eq!(ValueType::parse("float"), None);
    }

    #[test]
    fn values_know_their_type() {
        assert_eq!(Value::Null.value_type(), None);
        assert_eq!(
            Value::FloatList(vec![1.0]).value_type(),
            Some(ValueType::FloatList)
        );
        assert_eq!(Value::FloatList(vec![1.0, 2.0]).list_len(), Some(2));
        assert_eq!(Value::Int64(1).list_len(), None);
    }
}
