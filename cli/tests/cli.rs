//! The `quiver` binary as users run it.

use std::process::Command;

fn quiver() -> Command {
    Command::new(env!("CARGO_BIN_EXE_quiver"))
}

fn repo(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

fn validate(path: &std::path::Path) -> std::process::Output {
    quiver()
        .args(["registry", "validate"])
        .arg(path)
        .output()
        .unwrap()
}

#[test]
fn validates_the_sample_registry() {
    for path in ["registry", "benches/registry.toml"] {
        let out = validate(&repo(path));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{path}: {stderr}");
    }
    let stdout = String::from_utf8_lossy(&validate(&repo("registry")).stdout).into_owned();
    assert!(
        stdout.contains("ok (2 entities, 4 event types, 9 feature views, 4 feature services)"),
        "{stdout}"
    );
}

#[test]
fn reports_every_registry_problem_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        "[[feature_views]]\nname = \"v\"\nentities = [\"ghost\"]\nfeatures = [{ name = \"x\", dtype = \"float128\" }]\n",
    )
    .unwrap();
    let out = validate(&file);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad.toml: feature view \"v\": unknown entity \"ghost\""),
        "{stderr}"
    );
    assert!(stderr.contains("unknown dtype \"float128\""), "{stderr}");
}

#[test]
fn bad_configuration_fails_before_starting() {
    let out = quiver()
        .args([
            "serve",
            "--grpc-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
        ])
        .env("QUIVER_REDIS_URL", "http://not-redis")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("redis_url must start with redis://"),
        "{stderr}"
    );
}

#[test]
fn speed_layer_commands_say_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    for (args, needle) in [
        (vec!["ingest"], "no Kafka brokers configured"),
        (
            vec!["generate", "--events", "1"],
            "no Kafka brokers configured",
        ),
        (
            vec![
                "generate",
                "--to",
                "carrier-pigeon",
                "--kafka-brokers",
                "127.0.0.1:1",
            ],
            "--to \"carrier-pigeon\": use kafka or grpc",
        ),
        (
            vec!["generate", "--rate=-5"],
            "--rate must be a non-negative",
        ),
        (
            vec!["ingest", "--archive", "ftp://lake"],
            "archive.location",
        ),
    ] {
        let out = quiver()
            .args(&args)
            .current_dir(dir.path())
            .env_remove("QUIVER_KAFKA_BROKERS")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}
