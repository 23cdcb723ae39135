//! Rule 7's reload: a new config for the release a unit already runs,
//! taken as the manifest's `config.reload` says without a restart
//! (`sighup`: the main process is signalled and must stay up and answer
//! its readiness probe, checked by `Executor::wait_ready` as after a
//! restart; `none`: the files are switched and that is all).

use std::time::{Duration, Instant};

use drover_common::artifact::manifest::{Manifest, Reload};
use nix::sys::signal::Signal;

use super::hooks::Deadline;
use super::{DEFAULT_READY_TIMEOUT, Executor, Outcome};
use crate::config_bundles;
use crate::health::Watch;
use crate::unit::Unit;

impl Executor {
    /// Switches `unit`'s config to `placed` (a prepared directory and its
    /// digest; `None`: no config) and reloads it per `manifest`.
    pub(super) async fn reload_config(
        &self,
        unit: &Unit,
        placed: Option<&(std::path::PathBuf, String)>,
        manifest: &Manifest,
        watch: &Watch,
        ready_timeout_ms: u32,
    ) -> Outcome {
        let (service, key) = (unit.service.as_str(), unit.key());
        let digest = placed.map(|(_, d)| d.clone());
        if let Err(e) =
            self.save(|s| s.services.entry(key.clone()).or_default().config = digest.clone())
        {
            return Outcome::failed(e);
        }
        if let Err(e) = config_bundles::switch(
            &self.cfg.layout,
            service,
            placed.map(|(dir, _)| dir.as_path()),
        ) {
            return Outcome::failed(format!("switching config: {e}"));
        }
        let what = digest.as_deref().map_or("no config".to_string(), |d| {
            format!("config {}", &d[..d.len().min(12)])
        });
        if manifest.config.reload == Reload::None {
            return Outcome::ok(format!("{unit} has {what} in place (reload = none)"));
        }
        let restarts_before = self.runtime.status(&key).restarts;
        if let Err(e) = self.runtime.signal(&key, Signal::SIGHUP).await {
            return Outcome::failed(format!("reloading {what}: {e}"));
        }
        // Still up, and ready again, within the restart's deadline.
        let timeout = match ready_timeout_ms {
            0 => DEFAULT_READY_TIMEOUT,
            ms => Duration::from_millis(ms.into()),
        };
        let deadline = Deadline {
            at: Instant::now() + timeout,
            of: timeout,
        };
        let during = format!("after SIGHUP with {what}");
        let after = format!("SIGHUP with {what}");
        if let Err(o) = self
            .wait_ready(
                unit,
                watch,
                restarts_before,
                Instant::now(),
                deadline,
                (&during, &after),
            )
            .await
        {
            return o;
        }
        Outcome::ok(format!("{unit} reloaded {what} on SIGHUP"))
    }
}
