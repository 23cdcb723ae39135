//! What a release runs as: the runtime spec (program, arguments, and the
//! `Launch`: user, working directory, environment) and the health watch,
//! with every `${VAR}` of the manifest expanded.

use std::path::PathBuf;

use drover_common::artifact::Digest;
use drover_common::artifact::manifest::{Manifest, Probe, expand};

use super::Executor;
use crate::health::Watch;
use crate::runtime::{Launch, ServiceSpec, parse_signal};
use crate::unit::{Unit, slot_name};

impl Executor {
    /// The runtime spec and health watch of a release run as `unit` (a
    /// slot gets its port as `${PORT}`, over `--env`).
    pub(super) fn spec(
        &self,
        unit: &Unit,
        digest: &Digest,
        manifest: &Manifest,
    ) -> Result<(ServiceSpec, Watch), String> {
        let service = unit.service.as_str();
        let release = self.cfg.layout.release(service, digest);
        let run_as = self
            .cfg
            .users
            .resolve(manifest.start.user.as_deref())
            .map_err(|e| format!("start.user: {e}"))?;
        let mut env = crate::runtime::launch::base_environment(run_as.as_ref());
        env.extend(self.cfg.env.clone());
        env.insert("DROVER_SERVICE".into(), service.to_string());
        env.insert("DROVER_RELEASE".into(), digest.hex());
        env.insert("DROVER_RELEASE_DIR".into(), release.display().to_string());
        env.insert(
            "DROVER_CONFIG_DIR".into(),
            self.cfg.layout.config_link(service).display().to_string(),
        );
        env.insert(
            "DROVER_FLAGS_FILE".into(),
            self.cfg.layout.flags_file(service).display().to_string(),
        );
        if let Some(port) = self.cfg.slot_ports.port(unit)? {
            env.insert("PORT".into(), port.to_string());
            let slot = slot_name(unit.slot).unwrap_or_default();
            env.insert("DROVER_SLOT".into(), slot.to_string());
        }
        for (k, v) in &manifest.start.env {
            let value = expand(v, &env).map_err(|e| format!("start.env.{k}: {e}"))?;
            env.insert(k.clone(), value);
        }
        let args = manifest
            .start
            .args
            .iter()
            .map(|a| expand(a, &env))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("start.args: {e}"))?;
        let command =
            expand(&manifest.start.command, &env).map_err(|e| format!("start.command: {e}"))?;
        let program = if command.starts_with('/') {
            PathBuf::from(command)
        } else {
            release.join(command)
        };
        let workdir = match &manifest.start.workdir {
            Some(dir) => release.join(dir),
            None => release.clone(),
        };
        let expand_probe = |p: &Option<Probe>, field: &str| -> Result<Option<Probe>, String> {
            let Some(p) = p else { return Ok(None) };
            let mut p = p.clone();
            if let Some(url) = &p.http {
                p.http = Some(expand(url, &env).map_err(|e| format!("{field}.http: {e}"))?);
            }
            if let Some(addr) = &p.tcp {
                p.tcp = Some(expand(addr, &env).map_err(|e| format!("{field}.tcp: {e}"))?);
            }
            Ok(Some(p))
        };
        let mut metrics = manifest.metrics.clone();
        if let Some(m) = &mut metrics {
            m.url = expand(&m.url, &env).map_err(|e| format!("metrics.url: {e}"))?;
        }
        let readiness = expand_probe(&manifest.readiness, "readiness")?;
        let liveness = expand_probe(&manifest.liveness, "liveness")?;
        let launch = Launch {
            workdir,
            env,
            run_as,
        };
        let watch = Watch {
            readiness,
            liveness,
            metrics,
            launch: launch.clone(),
        };
        let spec = ServiceSpec {
            service: unit.key(),
            release_dir: release,
            program,
            args,
            launch,
            stop_signal: parse_signal(&manifest.start.stop_signal)?,
            stop_grace: manifest.start.stop_grace,
            log_dir: self.cfg.layout.log_dir(unit),
        };
        Ok((spec, watch))
    }
}
