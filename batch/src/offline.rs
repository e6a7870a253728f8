//! The offline store as DataFusion sees it: one session per job with the
//! object store registered, the raw-event archive as table `events` and the
//! registry's `[[tables]]` (defined for the SQL that uses them), plus the
//! committed feature tables of SQL views.
//!
//! # Feature tables
//! `quiver batch run` writes a view's rows under a new run directory
//! `features/{view}/run-{micros}/` and only then replaces the pointer
//! `features/{view}/_current.json` with the run's name (a single object
//! put, atomic on local disk and S3). Readers resolve the pointer first and
//! read only that run's files, so they see the previous run or the new one,
//! never a half-written mix. The run before the current one is kept for
//! readers that resolved the pointer just before a commit; older runs are
//! deleted once none of their files was written in the last
//! [`RUN_GRACE`], so a concurrent run of the same view (a timer and a
//! user's command, two cron runs) never loses the files it is writing, and
//! a reader of a run younger than that keeps its files however often it is
//! superseded. (A reader of an older run is safe while the run is the
//! current or the previous one.)

use std::sync::Arc;

/// How long after its last file was written a run that is neither the
/// committed one nor the one before it is kept: long enough for a
/// concurrent run of the same view to finish writing and commit, and for
/// readers of a run superseded twice in quick succession to finish.
pub const RUN_GRACE: chrono::TimeDelta = chrono::TimeDelta::hours(1);

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::error::DataFusionError;
use datafusion::logical_expr::{cast, ident, lit, Expr};
use datafusion::prelude::{ParquetReadOptions, SessionConfig, SessionContext};
use datafusion::scalar::ScalarValue;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use quiver_core::columnar::{archive_schema, arrow_type};
use quiver_core::registry::{FeatureView, TIMESTAMP_COLUMN};
use quiver_core::storage::{child, location_url, open_store, EVENTS_DIR, FEATURES_DIR};
use quiver_core::time::Micros;
use quiver_core::{Error, Registry, Result, ValueType};
use serde::{Deserialize, Serialize};

/// Name of the raw-event table in feature-view SQL.
pub const EVENTS_TABLE: &str = "events";

/// The configuration of every DataFusion session quiver opens.
///
/// Parquet min/max statistics leave NaN out (the Parquet format says so,
/// and arrow-rs and pyarrow write them that way), but DataFusion 55 reads
/// them as if they covered every value: a column whose statistics say
/// min = max is replaced by that constant (`[NaN, 2.5, 2.5]` reads as
/// `[2.5, 2.5, 2.5]`), `max(x)` may be answered from statistics, and row
/// groups and pages whose statistics miss a predicate are skipped even
/// when their NaN rows match it. So statistics are never collected and
/// neither row groups nor pages are pruned by them: a value must never
/// depend on metadata that does not describe it. (Partitions, such as the
/// archive's `date`, are still pruned by their paths.)
pub fn session_config() -> SessionConfig {
    let mut config = SessionConfig::new()
        .with_information_schema(true)
        .with_collect_statistics(false);
    let parquet = &mut config.options_mut().execution.parquet;
    parquet.pruning = false;
    parquet.enable_page_index = false;
    // Plain Utf8 strings: the types the registry declares and the feature
    // tables store (view types would leak into outputs).
    parquet.schema_force_view_types = false;
    config
}

/// Maps a DataFusion error to quiver's: query and type problems are the
/// user's to fix (`InvalidArgument`), storage problems are `Unavailable`.
pub fn df_error(what: &str, e: DataFusionError) -> Error {
    let e = e.find_root().to_string();
    let msg = format!("{what}: {e}");
    match () {
        _ if e.contains("Object Store error") || e.contains("IO error") => Error::unavailable(msg),
        _ if e.contains("Internal error") => Error::internal(msg),
        _ => Error::invalid(msg),
    }
}

