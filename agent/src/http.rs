//! A minimal HTTP/1.1 GET for probes and metrics scrapes (plain http only).

use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::Uri;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

/// Largest body read (a metrics page of a busy service fits easily).
const MAX_BODY: usize = 16 << 20;

/// GETs `url` within `timeout`; returns the status and the body.
pub async fn get(url: &str, timeout: Duration) -> Result<(u16, Bytes), String> {
    tokio::time::timeout(timeout, get_inner(url))
        .await
        .map_err(|_| format!("GET {url}: no answer within {timeout:?}"))?
}

async fn get_inner(url: &str) -> Result<(u16, Bytes), String> {
    let uri: Uri = url
        .parse()
        .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!("{url}: only http:// is supported"));
    }
    let host = uri.host().ok_or_else(|| format!("{url}: no host"))?;
    let port = uri.port_u16().unwrap_or(80);
    let stream = tokio::net::TcpStream::connect((host, port))
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    tokio::spawn(conn);
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let request = hyper::Request::get(path)
        .header("host", format!("{host}:{port}"))
        .header(
            "user-agent",
            concat!("drover-agent/", env!("CARGO_PKG_VERSION")),
        )
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    let status = response.status().as_u16();
    let body = Limited::new(response.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| format!("GET {url}: reading the body: {e}"))?
        .to_bytes();
    Ok((status, body))
}
