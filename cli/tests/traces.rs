//! Traces across processes: `quiver serve` and `quiver ingest` export
//! spans over OTLP/gRPC to a collector in this test (quiver-testkit's
//! `OtlpReceiver`). A PushEvents call that carries a W3C `traceparent`
//! continues the caller's trace; its events carry the context through
//! Kafka (librdkafka's mock cluster, in this process) to the ingest
//! process, whose batch span links back to it. Both processes sample no
//! trace of their own (`sampling_ratio = 0`): what is exported is what the
//! caller sampled, and the ingest batch that holds a sampled event.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quiver_core::time::system_time_to_micros;
use quiver_core::wire::event_to_pb;
use quiver_core::Registry;
use quiver_ingest::{Generator, GeneratorConfig};
use quiver_proto::tonic;
use quiver_proto::v1 as pb;
use quiver_proto::FeatureServiceClient;
use quiver_testkit::{MockKafka, OtlpReceiver, ReceivedSpan, RedisServer};

/// A child process, killed on drop; its stderr lines are kept.
struct Proc {
    child: Child,
    stdout_first: String,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    /// Starts `quiver <args>` and waits for its first stdout line that
    /// starts with `ready`.
    fn start(args: &[&str], env: &[(&str, &str)], ready: &str) -> Proc {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_quiver"));
        cmd.args(args)
            .env("QUIVER_LOG", "info")
            // Export every 100 ms instead of every 5 s (the SDK's default).
            .env("OTEL_BSP_SCHEDULE_DELAY", "100")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .env_remove("OTEL_SERVICE_NAME")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let lines = stderr.clone();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                lines.lock().unwrap().push(line.unwrap_or_default());
            }
        });
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !line.starts_with(ready) {
            line.clear();
            if out.read_line(&mut line).unwrap() == 0 || Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                std::thread::sleep(Duration::from_millis(200));
                panic!(
                    "quiver {args:?} did not start:\n{}",
                    stderr.lock().unwrap().join("\n")
                );
            }
        }
        // Keep reading stdout so the process never blocks on it.
        std::thread::spawn(move || {
            let mut sink = String::new();
            while out.read_line(&mut sink).unwrap_or(0) > 0 {
                sink.clear();
            }
        });
        Proc {
            child,
            stdout_first: line.trim().to_owned(),
            stderr,
        }
    }

    fn addr(&self, key: &str) -> SocketAddr {
        self.stdout_first
            .split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in {:?}", self.stdout_first))
            .parse()
            .unwrap()
    }
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";
const REST_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const REST_CALLER_SPAN: &str = "b7ad6b7169203331";
const BAD_TRACE: &str = "5c3a1e8f0b2d4f6a8c9e0a1b2c3d4e5f";

