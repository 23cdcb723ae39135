//! Pipelines: validation (every problem names its field), defaults, and
//! their records in the store under `<prefix>/pipelines/<name>`.

use std::collections::HashSet;
use std::sync::Arc;

use drover_common::ids::{validate_pipeline_name, validate_service};
use drover_common::labels::Selector;
use drover_common::proto::{
    Analysis, ApprovalTimeoutOutcome, BaselineKind, Canary, HealthGate, InconclusiveAction,
    InconclusivePolicy, MetricCheck, MetricDirection, Pipeline, ReportMetrics, ServiceMetrics,
    Stage, Strategy,
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
fn analysis_defaults(a: &mut Analysis) {
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

/// The problems of a stage's canary, each naming its field.
fn validate_canary(c: &Canary, at: &dyn Fn(&str) -> String, problems: &mut Vec<String>) {
    if c.steps.is_empty() {
        problems.push(format!("{}: at least one step", at("canary.steps")));
    }
    let mut last: Option<(u32, u32)> = None;
    for (k, step) in c.steps.iter().enumerate() {
        let f = |field: &str| at(&format!("canary.steps[{k}].{field}"));
        match (step.percent, step.count) {
            (0, 0) => problems.push(format!("{}: give percent or count", f("percent"))),
            (p, 0) if !(1..=99).contains(&p) => {
                problems.push(format!("{}: must be between 1 and 99", f("percent")))
            }
            (p, c) if p > 0 && c > 0 => {
                problems.push(format!("{}: give percent or count, not both", f("percent")))
            }
            _ => {}
        }
        if let Some((lp, lc)) = last
            && ((step.percent > 0 && step.percent <= lp) || (step.count > 0 && step.count <= lc))
        {
            problems.push(format!(
                "{}: cohorts must grow from step to step",
                f("percent")
            ));
        }
        last = Some((step.percent, step.count));
        if step.bake_ms == 0 || step.bake_ms > MAX_BAKE_MS {
            problems.push(format!(
                "{}: must be between 1 and {MAX_BAKE_MS} ms",
                f("bake_ms")
            ));
        }
    }
    let Some(a) = &c.analysis else { return };
    if !(a.alpha > 0.0 && a.alpha <= 0.5) {
        problems.push(format!(
            "{}: must be in (0, 0.5]",
            at("canary.analysis.alpha")
        ));
    }
    if InconclusiveAction::try_from(a.inconclusive).is_err() {
        problems.push(format!(
            "{}: unknown action {}",
            at("canary.analysis.inconclusive"),
            a.inconclusive
        ));
    }
    let mut seen = HashSet::new();
    for (k, m) in a.metrics.iter().enumerate() {
        let f = |field: &str| at(&format!("canary.analysis.metrics[{k}].{field}"));
        if !is_metric_name(&m.name) {
            problems.push(format!(
                "{}: {:?} is neither a built-in metric ({ERROR_RATE}, {LATENCY_P99}, {LATENCY_P50}) nor a Prometheus metric name",
                f("name"),
                m.name
            ));
        }
        if !seen.insert(m.name.as_str()) {
            problems.push(format!("{}: {:?} is judged twice", f("name"), m.name));
        }
        if MetricDirection::try_from(m.direction).is_err() {
            problems.push(format!(
                "{}: unknown direction {}",
                f("direction"),
                m.direction
            ));
        }
        for (name, v) in [
            ("max", m.max),
            ("max_ratio", m.max_ratio),
            ("tolerance", m.tolerance),
        ] {
            if !v.is_finite() || v < 0.0 {
                problems.push(format!("{}: must be zero or positive", f(name)));
            }
        }
    }
}

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

/// Every problem of a pipeline spec, each naming its field.
pub fn validate(p: &Pipeline) -> Result<(), PipelineError> {
    let mut problems = Vec::new();
    if let Err(e) = validate_pipeline_name(&p.name) {
        problems.push(format!("name: {e}"));
    }
    if let Err(e) = validate_service(&p.service) {
        problems.push(format!("service: {e}"));
    }
    if p.stages.is_empty() {
        problems.push("stages: at least one stage is required".into());
    }
    if p.stages.len() > MAX_STAGES {
        problems.push(format!("stages: at most {MAX_STAGES} stages"));
    }
    let mut names = HashSet::new();
    for (i, s) in p.stages.iter().enumerate() {
        let at = |field: &str| format!("stages[{i}].{field}");
        if let Err(e) = validate_pipeline_name(&s.name) {
            problems.push(format!(
                "{}: {}",
                at("name"),
                e.replace("pipeline name", "stage name")
            ));
        }
        if !names.insert(s.name.as_str()) {
            problems.push(format!(
                "{}: {:?} is used by an earlier stage",
                at("name"),
                s.name
            ));
        }
        match Selector::parse(&s.selector) {
            Ok(sel) if sel.is_empty() => problems.push(format!(
                "{}: must select some hosts (e.g. env=prod)",
                at("selector")
            )),
            Ok(_) => {}
            Err(e) => problems.push(format!("{}: {e}", at("selector"))),
        }
        match (s.batch_size, s.batch_percent) {
            (0, 0) => problems.push(format!(
                "{}: give batch_size or batch_percent",
                at("batch_size")
            )),
            (n, 0) if n > 0 => {}
            (0, pct) if (1..=100).contains(&pct) => {}
            (0, _) => problems.push(format!(
                "{}: must be between 1 and 100",
                at("batch_percent")
            )),
            _ => problems.push(format!(
                "{}: give batch_size or batch_percent, not both",
                at("batch_size")
            )),
        }
        if let Some(g) = &s.gate {
            validate_gate(g, "gate", &at, &mut problems);
        }
        if let Some(c) = &s.canary {
            validate_canary(c, &at, &mut problems);
        }
        if let Some(r) = &s.router {
            match (r.haproxy.is_empty(), r.name.is_empty()) {
                (false, false) => {
                    problems.push(format!("{}: give haproxy or name, not both", at("router")))
                }
                (true, false) if !crate::router::valid_name(&r.name) => problems.push(format!(
                    "{}: {:?} is not a router name (letters, digits, '-', '_', '.', ':')",
                    at("router.name"),
                    r.name
                )),
                (true, false) => {}
                _ => {
                    if let Err(e) = r.haproxy.parse::<crate::router::haproxy::RuntimeAddr>() {
                        problems.push(format!("{}: {e}", at("router.haproxy")));
                    }
                }
            }
            if !crate::router::valid_name(&r.backend) {
                problems.push(format!(
                    "{}: {:?} is not a backend name (letters, digits, '-', '_', '.', ':')",
                    at("router.backend"),
                    r.backend
                ));
            }
        }
        match Strategy::try_from(s.strategy) {
            Ok(Strategy::BlueGreen | Strategy::WeightedCanary) => {
                validate_blue_green(s, &at, &mut problems)
            }
            Ok(Strategy::Rolling) => {
                if s.blue_green.is_some() {
                    problems.push(format!(
                        "{}: given, but the strategy is rolling (set strategy = \"STRATEGY_BLUE_GREEN\")",
                        at("blue_green")
                    ));
                }
            }
            Err(_) => problems.push(format!(
                "{}: unknown strategy {}",
                at("strategy"),
                s.strategy
            )),
        }
        if ApprovalTimeoutOutcome::try_from(s.on_approval_timeout).is_err() {
            problems.push(format!(
                "{}: unknown outcome {}",
                at("on_approval_timeout"),
                s.on_approval_timeout
            ));
        }
        if s.required_approvals > 10 {
            problems.push(format!("{}: at most 10", at("required_approvals")));
        }
        if (s.required_approvals > 1 || s.four_eyes || !s.approver_roles.is_empty())
            && !s.requires_approval
        {
            problems.push(format!(
                "{}: required_approvals, four_eyes and approver_roles need requires_approval = true",
                at("requires_approval")
            ));
        }
        for r in &s.approver_roles {
            if drover_common::tls::identity::validate_name(r).is_err() {
                problems.push(format!(
                    "{}: {r:?} is not a role name",
                    at("approver_roles")
                ));
            }
        }
        let mut wave_names = HashSet::new();
        for (k, w) in s.waves.iter().enumerate() {
            let f = |field: &str| at(&format!("waves[{k}].{field}"));
            if w.name.is_empty() || w.name.len() > 63 {
                problems.push(format!("{}: 1-63 characters", f("name")));
            } else if !wave_names.insert(w.name.as_str()) {
                problems.push(format!(
                    "{}: {:?} is used by an earlier wave",
                    f("name"),
                    w.name
                ));
            }
            if w.selectors.is_empty() {
                problems.push(format!(
                    "{}: at least one selector (e.g. region=eu)",
                    f("selectors")
                ));
            }
            for (j, sel) in w.selectors.iter().enumerate() {
                match Selector::parse(sel) {
                    Ok(p) if p.is_empty() => problems.push(format!(
                        "{}: must select some hosts",
                        f(&format!("selectors[{j}]"))
                    )),
                    Ok(_) => {}
                    Err(e) => problems.push(format!("{}: {e}", f(&format!("selectors[{j}]")))),
                }
            }
            if w.bake_ms > MAX_BAKE_MS {
                problems.push(format!("{}: at most {MAX_BAKE_MS} ms", f("bake_ms")));
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(PipelineError::Invalid(problems))
    }
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

/// Checks a health gate's limits; problems are named `field.…`.
fn validate_gate(
    g: &HealthGate,
    field: &str,
    at: &dyn Fn(&str) -> String,
    problems: &mut Vec<String>,
) {
    for (name, v) in [
        ("max_error_rate", g.max_error_rate),
        ("max_error_rate_ratio", g.max_error_rate_ratio),
        ("max_p99_ms", g.max_p99_ms),
        ("max_p99_ratio", g.max_p99_ratio),
    ] {
        if !v.is_finite() || v < 0.0 {
            problems.push(format!(
                "{}: must be zero (no limit) or positive",
                at(&format!("{field}.{name}"))
            ));
        }
    }
    if g.max_error_rate > 1.0 {
        problems.push(format!(
            "{}: is a share, at most 1.0",
            at(&format!("{field}.max_error_rate"))
        ));
    }
    if g.bad_samples > g.samples && g.samples > 0 {
        problems.push(format!(
            "{}: cannot exceed {field}.samples ({})",
            at(&format!("{field}.bad_samples")),
            g.samples
        ));
    }
    if InconclusivePolicy::try_from(g.inconclusive).is_err() {
        problems.push(format!(
            "{}: unknown policy {}",
            at(&format!("{field}.inconclusive")),
            g.inconclusive
        ));
    }
}

/// A blue-green stage needs a router with a backend, moves traffic, not
/// host cohorts (no canary), and its gates are gates.
fn validate_blue_green(s: &Stage, at: &dyn Fn(&str) -> String, problems: &mut Vec<String>) {
    if s.router.is_none() {
        problems.push(format!(
            "{}: a blue-green stage needs a router (the backend whose <host>-blue and <host>-green servers it switches)",
            at("router")
        ));
    }
    match (s.strategy(), &s.canary) {
        (Strategy::BlueGreen, Some(_)) => problems.push(format!(
            "{}: a blue-green stage has no host canary (its pre-promotion gate judges the new slot; STRATEGY_WEIGHTED_CANARY canaries by traffic)",
            at("canary")
        )),
        (Strategy::WeightedCanary, None) => problems.push(format!(
            "{}: a weighted canary needs its steps (percent of the traffic, e.g. 1, 5, 25)",
            at("canary")
        )),
        (Strategy::WeightedCanary, Some(c)) => {
            // Percents are checked as for any canary (validate_canary).
            for (k, step) in c.steps.iter().enumerate() {
                if step.count > 0 {
                    problems.push(format!(
                        "{}: a weighted canary's steps give a percent of the traffic, not a count of hosts",
                        at(&format!("canary.steps[{k}].count"))
                    ));
                }
            }
        }
        _ => {}
    }
    let Some(bg) = &s.blue_green else {
        return;
    };
    if !bg.preview_backend.is_empty() && !crate::router::valid_name(&bg.preview_backend) {
        problems.push(format!(
            "{}: {:?} is not a backend name (letters, digits, '-', '_', '.', ':')",
            at("blue_green.preview_backend"),
            bg.preview_backend
        ));
    }
    if s.router
        .as_ref()
        .is_some_and(|r| !bg.preview_backend.is_empty() && r.backend == bg.preview_backend)
    {
        problems.push(format!(
            "{}: must differ from router.backend",
            at("blue_green.preview_backend")
        ));
    }
    if let Some(g) = &bg.pre_promotion {
        validate_gate(g, "blue_green.pre_promotion", at, problems);
    }
    if !bg.green_selector.is_empty() {
        if let Err(e) = drover_common::labels::Selector::parse(&bg.green_selector) {
            problems.push(format!("{}: {e}", at("blue_green.green_selector")));
        }
        if !s.waves.is_empty() {
            problems.push(format!(
                "{}: host groups switch all at once; waves are for slots",
                at("blue_green.green_selector")
            ));
        }
    }
    if let Some(g) = &bg.post_promotion {
        validate_gate(g, "blue_green.post_promotion", at, problems);
    }
    if ApprovalTimeoutOutcome::try_from(bg.on_promotion_timeout).is_err() {
        problems.push(format!(
            "{}: unknown outcome {}",
            at("blue_green.on_promotion_timeout"),
            bg.on_promotion_timeout
        ));
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

    fn pipeline() -> Pipeline {
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

    #[test]
    fn every_problem_names_its_field() {
        let mut p = pipeline();
        p.name = "Hello".into();
        p.stages[0].selector = "".into();
        p.stages[1].name = "staging".into();
        p.stages[1].batch_size = 3;
        p.stages[0].batch_percent = 101;
        p.stages[0].gate = Some(HealthGate {
            max_error_rate: -1.0,
            bad_samples: 9,
            samples: 5,
            ..Default::default()
        });
        let PipelineError::Invalid(problems) = validate(&p).unwrap_err() else {
            panic!()
        };
        let fields: Vec<&str> = problems
            .iter()
            .map(|p| p.split(':').next().unwrap())
            .collect();
        assert_eq!(
            fields,
            [
                "name",
                "stages[0].selector",
                "stages[0].batch_percent",
                "stages[0].gate.max_error_rate",
                "stages[0].gate.bad_samples",
                "stages[1].name",
                "stages[1].batch_size",
            ],
            "{problems:?}"
        );
        // A router whose address or backend is not one.
        let mut routed = pipeline();
        routed.stages[0].router = Some(drover_common::proto::RouterTarget {
            haproxy: "haproxy.sock".into(),
            backend: "web\nshutdown".into(),
            ..Default::default()
        });
        let PipelineError::Invalid(problems) = validate(&routed).unwrap_err() else {
            panic!()
        };
        assert!(
            problems[0].starts_with("stages[0].router.haproxy: "),
            "{problems:?}"
        );
        assert!(
            problems[1].starts_with("stages[0].router.backend: "),
            "{problems:?}"
        );
        let problems_of = |p: &Pipeline| match validate(p) {
            Err(PipelineError::Invalid(problems)) => problems,
            other => panic!("{other:?}"),
        };
        // Blue-green without a router, with a host canary, a preview that
        // is the live backend, a router named twice over.
        let mut bg = pipeline();
        bg.stages[0].strategy = Strategy::BlueGreen as i32;
        assert_eq!(
            problems_of(&bg)[0].split(':').next(),
            Some("stages[0].router"),
            "{:?}",
            problems_of(&bg)
        );
        bg.stages[0].router = Some(drover_common::proto::RouterTarget {
            haproxy: "unix:/run/haproxy.sock".into(),
            backend: "web".into(),
            name: "edge".into(),
            ..Default::default()
        });
        bg.stages[0].canary = Some(Canary::default());
        bg.stages[0].blue_green = Some(drover_common::proto::BlueGreen {
            preview_backend: "web".into(),
            ..Default::default()
        });
        let problems = problems_of(&bg);
        for field in [
            "stages[0].router: give haproxy or name",
            "stages[0].canary: a blue-green stage has no host canary",
            "stages[0].blue_green.preview_backend: must differ",
        ] {
            assert!(
                problems.iter().any(|p| p.starts_with(field)),
                "{field}: {problems:?}"
            );
        }
        // A weighted canary's steps are rising percents, never counts.
        let mut weighted = pipeline();
        weighted.stages[0].strategy = Strategy::WeightedCanary as i32;
        weighted.stages[0].router = Some(drover_common::proto::RouterTarget {
            name: "edge".into(),
            backend: "web".into(),
            ..Default::default()
        });
        let step = |percent, count| drover_common::proto::CanaryStep {
            percent,
            count,
            bake_ms: 1000,
        };
        weighted.stages[0].canary = Some(Canary {
            steps: vec![step(5, 0), step(5, 0), step(0, 2), step(100, 0)],
            ..Default::default()
        });
        let problems = problems_of(&weighted);
        let bad: Vec<&str> = problems
            .iter()
            .map(|p| p.split(':').next().unwrap())
            .collect();
        assert_eq!(
            bad,
            [
                "stages[0].canary.steps[1].percent",
                "stages[0].canary.steps[3].percent",
                "stages[0].canary.steps[2].count",
            ],
            "{problems:?}"
        );
        weighted.stages[0].canary = Some(Canary {
            steps: vec![step(1, 0), step(5, 0), step(25, 0)],
            ..Default::default()
        });
        assert!(validate(&weighted).is_ok(), "{:?}", validate(&weighted));
        // Host groups: a selector that is one, and no waves.
        let mut groups = weighted.clone();
        groups.stages[0].blue_green = Some(drover_common::proto::BlueGreen {
            green_selector: "fleet=".into(),
            ..Default::default()
        });
        groups.stages[0].waves = vec![drover_common::proto::Wave {
            name: "eu".into(),
            selectors: vec!["region=eu".into()],
            bake_ms: 0,
        }];
        let problems = problems_of(&groups);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems
                .iter()
                .all(|p| p.starts_with("stages[0].blue_green.green_selector: ")),
            "{problems:?}"
        );
        // A strategy this coordinator does not know.
        let mut unknown = pipeline();
        unknown.stages[0].strategy = 7;
        assert!(problems_of(&unknown)[0].starts_with("stages[0].strategy: unknown strategy 7"));
        let mut empty = pipeline();
        empty.stages.clear();
        assert!(
            validate(&empty)
                .unwrap_err()
                .to_string()
                .contains("stages: at least one stage")
        );
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
