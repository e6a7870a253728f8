//! Online-store key layout and value encoding, version 1.
//!
//! Documented for operators in `docs/storage-format.md`; change both together
//! and bump [`KEY_PREFIX`] / [`FORMAT_VERSION`] when the layout changes.
//!
//! Keys: `qv1:{<join_key>=<id>[|<join_key>=<id>...]}:<view>`. The braces
//! are a Redis Cluster hash tag: all views of one entity share a slot, so a
//! lookup of several views for one entity stays on one node. Ids are
//! percent-escaped so `{`, `}`, `|`, `=` and `%` inside an id cannot forge a
//! different key.
//!
//! Values: a version byte, then a tag byte and a little-endian payload
//! (varint lengths for strings, bytes and lists). The embedded store keeps a
//! whole row in one blob: version, event time, expiry, then named values.

use crate::error::{Error, Result};
use crate::time::Micros;
use crate::value::Value;

/// Prefix of every key written by this layout version.
pub const KEY_PREFIX: &str = "qv1";
/// First byte of every encoded value.
pub const FORMAT_VERSION: u8 = 1;

/// Builds the key part that identifies an entity row: `join_key=id` pairs in
/// the feature view's entity order.
pub fn entity_key(pairs: &[(&str, &Value)]) -> Result<String> {
    let mut out = String::with_capacity(32);
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('|');
        }
        out.push_str(k);
        out.push('=');
        match v {
            Value::String(s) => escape_into(s, &mut out),
            Value::Int64(n) => out.push_str(&n.to_string()),
            other => {
                return Err(Error::invalid(format!(
                    "join key {k:?} must be a string or int64, got {}",
                    other.type_name()
                )))
            }
        }
    }
    Ok(out)
}

/// The full store key of `view` for an entity key from [`entity_key`].
pub fn row_key(entity_key: &str, view: &str) -> String {
    let mut k = String::with_capacity(KEY_PREFIX.len() + entity_key.len() + view.len() + 4);
    k.push_str(KEY_PREFIX);
    k.push_str(":{");
    k.push_str(entity_key);
    k.push_str("}:");
    k.push_str(view);
    k
}

/// The key of a tile row's event-id row: the digests of the events each
/// tile counted ([`crate::aggregate::ids_field`]), kept apart from the
/// states so that reads of features never fetch them, and in the same
/// Redis Cluster slot (same hash tag) so that one script updates both.
pub fn event_ids_key(row_key: &str) -> String {
    format!("{row_key}{EVENT_IDS_SUFFIX}")
}

/// What [`event_ids_key`] appends to a row key (`#` occurs in no view
/// name).
pub const EVENT_IDS_SUFFIX: &str = "#ids";

fn escape_into(s: &str, out: &mut String) {
    for c in s.chars() {
        match c {
            '{' | '}' | '|' | '=' | '%' => out.push_str(&format!("%{:02X}", c as u32)),
            c => out.push(c),
        }
    }
}

// Tags of the value encoding. Never renumber.
const T_NULL: u8 = 0;
const T_INT64: u8 = 1;
const T_DOUBLE: u8 = 2;
const T_STRING: u8 = 3;
const T_BOOL: u8 = 4;
const T_BYTES: u8 = 5;
const T_TIMESTAMP: u8 = 6;
const T_INT64_LIST: u8 = 7;
const T_DOUBLE_LIST: u8 = 8;
const T_STRING_LIST: u8 = 9;
const T_BOOL_LIST: u8 = 10;
const T_BYTES_LIST: u8 = 11;
const T_FLOAT_LIST: u8 = 12;

/// Encodes one value with the version byte (the Redis hash field format).
pub fn encode_value(v: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(16);
    out.push(FORMAT_VERSION);
    encode_value_into(v, &mut out);
    out
}

/// The positions of `items` in the byte order of their names (`name`): the
/// order of features in a [`tie_digest`].
pub fn digest_order<T>(items: &[T], name: impl Fn(&T) -> &str) -> Vec<usize> {
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by(|&a, &b| name(&items[a]).cmp(name(&items[b])));
    order
}

