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

#[test]
fn validates_the_sample_registry() {
    let out = quiver()
        .args(["registry", "validate"])
        .arg(repo("registry"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("ok (2 entities, 4 feature views, 3 feature services)"),
        "{stdout}"
    );
    let out = quiver()
        .args(["registry", "validate"])
        .arg(repo("benches/registry.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
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
    let out = quiver()
        .args(["registry", "validate"])
        .arg(&file)
        .output()
        .unwrap();
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
