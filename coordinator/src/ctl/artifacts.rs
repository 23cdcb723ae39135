//! `droverctl artifact push|list|show`.

use std::io::{IsTerminal, Write};
use std::path::Path;

use comfy_table::{Table, presets};
use drover_common::artifact::Digest;
use drover_common::artifact::signature::SigningIdentity;
use drover_common::proto::artifacts_client::ArtifactsClient;
use drover_common::proto::{
    AddSignatureRequest, ArtifactInfo, BlobState, ListArtifactsRequest, StatRequest, UploadHeader,
    UploadRequest, VerifyArtifactsRequest, upload_request,
};
use indicatif::{ProgressBar, ProgressStyle};
use tokio::io::AsyncReadExt;
use tonic::transport::Channel;

use super::{print_json, status_error};

const CHUNK: usize = 256 * 1024;

/// `droverctl artifact keygen`: a new signing key (private, 0600) and its
/// public key, the file agents trust with `--trust-signer`.
pub fn keygen(out_dir: &Path, name: &str, out: &mut impl Write) -> anyhow::Result<()> {
    let key = SigningIdentity::generate();
    let (private, public) = key.to_pem();
    std::fs::create_dir_all(out_dir)?;
    let private_path = out_dir.join(format!("{name}.key"));
    let public_path = out_dir.join(format!("{name}.pub"));
    drover_common::tls::ca::write_replacing(&private_path, &private, 0o600)?;
    drover_common::tls::ca::write_replacing(&public_path, &public, 0o644)?;
    writeln!(
        out,
        "signing key {} -> {} (private) {} (give agents --trust-signer with this)",
        key.key_id(),
        private_path.display(),
        public_path.display()
    )?;
    Ok(())
}

