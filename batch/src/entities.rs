//! Entity tables (the rows a training set is built for), in every form a
//! client sends them: protobuf columns, Arrow IPC, Parquet and CSV files.
//!
//! Whatever the form, [`typed`] gives every table the same shape before any
//! data is joined:
//! - join-key columns (columns named like a registry entity's join key)
//!   take the entity's declared type, never a type guessed from their
//!   contents. Other types are converted when the conversion loses nothing
//!   (integers to decimal text for string entities; smaller or unsigned
//!   integers, integral floats up to 2^53 and decimal text for int64
//!   entities); anything else is an error naming the column, its type and
//!   the row. CSV files read join keys as text, so `"007"` stays `"007"`.
//! - `event_timestamp` becomes UTC microseconds: timestamp columns of any
//!   unit (timestamps without a time zone count as UTC, Arrow's
//!   convention; nanoseconds are dropped toward the past), dates (midnight
//!   UTC), or RFC 3339 text read by quiver's one parser
//!   ([`quiver_core::time::parse_rfc3339`]); every time must lie in the
//!   supported range.
//! - every other column (labels) passes through as given.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Int64Array, RecordBatch, TimestampMicrosecondArray};
use arrow::compute::cast;
use arrow::datatypes::{
    DataType, Date32Type, Date64Type, Field, Float32Type, Float64Type, Schema, TimeUnit,
    TimestampMicrosecondType, TimestampMillisecondType, TimestampNanosecondType,
    TimestampSecondType, UInt64Type,
};
use datafusion::prelude::SessionContext;
use quiver_core::columnar::{arrow_type, timestamp_type};
use quiver_core::error::quote;
use quiver_core::registry::TIMESTAMP_COLUMN;
use quiver_core::time::{check_range, parse_rfc3339, Micros};
use quiver_core::value::{exact_i64, parse_int64, INT64_RANGE};
use quiver_core::{Error, Registry, Result, Value, ValueType};

use crate::offline::{df_error, session_config};

/// The entity table with join keys in their entities' types and
/// `event_timestamp` as UTC microseconds (see the module docs), and that
/// column.
/// The column of request field `field` of on-demand view `view` in an
/// entity table (after [`typed`]) as the field's Arrow type. Only lossless
/// conversions are made, the ones the online path makes too: narrower
/// integers to int64, integers (exactly, up to 2^53) and float32 to double,
/// other string, binary and list encodings, timestamps of any unit or zone
/// and dates to UTC microseconds, RFC 3339 text to timestamps. Anything
/// else, a missing column, or a value that does not convert, is
/// INVALID_ARGUMENT.
pub fn request_column(
    entities: &RecordBatch,
    view: &str,
    field: &quiver_core::registry::RequestField,
) -> Result<ArrayRef> {
    use quiver_core::value::exact_f64;
    let Some(column) = entities.column_by_name(&field.name) else {
        let schema = entities.schema();
        return Err(Error::invalid(format!(
            "on-demand feature view {view:?} reads request data {} ({}); the entity table has no such column (columns: {})",
            quote(&field.name),
            field.value_type,
            schema.fields().iter().map(|f| f.name().as_str()).collect::<Vec<_>>().join(", ")
        )));
    };
    let ty = field.value_type;
    let want = arrow_type(ty);
    let refuse = || {
        Error::invalid(format!(
            "entity table column {} is {}, but on-demand feature view {view:?} reads it as {ty} request data; send {ty} values",
            quote(&field.name),
            column.data_type()
        ))
    };
    let at = |row: usize, m: String| {
        Error::invalid(format!(
            "entity row {row}: request data {} ({ty}): {m}",
            quote(&field.name)
        ))
    };
    let lossless = |a: &ArrayRef| {
        cast(a, &want).map_err(|e| Error::internal(format!("converting request data: {e}")))
    };
    let column = match column.data_type() {
        DataType::Dictionary(_, values) => cast(column, values).map_err(|_| refuse())?,
        _ => column.clone(),
    };
    use DataType as D;
    match (column.data_type(), ty) {
        (d, _) if *d == want => Ok(column),
        (D::Int8 | D::Int16 | D::Int32 | D::UInt8 | D::UInt16 | D::UInt32, ValueType::Int64) => {
            lossless(&column)
        }
        (D::UInt64, ValueType::Int64) => {
            let a = column.as_primitive::<arrow::datatypes::UInt64Type>();
            if let Some(row) = (0..a.len()).find(|&i| a.is_valid(i) && a.value(i) > i64::MAX as u64)
            {
                return Err(at(row, format!("{} is beyond int64", a.value(row))));
            }
            lossless(&column)
        }
        (
            D::Int8
            | D::Int16
            | D::Int32
            | D::UInt8
            | D::UInt16
            | D::UInt32
            | D::Float16
            | D::Float32,
            ValueType::Double,
        ) => lossless(&column),
        (D::Int64 | D::UInt64, ValueType::Double) => {
            let as_i128 = cast(&column, &D::Decimal128(38, 0)).map_err(|_| refuse())?;
            let a = as_i128.as_primitive::<arrow::datatypes::Decimal128Type>();
            for i in 0..a.len() {
                if a.is_valid(i) {
                    exact_f64(a.value(i)).map_err(|m| at(i, m))?;
                }
            }
            lossless(&column)
        }
        (D::LargeUtf8 | D::Utf8View, ValueType::String)
        | (D::LargeBinary | D::BinaryView | D::FixedSizeBinary(_), ValueType::Bytes)
        | (D::Timestamp(_, _) | D::Date32 | D::Date64, ValueType::Timestamp) => lossless(&column),
        (D::Utf8 | D::LargeUtf8 | D::Utf8View, ValueType::Timestamp) => {
            let text = cast(&column, &D::Utf8).map_err(|_| refuse())?;
            let text = text.as_string::<i32>();
            let mut out = Vec::with_capacity(text.len());
            for i in 0..text.len() {
                out.push(if text.is_valid(i) {
                    Some(parse_rfc3339(text.value(i)).map_err(|m| at(i, m))?)
                } else {
                    None
                });
            }
            Ok(Arc::new(TimestampMicrosecondArray::from(out).with_timezone("UTC")) as ArrayRef)
        }
        (D::List(f) | D::LargeList(f), _) if matches!(&want, D::List(w) if w.data_type() == f.data_type()) => {
            lossless(&column)
        }
        _ => Err(refuse()),
    }
}

