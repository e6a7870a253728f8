//! Traces and logs of every quiver process.
//!
//! [`init`] installs the process's one `tracing` subscriber:
//! - log lines on stderr, filtered by `QUIVER_LOG` (an `EnvFilter`
//!   directive, default `info`), as text or as JSON lines
//!   ([`LogFormat::Json`]) that carry the trace and span ids of the span
//!   they were written in;
//! - when an OTLP endpoint is configured, spans exported over OTLP/gRPC
//!   (OpenTelemetry, batched on a thread of their own), sampled by
//!   [`TelemetrySettings::sampling_ratio`].
//!
//! Trace context crosses processes as W3C Trace Context (`traceparent`,
//! `tracestate`; <https://www.w3.org/TR/trace-context/>): [`trace_request`]
//! decides from gRPC metadata or HTTP headers whether a request is traced
//! and continues the caller's trace,
//! [`inject`] writes a span's context into Kafka message
//! headers, and [`add_links`] links a batch consumer's span to the spans
//! that produced its messages (the OpenTelemetry messaging conventions'
//! batch "process" span).
//!
//! With no endpoint, [`enabled`] is false and quiver creates none of its
//! request spans: tracing off costs a relaxed atomic load per request.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{
    SamplingDecision, SamplingResult, SpanKind, TraceContextExt, TraceId, TraceState,
    TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, ShouldSample};
use opentelemetry_sdk::Resource;
use serde::Deserialize;
use tracing_opentelemetry::{OpenTelemetrySpanExt, OtelData};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

pub use opentelemetry::propagation::{Extractor, Injector};
pub use opentelemetry::trace::SpanContext;

use crate::error::{Error, Result};

/// How log lines are written on stderr.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines (colored on a terminal).
    #[default]
    Text,
    /// One JSON object per line: `timestamp` (RFC 3339, UTC), `level`,
    /// `target`, `message`, the event's fields, `spans` (names, outermost
    /// first) and, inside one of quiver's spans while traces are exported,
    /// `trace_id` and `span_id` (hex, as in `traceparent`).
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!(
                "unknown log format {other:?}; use \"text\" or \"json\""
            )),
        }
    }
}

/// `[telemetry]`: traces and the log format.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetrySettings {
    /// OTLP/gRPC endpoint spans are exported to, e.g.
    /// `http://otel-collector:4317` (`https://` for TLS). Empty: the
    /// standard `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, then
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`; when none is set, no spans are made.
    pub otlp_endpoint: String,
    /// PEM CA certificate(s) trusted for an `https://` endpoint besides the
    /// system's roots.
    pub otlp_ca_file: Option<PathBuf>,
    /// Deadline of one export call.
    #[serde(deserialize_with = "crate::time::deserialize_duration")]
    pub export_timeout: Duration,
    /// Share of new traces recorded, 0.0 to 1.0. A caller's decision (the
    /// sampled flag of its `traceparent`) is always kept, and an ingest
    /// batch holding an event of a sampled trace is always recorded.
    pub sampling_ratio: f64,
    /// OpenTelemetry `service.name`. Empty: `OTEL_SERVICE_NAME`, then
    /// `quiver-<command>` (`quiver-serve`, `quiver-ingest`, ...).
    pub service_name: String,
    /// Log lines as text or JSON.
    pub log_format: LogFormat,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        TelemetrySettings {
            otlp_endpoint: String::new(),
            otlp_ca_file: None,
            export_timeout: Duration::from_secs(10),
            sampling_ratio: 1.0,
            service_name: String::new(),
            log_format: LogFormat::Text,
        }
    }
}

