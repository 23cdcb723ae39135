//! One webhook POST: hyper's HTTP/1 client over a TCP stream, or over
//! rustls (Mozilla's roots from webpki-roots) for https. A delivery is a
//! success only on a 2xx answer within the timeout.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Request, Uri};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// POSTs `body` with `headers` to `url`; Ok with the status on 2xx, else
/// why not (the status and the start of the answer, or the error).
pub async fn post(
    url: &str,
    headers: &[(&str, String)],
    body: Vec<u8>,
    timeout: Duration,
) -> Result<u16, String> {
    tokio::time::timeout(timeout, post_now(url, headers, body))
        .await
        .map_err(|_| format!("no answer within {}", humantime::format_duration(timeout)))?
}

async fn post_now(url: &str, headers: &[(&str, String)], body: Vec<u8>) -> Result<u16, String> {
    let uri: Uri = url.parse().map_err(|e| format!("bad url: {e}"))?;
    let host = uri.host().ok_or("the url has no host")?.to_string();
    let https = uri.scheme_str() == Some("https");
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let tcp = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| format!("connecting to {host}:{port}: {e}"))?;
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    let mut req = Request::post(path)
        .header(
            hyper::header::HOST,
            uri.authority().map_or(host.clone(), |a| a.to_string()),
        )
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(
            hyper::header::USER_AGENT,
            concat!("drover/", env!("CARGO_PKG_VERSION")),
        );
    for (name, value) in headers {
        req = req.header(*name, value);
    }
    let req = req
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| format!("building the request: {e}"))?;
    if https {
        let name = rustls::pki_types::ServerName::try_from(host.clone())
            .map_err(|e| format!("{host}: {e}"))?;
        let tls = tokio_rustls::TlsConnector::from(client_config())
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS with {host}: {e}"))?;
        send(tls, req).await
    } else {
        send(tcp, req).await
    }
}

async fn send<S>(stream: S, req: Request<Full<Bytes>>) -> Result<u16, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    tokio::spawn(conn);
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("sending: {e}"))?;
    let status = resp.status();
    if status.is_success() {
        return Ok(status.as_u16());
    }
    let answer = resp
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&answer[..answer.len().min(200)]).into_owned();
    Err(format!("answered {status}: {text}"))
}

/// One client configuration for every https webhook.
fn client_config() -> Arc<rustls::ClientConfig> {
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let roots = rustls::RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            };
            Arc::new(
                rustls::ClientConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .expect("ring supports the default protocol versions")
                .with_root_certificates(roots)
                .with_no_client_auth(),
            )
        })
        .clone()
}
