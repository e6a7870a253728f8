//! The offline store: one object-store root (local directory or
//! `s3://bucket/prefix`) holding everything the batch side reads and
//! writes.
//!
//! # Layout
//! - `events/date=YYYY-MM-DD/*.parquet`: the raw-event archive written by
//!   `quiver ingest` (see `quiver_ingest::archive`).
//! - `features/{view}/{run}/part-*.parquet`: feature tables written by
//!   `quiver batch run`; `features/{view}/_current.json` names the
//!   committed run.
//! - `_quiver/`: bookkeeping (archive state, staging, materialization
//!   watermarks); never read as data.

use std::sync::Arc;

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path;
use object_store::{ClientOptions, ObjectStore};

use crate::error::{Error, Result};

/// Directory of the raw-event archive under the root.
pub const EVENTS_DIR: &str = "events";
/// Directory of feature tables under the root.
pub const FEATURES_DIR: &str = "features";
/// Directory of quiver's bookkeeping objects under the root.
pub const INTERNAL_DIR: &str = "_quiver";

/// `root/parts...` as an object path.
pub fn child(root: &Path, parts: &[&str]) -> Path {
    parts
        .iter()
        .fold(root.clone(), |p, part| p.clone().join(*part))
}

/// The URL of a storage location: `s3://bucket/prefix` and `file:///dir`
/// as given, a local directory path (created if missing) as `file://`.
pub fn location_url(location: &str) -> Result<url::Url> {
    if location.contains("://") {
        return url::Url::parse(location)
            .map_err(|e| Error::invalid(format!("invalid storage URL {location:?}: {e}")));
    }
    std::fs::create_dir_all(location)
        .map_err(|e| Error::invalid(format!("cannot create {location}: {e}")))?;
    let abs = std::fs::canonicalize(location)
        .map_err(|e| Error::invalid(format!("cannot resolve {location}: {e}")))?;
    url::Url::from_directory_path(&abs)
        .map_err(|()| Error::invalid(format!("not a usable directory: {}", abs.display())))
}

/// The option naming a PEM file of CA certificates that sign the S3
/// endpoint's certificate (a private CA in front of MinIO or Ceph), added
/// to the system's trusted roots. Not an object_store key: quiver reads
/// the file and hands the certificates to the HTTP client.
pub const CA_FILE_OPTION: &str = "ca_file";

/// Opens an object store from a URL (`s3://bucket/prefix`, `file:///dir`)
/// or a local directory path (created if missing). `options` are
/// object_store's settings (`aws_endpoint`, `aws_access_key_id`, ...) and
/// [`CA_FILE_OPTION`].
///
/// # Errors
/// `INVALID_ARGUMENT` for a malformed location, an unknown option, or a CA
/// file that cannot be read or holds no PEM certificate.
pub fn open_store(
    location: &str,
    options: &[(String, String)],
) -> Result<(Arc<dyn ObjectStore>, Path)> {
    let url = location_url(location)?;
    let cannot = |e: &dyn std::fmt::Display| {
        Error::invalid(format!("cannot open storage {location:?}: {e}"))
    };
    let ca_file = options.iter().find(|(k, _)| k == CA_FILE_OPTION);
    let Some((_, ca_file)) = ca_file else {
        let (store, root) = object_store::parse_url_opts(
            &url,
            options.iter().map(|(k, v)| (k.as_str(), v.clone())),
        )
        .map_err(|e| cannot(&e))?;
        return Ok((Arc::from(store), root));
    };
    if url.scheme() != "s3" {
        return Err(Error::invalid(format!(
            "archive option {CA_FILE_OPTION} applies to s3:// locations over HTTPS, not {location:?}"
        )));
    }
    let pem = std::fs::read(ca_file)
        .map_err(|e| Error::invalid(format!("cannot read the storage CA file {ca_file}: {e}")))?;
    let certs = object_store::Certificate::from_pem_bundle(&pem).map_err(|e| {
        Error::invalid(format!(
            "storage CA file {ca_file} holds no usable PEM certificate: {e}"
        ))
    })?;
    if certs.is_empty() {
        return Err(Error::invalid(format!(
            "storage CA file {ca_file} holds no PEM certificate"
        )));
    }
    let mut builder = AmazonS3Builder::new().with_url(url.as_str());
    let mut client = ClientOptions::new();
    // As object_store::parse_url_opts reads options (which the location
    // without a CA file goes through): keys in any case, unknown ones
    // ignored, so that adding ca_file changes nothing else.
    for (k, v) in options.iter().filter(|(k, _)| k != CA_FILE_OPTION) {
        match k.to_ascii_lowercase().parse::<AmazonS3ConfigKey>() {
            Ok(AmazonS3ConfigKey::Client(key)) => client = client.with_config(key, v),
            Ok(key) => builder = builder.with_config(key, v),
            Err(_) => {}
        }
    }
    for cert in certs {
        client = client.with_root_certificate(cert);
    }
    let store = builder
        .with_client_options(client)
        .build()
        .map_err(|e| cannot(&e))?;
    let root = Path::from_url_path(url.path()).map_err(|e| cannot(&e))?;
    Ok((Arc::new(store), root))
}
