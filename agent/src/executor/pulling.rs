//! Pull: the artifact onto the host, by chunks when the origin indexed it
//! (and rule 5 allows), else the whole file; then unpacked and the
//! service's releases pruned.

use tracing::{info, warn};

use super::{Executor, Outcome, parse_digest, prune_service};
use crate::{disk, pull};

impl Executor {
    pub(super) async fn pull(&self, p: &drover_common::proto::PullCommand) -> Outcome {
        let (service, sources) = (p.service.as_str(), p.sources.as_slice());
        let digest = match parse_digest(&p.artifact) {
            Ok(d) => d,
            Err(e) => return Outcome::failed(e),
        };
        // By chunks when the origin indexed it (and, with trusted signers,
        // a signature vouches for the index: rule 5); else the whole file.
        let index = match p.index_sha256.as_str() {
            "" => None,
            hex => match parse_digest(hex) {
                Ok(d) => Some(d),
                Err(e) => return Outcome::failed(format!("index_sha256: {e}")),
            },
        };
        let index =
            index.filter(|i| self.signature_covers_index(service, &digest, i, &p.signatures));
        if let Err(e) = self.accept_signature(service, &digest, index.as_ref(), &p.signatures) {
            warn!(%digest, service, reason = %e, "pull refused: untrusted artifact");
            return Outcome::failed(e);
        }
        let layout = &self.cfg.layout;
        if layout.release(service, &digest).is_dir() && layout.is_cached(&digest) {
            return Outcome::ok(format!("{digest} is already on this host"))
                .with_pull(Default::default());
        }
        let stats = match index {
            Some(index) => {
                let pull = pull::ChunkedPull {
                    layout,
                    cache: &self.cfg.chunks,
                    dialer: &self.cfg.dialer,
                    peer_dialer: &self.cfg.peer_dialer,
                    artifact: digest,
                    index,
                    unpacked_bytes: p.unpacked_bytes,
                    size_bytes: p.size_bytes,
                    sources,
                    peers: &p.peers,
                    limits: &self.cfg.limits,
                };
                pull.run().await
            }
            None => pull::download(
                layout,
                &digest,
                sources,
                p.size_bytes,
                &self.cfg.limits,
                &self.cfg.dialer,
            )
            .await
            .map(|fetched| drover_common::proto::PullStats {
                origin_bytes: fetched,
                ..Default::default()
            }),
        };
        let stats = match stats {
            Ok(s) => s,
            Err(e) => return self.pull_failed(e),
        };
        match pull::unpack_release(layout, service, &digest, &self.cfg.limits).await {
            Ok(m) => {
                self.cfg.disk.clear(disk::Source::Pull);
                let keep = self.cfg.keep_releases;
                let mut removed = Vec::new();
                if let Err(e) = self.save(|s| {
                    let rec = s.services.entry(service.to_string()).or_default();
                    if !rec.releases.contains(&digest.hex()) {
                        // Oldest first: releases are pruned in the order
                        // they arrived (activation moves one to the end).
                        rec.releases.push(digest.hex());
                    }
                    // Pruned after every pull too: a host that pulls ahead
                    // (prefetch) never holds more than `keep` releases.
                    removed = prune_service(s, layout, service, keep, Some(digest.hex()));
                }) {
                    return Outcome::failed(e);
                }
                if !removed.is_empty() {
                    info!(%service, removed = ?removed, "pruned old releases after a pull");
                    self.cfg.chunks.rescan();
                }
                Outcome::ok(format!(
                    "pulled {digest} ({} {}; {} bytes from the origin, {} from peers, {} reused)",
                    m.service, m.version, stats.origin_bytes, stats.peer_bytes, stats.reused_bytes
                ))
                .with_pull(stats)
            }
            Err(e) => {
                // The archive is fine by digest but unusable: drop it.
                layout.remove_cached(&digest);
                self.cfg.chunks.rescan();
                self.pull_failed(e).with_pull(stats)
            }
        }
    }

    /// A failed pull's answer; a disk fault is also the host's problem
    /// until a pull succeeds again.
    fn pull_failed(&self, e: pull::PullError) -> Outcome {
        if let pull::PullError::Disk(problem) = &e {
            self.cfg.disk.set(disk::Source::Pull, problem.clone());
        }
        Outcome::failed(e.to_string())
    }
}
