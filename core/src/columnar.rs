//! Typed values as Arrow columns: the one mapping between [`ValueType`]
//! and Arrow types, used by the raw-event archive, the batch layer's
//! feature tables and historical retrieval, so that a feature has the same
//! Arrow type everywhere offline.
//!
//! Timestamps are microseconds in UTC, lists are `List<item>` of the
//! element type, `float_list` (embeddings) is `List<Float32>`.

use std::sync::Arc;

use arrow_array::builder::{
    BinaryBuilder, BooleanBuilder, Float32Builder, Float64Builder, Int64Builder, ListBuilder,
    StringBuilder, TimestampMicrosecondBuilder,
};
use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, Float64Type, Int64Type, TimestampMicrosecondType};
use arrow_array::{Array, ArrayRef};
use std::collections::BTreeMap;

use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};

use crate::error::{Error, Result};
use crate::registry::Registry;
use crate::value::{Value, ValueType};

/// The Arrow type of timestamps: microseconds, UTC.
pub fn timestamp_type() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

/// The Arrow type that holds values of `ty`.
pub fn arrow_type(ty: ValueType) -> DataType {
    let list = |t: DataType| DataType::List(Arc::new(Field::new("item", t, true)));
    match ty {
        ValueType::Int64 => DataType::Int64,
        ValueType::Double => DataType::Float64,
        ValueType::String => DataType::Utf8,
        ValueType::Bool => DataType::Boolean,
        ValueType::Bytes => DataType::Binary,
        ValueType::Timestamp => timestamp_type(),
        ValueType::Int64List => list(DataType::Int64),
        ValueType::DoubleList => list(DataType::Float64),
        ValueType::StringList => list(DataType::Utf8),
        ValueType::BoolList => list(DataType::Boolean),
        ValueType::BytesList => list(DataType::Binary),
        ValueType::FloatList => list(DataType::Float32),
    }
}

/// Builds one Arrow column of type [`arrow_type`]`(ty)`; `None`, nulls and
/// values of another type become nulls.
pub fn value_array(ty: ValueType, values: &[Option<&Value>]) -> ArrayRef {
    macro_rules! scalar {
        ($builder:expr, $variant:ident, $conv:expr) => {{
            let mut b = $builder;
            for v in values {
                match v {
                    Some(Value::$variant(x)) => b.append_value($conv(x)),
                    _ => b.append_null(),
                }
            }
            Arc::new(b.finish()) as ArrayRef
        }};
    }
    macro_rules! list {
        ($inner:expr, $variant:ident, $conv:expr) => {{
            let mut b = ListBuilder::new($inner);
            for v in values {
                match v {
                    Some(Value::$variant(xs)) => {
                        for x in xs {
                            b.values().append_value($conv(x));
                        }
                        b.append(true);
                    }
                    _ => b.append(false),
                }
            }
            Arc::new(b.finish()) as ArrayRef
        }};
    }
    match ty {
        ValueType::Int64 => scalar!(Int64Builder::new(), Int64, |x: &i64| *x),
        ValueType::Double => scalar!(Float64Builder::new(), Double, |x: &f64| *x),
        ValueType::String => scalar!(StringBuilder::new(), String, |x: &String| x.clone()),
        ValueType::Bool => scalar!(BooleanBuilder::new(), Bool, |x: &bool| *x),
        ValueType::Bytes => scalar!(BinaryBuilder::new(), Bytes, |x: &Vec<u8>| x.clone()),
        ValueType::Timestamp => scalar!(
            TimestampMicrosecondBuilder::new().with_timezone("UTC"),
            Timestamp,
            |x: &i64| *x
        ),
        ValueType::Int64List => list!(Int64Builder::new(), Int64List, |x: &i64| *x),
        ValueType::DoubleList => list!(Float64Builder::new(), DoubleList, |x: &f64| *x),
        ValueType::StringList => list!(StringBuilder::new(), StringList, |x: &String| x.clone()),
        ValueType::BoolList => list!(BooleanBuilder::new(), BoolList, |x: &bool| *x),
        ValueType::BytesList => list!(BinaryBuilder::new(), BytesList, |x: &Vec<u8>| x.clone()),
        ValueType::FloatList => list!(Float32Builder::new(), FloatList, |x: &f32| *x),
    }
}

