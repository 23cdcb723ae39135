//! A real etcd (Debian's etcd-server) on free loopback ports.

use std::process::Command;
use std::time::Duration;

// etcd cannot report the port it bound, so its ports are picked just before it starts.
use crate::{ChildGuard, TestDir, free_port, require_tool, wait_until};

pub struct Etcd {
    pub child: ChildGuard,
    /// `http://127.0.0.1:PORT`, for etcd clients.
    pub endpoint: String,
}

impl Etcd {
    /// Starts a one-member etcd cluster with its data in `dir/name` and waits
    /// until it answers a read.
    pub async fn start(dir: &TestDir, name: &str) -> Etcd {
        let etcd = require_tool(
            "etcd",
            "install Debian's etcd-server: apt-get install -y etcd-server",
        );
        let data = dir.sub(name);
        let client = format!("http://127.0.0.1:{}", free_port());
        let peer = format!("http://127.0.0.1:{}", free_port());
        let mut cmd = Command::new(etcd);
        cmd.args(["--name", name])
            .arg("--data-dir")
            .arg(data.join("data"))
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("{name}={peer}")])
            .args(["--initial-cluster-state", "new", "--log-level", "warn"]);
        let child = ChildGuard::spawn(name, cmd, &dir.path().join(format!("{name}.log")));
        let etcd = Etcd {
            child,
            endpoint: client,
        };
        wait_until("etcd to answer", Duration::from_secs(20), || async {
            let mut client = etcd.client().await.map_err(|e| e.to_string())?;
            client
                .get("health-probe", None)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
        .await;
        etcd
    }

    pub async fn client(&self) -> Result<etcd_client::Client, etcd_client::Error> {
        etcd_client::Client::connect([self.endpoint.as_str()], None).await
    }
}
