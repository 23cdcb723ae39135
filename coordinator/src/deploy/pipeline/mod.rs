//! Pipelines: defaults, validation (`validate.rs`: every problem names
//! its field), and their records in the store under
//! `<prefix>/pipelines/<name>`.

mod validate;

pub use validate::validate;

use std::sync::Arc;

use drover_common::proto::{
    Analysis, ApprovalTimeoutOutcome, BaselineKind, HealthGate, InconclusiveAction,
    InconclusivePolicy, MetricCheck, MetricDirection, Pipeline, ReportMetrics, ServiceMetrics,
};
use prost::Message;

use crate::store::{Compare, Op, Store, StoreError, Txn};

/// Most stages in one pipeline.
pub const MAX_STAGES: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("invalid pipeline: {}", .0.join("; "))]
    Invalid(Vec<String>),
    #[error("pipeline {0:?} already exists; update it instead")]
    Exists(String),
    #[error("no pipeline {0:?}")]
    NotFound(String),
    #[error("pipeline {name:?} is at version {actual}, not {expected}; read it again and retry")]
    Conflict {
        name: String,
        expected: u64,
        actual: u64,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("stored pipeline {0:?} is unreadable: {1}")]
    Corrupt(String, String),
}

/// Fills defaults the spec left at zero (gate samples, bad samples,
/// inconclusive policy, max unavailable).
pub fn with_defaults(mut p: Pipeline) -> Pipeline {
    for stage in &mut p.stages {
        if stage.max_unavailable == 0 {
            stage.max_unavailable = 1;
        }
        gate_defaults(stage.gate.get_or_insert_with(HealthGate::default));
        if let Some(bg) = &mut stage.blue_green {
            if let Some(g) = &mut bg.pre_promotion {
                gate_defaults(g);
            }
            if let Some(g) = &mut bg.post_promotion {
                gate_defaults(g);
            }
            if bg.promotion_timeout_ms == 0 {
                bg.promotion_timeout_ms = DEFAULT_APPROVAL_TIMEOUT_MS;
            }
            if bg.on_promotion_timeout == ApprovalTimeoutOutcome::Unspecified as i32 {
                bg.on_promotion_timeout = ApprovalTimeoutOutcome::Abort as i32;
            }
            if bg.scale_down_delay_ms == 0 {
                bg.scale_down_delay_ms = DEFAULT_SCALE_DOWN_DELAY_MS;
            }
        }
        if stage.approval_timeout_ms == 0 {
            stage.approval_timeout_ms = DEFAULT_APPROVAL_TIMEOUT_MS;
        }
        if stage.on_approval_timeout == ApprovalTimeoutOutcome::Unspecified as i32 {
            stage.on_approval_timeout = ApprovalTimeoutOutcome::Abort as i32;
        }
        if let Some(canary) = &mut stage.canary {
            analysis_defaults(canary.analysis.get_or_insert_with(Analysis::default));
        }
    }
    p
}

/// How long a blue-green stage keeps the old slot running after the
/// switch when its pipeline says nothing.
pub const DEFAULT_SCALE_DOWN_DELAY_MS: u32 = 30_000;

/// Fills what a health gate leaves unsaid: 5 samples, 3 bad in a row
/// fail, an inconclusive gate fails.
fn gate_defaults(gate: &mut HealthGate) {
    if gate.bad_samples == 0 {
        gate.bad_samples = 3;
    }
    if gate.samples == 0 {
        gate.samples = 5;
    }
    if gate.inconclusive == InconclusivePolicy::Unspecified as i32 {
        gate.inconclusive = InconclusivePolicy::Fail as i32;
    }
}

/// The analysis a canary gets when its pipeline says nothing: error rate
/// and p99, alpha 0.05, the live baseline.
pub fn default_analysis() -> Analysis {
    let mut a = Analysis::default();
    analysis_defaults(&mut a);
    a
}

