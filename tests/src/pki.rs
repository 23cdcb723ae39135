//! Certificates for tests, made at test time with the real `droverctl ca`
//! (never committed): a CA per test in `dir/pki`, and the flags each binary
//! takes to use them.
//!
//! ```ignore
//! let pki = Pki::new(&dir);
//! let coord = Coordinator::start_tls(&dir, "c1", &pki, &[]).await;   // admin client
//! let agent = Agent::start(&dir, "web-1", &[&coord], &pki.agent_flags("web-1"));
//! let viewer = pki.user("val", &["--role", "viewer"]);
//! let (code, _, err) = coord.droverctl_as(&viewer, &["deploy", "start", ...]);
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;

use drover_common::tls::client::Dialer;
use drover_common::tls::{ClientTls, TlsFiles};

use crate::{TestDir, bins};

/// A test's certificate authority.
pub struct Pki {
    pub dir: PathBuf,
}

/// One issued certificate and its key.
#[derive(Debug, Clone)]
pub struct Creds {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl Creds {
    /// `--cacert --cert --key` for droverctl.
    pub fn ctl_flags(&self) -> Vec<String> {
        vec![
            "--cacert".into(),
            path(&self.ca),
            "--cert".into(),
            path(&self.cert),
            "--key".into(),
            path(&self.key),
        ]
    }

    /// `--tls-cert --tls-key --tls-ca` for the daemons.
    pub fn daemon_flags(&self) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            path(&self.cert),
            "--tls-key".into(),
            path(&self.key),
            "--tls-ca".into(),
            path(&self.ca),
        ]
    }

    /// A dialer presenting this certificate.
    pub fn dialer(&self) -> Dialer {
        let tls = ClientTls::client(TlsFiles {
            cert: self.cert.clone(),
            key: self.key.clone(),
            ca: self.ca.clone(),
            deny_list: None,
        })
        .unwrap_or_else(|e| panic!("client TLS from {}: {e}", self.cert.display()));
        Dialer::tls(tls)
    }
}

fn path(p: &Path) -> String {
    p.to_str().expect("UTF-8 test path").to_string()
}

/// Runs droverctl (no coordinator needed) and panics on failure.
fn ctl(args: &[&str]) -> String {
    let out = Command::new(bins::bin("droverctl"))
        .args(args)
        .output()
        .expect("running droverctl");
    assert!(
        out.status.success(),
        "droverctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Pki {
    /// A fresh CA for trust domain `drover.test` in `dir/pki`.
    pub fn new(dir: &TestDir) -> Pki {
        Self::with_domain(dir, "pki", "drover.test")
    }

    /// Another CA (for foreign-certificate tests) in `dir/<name>`.
    pub fn with_domain(dir: &TestDir, name: &str, domain: &str) -> Pki {
        let ca_dir = dir.sub(name);
        ctl(&[
            "ca",
            "init",
            "--trust-domain",
            domain,
            "--dir",
            &path(&ca_dir),
        ]);
        Pki { dir: ca_dir }
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// Issues `kind name` with extra `droverctl ca issue` flags into
    /// `pki/issued` (re-issuing replaces the files: a rotation).
    pub fn issue(&self, kind: &str, name: &str, extra: &[&str]) -> Creds {
        let out = self.dir.join("issued");
        let mut args = vec![
            "ca",
            "issue",
            kind,
            name,
            "--ca-dir",
            self.dir.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        ctl(&args);
        Creds {
            cert: out.join(format!("{kind}-{name}.pem")),
            key: out.join(format!("{kind}-{name}-key.pem")),
            ca: self.ca(),
        }
    }

    /// The serial number (hex) of an issued certificate.
    pub fn serial(creds: &Creds) -> String {
        use rustls_pki::PemObject;
        let der =
            rustls_pki::CertificateDer::from_pem_file(&creds.cert).expect("a PEM certificate");
        drover_common::tls::identity::PeerCert::from_der(&der)
            .expect("a Drover certificate")
            .serial
    }

    pub fn coordinator(&self, id: &str) -> Creds {
        self.issue(
            "coordinator",
            id,
            &["--dns", "localhost", "--ip", "127.0.0.1"],
        )
    }

    pub fn agent(&self, host: &str) -> Creds {
        self.issue("agent", host, &[])
    }

    pub fn user(&self, name: &str, extra: &[&str]) -> Creds {
        self.issue("user", name, extra)
    }

    /// The flags an agent for `host` needs (its certificate is issued now).
    pub fn agent_flags(&self, host: &str) -> Vec<String> {
        self.agent(host).daemon_flags()
    }
}

mod rustls_pki {
    pub use rustls::pki_types::CertificateDer;
    pub use rustls::pki_types::pem::PemObject;
}
