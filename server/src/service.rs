//! The domain service behind both transports: gRPC (`grpc.rs`) and REST
//! (`rest.rs`) are thin adapters that convert their wire types to the types
//! here and call the same methods, so the two cannot drift.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quiver_batch::arrow::array::RecordBatch;
use quiver_batch::{entities, retrieve, Offline};
use quiver_core::aggregate::finish_row;
use quiver_core::codec::{entity_key, row_key};
use quiver_core::error::quote;
use quiver_core::event::{checked, Event, EventSink, EventTimeBounds};
use quiver_core::registry::{selection, FeatureRef, Selection, ViewSource};
use quiver_core::store::{Lookup, StoredRow, WriteOutcome, WriteRow};
use quiver_core::telemetry;
use quiver_core::time::{duration_micros, Micros};
use quiver_core::value::coerce;
use quiver_core::{Clock, Error, ErrorKind, OnlineStore, Registry, Result, Value, ValueType};

use crate::auth::{Authenticator, Principal};
use crate::error::bounded;
use crate::limit::InFlight;
use crate::metrics::Metrics;

/// Request size limits; exceeding one is `RESOURCE_EXHAUSTED` / HTTP 413.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Maximum entity rows in one `GetOnlineFeatures` call.
    pub max_entity_rows: usize,
    /// Maximum feature references in one call.
    pub max_features: usize,
    /// Maximum rows in one `WriteFeatures` call.
    pub max_write_rows: usize,
    /// Maximum encoded request size in bytes (gRPC message, HTTP body).
    pub max_request_bytes: usize,
    /// Maximum entity rows in one `GetHistoricalFeatures` call.
    pub max_historical_rows: usize,
    /// Maximum encoded `GetHistoricalFeatures` request size in bytes (the
    /// entity table of a training set is larger than online requests).
    pub max_historical_bytes: usize,
    /// Most requests one caller (an API key; a client address without
    /// authentication) has in flight at once; more are refused with
    /// `RESOURCE_EXHAUSTED` / 429 (see [`crate::limit`]).
    pub max_in_flight_per_key: usize,
    /// Longest time a request may take (every route and RPC except the
    /// streamed `GetHistoricalFeatures`, bounded by its own limits and the
    /// caller's deadline); past it the answer is `DEADLINE_EXCEEDED` / 504.
    pub request_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_entity_rows: 1_000,
            max_features: 1_000,
            max_write_rows: 10_000,
            max_request_bytes: 4 * 1024 * 1024,
            max_historical_rows: 10_000_000,
            max_historical_bytes: 512 * 1024 * 1024,
            max_in_flight_per_key: 512,
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// How the features of a request are chosen.
#[derive(Debug, Clone, PartialEq)]
pub enum FeatureSelector {
    /// A feature service of the registry.
    Service(String),
    /// `view:feature` references.
    Refs(Vec<String>),
    /// Every feature of every view keyed by exactly this entity (REST `GET`).
    Entity(String),
}

/// A `GetOnlineFeatures` request in domain terms.
#[derive(Debug, Clone, PartialEq)]
pub struct OnlineRequest {
    /// Which features.
    pub selector: FeatureSelector,
    /// Entity rows, column-wise: join key and one value per row.
    pub entities: Vec<(String, Vec<Value>)>,
    /// Name output columns `view__feature` instead of `feature`.
    pub full_feature_names: bool,
}

/// Status of one returned value (the protobuf `FieldStatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum FieldStatus {
    /// Present and fresh.
    Present,
    /// Stored as null.
    NullValue,
    /// Nothing stored.
    NotFound,
    /// Older than the view's TTL; the value is still returned.
    OutsideMaxAge,
}

impl FieldStatus {
    /// Wire spelling (same as the protobuf enum).
    pub fn as_str(self) -> &'static str {
        match self {
            FieldStatus::Present => "PRESENT",
            FieldStatus::NullValue => "NULL_VALUE",
            FieldStatus::NotFound => "NOT_FOUND",
            FieldStatus::OutsideMaxAge => "OUTSIDE_MAX_AGE",
        }
    }
}

/// One output column: a join key or a feature, one entry per entity row.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Column {
    /// Values (null where not found).
    pub values: Vec<Value>,
    /// Status of each value.
    pub statuses: Vec<FieldStatus>,
    /// Event time of each value's row, `None` for join keys and missing rows.
    pub event_ts: Vec<Option<Micros>>,
}