impl TelemetrySettings {
    /// The endpoint spans go to, if any: the configured one, else the
    /// standard OpenTelemetry variables (read through `env`).
    pub fn endpoint(&self, env: &dyn Fn(&str) -> Option<String>) -> Option<String> {
        Some(self.otlp_endpoint.trim().to_owned())
            .filter(|e| !e.is_empty())
            .or_else(|| env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
            .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"))
            .map(|e| e.trim().to_owned())
            .filter(|e| !e.is_empty())
    }

    /// Checks the settings, naming the key at fault.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !(0.0..=1.0).contains(&self.sampling_ratio) {
            return Err(format!(
                "telemetry.sampling_ratio must be between 0.0 and 1.0, got {}",
                self.sampling_ratio
            ));
        }
        if self.export_timeout.is_zero() {
            return Err("telemetry.export_timeout must be more than 0s".into());
        }
        if !self.otlp_endpoint.trim().is_empty() {
            check_endpoint(self.otlp_endpoint.trim())
                .map_err(|e| format!("telemetry.otlp_endpoint: {e}"))?;
        }
        Ok(())
    }
}

/// An OTLP/gRPC endpoint is an `http` or `https` URL with a host.
fn check_endpoint(endpoint: &str) -> std::result::Result<(), String> {
    let url = url::Url::parse(endpoint)
        .map_err(|e| format!("{endpoint:?} is not a URL ({e}); e.g. http://otel-collector:4317"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none_or(str::is_empty) {
        return Err(format!(
            "{endpoint:?} must be http://host:port or https://host:port (OTLP over gRPC)"
        ));
    }
    Ok(())
}

static ENABLED: AtomicBool = AtomicBool::new(false);
/// `sampling_ratio`, as `f64` bits, for [`trace_request`].
static RATIO: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Whether spans are exported: quiver's instrumentation creates its spans
/// only then.
#[inline]
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The installed pipeline; [`Telemetry::shutdown`] exports what is buffered.
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn tracing(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports the spans still queued and stops the exporter. Call it
    /// before the async runtime stops: the gRPC exporter's connection runs
    /// on it.
    ///
    /// The SDK's flush and shutdown each export one batch (at most
    /// `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`, 512 spans) and wait at most 5 s for
    /// it: the queue (`OTEL_BSP_MAX_QUEUE_SIZE`, 2048) is flushed batch by
    /// batch until a flush fails (a collector that is down costs one wait).
    pub fn shutdown(mut self) {
        let Some(p) = self.provider.take() else {
            return;
        };
        ENABLED.store(false, Ordering::Relaxed);
        let setting = |name: &str, default: usize| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .filter(|n| *n > 0)
                .unwrap_or(default)
        };
        let queue = setting("OTEL_BSP_MAX_QUEUE_SIZE", 2048);
        let batch = setting("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512).min(queue);
        let mut result = Ok(());
        for _ in 0..queue.div_ceil(batch) {
            result = p.force_flush();
            if result.is_err() {
                break;
            }
        }
        if let Err(e) = result.and_then(|()| p.shutdown()) {
            tracing::warn!(error = %e, "exporting the last spans failed; they are lost");
        }
    }
}

/// Installs the process's subscriber (see the module docs). `service` is
/// the `service.name` used when neither the settings nor
/// `OTEL_SERVICE_NAME` name one.
///
/// With an endpoint this must run inside a Tokio runtime: the OTLP/gRPC
/// channel is spawned on it.
///
/// # Errors
/// `InvalidArgument` for settings [`TelemetrySettings::validate`] rejects,
/// an unreadable CA file, a bad `QUIVER_LOG`, or an endpoint the exporter
/// cannot use; `Internal` when a subscriber is already installed.
pub fn init(settings: &TelemetrySettings, service: &str) -> Result<Telemetry> {
    init_with(settings, service, &|k| std::env::var(k).ok())
}

/// [`init`] with the environment given.
pub fn init_with(
    settings: &TelemetrySettings,
    service: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Telemetry> {
    settings.validate().map_err(Error::invalid)?;
    let filter = match env("QUIVER_LOG").filter(|d| !d.trim().is_empty()) {
        Some(directives) => tracing_subscriber::EnvFilter::try_new(&directives)
            .map_err(|e| Error::invalid(format!("QUIVER_LOG={directives:?}: {e}")))?,
        None => tracing_subscriber::EnvFilter::new("info"),
    };
    // Each layer filters for itself: QUIVER_LOG chooses log lines only,
    // and quiver's spans reach the exporter whatever it says.
    let quiver_info = || {
        tracing_subscriber::filter::filter_fn(|m| {
            m.target().starts_with("quiver") && *m.level() <= tracing::Level::INFO
        })
    };
    let (otel, provider) = match settings.endpoint(env) {
        Some(endpoint) => {
            let provider = provider(settings, &endpoint, service, env)?;
            let layer = tracing_opentelemetry::layer()
                .with_tracer(provider.tracer("quiver"))
                .with_threads(false)
                .with_tracked_inactivity(false)
                .with_filter(quiver_info());
            (Some(layer), Some(provider))
        }
        None => (None, None),
    };
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match settings.log_format {
        LogFormat::Text => {
            use std::io::IsTerminal;
            fmt.with_ansi(std::io::stderr().is_terminal()).boxed()
        }
        LogFormat::Json => fmt.event_format(JsonLines).boxed(),
    };
    // With traces, log lines also see quiver's spans (their names, and the
    // trace ids of JSON lines) whatever level QUIVER_LOG lets through.
    let fmt = match provider {
        Some(_) => {
            use tracing_subscriber::filter::FilterExt;
            fmt.with_filter(
                filter
                    .or(quiver_info().and(tracing_subscriber::filter::filter_fn(|m| m.is_span()))),
            )
            .boxed()
        }
        None => fmt.with_filter(filter).boxed(),
    };
    tracing_subscriber::registry()
        .with(otel)
        .with(fmt)
        .try_init()
        .map_err(|e| Error::internal(format!("installing the log subscriber: {e}")))?;
    RATIO.store(settings.sampling_ratio.to_bits(), Ordering::Relaxed);
    ENABLED.store(provider.is_some(), Ordering::Relaxed);
    Ok(Telemetry { provider })
}

fn provider(
    settings: &TelemetrySettings,
    endpoint: &str,
    service: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<SdkTracerProvider> {
    use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
    check_endpoint(endpoint).map_err(|e| Error::invalid(format!("OTLP endpoint: {e}")))?;
    let mut builder = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(settings.export_timeout);
    if endpoint.starts_with("https://") {
        let mut tls = tonic::transport::ClientTlsConfig::new().with_native_roots();
        if let Some(path) = &settings.otlp_ca_file {
            let pem = std::fs::read(path).map_err(|e| {
                Error::invalid(format!("telemetry.otlp_ca_file {}: {e}", path.display()))
            })?;
            tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(pem));
        }
        builder = builder.with_tls_config(tls);
    }
    let exporter = builder
        .build()
        .map_err(|e| Error::invalid(format!("OTLP exporter for {endpoint}: {e}")))?;
    let name = Some(settings.service_name.trim().to_owned())
        .filter(|s| !s.is_empty())
        .or_else(|| env("OTEL_SERVICE_NAME").filter(|s| !s.trim().is_empty()))
        .unwrap_or_else(|| service.to_owned());
    let resource = Resource::builder()
        .with_service_name(name)
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(RatioOrLinked::new(
            settings.sampling_ratio,
        ))))
        .with_resource(resource)
        .build())
}

