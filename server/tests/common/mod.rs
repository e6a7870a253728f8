//! Starts a real quiver server (gRPC + REST on ephemeral ports) over a real
//! online store, for integration tests.

#![allow(dead_code)]

pub mod offline;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quiver_batch::Offline;
use quiver_core::event::EventSink;
use quiver_core::store::{EmbeddedStore, RedisClusterStore, RedisConfig, RedisStore};
use quiver_core::{Clock, ManualClock, OnlineStore, Registry};
use quiver_proto::FeatureServiceClient;
use quiver_server::auth::{AuthSettings, Authenticator};
use quiver_server::{FeatureServer, Limits, Metrics};
use quiver_testkit::{RedisCluster, RedisServer};
use tokio::net::TcpListener;
use tonic::transport::Channel;

pub const REGISTRY: &str = include_str!("../../../registry/features.toml");

/// Real time in microseconds.
pub fn now() -> i64 {
    quiver_core::time::system_time_to_micros(std::time::SystemTime::now())
}

/// Records pushed events instead of appending them to Kafka.
#[derive(Default)]
pub struct Recorder(pub std::sync::Mutex<Vec<quiver_core::event::Event>>);

#[async_trait::async_trait]
impl EventSink for Recorder {
    async fn publish(
        &self,
        events: &[quiver_core::event::Event],
    ) -> quiver_core::Result<Vec<quiver_core::Result<()>>> {
        self.0.lock().unwrap().extend_from_slice(events);
        Ok(events.iter().map(|_| Ok(())).collect())
    }
}

pub enum Backend {
    Redis(RedisServer),
    Cluster(RedisCluster),
    Embedded(tempfile::TempDir),
}

pub struct TestServer {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub clock: Arc<ManualClock>,
    pub backend: Backend,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

pub fn redis_store(redis: &RedisServer, timeout: Duration) -> Arc<dyn OnlineStore> {
    Arc::new(
        RedisStore::new(&RedisConfig {
            url: redis.url(),
            pool_size: 8,
            timeout,
            tls: Default::default(),
        })
        .unwrap(),
    )
}

impl TestServer {
    pub async fn redis() -> TestServer {
        Self::redis_with(Limits::default()).await
    }

    pub async fn redis_with(limits: Limits) -> TestServer {
        let redis = RedisServer::start();
        let store = redis_store(&redis, Duration::from_millis(300));
        Self::start(store, Backend::Redis(redis), limits).await
    }

    pub async fn redis_cluster() -> TestServer {
        let cluster = RedisCluster::start(3);
        let store = Arc::new(
            RedisClusterStore::new(&cluster.urls(), Duration::from_secs(2), &Default::default())
                .unwrap(),
        );
        Self::start(store, Backend::Cluster(cluster), Limits::default()).await
    }

    pub async fn embedded() -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let clock: Arc<dyn Clock> = Arc::new(quiver_core::SystemClock);
        let store = Arc::new(EmbeddedStore::open(&dir.path().join("online.redb"), clock).unwrap());
        Self::start(store, Backend::Embedded(dir), Limits::default()).await
    }

    pub async fn start(
        store: Arc<dyn OnlineStore>,
        backend: Backend,
        limits: Limits,
    ) -> TestServer {
        Self::start_with_events(store, backend, limits, None).await
    }

    /// A server whose `PushEvents` appends to `sink`.
    pub async fn start_with_events(
        store: Arc<dyn OnlineStore>,
        backend: Backend,
        limits: Limits,
        sink: Option<Arc<dyn EventSink>>,
    ) -> TestServer {
        let registry = Arc::new(Registry::from_toml("registry/features.toml", REGISTRY).unwrap());
        Self::start_full(registry, store, backend, limits, sink, None).await
    }

    /// A server over `registry` whose `GetHistoricalFeatures` reads `offline`.
    pub async fn start_full(
        registry: Arc<Registry>,
        store: Arc<dyn OnlineStore>,
        backend: Backend,
        limits: Limits,
        sink: Option<Arc<dyn EventSink>>,
        offline: Option<Arc<Offline>>,
    ) -> TestServer {
        Self::start_with_auth(registry, store, backend, limits, sink, offline, None).await
    }

    /// [`TestServer::start_full`] requiring the API keys of `auth`.
    pub async fn start_with_auth(
        registry: Arc<Registry>,
        store: Arc<dyn OnlineStore>,
        backend: Backend,
        limits: Limits,
        sink: Option<Arc<dyn EventSink>>,
        offline: Option<Arc<Offline>>,
        auth: Option<AuthSettings>,
    ) -> TestServer {
        let clock = Arc::new(ManualClock::new(now()));
        let mut service = FeatureServer::new(
            registry,
            store,
            clock.clone(),
            limits,
            Duration::from_secs(86_400),
            Arc::new(Metrics::new()),
        );
        if let Some(sink) = sink {
            service = service.with_event_sink(sink);
        }
        if let Some(offline) = offline {
            service = service.with_offline(offline);
        }
        if let Some(settings) = auth {
            service = service.with_auth(Arc::new(
                Authenticator::new(settings, clock.clone()).unwrap(),
            ));
        }
        let service = Arc::new(service);
        let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (grpc_addr, http_addr) = (grpc.local_addr().unwrap(), http.local_addr().unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            quiver_server::run(service, grpc, http, Duration::from_millis(50), async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        TestServer {
            grpc_addr,
            http_addr,
            clock,
            backend,
            stop: Some(tx),
            task,
        }
    }

    pub async fn client(&self) -> FeatureServiceClient<Channel> {
        FeatureServiceClient::connect(format!("http://{}", self.grpc_addr))
            .await
            .unwrap()
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.grpc_addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http_addr)
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics(&self) -> String {
        reqwest::get(self.url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub fn redis_server(&mut self) -> &mut RedisServer {
        match &mut self.backend {
            Backend::Redis(r) => r,
            _ => panic!("not a single-redis-backed server"),
        }
    }

    /// Signals shutdown and waits until both listeners have drained.
    pub async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), &mut self.task)
            .await
            .expect("server did not shut down within 10 s")
            .unwrap();
    }
}
