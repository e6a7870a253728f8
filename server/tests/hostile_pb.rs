//! Property tests: protobuf requests of any content, decoded as tonic would
//! decode them, convert to domain requests or to an error that says what
//! is wrong; never a panic.

use proptest::prelude::*;
use quiver_proto::prost::Message;
use quiver_proto::prost_types;
use quiver_proto::v1 as pb;
use quiver_server::convert::{
    historical_request_from_pb, online_request_from_pb, write_rows_from_pb,
};

fn value() -> impl Strategy<Value = pb::Value> {
    use pb::value::Kind;
    prop_oneof![
        Just(pb::Value { kind: None }),
        any::<i64>().prop_map(|v| pb::Value {
            kind: Some(Kind::Int64Val(v))
        }),
        any::<f64>().prop_map(|v| pb::Value {
            kind: Some(Kind::DoubleVal(v))
        }),
        ".{0,8}".prop_map(|v| pb::Value {
            kind: Some(Kind::StringVal(v))
        }),
        any::<bool>().prop_map(|v| pb::Value {
            kind: Some(Kind::BoolVal(v))
        }),
        (any::<i64>(), any::<i32>()).prop_map(|(s, n)| pb::Value {
            kind: Some(Kind::TimestampVal(prost_types::Timestamp {
                seconds: s,
                nanos: n
            }))
        }),
        prop::collection::vec(any::<f32>(), 0..4).prop_map(|val| pb::Value {
            kind: Some(Kind::FloatListVal(pb::FloatList { val }))
        }),
    ]
}

fn online() -> impl Strategy<Value = pb::GetOnlineFeaturesRequest> {
    (
        prop::collection::vec("[a-z_:*]{0,12}", 0..4),
        prop::option::of("[a-z_]{0,12}"),
        prop::collection::hash_map("[a-z_]{0,8}", prop::collection::vec(value(), 0..4), 0..3),
        any::<bool>(),
    )
        .prop_map(
            |(features, service, entities, full)| pb::GetOnlineFeaturesRequest {
                kind: Some(match service {
                    Some(s) => pb::get_online_features_request::Kind::FeatureService(s),
                    None => pb::get_online_features_request::Kind::Features(pb::FeatureList {
                        val: features,
                    }),
                }),
                entities: entities
                    .into_iter()
                    .map(|(k, val)| (k, pb::RepeatedValue { val }))
                    .collect(),
                full_feature_names: full,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_decode_and_convert_or_fail_cleanly(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(req) = pb::GetOnlineFeaturesRequest::decode(bytes.as_slice()) {
            let _ = online_request_from_pb(req);
        }
        if let Ok(req) = pb::WriteFeaturesRequest::decode(bytes.as_slice()) {
            let _ = write_rows_from_pb(req.rows);
        }
        if let Ok(req) = pb::GetHistoricalFeaturesRequest::decode(bytes.as_slice()) {
            let _ = historical_request_from_pb(req);
        }
    }

    #[test]
    fn structured_requests_convert_or_fail_cleanly(req in online(), rows in prop::collection::vec(
        (prop::collection::hash_map("[a-z_]{0,8}", value(), 0..3),
         prop::option::of((any::<i64>(), any::<i32>())),
         prop::collection::hash_map("[a-z_0-9]{0,8}", value(), 0..4)), 0..4)) {
        // Re-encoded and decoded as the server would receive it.
        let bytes = req.encode_to_vec();
        let decoded = pb::GetOnlineFeaturesRequest::decode(bytes.as_slice()).unwrap();
        if let Err(e) = online_request_from_pb(decoded) {
            prop_assert!(!e.message().is_empty());
        }
        let rows = rows.into_iter().map(|(entity_key, ts, features)| pb::FeatureRow {
            entity_key,
            event_timestamp: ts.map(|(seconds, nanos)| prost_types::Timestamp { seconds, nanos }),
            features,
        }).collect();
        if let Err(e) = write_rows_from_pb(rows) {
            prop_assert!(!e.message().is_empty());
        }
    }
}