pub fn typed(
    reg: &Registry,
    entities: RecordBatch,
) -> Result<(RecordBatch, TimestampMicrosecondArray)> {
    let schema = entities.schema();
    if let Some(name) = duplicate(schema.fields().iter().map(|f| f.name().as_str())) {
        return Err(Error::invalid(format!(
            "the entity table has the column {} twice",
            quote(name)
        )));
    }
    if schema.column_with_name(TIMESTAMP_COLUMN).is_none() {
        return Err(Error::invalid(format!(
            "the entity table has no {TIMESTAMP_COLUMN:?} column (the time each row's features must be as of); columns: {}",
            quote(&schema.fields().iter().map(|f| f.name().as_str()).collect::<Vec<_>>().join(", "))
        )));
    }
    let mut fields = Vec::with_capacity(schema.fields().len());
    let mut columns = Vec::with_capacity(schema.fields().len());
    let mut times = None;
    for (field, column) in schema.fields().iter().zip(entities.columns()) {
        let name = field.name();
        if name == TIMESTAMP_COLUMN {
            let t = timestamps(column)?;
            fields.push(Field::new(name, timestamp_type(), false));
            columns.push(Arc::new(t.clone()) as ArrayRef);
            times = Some(t);
        } else if let Some(e) = reg.entity_by_join_key(name) {
            fields.push(Field::new(name, arrow_type(e.value_type), true));
            columns.push(key_column(name, &e.name, column, e.value_type)?);
        } else {
            fields.push((**field).clone());
            columns.push(column.clone());
        }
    }
    let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
        .map_err(|e| Error::internal(format!("entity table: {e}")))?;
    Ok((batch, times.expect("checked above")))
}

/// A name that occurs more than once.
fn duplicate<'a>(names: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let mut seen = std::collections::HashSet::new();
    names.into_iter().find(|n| !seen.insert(*n))
}

/// `event_timestamp` as UTC microseconds, every row set and in range.
fn timestamps(a: &ArrayRef) -> Result<TimestampMicrosecondArray> {
    let bad_type = || {
        Error::invalid(format!(
            "{TIMESTAMP_COLUMN} is {}; give it as a timestamp (or date) column or as RFC 3339 text such as 2026-11-25T10:00:00Z",
            a.data_type()
        ))
    };
    let out_of_range = |i: usize| {
        Error::invalid(format!(
            "entity row {i}: {TIMESTAMP_COLUMN} is outside the supported range {}",
            quiver_core::time::RANGE_TEXT
        ))
    };
    // Per row: epoch microseconds, `None` when null or out of range (told
    // apart below by the null mask).
    let micros: Vec<Option<Micros>> = match a.data_type() {
        DataType::Timestamp(unit, _) => {
            let scaled = |v: i64| -> Option<Micros> {
                match unit {
                    TimeUnit::Second => v.checked_mul(1_000_000),
                    TimeUnit::Millisecond => v.checked_mul(1_000),
                    TimeUnit::Microsecond => Some(v),
                    TimeUnit::Nanosecond => Some(v.div_euclid(1_000)),
                }
            };
            let values: Vec<Option<i64>> = match unit {
                TimeUnit::Second => a.as_primitive::<TimestampSecondType>().iter().collect(),
                TimeUnit::Millisecond => a
                    .as_primitive::<TimestampMillisecondType>()
                    .iter()
                    .collect(),
                TimeUnit::Microsecond => a
                    .as_primitive::<TimestampMicrosecondType>()
                    .iter()
                    .collect(),
                TimeUnit::Nanosecond => {
                    a.as_primitive::<TimestampNanosecondType>().iter().collect()
                }
            };
            values.into_iter().map(|v| v.and_then(scaled)).collect()
        }
        DataType::Date32 => a
            .as_primitive::<Date32Type>()
            .iter()
            .map(|d| d.and_then(|d| i64::from(d).checked_mul(86_400_000_000)))
            .collect(),
        DataType::Date64 => a
            .as_primitive::<Date64Type>()
            .iter()
            .map(|d| d.and_then(|d| d.checked_mul(1_000)))
            .collect(),
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
            let s = cast(a, &DataType::Utf8).map_err(|_| bad_type())?;
            s.as_string::<i32>()
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    s.map(|s| {
                        parse_rfc3339(s).map_err(|m| {
                            Error::invalid(format!("entity row {i}: {TIMESTAMP_COLUMN}: {m}"))
                        })
                    })
                    .transpose()
                })
                .collect::<Result<_>>()?
        }
        _ => return Err(bad_type()),
    };
    for (i, m) in micros.iter().enumerate() {
        match m {
            None if a.is_null(i) => {
                return Err(Error::invalid(format!(
                    "entity row {i}: {TIMESTAMP_COLUMN} is missing (every row needs the time its features must be as of)"
                )))
            }
            None => return Err(out_of_range(i)),
            Some(m) if check_range(*m).is_err() => return Err(out_of_range(i)),
            Some(_) => {}
        }
    }
    Ok(TimestampMicrosecondArray::from(micros).with_timezone("UTC"))
}

