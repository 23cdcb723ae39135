//! A real HAProxy on loopback for router tests: one HTTP frontend on a
//! free port per backend, each backend of the servers given (round robin,
//! no retries: a request sent to a server that is down fails, as its
//! client would see), the runtime API on a unix socket in the test's
//! directory (`level admin`). Stopped when dropped. [`steady_load`] sends
//! requests through a frontend and counts who answered.
//!
//! ```ignore
//! let lb = HaproxyLb::start(&dir, "web", &[("blue", blue_port, 100), ("green", green_port, 0)]).await;
//! let router = Haproxy::new(RuntimeAddr::Unix(lb.socket.clone()));
//! let body = lb.get("/version").await;
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::{ChildGuard, TestDir, free_port, http_get_status, require_tool, wait_until};

/// A backend server: name, loopback port, weight.
pub type Server<'a> = (&'a str, u16, u32);

/// A running haproxy.
pub struct HaproxyLb {
    /// The runtime API's unix socket.
    pub socket: PathBuf,
    /// The HTTP frontend (of the first backend).
    pub frontend: SocketAddr,
    /// Every backend's frontend, in the order given.
    pub frontends: Vec<SocketAddr>,
    _child: ChildGuard,
}

impl HaproxyLb {
    /// Starts haproxy with backend `backend` of `servers` (name, loopback
    /// port, weight) and waits until its frontend and API answer.
    pub async fn start(dir: &TestDir, backend: &str, servers: &[(&str, u16, u32)]) -> HaproxyLb {
        Self::start_backends(dir, &[(backend, servers)]).await
    }

    /// Starts haproxy with several backends (name, servers), each behind
    /// its own frontend (`frontends`, in order).
    pub async fn start_backends(dir: &TestDir, backends: &[(&str, &[Server<'_>])]) -> HaproxyLb {
        let bin = require_tool("haproxy", "install Debian's haproxy package");
        let socket = dir.path().join("haproxy-admin.sock");
        let mut cfg = format!(
            "global\n  stats socket {} level admin\n\
             defaults\n  mode http\n  retries 0\n  timeout connect 2s\n  timeout client 10s\n  timeout server 10s\n",
            socket.display()
        );
        let mut frontends = Vec::new();
        for (backend, servers) in backends {
            let port = free_port();
            frontends.push(SocketAddr::from(([127, 0, 0, 1], port)));
            cfg.push_str(&format!(
                "frontend fe-{backend}\n  bind 127.0.0.1:{port}\n  default_backend {backend}\n\
                 backend {backend}\n  balance roundrobin\n"
            ));
            for (name, port, weight) in *servers {
                cfg.push_str(&format!(
                    "  server {name} 127.0.0.1:{port} weight {weight}\n"
                ));
            }
        }
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, cfg).expect("writing haproxy.cfg");
        let mut cmd = std::process::Command::new(bin);
        cmd.arg("-db").arg("-f").arg(&path);
        let child = ChildGuard::spawn("haproxy", cmd, &dir.path().join("haproxy.log"));
        let lb = HaproxyLb {
            socket,
            frontend: frontends[0],
            frontends,
            _child: child,
        };
        wait_until("haproxy's runtime API", Duration::from_secs(20), || async {
            match tokio::net::UnixStream::connect(&lb.socket).await {
                Ok(_) => Ok(()),
                Err(e) => Err(e.to_string()),
            }
        })
        .await;
        lb
    }

    /// GETs `path` through the frontend: the body, or why there was none.
    pub async fn get(&self, path: &str) -> Result<String, String> {
        match http_get_status(self.frontend, path).await? {
            (200, body) => Ok(body.trim().to_string()),
            (status, body) => Err(format!("{status}: {}", body.trim())),
        }
    }
}

/// What a steady load through a frontend saw: requests answered (by the
/// body each answered with, such as a version) and requests that failed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LoadSeen {
    pub answered: std::collections::BTreeMap<String, u64>,
    pub failed: u64,
}

impl LoadSeen {
    pub fn ok(&self) -> u64 {
        self.answered.values().sum()
    }
}

/// A GET of `path` through `lb` every 10 ms until `stop`, each on its own
/// connection and without waiting for the one before.
pub async fn steady_load(
    lb: SocketAddr,
    path: &'static str,
    stop: tokio::sync::watch::Receiver<bool>,
) -> LoadSeen {
    let mut requests = tokio::task::JoinSet::new();
    while !*stop.borrow() {
        requests.spawn(async move {
            match http_get_status(lb, path).await {
                Ok((200, body)) => Some(body.trim().to_string()),
                _ => None,
            }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut seen = LoadSeen::default();
    while let Some(answer) = requests.join_next().await {
        match answer.expect("a request task does not panic") {
            Some(body) => *seen.answered.entry(body).or_default() += 1,
            None => seen.failed += 1,
        }
    }
    seen
}