fn one<'a>(
    spans: &'a [ReceivedSpan],
    what: &str,
    p: impl Fn(&ReceivedSpan) -> bool,
) -> &'a ReceivedSpan {
    let found: Vec<&ReceivedSpan> = spans.iter().filter(|s| p(s)).collect();
    assert_eq!(found.len(), 1, "{what}: {found:#?}\nall: {spans:#?}");
    found[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_events_trace_reaches_the_ingest_apply_of_its_events() {
    let kafka = MockKafka::with_topics(&[("quiver-events", 2), ("quiver-events-dlq", 1)]);
    let redis = RedisServer::start();
    let otlp = OtlpReceiver::start();
    let dir = tempfile::tempdir().unwrap();
    let registry =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../registry/features.toml");
    let config = dir.path().join("q.toml");
    std::fs::write(
        &config,
        format!(
            r#"[server]
grpc_addr = "127.0.0.1:0"
http_addr = "127.0.0.1:0"
[registry]
path = {registry:?}
[kafka]
brokers = "{brokers}"
[online_store]
redis_url = "{redis}"
[archive]
location = ""
[ingest]
batch_wait = "50ms"
[telemetry]
otlp_endpoint = "{otlp}"
sampling_ratio = 0.0
"#,
            brokers = kafka.bootstrap_servers(),
            redis = redis.url(),
            otlp = otlp.endpoint(),
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();
    // QUIVER_LOG chooses log lines, not spans: at `warn` serve still traces.
    let serve = Proc::start(
        &["serve", "--config", config],
        &[("QUIVER_LOG", "warn")],
        "quiver listening",
    );
    let ingest = Proc::start(
        &[
            "ingest",
            "--metrics-addr",
            "127.0.0.1:0",
            "--config",
            config,
        ],
        &[
            ("QUIVER_LOG_FORMAT", "json"),
            ("QUIVER_LOG", "info,quiver_ingest=debug"),
        ],
        "quiver ingest metrics=",
    );
    let mut client = FeatureServiceClient::connect(format!("http://{}", serve.addr("grpc=")))
        .await
        .unwrap();

    // A call without trace context: at ratio 0 nobody samples it.
    client
        .get_online_features(pb::GetOnlineFeaturesRequest {
            kind: Some(pb::get_online_features_request::Kind::Features(
                pb::FeatureList {
                    val: vec!["user_profile:*".into()],
                },
            )),
            entities: [(
                "user_id".into(),
                pb::RepeatedValue {
                    val: vec![pb::Value {
                        kind: Some(pb::value::Kind::StringVal("user_1".into())),
                    }],
                },
            )]
            .into(),
            full_feature_names: false,
        })
        .await
        .unwrap();

    // PushEvents in the caller's sampled trace.
    let reg = Arc::new(Registry::load(&registry).unwrap());
    let mut gen = Generator::new(
        GeneratorConfig {
            users: 20,
            start: system_time_to_micros(std::time::SystemTime::now()) - 60_000_000,
            ..GeneratorConfig::default()
        },
        &reg,
    )
    .unwrap();
    let events: Vec<pb::Event> = gen.batch(30).iter().map(event_to_pb).collect();
    let mut request = tonic::Request::new(pb::PushEventsRequest { events });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE}-{CALLER_SPAN}-01").parse().unwrap(),
    );
    let pushed = client.push_events(request).await.unwrap().into_inner();
    assert_eq!(pushed.accepted, 30, "{pushed:?}");

    // Serve and ingest export on timers of their own, and the 30 events
    // may be applied in more than one batch: wait for all of it.
    let spans = otlp.wait_for(
        Duration::from_secs(60),
        "PushEvents, its send and ingest batches of all 30 events",
        |spans| {
            let count = |name: &str| spans.iter().filter(|s| s.name == name).count();
            let linked: u64 = spans
                .iter()
                .filter(|s| s.name == "process events" && s.links.iter().any(|(t, _)| t == TRACE))
                .filter_map(|s| s.attr("messaging.batch.message_count")?.parse::<u64>().ok())
                .sum();
            linked == 30
                && count("apply to online store") == count("process events")
                && count("quiver.v1.FeatureService/PushEvents") == 1
                && count("send quiver-events") == 1
        },
    );
    let rpc = one(&spans, "the PushEvents span", |s| {
        s.name == "quiver.v1.FeatureService/PushEvents"
    });
    assert_eq!(rpc.service, "quiver-serve");
    assert_eq!(rpc.trace_id, TRACE, "continues the caller's trace");
    assert_eq!(
        rpc.parent_span_id, CALLER_SPAN,
        "a child of the caller's span"
    );
    assert_eq!(rpc.attr("rpc.system"), Some("grpc"));
    assert_eq!(rpc.attr("rpc.method"), Some("PushEvents"));
    assert_eq!(rpc.attr("rpc.grpc.status_code"), Some("0"));
    let send = one(&spans, "the Kafka send span", |s| {
        s.name == "send quiver-events"
    });
    assert_eq!(
        (send.trace_id.as_str(), send.parent_span_id.as_str()),
        (TRACE, rpc.span_id.as_str())
    );
    assert_eq!(
        send.attr("messaging.destination.name"),
        Some("quiver-events")
    );
    assert_eq!(send.attr("messaging.batch.message_count"), Some("30"));
    // Every ingest batch that applied some of these events links to the
    // send span: the events' own trace context, read from Kafka headers.
    let batches: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.service == "quiver-ingest" && s.name == "process events")
        .collect();
    assert!(!batches.is_empty());
    for b in &batches {
        assert_eq!(
            b.links,
            vec![(TRACE.to_owned(), send.span_id.clone())],
            "{b:#?}"
        );
        assert_ne!(b.trace_id, TRACE, "a batch is a trace of its own, linked");
        assert_eq!(b.attr("messaging.system"), Some("kafka"));
    }
    let applied: u64 = batches
        .iter()
        .map(|b| {
            b.attr("messaging.batch.message_count")
                .unwrap()
                .parse::<u64>()
                .unwrap()
        })
        .sum();
    assert_eq!(applied, 30);
    for apply in spans.iter().filter(|s| s.name == "apply to online store") {
        assert!(
            batches
                .iter()
                .any(|b| b.span_id == apply.parent_span_id && b.trace_id == apply.trace_id),
            "{apply:#?}"
        );
    }

    // REST: a route span in the caller's trace, and its online-store read.
    let http = reqwest::Client::new();
    let traced_get = |path: &str| {
        http.get(format!("http://{}{path}", serve.addr("http=")))
            .header(
                "traceparent",
                format!("00-{REST_TRACE}-{REST_CALLER_SPAN}-01"),
            )
            .send()
    };
    let resp = traced_get("/api/v1/features/user/user_1").await.unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    // Probes are not traced, even with a traceparent.
    assert_eq!(traced_get("/health").await.unwrap().status(), 200);
    // A caller's error: the status code on the span, which is not failed.
    let mut bad = tonic::Request::new(pb::GetOnlineFeaturesRequest {
        kind: Some(pb::get_online_features_request::Kind::Features(
            pb::FeatureList {
                val: vec!["no_such_view:x".into()],
            },
        )),
        entities: Default::default(),
        full_feature_names: false,
    });
    bad.metadata_mut().insert(
        "traceparent",
        format!("00-{BAD_TRACE}-{CALLER_SPAN}-03").parse().unwrap(),
    );
    let status = client.get_online_features(bad).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    let spans = otlp.wait_for(
        Duration::from_secs(30),
        "the REST and error spans",
        |spans| {
            let route = spans
                .iter()
                .any(|s| s.trace_id == REST_TRACE && s.parent_span_id == REST_CALLER_SPAN);
            let read = spans
                .iter()
                .any(|s| s.trace_id == REST_TRACE && s.name == "online_store.read");
            route && read && spans.iter().any(|s| s.trace_id == BAD_TRACE)
        },
    );
    // Flags 03 (sampled, and level 2's "random") are followed.
    let failed = one(&spans, "the failed call", |s| s.trace_id == BAD_TRACE);
    assert_eq!(failed.name, "quiver.v1.FeatureService/GetOnlineFeatures");
    assert_eq!(failed.attr("rpc.grpc.status_code"), Some("5"));
    assert!(
        !failed.error,
        "a caller's mistake is not the server's failure"
    );
    let route = one(&spans, "the REST route span", |s| {
        s.trace_id == REST_TRACE && s.parent_span_id == REST_CALLER_SPAN
    });
    assert_eq!(route.name, "GET /api/v1/features/:entity/:id");
    assert_eq!(
        route.attr("http.route"),
        Some("/api/v1/features/:entity/:id")
    );
    assert_eq!(route.attr("http.response.status_code"), Some("200"));
    let read = one(&spans, "the online-store read", |s| {
        s.trace_id == REST_TRACE && s.name == "online_store.read"
    });
    assert_eq!(read.parent_span_id, route.span_id);
    assert_eq!(read.attr("db.system.name"), Some("redis"));

    // The untraced call and the probe made no span, though they ended
    // before all of these.
    assert!(
        !spans.iter().any(|s| {
            (s.name == "quiver.v1.FeatureService/GetOnlineFeatures" && s.trace_id != BAD_TRACE)
                || s.name.contains("/health")
        }),
        "{spans:#?}"
    );

    // JSON log lines carry the ids of the span they were written in.
    let logs = ingest.stderr.lock().unwrap().clone();
    let json: Vec<serde_json::Value> = logs
        .iter()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}"))
        })
        .collect();
    let batch_ids: Vec<(&str, &str)> = batches
        .iter()
        .map(|b| (b.trace_id.as_str(), b.span_id.as_str()))
        .collect();
    let applied_lines: Vec<&serde_json::Value> = json
        .iter()
        .filter(|l| l["message"] == "batch applied")
        .collect();
    assert!(
        applied_lines.iter().any(|l| batch_ids.contains(&(
            l["trace_id"].as_str().unwrap_or(""),
            l["span_id"].as_str().unwrap_or("")
        ))),
        "no \"batch applied\" line with a batch span's ids {batch_ids:?}:\n{}",
        logs.join("\n")
    );
    drop(redis);
    drop(kafka);
}