/// A `GetOnlineFeatures` response in domain terms.
#[derive(Debug, Clone, PartialEq)]
pub struct OnlineResponse {
    /// Column names: join keys first, then features.
    pub names: Vec<String>,
    /// Columns, same order as `names`.
    pub columns: Vec<Column>,
}

/// One row of a `WriteFeatures` request in domain terms.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureRowIn {
    /// Join key and value pairs.
    pub entity_key: Vec<(String, Value)>,
    /// Event time; required.
    pub event_ts: Option<Micros>,
    /// Feature name and value pairs; absent features are stored as null.
    pub features: Vec<(String, Value)>,
}

/// The entity table of a historical request.
#[derive(Debug, Clone, PartialEq)]
pub enum EntityTable {
    /// Column-wise typed values: column name and one value per row.
    Values(Vec<(String, Vec<Value>)>),
    /// An Arrow IPC stream.
    ArrowIpc(Vec<u8>),
}

/// The feature service: registry + online store + clock + limits.
pub struct FeatureServer {
    registry: Arc<Registry>,
    store: Arc<dyn OnlineStore>,
    clock: Arc<dyn Clock>,
    limits: Limits,
    expiry_grace: Duration,
    metrics: Arc<Metrics>,
    events: Option<Arc<dyn EventSink>>,
    event_time_bounds: EventTimeBounds,
    offline: Option<Arc<Offline>>,
    auth: Option<Arc<Authenticator>>,
    in_flight: Arc<InFlight>,
    on_demand: Arc<quiver_batch::ondemand::OnDemand>,
}

/// What became of pushed events.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PushOutcome {
    /// Events appended to the event log.
    pub accepted: u64,
    /// Position, event id and reason of each rejected event.
    pub rejected: Vec<(usize, String, String)>,
}

