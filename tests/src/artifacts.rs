//! Artifacts of the sample service, built for tests and the demo.
//!
//! The artifact holds `drover.toml` and `bin/start`, a script that execs the
//! host's `drover-sample` (the agent passes its path as
//! `$DROVER_SAMPLE_BIN`), so each version is a small, real tar.gz.

use std::path::{Path, PathBuf};

use drover_common::artifact::Digest;
use drover_common::artifact::build::ArchiveBuilder;

pub struct BuiltArtifact {
    pub path: PathBuf,
    pub digest: String,
    pub size: u64,
}

/// The manifest of a sample-service artifact.
pub fn sample_manifest(service: &str, version: &str, extra_args: &[&str]) -> String {
    let mut args = vec![
        "--port".to_string(),
        "${PORT}".to_string(),
        "--version-label".to_string(),
        version.to_string(),
    ];
    args.extend(extra_args.iter().map(|a| a.to_string()));
    let args: Vec<String> = args.iter().map(|a| format!("{a:?}")).collect();
    format!(
        r#"service = "{service}"
version = "{version}"

[start]
command = "bin/start"
args = [{args}]
stop_grace = "2s"

[readiness]
http = "http://127.0.0.1:${{PORT}}/healthz"
interval = "100ms"
timeout = "1s"
failure_threshold = 1

[metrics]
url = "http://127.0.0.1:${{PORT}}/metrics"
requests = "http_requests_total"
errors = {{ label = "code", prefix = "5" }}
latency = "http_request_duration_seconds"
"#,
        args = args.join(", ")
    )
}

const START: &[u8] = b"#!/bin/sh\nexec \"$DROVER_SAMPLE_BIN\" \"$@\"\n";

/// Writes a sample-service artifact to `dir/<service>-<version>.tar.gz`.
pub fn sample_artifact(
    dir: &Path,
    service: &str,
    version: &str,
    extra_args: &[&str],
) -> BuiltArtifact {
    let manifest = sample_manifest(service, version, extra_args);
    artifact_with(dir, &format!("{service}-{version}.tar.gz"), &manifest, &[])
}

/// Writes an artifact of the sample service with its own `manifest` and
/// extra files (path, contents) to `dir/<name>`.
pub fn artifact_with(
    dir: &Path,
    name: &str,
    manifest: &str,
    files: &[(&str, &[u8])],
) -> BuiltArtifact {
    let builder = ArchiveBuilder::in_memory()
        .file("drover.toml", manifest.as_bytes())
        .executable("bin/start", START);
    let builder = files
        .iter()
        .fold(builder, |b, (path, data)| b.file(path, data));
    write(dir, name, builder.finish())
}

/// Writes `bytes` as an artifact file and returns its identity.
pub fn write(dir: &Path, name: &str, bytes: Vec<u8>) -> BuiltArtifact {
    let path = dir.join(name);
    std::fs::write(&path, &bytes).expect("writing the artifact");
    let (digest, size) = Digest::of_reader(&bytes[..]).expect("hashing");
    BuiltArtifact {
        path,
        digest: digest.hex(),
        size,
    }
}

/// `len` pseudo-random bytes (xorshift): data gzip cannot shrink, for
/// artifacts of a known size.
pub fn noise(len: usize) -> Vec<u8> {
    noise_seeded(len, 0x4F1B_BCDC_BFA5_3E0A)
}

/// Like [`noise`], a different stream for each `seed`.
pub fn noise_seeded(len: usize, seed: u64) -> Vec<u8> {
    // xorshift's state must be odd; distinct seeds, distinct states.
    let mut x = seed.wrapping_mul(2).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A sample-service release of `files` files of 1 MiB of noise (issue 15's
/// distribution tests and bench): file `changed.0` is drawn from seed
/// `changed.1`, every other file is the same in every release.
pub fn chunky_release(
    dir: &Path,
    version: &str,
    files: usize,
    changed: (usize, u64),
) -> BuiltArtifact {
    let bodies: Vec<(String, Vec<u8>)> = (0..files)
        .map(|i| {
            let seed = if i == changed.0 {
                changed.1
            } else {
                1000 + i as u64
            };
            (format!("data/{i:04}.bin"), noise_seeded(1 << 20, seed))
        })
        .collect();
    let refs: Vec<(&str, &[u8])> = bodies
        .iter()
        .map(|(p, b)| (p.as_str(), b.as_slice()))
        .collect();
    artifact_with(
        dir,
        &format!("hello-{version}.tar.gz"),
        &sample_manifest("hello", version, &[]),
        &refs,
    )
}

/// Bytes the coordinator's origin has served (whole files and chunks),
/// from its `/metrics`.
pub async fn origin_bytes(coord: &crate::Coordinator) -> u64 {
    let text = crate::http_get(coord.metrics_addr, "/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix("drover_artifact_fetched_bytes_total "))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0)
}

/// Fetch calls the origin `coord` has served (whole files or chunks).
pub async fn origin_fetches(coord: &crate::Coordinator) -> u64 {
    let text = crate::http_get(coord.metrics_addr, "/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix("drover_artifact_fetches_total "))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0)
}