/// Without a caller's context the server draws: at `sampling_ratio = 1`
/// every request is a root span of its own (`quiver.head_sampled`), with
/// its online-store read beneath it; `/metrics` is never traced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_ratio_one_every_request_roots_its_own_trace() {
    let otlp = OtlpReceiver::start();
    let dir = tempfile::tempdir().unwrap();
    let registry =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../registry/features.toml");
    let store = dir.path().join("online.redb");
    let endpoint = otlp.endpoint();
    let serve = Proc::start(
        &[
            "serve",
            "--grpc-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
            "--registry",
            registry.to_str().unwrap(),
            "--store-path",
            store.to_str().unwrap(),
        ],
        &[
            ("QUIVER_OTLP_ENDPOINT", endpoint.as_str()),
            ("QUIVER_TRACE_SAMPLING_RATIO", "1"),
        ],
        "quiver listening",
    );
    let http = reqwest::Client::new();
    let get = |path: &str| {
        http.get(format!("http://{}{path}", serve.addr("http=")))
            .send()
    };
    assert_eq!(get("/metrics").await.unwrap().status(), 200);
    let resp = get("/api/v1/features/user/user_1").await.unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    let spans = otlp.wait_for(Duration::from_secs(30), "the request's spans", |spans| {
        spans.iter().any(|s| s.name == "online_store.read")
    });
    let root = one(&spans, "the REST route span", |s| {
        s.name == "GET /api/v1/features/:entity/:id"
    });
    assert_eq!(root.parent_span_id, "", "a root span: {root:#?}");
    assert_eq!(root.service, "quiver-serve");
    assert_eq!(root.attr("quiver.head_sampled"), Some("true"));
    let read = one(&spans, "the online-store read", |s| {
        s.name == "online_store.read"
    });
    assert_eq!(
        (read.trace_id.as_str(), read.parent_span_id.as_str()),
        (root.trace_id.as_str(), root.span_id.as_str())
    );
    assert_eq!(read.attr("db.system.name"), Some("embedded"));
    assert!(
        !spans.iter().any(|s| s.name.contains("metrics")),
        "{spans:#?}"
    );
}