impl std::fmt::Debug for FeatureServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FeatureServer")
            .field("backend", &self.store.backend())
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl FeatureServer {
    /// Creates the service. `expiry_grace` is how long after a view's TTL a
    /// row stays stored (served as `OUTSIDE_MAX_AGE`) before it expires.
    pub fn new(
        registry: Arc<Registry>,
        store: Arc<dyn OnlineStore>,
        clock: Arc<dyn Clock>,
        limits: Limits,
        expiry_grace: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        // Registries are checked by the caller (the CLI refuses one whose
        // on-demand expressions do not compile); a view that failed is an
        // error when requested.
        let (on_demand, problems) = quiver_batch::ondemand::compile(&registry);
        for p in problems {
            tracing::error!(problem = %p, "on-demand feature view cannot be served");
        }
        FeatureServer {
            on_demand: Arc::new(on_demand),
            registry,
            store,
            clock,
            limits,
            expiry_grace,
            metrics,
            events: None,
            event_time_bounds: EventTimeBounds::default(),
            offline: None,
            auth: None,
            in_flight: Arc::default(),
        }
    }

    /// The requests in flight per caller, shared by both APIs.
    pub fn in_flight(&self) -> &Arc<InFlight> {
        &self.in_flight
    }

    /// Requires API keys on both APIs (see [`crate::auth`]); without an
    /// authenticator every caller is [`Principal::unrestricted`].
    pub fn with_auth(mut self, auth: Arc<Authenticator>) -> Self {
        self.auth = Some(auth);
        self
    }

    /// The authenticator, when API keys are required.
    pub fn authenticator(&self) -> Option<&Arc<Authenticator>> {
        self.auth.as_ref()
    }

    /// Sets the event log that `PushEvents` appends to; without one,
    /// `PushEvents` answers UNAVAILABLE.
    pub fn with_event_sink(mut self, sink: Arc<dyn EventSink>) -> Self {
        self.events = Some(sink);
        self
    }

    /// Sets the event times `PushEvents` accepts (against this server's
    /// clock); the default is [`EventTimeBounds::default`]. Give it the same
    /// bounds as `quiver ingest`, which dead-letters events outside them.
    pub fn with_event_time_bounds(mut self, bounds: EventTimeBounds) -> Self {
        self.event_time_bounds = bounds;
        self
    }

    /// Sets the offline store that `GetHistoricalFeatures` reads; without
    /// one, it answers FAILED_PRECONDITION.
    pub fn with_offline(mut self, offline: Arc<Offline>) -> Self {
        self.offline = Some(offline);
        self
    }

    /// Point-in-time correct feature values for an entity table (see
    /// `quiver_batch::retrieve`), in batches of at most
    /// `quiver_batch::retrieve::STREAM_BATCH_ROWS` rows.
    pub async fn get_historical(
        &self,
        caller: &Principal,
        selector: &FeatureSelector,
        entities: EntityTable,
        full_feature_names: bool,
    ) -> Result<Vec<RecordBatch>> {
        let offline = self.offline.as_ref().ok_or_else(|| {
            Error::precondition(
                "this server has no offline store: start it with an archive location (`--archive`, [archive] location) to serve historical features",
            )
        })?;
        if let FeatureSelector::Entity(_) = selector {
            return Err(Error::invalid("name a feature_service or list features"));
        }
        let sel = self.select(caller, selector)?;
        let table = match entities {
            EntityTable::Values(cols) => entities::from_values(cols)?,
            EntityTable::ArrowIpc(bytes) => entities::from_ipc(bytes)?,
        };
        if table.num_rows() > self.limits.max_historical_rows {
            return Err(too_many(
                "entity rows",
                table.num_rows(),
                self.limits.max_historical_rows,
            ));
        }
        let out = offline.historical(table, &sel, full_feature_names).await?;
        Ok(retrieve::chunks(&out))
    }

    /// Checks events ([`checked`], and their times against the server's
    /// clock with [`EventTimeBounds`]) and appends the valid ones to the
    /// event log. Each input is an event or the reason it could not be parsed.
    ///
    /// # Errors
    /// `PERMISSION_DENIED` for the whole call when `caller` may not push
    /// one of the events' types.
    pub async fn push_events(
        &self,
        caller: &Principal,
        events: Vec<(String, Result<Event>)>,
    ) -> Result<PushOutcome> {
        let sink = self.events.as_ref().ok_or_else(|| {
            Error::unavailable(
                "this server has no event log: start it with `--kafka-brokers` (or run `quiver demo`) to accept events",
            )
        })?;
        if events.is_empty() {
            return Err(Error::invalid("no events to push"));
        }
        if events.len() > self.limits.max_write_rows {
            return Err(too_many("events", events.len(), self.limits.max_write_rows));
        }
        for (i, (_, ev)) in events.iter().enumerate() {
            if let Ok(e) = ev {
                if !caller.may_push(&e.event_type) {
                    return Err(Error::denied(format!(
                        "API key {:?} may not push events of type {} (event {i})",
                        caller.name(),
                        quote(&e.event_type)
                    )));
                }
            }
        }
        let mut out = PushOutcome::default();
        let mut valid = Vec::with_capacity(events.len());
        let mut positions = Vec::with_capacity(events.len());
        let now = self.clock.now_micros();
        let in_bounds = |e: Event| -> Result<Event> {
            self.event_time_bounds
                .check(e.event_time, now)
                .map_err(Error::invalid)?;
            Ok(e)
        };
        for (i, (id, ev)) in events.into_iter().enumerate() {
            match ev
                .and_then(|e| checked(&self.registry, e))
                .and_then(in_bounds)
            {
                Ok(e) => {
                    valid.push(e);
                    positions.push(i);
                }
                Err(e) => out
                    .rejected
                    .push((i, id, bounded(e.message()).into_owned())),
            }
        }
        if !valid.is_empty() {
            let results = sink.publish(&valid).await?;
            for ((pos, ev), r) in positions.into_iter().zip(&valid).zip(results) {
                match r {
                    Ok(()) => out.accepted += 1,
                    Err(e) => out.rejected.push((
                        pos,
                        ev.event_id.clone(),
                        bounded(e.message()).into_owned(),
                    )),
                }
            }
        }
        out.rejected.sort_by_key(|r| r.0);
        self.metrics
            .observe_events(out.accepted, out.rejected.len() as u64);
        Ok(out)
    }

    /// The loaded registry.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The configured limits.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The metrics registry shared by both transports.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Name of the online-store backend.
    pub fn backend(&self) -> &'static str {
        self.store.backend()
    }

    /// Checks the online store (readiness).
    pub async fn ping(&self) -> Result<()> {
        self.timed_store("ping", self.store.ping()).await
    }

    async fn timed_store<T>(
        &self,
        op: &'static str,
        fut: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let backend = self.store.backend();
        // A client span under the request's (readiness pings are not
        // traced: they would be a root span every health interval).
        let span = telemetry::child_span(|| match op {
            "ping" => tracing::Span::none(),
            _ => tracing::info_span!(
                "online store",
                otel.name = format!("online_store.{op}"),
                otel.kind = "client",
                db.system.name = backend,
                db.operation.name = op,
            ),
        });
        let started = Instant::now();
        let r = telemetry::in_span(&span, fut).await;
        self.metrics
            .observe_store(backend, op, r.is_ok(), started.elapsed());
        r
    }

    /// The request data the on-demand views `selector` selects read, by
    /// name and declared type (empty when it selects none or does not
    /// resolve; the request itself then reports why). The REST gateway
    /// reads JSON request data with these types.
    pub fn request_data_types(&self, selector: &FeatureSelector) -> Vec<(String, ValueType)> {
        let reg = &*self.registry;
        let sel = match selector {
            FeatureSelector::Service(name) => reg.resolve_service(name),
            FeatureSelector::Refs(refs) => reg.resolve_refs(refs),
            FeatureSelector::Entity(entity) => reg.select_entity(entity),
        };
        let Ok(sel) = sel else { return Vec::new() };
        request_fields(reg, &reg.on_demand_views(&sel))
            .map(|fields| {
                fields
                    .into_iter()
                    .map(|(n, ty, _)| (n.to_owned(), ty))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn select(&self, caller: &Principal, selector: &FeatureSelector) -> Result<Selection> {
        let reg = &self.registry;
        let mut sel = match selector {
            FeatureSelector::Service(name) => reg.resolve_service(name)?,
            FeatureSelector::Refs(refs) => {
                if refs.is_empty() {
                    return Err(Error::invalid(
                        "no features requested: name a feature_service or list features as \"view:feature\"",
                    ));
                }
                if refs.len() > self.limits.max_features {
                    return Err(too_many(
                        "feature references",
                        refs.len(),
                        self.limits.max_features,
                    ));
                }
                reg.resolve_refs(refs)?
            }
            FeatureSelector::Entity(entity) => reg.select_entity(entity)?,
        };
        if caller.limited_to_views() {
            let view_name = |c: &FeatureRef| reg.view(c.view).name.as_str();
            match selector {
                // All features of an entity: those the key may read.
                FeatureSelector::Entity(entity) => {
                    // On-demand views count as readable when their inputs are.
                    let readable = |c: &FeatureRef| {
                        caller.may_use_view(view_name(c))
                            && reg
                                .stored_selection(&selection(vec![c.clone()]))
                                .columns
                                .iter()
                                .all(|i| caller.may_use_view(view_name(i)))
                    };
                    let columns = std::mem::take(&mut sel.columns);
                    sel = selection(columns.into_iter().filter(readable).collect());
                    if sel.columns.is_empty() {
                        return Err(Error::denied(format!(
                            "API key {:?} may read none of the feature views of entity {}",
                            caller.name(),
                            quote(entity)
                        )));
                    }
                }
                FeatureSelector::Service(name) if caller.names_service(name) => {}
                _ => {
                    if let Some(c) = sel
                        .columns
                        .iter()
                        .find(|c| !caller.may_use_view(view_name(c)))
                    {
                        return Err(Error::denied(format!(
                            "API key {:?} may not read feature view {:?}",
                            caller.name(),
                            view_name(c)
                        )));
                    }
                }
            }
        }
        // A key limited to feature views reads on-demand features only if
        // it may read their inputs too (their values can be derived back),
        // unless it is granted a feature service by name.
        let named_service =
            matches!(selector, FeatureSelector::Service(name) if caller.names_service(name));
        if caller.limited_to_views() && !named_service {
            for c in &reg.stored_selection(&sel).columns {
                let input = &reg.view(c.view).name;
                if !caller.may_use_view(input) {
                    return Err(Error::denied(format!(
                        "API key {:?} may not read feature view {input:?}, an input of the selected on-demand features",
                        caller.name()
                    )));
                }
            }
        }
        let mut seen = HashSet::new();
        sel.columns.retain(|c| seen.insert(c.clone()));
        if sel.columns.is_empty() {
            return Err(Error::invalid("the request selects no features"));
        }
        if sel.columns.len() > self.limits.max_features {
            return Err(too_many(
                "features",
                sel.columns.len(),
                self.limits.max_features,
            ));
        }
        Ok(sel)
    }

    /// Latest values of the selected features for each entity row; one
    /// online-store round trip whatever the number of rows and views.
    /// On-demand features are computed from the values read (their inputs)
    /// and the request data passed beside the entity columns.
    pub async fn get_online(
        &self,
        caller: &Principal,
        req: OnlineRequest,
    ) -> Result<OnlineResponse> {
        let reg = &*self.registry;
        let sel = self.select(caller, &req.selector)?;
        let on_demand = reg.on_demand_views(&sel);
        let stored = reg.stored_selection(&sel);
        let request_fields = request_fields(reg, &on_demand)?;

        // Entity columns: known join keys or request data of the selected
        // on-demand views, typed values, equal lengths.
        let Some((_, first)) = req.entities.first() else {
            return Err(Error::invalid(
                "no entities given: pass one column per join key, e.g. {\"user_id\": [\"user_123\"]}",
            ));
        };
        let n_rows = first.len();
        if n_rows == 0 {
            return Err(Error::invalid(
                "entity columns are empty: pass at least one entity row",
            ));
        }
        if n_rows > self.limits.max_entity_rows {
            return Err(too_many("entity rows", n_rows, self.limits.max_entity_rows));
        }
        let mut request_data: Vec<(&str, ValueType, Vec<Value>)> = Vec::new();
        for (key, values) in &req.entities {
            if values.len() != n_rows {
                return Err(Error::invalid(format!(
                    "entity columns differ in length: {} has {n_rows} values, {} has {}",
                    quote(&req.entities[0].0),
                    quote(key),
                    values.len()
                )));
            }
            if let Some(&(name, ty, _)) = request_fields.iter().find(|(n, _, _)| *n == key) {
                let typed = values
                    .iter()
                    .enumerate()
                    .map(|(row, v)| {
                        coerce(v.clone(), ty).map_err(|m| {
                            Error::invalid(format!(
                                "request data {} takes {ty} values; row {row}: {m}",
                                quote(name)
                            ))
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                request_data.push((name, ty, typed));
                continue;
            }
            let entity = reg.entity_by_join_key(key).ok_or_else(|| {
                let mut known: Vec<&str> =
                    reg.entities().iter().map(|e| e.join_key.as_str()).collect();
                let mut msg = format!("unknown join key {}; known join keys: ", quote(key));
                if !request_fields.is_empty() {
                    known.extend(request_fields.iter().map(|(n, _, _)| *n));
                    msg = format!(
                        "unknown column {}: neither a join key nor request data of the selected on-demand views; known: ",
                        quote(key)
                    );
                }
                Error::invalid(format!("{msg}{}", known.join(", ")))
            })?;
            for (row, v) in values.iter().enumerate() {
                check_key_value(key, entity.value_type, v, row)?;
            }
        }
        if let Some((name, ty, view)) = request_fields
            .iter()
            .find(|(n, _, _)| !request_data.iter().any(|(d, _, _)| d == n))
        {
            return Err(Error::invalid(format!(
                "on-demand feature view {view:?} needs request data {} ({ty}): pass it as a column beside the entity columns",
                quote(name)
            )));
        }

        let names = self.output_names(&req, &sel)?;
        let now = self.clock.now_micros();
        let mut read = if stored.columns.is_empty() {
            Vec::new()
        } else {
            self.read_stored(&req, &stored, n_rows, now).await?
        };

        // On-demand views: evaluated on the values just read. Inputs that
        // were not found or are older than their view's TTL are null, as in
        // the point-in-time join.
        let mut computed: Vec<(usize, Vec<Column>)> = Vec::with_capacity(on_demand.len());
        if !on_demand.is_empty() {
            use quiver_batch::arrow::array::{ArrayRef, TimestampMicrosecondArray};
            use quiver_core::columnar::{value_array, value_at};
            let time: ArrayRef =
                Arc::new(TimestampMicrosecondArray::from(vec![now; n_rows]).with_timezone("UTC"));
            for &vi in &on_demand {
                let view = reg.view(vi);
                let ViewSource::OnDemand {
                    request, inputs, ..
                } = &view.source
                else {
                    continue;
                };
                let request: Vec<ArrayRef> = request
                    .iter()
                    .map(|r| {
                        let (_, _, values) = request_data
                            .iter()
                            .find(|(n, _, _)| *n == r.name)
                            .expect("request data checked above");
                        let refs: Vec<Option<&Value>> = values.iter().map(Some).collect();
                        value_array(r.value_type, &refs)
                    })
                    .collect();
                let inputs: Vec<ArrayRef> = inputs
                    .iter()
                    .map(|i| {
                        let pos = stored
                            .columns
                            .iter()
                            .position(|c| c == i)
                            .expect("inputs are read");
                        let col = &read[pos];
                        let refs: Vec<Option<&Value>> = col
                            .values
                            .iter()
                            .zip(&col.statuses)
                            .map(|(v, s)| (*s == FieldStatus::Present).then_some(v))
                            .collect();
                        value_array(reg.view(i.view).features[i.feature].value_type, &refs)
                    })
                    .collect();
                let arrays = self.on_demand.evaluate(reg, vi, &request, &time, &inputs)?;
                let columns = arrays
                    .iter()
                    .zip(&view.features)
                    .map(|(a, f)| {
                        let values = (0..n_rows)
                            .map(|row| value_at(a.as_ref(), f.value_type, row))
                            .collect::<Result<Vec<_>>>()?;
                        let statuses = values
                            .iter()
                            .map(|v| {
                                if v.is_null() {
                                    FieldStatus::NullValue
                                } else {
                                    FieldStatus::Present
                                }
                            })
                            .collect();
                        Ok(Column {
                            values,
                            statuses,
                            event_ts: vec![Some(now); n_rows],
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                computed.push((vi, columns));
            }
        }

        let mut columns: Vec<Column> = req
            .entities
            .iter()
            .map(|(_, values)| Column {
                values: values.clone(),
                statuses: vec![FieldStatus::Present; n_rows],
                event_ts: vec![None; n_rows],
            })
            .collect();
        for c in &sel.columns {
            let col = match computed.iter_mut().find(|(v, _)| *v == c.view) {
                Some((_, cols)) => std::mem::take(&mut cols[c.feature]),
                None => {
                    let pos = stored
                        .columns
                        .iter()
                        .position(|s| s == c)
                        .expect("selected stored features are read");
                    std::mem::take(&mut read[pos])
                }
            };
            columns.push(col);
        }
        Ok(OnlineResponse { names, columns })
    }

    /// The stored features of `sel` (no on-demand views) for each entity
    /// row, one column per `sel.columns` entry: one online-store round trip.
    async fn read_stored(
        &self,
        req: &OnlineRequest,
        sel: &Selection,
        n_rows: usize,
        now: Micros,
    ) -> Result<Vec<Column>> {
        let reg = &*self.registry;
        let column_of = |jk: &str| req.entities.iter().position(|(k, _)| k == jk);
        let mut key_cols: Vec<Vec<usize>> = Vec::with_capacity(sel.by_view.len());
        for (vi, _) in &sel.by_view {
            let view = reg.view(*vi);
            let cols = view
                .join_keys
                .iter()
                .map(|jk| {
                    column_of(jk).ok_or_else(|| {
                        Error::invalid(format!(
                            "feature view {:?} is keyed by {}; the request has no {jk:?} column",
                            view.name,
                            view.join_keys.join(", ")
                        ))
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            key_cols.push(cols);
        }

        // One lookup per (row, view), row-major.
        let features: Vec<Vec<&str>> = sel
            .by_view
            .iter()
            .map(|(vi, fs)| {
                fs.iter()
                    .map(|&f| reg.view(*vi).features[f].name.as_str())
                    .collect()
            })
            .collect();
        let mut keys = Vec::with_capacity(n_rows * sel.by_view.len());
        for row in 0..n_rows {
            for (vpos, (vi, _)) in sel.by_view.iter().enumerate() {
                let view = reg.view(*vi);
                let pairs: Vec<(&str, &Value)> = view
                    .join_keys
                    .iter()
                    .zip(&key_cols[vpos])
                    .map(|(jk, &c)| (jk.as_str(), &req.entities[c].1[row]))
                    .collect();
                keys.push(row_key(&entity_key(&pairs)?, &view.name));
            }
        }
        let is_tiles: Vec<bool> = sel
            .by_view
            .iter()
            .map(|(vi, _)| matches!(reg.view(*vi).source, ViewSource::Aggregations { .. }))
            .collect();
        let lookups: Vec<Lookup> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| {
                let vpos = i % sel.by_view.len();
                if is_tiles[vpos] {
                    Lookup::tiles(k, &[])
                } else {
                    Lookup::row(k, &features[vpos])
                }
            })
            .collect();
        let mut rows = self.timed_store("read", self.store.read(&lookups)).await?;
        if rows.len() != lookups.len() {
            return Err(Error::internal(
                "online store returned a wrong number of rows",
            ));
        }

        // Tile rows become feature rows: the window's tiles combined at `now`.
        for (i, row) in rows.iter_mut().enumerate() {
            let (vi, fs) = &sel.by_view[i % sel.by_view.len()];
            let (Some(r), ViewSource::Aggregations { tile, aggregations }) =
                (row.as_mut(), &reg.view(*vi).source)
            else {
                continue;
            };
            match finish_row(aggregations, *tile, now, fs, &r.raw)? {
                Some((event_ts, values)) => {
                    r.event_ts = event_ts;
                    r.values = values.into_iter().map(Some).collect();
                }
                None => *row = None,
            }
        }
        // Staleness of what is served: the age of each found row, per view.
        for (vpos, (vi, _)) in sel.by_view.iter().enumerate() {
            self.metrics.observe_served_ages(
                &reg.view(*vi).name,
                rows.iter()
                    .skip(vpos)
                    .step_by(sel.by_view.len())
                    .flatten()
                    .map(|r| now.saturating_sub(r.event_ts) as f64 / 1e6),
            );
        }
        let mut columns = Vec::with_capacity(sel.columns.len());
        for c in &sel.columns {
            let vpos = sel
                .by_view
                .iter()
                .position(|(v, _)| *v == c.view)
                .unwrap_or(0);
            let fpos = sel.by_view[vpos]
                .1
                .iter()
                .position(|&f| f == c.feature)
                .unwrap_or(0);
            let max_age = reg.view(c.view).ttl.map(duration_micros);
            let mut col = Column {
                values: Vec::with_capacity(n_rows),
                statuses: Vec::with_capacity(n_rows),
                event_ts: Vec::with_capacity(n_rows),
            };
            for row in 0..n_rows {
                let stored: Option<&mut StoredRow> = rows[row * sel.by_view.len() + vpos].as_mut();
                let (value, status, ts) = match stored {
                    None => (Value::Null, FieldStatus::NotFound, None),
                    Some(s) => {
                        let ts = Some(s.event_ts);
                        match s.values.get_mut(fpos).and_then(Option::take) {
                            None => (Value::Null, FieldStatus::NotFound, ts),
                            Some(Value::Null) => (Value::Null, FieldStatus::NullValue, ts),
                            Some(v) => {
                                let stale =
                                    max_age.is_some_and(|m| now.saturating_sub(s.event_ts) > m);
                                let status = if stale {
                                    FieldStatus::OutsideMaxAge
                                } else {
                                    FieldStatus::Present
                                };
                                (v, status, ts)
                            }
                        }
                    }
                };
                col.values.push(value);
                col.statuses.push(status);
                col.event_ts.push(ts);
            }
            columns.push(col);
        }
        Ok(columns)
    }

    fn output_names(&self, req: &OnlineRequest, sel: &Selection) -> Result<Vec<String>> {
        let mut names: Vec<String> = req.entities.iter().map(|(k, _)| k.clone()).collect();
        let features = self
            .registry
            .output_names(sel, names.clone(), req.full_feature_names)?;
        names.extend(features);
        Ok(names)
    }

    /// Writes feature rows of one view, event-time last-write-wins.
    pub async fn write_features(
        &self,
        caller: &Principal,
        view_name: &str,
        rows: Vec<FeatureRowIn>,
    ) -> Result<WriteOutcome> {
        let reg = &*self.registry;
        let view = reg.view(reg.require_view(view_name)?);
        if !caller.may_use_view(&view.name) {
            return Err(Error::denied(format!(
                "API key {:?} may not write feature view {:?}",
                caller.name(),
                view.name
            )));
        }
        // Views quiver computes keep one history for training and serving;
        // a write from outside would reach only the online store.
        match &view.source {
            ViewSource::Batch => {}
            ViewSource::Aggregations { .. } => {
                return Err(Error::invalid(format!(
                    "feature view {view_name:?} aggregates events; push events (PushEvents, POST /api/v1/events) instead of writing its features"
                )))
            }
            ViewSource::Events { event_types, .. } => {
                return Err(Error::invalid(format!(
                    "feature view {view_name:?} is computed from {} events; push events (PushEvents, POST /api/v1/events) instead of writing its features, so that training sets (built from the event archive) see the same values",
                    event_types.join(", ")
                )))
            }
            ViewSource::Sql { .. } => {
                return Err(Error::invalid(format!(
                    "feature view {view_name:?} is computed by SQL in the batch layer; run `quiver batch run` and `quiver materialize` instead of writing its features, so that training sets (built from its feature table) see the same values"
                )))
            }
            ViewSource::OnDemand { .. } => {
                return Err(Error::invalid(format!(
                    "feature view {view_name:?} is computed at request time from request data and other views; write its inputs instead"
                )))
            }
        }
        if rows.is_empty() {
            return Err(Error::invalid("no rows to write"));
        }
        if rows.len() > self.limits.max_write_rows {
            return Err(too_many("rows", rows.len(), self.limits.max_write_rows));
        }
        let grace = duration_micros(self.expiry_grace);
        let now = self.clock.now_micros();
        let mut expired = 0;
        let mut out = Vec::with_capacity(rows.len());
        for (i, row) in rows.into_iter().enumerate() {
            let at = |m: String| Error::invalid(format!("row {i}: {m}"));
            if row.entity_key.len() != view.join_keys.len() {
                let has: Vec<&str> = row.entity_key.iter().map(|(k, _)| k.as_str()).collect();
                return Err(at(format!(
                    "feature view {:?} is keyed by {}; the row has {}",
                    view.name,
                    view.join_keys.join(", "),
                    if has.is_empty() {
                        "no entity key".to_owned()
                    } else {
                        quote(&has.join(", "))
                    }
                )));
            }
            let mut pairs = Vec::with_capacity(view.join_keys.len());
            for (jk, ty) in view.join_keys.iter().zip(&view.key_types) {
                let v = row
                    .entity_key
                    .iter()
                    .find(|(k, _)| k == jk)
                    .map(|(_, v)| v)
                    .ok_or_else(|| {
                        at(format!(
                            "missing join key {jk:?}; feature view {:?} is keyed by {}",
                            view.name,
                            view.join_keys.join(", ")
                        ))
                    })?;
                check_key_value(jk, *ty, v, i)?;
                pairs.push((jk.as_str(), v));
            }
            let key = row_key(&entity_key(&pairs)?, &view.name);
            let event_ts = row
                .event_ts
                .ok_or_else(|| at("event_timestamp is required".to_owned()))?;
            let mut features: Vec<(String, Value)> = view
                .features
                .iter()
                .map(|f| (f.name.clone(), Value::Null))
                .collect();
            for (name, value) in row.features {
                let fi = view.feature_index(&name).ok_or_else(|| {
                    at(format!(
                        "unknown feature {} in view {:?}; its features: {}",
                        quote(&name),
                        view.name,
                        view.features
                            .iter()
                            .map(|f| f.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                })?;
                let f = &view.features[fi];
                let value = coerce(value, f.value_type)
                    .map_err(|m| at(format!("feature {name:?}: {m}")))?;
                if let (Some(dim), Some(len)) = (f.dimension, value.list_len()) {
                    if len != dim as usize {
                        return Err(at(format!(
                            "feature {name:?} needs exactly {dim} elements, got {len}"
                        )));
                    }
                }
                features[fi].1 = value;
            }
            let expire_at = view.online_expiry(event_ts, grace);
            if expire_at.is_some_and(|e| e <= now) {
                // Stored, it would read as missing at once.
                expired += 1;
                continue;
            }
            out.push(WriteRow {
                key,
                event_ts,
                expire_at,
                features,
            });
        }
        let mut outcome = self.timed_store("write", self.store.write(&out)).await?;
        outcome.expired = expired;
        Ok(outcome)
    }
}

/// The request data the on-demand views `views` read: name, type and the
/// first view declaring it. Two views declaring one name with different
/// types cannot be served together.
fn request_fields<'a>(
    reg: &'a Registry,
    views: &[usize],
) -> Result<Vec<(&'a str, ValueType, &'a str)>> {
    let mut out: Vec<(&str, ValueType, &str)> = Vec::new();
    for &vi in views {
        let view = reg.view(vi);
        let ViewSource::OnDemand { request, .. } = &view.source else {
            continue;
        };
        for r in request {
            match out.iter().find(|(n, _, _)| *n == r.name) {
                Some(&(_, ty, other)) if ty != r.value_type => {
                    return Err(Error::invalid(format!(
                        "on-demand feature views {other:?} and {:?} both read request data {} but as {ty} and {}; request them separately",
                        view.name,
                        quote(&r.name),
                        r.value_type
                    )))
                }
                Some(_) => {}
                None => out.push((r.name.as_str(), r.value_type, view.name.as_str())),
            }
        }
    }
    Ok(out)
}

fn check_key_value(key: &str, ty: ValueType, v: &Value, row: usize) -> Result<()> {
    if v.value_type() == Some(ty) {
        return Ok(());
    }
    Err(Error::invalid(format!(
        "join key {key:?} takes {ty} values; row {row} has {}",
        v.type_name()
    )))
}

fn too_many(what: &str, n: usize, max: usize) -> Error {
    Error::new(
        ErrorKind::ResourceExhausted,
        format!("too many {what}: {n}, the limit is {max}; split the request"),
    )
}