/// Fills what an analysis leaves unsaid with the defaults.
pub fn analysis_defaults(a: &mut Analysis) {
    if a.metrics.is_empty() {
        a.metrics = vec![
            MetricCheck {
                name: ERROR_RATE.into(),
                ..Default::default()
            },
            MetricCheck {
                name: LATENCY_P99.into(),
                ..Default::default()
            },
        ];
    }
    for m in &mut a.metrics {
        if m.direction == MetricDirection::Unspecified as i32 {
            m.direction = MetricDirection::HigherIsWorse as i32;
        }
        if m.tolerance == 0.0 {
            m.tolerance = 0.1;
        }
    }
    if a.alpha == 0.0 {
        a.alpha = 0.05;
    }
    if a.min_hosts == 0 {
        a.min_hosts = 1;
    }
    if a.min_requests == 0 {
        a.min_requests = 50;
    }
    if a.inconclusive == InconclusiveAction::Unspecified as i32 {
        a.inconclusive = InconclusiveAction::Extend as i32;
    }
    if a.max_extensions == 0 {
        a.max_extensions = 2;
    }
    if a.baseline == BaselineKind::Unspecified as i32 {
        a.baseline = BaselineKind::Live as i32;
    }
}

/// How long an approval is awaited unless the stage says otherwise.
pub const DEFAULT_APPROVAL_TIMEOUT_MS: u32 = 24 * 3600 * 1000;

/// Longest bake of one canary step or wave.
pub const MAX_BAKE_MS: u32 = 24 * 3600 * 1000;

/// Built-in metrics of canary analysis (from heartbeats).
pub const ERROR_RATE: &str = "error_rate";
pub const LATENCY_P99: &str = "latency_p99_ms";
pub const LATENCY_P50: &str = "latency_p50_ms";

/// A built-in metric or a Prometheus metric name (`[a-zA-Z_:][a-zA-Z0-9_:]*`).
pub fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        && name.len() <= 200
}

/// Pipeline records in the store.
pub struct Pipelines {
    store: Arc<dyn Store>,
    prefix: String,
}