/// The root sampler: a trace-id ratio, except that a span linked to a
/// sampled span is always sampled, so that a sampled request's events are
/// traced through ingest whatever the ingest process's own ratio.
#[derive(Debug, Clone)]
struct RatioOrLinked(Sampler);

impl RatioOrLinked {
    fn new(ratio: f64) -> Self {
        RatioOrLinked(Sampler::TraceIdRatioBased(ratio))
    }
}

impl ShouldSample for RatioOrLinked {
    fn should_sample(
        &self,
        parent: Option<&Context>,
        trace_id: TraceId,
        name: &str,
        kind: &SpanKind,
        attributes: &[KeyValue],
        links: &[opentelemetry::trace::Link],
    ) -> SamplingResult {
        let head_sampled = attributes
            .iter()
            .any(|kv| kv.key.as_str() == HEAD_SAMPLED && kv.value == true.into());
        if head_sampled || links.iter().any(|l| l.span_context.is_sampled()) {
            return SamplingResult {
                decision: SamplingDecision::RecordAndSample,
                attributes: Vec::new(),
                trace_state: TraceState::default(),
            };
        }
        self.0
            .should_sample(parent, trace_id, name, kind, attributes, links)
    }
}

/// The span context of a W3C `traceparent` (and `tracestate`), read as
/// the Trace Context specification says (section 3.2): see [`extract`].
/// The SDK's own parser accepts shorter ids, which would continue another
/// trace, and refuses flags above `02`.
fn parse_traceparent(carrier: &dyn Extractor) -> Option<SpanContext> {
    let value = carrier.get("traceparent")?.trim();
    let parts: Vec<&str> = value.split('-').collect();
    let hex = |p: &str, len: usize| {
        p.len() == len && p.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    let well_formed = parts.len() >= 4
        && hex(parts[0], 2)
        && parts[0] != "ff"
        && (parts[0] != "00" || parts.len() == 4)
        && hex(parts[1], 32)
        && hex(parts[2], 16)
        && hex(parts[3], 2);
    if !well_formed {
        return None;
    }
    let trace_id = TraceId::from_hex(parts[1]).ok()?;
    let span_id = opentelemetry::trace::SpanId::from_hex(parts[2]).ok()?;
    let flags = u8::from_str_radix(parts[3], 16).ok()?;
    // At most 32 members (the specification's limit, 3.3.1.1) and 512
    // bytes (what it asks vendors to propagate at least): a bigger one is
    // dropped, not copied onto every span of the trace.
    let state = carrier
        .get("tracestate")
        .filter(|s| s.len() <= 512 && s.split(',').count() <= 32)
        .and_then(|s| s.parse::<TraceState>().ok())
        .unwrap_or_default();
    let sc = SpanContext::new(
        trace_id,
        span_id,
        opentelemetry::trace::TraceFlags::new(flags) & opentelemetry::trace::TraceFlags::SAMPLED,
        true,
        state,
    );
    sc.is_valid().then_some(sc)
}

/// The span field that marks a request's root span as sampled by
/// [`trace_request`] (the root sampler follows it).
pub const HEAD_SAMPLED: &str = "quiver.head_sampled";

/// Whether and how a request is traced, decided before any span exists
/// (see [`trace_request`]).
#[derive(Debug, Clone, PartialEq)]
pub enum RequestTrace {
    /// No spans: traces are off, the caller's trace is not sampled, or
    /// the ratio did not pick the request.
    Untraced,
    /// A new trace, picked at the sampling ratio: its root span carries
    /// `HEAD_SAMPLED = true`.
    Root,
    /// A child of the caller's sampled span.
    Child(SpanContext),
}

impl RequestTrace {
    /// Makes `span` continue the caller's trace (for [`RequestTrace::Child`]).
    pub fn apply(&self, span: &tracing::Span) {
        if let RequestTrace::Child(sc) = self {
            span.set_parent(Context::new().with_remote_span_context(sc.clone()));
        }
    }
}

/// Decides whether a request with these headers (gRPC metadata, HTTP) is
/// traced: a valid caller `traceparent` (see [`extract`]) decides as the
/// caller sampled it; without one the request is picked at
/// `sampling_ratio`. A request not traced makes no span at all, so that a
/// low ratio costs little more than traces off (the SDK would otherwise
/// build every span's data and drop it at the end).
pub fn trace_request(carrier: &dyn Extractor) -> RequestTrace {
    if !enabled() {
        return RequestTrace::Untraced;
    }
    decide(carrier, f64::from_bits(RATIO.load(Ordering::Relaxed)))
}

/// [`trace_request`] once traces are on.
fn decide(carrier: &dyn Extractor, ratio: f64) -> RequestTrace {
    match extract(carrier) {
        Some(sc) if sc.is_sampled() => RequestTrace::Child(sc),
        Some(_) => RequestTrace::Untraced,
        None => {
            let picked = ratio >= 1.0
                || (ratio > 0.0 && {
                    use opentelemetry_sdk::trace::IdGenerator;
                    let draw = opentelemetry_sdk::trace::RandomIdGenerator::default().new_span_id();
                    (u64::from_be_bytes(draw.to_bytes()) as f64) < ratio * u64::MAX as f64
                });
            if picked {
                RequestTrace::Root
            } else {
                RequestTrace::Untraced
            }
        }
    }
}

/// The span context a carrier's W3C `traceparent` and `tracestate` name,
/// if the `traceparent` is valid. It must have the specification's form
/// (section 3.2): `version-trace_id-parent_id-flags` in 2, 32, 16 and 2
/// lowercase hex digits, not version `ff`, exactly four fields for
/// version `00`, ids not all zero. Only the `sampled` flag is kept (a
/// level-2 `random` flag, `03`, is followed too). Anything else is none:
/// the request starts a trace of its own.
pub fn extract(carrier: &dyn Extractor) -> Option<SpanContext> {
    parse_traceparent(carrier)
}

/// Writes `span`'s W3C context into `carrier` (nothing for a span that is
/// not traced).
pub fn inject(span: &tracing::Span, carrier: &mut dyn Injector) {
    let cx = span.context();
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&cx, carrier);
    }
}