/// A join-key column in the entity's type `ty` (`string` or `int64`),
/// converted only where nothing is lost.
fn key_column(name: &str, entity: &str, a: &ArrayRef, ty: ValueType) -> Result<ArrayRef> {
    let refuse = || {
        Error::invalid(format!(
            "join key column {name:?} is {}, but entity {entity:?} has {ty} ids; send {ty} values",
            a.data_type()
        ))
    };
    let at = |i: usize, m: String| {
        Error::invalid(format!(
            "entity row {i}: join key {name:?} (entity {entity:?}, {ty} ids): {m}"
        ))
    };
    if let DataType::Dictionary(_, values) = a.data_type() {
        let plain = cast(a, values).map_err(|_| refuse())?;
        return key_column(name, entity, &plain, ty);
    }
    let dt = a.data_type();
    let is_text = matches!(
        dt,
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
    );
    let is_small_int = matches!(
        dt,
        DataType::Int8
            | DataType::Int16
            | DataType::Int32
            | DataType::UInt8
            | DataType::UInt16
            | DataType::UInt32
    );
    match ty {
        ValueType::String if dt == &DataType::Utf8 => Ok(a.clone()),
        ValueType::String
            if is_text || is_small_int || dt == &DataType::Int64 || dt == &DataType::UInt64 =>
        {
            cast(a, &DataType::Utf8).map_err(|_| refuse())
        }
        ValueType::Int64 if dt == &DataType::Int64 => Ok(a.clone()),
        ValueType::Int64 if is_small_int => cast(a, &DataType::Int64).map_err(|_| refuse()),
        ValueType::Int64 if dt == &DataType::UInt64 => {
            let out: Int64Array = a
                .as_primitive::<UInt64Type>()
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    v.map(|v| i64::try_from(v).map_err(|_| at(i, format!("{v} is {INT64_RANGE}"))))
                        .transpose()
                })
                .collect::<Result<_>>()?;
            Ok(Arc::new(out))
        }
        ValueType::Int64 if matches!(dt, DataType::Float32 | DataType::Float64) => {
            let values: Vec<Option<f64>> = match dt {
                DataType::Float32 => a
                    .as_primitive::<Float32Type>()
                    .iter()
                    .map(|v| v.map(f64::from))
                    .collect(),
                _ => a.as_primitive::<Float64Type>().iter().collect(),
            };
            let out: Int64Array = values
                .into_iter()
                .enumerate()
                .map(|(i, v)| {
                    v.map(|f| {
                        exact_i64(f).ok_or_else(|| {
                            at(
                                i,
                                format!("{f:?} is not an integer that a {dt} holds exactly"),
                            )
                        })
                    })
                    .transpose()
                })
                .collect::<Result<_>>()?;
            Ok(Arc::new(out))
        }
        ValueType::Int64 if is_text => {
            let s = cast(a, &DataType::Utf8).map_err(|_| refuse())?;
            let out: Int64Array = s
                .as_string::<i32>()
                .iter()
                .enumerate()
                .map(|(i, v)| v.map(|v| parse_int64(v).map_err(|m| at(i, m))).transpose())
                .collect::<Result<_>>()?;
            Ok(Arc::new(out))
        }
        _ => Err(refuse()),
    }
}

/// Builds an entity table from columns of typed values (the protobuf
/// request): each column in the type of its values (all of one type;
/// nulls allowed), then [`typed`] by the registry.
pub fn from_values(columns: Vec<(String, Vec<Value>)>) -> Result<RecordBatch> {
    if columns.is_empty() {
        return Err(Error::invalid(format!(
            "the entity table is empty: send the join keys and {TIMESTAMP_COLUMN} column-wise"
        )));
    }
    let n = columns[0].1.len();
    let mut fields = Vec::with_capacity(columns.len());
    let mut arrays = Vec::with_capacity(columns.len());
    for (name, values) in &columns {
        if values.len() != n {
            return Err(Error::invalid(format!(
                "entity column {} has {} values, {} has {n}; every column needs one value per row",
                quote(name),
                values.len(),
                quote(&columns[0].0)
            )));
        }
        let ty = values
            .iter()
            .find_map(Value::value_type)
            .unwrap_or(ValueType::String);
        if let Some((i, v)) = values
            .iter()
            .enumerate()
            .find(|(_, v)| !v.is_null() && v.value_type() != Some(ty))
        {
            return Err(Error::invalid(format!(
                "entity column {} row {i}: expected {ty} like the rows before, got {}",
                quote(name),
                v.type_name()
            )));
        }
        let refs: Vec<Option<&Value>> = values.iter().map(Some).collect();
        arrays.push(quiver_core::columnar::value_array(ty, &refs));
        fields.push(Field::new(name, arrow_type(ty), true));
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays)
        .map_err(|e| Error::internal(format!("entity table: {e}")))
}

/// Reads an entity table sent as an Arrow IPC stream.
///
/// An entity table is flat columns (join keys, `event_timestamp`, labels),
/// so that is all this accepts, and everything the stream announces is
/// checked against the bytes received before arrow reads it (see
/// [`check_ipc`]): memory stays proportional to the request and no input
/// can make arrow allocate what a length prefix claims. The decoding is
/// arrow's push decoder over the received bytes (taken without a copy);
/// a panic inside it is a refused request, not a lost server.
///
/// # Errors
/// `INVALID_ARGUMENT` when `bytes` is not one complete, uncompressed Arrow
/// IPC stream of at most [`MAX_IPC_COLUMNS`] flat columns.
pub fn from_ipc(bytes: Vec<u8>) -> Result<RecordBatch> {
    let bad = |e: String| {
        Error::invalid(format!(
            "entities_arrow is not an Arrow IPC stream quiver reads: {}",
            quiver_core::error::cut(&e)
        ))
    };
    check_ipc(&bytes).map_err(bad)?;
    let decoded = std::panic::catch_unwind(move || {
        let mut decoder = arrow::ipc::reader::StreamDecoder::new();
        let mut buf = arrow::buffer::Buffer::from_vec(bytes);
        let mut batches = Vec::new();
        while !buf.is_empty() {
            match decoder.decode(&mut buf).map_err(|e| e.to_string())? {
                Some(b) => batches.push(b),
                None => break,
            }
        }
        decoder.finish().map_err(|e| e.to_string())?;
        let schema = decoder.schema().ok_or("no schema")?;
        arrow::compute::concat_batches(&schema, &batches).map_err(|e| e.to_string())
    })
    .map_err(|_| bad("arrow could not decode it".to_owned()))?;
    decoded.map_err(bad)
}