impl Pipelines {
    pub fn new(store: Arc<dyn Store>, key_prefix: &str) -> Pipelines {
        Pipelines {
            store,
            prefix: crate::store::keys::Keys::new(key_prefix).pipelines(),
        }
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn decode(name: &str, bytes: &[u8], version: u64) -> Result<Pipeline, PipelineError> {
        let mut p = Pipeline::decode(bytes)
            .map_err(|e| PipelineError::Corrupt(name.to_string(), e.to_string()))?;
        p.version = version;
        Ok(p)
    }

    pub async fn create(&self, spec: Pipeline) -> Result<Pipeline, PipelineError> {
        let mut p = with_defaults(spec);
        validate(&p)?;
        p.updated_at_unix_ms = drover_common::time::now_unix_ms();
        p.version = 0;
        let key = self.key(&p.name);
        let r = self
            .store
            .txn(Txn {
                compares: vec![Compare::Missing(key.clone())],
                success: vec![Op::put(key, p.encode_to_vec())],
                failure: vec![],
            })
            .await?;
        if !r.succeeded {
            return Err(PipelineError::Exists(p.name));
        }
        p.version = r.revision;
        Ok(p)
    }

    /// Replaces a pipeline; with `expected_version` set, only if it is still
    /// at that version.
    pub async fn update(
        &self,
        spec: Pipeline,
        expected_version: u64,
    ) -> Result<Pipeline, PipelineError> {
        let mut p = with_defaults(spec);
        validate(&p)?;
        let key = self.key(&p.name);
        let current = self
            .store
            .get(&key)
            .await?
            .ok_or_else(|| PipelineError::NotFound(p.name.clone()))?;
        if expected_version != 0 && current.mod_revision != expected_version {
            return Err(PipelineError::Conflict {
                name: p.name,
                expected: expected_version,
                actual: current.mod_revision,
            });
        }
        p.updated_at_unix_ms = drover_common::time::now_unix_ms();
        p.version = 0;
        let r = self
            .store
            .txn(Txn {
                compares: vec![Compare::ModRevision(key.clone(), current.mod_revision)],
                success: vec![Op::put(key.clone(), p.encode_to_vec())],
                failure: vec![],
            })
            .await?;
        if !r.succeeded {
            let actual = self
                .store
                .get(&key)
                .await?
                .map(|kv| kv.mod_revision)
                .unwrap_or(0);
            return Err(PipelineError::Conflict {
                name: p.name,
                expected: current.mod_revision,
                actual,
            });
        }
        p.version = r.revision;
        Ok(p)
    }

    pub async fn get(&self, name: &str) -> Result<Pipeline, PipelineError> {
        let kv = self
            .store
            .get(&self.key(name))
            .await?
            .ok_or_else(|| PipelineError::NotFound(name.to_string()))?;
        Self::decode(name, &kv.value, kv.mod_revision)
    }

    pub async fn list(&self) -> Result<Vec<Pipeline>, PipelineError> {
        let (kvs, _) = self.store.range(&self.prefix).await?;
        kvs.iter()
            .map(|kv| {
                Self::decode(
                    kv.key.trim_start_matches(&self.prefix),
                    &kv.value,
                    kv.mod_revision,
                )
            })
            .collect()
    }

    /// Changes to any pipeline (for keeping derived views current).
    pub async fn watch(&self) -> Result<crate::store::WatchStream, PipelineError> {
        Ok(self.store.watch(&self.prefix).await?)
    }
}

/// The metrics agents must report for canary analyses: per service, every
/// metric a pipeline's analysis names that heartbeats do not carry anyway.
pub fn report_metrics(pipelines: &[Pipeline]) -> ReportMetrics {
    let mut per_service: std::collections::BTreeMap<&str, std::collections::BTreeSet<&str>> =
        Default::default();
    for p in pipelines {
        let names = p
            .stages
            .iter()
            .filter_map(|s| s.canary.as_ref()?.analysis.as_ref())
            .flat_map(|a| a.metrics.iter())
            .map(|m| m.name.as_str())
            .filter(|n| ![ERROR_RATE, LATENCY_P99, LATENCY_P50].contains(n));
        per_service.entry(&p.service).or_default().extend(names);
    }
    ReportMetrics {
        services: per_service
            .into_iter()
            .filter(|(_, names)| !names.is_empty())
            .map(|(service, names)| ServiceMetrics {
                service: service.to_string(),
                names: names.into_iter().map(str::to_string).collect(),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::embedded::EmbeddedStore;
    use drover_common::proto::Stage;

    fn stage(name: &str) -> Stage {
        Stage {
            name: name.into(),
            selector: format!("env={name}"),
            batch_percent: 10,
            ..Default::default()
        }
    }

    pub(super) fn pipeline() -> Pipeline {
        Pipeline {
            name: "hello-prod".into(),
            service: "hello".into(),
            stages: vec![stage("staging"), stage("prod")],
            ..Default::default()
        }
    }

    #[test]
    fn defaults_fill_the_gate() {
        let p = with_defaults(pipeline());
        let g = p.stages[0].gate.unwrap();
        assert_eq!(
            (g.bad_samples, g.samples, g.inconclusive()),
            (3, 5, InconclusivePolicy::Fail)
        );
        assert_eq!(p.stages[0].max_unavailable, 1);
        assert!(validate(&p).is_ok());
    }

    #[tokio::test]
    async fn create_update_get_list_with_versions() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        let pipelines = Pipelines::new(store, "/drover");
        let created = pipelines.create(pipeline()).await.unwrap();
        assert!(created.version > 0);
        assert!(matches!(
            pipelines.create(pipeline()).await,
            Err(PipelineError::Exists(_))
        ));
        let mut changed = pipeline();
        changed.stages[1].batch_percent = 50;
        let updated = pipelines
            .update(changed.clone(), created.version)
            .await
            .unwrap();
        assert!(updated.version > created.version);
        let stale = pipelines
            .update(changed, created.version)
            .await
            .unwrap_err();
        assert!(matches!(stale, PipelineError::Conflict { .. }), "{stale}");
        let got = pipelines.get("hello-prod").await.unwrap();
        assert_eq!(
            (got.version, got.stages[1].batch_percent),
            (updated.version, 50)
        );
        assert_eq!(pipelines.list().await.unwrap().len(), 1);
        assert!(matches!(
            pipelines.get("nope").await,
            Err(PipelineError::NotFound(_))
        ));
        let mut unknown = pipeline();
        unknown.name = "other".into();
        assert!(matches!(
            pipelines.update(unknown, 0).await,
            Err(PipelineError::NotFound(_))
        ));
    }
}
