//! The registry: entities, feature views and feature services, declared in
//! TOML files and validated as a whole before anything is served.
//!
//! A registry path is either one `.toml` file or a directory whose `*.toml`
//! files are merged (sorted by name). Validation collects every problem it
//! finds and reports each as `file: item: what is wrong`, so one run of
//! `quiver registry validate` shows everything to fix. The format is
//! described in `docs/registry.md`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::error::{quote, Error, Result};
use crate::time::{duration_micros, Micros};
use crate::value::ValueType;

/// An entity: the thing features describe, identified by one join key.
#[derive(Debug, Clone, PartialEq)]
pub struct Entity {
    /// Entity name, e.g. `user`.
    pub name: String,
    /// Name of the key column in requests, e.g. `user_id`.
    pub join_key: String,
    /// Type of the key: `string` or `int64`.
    pub value_type: ValueType,
    /// Free text.
    pub description: String,
}

/// One typed feature of a view.
#[derive(Debug, Clone, PartialEq)]
pub struct Feature {
    /// Feature name, unique in its view.
    pub name: String,
    /// Declared type; writes of another type are rejected.
    pub value_type: ValueType,
    /// Fixed length for list features (embeddings).
    pub dimension: Option<u32>,
    /// Free text.
    pub description: String,
    /// Unit of the values (`USD`, `km`, `days`), empty when not declared;
    /// shown in the registry and in prompt context built from features.
    pub unit: String,
}

/// A group of features about the same entities, written and read together.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureView {
    /// View name.
    pub name: String,
    /// Entity names; their join keys identify a row.
    pub entities: Vec<String>,
    /// Join keys of `entities`, same order.
    pub join_keys: Vec<String>,
    /// Types of `join_keys`, same order.
    pub key_types: Vec<ValueType>,
    /// Features in declaration order.
    pub features: Vec<Feature>,
    /// Maximum age of a served value; `None` means values never go stale.
    pub ttl: Option<Duration>,
    /// Free text.
    pub description: String,
    /// Free-form labels.
    pub tags: BTreeMap<String, String>,
    /// Where the view's values come from.
    pub source: ViewSource,
    feature_idx: HashMap<String, usize>,
}

/// Where a feature view's values come from.
#[derive(Debug, Clone, PartialEq)]
pub enum ViewSource {
    /// Written by `WriteFeatures` or materialization from batch jobs.
    Batch,
    /// A DataFusion SQL query over the raw events and declared tables, run
    /// by `quiver batch run` into a feature table, materialized online by
    /// `quiver materialize`. Also writable through `WriteFeatures`.
    Sql {
        /// The query; it returns the join keys, `event_timestamp` and the
        /// features (see `docs/batch.md`).
        query: String,
    },
    /// Latest values taken from events by `quiver ingest`.
    Events {
        /// Event types that update the view.
        event_types: Vec<String>,
        /// Per feature (same order as `features`): where its value comes from.
        fields: Vec<EventField>,
    },
    /// Request-time (on-demand) features: one SQL expression per feature
    /// over request data and the features of other views, evaluated by
    /// GetOnlineFeatures on each request and by historical retrieval on each
    /// entity row, by the one evaluator in `quiver_batch::ondemand`. Nothing
    /// is stored.
    OnDemand {
        /// Request data the expressions read, passed with the entities
        /// online and taken from the entity table offline.
        request: Vec<RequestField>,
        /// The stored features the expressions read.
        inputs: Vec<FeatureRef>,
        /// Per feature (same order as `features`): its SQL expression.
        expressions: Vec<String>,
    },
    /// Windowed aggregations over events, kept as time tiles by `quiver
    /// ingest` and combined at read time; one feature per aggregation.
    Aggregations {
        /// Tile length; every window is a whole number of tiles.
        tile: Micros,
        /// The aggregations, same order as `features`.
        aggregations: Vec<Aggregation>,
    },
}

/// A column of request data an on-demand view reads.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestField {
    /// Column name in requests and entity tables, e.g. `amount`.
    pub name: String,
    /// Its type; values are coerced to it as feature writes are.
    pub value_type: ValueType,
}

/// The part of an event a latest-value feature is taken from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventField {
    /// An attribute of the event.
    Attribute(String),
    /// The event time.
    EventTime,
}

/// One windowed aggregation of an aggregation view.
#[derive(Debug, Clone, PartialEq)]
pub struct Aggregation {
    /// Feature name.
    pub name: String,
    /// What is computed.
    pub function: AggFunction,
    /// Aggregated attribute (or join key of the event); `None` for `count`.
    pub attribute: Option<String>,
    /// Type of `attribute`.
    pub attribute_type: Option<ValueType>,
    /// Event types that count.
    pub event_types: Vec<String>,
    /// Window length, a multiple of the view's tile.
    pub window: Micros,
    /// Name of the tile state this aggregation reads: the first aggregation
    /// of the view with the same function, attribute and event types (they
    /// differ at most in their window, so they share tiles).
    pub state: String,
}

/// Aggregation functions; see `docs/registry.md` for their exact semantics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AggFunction {
    /// Number of events.
    Count,
    /// Sum of a numeric attribute.
    Sum,
    /// Mean of a numeric attribute.
    Mean,
    /// Minimum of a numeric attribute.
    Min,
    /// Maximum of a numeric attribute.
    Max,
    /// The newest `n` values of an attribute, newest first.
    LastN(u32),
    /// Approximate number of distinct values (HyperLogLog).
    ApproxDistinct,
}

impl AggFunction {
    /// Registry spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            AggFunction::Count => "count",
            AggFunction::Sum => "sum",
            AggFunction::Mean => "mean",
            AggFunction::Min => "min",
            AggFunction::Max => "max",
            AggFunction::LastN(_) => "last_n",
            AggFunction::ApproxDistinct => "approx_distinct",
        }
    }
}

/// An event type: its entities and typed attributes.
#[derive(Debug, Clone, PartialEq)]
pub struct EventType {
    /// Name, e.g. `purchase`.
    pub name: String,
    /// Entities the event is about; their join keys are required on events.
    pub entities: Vec<String>,
    /// Join keys of `entities`, same order.
    pub join_keys: Vec<String>,
    /// Types of `join_keys`, same order.
    pub key_types: Vec<ValueType>,
    /// Attributes and their types.
    pub attributes: Vec<(String, ValueType)>,
    /// Attributes that may be absent (null) on an event.
    pub optional: Vec<String>,
    /// Free text.
    pub description: String,
}

impl EventType {
    /// Type of attribute or join key `name` (aggregations may use either).
    pub fn value_type(&self, name: &str) -> Option<ValueType> {
        self.attribute(name).or_else(|| {
            self.join_keys
                .iter()
                .position(|k| k == name)
                .map(|i| self.key_types[i])
        })
    }

    /// Type of attribute `name`.
    pub fn attribute(&self, name: &str) -> Option<ValueType> {
        self.attributes
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| *t)
    }
}

/// Event field names that attributes cannot use: they are columns of the
/// raw-event archive (`date` is its partition column in batch SQL).
pub const RESERVED_EVENT_FIELDS: [&str; 4] = ["event_id", "event_type", "event_time", "date"];

impl FeatureView {
    /// Index of feature `name` in [`FeatureView::features`].
    pub fn feature_index(&self, name: &str) -> Option<usize> {
        self.feature_idx.get(name).copied()
    }

    /// When an online row of this view with feature time `event_ts`
    /// expires: its TTL plus `grace` (micros) later; `None` without a TTL.
    /// The one rule for `WriteFeatures`, ingest and materialization.
    pub fn online_expiry(&self, event_ts: Micros, grace: Micros) -> Option<Micros> {
        self.ttl.map(|t| {
            event_ts
                .saturating_add(duration_micros(t))
                .saturating_add(grace)
        })
    }
}