/// One SQL view of three rows for two users (shared with tests/cli.rs).
const BATCH_REGISTRY: &str = include_str!("batch_registry.toml");

/// Short-lived commands export their spans before they exit: the SDK's
/// 5 s export timer never fires in them, so what arrives was flushed at
/// exit (and has arrived when the process is gone: the flush waits for
/// the collector's answer).
#[test]
fn batch_commands_export_their_spans_before_they_exit() {
    let otlp = OtlpReceiver::start();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("reg.toml"), BATCH_REGISTRY).unwrap();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_quiver"))
            .args(args)
            .args(["--registry", "reg.toml", "--archive", "offline"])
            .current_dir(dir.path())
            .env("QUIVER_OTLP_ENDPOINT", otlp.endpoint())
            .env_remove("OTEL_BSP_SCHEDULE_DELAY")
            .env_remove("OTEL_SERVICE_NAME")
            .env_remove("QUIVER_ARCHIVE")
            .env_remove("QUIVER_CONFIG")
            .output()
            .unwrap()
    };
    let out = run(&["batch", "run"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let spans = otlp.spans();
    let root = one(&spans, "the batch run span", |s| s.name == "batch run");
    assert_eq!(
        (root.service.as_str(), root.parent_span_id.as_str()),
        ("quiver-batch", "")
    );
    assert!(!root.error);
    let view = one(&spans, "the view's span", |s| s.name == "run scores");
    assert_eq!(view.parent_span_id, root.span_id);
    assert_eq!(view.attr("quiver.feature_view"), Some("scores"));
    assert_eq!(view.attr("quiver.rows"), Some("3"));

    let out = run(&[
        "materialize",
        "--store-path",
        "online.redb",
        "--end",
        "2026-01-05T00:00:00Z",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let spans = otlp.spans();
    let root = one(&spans, "the materialize span", |s| s.name == "materialize");
    assert_eq!(root.service, "quiver-materialize");
    let view = one(&spans, "the view's span", |s| {
        s.name == "materialize scores"
    });
    assert_eq!(view.parent_span_id, root.span_id);
    assert_eq!(view.attr("quiver.rows"), Some("2"));

    // A failed run's span is marked failed.
    let out = run(&["batch", "run", "--views", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    let spans = otlp.spans();
    let failed: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.name == "batch run" && s.error)
        .collect();
    assert_eq!(failed.len(), 1, "{spans:#?}");
}