/// `make()` inside a sampled span of quiver's (a request's, a batch's),
/// else a disabled span: the client spans of a request (online store,
/// Kafka) exist only when the request is traced, never as roots of their
/// own.
pub fn child_span(make: impl FnOnce() -> tracing::Span) -> tracing::Span {
    if !enabled() {
        return tracing::Span::none();
    }
    let current = tracing::Span::current();
    if current.is_none() || !current.context().span().span_context().is_sampled() {
        return tracing::Span::none();
    }
    make()
}

/// Writes a span context (e.g. one read from a message) into `carrier`.
pub fn inject_context(sc: &SpanContext, carrier: &mut dyn Injector) {
    if sc.is_valid() {
        let cx = Context::new().with_remote_span_context(sc.clone());
        TraceContextPropagator::new().inject_context(&cx, carrier);
    }
}

/// `make()` when spans are exported, else a disabled span: quiver's spans
/// cost nothing with tracing off.
#[inline]
pub fn span(make: impl FnOnce() -> tracing::Span) -> tracing::Span {
    if enabled() {
        make()
    } else {
        tracing::Span::none()
    }
}

/// Marks `span` as failed (OpenTelemetry status `Error`) with a
/// description.
pub fn set_error(span: &tracing::Span, description: impl Into<std::borrow::Cow<'static, str>>) {
    span.set_status(opentelemetry::trace::Status::error(description));
}

