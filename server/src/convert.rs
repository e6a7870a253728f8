//! Conversions between `quiver.v1` wire types and domain types.

use quiver_core::error::cut;
use quiver_core::registry::{AggFunction, Registry, ViewSource};
pub use quiver_core::wire::{micros_to_ts, ts_to_micros, value_from_pb, value_to_pb};
use quiver_core::{Error, Result, ValueType};
use quiver_proto::v1 as pb;

use crate::service::{
    EntityTable, FeatureRowIn, FeatureSelector, FieldStatus, OnlineRequest, OnlineResponse,
};

/// Domain request of a `GetOnlineFeaturesRequest`.
pub fn online_request_from_pb(req: pb::GetOnlineFeaturesRequest) -> Result<OnlineRequest> {
    let selector = selector_from_pb(req.kind.map(|k| match k {
        pb::get_online_features_request::Kind::FeatureService(s) => FeatureSelector::Service(s),
        pb::get_online_features_request::Kind::Features(l) => FeatureSelector::Refs(l.val),
    }))?;
    Ok(OnlineRequest {
        selector,
        entities: entity_columns_from_pb(req.entities)?,
        full_feature_names: req.full_feature_names,
    })
}

fn selector_from_pb(kind: Option<FeatureSelector>) -> Result<FeatureSelector> {
    kind.ok_or_else(|| {
        Error::invalid(
            "set either feature_service or features (a list of \"view:feature\" references)",
        )
    })
}

/// Column-wise entity values, sorted by column name (protobuf maps are
/// unordered; sorting makes output columns deterministic).
fn entity_columns_from_pb(
    cols: std::collections::HashMap<String, pb::RepeatedValue>,
) -> Result<Vec<(String, Vec<quiver_core::Value>)>> {
    let mut entities = cols
        .into_iter()
        .map(|(k, col)| {
            let values = col
                .val
                .into_iter()
                .enumerate()
                .map(|(i, v)| {
                    value_from_pb(v).map_err(|e| field_error(&format!("{}[{i}]", cut(&k)), e))
                })
                .collect::<Result<Vec<_>>>()?;
            Ok((k, values))
        })
        .collect::<Result<Vec<_>>>()?;
    entities.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(entities)
}

/// A `GetHistoricalFeaturesRequest` in domain terms: selector, entity
/// table, full feature names.
pub fn historical_request_from_pb(
    req: pb::GetHistoricalFeaturesRequest,
) -> Result<(FeatureSelector, EntityTable, bool)> {
    let selector = selector_from_pb(req.kind.map(|k| match k {
        pb::get_historical_features_request::Kind::FeatureService(s) => FeatureSelector::Service(s),
        pb::get_historical_features_request::Kind::Features(l) => FeatureSelector::Refs(l.val),
    }))?;
    let table = match (req.entities.is_empty(), req.entities_arrow.is_empty()) {
        (false, true) => EntityTable::Values(entity_columns_from_pb(req.entities)?),
        (true, false) => EntityTable::ArrowIpc(req.entities_arrow),
        (false, false) => {
            return Err(Error::invalid(
                "set either entities or entities_arrow, not both",
            ))
        }
        (true, true) => {
            return Err(Error::invalid(
                "no entity table: set entities (join keys and event_timestamp, column-wise) or entities_arrow (an Arrow IPC stream)",
            ))
        }
    };
    Ok((selector, table, req.full_feature_names))
}

fn status_to_pb(s: FieldStatus) -> pb::FieldStatus {
    match s {
        FieldStatus::Present => pb::FieldStatus::Present,
        FieldStatus::NullValue => pb::FieldStatus::NullValue,
        FieldStatus::NotFound => pb::FieldStatus::NotFound,
        FieldStatus::OutsideMaxAge => pb::FieldStatus::OutsideMaxAge,
    }
}

/// Wire response of a domain response.
pub fn online_response_to_pb(resp: OnlineResponse) -> pb::GetOnlineFeaturesResponse {
    pb::GetOnlineFeaturesResponse {
        metadata: Some(pb::GetOnlineFeaturesResponseMetadata {
            feature_names: Some(pb::FeatureNames { val: resp.names }),
        }),
        results: resp
            .columns
            .into_iter()
            .map(|c| pb::get_online_features_response::FeatureVector {
                values: c.values.into_iter().map(value_to_pb).collect(),
                statuses: c
                    .statuses
                    .into_iter()
                    .map(|s| status_to_pb(s) as i32)
                    .collect(),
                event_timestamps: c
                    .event_ts
                    .into_iter()
                    .map(|t| t.map(micros_to_ts).unwrap_or_default())
                    .collect(),
            })
            .collect(),
    }
}

/// Domain rows of a `WriteFeaturesRequest`.
pub fn write_rows_from_pb(rows: Vec<pb::FeatureRow>) -> Result<Vec<FeatureRowIn>> {
    rows.into_iter()
        .enumerate()
        .map(|(i, r)| {
            let at = |e: Error| Error::invalid(format!("row {i}: {}", e.message()));
            let convert = |m: std::collections::HashMap<String, pb::Value>| {
                m.into_iter()
                    .map(|(k, v)| {
                        let v = value_from_pb(v).map_err(|e| field_error(&cut(&k), e))?;
                        Ok((k, v))
                    })
                    .collect::<Result<Vec<_>>>()
            };
            Ok(FeatureRowIn {
                entity_key: convert(r.entity_key).map_err(at)?,
                event_ts: r
                    .event_timestamp
                    .as_ref()
                    .map(ts_to_micros)
                    .transpose()
                    .map_err(|e| at(field_error("event_timestamp", e)))?,
                features: convert(r.features).map_err(at)?,
            })
        })
        .collect()
}

