//! Dialing a coordinator. With TLS configured every connection presents our
//! certificate and accepts only a coordinator certificate of our CA
//! ([`super::verify`]); without it, connections are plaintext.
//!
//! Addresses: `host:port` uses whatever the dialer has; `https://host:port`
//! insists on TLS (an error without certificates, never a silent plaintext
//! connection); `http://host:port` insists on plaintext.

use std::sync::Arc;

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint, Uri};

use super::ClientTls;

/// Why a dial could not even start, or failed.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("{0}")]
    Address(String),
    #[error(transparent)]
    Transport(#[from] tonic::transport::Error),
}

/// How a client reaches coordinators.
#[derive(Clone, Default, Debug)]
pub struct Dialer {
    tls: Option<Arc<ClientTls>>,
}

impl Dialer {
    /// Plaintext connections (loopback and tests).
    pub fn plaintext() -> Dialer {
        Dialer { tls: None }
    }

    /// Mutual TLS with the certificate material in `tls`; a reload of it
    /// applies to connections made afterwards.
    pub fn tls(tls: Arc<ClientTls>) -> Dialer {
        Dialer { tls: Some(tls) }
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    pub fn client_tls(&self) -> Option<&Arc<ClientTls>> {
        self.tls.as_ref()
    }

    /// The endpoint for `addr` with Drover's client settings, and whether
    /// it must be dialled with TLS.
    fn endpoint(&self, addr: &str) -> Result<(Endpoint, bool), DialError> {
        let (rest, use_tls) = if let Some(rest) = addr.strip_prefix("https://") {
            if self.tls.is_none() {
                return Err(DialError::Address(format!(
                    "{addr} asks for TLS, but no client certificate is configured (--cacert, --cert, --key)"
                )));
            }
            (rest, true)
        } else if let Some(rest) = addr.strip_prefix("http://") {
            if self.tls.is_some() {
                return Err(DialError::Address(format!(
                    "{addr} asks for plaintext, but this client is configured for TLS; use host:port or https://"
                )));
            }
            (rest, false)
        } else if addr.contains("://") {
            return Err(DialError::Address(format!(
                "{addr}: the scheme must be http:// or https://"
            )));
        } else {
            (addr, self.tls.is_some())
        };
        let endpoint = crate::grpc::endpoint(&format!("http://{rest}"))?;
        Ok((endpoint, use_tls))
    }

    /// Connects now.
    pub async fn connect(&self, addr: &str) -> Result<Channel, DialError> {
        let (endpoint, use_tls) = self.endpoint(addr)?;
        match (use_tls, &self.tls) {
            (true, Some(tls)) => Ok(endpoint
                .connect_with_connector(connector(tls.clone()))
                .await?),
            _ => Ok(endpoint.connect().await?),
        }
    }

    /// A channel that connects on first use (and reconnects as needed).
    pub fn connect_lazy(&self, addr: &str) -> Result<Channel, DialError> {
        let (endpoint, use_tls) = self.endpoint(addr)?;
        Ok(match (use_tls, &self.tls) {
            (true, Some(tls)) => endpoint.connect_with_connector_lazy(connector(tls.clone())),
            _ => endpoint.connect_lazy(),
        })
    }
}

/// TCP + TLS with the client config in force at each (re)connect.
fn connector(
    tls: Arc<ClientTls>,
) -> impl tower::Service<
    Uri,
    Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
    Error = std::io::Error,
    Future = impl Send,
> + Clone
+ Send
+ 'static {
    tower::service_fn(move |uri: Uri| {
        let connector = TlsConnector::from(tls.current());
        async move {
            let host = uri.host().unwrap_or("localhost").to_string();
            let port = uri.port_u16().unwrap_or(443);
            let tcp = TcpStream::connect((host.trim_matches(['[', ']']), port)).await?;
            tcp.set_nodelay(true)?;
            // The name only feeds SNI: the server is checked by its id.
            let name = ServerName::try_from(host.trim_matches(['[', ']']).to_string())
                .unwrap_or_else(|_| ServerName::try_from("coordinator").expect("static name"));
            let stream = connector.connect(name, tcp).await?;
            Ok(TokioIo::new(stream))
        }
    })
}
