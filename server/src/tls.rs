//! TLS for both listeners (rustls with the ring provider), optionally
//! mutual: certificate and key from PEM files, read again when they change
//! and on SIGHUP (a renewed certificate is served to new connections
//! without a restart); with a client CA, every client must present a
//! certificate it signed.
//!
//! [`incoming`] turns a listener into a stream of connections (plain, or
//! TLS once the handshake is done: handshakes run in their own tasks with a
//! deadline, so a client that stalls one does not hold up others).

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::auth::Transport;
use crate::watch::{Files, Reload};

/// How long a client has to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The `[server.tls]` settings.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// PEM certificate chain, the server's certificate first.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// PEM CA certificates; when set, clients must present a certificate
    /// signed by one of them (mutual TLS).
    pub client_ca_file: Option<PathBuf>,
    /// How often the files are checked for changes.
    pub reload_interval: Duration,
}

struct Configs {
    /// ALPN h2 only: gRPC is HTTP/2.
    grpc: Arc<ServerConfig>,
    /// ALPN h2 and http/1.1.
    http: Arc<ServerConfig>,
}

/// The server's TLS configuration, reloadable.
pub struct Tls {
    settings: TlsSettings,
    configs: ArcSwap<Configs>,
    files: Files,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("cert_file", &self.settings.cert_file)
            .field("client_ca_file", &self.settings.client_ca_file)
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// Loads the certificate, key and client CA.
    ///
    /// # Errors
    /// A message naming the file: unreadable, no PEM certificate or key in
    /// it, a key that does not match the certificate, an empty CA file.
    pub fn new(settings: TlsSettings) -> Result<Tls, String> {
        let mut paths = vec![settings.cert_file.clone(), settings.key_file.clone()];
        paths.extend(settings.client_ca_file.iter().cloned());
        let files = Files::new(paths);
        let versions = files.versions();
        let configs = load(&settings)?;
        files.mark(versions);
        Ok(Tls {
            settings,
            configs: ArcSwap::from_pointee(configs),
            files,
        })
    }

    /// Reads the files again when they change and on SIGHUP, until `stop`.
    pub fn watch(self: Arc<Self>, stop: impl Future<Output = ()> + Send + 'static) {
        let every = self.settings.reload_interval;
        crate::watch::watch(self, every, stop);
    }

    fn acceptor(&self, transport: Transport) -> tokio_rustls::TlsAcceptor {
        let c = self.configs.load();
        tokio_rustls::TlsAcceptor::from(match transport {
            Transport::Grpc => c.grpc.clone(),
            Transport::Http => c.http.clone(),
        })
    }
}

impl Reload for Tls {
    const WHAT: &'static str = "TLS certificate";

    fn files(&self) -> &Files {
        &self.files
    }

    fn reload(&self) -> Result<String, String> {
        let versions = self.files.versions();
        let result = load(&self.settings);
        self.files.mark(versions);
        self.configs.store(Arc::new(result?));
        Ok(format!(
            "certificate {} in force for new connections",
            self.settings.cert_file.display()
        ))
    }
}

fn load(s: &TlsSettings) -> Result<Configs, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = read_certs(&s.cert_file, "server.tls.cert_file")?;
    let key = PrivateKeyDer::from_pem_file(&s.key_file).map_err(|e| {
        format!(
            "server.tls.key_file {}: no readable PEM private key ({e})",
            s.key_file.display()
        )
    })?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let builder = match &s.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for c in read_certs(path, "server.tls.client_ca_file")? {
                roots
                    .add(c)
                    .map_err(|e| format!("server.tls.client_ca_file {}: {e}", path.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("server.tls.client_ca_file {}: {e}", path.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut http = builder.with_single_cert(certs, key).map_err(|e| {
        format!(
            "server.tls.cert_file {} and key_file {}: {e}",
            s.cert_file.display(),
            s.key_file.display()
        )
    })?;
    let mut grpc = http.clone();
    grpc.alpn_protocols = vec![b"h2".to_vec()];
    http.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Configs {
        grpc: Arc::new(grpc),
        http: Arc::new(http),
    })
}

fn read_certs(
    path: &std::path::Path,
    setting: &str,
) -> Result<Vec<CertificateDer<'static>>, String> {
    let bad = |e: String| format!("{setting} {}: {e}", path.display());
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(format!("cannot read ({e})")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not PEM certificates ({e})")))?;
    if certs.is_empty() {
        return Err(bad("holds no PEM certificate".to_owned()));
    }
    Ok(certs)
}

/// An accepted connection: plain TCP, or TLS after a finished handshake.
#[derive(Debug)]
pub enum Conn {
    /// No TLS.
    Plain(TcpStream),
    /// TLS (boxed: the session state is large).
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        match self {
            Conn::Plain(s) => s.connect_info(),
            Conn::Tls(s) => s.get_ref().0.connect_info(),
        }
    }
}

/// The connections of `listener` (TCP_NODELAY set: small RPCs would wait
/// for Nagle's algorithm), through TLS when `tls` is given. Accept errors
/// (out of file descriptors) and failed handshakes (a client without a
/// valid certificate) are logged and skipped; the stream ends when its
/// receiver is dropped.
pub fn incoming(
    listener: TcpListener,
    tls: Option<Arc<Tls>>,
    transport: Transport,
) -> ReceiverStream<io::Result<Conn>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Conn>>(256);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = tx.closed() => return,
                a = listener.accept() => a,
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            match &tls {
                None => {
                    if tx.send(Ok(Conn::Plain(stream))).await.is_err() {
                        return;
                    }
                }
                Some(tls) => {
                    let acceptor = tls.acceptor(transport);
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
                        {
                            Ok(Ok(s)) => {
                                let _ = tx.send(Ok(Conn::Tls(Box::new(s)))).await;
                            }
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "TLS handshake failed")
                            }
                            Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                        }
                    });
                }
            }
        }
    });
    ReceiverStream::new(rx)
}
