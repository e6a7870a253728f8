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

use object_store::path::Path;
use object_store::ObjectStore;

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

/// Opens an object store from a URL (`s3://bucket/prefix`, `file:///dir`)
/// or a local directory path (created if missing). `options` are
/// object_store's settings (`aws_endpoint`, `aws_access_key_id`, ...).
pub fn open_store(
    location: &str,
    options: &[(String, String)],
) -> Result<(Arc<dyn ObjectStore>, Path)> {
    let url = location_url(location)?;
    let (store, root) =
        object_store::parse_url_opts(&url, options.iter().map(|(k, v)| (k.as_str(), v.clone())))
            .map_err(|e| Error::invalid(format!("cannot open storage {location:?}: {e}")))?;
    Ok((Arc::from(store), root))
}