/// Runs `fut` inside `span`, marking the span failed with the error's
/// message when it returns one.
pub async fn in_span<T>(
    span: &tracing::Span,
    fut: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    use tracing::Instrument;
    let result = fut.instrument(span.clone()).await;
    if let Err(e) = &result {
        set_error(span, e.message().to_owned());
    }
    result
}

/// A count as a span attribute: tracing-opentelemetry records `u64`
/// fields as text, `i64` as integers (saturating past `i64::MAX`).
pub fn int(n: impl TryInto<i64>) -> i64 {
    n.try_into().unwrap_or(i64::MAX)
}

/// Most links one span carries (the OpenTelemetry SDK's default limit).
pub const MAX_LINKS: usize = 128;

/// Links `span` to each distinct valid context of `contexts`, at most
/// [`MAX_LINKS`] (sampled ones first); returns how many were left out.
/// Call it right after creating `span`, before its children: sampling
/// considers the links.
pub fn add_links(span: &tracing::Span, contexts: impl IntoIterator<Item = SpanContext>) -> usize {
    let mut seen = std::collections::HashSet::new();
    let (mut sampled, mut other) = (Vec::new(), Vec::new());
    for sc in contexts {
        if !sc.is_valid() || !seen.insert((sc.trace_id(), sc.span_id())) {
            continue;
        }
        let to = if sc.is_sampled() {
            &mut sampled
        } else {
            &mut other
        };
        if to.len() < MAX_LINKS {
            to.push(sc);
        }
    }
    let kept = sampled.into_iter().chain(other).take(MAX_LINKS);
    let mut linked = 0;
    for sc in kept {
        span.add_link(sc);
        linked += 1;
    }
    seen.len() - linked
}

