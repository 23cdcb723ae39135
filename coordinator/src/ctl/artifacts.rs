//! `droverctl artifact push|list|show`.

use std::io::{IsTerminal, Write};
use std::path::Path;

use comfy_table::{Table, presets};
use drover_common::artifact::Digest;
use drover_common::proto::artifacts_client::ArtifactsClient;
use drover_common::proto::{
    ArtifactInfo, ListArtifactsRequest, StatRequest, UploadHeader, UploadRequest, upload_request,
};
use indicatif::{ProgressBar, ProgressStyle};
use tokio::io::AsyncReadExt;
use tonic::transport::Channel;

use super::{print_json, status_error};

const CHUNK: usize = 256 * 1024;

pub struct Push<'a> {
    pub file: &'a Path,
    pub service: &'a str,
    pub version: &'a str,
    pub git_sha: &'a str,
}

pub async fn push(
    client: &mut ArtifactsClient<Channel>,
    push: Push<'_>,
    json: bool,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let path = push.file.to_path_buf();
    let (digest, size) = tokio::task::spawn_blocking(move || Digest::of_file(&path))
        .await?
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", push.file.display()))?;
    let header = UploadHeader {
        service: push.service.to_string(),
        version: push.version.to_string(),
        git_sha: push.git_sha.to_string(),
        sha256: digest.hex(),
        size_bytes: size,
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
    let mut file = tokio::fs::File::open(push.file).await?;
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

pub async fn list(
    client: &mut ArtifactsClient<Channel>,
    service: &str,
    json: bool,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let response = client
        .list(ListArtifactsRequest {
            service: service.to_string(),
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
