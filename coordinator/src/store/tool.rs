//! `drover-coordinator store check|backup|restore`: looking after the
//! embedded store.
//!
//! - `check --data-dir D`: reads the whole store file (redb's page
//!   checksums, then every entry); exit 0 when sound, 1 when damaged.
//!   Needs the coordinator stopped (the file is locked while it runs).
//! - `backup --to FILE`: while the coordinator runs, through its API
//!   (BackupStore, admin only; `--coordinator` and TLS flags as droverctl);
//!   with `--data-dir D` instead, from a stopped coordinator's file. Either
//!   way FILE is a new store file, checked after it is written.
//! - `restore --data-dir D --from FILE`: the coordinator stopped, FILE
//!   checked first; the current store is kept aside as
//!   `store.redb.replaced-<unix ms>`, never deleted.
//!
//! With etcd, use `etcdctl snapshot save|restore` (see the README).

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::Subcommand;
use drover_common::proto::BackupStoreRequest;
use drover_common::proto::deployer_client::DeployerClient;

use super::KeyValue;
use super::embedded::{self, FILE, FileSummary};

#[derive(Debug, Subcommand)]
pub enum StoreTool {
    /// Read the whole embedded store and say whether it is sound (exit 1 if not).
    Check {
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Copy the embedded store to a new file: online through the API, or
    /// from a stopped coordinator's --data-dir.
    Backup {
        #[arg(long)]
        to: PathBuf,
        /// Read this stopped coordinator's store file directly.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[arg(long, env = "DROVER_COORDINATOR", default_value = crate::config::DEFAULT_LISTEN)]
        coordinator: String,
        #[arg(long, env = "DROVER_CACERT")]
        cacert: Option<PathBuf>,
        #[arg(long, env = "DROVER_CERT")]
        cert: Option<PathBuf>,
        #[arg(long, env = "DROVER_KEY")]
        key: Option<PathBuf>,
    },
    /// Replace a stopped coordinator's store with a backup (checked first).
    Restore {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        from: PathBuf,
    },
}

fn said(summary: FileSummary) -> String {
    format!("{} keys at revision {}", summary.keys, summary.revision)
}

pub async fn run(tool: StoreTool, out: &mut impl Write) -> anyhow::Result<()> {
    match tool {
        StoreTool::Check { data_dir } => {
            let path = data_dir.join(FILE);
            let summary =
                tokio::task::spawn_blocking(move || embedded::check_file(&path)).await??;
            writeln!(out, "sound: {}", said(summary))?;
        }
        StoreTool::Backup {
            to,
            data_dir: Some(dir),
            ..
        } => {
            let summary = tokio::task::spawn_blocking(move || -> anyhow::Result<FileSummary> {
                let (kvs, revision) = embedded::read_file(&dir.join(FILE))?;
                Ok(embedded::write_file(&to, &unleased(kvs), revision)?)
            })
            .await??;
            writeln!(out, "backed up {}", said(summary))?;
        }
        StoreTool::Backup {
            to,
            data_dir: None,
            coordinator,
            cacert,
            cert,
            key,
        } => {
            let dialer = crate::ctl::client_dialer(cert, key, cacert)?;
            let channel = crate::ctl::connect(&dialer, &coordinator).await?;
            let summary = backup_online(&mut DeployerClient::new(channel), &to).await?;
            writeln!(out, "backed up {}", said(summary))?;
        }
        StoreTool::Restore { data_dir, from } => {
            let summary = tokio::task::spawn_blocking(move || restore(&data_dir, &from)).await??;
            writeln!(out, "restored {}", said(summary))?;
        }
    }
    Ok(())
}

fn unleased(kvs: Vec<KeyValue>) -> Vec<KeyValue> {
    kvs.into_iter().filter(|kv| kv.lease == 0).collect()
}

/// BackupStore into a new store file at `to`.
pub async fn backup_online(
    client: &mut DeployerClient<tonic::transport::Channel>,
    to: &Path,
) -> anyhow::Result<FileSummary> {
    anyhow::ensure!(!to.exists(), "{} exists; not overwriting it", to.display());
    let mut stream = client
        .backup_store(BackupStoreRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?
        .into_inner();
    let (mut kvs, mut revision) = (Vec::new(), 0);
    while let Some(chunk) = stream
        .message()
        .await
        .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?
    {
        revision = chunk.revision;
        kvs.extend(chunk.records.into_iter().map(|r| KeyValue {
            key: r.key,
            value: r.value,
            create_revision: r.create_revision,
            mod_revision: r.mod_revision,
            lease: 0,
        }));
    }
    let to = to.to_path_buf();
    Ok(tokio::task::spawn_blocking(move || embedded::write_file(&to, &kvs, revision)).await??)
}

fn restore(data_dir: &Path, from: &Path) -> anyhow::Result<FileSummary> {
    let summary = embedded::check_file(from)
        .map_err(|e| anyhow::anyhow!("the backup {} is not usable: {e}", from.display()))?;
    let current = data_dir.join(FILE);
    if current.exists() {
        // redb holds an exclusive flock while open: a coordinator runs on it.
        let file = std::fs::File::open(&current)?;
        if nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).is_err() {
            anyhow::bail!(
                "a coordinator is running on {}; stop it first",
                data_dir.display()
            );
        }
        let aside = data_dir.join(format!(
            "{FILE}.replaced-{}",
            drover_common::time::now_unix_ms()
        ));
        std::fs::rename(&current, &aside)?;
    }
    let tmp = data_dir.join(format!("{FILE}.restoring"));
    std::fs::copy(from, &tmp)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, &current)?;
    std::fs::File::open(data_dir)?.sync_all()?;
    Ok(summary)
}
