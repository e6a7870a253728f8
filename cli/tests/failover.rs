//! `kill -9` of one of two `quiver ingest` processes (no group leave): the
//! survivor takes over the dead member's partitions once the group
//! coordinator gives up on it, which quiver's consumer settings bound at
//! 10 s (librdkafka's default session timeout is 45 s). Kafka is
//! librdkafka's mock cluster, in this process, reached over TCP by the two
//! ingest processes; the online store is a real Redis.

use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quiver_core::event::EventSink;
use quiver_core::Registry;
use quiver_ingest::{Generator, GeneratorConfig, KafkaConfig, KafkaEventSink};
use quiver_testkit::RedisServer;
use rdkafka::mocking::MockCluster;

/// Kills the process when dropped (also when an assertion fails).
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_ingest(config: &std::path::Path) -> (Killed, Receiver<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_quiver"))
        .args(["ingest", "--config"])
        .arg(config)
        .env("QUIVER_LOG", "info")
        .env_remove("QUIVER_ARCHIVE")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            if tx.send(line.unwrap_or_default()).is_err() {
                break;
            }
        }
    });
    (Killed(child), rx)
}

/// Waits for a "partitions assigned" line with `count` partitions.
fn wait_assigned(rx: &Receiver<String>, count: usize, deadline: Instant) -> bool {
    let want = format!("partitions assigned count={count}");
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(&want) => return true,
            Ok(_) => {}
            Err(_) => return false,
        }
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_ingest_process_partitions_move_to_the_survivor() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("quiver-events", 4, 1).unwrap();
    cluster.create_topic("quiver-events-dlq", 1, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("q.toml");
    let registry =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../registry/features.toml");
    std::fs::write(
        &config,
        format!(
            "[registry]\npath = {registry:?}\n[kafka]\nbrokers = \"{brokers}\"\n[online_store]\nredis_url = \"{}\"\n[archive]\nlocation = \"\"\n[ingest]\nbatch_wait = \"50ms\"\n",
            redis.url()
        ),
    )
    .unwrap();
    let reg = Arc::new(Registry::load(&registry).unwrap());
    let sink = KafkaEventSink::new(&KafkaConfig::new(brokers.clone()), reg.clone()).unwrap();
    let mut gen = Generator::new(
        GeneratorConfig {
            users: 100,
            ..GeneratorConfig::default()
        },
        &reg,
    )
    .unwrap();
    assert!(sink
        .publish(&gen.batch(500))
        .await
        .unwrap()
        .iter()
        .all(Result::is_ok));

    let (a, a_log) = spawn_ingest(&config);
    let start = Instant::now() + Duration::from_secs(60);
    assert!(
        wait_assigned(&a_log, 4, start),
        "the first member never got the partitions"
    );
    let (b, b_log) = spawn_ingest(&config);
    assert!(
        wait_assigned(&b_log, 2, start),
        "the second member never joined"
    );

    drop(a); // SIGKILL: no leave-group, no commit
    let killed = Instant::now();
    assert!(sink
        .publish(&gen.batch(500))
        .await
        .unwrap()
        .iter()
        .all(Result::is_ok));
    // Within librdkafka's default session timeout (45 s) only if quiver's
    // shorter one is in effect.
    let took_over = wait_assigned(&b_log, 4, killed + Duration::from_secs(40));
    let stall = killed.elapsed();
    drop(b);
    assert!(
        took_over,
        "the survivor did not get the dead member's partitions"
    );
    eprintln!(
        "partitions moved {:.1} s after SIGKILL",
        stall.as_secs_f64()
    );
}
