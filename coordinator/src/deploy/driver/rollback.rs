//! [`Action::RollBack`](super::Action::RollBack): every touched host
//! returns to its stage's previous release (what ran in that environment
//! when the deploy started, else the pipeline's known good), most recently
//! switched first, up to [`ROLLBACK_PARALLELISM`] at once. Nothing is
//! downloaded: the agents still hold the release. Results are written once
//! at the end, so writes do not grow with hosts; a crash before that write
//! repeats the rollback, which the agents answer from their records. A
//! host whose stage names a router is drained around its rollback and made
//! ready once it is back ([`super::traffic`]), so a rollback drops no
//! requests either and a host left drained by its failed restart takes
//! traffic again once it runs the old release. A blue-green stage switches
//! its traffic back instead ([`super::blue_green`], rule 6).

use std::sync::Arc;
use std::time::Duration;

use drover_common::proto::{Command, CommandStatus, HostOutcome, RollbackCommand, command};

use super::batch::COMMAND_TIMEOUT;
use super::{Driver, traffic};
use crate::deploy::deployments::DeployError;
use crate::deploy::machine::Event;

/// Hosts rolled back at once.
const ROLLBACK_PARALLELISM: usize = 256;
/// How long a host that is away gets to come back for its rollback.
const ROLLBACK_PATIENCE: Duration = Duration::from_secs(60);

impl Driver {
    pub(super) async fn roll_back(
        self: &Arc<Self>,
        id: &str,
        epoch: u64,
    ) -> Result<Event, DeployError> {
        let (rec, _) = self.ledger.load(id).await?;
        let shard = self.ledger.shard_of_pipeline(&rec.pipeline);
        let permits = Arc::new(tokio::sync::Semaphore::new(ROLLBACK_PARALLELISM));
        let mut configs = Vec::new();
        for stage in 0..rec.snapshot.stages.len() {
            configs.push(self.rollback_config(&rec, stage).await?);
        }
        let mut tasks = tokio::task::JoinSet::new();
        for host in rec.touched.iter().rev() {
            let permit = permits
                .clone()
                .acquire_owned()
                .await
                .expect("semaphore is never closed");
            let effects = self.effects.clone();
            let cmd = Command {
                command_id: format!("{id}/rollback/{host}"),
                shard,
                epoch,
                action: Some(command::Action::Rollback(
                    rec.stage_of(host)
                        .and_then(|s| configs.get(s))
                        .cloned()
                        .unwrap_or_default()
                        .on_rollback(RollbackCommand {
                            service: rec.service.clone(),
                            artifact: rec.rollback_target(host).to_string(),
                            ready_timeout_ms: 60_000,
                            ..Default::default()
                        }),
                )),
            };
            let router = rec
                .stage_of(host)
                .and_then(|s| rec.snapshot.stages.get(s))
                .and_then(|s| s.router.clone())
                .map(|t| (effects.router(&t), t));
            let host = host.clone();
            tasks.spawn(async move {
                let _permit = permit;
                let rollback = async {
                    match effects
                        .send(&host, cmd, COMMAND_TIMEOUT, ROLLBACK_PATIENCE)
                        .await
                    {
                        Ok(u) if u.status() == CommandStatus::Succeeded => Ok(()),
                        Ok(u) => Err(u.reason),
                        Err(e) => Err(e),
                    }
                };
                let outcome = traffic::around(router, &host, rollback).await;
                (host, outcome)
            });
        }
        let mut results = Vec::new();
        while let Some(done) = tasks.join_next().await {
            results.push(done.expect("rollback task does not panic"));
        }
        // Blue-green stages switch back (no restart while the old slot runs).
        results.extend(self.roll_back_blue_green(id, epoch).await?);
        self.ledger
            .update(
                id,
                |rec| {
                    for (host, outcome) in &results {
                        match outcome {
                            Ok(()) => rec.set_result(host, HostOutcome::RolledBack, "rolled back"),
                            Err(e) => {
                                rec.set_result(host, HostOutcome::Failed, format!("rollback: {e}"))
                            }
                        }
                    }
                },
                |_, _| Vec::new(),
            )
            .await?;
        let failures: Vec<String> = results
            .into_iter()
            .filter_map(|(h, o)| o.err().map(|e| format!("{h}: {e}")))
            .collect();
        Ok(if failures.is_empty() {
            Event::RollbackDone
        } else {
            Event::RollbackFailed(failures.join("; "))
        })
    }
}
