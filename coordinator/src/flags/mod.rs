//! Feature flags per environment, without a deploy (`assign.rs` says which
//! hosts each is on for). A flag's state (`flags/<pipeline>/<env>/<name>`)
//! and its audit event are written in one transaction, compared on the
//! key's revision; every coordinator keeps its connected hosts' flags
//! current ([`push::keep_hosts_current`]), pushing on the agent stream as
//! soon as the store says a flag changed.

pub mod assign;
pub mod judge;
pub mod push;

use std::sync::Arc;

use drover_common::labels::Selector;
use drover_common::proto::{AuditEvent, AuditKind, Flag, FlagRef, FlagState, SetFlagRequest};
use prost::Message;

use crate::deploy::deployments::DeployError;
use crate::deploy::ledger::Ledger;
use crate::deploy::pipeline::Pipelines;
use crate::fleet::Registry;
use crate::store::{Compare, Op};

pub struct Flags {
    ledger: Arc<Ledger>,
    pipelines: Arc<Pipelines>,
    registry: Arc<Registry>,
}

/// Where a flag is: (pipeline, environment, name).
pub fn key_of(s: &FlagState) -> assign::FlagKey {
    (
        s.pipeline.clone(),
        s.environment.clone(),
        s.flag.as_ref().map(|f| f.name.clone()).unwrap_or_default(),
    )
}

fn describe(flag: Option<&Flag>) -> String {
    match flag {
        None => "absent (off)".into(),
        Some(f) if f.selector.is_empty() => format!("{}%", f.percent),
        Some(f) => format!("{}% of {}", f.percent, f.selector),
    }
}

impl Flags {
    pub fn new(
        ledger: Arc<Ledger>,
        pipelines: Arc<Pipelines>,
        registry: Arc<Registry>,
    ) -> Arc<Flags> {
        Arc::new(Flags {
            ledger,
            pipelines,
            registry,
        })
    }

    /// Sets a flag (bad input changes nothing): the setting it replaces is
    /// what a rollback returns to.
    pub async fn set(&self, req: SetFlagRequest, who: &str) -> Result<FlagState, DeployError> {
        let mut flag = req
            .flag
            .ok_or_else(|| DeployError::Invalid("flag: missing".into()))?;
        if let Some(why) = assign::invalid(&flag) {
            return Err(DeployError::Invalid(why));
        }
        let service = self.environment(&req.pipeline, &req.environment).await?;
        flag.updated_by = who.to_string();
        flag.updated_at_unix_ms = self.ledger.now();
        self.change(
            &req.pipeline,
            &req.environment,
            &flag.name.clone(),
            &service,
            who,
            |old| {
                Ok(FlagState {
                    pipeline: req.pipeline.clone(),
                    environment: req.environment.clone(),
                    previous: old.and_then(|o| o.flag.clone()),
                    flag: Some(flag.clone()),
                    ..Default::default()
                })
            },
        )
        .await
    }

    /// Returns a flag to its previous setting; one that had none is turned
    /// off (0%). Nothing to return to: FAILED_PRECONDITION.
    pub async fn rollback(&self, r: FlagRef, who: &str) -> Result<FlagState, DeployError> {
        self.rollback_because(r, who, None).await
    }

    /// [`Flags::rollback`] because of a judgement, which the state it
    /// returns to keeps (so `list` says why the flag went back).
    pub async fn rollback_because(
        &self,
        r: FlagRef,
        who: &str,
        judged: Option<(drover_common::proto::AnalysisVerdict, String)>,
    ) -> Result<FlagState, DeployError> {
        let service = self.environment(&r.pipeline, &r.environment).await?;
        let now = self.ledger.now();
        self.change(&r.pipeline, &r.environment, &r.name, &service, who, |old| {
            let old = old.ok_or_else(|| {
                DeployError::NotFound(format!(
                    "no flag {:?} in {}/{}",
                    r.name, r.pipeline, r.environment
                ))
            })?;
            let current = old.flag.clone().unwrap_or_default();
            let mut back = match &old.previous {
                Some(p) => p.clone(),
                None if current.percent > 0 => Flag {
                    percent: 0,
                    ..current.clone()
                },
                None => {
                    return Err(DeployError::Conflict(format!(
                        "flag {:?} in {}/{} is off and has no earlier setting to return to",
                        r.name, r.pipeline, r.environment
                    )));
                }
            };
            back.updated_by = who.to_string();
            back.updated_at_unix_ms = now;
            let (verdict, verdict_reason) = judged.clone().unwrap_or_default();
            Ok(FlagState {
                pipeline: r.pipeline.clone(),
                environment: r.environment.clone(),
                flag: Some(back),
                previous: None,
                verdict: verdict as i32,
                verdict_reason,
                ..Default::default()
            })
        })
        .await
    }

    /// Writes the state `next` makes of the current one, with its audit
    /// event, if nobody changed the flag meanwhile (else again).
    async fn change(
        &self,
        pipeline: &str,
        environment: &str,
        name: &str,
        service: &str,
        who: &str,
        next: impl Fn(Option<&FlagState>) -> Result<FlagState, DeployError>,
    ) -> Result<FlagState, DeployError> {
        let key = self.ledger.keys().flag(pipeline, environment, name);
        loop {
            let current = self.ledger.store().get(&key).await?;
            let old = current
                .as_ref()
                .and_then(|kv| FlagState::decode(kv.value.as_slice()).ok());
            let new = next(old.as_ref())?;
            let compare = match &current {
                Some(kv) => Compare::ModRevision(key.clone(), kv.mod_revision),
                None => Compare::Missing(key.clone()),
            };
            let event = AuditEvent {
                at_unix_ms: self.ledger.now(),
                service: service.to_string(),
                pipeline: pipeline.to_string(),
                stage: environment.to_string(),
                actor: who.to_string(),
                event: AuditKind::FlagChanged as i32,
                message: format!(
                    "flag {name} in {pipeline}/{environment}: {} → {}",
                    describe(old.as_ref().and_then(|o| o.flag.as_ref())),
                    describe(new.flag.as_ref())
                ),
                ..Default::default()
            };
            if self
                .ledger
                .record_with(
                    &event,
                    vec![compare],
                    vec![Op::put(key.clone(), new.encode_to_vec())],
                )
                .await?
            {
                tracing::info!(%pipeline, %environment, flag = %name, %who, "flag changed");
                return self.counted(new).await;
            }
        }
    }

