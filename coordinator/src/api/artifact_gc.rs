//! Artifact gc on the coordinator (issue 15): `droverctl artifact gc` and
//! the periodic sweep carry out `origin::retention` (its rules say what is
//! kept and why).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use drover_common::artifact::Digest;
use drover_common::labels::Selector;
use drover_common::proto::{CollectGarbageResponse, ConnectionState};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::artifacts::ArtifactsService;
use crate::error::ApiError;
use crate::origin::retention::decide;

/// A blob without metadata is someone's upload in flight until this old.
const ORPHAN_AGE: Duration = Duration::from_secs(3600);

impl ArtifactsService {
    /// Rule 1's hosts: what every connected host runs and can roll back to.
    fn in_use_on_hosts(&self, used: &mut BTreeMap<String, String>) {
        for host in self.registry.list(&Selector::default()) {
            if host.state() != ConnectionState::Connected && host.state() != ConnectionState::Late {
                continue;
            }
            for s in &host.services {
                used.entry(s.current_artifact.clone())
                    .or_insert_with(|| format!("running on host {}", host.host_id));
                used.entry(s.previous_artifact.clone())
                    .or_insert_with(|| format!("previous release on host {}", host.host_id));
            }
        }
        used.remove("");
    }

    /// Decides what to keep and (unless `dry_run`) collects the rest, as
    /// `actor`.
    pub async fn collect(
        &self,
        dry_run: bool,
        actor: &str,
    ) -> Result<CollectGarbageResponse, ApiError> {
        let mut used = self.deployments.artifacts_in_use().await?;
        self.in_use_on_hosts(&mut used);
        let stored = self
            .store
            .list_with_revisions()
            .await
            .map_err(|e| ApiError::Internal(format!("listing artifacts: {e}")))?;
        let revisions: HashMap<String, u64> = stored
            .iter()
            .map(|(i, rev)| (i.sha256.clone(), *rev))
            .collect();
        let infos: Vec<_> = stored.into_iter().map(|(i, _)| i).collect();
        let by_sha: HashMap<&str, &drover_common::proto::ArtifactInfo> =
            infos.iter().map(|i| (i.sha256.as_str(), i)).collect();
        let now = drover_common::time::now_unix_ms();
        let mut decisions = decide(&infos, &used, self.retention, now);
        let mut collected_bytes = 0u64;
        let why = format!(
            "nothing runs it or can roll back to it, it is not among the last {} of its service, and it is older than {}",
            self.retention.keep_last,
            humantime::format_duration(self.retention.max_age)
        );
        for d in decisions.iter_mut().filter(|d| d.collected) {
            if dry_run {
                collected_bytes += d.size_bytes;
                continue;
            }
            let (Ok(digest), Some(info)) =
                (d.sha256.parse::<Digest>(), by_sha.get(d.sha256.as_str()))
            else {
                continue;
            };
            let key = self.store.meta_key(&digest);
            let done = self
                .deployments
                .collect_artifact(info, &key, revisions[&d.sha256], actor, &why)
                .await?;
            if done {
                self.store.remove_blob(&digest).await;
                collected_bytes += d.size_bytes;
                self.metrics.artifacts_collected.inc();
                info!(artifact = %d.sha256, service = %d.service, version = %d.version, actor, "artifact collected");
            } else {
                d.collected = false;
                d.kept_because = "changed while it was being collected; try again".into();
            }
        }
        Ok(CollectGarbageResponse {
            decisions,
            collected_bytes,
        })
    }

    /// The periodic sweep: every `every`, collect as "drover" and drop
    /// blobs collected elsewhere, until `stop`.
    pub async fn sweep_forever(self: Arc<Self>, every: Duration, stop: CancellationToken) {
        if every.is_zero() {
            return;
        }
        let mut ticker = tokio::time::interval(every);
        ticker.tick().await; // not at start: let the fleet connect first
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ticker.tick() => {}
            }
            match self.collect(false, crate::deploy::audit::DROVER).await {
                Ok(r) => {
                    let n = r.decisions.iter().filter(|d| d.collected).count();
                    if n > 0 {
                        info!(
                            collected = n,
                            bytes = r.collected_bytes,
                            "artifact gc sweep"
                        );
                    }
                }
                Err(e) => warn!(error = %e, "artifact gc sweep failed"),
            }
            match self.store.drop_orphans(ORPHAN_AGE).await {
                Ok(0) => {}
                Ok(n) => info!(
                    removed = n,
                    "dropped blobs collected by another coordinator"
                ),
                Err(e) => warn!(error = %e, "looking for collected blobs failed"),
            }
        }
    }
}