/// The trace and span id of a span, as tracing-opentelemetry records them.
fn ids(data: &OtelData) -> Option<(TraceId, opentelemetry::trace::SpanId)> {
    let trace_id = if data.parent_cx.has_active_span() {
        data.parent_cx.span().span_context().trace_id()
    } else {
        data.builder.trace_id?
    };
    Some((trace_id, data.builder.span_id?))
}

/// [`LogFormat::Json`]'s event formatter.
struct JsonLines;

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for JsonLines
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        // Records of the `log` crate (librdkafka's, rustls') under their own
        // target, as tracing-subscriber's formatters show them.
        let normalized = tracing_log::NormalizeEvent::normalized_metadata(event);
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        let mut line = serde_json::Map::new();
        line.insert(
            "timestamp".into(),
            crate::time::format_rfc3339(crate::time::system_time_to_micros(
                std::time::SystemTime::now(),
            ))
            .into(),
        );
        line.insert("level".into(), meta.level().as_str().into());
        line.insert("target".into(), meta.target().into());
        event.record(&mut JsonFields(&mut line));
        if let Some(current) = ctx.lookup_current() {
            let scope: Vec<_> = current.scope().from_root().collect();
            let names: Vec<serde_json::Value> = scope.iter().map(|s| s.name().into()).collect();
            line.insert("spans".into(), names.into());
            if let Some((trace_id, span_id)) = current.extensions().get::<OtelData>().and_then(ids)
            {
                line.insert("trace_id".into(), trace_id.to_string().into());
                line.insert("span_id".into(), span_id.to_string().into());
            }
        }
        let text = serde_json::to_string(&line).map_err(|_| std::fmt::Error)?;
        writeln!(writer, "{text}")
    }
}

/// Keys of a JSON log line that an event's own fields may not take.
const RESERVED: [&str; 6] = [
    "timestamp",
    "level",
    "target",
    "spans",
    "trace_id",
    "span_id",
];

struct JsonFields<'a>(&'a mut serde_json::Map<String, serde_json::Value>);

impl JsonFields<'_> {
    fn put(&mut self, field: &tracing::field::Field, value: serde_json::Value) {
        let name = field.name();
        if name.starts_with("log.") {
            // A `log` record's metadata, already in target/level.
            return;
        }
        let key = if RESERVED.contains(&name) {
            format!("field.{name}")
        } else {
            name.to_owned()
        };
        self.0.insert(key, value);
    }
}