/// Most columns an `entities_arrow` stream may have.
pub const MAX_IPC_COLUMNS: usize = 1_000;

/// Checks an Arrow IPC stream before arrow decodes it:
/// - framing: each metadata and body length within the bytes received,
///   nothing after the end-of-stream marker;
/// - metadata: verified with bounds on tables, depth and apparent size
///   proportional to its length (flatbuffers lets one table be referenced
///   many times);
/// - one schema, of at most [`MAX_IPC_COLUMNS`] flat columns of types an
///   entity table uses (integers, floats, booleans, strings, binary,
///   dates, timestamps, nulls), none dictionary-encoded;
/// - record batches: uncompressed (a compressed buffer announces the size
///   to decompress into), no dictionary batches, buffers 8-byte aligned,
///   in order, not overlapping and within the body, one node per column.
fn check_ipc(bytes: &[u8]) -> std::result::Result<(), String> {
    use arrow::ipc::{MessageHeader, Type};
    let word = |at: usize| -> Option<u32> {
        let b = bytes.get(at..at.checked_add(4)?)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let mut pos = 0usize;
    let mut columns: Option<usize> = None;
    while pos < bytes.len() {
        let mut len = word(pos).ok_or("a message length is cut short")?;
        pos += 4;
        if len == 0xFFFF_FFFF {
            len = word(pos).ok_or("a message length is cut short")?;
            pos += 4;
        }
        if len == 0 {
            if pos < bytes.len() {
                return Err("bytes follow the end-of-stream marker".into());
            }
            return Ok(());
        }
        let left = bytes.len() - pos;
        let len = len as usize;
        if len > left {
            return Err(format!(
                "a message announces {len} bytes of metadata, {left} remain"
            ));
        }
        let opts = flatbuffers::VerifierOptions {
            max_depth: 16,
            max_tables: len / 4 + 16,
            max_apparent_size: len.saturating_mul(4).max(4096),
            ignore_missing_null_terminator: false,
        };
        let msg = arrow::ipc::root_as_message_with_opts(&opts, &bytes[pos..pos + len])
            .map_err(|e| format!("invalid message metadata: {e}"))?;
        pos += len;
        let left = bytes.len() - pos;
        let body = usize::try_from(msg.bodyLength()).map_err(|_| "a negative body length")?;
        if body > left {
            return Err(format!(
                "a message announces a body of {body} bytes, {left} remain"
            ));
        }
        match msg.header_type() {
            MessageHeader::Schema => {
                if columns.is_some() {
                    return Err("a second schema".into());
                }
                let schema = msg
                    .header_as_schema()
                    .ok_or("a schema message without a schema")?;
                let fields = schema.fields().ok_or("a schema without fields")?;
                if fields.len() > MAX_IPC_COLUMNS {
                    return Err(format!(
                        "{} columns; an entity table has at most {MAX_IPC_COLUMNS}",
                        fields.len()
                    ));
                }
                for f in fields.iter() {
                    let name = f.name().unwrap_or_default();
                    if f.dictionary().is_some() {
                        return Err(format!(
                            "column {} is dictionary-encoded; send plain values",
                            quiver_core::error::quote(name)
                        ));
                    }
                    if f.children().is_some_and(|c| !c.is_empty()) {
                        return Err(format!(
                            "column {} is nested",
                            quiver_core::error::quote(name)
                        ));
                    }
                    let t = f.type_type();
                    let ok = match t {
                        Type::Null
                        | Type::Bool
                        | Type::Utf8
                        | Type::LargeUtf8
                        | Type::Binary
                        | Type::LargeBinary => true,
                        Type::Int => f
                            .type_as_int()
                            .is_some_and(|i| matches!(i.bitWidth(), 8 | 16 | 32 | 64)),
                        Type::FloatingPoint => f
                            .type_as_floating_point()
                            .is_some_and(|p| (0..=2).contains(&p.precision().0)),
                        Type::Date => f
                            .type_as_date()
                            .is_some_and(|d| (0..=1).contains(&d.unit().0)),
                        Type::Timestamp => f
                            .type_as_timestamp()
                            .is_some_and(|ts| (0..=3).contains(&ts.unit().0)),
                        _ => false,
                    };
                    if !ok {
                        return Err(format!(
                            "column {} has a type an entity table does not use ({}); send \
                             integers, floats, booleans, strings, dates or timestamps",
                            quiver_core::error::quote(name),
                            t.variant_name().unwrap_or("unknown")
                        ));
                    }
                }
                columns = Some(fields.len());
            }
            MessageHeader::RecordBatch => {
                let n = columns.ok_or("a record batch before the schema")?;
                let b = msg
                    .header_as_record_batch()
                    .ok_or("a record batch message without one")?;
                if b.compression().is_some() {
                    return Err(
                        "compressed buffers are not accepted: send an uncompressed stream".into(),
                    );
                }
                if b.nodes().map_or(0, |v| v.len()) != n {
                    return Err("a record batch's columns do not match the schema".into());
                }
                if b.variadicBufferCounts().is_some_and(|v| !v.is_empty()) {
                    return Err("a record batch with variadic buffers".into());
                }
                let mut end = 0i64;
                for buffer in b.buffers().into_iter().flatten() {
                    let (offset, length) = (buffer.offset(), buffer.length());
                    let fits = offset >= end
                        && offset % 8 == 0
                        && length >= 0
                        && offset
                            .checked_add(length)
                            .is_some_and(|e| e as u64 <= body as u64);
                    if !fits {
                        return Err(format!(
                            "a buffer at offset {offset} of {length} bytes is not in order \
                             within its body of {body} bytes"
                        ));
                    }
                    end = offset + length;
                }
            }
            MessageHeader::DictionaryBatch => {
                return Err("dictionary batches are not accepted; send plain values".into());
            }
            _ => return Err("an unexpected message type".into()),
        }
        pos += body;
    }
    Ok(())
}

/// Reads an entity table from a local `.parquet` or `.csv` file (CSV with a
/// header), then [`typed`] by the registry.
///
/// CSV carries no types. Join keys and `event_timestamp` are read as the
/// text written (an empty field is the empty string, not null). Other
/// columns (labels) take the type DataFusion infers, unless that would
/// change what was written: an integer column whose text is not the
/// integer's own spelling (`02139`, `+5`) stays text.
pub async fn read_file(reg: &Registry, path: &std::path::Path) -> Result<RecordBatch> {
    use datafusion::prelude::ParquetReadOptions;
    let ctx = SessionContext::new_with_config(session_config());
    let shown = path.display().to_string();
    if !path.is_file() {
        return Err(Error::invalid(format!("{shown}: no such file")));
    }
    let name = shown.as_str();
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let batch = match extension.as_deref() {
        Some("parquet") => {
            let df = ctx
                .read_parquet(name, ParquetReadOptions::default())
                .await
                .map_err(|e| df_error(&shown, e))?;
            collect(df, &shown).await?
        }
        Some("csv") => {
            let (reg, path, at) = (reg.clone(), path.to_owned(), shown.clone());
            tokio::task::spawn_blocking(move || read_csv(&reg, &path, &at))
                .await
                .map_err(|e| Error::internal(format!("reading {shown}: {e}")))??
        }
        _ => {
            return Err(Error::invalid(format!(
                "{shown}: the entity table must be a .parquet or .csv file"
            )))
        }
    };
    // Readers may produce string views; pass plain strings through.
    let columns = batch
        .columns()
        .iter()
        .map(|c| match c.data_type() {
            DataType::Utf8View | DataType::LargeUtf8 => cast(c, &DataType::Utf8),
            DataType::BinaryView | DataType::LargeBinary => cast(c, &DataType::Binary),
            _ => Ok(c.clone()),
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::invalid(format!("{shown}: {e}")))?;
    let fields: Vec<Field> = batch
        .schema()
        .fields()
        .iter()
        .zip(&columns)
        .map(|(f, c)| Field::new(f.name(), c.data_type().clone(), f.is_nullable()))
        .collect();
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
        .map_err(|e| Error::invalid(format!("{shown}: {e}")))
}

/// All rows of `df` in one batch.
async fn collect(df: datafusion::dataframe::DataFrame, shown: &str) -> Result<RecordBatch> {
    let schema: Arc<Schema> = Arc::new(df.schema().as_arrow().clone());
    let batches = df.collect().await.map_err(|e| df_error(shown, e))?;
    arrow::compute::concat_batches(&schema, &batches)
        .map_err(|e| Error::invalid(format!("{shown}: {e}")))
}

/// A CSV entity table, see [`read_file`]: read once as written (every
/// column text, empty fields empty) and once with inferred types.
/// (arrow-csv directly: DataFusion 55 reads every empty field as null.)
fn read_csv(reg: &Registry, path: &std::path::Path, shown: &str) -> Result<RecordBatch> {
    use arrow::csv::reader::{Format, ReaderBuilder};
    let bad = |e: &dyn std::fmt::Display| Error::invalid(format!("{shown}: {e}"));
    let open = || std::fs::File::open(path).map_err(|e| bad(&e));
    let read = |builder: ReaderBuilder, schema: &Arc<Schema>| -> Result<RecordBatch> {
        let batches = builder
            .build(open()?)
            .map_err(|e| bad(&e))?
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| bad(&e))?;
        arrow::compute::concat_batches(schema, &batches).map_err(|e| bad(&e))
    };
    let (schema, _) = Format::default()
        .with_header(true)
        .infer_schema(open()?, None)
        .map_err(|e| bad(&e))?;
    if let Some(name) = duplicate(schema.fields().iter().map(|f| f.name().as_str())) {
        return Err(bad(&format!("the column {} appears twice", quote(name))));
    }
    // Keys and times are text whatever they look like (an id like a date, a
    // time with nanoseconds beyond 2262): nothing to infer. Labels may be
    // integers, floats or booleans; anything else the reader would guess
    // (dates, times without their offsets) stays the text written.
    let label_type =
        |t: &DataType| matches!(t, DataType::Int64 | DataType::Float64 | DataType::Boolean);
    let schema = Arc::new(Schema::new(
        schema
            .fields()
            .iter()
            .map(|f| {
                let key =
                    f.name() == TIMESTAMP_COLUMN || reg.entity_by_join_key(f.name()).is_some();
                if key || !label_type(f.data_type()) {
                    Field::new(f.name(), DataType::Utf8, true)
                } else {
                    (**f).clone()
                }
            })
            .collect::<Vec<_>>(),
    ));
    let inferred = read(
        ReaderBuilder::new(schema.clone()).with_header(true),
        &schema,
    )?;
    let text_schema = Arc::new(Schema::new(
        schema
            .fields()
            .iter()
            .map(|f| Field::new(f.name(), DataType::Utf8, true))
            .collect::<Vec<_>>(),
    ));
    // A null pattern that matches nothing: empty fields stay "".
    let never = regex::Regex::new("[^\\s\\S]").expect("a valid pattern");
    let text = read(
        ReaderBuilder::new(text_schema.clone())
            .with_header(true)
            .with_null_regex(never),
        &text_schema,
    )?;
    let mut fields = Vec::with_capacity(text.num_columns());
    let mut columns = Vec::with_capacity(text.num_columns());
    for (i, f) in schema.fields().iter().enumerate() {
        let written = text.column(i).as_string::<i32>();
        let key = f.name() == TIMESTAMP_COLUMN || reg.entity_by_join_key(f.name()).is_some();
        // Inference may not change what was written: an integer's own
        // spelling (02139 is not 2139), a float's range (1e400 is not inf).
        let changed = match f.data_type() {
            DataType::Int64 => {
                let ints = inferred
                    .column(i)
                    .as_primitive::<arrow::datatypes::Int64Type>();
                (0..ints.len())
                    .any(|r| ints.is_valid(r) && ints.value(r).to_string() != written.value(r))
            }
            DataType::Float64 => {
                let floats = inferred
                    .column(i)
                    .as_primitive::<arrow::datatypes::Float64Type>();
                (0..floats.len()).any(|r| {
                    let spelled = written
                        .value(r)
                        .trim()
                        .trim_start_matches(['+', '-'])
                        .to_ascii_lowercase();
                    floats.is_valid(r)
                        && floats.value(r).is_infinite()
                        && spelled != "inf"
                        && spelled != "infinity"
                })
            }
            _ => false,
        };
        if key {
            fields.push(Field::new(f.name(), DataType::Utf8, true));
            columns.push(text.column(i).clone());
        } else if changed {
            // The text, with empty fields null like every label's.
            let labels: arrow::array::StringArray = written
                .iter()
                .map(|v| v.filter(|v| !v.is_empty()))
                .collect();
            fields.push(Field::new(f.name(), DataType::Utf8, true));
            columns.push(Arc::new(labels) as ArrayRef);
        } else {
            fields.push((**f).clone());
            columns.push(inferred.column(i).clone());
        }
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).map_err(|e| bad(&e))
}

#[cfg(test)]
mod tests {
    use arrow::array::{
        Date32Array, Float64Array, Int32Array, LargeStringArray, StringArray,
        TimestampNanosecondArray, TimestampSecondArray, UInt64Array,
    };

    use super::*;

    /// How far the peak resident set rose above the current one during `f`.
    fn peak_rss_after_reset(f: impl FnOnce()) -> u64 {
        quiver_testkit::reset_peak_rss();
        let (before, _) = quiver_testkit::rss();
        f();
        quiver_testkit::rss().1.saturating_sub(before)
    }

    /// Length prefixes are bounds, not allocation sizes: a stream whose
    /// first message announces ~2 GiB (8 bytes in all) is refused without
    /// memory growing; a truncated stream and a stream with its body cut
    /// are refused too; a real stream still reads.
    #[test]
    fn arrow_ipc_lengths_are_checked_against_the_bytes_received() {
        for bytes in [
            vec![0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f],
            vec![0xff, 0xff, 0xff, 0xff, 0x10, 0x00, 0x00, 0x00, 0x01],
            vec![0x7f, 0xff, 0xff, 0xff],
        ] {
            let mut result = None;
            let grown = peak_rss_after_reset(|| result = Some(from_ipc(bytes.clone())));
            let err = result.unwrap().unwrap_err();
            assert_eq!(err.kind(), quiver_core::ErrorKind::InvalidArgument, "{err}");
            assert!(
                grown < 64 << 20,
                "{bytes:x?}: peak RSS grew {} MB",
                grown >> 20
            );
        }
        let schema = Arc::new(Schema::new(vec![Field::new(
            "user_id",
            DataType::Utf8,
            false,
        )]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(StringArray::from(vec!["u1", "u2"])) as ArrayRef],
        )
        .unwrap();
        let mut ipc = Vec::new();
        {
            let mut w = arrow::ipc::writer::StreamWriter::try_new(&mut ipc, &schema).unwrap();
            w.write(&batch).unwrap();
            w.finish().unwrap();
        }
        assert_eq!(from_ipc(ipc.clone()).unwrap(), batch);
        // The body cut short.
        let cut = &ipc[..ipc.len() - 20];
        assert!(from_ipc(cut.to_vec()).is_err());
        // Compressed buffers announce the size to decompress into: refused.
        let mut lz4 = Vec::new();
        {
            let opts = arrow::ipc::writer::IpcWriteOptions::default()
                .try_with_compression(Some(arrow::ipc::CompressionType::LZ4_FRAME))
                .unwrap();
            let mut w =
                arrow::ipc::writer::StreamWriter::try_new_with_options(&mut lz4, &schema, opts)
                    .unwrap();
            w.write(&batch).unwrap();
            w.finish().unwrap();
        }
        let err = from_ipc(lz4).unwrap_err();
        assert!(err.message().contains("compressed"), "{err}");
        // Dictionary-encoded and nested columns: not an entity table.
        for (field, array) in [
            (
                Field::new_dictionary("user_id", DataType::Int8, DataType::Utf8, false),
                Arc::new(
                    vec!["u1", "u2"]
                        .into_iter()
                        .collect::<arrow::array::DictionaryArray<arrow::datatypes::Int8Type>>(),
                ) as ArrayRef,
            ),
            (
                Field::new_list("user_id", Field::new("item", DataType::Int64, true), false),
                Arc::new(arrow::array::ListArray::from_iter_primitive::<
                    arrow::datatypes::Int64Type,
                    _,
                    _,
                >(vec![Some(vec![Some(1)]), Some(vec![])])) as ArrayRef,
            ),
        ] {
            let schema = Arc::new(Schema::new(vec![field]));
            let b = RecordBatch::try_new(schema.clone(), vec![array]).unwrap();
            let mut out = Vec::new();
            {
                let mut w = arrow::ipc::writer::StreamWriter::try_new(&mut out, &schema).unwrap();
                w.write(&b).unwrap();
                w.finish().unwrap();
            }
            let err = from_ipc(out).unwrap_err();
            assert!(
                err.message().contains("dictionary") || err.message().contains("nested"),
                "{err}"
            );
        }
        // Bytes after the end-of-stream marker (a second stream) are refused.
        let mut twice = ipc.clone();
        twice.extend_from_slice(&ipc);
        assert!(from_ipc(twice).is_err());
    }

    fn registry() -> Registry {
        Registry::from_toml(
            "r.toml",
            r#"
[[entities]]
name = "account"
join_key = "account_id"

[[entities]]
name = "shop"
join_key = "shop_id"
value_type = "int64"
"#,
        )
        .unwrap()
    }

    fn table(cols: Vec<(&str, ArrayRef)>) -> RecordBatch {
        RecordBatch::try_from_iter(cols).unwrap()
    }

    fn ts_strings(n: usize) -> ArrayRef {
        Arc::new(StringArray::from(vec!["2026-11-02T00:00:00Z"; n]))
    }

    #[test]
    fn string_keys_keep_their_text() {
        let (t, _) = typed(
            &registry(),
            table(vec![
                (
                    "account_id",
                    Arc::new(StringArray::from(vec!["007", "7"])) as ArrayRef,
                ),
                ("event_timestamp", ts_strings(2)),
            ]),
        )
        .unwrap();
        let ids: Vec<_> = t.column(0).as_string::<i32>().iter().flatten().collect();
        assert_eq!(ids, vec!["007", "7"]);
    }

    #[test]
    fn keys_convert_only_when_nothing_is_lost() {
        let reg = registry();
        let keys = |name: &str, col: ArrayRef| {
            typed(
                &reg,
                table(vec![
                    (name, col.clone()),
                    ("event_timestamp", ts_strings(col.len())),
                ]),
            )
            .map(|(t, _)| t.column(0).clone())
        };
        // Integers become decimal text for a string entity.
        let k = keys("account_id", Arc::new(Int32Array::from(vec![7, -1]))).unwrap();
        assert_eq!(k.as_string::<i32>().value(0), "7");
        let k = keys("account_id", Arc::new(LargeStringArray::from(vec!["a"]))).unwrap();
        assert_eq!(k.data_type(), &DataType::Utf8);
        // Text, integral floats and unsigned integers become int64 ids.
        let k = keys(
            "shop_id",
            Arc::new(StringArray::from(vec![Some("007"), None, Some("-3")])),
        )
        .unwrap();
        let k = k.as_primitive::<arrow::datatypes::Int64Type>();
        assert_eq!((k.value(0), k.is_null(1), k.value(2)), (7, true, -3));
        let k = keys("shop_id", Arc::new(Float64Array::from(vec![3.0]))).unwrap();
        assert_eq!(k.as_primitive::<arrow::datatypes::Int64Type>().value(0), 3);
        // Everything else is an error naming column, type and row.
        for (name, col, needle) in [
            (
                "account_id",
                Arc::new(Float64Array::from(vec![1.5])) as ArrayRef,
                "is Float64",
            ),
            (
                "shop_id",
                Arc::new(Float64Array::from(vec![1.0, 1.5])),
                "entity row 1",
            ),
            (
                "shop_id",
                Arc::new(Float64Array::from(vec![1e17])),
                "exactly",
            ),
            (
                "shop_id",
                Arc::new(StringArray::from(vec!["x7"])),
                "not an integer",
            ),
            (
                "shop_id",
                Arc::new(StringArray::from(vec!["9223372036854775808"])),
                "out of range for int64",
            ),
            (
                "shop_id",
                Arc::new(UInt64Array::from(vec![u64::MAX])),
                "out of range for int64",
            ),
        ] {
            let e = keys(name, col).unwrap_err();
            assert!(e.message().contains(needle), "{needle}: {e}");
        }
    }

    #[test]
    fn times_of_every_form_are_utc_microseconds() {
        let reg = registry();
        let times = |col: ArrayRef| {
            typed(&reg, table(vec![("event_timestamp", col)])).map(|(_, t)| t.values().to_vec())
        };
        let want = 1_764_410_400_000_000; // 2025-11-29T10:00:00Z
        assert_eq!(
            times(Arc::new(StringArray::from(vec![
                "2025-11-29T15:30:00+05:30",
                "2025-11-29T05:00:00.000-05:00",
                "2025-11-29 10:00:00Z",
            ])))
            .unwrap(),
            vec![want; 3]
        );
        assert_eq!(
            times(Arc::new(
                TimestampSecondArray::from(vec![want / 1_000_000]).with_timezone("+05:30")
            ))
            .unwrap(),
            vec![want]
        );
        assert_eq!(
            times(Arc::new(TimestampNanosecondArray::from(vec![-1]))).unwrap(),
            vec![-1]
        );
        assert_eq!(
            times(Arc::new(Date32Array::from(vec![1]))).unwrap(),
            vec![86_400_000_000]
        );
        for (col, needle) in [
            (
                Arc::new(StringArray::from(vec!["2025-11-29T10:00:00"])) as ArrayRef,
                "not an RFC 3339",
            ),
            (
                Arc::new(StringArray::from(vec![Some("2025-11-29T10:00:00Z"), None])),
                "entity row 1",
            ),
            (Arc::new(Int64Array::from(vec![1])), "is Int64"),
            (
                Arc::new(TimestampSecondArray::from(vec![i64::MAX])),
                "outside the supported range",
            ),
            (
                Arc::new(StringArray::from(vec!["10000-01-01T00:00:00Z"])),
                "not an RFC 3339",
            ),
        ] {
            let e = times(col).unwrap_err();
            assert!(e.message().contains(needle), "{needle}: {e}");
        }
    }

    /// One entity table in every form a client sends it: each comes back
    /// with the same string ids (digits, leading zeros, commas, quotes and
    /// all), the same int64 ids and the instants its RFC 3339 texts name.
    mod forms {
        use proptest::prelude::*;
        use quiver_core::time::{format_rfc3339, MAX_MICROS, MIN_MICROS};

        use super::*;

        /// `m` written as the wall-clock time at a UTC offset of `minutes`.
        fn with_offset(m: i64, minutes: i32) -> String {
            if minutes == 0 {
                return format_rfc3339(m);
            }
            let local = format_rfc3339(m + i64::from(minutes) * 60_000_000);
            let a = minutes.abs();
            let sign = if minutes < 0 { '-' } else { '+' };
            format!(
                "{}{sign}{:02}:{:02}",
                local.trim_end_matches('Z'),
                a / 60,
                a % 60
            )
        }

        fn rows() -> impl Strategy<Value = Vec<(String, i64, i64, i32)>> {
            let id = prop_oneof![
                "[0-9]{1,5}",
                "0[0-9]{1,4}",
                "[a-z ,\"']{1,6}",
                any::<String>().prop_filter("one line", |s| !s.contains(['\r', '\n'])),
            ];
            let day = 86_400_000_000;
            proptest::collection::vec(
                (
                    id,
                    any::<i64>(),
                    (MIN_MICROS + day)..(MAX_MICROS - day),
                    -1439..=1439i32,
                ),
                1..8,
            )
        }

        fn check(t: &RecordBatch, want: &[(String, i64, i64, i32)]) -> Result<(), TestCaseError> {
            let (t, times) =
                typed(&registry(), t.clone()).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let ids: Vec<&str> = t
                .column_by_name("account_id")
                .unwrap()
                .as_string::<i32>()
                .iter()
                .flatten()
                .collect();
            let shops = t
                .column_by_name("shop_id")
                .unwrap()
                .as_primitive::<arrow::datatypes::Int64Type>()
                .values()
                .to_vec();
            prop_assert_eq!(ids, want.iter().map(|r| r.0.as_str()).collect::<Vec<_>>());
            prop_assert_eq!(shops, want.iter().map(|r| r.1).collect::<Vec<_>>());
            prop_assert_eq!(
                times.values().to_vec(),
                want.iter().map(|r| r.2).collect::<Vec<_>>()
            );
            Ok(())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(48))]
            #[test]
            fn every_form_reads_the_same_table(rows in rows()) {
                let table = RecordBatch::try_from_iter(vec![
                    ("account_id", Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0.clone()))) as ArrayRef),
                    ("shop_id", Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.1)))),
                    ("event_timestamp", Arc::new(StringArray::from_iter_values(rows.iter().map(|r| with_offset(r.2, r.3))))),
                ]).unwrap();
                // Arrow IPC (gRPC entities_arrow, the Python client).
                let ipc = crate::retrieve::to_ipc(&table).unwrap();
                check(&from_ipc(ipc.clone()).unwrap(), &rows)?;
                // Protobuf columns.
                let values: Vec<(String, Vec<Value>)> = vec![
                    ("account_id".into(), rows.iter().map(|r| Value::String(r.0.clone())).collect()),
                    ("shop_id".into(), rows.iter().map(|r| Value::Int64(r.1)).collect()),
                    ("event_timestamp".into(), rows.iter().map(|r| Value::Timestamp(r.2)).collect()),
                ];
                check(&from_values(values).unwrap(), &rows)?;
                // Parquet and CSV files (`quiver batch retrieve`).
                let dir = tempfile::tempdir().unwrap();
                let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
                let parquet = dir.path().join("e.parquet");
                crate::retrieve::write_parquet_file(&table, &parquet).unwrap();
                check(&rt.block_on(read_file(&registry(), &parquet)).unwrap(), &rows)?;
                let csv = dir.path().join("e.csv");
                let mut w = arrow::csv::WriterBuilder::new().with_header(true).build(std::fs::File::create(&csv).unwrap());
                w.write(&table).unwrap();
                drop(w);
                check(&rt.block_on(read_file(&registry(), &csv)).unwrap(), &rows)?;
            }
        }
    }

    /// CSV labels keep inferred types only where the text is the value's own
    /// spelling; key fields that are empty are the empty id.
    #[tokio::test]
    async fn csv_labels_are_not_changed_by_inference() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e.csv");
        std::fs::write(
            &path,
            "account_id,event_timestamp,zip,label,score,seen,big\n\
             ,2026-11-02T00:00:00Z,02139,1,0.5,2026-11-29T15:30:00+05:30,1e400\n\
             a,2026-11-02T00:00:00Z,10001,0,,2026-11-29T10:00:00,\n\
             2024-02-30,2300-01-01T00:00:00.123456789Z,10002,1,1.5,2024-02-30,2.5\n",
        )
        .unwrap();
        let t = read_file(&registry(), &path).await.unwrap();
        let text = |c: &str| {
            t.column_by_name(c)
                .unwrap()
                .as_string::<i32>()
                .iter()
                .map(|v| v.map(str::to_owned))
                .collect::<Vec<_>>()
        };
        // Keys and times are never inferred: an id that looks like a
        // date, a time with nanoseconds beyond 2262.
        assert_eq!(
            text("account_id"),
            vec![
                Some(String::new()),
                Some("a".into()),
                Some("2024-02-30".into())
            ]
        );
        assert_eq!(
            text("zip"),
            vec![
                Some("02139".into()),
                Some("10001".into()),
                Some("10002".into())
            ]
        );
        // Labels the reader would turn into times (losing the offset) or
        // into an infinity stay the text written; empty label fields are
        // null.
        assert_eq!(
            text("seen"),
            vec![
                Some("2026-11-29T15:30:00+05:30".into()),
                Some("2026-11-29T10:00:00".into()),
                Some("2024-02-30".into())
            ]
        );
        assert_eq!(
            text("big"),
            vec![Some("1e400".into()), None, Some("2.5".into())]
        );
        let label = t.column_by_name("label").unwrap();
        assert!(label.data_type().is_integer(), "{}", label.data_type());
        let score = t.column_by_name("score").unwrap();
        assert_eq!(score.data_type(), &DataType::Float64);
        assert!(score.is_null(1));
        let (_, times) = typed(&registry(), t).unwrap();
        assert_eq!(times.value(2), 10_413_792_000_123_456);
        // A column twice is an error, not a silent pick.
        std::fs::write(
            &path,
            "account_id,account_id,event_timestamp\nu0,u1,2026-11-02T00:00:00Z\n",
        )
        .unwrap();
        let e = read_file(&registry(), &path).await.unwrap_err();
        assert!(
            e.message()
                .contains("the column \"account_id\" appears twice"),
            "{e}"
        );
    }

    #[test]
    fn labels_pass_through() {
        let (t, _) = typed(
            &registry(),
            table(vec![
                ("event_timestamp", ts_strings(1)),
                (
                    "label",
                    Arc::new(Float64Array::from(vec![f64::NAN])) as ArrayRef,
                ),
            ]),
        )
        .unwrap();
        assert!(t.column(1).as_primitive::<Float64Type>().value(0).is_nan());
    }
}