/// Column `name` cast to `ty` and still called `name`: reads pin the Arrow
/// types they decode (strings may come back as views otherwise).
pub fn typed(name: &str, ty: DataType) -> Expr {
    cast(ident(name), ty).alias(name)
}

/// A timestamp literal in the archive's type (UTC microseconds).
pub(crate) fn ts_lit(t: Micros) -> Expr {
    lit(ScalarValue::TimestampMicrosecond(
        Some(t),
        Some("UTC".into()),
    ))
}

/// What `_current.json` of a feature table records.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CommittedRun {
    /// Run directory name under `features/{view}/`.
    pub run: String,
    /// Rows in the run.
    pub rows: u64,
    /// When the run was committed (RFC 3339).
    pub committed_at: String,
}

/// The offline store of one registry: object store, root and the URL
/// DataFusion reads it by.
#[derive(Debug, Clone)]
pub struct Offline {
    registry: Arc<Registry>,
    store: Arc<dyn ObjectStore>,
    root: Path,
    /// `scheme://host` of the location, where the store is registered.
    base: url::Url,
    /// The registry's on-demand views, compiled.
    on_demand: Arc<crate::ondemand::OnDemand>,
}

impl Offline {
    /// Opens the offline store at `location` (a directory, `file://` or
    /// `s3://bucket/prefix` URL) with object_store `options`.
    pub fn open(
        registry: Arc<Registry>,
        location: &str,
        options: &[(String, String)],
    ) -> Result<Offline> {
        let url = location_url(location)?;
        let (store, root) = open_store(location, options)?;
        let base = url::Url::parse(&format!(
            "{}://{}",
            url.scheme(),
            url.host_str().unwrap_or("")
        ))
        .map_err(|e| Error::invalid(format!("invalid storage URL {location:?}: {e}")))?;
        let on_demand = Arc::new(crate::ondemand::compile(&registry).0);
        Ok(Offline {
            registry,
            store,
            root,
            base,
            on_demand,
        })
    }

    /// The registry's on-demand views, compiled (see [`crate::ondemand`]).
    pub fn on_demand(&self) -> &crate::ondemand::OnDemand {
        &self.on_demand
    }

    /// The registry.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The object store.
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// The root path in the object store.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The URL DataFusion uses for a directory under the store.
    pub fn dir_url(&self, path: &Path) -> String {
        let base = self.base.as_str().trim_end_matches('/');
        if path.as_ref().is_empty() {
            format!("{base}/")
        } else {
            format!("{base}/{path}/")
        }
    }

    /// A DataFusion session with the store registered and the raw-event
    /// table `events` defined.
    pub async fn session(&self) -> Result<SessionContext> {
        let ctx = SessionContext::new_with_config(session_config());
        ctx.register_object_store(&self.base, self.store.clone());

        let events = ListingTableUrl::parse(self.dir_url(&child(&self.root, &[EVENTS_DIR])))
            .map_err(|e| df_error("events table", e))?;
        // The format carries its own reader options: the session's (no
        // statistics-based pruning, see `session_config`), not the defaults.
        let format = ParquetFormat::default().with_options(ctx.copied_table_options().parquet);
        let options = ListingOptions::new(Arc::new(format))
            .with_file_extension(".parquet")
            .with_table_partition_cols(vec![("date".to_owned(), DataType::Utf8)]);
        let table = ListingTable::try_new(
            ListingTableConfig::new(events)
                .with_listing_options(options)
                .with_schema(archive_schema(&self.registry)),
        )
        .map_err(|e| df_error("events table", e))?;
        ctx.register_table(EVENTS_TABLE, Arc::new(table))
            .map_err(|e| df_error("events table", e))?;
        Ok(ctx)
    }

    /// The registry's `[[tables]]` that `query` mentions.
    pub fn tables_in(&self, query: &str) -> Vec<&quiver_core::registry::Table> {
        let words: std::collections::HashSet<String> = query
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map(str::to_ascii_lowercase)
            .collect();
        self.registry
            .tables()
            .iter()
            .filter(|t| words.contains(&t.name.to_ascii_lowercase()))
            .collect()
    }

