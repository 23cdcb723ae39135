//! A webhook receiver for the notification tests: a real HTTP server on
//! loopback that records every POST (headers and body) in arrival order,
//! and can be stopped (connections refused) and started again on the same
//! port.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// One POST as received.
#[derive(Debug, Clone)]
pub struct Received {
    pub event_id: String,
    pub event: String,
    pub signature: String,
    pub body: Vec<u8>,
    /// When it arrived (unix ms).
    pub at_unix_ms: u64,
}

pub struct WebhookReceiver {
    pub addr: SocketAddr,
    pub received: Arc<Mutex<Vec<Received>>>,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl WebhookReceiver {
    pub async fn start() -> WebhookReceiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut r = WebhookReceiver {
            addr,
            received: Arc::default(),
            server: None,
        };
        r.serve(listener);
        r
    }

    /// `http://127.0.0.1:PORT/PATH`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}/{path}", self.addr)
    }

    /// Stops answering: new connections are refused.
    pub fn stop(&mut self) {
        if let Some(s) = self.server.take() {
            s.abort();
        }
    }

    /// Answers again, on the same port.
    pub async fn restart(&mut self) {
        self.stop();
        let listener = crate::wait_until(
            "the receiver's port to be free",
            std::time::Duration::from_secs(10),
            || async {
                TcpListener::bind(self.addr)
                    .await
                    .map_err(|e| e.to_string())
            },
        )
        .await;
        self.serve(listener);
    }

    /// What arrived so far, in order.
    pub fn got(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    fn serve(&mut self, listener: TcpListener) {
        let received = self.received.clone();
        self.server = Some(tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let received = received.clone();
                conns.spawn(async move {
                    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let received = received.clone();
                        async move {
                            let header = |n: &str| {
                                req.headers()
                                    .get(n)
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or_default()
                                    .to_string()
                            };
                            let (event_id, event, signature) = (
                                header("x-drover-event-id"),
                                header("x-drover-event"),
                                header("x-drover-signature"),
                            );
                            let body = req.into_body().collect().await?.to_bytes().to_vec();
                            received.lock().unwrap().push(Received {
                                event_id,
                                event,
                                signature,
                                body,
                                at_unix_ms: drover_common::time::now_unix_micros() / 1000,
                            });
                            Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from_static(
                                b"ok",
                            ))))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        }));
    }
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        self.stop();
    }
}
