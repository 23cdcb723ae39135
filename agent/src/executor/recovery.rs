//! Recovery at agent start: stop what a crashed predecessor left running
//! (process runtime), check the journal's release (made again from its
//! archive if torn), point `current` at it, and start every service again.

use std::time::Duration;

use tracing::{info, warn};

use drover_common::artifact::Digest;

use super::Executor;
use crate::pull;
use crate::state::ServiceRecord;
use crate::unit::Unit;

impl Executor {
    /// At agent start: stop what a crashed predecessor left running, point
    /// `current` at the journal's release and start every service again.
    pub async fn recover(&self) {
        let services: Vec<(String, ServiceRecord)> = {
            let journal = self.journal.lock().expect("journal lock");
            journal
                .state
                .services
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };
        for (key, rec) in services {
            let unit = Unit::from_key(&key);
            let service = unit.service.clone();
            if self.cfg.kill_leftovers
                && let Some(pgid) = rec.pgid
            {
                stop_leftover(&self.cfg.layout.service_dir(&service), pgid).await;
            }
            let Some(current) = rec
                .current
                .as_deref()
                .and_then(|c| c.parse::<Digest>().ok())
            else {
                continue;
            };
            let release = self.cfg.layout.release(&service, &current);
            let started = async {
                // A release torn by the crash is never started.
                self.ensure_release(&service, &current).await?;
                self.cfg
                    .layout
                    .switch_current(&unit, &current)
                    .map_err(|e| e.to_string())?;
                let manifest = pull::read_release_manifest(&release, &service)?;
                let (spec, watch) = self.spec(&unit, &current, &manifest)?;
                self.runtime.start(spec).await.map_err(|e| e.to_string())?;
                self.board.watch(&key, watch);
                Ok::<_, String>(())
            }
            .await;
            match started {
                Ok(()) => {
                    info!(%unit, release = %current, "service started again after agent start")
                }
                Err(e) => {
                    warn!(%unit, error = %e, "could not start the service after agent start")
                }
            }
        }
        let pgids: Vec<(String, Option<i32>)> = {
            let journal = self.journal.lock().expect("journal lock");
            journal
                .state
                .services
                .keys()
                .map(|s| (s.clone(), None))
                .collect()
        };
        // The processes started above have new groups; record them.
        let _ = self.save(|s| {
            for (name, _) in &pgids {
                if let Some(rec) = s.services.get_mut(name) {
                    rec.pgid = self.runtime.status(name).pgid;
                }
            }
        });
    }
}

/// Stops a process group a crashed agent left behind, if it still is ours:
/// its leader's working directory must be inside the service's directory.
async fn stop_leftover(service_dir: &std::path::Path, pgid: i32) {
    use nix::sys::signal::{Signal, killpg};
    let group = nix::unistd::Pid::from_raw(pgid);
    let cwd = std::fs::read_link(format!("/proc/{pgid}/cwd"));
    let ours = cwd.as_ref().is_ok_and(|c| c.starts_with(service_dir));
    if !ours {
        return;
    }
    info!(pgid, "stopping the service a previous agent left running");
    let _ = killpg(group, Signal::SIGTERM);
    for _ in 0..50 {
        if killpg(group, None).is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = killpg(group, Signal::SIGKILL);
}
