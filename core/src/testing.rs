//! Property-test strategies for typed values, shared by the round-trip
//! tests of every form a value takes (JSON, protobuf, stored bytes, Arrow).

use proptest::collection::vec;
use proptest::prelude::*;

use crate::codec::encode_value;
use crate::time::{MAX_MICROS, MIN_MICROS};
use crate::value::{Value, ValueType};

/// Any value of type `ty` (every float, NaN and infinities included;
/// timestamps over the whole accepted range), or null.
pub fn value_of(ty: ValueType) -> BoxedStrategy<Value> {
    let list = 0..6usize;
    let bytes = || vec(any::<u8>(), 0..24);
    let v = match ty {
        ValueType::Int64 => any::<i64>().prop_map(Value::Int64).boxed(),
        ValueType::Double => any::<f64>().prop_map(Value::Double).boxed(),
        ValueType::String => any::<String>().prop_map(Value::String).boxed(),
        ValueType::Bool => any::<bool>().prop_map(Value::Bool).boxed(),
        ValueType::Bytes => bytes().prop_map(Value::Bytes).boxed(),
        ValueType::Timestamp => (MIN_MICROS..=MAX_MICROS).prop_map(Value::Timestamp).boxed(),
        ValueType::Int64List => vec(any::<i64>(), list).prop_map(Value::Int64List).boxed(),
        ValueType::DoubleList => vec(any::<f64>(), list).prop_map(Value::DoubleList).boxed(),
        ValueType::StringList => vec(any::<String>(), list)
            .prop_map(Value::StringList)
            .boxed(),
        ValueType::BoolList => vec(any::<bool>(), list).prop_map(Value::BoolList).boxed(),
        ValueType::BytesList => vec(bytes(), list).prop_map(Value::BytesList).boxed(),
        ValueType::FloatList => vec(any::<f32>(), list).prop_map(Value::FloatList).boxed(),
    };
    prop_oneof![1 => Just(Value::Null), 9 => v].boxed()
}

/// A type and a value of it.
pub fn typed_value() -> impl Strategy<Value = (ValueType, Value)> {
    prop::sample::select(ValueType::ALL.to_vec()).prop_flat_map(|t| (Just(t), value_of(t)))
}

/// Bit-for-bit equality (NaN payloads and the sign of zero count).
pub fn same_bits(a: &Value, b: &Value) -> bool {
    encode_value(a) == encode_value(b)
}

/// Equality where every NaN counts as the same NaN (forms such as JSON
/// have one spelling for all of them); everything else bit for bit.
pub fn same_modulo_nan(a: &Value, b: &Value) -> bool {
    same_bits(&canonical_nan(a), &canonical_nan(b))
}

fn canonical_nan(v: &Value) -> Value {
    let d = |x: f64| if x.is_nan() { f64::NAN } else { x };
    let f = |x: f32| if x.is_nan() { f32::NAN } else { x };
    match v {
        Value::Double(x) => Value::Double(d(*x)),
        Value::DoubleList(l) => Value::DoubleList(l.iter().copied().map(d).collect()),
        Value::FloatList(l) => Value::FloatList(l.iter().copied().map(f).collect()),
        other => other.clone(),
    }
}
