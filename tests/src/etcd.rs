//! A real etcd (Debian's etcd-server) on free loopback ports.

use std::process::Command;
use std::time::Duration;

// etcd cannot report the port it bound, so its ports are picked just before it starts.
use crate::{ChildGuard, TestDir, free_port, require_tool, wait_until};

pub struct Etcd {
    /// `None` while stopped (see [`Etcd::stop`]).
    pub child: Option<ChildGuard>,
    /// `http://127.0.0.1:PORT`, for etcd clients.
    pub endpoint: String,
    peer: String,
    name: String,
    data: std::path::PathBuf,
    log: std::path::PathBuf,
    /// With TLS: etcd's server certificate and a client certificate for
    /// the harness's own probes.
    tls: Option<(crate::pki::Creds, crate::pki::Creds)>,
}

impl Etcd {
    /// Starts a one-member etcd cluster with its data in `dir/name` and waits
    /// until it answers a read.
    pub async fn start(dir: &TestDir, name: &str) -> Etcd {
        Self::start_with(dir, name, None).await
    }

    /// Like [`Etcd::start`], clients on `https://` with client-certificate
    /// auth against `pki`'s CA (its server certificate is an `etcd` one).
    pub async fn start_tls(dir: &TestDir, name: &str, pki: &crate::pki::Pki) -> Etcd {
        let server = pki.issue("etcd", name, &["--dns", "localhost", "--ip", "127.0.0.1"]);
        let probe = pki.user("etcd-probe", &[]);
        Self::start_with(dir, name, Some((server, probe))).await
    }

    async fn start_with(
        dir: &TestDir,
        name: &str,
        tls: Option<(crate::pki::Creds, crate::pki::Creds)>,
    ) -> Etcd {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut etcd = Etcd {
            child: None,
            endpoint: format!("{scheme}://127.0.0.1:{}", free_port()),
            peer: format!("http://127.0.0.1:{}", free_port()),
            name: name.to_string(),
            data: dir.sub(name).join("data"),
            log: dir.path().join(format!("{name}.log")),
            tls,
        };
        etcd.run().await;
        etcd
    }

    async fn run(&mut self) {
        let etcd = require_tool(
            "etcd",
            "install Debian's etcd-server: apt-get install -y etcd-server",
        );
        let fresh = !self.data.exists();
        let mut cmd = Command::new(etcd);
        cmd.args(["--name", &self.name])
            .arg("--data-dir")
            .arg(&self.data)
            .args([
                "--listen-client-urls",
                &self.endpoint,
                "--advertise-client-urls",
                &self.endpoint,
            ])
            .args([
                "--listen-peer-urls",
                &self.peer,
                "--initial-advertise-peer-urls",
                &self.peer,
            ])
            .args(["--initial-cluster", &format!("{}={}", self.name, self.peer)])
            .args([
                "--initial-cluster-state",
                if fresh { "new" } else { "existing" },
                "--log-level",
                "warn",
            ]);
        if let Some((server, _)) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&server.cert)
                .arg("--key-file")
                .arg(&server.key)
                .arg("--trusted-ca-file")
                .arg(&server.ca)
                .arg("--client-cert-auth");
        }
        self.child = Some(ChildGuard::spawn(&self.name, cmd, &self.log));
        wait_until("etcd to answer", Duration::from_secs(20), || async {
            let mut client = self.client().await.map_err(|e| e.to_string())?;
            client
                .get("health-probe", None)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
        .await;
    }

    /// The running etcd process.
    pub fn process(&self) -> &ChildGuard {
        self.child.as_ref().expect("etcd is running")
    }

    /// SIGKILLs etcd (its data stays).
    pub fn stop(&mut self) {
        self.child = None;
    }

    /// Starts etcd again on the same ports and data.
    pub async fn restart(&mut self) {
        self.run().await;
    }

    pub async fn client(&self) -> Result<etcd_client::Client, etcd_client::Error> {
        let options = self.tls.as_ref().map(|(_, probe)| {
            let read = |p: &std::path::Path| std::fs::read(p).expect("test certificate");
            etcd_client::ConnectOptions::new().with_tls(
                etcd_client::TlsOptions::new()
                    .ca_certificate(etcd_client::Certificate::from_pem(read(&probe.ca)))
                    .identity(etcd_client::Identity::from_pem(
                        read(&probe.cert),
                        read(&probe.key),
                    )),
            )
        });
        etcd_client::Client::connect([self.endpoint.as_str()], options).await
    }
}
