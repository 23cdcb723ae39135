//! The end-to-end harness. Tests start the real binaries as child processes
//! on free loopback ports, each test in its own temp dir:
//!
//! - [`TestDir`]: a temp dir per test, kept (and printed) when the test fails.
//! - [`ChildGuard`]: a child process killed on drop, its output in a log file
//!   whose tail is printed when the test fails.
//! - [`Coordinator`], [`Agent`], [`Etcd`]: start one, wait until it serves.
//! - [`Cluster`]: etcd plus several coordinators; leaders, shares, metrics.
//! - [`sample_fleet`]: a coordinator and agents running the sample service under load.
//! - [`haproxy`], [`nginx`]: real load balancers on loopback; [`blue_green`]: slot agents behind haproxy.
//! - [`wait_until`]: poll a condition with a deadline; never a bare sleep.
//! - [`bins`]: where the binaries are (built once per test process).
//! - [`users`]: a real unprivileged user per test (`useradd`, removed on drop).
//! - [`pki`]: a CA per test (the real `droverctl ca`), certificates and the
//!   flags that use them; `Coordinator::start_tls` serves mutual TLS.

pub mod artifacts;
pub mod bins;
pub mod blue_green;
pub mod cluster;
pub mod cluster_fleet;
pub mod commands;
mod daemons;
mod etcd;
pub mod fake_peer;
pub mod haproxy;
mod http;
pub mod netns;
pub mod nginx;
pub mod one_agent;
pub mod pki;
mod process;
pub mod procstat;
pub mod raw;
pub mod sample_fleet;
pub mod specs;
mod testdir;
pub mod tmpfs;
pub mod users;
mod wait;
pub mod webhook;

pub use cluster::Cluster;
pub use daemons::{Agent, Coordinator, fleetsim, health_status};
pub use etcd::Etcd;
pub use http::{http_get, http_get_status};
pub use process::ChildGuard;
pub use testdir::TestDir;
pub use wait::{wait_until, wait_until_ok};

/// How many times agent `host` (in `dir`) started version `version` of the
/// sample service `hello`, counted in the service's log.
pub fn sample_starts(dir: &TestDir, host: &str, version: &str) -> usize {
    let log = dir
        .path()
        .join(format!("agent-{host}/services/hello/logs/service.log"));
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .matches(&format!("drover-sample {version} listening"))
        .count()
}

/// A loopback port free right now, for a listener started at once.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding a free port")
        .port()
}

/// A port for a service an agent starts later (a sample service, a
/// blue-green slot): free now, and below the kernel's ephemeral range
/// (32768-60999 by default), so the local ports of a test's outgoing
/// connections (a load generator makes thousands), which come from that
/// range, cannot take it first.
///
/// Nothing listens on the port until its service starts, so two draws
/// (two agents of one fleet, or two tests running side by side) could
/// both find it free. Each port handed out is therefore also locked
/// (`flock` on a file in the temp dir) for the life of the test process:
/// no other draw, in this process or another, gets it meanwhile, and the
/// kernel drops the lock when the process ends, however it ends.
pub fn free_service_port() -> u16 {
    use std::hash::BuildHasher;
    static HELD: std::sync::Mutex<Vec<std::fs::File>> = std::sync::Mutex::new(Vec::new());
    let dir = std::env::temp_dir().join("drover-test-ports");
    std::fs::create_dir_all(&dir).expect("creating the port lock dir");
    for attempt in 0u32..1000 {
        let draw = std::collections::hash_map::RandomState::new().hash_one(attempt);
        let port = 20_000 + (draw % 12_000) as u16;
        let free = |host: &str| std::net::TcpListener::bind((host, port)).is_ok();
        if !(free("127.0.0.1") && free("0.0.0.0")) {
            continue;
        }
        let Ok(lock) = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(port.to_string()))
        else {
            continue;
        };
        if lock.try_lock().is_ok() {
            HELD.lock().expect("port locks").push(lock);
            return port;
        }
    }
    panic!("no free port between 20000 and 31999");
}

/// Finds a tool on PATH, or fails the test saying how to install it.
pub fn require_tool(name: &str, install_hint: &str) -> std::path::PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("`{name}` is not installed; {install_hint} (scripts/test installs it)")
        })
}