/// `e` about the value of `field`, saying so.
fn field_error(field: &str, e: Error) -> Error {
    Error::new(e.kind(), format!("{field}: {}", e.message()))
}

/// Wire value type of a domain value type.
pub fn value_type_to_pb(t: ValueType) -> pb::ValueType {
    match t {
        ValueType::Int64 => pb::ValueType::Int64,
        ValueType::Double => pb::ValueType::Double,
        ValueType::String => pb::ValueType::String,
        ValueType::Bool => pb::ValueType::Bool,
        ValueType::Bytes => pb::ValueType::Bytes,
        ValueType::Timestamp => pb::ValueType::Timestamp,
        ValueType::Int64List => pb::ValueType::Int64List,
        ValueType::DoubleList => pb::ValueType::DoubleList,
        ValueType::StringList => pb::ValueType::StringList,
        ValueType::BoolList => pb::ValueType::BoolList,
        ValueType::BytesList => pb::ValueType::BytesList,
        ValueType::FloatList => pb::ValueType::FloatList,
    }
}

/// Wire name of where a view's values come from.
pub fn source_name(s: &ViewSource) -> &'static str {
    match s {
        ViewSource::Batch => "batch",
        ViewSource::Sql { .. } => "sql",
        ViewSource::Events { .. } => "events",
        ViewSource::Aggregations { .. } => "aggregations",
        ViewSource::OnDemand { .. } => "on_demand",
    }
}

/// The registry as a `GetRegistryResponse`.
pub fn registry_to_pb(reg: &Registry) -> pb::GetRegistryResponse {
    pb::GetRegistryResponse {
        entities: reg
            .entities()
            .iter()
            .map(|e| pb::EntitySpec {
                name: e.name.clone(),
                join_key: e.join_key.clone(),
                value_type: value_type_to_pb(e.value_type) as i32,
                description: e.description.clone(),
            })
            .collect(),
        feature_views: reg
            .views()
            .iter()
            .map(|v| pb::FeatureViewSpec {
                name: v.name.clone(),
                entities: v.entities.clone(),
                features: v
                    .features
                    .iter()
                    .enumerate()
                    .map(|(i, f)| pb::FeatureSpec {
                        name: f.name.clone(),
                        value_type: value_type_to_pb(f.value_type) as i32,
                        description: f.description.clone(),
                        dimension: f.dimension.unwrap_or(0),
                        unit: f.unit.clone(),
                        expression: match &v.source {
                            ViewSource::OnDemand { expressions, .. } => expressions[i].clone(),
                            _ => String::new(),
                        },
                    })
                    .collect(),
                ttl_seconds: v.ttl.map_or(0, |t| t.as_secs()),
                description: v.description.clone(),
                tags: v.tags.clone().into_iter().collect(),
                source: source_name(&v.source).to_owned(),
                event_types: match &v.source {
                    ViewSource::Events { event_types, .. } => event_types.clone(),
                    _ => Vec::new(),
                },
                tile_seconds: match &v.source {
                    ViewSource::Aggregations { tile, .. } => (*tile / 1_000_000) as u64,
                    _ => 0,
                },
                aggregations: match &v.source {
                    ViewSource::Aggregations { aggregations, .. } => aggregations
                        .iter()
                        .map(|a| pb::AggregationSpec {
                            name: a.name.clone(),
                            function: a.function.as_str().to_owned(),
                            attribute: a.attribute.clone().unwrap_or_default(),
                            event_types: a.event_types.clone(),
                            window_seconds: (a.window / 1_000_000) as u64,
                            n: match a.function {
                                AggFunction::LastN(n) => n,
                                _ => 0,
                            },
                        })
                        .collect(),
                    _ => Vec::new(),
                },
                sql: match &v.source {
                    ViewSource::Sql { query } => query.clone(),
                    _ => String::new(),
                },
                inputs: match &v.source {
                    ViewSource::OnDemand { inputs, .. } => inputs
                        .iter()
                        .map(|i| {
                            let iv = reg.view(i.view);
                            format!("{}:{}", iv.name, iv.features[i.feature].name)
                        })
                        .collect(),
                    _ => Vec::new(),
                },
                request: match &v.source {
                    ViewSource::OnDemand { request, .. } => request
                        .iter()
                        .map(|r| pb::AttributeSpec {
                            name: r.name.clone(),
                            value_type: value_type_to_pb(r.value_type) as i32,
                            optional: false,
                        })
                        .collect(),
                    _ => Vec::new(),
                },
            })
            .collect(),
        event_types: reg
            .event_types()
            .iter()
            .map(|e| pb::EventTypeSpec {
                name: e.name.clone(),
                entities: e.entities.clone(),
                attributes: e
                    .attributes
                    .iter()
                    .map(|(n, t)| pb::AttributeSpec {
                        name: n.clone(),
                        value_type: value_type_to_pb(*t) as i32,
                        optional: e.optional.contains(n),
                    })
                    .collect(),
                description: e.description.clone(),
            })
            .collect(),
        feature_services: reg
            .services()
            .iter()
            .map(|s| pb::FeatureServiceSpec {
                name: s.name.clone(),
                features: s.refs.clone(),
                description: s.description.clone(),
            })
            .collect(),
    }
}