impl tracing::field::Visit for JsonFields<'_> {
    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        let v = serde_json::Number::from_f64(value)
            .map(serde_json::Value::Number)
            .unwrap_or_else(|| value.to_string().into());
        self.put(field, v);
    }
    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.put(field, value.into());
    }
    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.put(field, value.into());
    }
    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.put(field, value.into());
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.put(field, value.into());
    }
    fn record_error(
        &mut self,
        field: &tracing::field::Field,
        value: &(dyn std::error::Error + 'static),
    ) {
        self.put(field, value.to_string().into());
    }
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.put(field, format!("{value:?}").into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanId, TraceFlags};

    fn sc(trace: u128, span: u64, sampled: bool) -> SpanContext {
        let flags = if sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        SpanContext::new(
            TraceId::from(trace),
            SpanId::from(span),
            flags,
            true,
            TraceState::default(),
        )
    }

    fn root_decision(ratio: f64, links: &[SpanContext]) -> SamplingDecision {
        let links: Vec<_> = links
            .iter()
            .map(|s| opentelemetry::trace::Link::with_context(s.clone()))
            .collect();
        RatioOrLinked::new(ratio)
            .should_sample(
                None,
                TraceId::from(u128::MAX / 3),
                "ingest.batch",
                &SpanKind::Consumer,
                &[],
                &links,
            )
            .decision
    }

    #[test]
    fn a_link_to_a_sampled_span_samples_whatever_the_ratio() {
        assert_eq!(root_decision(0.0, &[]), SamplingDecision::Drop);
        assert_eq!(root_decision(1.0, &[]), SamplingDecision::RecordAndSample);
        assert_eq!(
            root_decision(0.0, &[sc(1, 1, false)]),
            SamplingDecision::Drop
        );
        assert_eq!(
            root_decision(0.0, &[sc(1, 1, false), sc(2, 2, true)]),
            SamplingDecision::RecordAndSample
        );
    }

    #[test]
    fn a_head_sampled_request_root_is_sampled_whatever_the_ratio() {
        let decision = RatioOrLinked::new(0.0)
            .should_sample(
                None,
                TraceId::from(7u128),
                "grpc request",
                &SpanKind::Server,
                &[KeyValue::new(HEAD_SAMPLED, true)],
                &[],
            )
            .decision;
        assert_eq!(decision, SamplingDecision::RecordAndSample);
    }

    #[test]
    fn requests_are_traced_as_the_caller_says_or_at_the_ratio() {
        use std::collections::HashMap;
        let none: HashMap<String, String> = HashMap::new();
        let with = |tp: &str| HashMap::from([("traceparent".to_owned(), tp.to_owned())]);
        let sampled = with("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let unsampled = with("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00");
        let malformed = with("00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01");
        assert_eq!(decide(&none, 0.0), RequestTrace::Untraced);
        assert_eq!(decide(&none, 1.0), RequestTrace::Root);
        assert_eq!(decide(&malformed, 1.0), RequestTrace::Root);
        assert_eq!(decide(&unsampled, 1.0), RequestTrace::Untraced);
        match decide(&sampled, 0.0) {
            RequestTrace::Child(sc) => {
                assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7")
            }
            other => panic!("{other:?}"),
        }
        // 10,000 draws at 5%: 500 expected, standard deviation about 22.
        let picked = (0..10_000)
            .filter(|_| decide(&none, 0.05) == RequestTrace::Root)
            .count();
        assert!((350..650).contains(&picked), "{picked}");
        // Traces off: nothing is traced, whatever the caller says.
        assert_eq!(trace_request(&sampled), RequestTrace::Untraced);
    }

    #[test]
    fn links_are_distinct_and_bounded() {
        let span = tracing::Span::none();
        let mut contexts: Vec<SpanContext> = (0..300)
            .map(|i| sc(i as u128 + 1, 7, i % 100 == 0))
            .collect();
        contexts.extend(contexts.clone());
        contexts.push(SpanContext::empty_context());
        // 300 distinct valid contexts, 128 linked.
        assert_eq!(add_links(&span, contexts), 300 - MAX_LINKS);
        assert_eq!(add_links(&span, vec![sc(1, 1, true), sc(1, 1, true)]), 0);
    }

    #[test]
    fn traceparent_round_trips_and_rejects_garbage() {
        use std::collections::HashMap;
        let mut headers = HashMap::new();
        headers.insert(
            "traceparent".to_owned(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned(),
        );
        let got = extract(&headers).unwrap();
        assert_eq!(
            got.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(got.span_id().to_string(), "00f067aa0ba902b7");
        assert!(got.is_sampled() && got.is_remote());
        // A later version may append fields (W3C Trace Context, 4.3).
        headers.insert(
            "traceparent".to_owned(),
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-later".to_owned(),
        );
        let got = extract(&headers).unwrap();
        assert!(!got.is_sampled());
        for bad in [
            "",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "zz-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "not a traceparent",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b-01",
        ] {
            headers.insert("traceparent".to_owned(), bad.to_owned());
            assert!(extract(&headers).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn settings_are_checked_by_key() {
        let ok = TelemetrySettings {
            otlp_endpoint: "http://collector:4317".into(),
            ..Default::default()
        };
        assert_eq!(ok.validate(), Ok(()));
        for (s, want) in [
            (
                TelemetrySettings {
                    sampling_ratio: 1.5,
                    ..Default::default()
                },
                "telemetry.sampling_ratio",
            ),
            (
                TelemetrySettings {
                    sampling_ratio: f64::NAN,
                    ..Default::default()
                },
                "telemetry.sampling_ratio",
            ),
            (
                TelemetrySettings {
                    otlp_endpoint: "collector:4317".into(),
                    ..Default::default()
                },
                "telemetry.otlp_endpoint",
            ),
            (
                TelemetrySettings {
                    otlp_endpoint: "ftp://collector:4317".into(),
                    ..Default::default()
                },
                "telemetry.otlp_endpoint",
            ),
        ] {
            let e = s.validate().unwrap_err();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn the_endpoint_falls_back_to_the_standard_variables() {
        let none = TelemetrySettings::default();
        assert_eq!(none.endpoint(&|_| None), None);
        let env =
            |k: &str| (k == "OTEL_EXPORTER_OTLP_ENDPOINT").then(|| "http://c:4317".to_owned());
        assert_eq!(none.endpoint(&env).as_deref(), Some("http://c:4317"));
        let traces = |k: &str| match k {
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT" => Some("http://t:4317".to_owned()),
            "OTEL_EXPORTER_OTLP_ENDPOINT" => Some("http://c:4317".to_owned()),
            _ => None,
        };
        assert_eq!(none.endpoint(&traces).as_deref(), Some("http://t:4317"));
        let configured = TelemetrySettings {
            otlp_endpoint: "http://mine:4317".into(),
            ..Default::default()
        };
        assert_eq!(
            configured.endpoint(&traces).as_deref(),
            Some("http://mine:4317")
        );
    }

    #[test]
    fn json_lines_carry_fields_spans_and_trace_ids() {
        use std::sync::{Arc, Mutex};
        use tracing_subscriber::fmt::MakeWriter;

        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        impl<'a> MakeWriter<'a> for Buf {
            type Writer = Buf;
            fn make_writer(&'a self) -> Buf {
                self.clone()
            }
        }

        let buf = Buf::default();
        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("t")))
            .with(
                tracing_subscriber::fmt::layer()
                    .event_format(JsonLines)
                    .with_writer(buf.clone()),
            );
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(count = 3u64, "outside");
            let parent = tracing::info_span!("request");
            let caller = extract(&std::collections::HashMap::from([(
                "traceparent".to_owned(),
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned(),
            )]))
            .unwrap();
            RequestTrace::Child(caller).apply(&parent);
            let _p = parent.enter();
            let child = tracing::info_span!("online_store");
            let _c = child.enter();
            tracing::warn!(level = "shadowed", ratio = 0.5, ok = true, "inside");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[0]["message"], "outside");
        assert_eq!(lines[0]["count"], 3);
        assert_eq!(lines[0]["level"], "INFO");
        assert!(lines[0].get("trace_id").is_none());
        let inside = &lines[1];
        assert_eq!(inside["level"], "WARN");
        assert_eq!(inside["field.level"], "shadowed");
        assert_eq!(inside["ratio"], 0.5);
        assert_eq!(inside["ok"], true);
        assert_eq!(
            inside["spans"],
            serde_json::json!(["request", "online_store"])
        );
        assert_eq!(inside["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        let span_id = inside["span_id"].as_str().unwrap();
        assert_eq!(span_id.len(), 16);
        assert_ne!(span_id, "00f067aa0ba902b7");
        assert!(crate::time::parse_rfc3339(inside["timestamp"].as_str().unwrap()).is_ok());
    }
}