/// `droverctl artifact sign`: signs a stored artifact's digest for its
/// service and adds the signature on the origin.
pub async fn sign(
    client: &mut ArtifactsClient<Channel>,
    sha256: &str,
    key: &Path,
    json: bool,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let key = SigningIdentity::load(key)?;
    let info = client
        .stat(StatRequest {
            sha256: sha256.to_string(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let info = client
        .add_signature(AddSignatureRequest {
            sha256: info.sha256.clone(),
            signature: Some(key.sign(&info.service, &info.sha256)),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    if json {
        return print_json(out, &info);
    }
    writeln!(
        out,
        "{} signed by {} ({} signature(s))",
        info.sha256,
        key.key_id(),
        info.signatures.len()
    )?;
    Ok(())
}

pub struct Push<'a> {
    /// A tar.gz, or a directory to build one from.
    pub file: &'a Path,
    /// The digest the bytes must hash to (CI's pin).
    pub expect_sha256: Option<&'a str>,
    pub service: &'a str,
    pub version: &'a str,
    pub git_sha: &'a str,
    /// Sign the digest with this ed25519 key (PKCS#8 PEM).
    pub sign_key: Option<&'a Path>,
}

pub async fn push(
    client: &mut ArtifactsClient<Channel>,
    push: Push<'_>,
    json: bool,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    // A directory is built into a temp archive first, drover.toml first.
    let built = if push.file.is_dir() {
        let dir = push.file.to_path_buf();
        let tmp =
            tokio::task::spawn_blocking(move || -> anyhow::Result<tempfile::NamedTempFile> {
                let tmp = tempfile::Builder::new().suffix(".tar.gz").tempfile()?;
                drover_common::artifact::build::from_dir(
                    &dir,
                    std::io::BufWriter::new(tmp.as_file()),
                )
                .map_err(|e| anyhow::anyhow!("building an artifact of {}: {e}", dir.display()))?;
                Ok(tmp)
            })
            .await??;
        Some(tmp)
    } else {
        None
    };
    let file_path = built.as_ref().map(|t| t.path()).unwrap_or(push.file);
    let path = file_path.to_path_buf();
    let (digest, size) = tokio::task::spawn_blocking(move || Digest::of_file(&path))
        .await?
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", push.file.display()))?;
    if let Some(expected) = push.expect_sha256 {
        let expected: Digest = expected
            .parse()
            .map_err(|e| anyhow::anyhow!("--expect-sha256: {e}"))?;
        anyhow::ensure!(
            expected == digest,
            "{} hashes to {digest}, not the expected {expected}; nothing was pushed",
            push.file.display()
        );
    }
    // Signed twice: the file (v1), and the file with its chunk index (v2,
    // computed here from the file, so the signer vouches for what it
    // read itself), which agents pulling by chunks need.
    let signatures = match push.sign_key {
        Some(key) => {
            let key = SigningIdentity::load(key)?;
            let file = std::fs::File::open(push.file)
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", push.file.display()))?;
            let index =
                drover_common::artifact::chunks::ChunkIndex::of_gzip(std::io::BufReader::new(file))
                    .map_err(|e| anyhow::anyhow!("{} is not a tar.gz: {e}", push.file.display()))?;
            vec![
                key.sign(push.service, &digest.hex()),
                key.sign_with_index(push.service, &digest.hex(), &index.digest().hex()),
            ]
        }
        None => vec![],
    };
    let header = UploadHeader {
        service: push.service.to_string(),
        version: push.version.to_string(),
        git_sha: push.git_sha.to_string(),
        sha256: digest.hex(),
        size_bytes: size,
        signatures,
    };
    let progress = if std::io::stderr().is_terminal() {
        let bar = ProgressBar::new(size);
        bar.set_style(
            ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
                .expect("static template")
                .progress_chars("=> "),
        );
        bar.set_message(format!("uploading {}", push.file.display()));
        bar
    } else {
        ProgressBar::hidden()
    };
    let mut file = tokio::fs::File::open(file_path).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(UploadRequest {
        part: Some(upload_request::Part::Header(header)),
    })
    .await?;
    let bar = progress.clone();
    let reader = tokio::spawn(async move {
        loop {
            let mut buf = vec![0u8; CHUNK];
            let n = file.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(());
            }
            buf.truncate(n);
            bar.inc(n as u64);
            if tx
                .send(UploadRequest {
                    part: Some(upload_request::Part::Chunk(buf)),
                })
                .await
                .is_err()
            {
                return Ok(()); // the server answered early (deduplicated or refused)
            }
        }
    });
    let result = client
        .upload(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    progress.finish_and_clear();
    reader.await??;
    let info = result.map_err(status_error)?.into_inner();
    if json {
        return print_json(out, &info);
    }
    writeln!(out, "{}", info.sha256)?;
    if info.deduplicated {
        eprintln!(
            "already stored (uploaded for {} {})",
            info.service, info.version
        );
    }
    Ok(())
}

/// `droverctl artifact verify [SHA]`: the origin re-hashes its blobs and
/// repairs or marks lost what it must; fails when any artifact is lost.
/// `droverctl artifact gc [--dry-run]`.
pub async fn gc(
    client: &mut ArtifactsClient<Channel>,
    dry_run: bool,
    json: bool,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let response = client
        .collect_garbage(drover_common::proto::CollectGarbageRequest { dry_run })
        .await
        .map_err(status_error)?
        .into_inner();
    if json {
        return print_json(out, &response);
    }
    let mut table = Table::new();
    table
        .load_preset(presets::NOTHING)
        .set_header(["SHA256", "SERVICE", "VERSION", "SIZE", "DECISION"]);
    for d in &response.decisions {
        let decision = match (d.collected, dry_run) {
            (true, true) => "would be removed".to_string(),
            (true, false) => "REMOVED".to_string(),
            (false, _) => format!("kept: {}", d.kept_because),
        };
        table.add_row([
            d.sha256[..12.min(d.sha256.len())].to_string(),
            d.service.clone(),
            d.version.clone(),
            d.size_bytes.to_string(),
            decision,
        ]);
    }
    writeln!(out, "{table}")?;
    let n = response.decisions.iter().filter(|d| d.collected).count();
    writeln!(
        out,
        "{n} artifacts ({} bytes) {}",
        response.collected_bytes,
        if dry_run {
            "would be removed (dry run)"
        } else {
            "removed"
        }
    )?;
    Ok(())
}

pub async fn verify(
    client: &mut ArtifactsClient<Channel>,
    sha256: &str,
    json: bool,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let response = client
        .verify(VerifyArtifactsRequest {
            sha256: sha256.to_string(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    if json {
        print_json(out, &response)?;
    } else {
        let mut table = Table::new();
        table
            .load_preset(presets::NOTHING)
            .set_header(["SHA256", "SERVICE", "STATE", "DETAIL"]);
        for c in &response.checks {
            let state = match c.state() {
                BlobState::Ok => "ok",
                BlobState::Repaired => "REPAIRED",
                BlobState::Lost => "LOST",
                BlobState::Unspecified => "?",
            };
            table.add_row([
                c.sha256[..12.min(c.sha256.len())].to_string(),
                c.service.clone(),
                state.to_string(),
                c.detail.clone(),
            ]);
        }
        writeln!(out, "{table}")?;
    }
    let lost = response
        .checks
        .iter()
        .filter(|c| c.state() == BlobState::Lost)
        .count();
    anyhow::ensure!(
        lost == 0,
        "{lost} artifact(s) lost: push them again to restore them"
    );
    Ok(())
}

pub async fn list(
    client: &mut ArtifactsClient<Channel>,
    service: &str,
    json: bool,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let response = client
        .list(ListArtifactsRequest {
            service: service.to_string(),
            include_lost: false,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    if json {
        return print_json(out, &response);
    }
    if response.artifacts.is_empty() {
        writeln!(out, "no artifacts")?;
        return Ok(());
    }
    let mut table = Table::new();
    table.load_preset(presets::NOTHING).set_header([
        "SHA256", "SERVICE", "VERSION", "GIT SHA", "SIZE", "UPLOADED",
    ]);
    for a in &response.artifacts {
        table.add_row([
            a.sha256[..12].to_string(),
            a.service.clone(),
            a.version.clone(),
            a.git_sha.chars().take(12).collect(),
            super::hosts::bytes(a.size_bytes),
            uploaded(a),
        ]);
    }
    writeln!(out, "{table}")?;
    Ok(())
}

pub async fn show(
    client: &mut ArtifactsClient<Channel>,
    digest: &str,
    json: bool,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let a = client
        .stat(StatRequest {
            sha256: digest.to_string(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    if json {
        return print_json(out, &a);
    }
    writeln!(out, "sha256:    {}", a.sha256)?;
    writeln!(out, "service:   {}", a.service)?;
    writeln!(
        out,
        "version:   {} (drover.toml: {})",
        a.version, a.manifest_version
    )?;
    writeln!(out, "git sha:   {}", a.git_sha)?;
    writeln!(
        out,
        "size:      {} ({} bytes)",
        super::hosts::bytes(a.size_bytes),
        a.size_bytes
    )?;
    writeln!(out, "uploaded:  {}", uploaded(&a))?;
    Ok(())
}

fn uploaded(a: &ArtifactInfo) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(a.uploaded_at_unix_ms);
    humantime::format_rfc3339_seconds(t).to_string()
}