/// The column of a feature table (and of an entity table in historical
/// retrieval) that holds the time a row's values were true.
pub const TIMESTAMP_COLUMN: &str = "event_timestamp";

/// A Parquet table under the offline store root that feature-view SQL can
/// read, next to `events`.
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    /// Table name in SQL.
    pub name: String,
    /// Directory (or file) relative to the offline store root.
    pub path: String,
    /// Free text.
    pub description: String,
}

/// A reference to one feature of one view.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FeatureRef {
    /// View index in the registry.
    pub view: usize,
    /// Feature index in the view.
    pub feature: usize,
}

/// A named set of features that a model consumes.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureService {
    /// Service name, e.g. `user_service`.
    pub name: String,
    /// The references as written in the registry (`view:feature`).
    pub refs: Vec<String>,
    /// The resolved features, in output order.
    pub features: Vec<FeatureRef>,
    /// Free text.
    pub description: String,
}

/// Features chosen for a request, resolved against the registry.
#[derive(Debug, Clone, PartialEq)]
pub struct Selection {
    /// Output columns in request order.
    pub columns: Vec<FeatureRef>,
    /// The same features grouped by view (first-appearance order): view
    /// index and feature indices. One store lookup per view and entity row.
    pub by_view: Vec<(usize, Vec<usize>)>,
}