/// The tie-break digest of a feature row: SHA-1 over the stored encoding
/// ([`encode_value`]) of each feature's value, the features taken in the
/// byte order of their names (`values` must come in that order, see
/// [`digest_order`]), a value the row lacks counting as null. Of two rows
/// with the same event time, the one with the greater digest (both taken
/// over the union of their feature names) wins, see
/// [`crate::store::replaces`]; the Redis write script computes the same
/// digest with `redis.sha1hex`, so every backend, ingest, materialization
/// and the point-in-time join agree.
pub fn tie_digest<'a>(values: impl IntoIterator<Item = Option<&'a Value>>) -> [u8; 20] {
    use sha1::{Digest, Sha1};
    let mut h = Sha1::new();
    let mut buf = Vec::with_capacity(64);
    for v in values {
        buf.clear();
        buf.push(FORMAT_VERSION);
        encode_value_into(v.unwrap_or(&Value::Null), &mut buf);
        h.update(&buf);
    }
    h.finalize().into()
}

/// Decodes a value written by [`encode_value`].
pub fn decode_value(buf: &[u8]) -> Result<Value> {
    let mut r = Reader(buf);
    let version = r.u8()?;
    if version != FORMAT_VERSION {
        return Err(corrupt(format!(
            "unsupported value format version {version}"
        )));
    }
    let v = r.value()?;
    if !r.0.is_empty() {
        return Err(corrupt("trailing bytes after value"));
    }
    Ok(v)
}

/// A whole feature row as the embedded store keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct RowBlob {
    /// Event time of the row.
    pub event_ts: Micros,
    /// Expiry instant (epoch micros), `None` for never.
    pub expire_at: Option<Micros>,
    /// Feature name and value pairs.
    pub features: Vec<(String, Value)>,
}

/// Encodes a [`RowBlob`].
pub fn encode_row(row: &RowBlob) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + row.features.len() * 16);
    out.push(FORMAT_VERSION);
    out.extend_from_slice(&row.event_ts.to_le_bytes());
    out.extend_from_slice(&row.expire_at.unwrap_or(0).to_le_bytes());
    put_varint(row.features.len() as u64, &mut out);
    for (name, v) in &row.features {
        put_bytes(name.as_bytes(), &mut out);
        encode_value_into(v, &mut out);
    }
    out
}

/// Decodes a [`RowBlob`].
pub fn decode_row(buf: &[u8]) -> Result<RowBlob> {
    let mut r = Reader(buf);
    let version = r.u8()?;
    if version != FORMAT_VERSION {
        return Err(corrupt(format!("unsupported row format version {version}")));
    }
    let event_ts = r.i64()?;
    let expire_at = Some(r.i64()?).filter(|&e| e != 0);
    let n = r.len()?;
    let mut features = Vec::with_capacity(n.min(4096));
    for _ in 0..n {
        let name = r.string()?;
        features.push((name, r.value()?));
    }
    Ok(RowBlob {
        event_ts,
        expire_at,
        features,
    })
}

/// An aggregation-tile row as the embedded store keeps it: raw fields
/// (see [`crate::aggregate`]) and an expiry.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TileBlob {
    /// Expiry instant (epoch micros), 0 for never.
    pub expire_at: Micros,
    /// Field name and raw value pairs, sorted by name.
    pub fields: Vec<(String, Vec<u8>)>,
}

/// Encodes a [`TileBlob`].
pub fn encode_tiles(t: &TileBlob) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + t.fields.len() * 32);
    out.push(FORMAT_VERSION);
    out.extend_from_slice(&t.expire_at.to_le_bytes());
    put_varint(t.fields.len() as u64, &mut out);
    for (name, v) in &t.fields {
        put_bytes(name.as_bytes(), &mut out);
        put_bytes(v, &mut out);
    }
    out
}

/// Decodes a [`TileBlob`].
pub fn decode_tiles(buf: &[u8]) -> Result<TileBlob> {
    decode_tiles_where(buf, |_| true)
}

/// [`decode_tiles`] keeping only the fields whose name passes `keep` (the
/// others' values are skipped, not copied).
pub fn decode_tiles_where(buf: &[u8], keep: impl Fn(&str) -> bool) -> Result<TileBlob> {
    let mut r = Reader(buf);
    let version = r.u8()?;
    if version != FORMAT_VERSION {
        return Err(corrupt(format!(
            "unsupported tile format version {version}"
        )));
    }
    let expire_at = r.i64()?;
    let n = r.len()?;
    let mut fields = Vec::with_capacity(n.min(4096));
    for _ in 0..n {
        let name_len = r.len()?;
        let name = std::str::from_utf8(r.take(name_len)?).map_err(|_| corrupt("invalid UTF-8"))?;
        let len = r.len()?;
        let value = r.take(len)?;
        if keep(name) {
            fields.push((name.to_owned(), value.to_vec()));
        }
    }
    Ok(TileBlob { expire_at, fields })
}

