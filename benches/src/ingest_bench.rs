//! Ingest throughput: events per second from Kafka into the online store.
//!
//! Produces `--events` generated events into a topic of `--partitions`
//! partitions (not timed), then runs the real ingest loop (`quiver
//! ingest`'s code: decode, validate, latest values, aggregation tiles,
//! optional Parquet archive) until every event is applied, and prints the
//! rate. Kafka is librdkafka's in-process mock cluster; the online store is
//! a `redis-server` started on an ephemeral port (or `--redis-url`, or
//! `--embedded`).
//!
//! ```text
//! cargo run --release -p quiver-bench --bin quiver-ingest-bench -- --events 600000 --partitions 8
//! ```

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use quiver_core::event::EventSink;
use quiver_core::store::{EmbeddedStore, RedisConfig, RedisStore};
use quiver_core::{OnlineStore, Registry, SystemClock};
use quiver_ingest::archive::{open_store, ArchiveConfig, Archiver};
use quiver_ingest::{
    Applier, Generator, GeneratorConfig, IngestConfig, Ingestor, KafkaConfig, KafkaEventSink,
};
use rdkafka::mocking::MockCluster;

// As in the `quiver` binary.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
struct Args {
    /// Events to ingest.
    #[arg(long, default_value_t = 600_000)]
    events: u64,
    /// Partitions of the event topic. librdkafka's mock cluster keeps at
    /// most 100,000 messages per partition, so keep events / partitions below that.
    #[arg(long, default_value_t = 8)]
    partitions: i32,
    /// Users and products of the generated events.
    #[arg(long, default_value_t = 100_000)]
    users: u64,
    #[arg(long, default_value_t = 10_000)]
    products: u64,
    /// Messages per ingest batch.
    #[arg(long, default_value_t = 50_000)]
    batch: usize,
    /// Also archive events as Parquet (to a temporary directory).
    #[arg(long)]
    archive: bool,
    /// Use this Redis instead of starting one.
    #[arg(long)]
    redis_url: Option<String>,
    /// Use the embedded store instead of Redis.
    #[arg(long)]
    embedded: bool,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    if args.events / args.partitions.max(1) as u64 > 95_000 {
        eprintln!(
            "the mock cluster keeps at most 100,000 messages per partition: use more --partitions"
        );
        std::process::exit(2);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("QUIVER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../registry/features.toml");
    let registry = Arc::new(Registry::load(&path).expect("sample registry"));
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic("events", args.partitions, 1).unwrap();
    cluster.create_topic("events-dlq", 1, 1).unwrap();
    let kafka = KafkaConfig {
        topic: "events".into(),
        group_id: "bench".into(),
        ..KafkaConfig::new(cluster.bootstrap_servers())
    };

    // Produce (not timed).
    let sink = KafkaEventSink::new(&kafka, registry.clone()).unwrap();
    let now = quiver_core::time::system_time_to_micros(std::time::SystemTime::now());
    let mut gen = Generator::new(
        GeneratorConfig {
            seed: 1,
            users: args.users,
            products: args.products,
            // Spread over the last 6 hours of event time.
            start: now - 6 * 3_600_000_000,
            time_step: (6 * 3_600_000_000 / args.events as i64).max(2),
        },
        &registry,
    )
    .unwrap();
    let produced = Instant::now();
    let mut left = args.events;
    while left > 0 {
        let n = left.min(10_000);
        let events = gen.batch(n as usize);
        let out = sink.publish(&events).await.unwrap();
        assert!(out.iter().all(Result::is_ok));
        left -= n;
    }
    eprintln!(
        "produced {} events in {:.1} s",
        args.events,
        produced.elapsed().as_secs_f64()
    );

    let _redis;
    let db = tempfile::tempdir().unwrap();
    let store: Arc<dyn OnlineStore> = if args.embedded {
        Arc::new(
            EmbeddedStore::open(&db.path().join("online.redb"), Arc::new(SystemClock)).unwrap(),
        )
    } else {
        let url = match &args.redis_url {
            Some(u) => u.clone(),
            None => {
                let r = quiver_testkit::RedisServer::start();
                let u = r.url();
                _redis = r;
                u
            }
        };
        Arc::new(
            RedisStore::new(&RedisConfig {
                url,
                pool_size: 16,
                timeout: Duration::from_secs(10),
                tls: Default::default(),
            })
            .unwrap(),
        )
    };
    let archive_dir = tempfile::tempdir().unwrap();
    let archiver = args.archive.then(|| {
        let (obj, root) = open_store(archive_dir.path().to_str().unwrap(), &[]).unwrap();
        // Small files so that rolls (Parquet encoding and writes) happen
        // inside the timed part of the run.
        Archiver::new(
            obj,
            root,
            registry.clone(),
            ArchiveConfig {
                roll_bytes: 4 * 1024 * 1024,
                ..ArchiveConfig::default()
            },
        )
    });
    let ingestor = Ingestor::new(
        &kafka,
        IngestConfig {
            batch_max: args.batch,
            dead_letter_topic: "events-dlq".into(),
            ..IngestConfig::default()
        },
        registry.clone(),
        Applier::new(registry.clone(), store.clone(), Duration::from_secs(86_400)),
        archiver,
    )
    .unwrap();

    // Timed from the end of the first batch to the end of the last, so the
    // consumer-group join (seconds on the mock cluster) is not counted.
    let target = args.events;
    let progress: Arc<Mutex<Vec<(Instant, u64)>>> = Arc::new(Mutex::new(Vec::new()));
    let seen = progress.clone();
    let done = async move {
        let started = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let marks = seen.lock().unwrap();
            let last = marks.last().copied();
            drop(marks);
            match last {
                Some((_, n)) if n >= target => break,
                // Nothing new for 10 s: report what arrived rather than hang.
                Some((at, n)) if at.elapsed() > Duration::from_secs(10) => {
                    eprintln!("stalled at {n} of {target} events");
                    break;
                }
                None if started.elapsed() > Duration::from_secs(60) => {
                    eprintln!("no batch within 60 s");
                    break;
                }
                _ => {}
            }
        }
    };
    let p = progress.clone();
    let stats = ingestor
        .run(done, move |s| {
            p.lock().unwrap().push((Instant::now(), s.events))
        })
        .await
        .unwrap();
    let marks = progress.lock().unwrap().clone();
    let (t0, n0) = marks[0];
    let (t1, n1) = *marks.last().unwrap();
    let secs = (t1 - t0).as_secs_f64();
    let rate = (n1 - n0) as f64 / secs.max(1e-9);
    println!(
        "| {} | {} | {} | {} | {} | {:.2} | {:.0} |",
        if args.embedded { "embedded" } else { "redis" },
        args.partitions,
        args.batch,
        if args.archive { "yes" } else { "no" },
        n1 - n0,
        secs,
        rate
    );
    eprintln!("{stats:?}");
    eprintln!("batches: {}", marks.len());
}
