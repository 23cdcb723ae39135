//! The coordinator's listener: accepts TCP connections, runs each TLS
//! handshake on its own task (a slow or hostile client never holds up the
//! others, and a reconnect storm handshakes on every core), and hands tonic
//! connections that carry their [`PeerInfo`].
//!
//! Handlers read the peer with `request.extensions().get::<PeerInfo>()`.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;
use tracing::{debug, warn};

use super::ServerTls;
use super::identity::PeerCert;

/// A handshake that takes longer than this is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Who is on the other end of a connection.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub remote: SocketAddr,
    /// The verified certificate's identity; `None` on a plaintext listener.
    pub cert: Option<Arc<PeerCert>>,
}

/// One accepted connection, plaintext or TLS.
pub enum PeerConn {
    Plain(TcpStream, PeerInfo),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>, PeerInfo),
}

impl Connected for PeerConn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        match self {
            PeerConn::Plain(_, info) | PeerConn::Tls(_, info) => info.clone(),
        }
    }
}

impl AsyncRead for PeerConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PeerConn::Plain(s, _) => Pin::new(s).poll_read(cx, buf),
            PeerConn::Tls(s, _) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for PeerConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            PeerConn::Plain(s, _) => Pin::new(s).poll_write(cx, buf),
            PeerConn::Tls(s, _) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PeerConn::Plain(s, _) => Pin::new(s).poll_flush(cx),
            PeerConn::Tls(s, _) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PeerConn::Plain(s, _) => Pin::new(s).poll_shutdown(cx),
            PeerConn::Tls(s, _) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            PeerConn::Plain(s, _) => Pin::new(s).poll_write_vectored(cx, bufs),
            PeerConn::Tls(s, _) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            PeerConn::Plain(s, _) => s.is_write_vectored(),
            PeerConn::Tls(s, _) => s.is_write_vectored(),
        }
    }
}

/// How a TLS handshake ended, for the caller's metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handshake {
    Accepted,
    Refused,
}

/// Told of every handshake's outcome.
pub type HandshakeObserver = Arc<dyn Fn(Handshake) + Send + Sync>;

/// Accepts connections on `listener` until `stop` and yields them to tonic.
/// With `tls`, each connection must complete a mutual TLS handshake with
/// the config in force when it arrived; refusals are logged with the reason.
pub fn incoming(
    listener: TcpListener,
    tls: Option<Arc<ServerTls>>,
    observe: HandshakeObserver,
    stop: CancellationToken,
) -> ReceiverStream<io::Result<PeerConn>> {
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                _ = stop.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and friends: back off briefly, keep serving.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let tx = tx.clone();
            let Some(tls) = &tls else {
                let info = PeerInfo { remote, cert: None };
                if tx.send(Ok(PeerConn::Plain(tcp, info))).await.is_err() {
                    return;
                }
                continue;
            };
            let acceptor = TlsAcceptor::from(tls.current());
            let observe = observe.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let cert = stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .and_then(|c| PeerCert::from_der(c).ok())
                            .map(Arc::new);
                        observe(Handshake::Accepted);
                        debug!(%remote, peer = ?cert.as_ref().map(|c| c.id.to_string()), "TLS handshake done");
                        let info = PeerInfo { remote, cert };
                        let _ = tx.send(Ok(PeerConn::Tls(Box::new(stream), info))).await;
                    }
                    Ok(Err(e)) => {
                        observe(Handshake::Refused);
                        warn!(%remote, reason = %e, "TLS handshake refused");
                    }
                    Err(_) => {
                        observe(Handshake::Refused);
                        warn!(%remote, timeout = ?HANDSHAKE_TIMEOUT, "TLS handshake refused: too slow");
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