/// A validated registry with name indexes.
#[derive(Debug, Clone, PartialEq)]
pub struct Registry {
    entities: Vec<Entity>,
    event_types: Vec<EventType>,
    tables: Vec<Table>,
    views: Vec<FeatureView>,
    services: Vec<FeatureService>,
    entity_idx: HashMap<String, usize>,
    view_idx: HashMap<String, usize>,
    service_idx: HashMap<String, usize>,
    join_key_idx: HashMap<String, usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    entities: Vec<RawEntity>,
    #[serde(default)]
    feature_views: Vec<RawView>,
    #[serde(default)]
    feature_services: Vec<RawService>,
    #[serde(default)]
    event_types: Vec<RawEventType>,
    #[serde(default)]
    tables: Vec<RawTable>,
    #[serde(default)]
    on_demand_feature_views: Vec<RawOnDemandView>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOnDemandView {
    name: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    tags: BTreeMap<String, String>,
    #[serde(default)]
    inputs: Vec<String>,
    #[serde(default)]
    request: Vec<RawRequestField>,
    features: Vec<RawOnDemandFeature>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRequestField {
    name: String,
    dtype: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOnDemandFeature {
    name: String,
    dtype: String,
    expr: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    unit: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTable {
    name: String,
    path: String,
    #[serde(default)]
    description: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEventType {
    name: String,
    entities: Vec<String>,
    #[serde(default)]
    attributes: Vec<RawAttribute>,
    #[serde(default)]
    description: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAttribute {
    name: String,
    dtype: String,
    #[serde(default)]
    optional: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    events: Option<Vec<String>>,
    sql: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAggregation {
    name: String,
    function: String,
    attribute: Option<String>,
    events: Vec<String>,
    window: String,
    n: Option<u32>,
    #[serde(default)]
    description: String,
    #[serde(default)]
    unit: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntity {
    name: String,
    join_key: Option<String>,
    #[serde(default = "default_key_type")]
    value_type: String,
    #[serde(default)]
    description: String,
}

fn default_key_type() -> String {
    "string".to_owned()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawView {
    name: String,
    entities: Vec<String>,
    ttl: Option<String>,
    #[serde(default)]
    description: String,
    #[serde(default)]
    tags: BTreeMap<String, String>,
    #[serde(default)]
    features: Vec<RawFeature>,
    source: Option<RawSource>,
    tile: Option<String>,
    #[serde(default)]
    aggregations: Vec<RawAggregation>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFeature {
    name: String,
    dtype: String,
    dimension: Option<u32>,
    from: Option<String>,
    #[serde(default)]
    description: String,
    #[serde(default)]
    unit: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: String,
    features: Vec<String>,
    #[serde(default)]
    description: String,
}

/// The value type `dtype` names; an unknown name is a problem of `at`
/// (listing the known ones) and reads as `string` meanwhile.
fn dtype(at: &str, dtype: &str, problems: &mut Vec<String>) -> ValueType {
    ValueType::parse(dtype).unwrap_or_else(|| {
        problems.push(format!(
            "{at}: unknown dtype {dtype:?}; use one of {}",
            join_names(ValueType::ALL.iter().map(|t| t.as_str()))
        ));
        ValueType::String
    })
}

/// Valid names: ASCII letter or `_` first, then letters, digits, `_`; at
/// most 128 bytes; not starting with `_` (reserved for quiver's own fields).
fn check_name(name: &str) -> std::result::Result<(), String> {
    let ok_chars = name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    let first_ok = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic());
    if name.is_empty() || name.len() > 128 || !ok_chars || !first_ok {
        return Err(format!(
            "invalid name {name:?}: use 1-128 ASCII letters, digits and '_', starting with a letter"
        ));
    }
    Ok(())
}

/// Parses a TTL: `0` (never stale) or a duration such as `90s`, `15m`, `24h`, `30d`.
fn parse_ttl(s: &str) -> std::result::Result<Option<Duration>, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(None);
    }
    match humantime::parse_duration(s) {
        Ok(d) if d.is_zero() => Ok(None),
        Ok(d) => Ok(Some(d)),
        Err(e) => Err(format!(
            "invalid ttl {s:?} ({e}); write a duration such as \"90s\", \"24h\" or \"30d\", or \"0\" for no TTL"
        )),
    }
}

impl Registry {
    /// Loads a registry from a `.toml` file or a directory of them.
    pub fn load(path: &Path) -> Result<Registry> {
        let files = if path.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|e| {
                    Error::invalid(format!("{}: cannot read directory: {e}", path.display()))
                })?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                .collect();
            files.sort();
            if files.is_empty() {
                return Err(Error::invalid(format!(
                    "{}: no *.toml registry files in this directory",
                    path.display()
                )));
            }
            files
        } else {
            vec![path.to_path_buf()]
        };
        let mut sources = Vec::with_capacity(files.len());
        for f in files {
            let text = std::fs::read_to_string(&f).map_err(|e| {
                Error::invalid(format!("{}: cannot read registry file: {e}", f.display()))
            })?;
            sources.push((f.display().to_string(), text));
        }
        Registry::from_sources(&sources)
    }

    /// Builds a registry from `(file name, TOML text)` pairs.
    pub fn from_sources(sources: &[(String, String)]) -> Result<Registry> {
        let mut problems = Vec::new();
        let mut parsed = Vec::new();
        for (file, text) in sources {
            match toml::from_str::<RawFile>(text) {
                Ok(raw) => parsed.push((file.as_str(), raw)),
                Err(e) => problems.push(format!("{file}: {}", e.to_string().trim_end())),
            }
        }
        if !problems.is_empty() {
            return Err(Error::invalid(problems.join("\n")));
        }
        let reg = build(&parsed, &mut problems);
        if problems.is_empty() {
            Ok(reg)
        } else {
            Err(Error::invalid(problems.join("\n")))
        }
    }

    /// Builds a registry from one TOML document.
    pub fn from_toml(name: &str, text: &str) -> Result<Registry> {
        Registry::from_sources(&[(name.to_owned(), text.to_owned())])
    }

    /// All entities.
    pub fn entities(&self) -> &[Entity] {
        &self.entities
    }
    /// All event types.
    pub fn event_types(&self) -> &[EventType] {
        &self.event_types
    }
    /// The event type named `name`.
    pub fn event_type(&self, name: &str) -> Option<&EventType> {
        self.event_types.iter().find(|e| e.name == name)
    }

    /// Parquet tables declared for feature-view SQL.
    pub fn tables(&self) -> &[Table] {
        &self.tables
    }

    /// Feature views, in declaration order.
    pub fn views(&self) -> &[FeatureView] {
        &self.views
    }
    /// All feature services.
    pub fn services(&self) -> &[FeatureService] {
        &self.services
    }
    /// The view at `idx`.
    pub fn view(&self, idx: usize) -> &FeatureView {
        &self.views[idx]
    }
    /// Index of the view named `name`.
    pub fn view_index(&self, name: &str) -> Option<usize> {
        self.view_idx.get(name).copied()
    }
    /// The entity named `name`.
    pub fn entity(&self, name: &str) -> Option<&Entity> {
        self.entity_idx.get(name).map(|&i| &self.entities[i])
    }
    /// The entity whose join key is `join_key`.
    pub fn entity_by_join_key(&self, join_key: &str) -> Option<&Entity> {
        self.join_key_idx.get(join_key).map(|&i| &self.entities[i])
    }
    /// The feature service named `name`.
    pub fn service(&self, name: &str) -> Option<&FeatureService> {
        self.service_idx.get(name).map(|&i| &self.services[i])
    }

    /// Looks a view up by name, with an error listing the known views.
    pub fn require_view(&self, name: &str) -> Result<usize> {
        self.view_index(name).ok_or_else(|| {
            Error::not_found(format!(
                "unknown feature view {}; known views: {}",
                quote(name),
                join_names(self.views.iter().map(|v| v.name.as_str()))
            ))
        })
    }

    /// Output column names of `sel`'s features, in its column order:
    /// `feature`, or `view__feature` (Feast's full names) when `full`. A name
    /// that repeats another, or one of `taken` (the request's key or entity
    /// columns), is an error that suggests full names.
    pub fn output_names(
        &self,
        sel: &Selection,
        taken: impl IntoIterator<Item = String>,
        full: bool,
    ) -> Result<Vec<String>> {
        let mut seen: HashSet<String> = taken.into_iter().collect();
        let mut names = Vec::with_capacity(sel.columns.len());
        for r in &sel.columns {
            let v = self.view(r.view);
            let f = &v.features[r.feature].name;
            let name = if full {
                format!("{}__{f}", v.name)
            } else {
                f.clone()
            };
            if !seen.insert(name.clone()) {
                return Err(Error::invalid(format!(
                    "output column {name:?} would appear twice (two views share a feature name, or a \
                     feature is named like a key or entity column); set full_feature_names=true"
                )));
            }
            names.push(name);
        }
        Ok(names)
    }

    /// Resolves `view:feature` references (`view:*` selects every feature).
    pub fn resolve_refs<S: AsRef<str>>(&self, refs: &[S]) -> Result<Selection> {
        let mut columns = Vec::with_capacity(refs.len());
        for r in refs {
            let r = r.as_ref();
            let Some((view_name, feature)) = r.split_once(':') else {
                return Err(Error::invalid(format!(
                    "invalid feature reference {}: write \"view:feature\", e.g. \"{}\"",
                    quote(r),
                    self.example_ref()
                )));
            };
            let view = self.require_view(view_name)?;
            let v = &self.views[view];
            if feature == "*" {
                columns.extend((0..v.features.len()).map(|feature| FeatureRef { view, feature }));
                continue;
            }
            let feature = v.feature_index(feature).ok_or_else(|| {
                Error::not_found(format!(
                    "unknown feature {} in view {}; its features: {}",
                    quote(feature),
                    quote(view_name),
                    join_names(v.features.iter().map(|f| f.name.as_str()))
                ))
            })?;
            columns.push(FeatureRef { view, feature });
        }
        Ok(selection(columns))
    }

    /// The on-demand views among `sel`'s columns, first appearance first.
    pub fn on_demand_views(&self, sel: &Selection) -> Vec<usize> {
        sel.by_view
            .iter()
            .map(|(v, _)| *v)
            .filter(|&v| matches!(self.views[v].source, ViewSource::OnDemand { .. }))
            .collect()
    }

    /// The stored features `sel` needs: its columns of stored views, then
    /// the inputs of its on-demand views that are not among them. Equal to
    /// `sel` when it has no on-demand views.
    pub fn stored_selection(&self, sel: &Selection) -> Selection {
        let mut columns: Vec<FeatureRef> = sel
            .columns
            .iter()
            .filter(|c| !matches!(self.views[c.view].source, ViewSource::OnDemand { .. }))
            .cloned()
            .collect();
        for v in self.on_demand_views(sel) {
            if let ViewSource::OnDemand { inputs, .. } = &self.views[v].source {
                for i in inputs {
                    if !columns.contains(i) {
                        columns.push(i.clone());
                    }
                }
            }
        }
        selection(columns)
    }

    /// Resolves a feature service by name.
    pub fn resolve_service(&self, name: &str) -> Result<Selection> {
        let svc = self.service(name).ok_or_else(|| {
            Error::not_found(format!(
                "unknown feature service {}; known services: {}",
                quote(name),
                join_names(self.services.iter().map(|s| s.name.as_str()))
            ))
        })?;
        Ok(selection(svc.features.clone()))
    }

    /// Looks an entity up by name, with an error listing the known entities.
    pub fn require_entity(&self, name: &str) -> Result<&Entity> {
        self.entity(name).ok_or_else(|| {
            Error::not_found(format!(
                "unknown entity {}; known entities: {}",
                quote(name),
                join_names(self.entities.iter().map(|e| e.name.as_str()))
            ))
        })
    }

    /// Every feature of every view keyed by exactly the entity `entity`.
    pub fn select_entity(&self, entity: &str) -> Result<Selection> {
        self.require_entity(entity)?;
        let columns = self
            .views
            .iter()
            .enumerate()
            .filter(|(_, v)| v.entities.len() == 1 && v.entities[0] == entity)
            .filter(|(_, v)| {
                !matches!(&v.source, ViewSource::OnDemand { request, .. } if !request.is_empty())
            })
            .flat_map(|(view, v)| {
                (0..v.features.len()).map(move |feature| FeatureRef { view, feature })
            })
            .collect();
        Ok(selection(columns))
    }

    fn example_ref(&self) -> String {
        self.views
            .first()
            .and_then(|v| v.features.first().map(|f| format!("{}:{}", v.name, f.name)))
            .unwrap_or_else(|| "user_profile:age".to_owned())
    }
}

/// The selection of `columns` (in that order), grouped by view.
pub fn selection(columns: Vec<FeatureRef>) -> Selection {
    let mut by_view: Vec<(usize, Vec<usize>)> = Vec::new();
    for c in &columns {
        match by_view.iter_mut().find(|(v, _)| *v == c.view) {
            Some((_, fs)) => {
                if !fs.contains(&c.feature) {
                    fs.push(c.feature);
                }
            }
            None => by_view.push((c.view, vec![c.feature])),
        }
    }
    Selection { columns, by_view }
}

fn join_names<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let v: Vec<&str> = names.collect();
    if v.is_empty() {
        "(none)".to_owned()
    } else {
        v.join(", ")
    }
}

/// Shortest tile of an aggregation view (micros): one second.
pub const MIN_TILE: Micros = 1_000_000;

/// Longest aggregation window (micros): 3650 days. With event times in
/// `0001..=9999` (see [`crate::time::check_range`]), every tile and expiry
/// computation stays far inside `i64`.
pub const MAX_WINDOW: Micros = 3650 * 86_400 * 1_000_000;

/// Most tiles in one window: each is a field of the entity's online row
/// (per source partition), so this (with the tiles kept for events ahead
/// of the clock, bounded by `quiver ingest`) bounds rows and their updates.
pub const MAX_TILES_PER_WINDOW: i64 = 10_000;

/// A duration such as `1h` or `7d`, in micros; positive.
fn parse_window(s: &str) -> std::result::Result<Micros, String> {
    match humantime::parse_duration(s.trim()) {
        Ok(d) if !d.is_zero() => Ok(duration_micros(d)),
        _ => Err(format!(
            "invalid duration {s:?}; write a positive duration such as \"1h\", \"24h\" or \"7d\""
        )),
    }
}

fn build_event_types(
    files: &[(&str, RawFile)],
    entities: &[Entity],
    entity_idx: &HashMap<String, usize>,
    problems: &mut Vec<String>,
) -> Vec<EventType> {
    let mut out: Vec<EventType> = Vec::new();
    // Attribute types across all event types: the raw-event archive has one
    // column per attribute name, so a name has one type everywhere.
    let mut column_types: HashMap<String, (ValueType, String)> = HashMap::new();
    for (file, raw) in files {
        for et in &raw.event_types {
            let at = format!("{file}: event type {:?}", et.name);
            if let Err(m) = check_name(&et.name) {
                problems.push(format!("{at}: {m}"));
            }
            if out.iter().any(|o| o.name == et.name) {
                problems.push(format!("{at}: declared twice"));
            }
            if et.entities.is_empty() {
                problems.push(format!("{at}: needs at least one entity in `entities`"));
            }
            let mut join_keys = Vec::new();
            let mut key_types = Vec::new();
            for en in &et.entities {
                match entity_idx.get(en) {
                    Some(&i) => {
                        join_keys.push(entities[i].join_key.clone());
                        key_types.push(entities[i].value_type);
                    }
                    None => problems.push(format!(
                        "{at}: unknown entity {en:?}; declared entities: {}",
                        join_names(entities.iter().map(|e| e.name.as_str()))
                    )),
                }
            }
            let mut attributes: Vec<(String, ValueType)> = Vec::new();
            let mut optional = Vec::new();
            for a in &et.attributes {
                let aat = format!("{at}: attribute {:?}", a.name);
                if let Err(m) = check_name(&a.name) {
                    problems.push(format!("{aat}: {m}"));
                }
                if RESERVED_EVENT_FIELDS.contains(&a.name.as_str())
                    || entities.iter().any(|e| e.join_key == a.name)
                {
                    problems.push(format!(
                        "{aat}: the name is taken by an event field or a join key; rename the attribute"
                    ));
                }
                let Some(ty) = ValueType::parse(&a.dtype) else {
                    problems.push(format!(
                        "{aat}: unknown dtype {:?}; use one of {}",
                        a.dtype,
                        join_names(ValueType::ALL.iter().map(|t| t.as_str()))
                    ));
                    continue;
                };
                if attributes.iter().any(|(n, _)| n == &a.name) {
                    problems.push(format!("{aat}: declared twice"));
                }
                match column_types.get(&a.name) {
                    Some((t, other)) if *t != ty => problems.push(format!(
                        "{aat}: is {ty} here but {t} in event type {other:?}; one attribute name has one type"
                    )),
                    _ => {
                        column_types.insert(a.name.clone(), (ty, et.name.clone()));
                    }
                }
                if a.optional {
                    optional.push(a.name.clone());
                }
                attributes.push((a.name.clone(), ty));
            }
            out.push(EventType {
                name: et.name.clone(),
                entities: et.entities.clone(),
                join_keys,
                key_types,
                attributes,
                optional,
                description: et.description.clone(),
            });
        }
    }
    out
}

/// Checks that every listed event type exists and carries the view's entities.
fn check_event_refs(
    at: &str,
    names: &[String],
    event_types: &[EventType],
    view_entities: &[String],
    problems: &mut Vec<String>,
) {
    for name in names {
        match event_types.iter().find(|e| &e.name == name) {
            None => problems.push(format!(
                "{at}: unknown event type {name:?}; declared event types: {}",
                join_names(event_types.iter().map(|e| e.name.as_str()))
            )),
            Some(et) => {
                for en in view_entities {
                    if !et.entities.contains(en) {
                        problems.push(format!(
                            "{at}: event type {name:?} does not carry entity {en:?}, which keys this view"
                        ));
                    }
                }
            }
        }
    }
}

fn event_field(
    at: &str,
    rf: &RawFeature,
    f: &Feature,
    events: &[String],
    event_types: &[EventType],
    problems: &mut Vec<String>,
) -> EventField {
    let fat = format!("{at}: feature {:?}", f.name);
    let from = rf.from.as_deref().unwrap_or(&f.name);
    if from == "event_time" {
        if f.value_type != ValueType::Timestamp {
            problems.push(format!(
                "{fat}: takes the event time, so its dtype must be timestamp"
            ));
        }
        return EventField::EventTime;
    }
    for name in events {
        let Some(et) = event_types.iter().find(|e| &e.name == name) else {
            continue;
        };
        match et.attribute(from) {
            None => problems.push(format!(
                "{fat}: event type {name:?} has no attribute {from:?}; set `from` to one of {}, or \"event_time\"",
                join_names(et.attributes.iter().map(|(n, _)| n.as_str()))
            )),
            Some(t) if t != f.value_type => problems.push(format!(
                "{fat}: is {} but attribute {from:?} of event type {name:?} is {t}",
                f.value_type
            )),
            Some(_) => {}
        }
    }
    EventField::Attribute(from.to_owned())
}

fn build_aggregations(
    at: &str,
    v: &RawView,
    event_types: &[EventType],
    view_entities: &[String],
    problems: &mut Vec<String>,
) -> (Micros, Vec<Aggregation>) {
    let tile = match parse_window(v.tile.as_deref().unwrap_or("1h")) {
        Ok(t) if t < MIN_TILE => {
            problems.push(format!(
                "{at}: tile {:?} is shorter than one second, the shortest supported",
                v.tile.as_deref().unwrap_or_default()
            ));
            MIN_TILE
        }
        Ok(t) => t,
        Err(m) => {
            problems.push(format!("{at}: tile: {m}"));
            3_600_000_000
        }
    };
    let mut out: Vec<Aggregation> = Vec::new();
    for a in &v.aggregations {
        let aat = format!("{at}: aggregation {:?}", a.name);
        if let Err(m) = check_name(&a.name) {
            problems.push(format!("{aat}: {m}"));
        }
        if out.iter().any(|o| o.name == a.name) {
            problems.push(format!("{aat}: declared twice in this view"));
        }
        let function = match (a.function.as_str(), a.n) {
            ("count", None) => AggFunction::Count,
            ("sum", None) => AggFunction::Sum,
            ("mean", None) => AggFunction::Mean,
            ("min", None) => AggFunction::Min,
            ("max", None) => AggFunction::Max,
            ("last_n", Some(n)) if (1..=1000).contains(&n) => AggFunction::LastN(n),
            ("last_n", _) => {
                problems.push(format!("{aat}: last_n needs `n` between 1 and 1000"));
                AggFunction::LastN(1)
            }
            ("approx_distinct", None) => AggFunction::ApproxDistinct,
            (f, Some(_))
                if ["count", "sum", "mean", "min", "max", "approx_distinct"].contains(&f) =>
            {
                problems.push(format!("{aat}: `n` only applies to last_n"));
                AggFunction::Count
            }
            (f, _) => {
                problems.push(format!(
                    "{aat}: unknown function {f:?}; use count, sum, mean, min, max, last_n or approx_distinct"
                ));
                AggFunction::Count
            }
        };
        let window = match parse_window(&a.window) {
            Ok(w) => w,
            Err(m) => {
                problems.push(format!("{aat}: window: {m}"));
                tile
            }
        };
        if window > MAX_WINDOW {
            problems.push(format!(
                "{aat}: window {:?} is longer than 3650 days, the longest supported",
                a.window
            ));
        } else if window / tile > MAX_TILES_PER_WINDOW {
            problems.push(format!(
                "{aat}: window {:?} spans {} tiles of {:?}; at most {MAX_TILES_PER_WINDOW} are supported (every tile is a field of the entity's online row): pick a longer `tile`",
                a.window,
                window / tile,
                v.tile.as_deref().unwrap_or("1h")
            ));
        }
        if window % tile != 0 {
            problems.push(format!(
                "{aat}: window {:?} is not a whole number of tiles ({:?}); pick a window that is a multiple of `tile`",
                a.window,
                v.tile.as_deref().unwrap_or("1h")
            ));
        }
        if a.events.is_empty() {
            problems.push(format!("{aat}: `events` lists no event types"));
        }
        check_event_refs(&aat, &a.events, event_types, view_entities, problems);
        let mut attribute_type = None;
        match (&a.attribute, function) {
            (Some(_), AggFunction::Count) => {
                problems.push(format!("{aat}: count takes no `attribute`"));
            }
            (None, AggFunction::Count) => {}
            (None, f) => problems.push(format!("{aat}: {} needs an `attribute`", f.as_str())),
            (Some(attr), f) => {
                for name in &a.events {
                    let Some(et) = event_types.iter().find(|e| &e.name == name) else {
                        continue;
                    };
                    match et.value_type(attr) {
                        None => problems.push(format!(
                            "{aat}: event type {name:?} has no attribute or join key {attr:?}"
                        )),
                        Some(t) if attribute_type.is_some_and(|a| a != t) => problems.push(
                            format!("{aat}: {attr:?} has different types in its event types"),
                        ),
                        Some(t) => attribute_type = Some(t),
                    }
                }
                if let Some(t) = attribute_type {
                    let ok = match f {
                        AggFunction::Sum
                        | AggFunction::Mean
                        | AggFunction::Min
                        | AggFunction::Max => {
                            matches!(t, ValueType::Int64 | ValueType::Double)
                        }
                        AggFunction::LastN(_) => matches!(
                            t,
                            ValueType::Int64
                                | ValueType::Double
                                | ValueType::String
                                | ValueType::Bool
                        ),
                        AggFunction::ApproxDistinct => {
                            matches!(t, ValueType::Int64 | ValueType::String)
                        }
                        AggFunction::Count => true,
                    };
                    if !ok {
                        problems.push(format!(
                            "{aat}: {} cannot aggregate attribute {attr:?} of type {t}",
                            f.as_str()
                        ));
                    }
                }
            }
        }
        let mut events = a.events.clone();
        events.sort();
        let state = out
            .iter()
            .find(|o| {
                let mut oe = o.event_types.clone();
                oe.sort();
                o.function == function && o.attribute == a.attribute && oe == events
            })
            .map_or_else(|| a.name.clone(), |o| o.state.clone());
        out.push(Aggregation {
            name: a.name.clone(),
            function,
            attribute: a.attribute.clone(),
            attribute_type,
            event_types: a.events.clone(),
            window,
            state,
        });
    }
    (tile, out)
}

/// The feature type an aggregation produces.
pub fn agg_output_type(a: &Aggregation) -> ValueType {
    match a.function {
        AggFunction::Count | AggFunction::ApproxDistinct => ValueType::Int64,
        AggFunction::Sum | AggFunction::Mean | AggFunction::Min | AggFunction::Max => {
            ValueType::Double
        }
        AggFunction::LastN(_) => match a.attribute_type {
            Some(ValueType::Int64) => ValueType::Int64List,
            Some(ValueType::Double) => ValueType::DoubleList,
            Some(ValueType::Bool) => ValueType::BoolList,
            _ => ValueType::StringList,
        },
    }
}

/// Names SQL cannot use for a declared table: the raw-event table.
const RESERVED_TABLES: [&str; 1] = ["events"];

fn build_tables(
    files: &[(&str, RawFile)],
    views: &[FeatureView],
    problems: &mut Vec<String>,
) -> Vec<Table> {
    let mut tables: Vec<Table> = Vec::new();
    for (file, raw) in files {
        for t in &raw.tables {
            let at = format!("{file}: table {:?}", t.name);
            if let Err(m) = check_name(&t.name) {
                problems.push(format!("{at}: {m}"));
            }
            if RESERVED_TABLES.contains(&t.name.as_str()) {
                problems.push(format!(
                    "{at}: `{}` is the raw-event table; choose another name",
                    t.name
                ));
            }
            if tables.iter().any(|o| o.name == t.name) {
                problems.push(format!("{at}: declared twice"));
            }
            if views.iter().any(|v| v.name == t.name) {
                problems.push(format!("{at}: a feature view has this name"));
            }
            let path = t.path.trim_matches('/');
            let bad = path.is_empty()
                || path.contains("://")
                || path
                    .split('/')
                    .any(|p| p == ".." || p == "." || p.is_empty())
                || path.starts_with(crate::storage::INTERNAL_DIR);
            if bad {
                problems.push(format!(
                    "{at}: path {:?} must be a relative path under the offline store root, e.g. \"tables/{}\"",
                    t.path, t.name
                ));
            }
            tables.push(Table {
                name: t.name.clone(),
                path: path.to_owned(),
                description: t.description.clone(),
            });
        }
    }
    tables
}

fn build(files: &[(&str, RawFile)], problems: &mut Vec<String>) -> Registry {
    let mut entities = Vec::new();
    let mut entity_idx = HashMap::new();
    let mut join_key_idx = HashMap::new();
    for (file, raw) in files {
        for e in &raw.entities {
            let at = format!("{file}: entity {:?}", e.name);
            if let Err(m) = check_name(&e.name) {
                problems.push(format!("{at}: {m}"));
            }
            let join_key = e.join_key.clone().unwrap_or_else(|| e.name.clone());
            if let Err(m) = check_name(&join_key) {
                problems.push(format!("{at}: join_key: {m}"));
            }
            let value_type = match ValueType::parse(&e.value_type) {
                Some(t) if t.is_key_type() => t,
                _ => {
                    problems.push(format!(
                        "{at}: value_type {:?} cannot be a join key; use \"string\" or \"int64\"",
                        e.value_type
                    ));
                    ValueType::String
                }
            };
            if entity_idx.insert(e.name.clone(), entities.len()).is_some() {
                problems.push(format!("{at}: declared twice"));
            }
            if join_key_idx
                .insert(join_key.clone(), entities.len())
                .is_some()
            {
                problems.push(format!(
                    "{at}: join key {join_key:?} is already used by another entity; join keys must be unique"
                ));
            }
            entities.push(Entity {
                name: e.name.clone(),
                join_key,
                value_type,
                description: e.description.clone(),
            });
        }
    }

    let event_types = build_event_types(files, &entities, &entity_idx, problems);

    let mut views = Vec::new();
    let mut view_idx = HashMap::new();
    for (file, raw) in files {
        for v in &raw.feature_views {
            let at = format!("{file}: feature view {:?}", v.name);
            if let Err(m) = check_name(&v.name) {
                problems.push(format!("{at}: {m}"));
            }
            if v.entities.is_empty() {
                problems.push(format!("{at}: needs at least one entity in `entities`"));
            }
            let mut join_keys = Vec::new();
            let mut key_types = Vec::new();
            let mut seen_entities = HashSet::new();
            for en in &v.entities {
                if !seen_entities.insert(en) {
                    problems.push(format!("{at}: entity {en:?} listed twice"));
                }
                match entity_idx.get(en) {
                    Some(&i) => {
                        let e: &Entity = &entities[i];
                        join_keys.push(e.join_key.clone());
                        key_types.push(e.value_type);
                    }
                    None => problems.push(format!(
                        "{at}: unknown entity {en:?}; declared entities: {}",
                        join_names(entities.iter().map(|e| e.name.as_str()))
                    )),
                }
            }
            let ttl = match v.ttl.as_deref().map(parse_ttl).transpose() {
                Ok(t) => t.flatten(),
                Err(m) => {
                    problems.push(format!("{at}: {m}"));
                    None
                }
            };
            let has_aggs = !v.aggregations.is_empty();
            if v.features.is_empty() && !has_aggs {
                problems.push(format!(
                    "{at}: declares no features (list `features`, or `aggregations` for a windowed view)"
                ));
            }
            if has_aggs && !v.features.is_empty() {
                problems.push(format!(
                    "{at}: declares both `features` and `aggregations`; an aggregation view's features are its aggregations"
                ));
            }
            if has_aggs && v.source.is_some() {
                problems.push(format!(
                    "{at}: `source` is for latest-value views; aggregations name their own `events`"
                ));
            }
            if !has_aggs && v.tile.is_some() {
                problems.push(format!(
                    "{at}: `tile` only applies to views with `aggregations`"
                ));
            }
            let mut features = Vec::new();
            let mut feature_idx = HashMap::new();
            for f in &v.features {
                let fat = format!("{at}: feature {:?}", f.name);
                if let Err(m) = check_name(&f.name) {
                    problems.push(format!("{fat}: {m}"));
                }
                let value_type = dtype(&fat, &f.dtype, problems);
                if f.dimension.is_some() && !value_type.is_list() {
                    problems.push(format!("{fat}: `dimension` only applies to list dtypes"));
                }
                if f.dimension == Some(0) {
                    problems.push(format!("{fat}: `dimension` must be at least 1"));
                }
                if feature_idx.insert(f.name.clone(), features.len()).is_some() {
                    problems.push(format!("{fat}: declared twice in this view"));
                }
                features.push(Feature {
                    name: f.name.clone(),
                    value_type,
                    dimension: f.dimension,
                    description: f.description.clone(),
                    unit: f.unit.clone(),
                });
            }
            let source = if has_aggs {
                if ttl.is_some() {
                    problems.push(format!(
                        "{at}: aggregation views take no `ttl`; their windows decide which events count"
                    ));
                }
                let (tile, aggregations) =
                    build_aggregations(&at, v, &event_types, &v.entities, problems);
                for a in &aggregations {
                    feature_idx.insert(a.name.clone(), features.len());
                    let raw = v.aggregations.iter().find(|r| r.name == a.name);
                    features.push(Feature {
                        name: a.name.clone(),
                        value_type: agg_output_type(a),
                        dimension: None,
                        description: raw.map(|r| r.description.clone()).unwrap_or_default(),
                        unit: raw.map(|r| r.unit.clone()).unwrap_or_default(),
                    });
                }
                ViewSource::Aggregations { tile, aggregations }
            } else if let Some(RawSource {
                sql: Some(sql),
                events,
            }) = &v.source
            {
                if events.is_some() {
                    problems.push(format!(
                        "{at}: a source is either `events` or `sql`, not both"
                    ));
                }
                if v.features.iter().any(|f| f.from.is_some()) {
                    problems.push(format!(
                        "{at}: `from` applies to event sources; name the SQL result columns after the features instead"
                    ));
                }
                if sql.trim().is_empty() {
                    problems.push(format!("{at}: source.sql is empty"));
                }
                if features.iter().any(|f| f.name == TIMESTAMP_COLUMN)
                    || v.entities.iter().any(|e| e == TIMESTAMP_COLUMN)
                {
                    problems.push(format!(
                        "{at}: `{TIMESTAMP_COLUMN}` is the feature time column of SQL views; rename the feature"
                    ));
                }
                ViewSource::Sql { query: sql.clone() }
            } else if let Some(src) = &v.source {
                let events = src.events.clone().unwrap_or_default();
                check_event_refs(&at, &events, &event_types, &v.entities, problems);
                let fields = v
                    .features
                    .iter()
                    .zip(&features)
                    .map(|(rf, f)| event_field(&at, rf, f, &events, &event_types, problems))
                    .collect();
                if events.is_empty() {
                    problems.push(format!(
                        "{at}: source lists no event types; write `source = {{ events = [...] }}` or `source = {{ sql = \"...\" }}`"
                    ));
                }
                ViewSource::Events {
                    event_types: events,
                    fields,
                }
            } else {
                if v.features.iter().any(|f| f.from.is_some()) {
                    problems.push(format!(
                        "{at}: `from` on a feature needs `source = {{ events = [...] }}` on the view"
                    ));
                }
                ViewSource::Batch
            };
            if view_idx.insert(v.name.clone(), views.len()).is_some() {
                problems.push(format!("{at}: declared twice"));
            }
            views.push(FeatureView {
                name: v.name.clone(),
                entities: v.entities.clone(),
                join_keys,
                key_types,
                features,
                ttl,
                description: v.description.clone(),
                tags: v.tags.clone(),
                source,
                feature_idx,
            });
        }
    }

    build_on_demand_views(
        files,
        &entities,
        &entity_idx,
        &mut views,
        &mut view_idx,
        problems,
    );
    let tables = build_tables(files, &views, problems);
    let mut reg = Registry {
        entities,
        event_types,
        tables,
        views,
        services: Vec::new(),
        entity_idx,
        view_idx,
        service_idx: HashMap::new(),
        join_key_idx,
    };
    for (file, raw) in files {
        for s in &raw.feature_services {
            let at = format!("{file}: feature service {:?}", s.name);
            if let Err(m) = check_name(&s.name) {
                problems.push(format!("{at}: {m}"));
            }
            if s.features.is_empty() {
                problems.push(format!("{at}: lists no features"));
            }
            let features = match reg.resolve_refs(&s.features) {
                Ok(sel) => sel.columns,
                Err(e) => {
                    problems.push(format!("{at}: {}", e.message()));
                    Vec::new()
                }
            };
            if reg
                .service_idx
                .insert(s.name.clone(), reg.services.len())
                .is_some()
            {
                problems.push(format!("{at}: declared twice"));
            }
            reg.services.push(FeatureService {
                name: s.name.clone(),
                refs: s.features.clone(),
                features,
                description: s.description.clone(),
            });
        }
    }
    reg
}

/// Builds the `[[on_demand_feature_views]]` of every file into `views`
/// (after the stored views, which their inputs refer to). Expressions are
/// type-checked by `quiver_batch::ondemand::compile`, which needs
/// DataFusion.
fn build_on_demand_views(
    files: &[(&str, RawFile)],
    entities: &[Entity],
    entity_idx: &HashMap<String, usize>,
    views: &mut Vec<FeatureView>,
    view_idx: &mut HashMap<String, usize>,
    problems: &mut Vec<String>,
) {
    let stored = views.len();
    for (file, raw) in files {
        for v in &raw.on_demand_feature_views {
            let at = format!("{file}: on-demand feature view {:?}", v.name);
            if let Err(m) = check_name(&v.name) {
                problems.push(format!("{at}: {m}"));
            }
            // Inputs: features of stored views (not of other on-demand views).
            let mut inputs: Vec<FeatureRef> = Vec::new();
            let mut view_entities: Vec<String> = Vec::new();
            for r in &v.inputs {
                let Some((vn, fname)) = r.split_once(':') else {
                    problems.push(format!(
                        "{at}: input {r:?}: write \"view:feature\" (or \"view:*\")"
                    ));
                    continue;
                };
                let Some(&vi) = view_idx.get(vn).filter(|&&i| i < stored) else {
                    let why = if view_idx.contains_key(vn) {
                        "is an on-demand view; inputs are features of stored views"
                    } else {
                        "is not a declared feature view"
                    };
                    problems.push(format!("{at}: input {r:?}: {vn:?} {why}"));
                    continue;
                };
                let view = &views[vi];
                let fs: Vec<usize> = if fname == "*" {
                    (0..view.features.len()).collect()
                } else if let Some(fi) = view.feature_index(fname) {
                    vec![fi]
                } else {
                    problems.push(format!(
                        "{at}: input {r:?}: view {vn:?} has no feature {fname:?}; its features: {}",
                        join_names(view.features.iter().map(|f| f.name.as_str()))
                    ));
                    continue;
                };
                for feature in fs {
                    let fr = FeatureRef { view: vi, feature };
                    if !inputs.contains(&fr) {
                        inputs.push(fr);
                    }
                }
                for e in &view.entities {
                    if !view_entities.contains(e) {
                        view_entities.push(e.clone());
                    }
                }
            }
            let mut request = Vec::new();
            for rf in &v.request {
                let rat = format!("{at}: request field {:?}", rf.name);
                if let Err(m) = check_name(&rf.name) {
                    problems.push(format!("{rat}: {m}"));
                }
                if rf.name == TIMESTAMP_COLUMN {
                    problems.push(format!(
                        "{rat}: `{TIMESTAMP_COLUMN}` is the request time (the entity row's time offline); expressions read it without declaring it"
                    ));
                }
                if entities.iter().any(|e| e.join_key == rf.name) {
                    problems.push(format!(
                        "{rat}: is a join key; request data must be named apart from entities"
                    ));
                }
                if request.iter().any(|q: &RequestField| q.name == rf.name) {
                    problems.push(format!("{rat}: declared twice"));
                }
                let value_type = dtype(&rat, &rf.dtype, problems);
                request.push(RequestField {
                    name: rf.name.clone(),
                    value_type,
                });
            }
            if v.features.is_empty() {
                problems.push(format!("{at}: declares no features"));
            }
            let mut features = Vec::new();
            let mut feature_idx = HashMap::new();
            let mut expressions = Vec::new();
            for f in &v.features {
                let fat = format!("{at}: feature {:?}", f.name);
                if let Err(m) = check_name(&f.name) {
                    problems.push(format!("{fat}: {m}"));
                }
                let value_type = dtype(&fat, &f.dtype, problems);
                if f.expr.trim().is_empty() {
                    problems.push(format!("{fat}: `expr` is empty"));
                }
                if feature_idx.insert(f.name.clone(), features.len()).is_some() {
                    problems.push(format!("{fat}: declared twice in this view"));
                }
                features.push(Feature {
                    name: f.name.clone(),
                    value_type,
                    dimension: None,
                    description: f.description.clone(),
                    unit: f.unit.clone(),
                });
                expressions.push(f.expr.clone());
            }
            for r in &request {
                if feature_idx.contains_key(&r.name) {
                    problems.push(format!(
                        "{at}: request field {:?} has the name of a feature of this view; responses hold both, so rename one",
                        r.name
                    ));
                }
            }
            let join_keys: Vec<String> = view_entities
                .iter()
                .filter_map(|e| entity_idx.get(e).map(|&i| entities[i].join_key.clone()))
                .collect();
            let key_types = view_entities
                .iter()
                .filter_map(|e| entity_idx.get(e).map(|&i| entities[i].value_type))
                .collect();
            if view_idx.insert(v.name.clone(), views.len()).is_some() {
                problems.push(format!(
                    "{at}: a feature view of this name is declared already"
                ));
            }
            views.push(FeatureView {
                name: v.name.clone(),
                entities: view_entities,
                join_keys,
                key_types,
                features,
                ttl: None,
                description: v.description.clone(),
                tags: v.tags.clone(),
                source: ViewSource::OnDemand {
                    request,
                    inputs,
                    expressions,
                },
                feature_idx,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[[entities]]
name = "user"
join_key = "user_id"

[[entities]]
name = "product"
join_key = "product_id"
value_type = "int64"

[[feature_views]]
name = "user_profile"
entities = ["user"]
ttl = "30d"
features = [
  { name = "age", dtype = "int64" },
  { name = "country", dtype = "string" },
  { name = "embedding", dtype = "float_list", dimension = 4 },
]

[[feature_views]]
name = "user_product"
entities = ["user", "product"]
features = [{ name = "views", dtype = "int64" }]

[[feature_services]]
name = "user_service"
features = ["user_profile:age", "user_product:*"]
"#;

    #[test]
    fn loads_a_valid_registry() {
        let r = Registry::from_toml("r.toml", GOOD).unwrap();
        assert_eq!(r.entities().len(), 2);
        let v = r.view(r.view_index("user_profile").unwrap());
        assert_eq!(v.ttl, Some(Duration::from_secs(30 * 86400)));
        assert_eq!(v.join_keys, vec!["user_id"]);
        let pv = r.view(r.view_index("user_product").unwrap());
        assert_eq!(pv.join_keys, vec!["user_id", "product_id"]);
        assert_eq!(pv.key_types, vec![ValueType::String, ValueType::Int64]);
        assert_eq!(pv.ttl, None);
        assert_eq!(r.service("user_service").unwrap().features.len(), 2);
        assert_eq!(r.entity_by_join_key("product_id").unwrap().name, "product");
    }

    #[test]
    fn resolves_refs_grouped_by_view() {
        let r = Registry::from_toml("r.toml", GOOD).unwrap();
        let sel = r
            .resolve_refs(&[
                "user_profile:country",
                "user_product:views",
                "user_profile:age",
            ])
            .unwrap();
        assert_eq!(sel.columns.len(), 3);
        assert_eq!(sel.by_view, vec![(0, vec![1, 0]), (1, vec![0])]);
        let all = r.resolve_refs(&["user_profile:*"]).unwrap();
        assert_eq!(all.columns.len(), 3);
        assert_eq!(r.select_entity("user").unwrap().columns.len(), 3);
    }

    #[test]
    fn output_names_are_short_or_full_and_never_collide() {
        let r = Registry::from_toml("r.toml", GOOD).unwrap();
        let sel = r
            .resolve_refs(&["user_profile:country", "user_product:views"])
            .unwrap();
        let keys = || ["user_id".to_owned()];
        assert_eq!(
            r.output_names(&sel, keys(), false).unwrap(),
            vec!["country", "views"]
        );
        assert_eq!(
            r.output_names(&sel, keys(), true).unwrap(),
            vec!["user_profile__country", "user_product__views"]
        );
        // A feature named like a key or entity column, or listed twice.
        let e = r
            .output_names(&sel, ["views".to_owned()], false)
            .unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::InvalidArgument);
        assert!(e.message().contains("\"views\" would appear twice"), "{e}");
        assert!(e.message().contains("set full_feature_names=true"), "{e}");
        let twice = r
            .resolve_refs(&["user_profile:age", "user_profile:age"])
            .unwrap();
        assert!(r.output_names(&twice, keys(), true).is_err());
    }

    #[test]
    fn unknown_names_say_what_exists() {
        let r = Registry::from_toml("r.toml", GOOD).unwrap();
        let e = r.resolve_refs(&["nope:age"]).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::NotFound);
        assert!(
            e.message()
                .contains("known views: user_profile, user_product"),
            "{e}"
        );
        let e = r.resolve_refs(&["user_profile:height"]).unwrap_err();
        assert!(
            e.message()
                .contains("its features: age, country, embedding"),
            "{e}"
        );
        let e = r.resolve_refs(&["age"]).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::InvalidArgument);
        let e = r.resolve_service("nope").unwrap_err();
        assert!(e.message().contains("user_service"), "{e}");
    }

    #[test]
    fn reports_every_problem_with_file_and_item() {
        let bad = r#"
[[entities]]
name = "user"
value_type = "double"

[[feature_views]]
name = "v"
entities = ["user", "ghost"]
ttl = "forever"
features = [{ name = "a", dtype = "int128" }, { name = "a", dtype = "int64" }, { name = "b", dtype = "int64", dimension = 3 }]

[[feature_services]]
name = "s"
features = ["v:zzz"]
"#;
        let e = Registry::from_toml("bad.toml", bad).unwrap_err();
        let m = e.message();
        for needle in [
            "bad.toml: entity \"user\": value_type \"double\" cannot be a join key",
            "bad.toml: feature view \"v\": unknown entity \"ghost\"",
            "bad.toml: feature view \"v\": invalid ttl \"forever\"",
            "feature \"a\": unknown dtype \"int128\"",
            "feature \"a\": declared twice",
            "feature \"b\": `dimension` only applies to list dtypes",
            "bad.toml: feature service \"s\": unknown feature \"zzz\"",
        ] {
            assert!(m.contains(needle), "missing {needle:?} in:\n{m}");
        }
    }

    #[test]
    fn syntax_errors_and_unknown_fields_name_the_file() {
        let e =
            Registry::from_toml("x.toml", "[[entities]]\nname = \"u\"\nkey = \"k\"\n").unwrap_err();
        assert!(e.message().starts_with("x.toml: "), "{e}");
        assert!(e.message().contains("unknown field `key`"), "{e}");
    }

    #[test]
    fn invalid_names_are_rejected() {
        assert!(check_name("user_id").is_ok());
        assert!(check_name("_ts").is_err());
        assert!(check_name("a:b").is_err());
        assert!(check_name("").is_err());
        assert!(check_name("1abc").is_err());
    }

    #[test]
    fn loads_a_directory_of_files() {
        let dir = tempfile::tempdir().unwrap();
        let (ents, rest) = GOOD.split_at(GOOD.find("[[feature_views]]").unwrap());
        std::fs::write(dir.path().join("a_entities.toml"), ents).unwrap();
        std::fs::write(dir.path().join("b_views.toml"), rest).unwrap();
        std::fs::write(dir.path().join("README.md"), "ignored").unwrap();
        let r = Registry::load(dir.path()).unwrap();
        assert_eq!(r.views().len(), 2);
        let empty = tempfile::tempdir().unwrap();
        assert!(Registry::load(empty.path()).is_err());
    }

    const STREAM: &str = r#"
[[entities]]
name = "user"
join_key = "user_id"

[[entities]]
name = "product"
join_key = "product_id"

[[event_types]]
name = "purchase"
entities = ["user", "product"]
attributes = [
  { name = "amount", dtype = "double" },
  { name = "coupon", dtype = "string", optional = true },
]

[[event_types]]
name = "login"
entities = ["user"]
attributes = [{ name = "device", dtype = "string" }]

[[feature_views]]
name = "user_last_login"
entities = ["user"]
source = { events = ["login"] }
features = [
  { name = "device", dtype = "string" },
  { name = "at", dtype = "timestamp", from = "event_time" },
]

[[feature_views]]
name = "user_stream"
entities = ["user"]
tile = "1h"
aggregations = [
  { name = "purchases_24h", function = "count", events = ["purchase"], window = "24h" },
  { name = "spend_7d", function = "sum", attribute = "amount", events = ["purchase"], window = "7d" },
  { name = "recent_products", function = "last_n", n = 3, attribute = "product_id", events = ["purchase"], window = "24h" },
  { name = "distinct_products", function = "approx_distinct", attribute = "product_id", events = ["purchase"], window = "7d" },
]
"#;

    #[test]
    fn loads_event_types_and_stream_views() {
        let r = Registry::from_toml("s.toml", STREAM).unwrap();
        let p = r.event_type("purchase").unwrap();
        assert_eq!(p.join_keys, vec!["user_id", "product_id"]);
        assert_eq!(p.optional, vec!["coupon"]);
        let v = r.view(r.view_index("user_last_login").unwrap());
        assert_eq!(
            v.source,
            ViewSource::Events {
                event_types: vec!["login".into()],
                fields: vec![
                    EventField::Attribute("device".into()),
                    EventField::EventTime
                ],
            }
        );
        let s = r.view(r.view_index("user_stream").unwrap());
        let ViewSource::Aggregations { tile, aggregations } = &s.source else {
            panic!("not an aggregation view: {:?}", s.source);
        };
        assert_eq!(*tile, 3_600_000_000);
        assert_eq!(aggregations[1].window, 7 * 24 * 3_600_000_000);
        assert_eq!(aggregations[2].function, AggFunction::LastN(3));
        assert_eq!(aggregations[0].state, "purchases_24h");
        let types: Vec<ValueType> = s.features.iter().map(|f| f.value_type).collect();
        assert_eq!(
            types,
            vec![
                ValueType::Int64,
                ValueType::Double,
                ValueType::StringList,
                ValueType::Int64
            ]
        );
        assert!(r.resolve_refs(&["user_stream:spend_7d"]).is_ok());
    }

    #[test]
    fn stream_views_are_checked_against_event_types() {
        let bad = STREAM.to_owned()
            + r#"
[[event_types]]
name = "refund"
entities = ["product"]
attributes = [{ name = "amount", dtype = "int64" }, { name = "event_time", dtype = "string" }]

[[feature_views]]
name = "bad_stream"
entities = ["user"]
tile = "1h"
ttl = "1d"
aggregations = [
  { name = "a", function = "median", events = ["purchase"], window = "1h" },
  { name = "b", function = "sum", attribute = "coupon", events = ["purchase"], window = "90m" },
  { name = "c", function = "count", events = ["refund", "nope"], window = "1h" },
  { name = "d", function = "last_n", attribute = "amount", events = ["purchase"], window = "1h" },
]

[[feature_views]]
name = "bad_latest"
entities = ["user"]
source = { events = ["login"] }
features = [{ name = "devices", dtype = "int64", from = "device" }, { name = "x", dtype = "string" }]
"#;
        let m = Registry::from_toml("s.toml", &bad)
            .unwrap_err()
            .message()
            .to_owned();
        for needle in [
            "event type \"refund\": attribute \"amount\": is int64 here but double in event type \"purchase\"",
            "attribute \"event_time\": the name is taken",
            "feature view \"bad_stream\": aggregation views take no `ttl`",
            "aggregation \"a\": unknown function \"median\"",
            "aggregation \"b\": sum cannot aggregate attribute \"coupon\" of type string",
            "aggregation \"b\": window \"90m\" is not a whole number of tiles",
            "aggregation \"c\": event type \"refund\" does not carry entity \"user\"",
            "aggregation \"c\": unknown event type \"nope\"",
            "aggregation \"d\": last_n needs `n`",
            "feature \"devices\": is int64 but attribute \"device\" of event type \"login\" is string",
            "feature \"x\": event type \"login\" has no attribute \"x\"",
        ] {
            assert!(m.contains(needle), "missing {needle:?} in:\n{m}");
        }
    }

    #[test]
    fn tiles_and_windows_are_bounded() {
        let view = |tile: &str, window: &str| {
            STREAM.to_owned()
                + &format!(
                    r#"
[[feature_views]]
name = "bounded"
entities = ["user"]
tile = "{tile}"
aggregations = [{{ name = "n", function = "count", events = ["purchase"], window = "{window}" }}]
"#
                )
        };
        let err = |tile: &str, window: &str| {
            Registry::from_toml("s.toml", &view(tile, window))
                .unwrap_err()
                .message()
                .to_owned()
        };
        assert!(err("500ms", "1s").contains("tile \"500ms\" is shorter than one second"));
        assert!(err("1d", "3651d").contains("longer than 3650 days"));
        assert!(err("1s", "7d").contains("spans 604800 tiles"));
        for (tile, window) in [("1s", "10000s"), ("1d", "3650d"), ("1h", "365d")] {
            Registry::from_toml("s.toml", &view(tile, window)).unwrap();
        }
    }
}
