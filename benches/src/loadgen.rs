//! `quiver-loadgen`: closed-loop gRPC load against `GetOnlineFeatures`.
//!
//! `concurrency` workers each send one request at a time over a few shared
//! HTTP/2 connections for `duration`, after a warm-up; latencies go into an
//! HDR histogram. Prints one table row: rps, p50, p99, p99.9, errors.
//! With `--seed N` it first writes N entities (ids `000000000000` ..., the
//! format of redis-benchmark's `__rand_int__`) of the bench registry's view.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use quiver_proto::v1 as pb;
use quiver_proto::FeatureServiceClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

#[derive(Debug, Parser)]
#[command(about = "gRPC load generator for quiver GetOnlineFeatures")]
struct Args {
    /// gRPC endpoint.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    target: String,
    /// Concurrent in-flight requests.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// HTTP/2 connections shared by the workers.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Measured duration.
    #[arg(long, default_value = "10s", value_parser = humantime_like)]
    duration: Duration,
    /// Warm-up before measuring.
    #[arg(long, default_value = "2s", value_parser = humantime_like)]
    warmup: Duration,
    /// Entity rows per request.
    #[arg(long, default_value_t = 1)]
    entities: usize,
    /// Join key of the entity.
    #[arg(long, default_value = "entity_id")]
    join_key: String,
    /// Feature view whose features are requested (`view:*`).
    #[arg(long, default_value = "bench")]
    view: String,
    /// Entity ids are drawn from 0..keyspace.
    #[arg(long, default_value_t = 10_000)]
    keyspace: u64,
    /// Write this many entities (10 double features each) before the run.
    #[arg(long)]
    seed: Option<u64>,
    /// A label for the output row.
    #[arg(long, default_value = "quiver")]
    label: String,
    /// API key sent as `authorization: Bearer <key>` on every call.
    #[arg(long, env = "QUIVER_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// PEM CA certificate of the server (an `https://` target).
    #[arg(long)]
    ca_file: Option<std::path::PathBuf>,
}

/// `msg` as a request carrying `auth` (the API key's header value).
fn request<T>(msg: T, auth: &Option<MetadataValue<Ascii>>) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    if let Some(v) = auth {
        req.metadata_mut().insert("authorization", v.clone());
    }
    req
}

fn humantime_like(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    match unit {
        "s" | "" => Ok(Duration::from_secs(n)),
        "ms" => Ok(Duration::from_millis(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("bad duration unit in {s:?}; use ms, s or m")),
    }
}

fn id(n: u64) -> String {
    format!("{n:012}")
}

fn string_value(s: String) -> pb::Value {
    pb::Value {
        kind: Some(pb::value::Kind::StringVal(s)),
    }
}

async fn seed(
    client: &mut FeatureServiceClient<Channel>,
    args: &Args,
    auth: &Option<MetadataValue<Ascii>>,
    n: u64,
) -> Result<(), tonic::Status> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let ts = quiver_proto::prost_types::Timestamp {
        seconds: now.as_secs() as i64,
        nanos: 0,
    };
    let mut start = 0;
    while start < n {
        let end = (start + 5000).min(n);
        let rows = (start..end)
            .map(|i| pb::FeatureRow {
                entity_key: HashMap::from([(args.join_key.clone(), string_value(id(i)))]),
                event_timestamp: Some(ts),
                features: (0..10)
                    .map(|f| {
                        (
                            format!("f{f}"),
                            pb::Value {
                                kind: Some(pb::value::Kind::DoubleVal(i as f64 + f as f64 / 10.0)),
                            },
                        )
                    })
                    .collect(),
            })
            .collect();
        client
            .write_features(request(
                pb::WriteFeaturesRequest {
                    feature_view: args.view.clone(),
                    rows,
                },
                auth,
            ))
            .await?;
        start = end;
    }
    Ok(())
}

struct Xorshift(u64);
impl Xorshift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let auth: Option<MetadataValue<Ascii>> = match &args.api_key {
        Some(k) => Some(format!("Bearer {k}").parse()?),
        None => None,
    };
    let tls = match &args.ca_file {
        Some(ca) => {
            Some(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(std::fs::read(ca)?)))
        }
        None => None,
    };
    let mut channels = Vec::new();
    for _ in 0..args.connections.max(1) {
        let mut endpoint = Channel::from_shared(args.target.clone())?.tcp_nodelay(true);
        if let Some(tls) = &tls {
            endpoint = endpoint.tls_config(tls.clone())?;
        }
        channels.push(endpoint.connect().await?);
    }
    if let Some(n) = args.seed {
        let started = Instant::now();
        seed(
            &mut FeatureServiceClient::new(channels[0].clone()),
            &args,
            &auth,
            n,
        )
        .await?;
        eprintln!("seeded {n} entities in {:?}", started.elapsed());
    }
    let features = vec![format!("{}:*", args.view)];
    let warm_until = Instant::now() + args.warmup;
    let end = warm_until + args.duration;
    let mut tasks = Vec::new();
    for w in 0..args.concurrency {
        let mut client = FeatureServiceClient::new(channels[w % channels.len()].clone());
        let (features, join_key, keyspace, entities, auth) = (
            features.clone(),
            args.join_key.clone(),
            args.keyspace,
            args.entities,
            auth.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut hist =
                Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
            let (mut ok, mut errors) = (0u64, 0u64);
            let mut rng = Xorshift(0x9E37_79B9_7F4A_7C15 ^ (w as u64 + 1));
            loop {
                let ids = (0..entities)
                    .map(|_| string_value(id(rng.next() % keyspace)))
                    .collect();
                let req = pb::GetOnlineFeaturesRequest {
                    kind: Some(pb::get_online_features_request::Kind::Features(
                        pb::FeatureList {
                            val: features.clone(),
                        },
                    )),
                    entities: HashMap::from([(join_key.clone(), pb::RepeatedValue { val: ids })]),
                    full_feature_names: false,
                };
                let started = Instant::now();
                let result = client.get_online_features(request(req, &auth)).await;
                let now = Instant::now();
                if now >= end {
                    break;
                }
                if now >= warm_until {
                    match result {
                        Ok(_) => {
                            ok += 1;
                            let _ = hist.record((now - started).as_micros() as u64);
                        }
                        Err(_) => errors += 1,
                    }
                }
            }
            (hist, ok, errors)
        }));
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let (mut ok, mut errors) = (0, 0);
    for t in tasks {
        let (h, o, e) = t.await?;
        hist.add(h)?;
        ok += o;
        errors += e;
    }
    let secs = args.duration.as_secs_f64();
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "| {} | {} x {} | {} | {:.0} | {:.3} | {:.3} | {:.3} | {} |",
        args.label,
        args.entities,
        args.view,
        args.concurrency,
        ok as f64 / secs,
        ms(0.5),
        ms(0.99),
        ms(0.999),
        errors
    );
    Ok(())
}