    /// Defines the registry's `[[tables]]` that `query` mentions (their
    /// schema comes from their files, so a table must have one).
    pub async fn register_tables(&self, ctx: &SessionContext, query: &str) -> Result<()> {
        for t in self.tables_in(query) {
            if ctx.table_exist(&t.name).unwrap_or(false) {
                continue;
            }
            let path: Path = child(&self.root, &[&t.path]);
            let url = if t.path.ends_with(".parquet") {
                self.dir_url(&path).trim_end_matches('/').to_owned()
            } else {
                self.dir_url(&path)
            };
            ctx.register_parquet(&t.name, &url, ParquetReadOptions::default())
                .await
                .map_err(|e| df_error(&format!("table {:?} ({url})", t.name), e))?;
        }
        Ok(())
    }

    fn view_dir(&self, view: &str) -> Path {
        child(&self.root, &[FEATURES_DIR, view])
    }

    fn pointer(&self, view: &str) -> Path {
        child(&self.view_dir(view), &["_current.json"])
    }

    /// The committed run of a SQL view's feature table, `None` before the
    /// first `quiver batch run`.
    pub async fn committed(&self, view: &str) -> Result<Option<CommittedRun>> {
        self.read_json(
            &self.pointer(view),
            &format!("feature table pointer of {view:?}"),
        )
        .await
    }

    /// A JSON bookkeeping object, `None` when it does not exist yet.
    pub(crate) async fn read_json<T: serde::de::DeserializeOwned>(
        &self,
        path: &Path,
        what: &str,
    ) -> Result<Option<T>> {
        let bytes = match self.store.get(path).await {
            Ok(r) => r
                .bytes()
                .await
                .map_err(|e| storage(&format!("reading {what}"), e))?,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(storage(&format!("reading {what}"), e)),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::internal(format!("{what} is corrupt: {e}")))
    }

    /// Replaces a JSON bookkeeping object (one put: atomic).
    pub(crate) async fn write_json<T: Serialize>(
        &self,
        path: &Path,
        value: &T,
        what: &str,
    ) -> Result<()> {
        let body = serde_json::to_vec_pretty(value).map_err(|e| Error::internal(e.to_string()))?;
        self.store
            .put(path, PutPayload::from(body))
            .await
            .map(|_| ())
            .map_err(|e| storage(&format!("writing {what}"), e))
    }

    /// Directory of a new run of `view`.
    pub(crate) fn run_dir(&self, view: &str, run: &str) -> Path {
        child(&self.view_dir(view), &[run])
    }

    /// Makes `run` the committed run of `view`, then deletes runs older
    /// than the one it replaces whose files are all older than
    /// [`RUN_GRACE`] (see the module docs).
    pub(crate) async fn commit(&self, view: &str, run: CommittedRun) -> Result<()> {
        let previous = self.committed(view).await?;
        self.write_json(
            &self.pointer(view),
            &run,
            &format!("feature table pointer of {view:?}"),
        )
        .await?;
        let keep = [Some(run.run), previous.map(|p| p.run)];
        let listing = self
            .store
            .list_with_delimiter(Some(&self.view_dir(view)))
            .await
            .map_err(|e| storage("listing", e))?;
        for dir in listing.common_prefixes {
            let name = dir.filename().unwrap_or_default().to_owned();
            if !name.starts_with("run-") || keep.iter().flatten().any(|k| *k == name) {
                continue;
            }
            let metas: Vec<object_store::ObjectMeta> = self
                .store
                .list(Some(&dir))
                .try_collect()
                .await
                .map_err(|e| storage("listing", e))?;
            let cutoff = chrono::Utc::now() - RUN_GRACE;
            if metas.iter().any(|m| m.last_modified > cutoff) {
                // Being written by a concurrent run, or written recently.
                continue;
            }
            for m in metas {
                self.store
                    .delete(&m.location)
                    .await
                    .map_err(|e| storage("deleting an old run", e))?;
            }
        }
        Ok(())
    }

