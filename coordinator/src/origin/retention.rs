//! What the origin keeps (issue 15): artifact retention, decided purely
//! here and carried out by `ArtifactsService::collect_garbage` (by hand,
//! `droverctl artifact gc`) and its periodic sweep.
//!
//! Rules, in the order a reason is given:
//! 1. An artifact something still needs is kept: what an environment runs,
//!    a pipeline's known-good release, what a live deploy rolls out or back
//!    to (`Deployments::artifacts_in_use`), what a connected host runs or
//!    can roll back to (its current and previous release).
//! 2. The last `keep_last` uploads of each service are kept.
//! 3. An artifact younger than `max_age` is kept.
//! 4. Everything else is collected: its metadata removed and the removal
//!    audited in one transaction (so two coordinators sweeping at once
//!    audit it once), then its blob and index removed from this
//!    coordinator's disk; other coordinators drop their copies when they
//!    find a blob without metadata (`BlobStore::drop_orphans`).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use drover_common::proto::{ArtifactInfo, GarbageDecision};

/// `--artifact-keep-last`, `--artifact-retention`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionPolicy {
    pub keep_last: usize,
    pub max_age: Duration,
}

impl Default for RetentionPolicy {
    fn default() -> Self {
        RetentionPolicy {
            keep_last: 5,
            max_age: Duration::from_secs(90 * 24 * 3600),
        }
    }
}

/// Rules 1–4 for every stored artifact, newest first; `in_use` maps an
/// artifact to why something needs it.
pub fn decide(
    artifacts: &[ArtifactInfo],
    in_use: &BTreeMap<String, String>,
    policy: RetentionPolicy,
    now_unix_ms: u64,
) -> Vec<GarbageDecision> {
    let mut newest: Vec<&ArtifactInfo> = artifacts.iter().collect();
    newest.sort_by(|a, b| {
        b.uploaded_at_unix_ms
            .cmp(&a.uploaded_at_unix_ms)
            .then(a.sha256.cmp(&b.sha256))
    });
    let mut seen_of_service: HashMap<&str, usize> = HashMap::new();
    let max_age_ms = policy.max_age.as_millis() as u64;
    newest
        .into_iter()
        .map(|a| {
            let rank = seen_of_service.entry(a.service.as_str()).or_insert(0);
            *rank += 1;
            let kept_because = if let Some(why) = in_use.get(&a.sha256) {
                why.clone()
            } else if *rank <= policy.keep_last {
                format!("one of the last {} of {}", policy.keep_last, a.service)
            } else if now_unix_ms.saturating_sub(a.uploaded_at_unix_ms) < max_age_ms {
                format!(
                    "younger than {}",
                    humantime::format_duration(policy.max_age)
                )
            } else {
                String::new()
            };
            GarbageDecision {
                sha256: a.sha256.clone(),
                service: a.service.clone(),
                version: a.version.clone(),
                uploaded_at_unix_ms: a.uploaded_at_unix_ms,
                size_bytes: a.size_bytes,
                collected: kept_because.is_empty(),
                kept_because,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 24 * 3600 * 1000;

    fn artifact(sha: &str, service: &str, age_days: u64, now: u64) -> ArtifactInfo {
        ArtifactInfo {
            sha256: sha.into(),
            service: service.into(),
            uploaded_at_unix_ms: now - age_days * DAY,
            ..Default::default()
        }
    }

    #[test]
    fn needed_recent_and_young_artifacts_stay_the_rest_go() {
        let now = 1_000 * DAY;
        let artifacts = vec![
            artifact("old-running", "web", 400, now),
            artifact("old-unused", "web", 300, now),
            artifact("old-known-good", "web", 200, now),
            artifact("recent-1", "web", 100, now),
            artifact("recent-2", "web", 99, now),
            artifact("young", "api", 10, now),
            artifact("api-old", "api", 120, now),
            artifact("api-older", "api", 130, now),
        ];
        let in_use: BTreeMap<String, String> = [
            ("old-running".to_string(), "running in web/prod".to_string()),
            (
                "old-known-good".to_string(),
                "known-good of web".to_string(),
            ),
        ]
        .into();
        let policy = RetentionPolicy {
            keep_last: 2,
            max_age: Duration::from_secs(90 * 24 * 3600),
        };
        let decisions = decide(&artifacts, &in_use, policy, now);
        let why: BTreeMap<&str, &str> = decisions
            .iter()
            .map(|d| (d.sha256.as_str(), d.kept_because.as_str()))
            .collect();
        assert_eq!(why["old-running"], "running in web/prod");
        assert_eq!(why["old-known-good"], "known-good of web");
        assert_eq!(why["recent-1"], "one of the last 2 of web");
        assert_eq!(why["recent-2"], "one of the last 2 of web");
        assert_eq!(why["young"], "one of the last 2 of api");
        assert_eq!(why["api-old"], "one of the last 2 of api");
        assert_eq!(why["old-unused"], "");
        assert_eq!(why["api-older"], "");
        let collected: Vec<&str> = decisions
            .iter()
            .filter(|d| d.collected)
            .map(|d| d.sha256.as_str())
            .collect();
        assert_eq!(collected, ["api-older", "old-unused"], "newest first");
        // Nothing is older than a year's retention: nothing goes.
        let patient = RetentionPolicy {
            keep_last: 0,
            max_age: Duration::from_secs(500 * 24 * 3600),
        };
        assert!(
            decide(&artifacts, &in_use, patient, now)
                .iter()
                .all(|d| !d.collected)
        );
    }
}
