//! Restart and Rollback: a release made the running one of a unit (rules
//! 4 to 6 of `mod.rs`): never unverified bits, the pre_start hook, the
//! switch recorded before it is made, the start, readiness within one
//! deadline, post_start and validate, and pruning.

use std::time::{Duration, Instant};

use drover_common::artifact::Digest;
use drover_common::artifact::manifest::Reload;
use drover_common::config_bundle;
use tracing::{info, warn};

use super::hooks::Deadline;
use super::{
    DEFAULT_READY_TIMEOUT, Executor, Outcome, READY_WITHOUT_PROBE, TAIL_LINES, prune_service,
};
use crate::config_bundles::{self, ConfigChange};
use crate::health::{Watch, probe_once};
use crate::pull;
use crate::unit::{Unit, port_in_use, slot_name};

impl Executor {
    /// Checks the archive and the unpacked release of `digest`; a damaged
    /// release is made again from the verified archive (never downloaded)
    /// and checked again. Only then may it start.
    pub(super) async fn ensure_release(
        &self,
        service: &str,
        digest: &Digest,
    ) -> Result<(), String> {
        let layout = &self.cfg.layout;
        match pull::verify(layout, service, digest).await {
            Ok(()) => Ok(()),
            Err(pull::VerifyError::Release(e)) if layout.release(service, digest).is_dir() => {
                warn!(%digest, service, reason = %e, "release damaged: unpacking it again from the verified archive");
                let _ = std::fs::remove_dir_all(layout.release(service, digest));
                let _ = std::fs::remove_file(layout.release_tree(service, digest));
                pull::unpack_release(layout, service, digest, &self.cfg.limits)
                    .await
                    .map_err(|e| e.to_string())?;
                pull::verify(layout, service, digest)
                    .await
                    .map_err(|e| e.to_string())
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// Makes `digest` the running release of `unit` (Restart and Rollback),
    /// with the config `config` says (rule 7): switches it and waits until
    /// it is ready; `anew`: even when it already runs (rule 4).
    pub(super) async fn activate(
        &self,
        unit: &Unit,
        digest: &Digest,
        ready_timeout_ms: u32,
        anew: bool,
        config: ConfigChange<'_>,
    ) -> Outcome {
        let layout = &self.cfg.layout;
        let (service, key) = (unit.service.as_str(), unit.key());
        // Never run unverified bits.
        if let Err(e) = self.ensure_release(service, digest).await {
            return Outcome::failed(format!("not activated: {e}"));
        }
        if let Err(e) = self.check_signature(service, digest) {
            warn!(%digest, service, reason = %e, "activation refused");
            return Outcome::failed(e);
        }
        let release = layout.release(service, digest);
        let manifest = match pull::read_release_manifest(&release, service) {
            Ok(m) => m,
            Err(e) => return Outcome::failed(e),
        };
        let (spec, watch) = match self.spec(unit, digest, &manifest) {
            Ok(s) => s,
            Err(e) => return Outcome::failed(format!("cannot start: {e}")),
        };
        let rec = self.record(unit);
        // Rule 7: a new config is checked, resolved and written whole
        // before anything the service sees changes. What counts as the
        // config now is what the service's link points to.
        let config = config.against(config_bundles::linked(layout, service).as_deref());
        let placed = match config {
            None => None,
            Some(None) => Some(None),
            Some(Some(bundle)) => {
                let document = manifest.config.document.clone().unwrap_or_else(|| {
                    config_bundle::default_document_name(bundle.format()).to_string()
                });
                match config_bundles::prepare(
                    layout,
                    bundle,
                    service,
                    &document,
                    &self.cfg.secrets,
                    spec.launch.run_as.as_ref(),
                ) {
                    Ok(dir) => Some(Some((dir, bundle.digest.clone()))),
                    Err(e) => return Outcome::failed(format!("{e}; nothing was changed")),
                }
            }
        };
        let running_it = rec.current.as_deref() == Some(digest.hex().as_str())
            && self.runtime.status(&key).running;
        if let Some(placed) = &placed
            && running_it
            && !anew
            && manifest.config.reload != Reload::Restart
        {
            return self
                .reload_config(unit, placed.as_ref(), &manifest, &watch, ready_timeout_ms)
                .await;
        }
        // Rule 4.
        if !anew
            && placed.is_none()
            && rec.current.as_deref() == Some(digest.hex().as_str())
            && self.runtime.status(&key).running
        {
            let ready = match &watch.readiness {
                Some(p) => probe_once(p, &watch.launch).await.is_ok(),
                None => true,
            };
            if ready {
                return Outcome::ok(format!("{digest} is already active and ready"));
            }
        }
        // Rule 6: a slot's port held by another process would make the
        // start fail in a way only its log explains; refuse it first.
        if let Ok(Some(port)) = self.cfg.slot_ports.port(unit)
            && !self.runtime.status(&key).running
            && port_in_use(port)
        {
            return Outcome::failed(format!(
                "port {port} of {service}'s {} slot is in use by another process; nothing was started",
                slot_name(unit.slot).unwrap_or_default()
            ));
        }
        // One deadline for the whole restart, hooks included: the deploy
        // waits no longer than this for the host's answer.
        let timeout = if ready_timeout_ms == 0 {
            DEFAULT_READY_TIMEOUT
        } else {
            Duration::from_millis(ready_timeout_ms.into())
        };
        let deadline = Deadline {
            at: Instant::now() + timeout,
            of: timeout,
        };
        if let Some(hook) = &manifest.hooks.pre_start
            && let Err(o) = self.run_hook("pre_start", hook, &spec, deadline).await
        {
            return o;
        }
        // Record the switch before making it: after a crash, the journal is
        // the truth and recovery re-points `current` to it.
        let hex = digest.hex();
        if let Err(e) = self.save(|s| {
            let rec = s.services.entry(key.clone()).or_default();
            if rec.current.as_deref() != Some(hex.as_str()) {
                rec.previous = rec.current.take();
                rec.current = Some(hex.clone());
                rec.current_since_unix_ms = drover_common::time::now_unix_ms();
            }
            if let Some(placed) = &placed {
                rec.config = placed.as_ref().map(|(_, d)| d.clone());
            }
            // Releases are the service's, whichever unit runs them.
            let releases = &mut s.services.entry(service.to_string()).or_default().releases;
            releases.retain(|r| r != &hex);
            releases.push(hex.clone());
        }) {
            return Outcome::failed(e);
        }
        if let Err(e) = layout.switch_current(unit, digest) {
            return Outcome::failed(format!("switching current: {e}"));
        }
        if let Some(placed) = &placed
            && let Err(e) =
                config_bundles::switch(layout, service, placed.as_ref().map(|(d, _)| d.as_path()))
        {
            return Outcome::failed(format!("switching config: {e}"));
        }
        let restarts_before;
        {
            self.board.unwatch(&key);
            self.board.before_start(&key);
            if let Err(e) = self.runtime.start(spec.clone()).await {
                return Outcome::failed(e.to_string())
                    .with_tail(self.runtime.output_tail(&key, TAIL_LINES));
            }
            restarts_before = self.runtime.status(&key).restarts;
            self.board.watch(&key, watch.clone());
        }
        let started = Instant::now();
        if let Err(o) = self
            .wait_ready(
                unit,
                &watch,
                restarts_before,
                started + READY_WITHOUT_PROBE,
                deadline,
                ("while starting", "the restart"),
            )
            .await
        {
            return o;
        }
        for (name, hook) in [
            ("post_start", &manifest.hooks.post_start),
            ("validate", &manifest.hooks.validate),
        ] {
            if let Some(hook) = hook
                && let Err(o) = self.run_hook(name, hook, &spec, deadline).await
            {
                return o;
            }
        }
        let pgid = self.runtime.status(&key).pgid;
        let keep = self.cfg.keep_releases;
        let mut removed = Vec::new();
        if let Err(e) = self.save(|s| {
            s.services.entry(key.clone()).or_default().pgid = pgid;
            removed = prune_service(s, layout, service, keep, None);
        }) {
            warn!(error = %e, "could not record the started service");
        }
        if !removed.is_empty() {
            info!(%service, removed = ?removed, "pruned old releases");
        }
        Outcome::ok(format!(
            "{unit} runs {digest} and is ready after {} ms",
            started.elapsed().as_millis()
        ))
    }

    /// Waits until `unit`'s process is ready: its readiness probe passes
    /// (without one: it is up and `settled_at` has come), failing if it
    /// restarts (it crashed) or `deadline` passes. `(exited, after)` say
    /// what it was doing, for the reasons: "{unit} exited {exited}", "not
    /// ready within … of {after}". Once ready, heartbeats report it ready
    /// from now (not "unready" until the next probe).
    pub(super) async fn wait_ready(
        &self,
        unit: &Unit,
        watch: &Watch,
        restarts_before: u32,
        settled_at: Instant,
        deadline: Deadline,
        (exited, after): (&str, &str),
    ) -> Result<(), Outcome> {
        let key = unit.key();
        let mut last_error = String::from("no probe ran yet");
        loop {
            let status = self.runtime.status(&key);
            if status.restarts > restarts_before {
                return Err(Outcome::failed(format!(
                    "{unit} exited {exited} ({} restarts)",
                    status.restarts
                ))
                .with_tail(self.runtime.output_tail(&key, TAIL_LINES)));
            }
            if status.running {
                let ready = match &watch.readiness {
                    Some(p) => match probe_once(p, &watch.launch).await {
                        Ok(()) => true,
                        Err(e) => {
                            last_error = e;
                            false
                        }
                    },
                    None => Instant::now() >= settled_at,
                };
                if ready {
                    self.board.mark_ready(&key);
                    return Ok(());
                }
            }
            if Instant::now() >= deadline.at {
                return Err(Outcome::failed(format!(
                    "{unit} not ready within {:?} of {after}: {last_error}",
                    deadline.of
                ))
                .with_tail(self.runtime.output_tail(&key, TAIL_LINES)));
            }
            let pause = watch
                .readiness
                .as_ref()
                .map(|p| p.interval)
                .unwrap_or(Duration::from_millis(100));
            tokio::time::sleep(pause.min(Duration::from_millis(250))).await;
        }
    }
}
