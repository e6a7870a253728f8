//! Typed feature and entity values.

use std::fmt;

use serde::{Deserialize, Serialize};

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

#[cfg(test)]
mod tests {
    use super::*;

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
