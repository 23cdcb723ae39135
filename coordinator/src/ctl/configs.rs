//! `droverctl config ...`: push a service's config bundle for one
//! environment (a TOML or JSON document, and files from a directory), list
//! the versions pushed. A push prints the bundle's digest, which
//! `droverctl deploy start --config DIGEST` rolls out.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;
use comfy_table::{Table, presets};
use drover_common::config_bundle;
use drover_common::proto::deployer_client::DeployerClient;
use drover_common::proto::{
    ConfigBundle, ConfigFile, ConfigVersion, ListConfigsRequest, PushConfigRequest,
};
use tonic::transport::Channel;

use super::{print_json, status_error};

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Push a config bundle; prints its digest (the same content, the same digest).
    Push {
        #[arg(long)]
        service: String,
        /// The environment (a stage of a pipeline of the service).
        #[arg(long = "env")]
        environment: String,
        /// The document: a .toml or .json file; `secret://NAME` values are
        /// resolved on each host.
        #[arg(long)]
        document: PathBuf,
        /// A directory whose files go with it (by their relative paths).
        #[arg(long)]
        files: Option<PathBuf>,
    },
    /// The versions pushed, newest first.
    List {
        #[arg(long)]
        service: String,
        #[arg(long = "env", default_value = "")]
        environment: String,
    },
}

pub async fn run(
    client: &mut DeployerClient<Channel>,
    cmd: ConfigCommand,
    json: bool,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    match cmd {
        ConfigCommand::Push {
            service,
            environment,
            document,
            files,
        } => {
            let bundle = read_bundle(service, environment, &document, files.as_deref())?;
            let version = client
                .push_config(PushConfigRequest {
                    bundle: Some(bundle),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            if json {
                return print_json(out, &version);
            }
            let b = version.bundle.clone().unwrap_or_default();
            writeln!(
                out,
                "{}\tconfig of {} in {}, pushed by {}{}",
                b.digest,
                b.service,
                b.environment,
                version.pushed_by,
                if version.secrets.is_empty() {
                    String::new()
                } else {
                    format!("; secrets on hosts: {}", version.secrets.join(", "))
                }
            )?;
            Ok(())
        }
        ConfigCommand::List {
            service,
            environment,
        } => {
            let versions = client
                .list_configs(ListConfigsRequest {
                    service,
                    environment,
                })
                .await
                .map_err(status_error)?
                .into_inner()
                .versions;
            if json {
                return print_json(out, &versions);
            }
            writeln!(out, "{}", table(&versions))?;
            Ok(())
        }
    }
}

fn table(versions: &[ConfigVersion]) -> Table {
    let mut table = Table::new();
    table.load_preset(presets::NOTHING).set_header([
        "DIGEST",
        "ENVIRONMENT",
        "PUSHED BY",
        "PUSHED AT",
        "SECRETS",
    ]);
    for v in versions {
        let b = v.bundle.clone().unwrap_or_default();
        table.add_row([
            b.digest,
            b.environment,
            v.pushed_by.clone(),
            super::audit::rfc3339(v.pushed_at_unix_ms),
            v.secrets.join(","),
        ]);
    }
    table
}

/// The bundle of `document` and the files under `files`, as pushed.
fn read_bundle(
    service: String,
    environment: String,
    document: &Path,
    files: Option<&Path>,
) -> anyhow::Result<ConfigBundle> {
    let format = config_bundle::format_of(document).with_context(|| {
        format!(
            "{}: the document must be a .toml or .json file",
            document.display()
        )
    })?;
    let mut bundle = ConfigBundle {
        service,
        environment,
        format: format as i32,
        document: std::fs::read(document)
            .with_context(|| format!("reading {}", document.display()))?,
        files: Vec::new(),
        digest: String::new(),
    };
    if let Some(dir) = files {
        walk(dir, dir, &mut bundle.files)?;
    }
    bundle.digest = config_bundle::digest(&bundle);
    Ok(bundle)
}

/// Every regular file under `dir`, by its path relative to `root`;
/// anything else (a link, a device) is refused rather than followed.
fn walk(root: &Path, dir: &Path, files: &mut Vec<ConfigFile>) -> anyhow::Result<()> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    for entry in entries {
        let entry = entry?;
        let path = entry.path();
        let kind = entry.file_type()?;
        if kind.is_dir() {
            walk(root, &path, files)?;
        } else if kind.is_file() {
            let rel = path
                .strip_prefix(root)
                .expect("under the root")
                .to_str()
                .with_context(|| format!("{} is not UTF-8", path.display()))?
                .to_string();
            files.push(ConfigFile {
                path: rel,
                content: std::fs::read(&path)
                    .with_context(|| format!("reading {}", path.display()))?,
            });
        } else {
            anyhow::bail!(
                "{}: only regular files and directories go into a config bundle",
                path.display()
            );
        }
    }
    Ok(())
}
