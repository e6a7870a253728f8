//! Helpers of the tests that read the offline store: protobuf values,
//! historical retrieval over gRPC, Parquet tables put into the store.

use quiver_batch::arrow::array::{Float64Array, RecordBatch};
use quiver_batch::arrow::compute::concat_batches;
use quiver_batch::Offline;
use quiver_core::wire::micros_to_ts;
use quiver_proto::v1 as pb;
use quiver_proto::v1::get_historical_features_request::Kind as HSel;

use super::TestServer;

pub fn pb_s(v: &str) -> pb::Value {
    pb::Value {
        kind: Some(pb::value::Kind::StringVal(v.into())),
    }
}

pub fn pb_i(v: i64) -> pb::Value {
    pb::Value {
        kind: Some(pb::value::Kind::Int64Val(v)),
    }
}

pub fn pb_t(v: i64) -> pb::Value {
    pb::Value {
        kind: Some(pb::value::Kind::TimestampVal(micros_to_ts(v))),
    }
}

pub fn column(vals: Vec<pb::Value>) -> pb::RepeatedValue {
    pb::RepeatedValue { val: vals }
}

/// A historical request's selection of `view:feature` references.
pub fn refs(features: &[&str]) -> Option<HSel> {
    Some(HSel::Features(pb::FeatureList {
        val: features.iter().map(|f| f.to_string()).collect(),
    }))
}

/// Calls GetHistoricalFeatures and concatenates the streamed batches.
pub async fn historical(
    server: &TestServer,
    req: pb::GetHistoricalFeaturesRequest,
) -> Result<RecordBatch, tonic::Status> {
    let mut client = server.client().await;
    let mut stream = client.get_historical_features(req).await?.into_inner();
    let mut batches = Vec::new();
    while let Some(m) = stream.message().await? {
        // A response (list features too), not an entity table: arrow's own reader.
        let reader = quiver_batch::arrow::ipc::reader::StreamReader::try_new(
            std::io::Cursor::new(m.arrow_ipc),
            None,
        )
        .unwrap();
        batches.extend(reader.map(Result::unwrap));
    }
    let schema = batches[0].schema();
    Ok(concat_batches(&schema, &batches).unwrap())
}

/// A float64 column of a result.
pub fn doubles(batch: &RecordBatch, name: &str) -> Vec<Option<f64>> {
    let a = batch
        .column_by_name(name)
        .unwrap_or_else(|| panic!("no column {name} in {:?}", batch.schema()));
    let a = a.as_any().downcast_ref::<Float64Array>().unwrap();
    a.iter().collect()
}

/// Writes a Parquet file into the offline store (local or S3).
pub async fn put_table(offline: &Offline, path: &str, batch: &RecordBatch) {
    use object_store::ObjectStoreExt;
    let mut buf = Vec::new();
    let mut w = parquet::arrow::ArrowWriter::try_new(&mut buf, batch.schema(), None).unwrap();
    w.write(batch).unwrap();
    w.close().unwrap();
    let p = quiver_core::storage::child(offline.root(), &path.split('/').collect::<Vec<_>>());
    offline.store().put(&p, buf.into()).await.unwrap();
}