/// Reads row `i` of a column of type [`arrow_type`]`(ty)` (cast other
/// types first); a null slot is [`Value::Null`]. A list with a null element
/// is an error (quiver's lists cannot hold nulls; reading the element as a
/// zero would change the value).
pub fn value_at(array: &dyn Array, ty: ValueType, i: usize) -> Result<Value> {
    if array.is_null(i) {
        return Ok(Value::Null);
    }
    if array.data_type() != &arrow_type(ty) {
        return Err(Error::internal(format!(
            "column of type {} read as {ty}",
            array.data_type()
        )));
    }
    macro_rules! list {
        ($variant:ident, $conv:expr) => {{
            let l = array.as_list::<i32>().value(i);
            if let Some(j) = (0..l.len()).find(|&j| l.is_null(j)) {
                return Err(Error::invalid(format!(
                    "null element at index {j} of a {ty} value; lists cannot hold nulls"
                )));
            }
            $variant($conv(&*l))
        }};
    }
    let strings = |a: &dyn Array| {
        let a = a.as_string::<i32>();
        (0..a.len()).map(|j| a.value(j).to_owned()).collect()
    };
    let bytes = |a: &dyn Array| {
        let a = a.as_binary::<i32>();
        (0..a.len()).map(|j| a.value(j).to_vec()).collect()
    };
    use Value::*;
    Ok(match ty {
        ValueType::Int64 => Int64(array.as_primitive::<Int64Type>().value(i)),
        ValueType::Double => Double(array.as_primitive::<Float64Type>().value(i)),
        ValueType::String => String(array.as_string::<i32>().value(i).to_owned()),
        ValueType::Bool => Bool(array.as_boolean().value(i)),
        ValueType::Bytes => Bytes(array.as_binary::<i32>().value(i).to_vec()),
        ValueType::Timestamp => {
            Timestamp(array.as_primitive::<TimestampMicrosecondType>().value(i))
        }
        ValueType::Int64List => list!(Int64List, |a: &dyn Array| a
            .as_primitive::<Int64Type>()
            .values()
            .to_vec()),
        ValueType::DoubleList => list!(DoubleList, |a: &dyn Array| a
            .as_primitive::<Float64Type>()
            .values()
            .to_vec()),
        ValueType::FloatList => list!(FloatList, |a: &dyn Array| a
            .as_primitive::<Float32Type>()
            .values()
            .to_vec()),
        ValueType::StringList => list!(StringList, strings),
        ValueType::BoolList => list!(BoolList, |a: &dyn Array| {
            let a = a.as_boolean();
            (0..a.len()).map(|j| a.value(j)).collect()
        }),
        ValueType::BytesList => list!(BytesList, bytes),
    })
}

/// One registry-derived column of the raw-event archive.
#[derive(Debug, Clone)]
pub struct ArchiveColumn {
    /// Column name: a join key or an attribute name.
    pub name: String,
    /// Its type.
    pub ty: ValueType,
    /// What the column holds.
    pub source: ArchiveColumnSource,
}

/// What an archive column holds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ArchiveColumnSource {
    /// An entity's join key.
    JoinKey,
    /// An event attribute.
    Attribute,
}

/// The archive's join-key and attribute columns, in schema order.
pub fn archive_columns(reg: &Registry) -> Vec<ArchiveColumn> {
    let mut cols: Vec<ArchiveColumn> = reg
        .entities()
        .iter()
        .map(|e| ArchiveColumn {
            name: e.join_key.clone(),
            ty: e.value_type,
            source: ArchiveColumnSource::JoinKey,
        })
        .collect();
    let mut attrs: BTreeMap<&str, ValueType> = BTreeMap::new();
    for et in reg.event_types() {
        for (n, t) in &et.attributes {
            attrs.insert(n, *t);
        }
    }
    cols.extend(attrs.into_iter().map(|(n, t)| ArchiveColumn {
        name: n.to_owned(),
        ty: t,
        source: ArchiveColumnSource::Attribute,
    }));
    cols
}

/// The archive's Arrow schema for a registry: `event_id`, `event_type`,
/// `event_time` (UTC microseconds), one nullable column per join key and per
/// attribute name (registry validation gives each name one type), `_source`
/// and `_offset`.
pub fn archive_schema(reg: &Registry) -> SchemaRef {
    let mut fields = vec![
        Field::new("event_id", DataType::Utf8, false),
        Field::new("event_type", DataType::Utf8, false),
        Field::new("event_time", timestamp_type(), false),
    ];
    fields.extend(
        archive_columns(reg)
            .into_iter()
            .map(|c| Field::new(c.name, arrow_type(c.ty), true)),
    );
    fields.push(Field::new("_source", DataType::Utf8, false));
    fields.push(Field::new("_offset", DataType::Int64, false));
    Arc::new(Schema::new(fields))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_round_trips_through_arrow() {
        let samples = [
            Value::Int64(-7),
            Value::Double(2.5),
            Value::String("a".into()),
            Value::Bool(true),
            Value::Bytes(vec![0, 1]),
            Value::Timestamp(1_700_000_000_000_000),
            Value::Int64List(vec![1, 2]),
            Value::DoubleList(vec![0.5]),
            Value::StringList(vec!["x".into(), "y".into()]),
            Value::BoolList(vec![false]),
            Value::BytesList(vec![vec![9]]),
            Value::FloatList(vec![0.25, 1.0]),
        ];
        for v in samples {
            let ty = v.value_type().unwrap();
            let col = value_array(ty, &[Some(&v), None, Some(&Value::Null)]);
            assert_eq!(col.data_type(), &arrow_type(ty));
            assert_eq!(value_at(&*col, ty, 0).unwrap(), v);
            assert_eq!(value_at(&*col, ty, 1).unwrap(), Value::Null);
            assert_eq!(value_at(&*col, ty, 2).unwrap(), Value::Null);
        }
    }

    #[test]
    fn a_list_with_a_null_element_is_an_error_not_a_zero() {
        let mut b = ListBuilder::new(Int64Builder::new());
        b.values().append_value(1);
        b.values().append_null();
        b.append(true);
        let col: ArrayRef = Arc::new(b.finish());
        let e = value_at(&*col, ValueType::Int64List, 0).unwrap_err();
        assert!(e.message().contains("null element at index 1"), "{e}");
    }

    proptest::proptest! {
        /// Every value of every type survives an Arrow column, bit for bit.
        #[test]
        fn values_round_trip_through_arrow((ty, v) in crate::testing::typed_value()) {
            let col = value_array(ty, &[Some(&v)]);
            let back = value_at(&*col, ty, 0).unwrap();
            proptest::prop_assert!(crate::testing::same_bits(&v, &back), "{:?} -> {:?}", v, back);
        }
    }
}