    /// The service of `pipeline`, if `environment` is one of its stages.
    async fn environment(&self, pipeline: &str, environment: &str) -> Result<String, DeployError> {
        let p = self
            .pipelines
            .get(pipeline)
            .await
            .map_err(|e| DeployError::Invalid(format!("pipeline: {e}")))?;
        if !p.stages.iter().any(|s| s.name == environment) {
            let names: Vec<&str> = p.stages.iter().map(|s| s.name.as_str()).collect();
            return Err(DeployError::Invalid(format!(
                "environment: pipeline {pipeline} has no stage {environment:?} (its stages: {})",
                names.join(", ")
            )));
        }
        Ok(p.service)
    }

    /// Every flag (of `pipeline`, or all), with how many connected hosts
    /// each is on for.
    pub async fn list(&self, pipeline: &str) -> Result<Vec<FlagState>, DeployError> {
        let mut states = self.all().await?;
        states.retain(|s| pipeline.is_empty() || s.pipeline == pipeline);
        let assigned = self.assignment(&states).await?;
        for s in &mut states {
            (s.hosts_on, s.hosts_eligible) = assigned.count(&key_of(s));
        }
        Ok(states)
    }

    async fn counted(&self, mut state: FlagState) -> Result<FlagState, DeployError> {
        let assigned = self.assignment(std::slice::from_ref(&state)).await?;
        (state.hosts_on, state.hosts_eligible) = assigned.count(&key_of(&state));
        Ok(state)
    }

    /// The stored state of the flag at `key`.
    pub async fn get(&self, key: &assign::FlagKey) -> Result<Option<FlagState>, DeployError> {
        let (pipeline, environment, name) = key;
        Ok(self
            .ledger
            .store()
            .get(&self.ledger.keys().flag(pipeline, environment, name))
            .await?
            .and_then(|kv| FlagState::decode(kv.value.as_slice()).ok()))
    }

    /// The service `pipeline` deploys.
    pub async fn service_of(&self, pipeline: &str) -> Result<String, DeployError> {
        Ok(self.pipelines.get(pipeline).await?.service)
    }

    /// Records the judgement of the setting `judged` (only if it is still
    /// the flag's setting), with an ANALYSIS audit event; whether it was.
    pub async fn judged(
        &self,
        judged: &FlagState,
        verdict: drover_common::proto::AnalysisVerdict,
        reason: &str,
    ) -> Result<bool, DeployError> {
        let key = key_of(judged);
        let store_key = self.ledger.keys().flag(&key.0, &key.1, &key.2);
        let Some(kv) = self.ledger.store().get(&store_key).await? else {
            return Ok(false);
        };
        let Ok(mut now) = FlagState::decode(kv.value.as_slice()) else {
            return Ok(false);
        };
        let at = |s: &FlagState| s.flag.as_ref().map(|f| f.updated_at_unix_ms);
        if at(&now) != at(judged) {
            return Ok(false);
        }
        now.verdict = verdict as i32;
        now.verdict_reason = reason.to_string();
        let event = AuditEvent {
            at_unix_ms: self.ledger.now(),
            service: self.service_of(&key.0).await?,
            pipeline: key.0.clone(),
            stage: key.1.clone(),
            actor: judge::JUDGE.to_string(),
            event: AuditKind::Analysis as i32,
            reason: reason.to_string(),
            message: format!(
                "flag {} in {}/{} judged {}: {reason}",
                key.2,
                key.0,
                key.1,
                verdict
                    .as_str_name()
                    .trim_start_matches("ANALYSIS_VERDICT_")
            ),
            ..Default::default()
        };
        self.ledger
            .record_with(
                &event,
                vec![Compare::ModRevision(store_key.clone(), kv.mod_revision)],
                vec![Op::put(store_key, now.encode_to_vec())],
            )
            .await
    }

    /// Every stored flag.
    pub async fn all(&self) -> Result<Vec<FlagState>, DeployError> {
        let (kvs, _) = self
            .ledger
            .store()
            .range(&self.ledger.keys().flags())
            .await?;
        Ok(kvs
            .iter()
            .filter_map(|kv| FlagState::decode(kv.value.as_slice()).ok())
            .collect())
    }

    /// `states` assigned to the connected hosts (`assign::assign`).
    pub async fn assignment(
        &self,
        states: &[FlagState],
    ) -> Result<assign::Assignment, DeployError> {
        let pipelines = self.pipelines.list().await?;
        let hosts: Vec<_> = self
            .registry
            .list(&Selector::default())
            .into_iter()
            .filter(|h| h.state() != drover_common::proto::ConnectionState::Gone)
            .collect();
        let labelled: Vec<assign::HostLabels> = hosts
            .iter()
            .map(|h| assign::HostLabels {
                id: &h.host_id,
                labels: &h.labels,
            })
            .collect();
        Ok(assign::assign(states, &pipelines, &labelled))
    }

    pub(crate) fn ledger(&self) -> &Arc<Ledger> {
        &self.ledger
    }

    pub(crate) fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }
}
