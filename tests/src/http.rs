//! A plain HTTP GET, for the coordinator's metrics endpoint.

use std::net::SocketAddr;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

/// GETs `path` from `addr` and returns the body; panics on any failure.
pub async fn http_get(addr: SocketAddr, path: &str) -> String {
    let (status, body) = http_get_status(addr, path)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!((200..300).contains(&status), "GET {path}: {status}");
    body
}

/// GETs `path` from `addr`: the status and body, or why there was none.
pub async fn http_get_status(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake with {addr}: {e}"))?;
    tokio::spawn(conn);
    let request = hyper::Request::get(path)
        .header("host", addr.to_string())
        .body(Empty::<Bytes>::new())
        .expect("valid request");
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("GET {path}: {e}"))?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("GET {path} body: {e}"))?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}