    /// Deletes every object under `dir`.
    async fn delete_dir(&self, dir: &Path) -> Result<()> {
        let files: Vec<_> = self
            .store
            .list(Some(dir))
            .map_ok(|m| m.location)
            .try_collect()
            .await
            .map_err(|e| storage("listing", e))?;
        for f in files {
            self.store
                .delete(&f)
                .await
                .map_err(|e| storage("deleting a run", e))?;
        }
        Ok(())
    }

    /// Deletes what a failed run of `view` wrote (it was never committed,
    /// so no reader can see it). Best effort: a failure is logged, and the
    /// next successful run's commit removes the rest.
    pub(crate) async fn discard_run(&self, view: &str, run: &str) {
        if let Err(e) = self.delete_dir(&self.run_dir(view, run)).await {
            tracing::warn!(view, run, error = %e, "could not delete a failed run");
        }
    }

    /// Names of the run directories of `view` that hold objects in the
    /// offline store (`run-...`): the committed one, the one it replaced,
    /// runs in progress and runs younger than [`RUN_GRACE`]. (An emptied directory on local disk does not
    /// count: object stores have no directories.)
    pub async fn run_dirs(&self, view: &str) -> Result<Vec<String>> {
        let dir = self.view_dir(view);
        let files: Vec<Path> = self
            .store
            .list(Some(&dir))
            .map_ok(|m| m.location)
            .try_collect()
            .await
            .map_err(|e| storage("listing", e))?;
        let mut out: Vec<String> = files
            .iter()
            .filter_map(|p| p.prefix_match(&dir)?.next())
            .map(|part| part.as_ref().to_owned())
            .filter(|n| n.starts_with("run-"))
            .collect();
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// The committed feature table of a SQL view as a DataFusion table:
    /// join keys, `event_timestamp`, features, in the registry's types.
    /// `None` before the first run.
    pub async fn feature_table(
        &self,
        ctx: &SessionContext,
        view: &FeatureView,
    ) -> Result<Option<datafusion::dataframe::DataFrame>> {
        let Some(run) = self.committed(&view.name).await? else {
            return Ok(None);
        };
        let url = self.dir_url(&self.run_dir(&view.name, &run.run));
        let schema = feature_table_schema(view);
        let df = ctx
            .read_parquet(url.as_str(), ParquetReadOptions::default().schema(&schema))
            .await
            .map_err(|e| df_error(&format!("feature table of {:?}", view.name), e))?;
        Ok(Some(df))
    }
}

fn storage(what: &str, e: object_store::Error) -> Error {
    Error::unavailable(format!("offline store: {what}: {e}"))
}

/// The columns of a view's feature table, `(name, type)`: join keys,
/// `event_timestamp`, then the features, as the registry declares them.
pub fn feature_table_columns(view: &FeatureView) -> Vec<(&str, ValueType)> {
    let mut cols: Vec<(&str, ValueType)> = view
        .join_keys
        .iter()
        .map(String::as_str)
        .zip(view.key_types.iter().copied())
        .collect();
    cols.push((TIMESTAMP_COLUMN, ValueType::Timestamp));
    cols.extend(
        view.features
            .iter()
            .map(|f| (f.name.as_str(), f.value_type)),
    );
    cols
}

/// The Arrow schema of a view's feature table ([`feature_table_columns`]);
/// join keys and `event_timestamp` are never null.
pub fn feature_table_schema(view: &FeatureView) -> SchemaRef {
    let required = view.join_keys.len() + 1;
    let fields: Vec<Field> = feature_table_columns(view)
        .into_iter()
        .enumerate()
        .map(|(i, (name, ty))| Field::new(name, arrow_type(ty), i >= required))
        .collect();
    Arc::new(Schema::new(fields))
}