fn corrupt(m: impl std::fmt::Display) -> Error {
    Error::internal(format!("corrupt stored value: {m}"))
}

fn put_varint(mut n: u64, out: &mut Vec<u8>) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn put_bytes(b: &[u8], out: &mut Vec<u8>) {
    put_varint(b.len() as u64, out);
    out.extend_from_slice(b);
}

fn encode_value_into(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Null => out.push(T_NULL),
        Value::Int64(n) => {
            out.push(T_INT64);
            out.extend_from_slice(&n.to_le_bytes());
        }
        Value::Double(d) => {
            out.push(T_DOUBLE);
            out.extend_from_slice(&d.to_le_bytes());
        }
        Value::String(s) => {
            out.push(T_STRING);
            put_bytes(s.as_bytes(), out);
        }
        Value::Bool(b) => {
            out.push(T_BOOL);
            out.push(u8::from(*b));
        }
        Value::Bytes(b) => {
            out.push(T_BYTES);
            put_bytes(b, out);
        }
        Value::Timestamp(t) => {
            out.push(T_TIMESTAMP);
            out.extend_from_slice(&t.to_le_bytes());
        }
        Value::Int64List(l) => {
            out.push(T_INT64_LIST);
            put_varint(l.len() as u64, out);
            l.iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
        }
        Value::DoubleList(l) => {
            out.push(T_DOUBLE_LIST);
            put_varint(l.len() as u64, out);
            l.iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
        }
        Value::StringList(l) => {
            out.push(T_STRING_LIST);
            put_varint(l.len() as u64, out);
            l.iter().for_each(|x| put_bytes(x.as_bytes(), out));
        }
        Value::BoolList(l) => {
            out.push(T_BOOL_LIST);
            put_varint(l.len() as u64, out);
            l.iter().for_each(|x| out.push(u8::from(*x)));
        }
        Value::BytesList(l) => {
            out.push(T_BYTES_LIST);
            put_varint(l.len() as u64, out);
            l.iter().for_each(|x| put_bytes(x, out));
        }
        Value::FloatList(l) => {
            out.push(T_FLOAT_LIST);
            put_varint(l.len() as u64, out);
            l.iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
        }
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.0.len() < n {
            return Err(corrupt("truncated"));
        }
        let (h, t) = self.0.split_at(n);
        self.0 = t;
        Ok(h)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn arr8(&mut self) -> Result<[u8; 8]> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(a)
    }
    fn i64(&mut self) -> Result<i64> {
        Ok(i64::from_le_bytes(self.arr8()?))
    }
    fn f64(&mut self) -> Result<f64> {
        Ok(f64::from_le_bytes(self.arr8()?))
    }
    fn f32(&mut self) -> Result<f32> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(f32::from_le_bytes(a))
    }
    fn bool(&mut self) -> Result<bool> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(corrupt(format!("bad bool byte {b}"))),
        }
    }
    fn varint(&mut self) -> Result<u64> {
        let mut n: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            n |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(n);
            }
        }
        Err(corrupt("varint too long"))
    }
    /// A length that must fit in the remaining input (each element takes at
    /// least one byte), so corrupt lengths cannot trigger huge allocations.
    fn len(&mut self) -> Result<usize> {
        let n = self.varint()?;
        if n > self.0.len() as u64 {
            return Err(corrupt("length exceeds data"));
        }
        Ok(n as usize)
    }
    fn bytes(&mut self) -> Result<Vec<u8>> {
        let n = self.len()?;
        Ok(self.take(n)?.to_vec())
    }
    fn string(&mut self) -> Result<String> {
        String::from_utf8(self.bytes()?).map_err(|_| corrupt("invalid UTF-8"))
    }
    fn list<T>(&mut self, mut item: impl FnMut(&mut Self) -> Result<T>) -> Result<Vec<T>> {
        let n = self.len()?;
        (0..n).map(|_| item(self)).collect()
    }
    fn value(&mut self) -> Result<Value> {
        Ok(match self.u8()? {
            T_NULL => Value::Null,
            T_INT64 => Value::Int64(self.i64()?),
            T_DOUBLE => Value::Double(self.f64()?),
            T_STRING => Value::String(self.string()?),
            T_BOOL => Value::Bool(self.bool()?),
            T_BYTES => Value::Bytes(self.bytes()?),
            T_TIMESTAMP => Value::Timestamp(self.i64()?),
            T_INT64_LIST => Value::Int64List(self.list(Self::i64)?),
            T_DOUBLE_LIST => Value::DoubleList(self.list(Self::f64)?),
            T_STRING_LIST => Value::StringList(self.list(Self::string)?),
            T_BOOL_LIST => Value::BoolList(self.list(Self::bool)?),
            T_BYTES_LIST => Value::BytesList(self.list(Self::bytes)?),
            T_FLOAT_LIST => Value::FloatList(self.list(Self::f32)?),
            t => return Err(corrupt(format!("unknown value tag {t}"))),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Value> {
        vec![
            Value::Null,
            Value::Int64(i64::MIN),
            Value::Int64(42),
            Value::Double(-1.5),
            Value::Double(f64::INFINITY),
            Value::String(String::new()),
            Value::String("héllo {wörld}".into()),
            Value::Bool(true),
            Value::Bool(false),
            Value::Bytes(vec![0, 255, 7]),
            Value::Timestamp(-5),
            Value::Timestamp(1_764_000_000_000_000),
            Value::Int64List(vec![1, -2, 3]),
            Value::DoubleList(vec![]),
            Value::StringList(vec!["a".into(), "".into(), "ccc".into()]),
            Value::BoolList(vec![true, false]),
            Value::BytesList(vec![vec![], vec![1; 200]]),
            Value::FloatList((0..384).map(|i| i as f32 / 7.0).collect()),
        ]
    }

    proptest::proptest! {
        #[test]
        fn stored_bytes_round_trip((_ty, v) in crate::testing::typed_value()) {
            let back = decode_value(&encode_value(&v)).unwrap();
            proptest::prop_assert!(crate::testing::same_bits(&v, &back));
        }
    }

    #[test]
    fn every_value_round_trips() {
        for v in samples() {
            assert_eq!(decode_value(&encode_value(&v)).unwrap(), v);
        }
    }

    #[test]
    fn rows_round_trip() {
        let row = RowBlob {
            event_ts: 1_764_000_000_000_000,
            expire_at: Some(1_765_000_000_000_000),
            features: samples()
                .into_iter()
                .enumerate()
                .map(|(i, v)| (format!("f{i}"), v))
                .collect(),
        };
        assert_eq!(decode_row(&encode_row(&row)).unwrap(), row);
        let no_expiry = RowBlob {
            expire_at: None,
            features: vec![],
            ..row
        };
        assert_eq!(decode_row(&encode_row(&no_expiry)).unwrap(), no_expiry);
    }

    #[test]
    fn corrupt_input_is_an_error_not_a_panic() {
        for v in samples() {
            let enc = encode_value(&v);
            for cut in 0..enc.len() {
                let _ = decode_value(&enc[..cut]);
            }
            let mut flipped = enc.clone();
            for i in 0..flipped.len() {
                flipped[i] ^= 0xA5;
                let _ = decode_value(&flipped);
            }
        }
        assert!(decode_value(&[]).is_err());
        assert!(decode_value(&[2, T_NULL]).is_err());
        assert!(decode_value(&[1, 99]).is_err());
        assert!(decode_value(&[1, T_STRING, 0xff, 0xff, 0xff, 0xff, 0x0f]).is_err());
        assert!(decode_row(&[1, 0, 0]).is_err());
    }

    #[test]
    fn key_layout_is_stable_and_escaped() {
        let id = Value::String("user_123".into());
        let k = entity_key(&[("user_id", &id)]).unwrap();
        assert_eq!(
            row_key(&k, "user_profile"),
            "qv1:{user_id=user_123}:user_profile"
        );
        let forged = Value::String("a}|b=c%".into());
        let n = Value::Int64(-7);
        let k = entity_key(&[("user_id", &forged), ("product_id", &n)]).unwrap();
        assert_eq!(k, "user_id=a%7D%7Cb%3Dc%25|product_id=-7");
        assert!(entity_key(&[("user_id", &Value::Double(1.0))]).is_err());
    }
}
