//! `droverctl ca init|issue`: the built-in certificate authority
//! ([`drover_common::tls::ca`]). Works offline; needs no coordinator.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Subcommand;
use drover_common::tls::ca::{self, IssueRequest};
use drover_common::tls::identity::Kind;

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create a CA (ca.pem, ca-key.pem) for a trust domain; refuses to overwrite one.
    Init {
        #[arg(long)]
        trust_domain: String,
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Lifetime of the CA certificate.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "10y")]
        valid_for: Duration,
    },
    /// Issue a certificate: `agent HOST`, `coordinator ID`, `user NAME` or `etcd NAME` (etcd's server certificate).
    Issue {
        /// agent, coordinator, user or etcd.
        kind: String,
        /// The host id, coordinator id or user name.
        name: String,
        /// The CA's directory (ca.pem, ca-key.pem).
        #[arg(long, default_value = ".")]
        ca_dir: PathBuf,
        /// Where to write <kind>-<name>.pem and <kind>-<name>-key.pem.
        #[arg(long, default_value = ".")]
        out: PathBuf,
        /// A built-in role (viewer, deployer, approver, admin) as a group of the same name; repeatable.
        #[arg(long)]
        role: Vec<String>,
        /// A group the policy can grant roles to; repeatable.
        #[arg(long)]
        group: Vec<String>,
        /// A DNS name the certificate is also valid for (grpcurl, etcd clients); repeatable.
        #[arg(long)]
        dns: Vec<String>,
        /// An IP address the certificate is also valid for; repeatable.
        #[arg(long)]
        ip: Vec<IpAddr>,
        #[arg(long, value_parser = humantime::parse_duration, default_value = "90d")]
        valid_for: Duration,
        /// Start of validity, RFC 3339 (default: now).
        #[arg(long, value_parser = humantime::parse_rfc3339_weak)]
        not_before: Option<std::time::SystemTime>,
    },
}

pub fn run(cmd: CaCommand, out: &mut impl std::io::Write) -> anyhow::Result<()> {
    match cmd {
        CaCommand::Init {
            trust_domain,
            dir,
            valid_for,
        } => {
            let path = ca::init(&dir, &trust_domain, valid_for)?;
            writeln!(
                out,
                "CA for spiffe://{trust_domain} written to {} (key: {}, keep it private)",
                path.display(),
                dir.join(ca::CA_KEY_FILE).display()
            )?;
        }
        CaCommand::Issue {
            kind,
            name,
            ca_dir,
            out: out_dir,
            role,
            group,
            dns,
            ip,
            valid_for,
            not_before,
        } => {
            let kind = Kind::parse(&kind).ok_or_else(|| {
                anyhow::anyhow!("kind must be agent, coordinator, user or etcd, got {kind:?}")
            })?;
            for r in &role {
                anyhow::ensure!(
                    crate::auth::policy::builtin_role(r).is_some(),
                    "--role {r:?}: built-in roles are {}",
                    crate::auth::policy::BUILTIN_ROLES.join(", ")
                );
            }
            let issued = ca::issue(
                &ca_dir,
                &IssueRequest {
                    kind,
                    name,
                    groups: role.into_iter().chain(group).collect(),
                    dns,
                    ips: ip,
                    not_before,
                    lifetime: valid_for,
                },
            )?;
            let (cert, key) = ca::write_issued(&out_dir, &issued)?;
            writeln!(
                out,
                "{} serial {} -> {} {}",
                issued.id,
                issued.serial,
                cert.display(),
                key.display()
            )?;
        }
    }
    Ok(())
}
