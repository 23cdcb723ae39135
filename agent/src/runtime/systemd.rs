//! The `systemd` runtime: one unit per service, `drover-svc-<service>.service`,
//! written to the unit directory and driven with `systemctl`. systemd then
//! restarts crashed services and owns their processes, so the agent can be
//! restarted without touching them.

use std::path::PathBuf;
use std::process::Command;

use nix::sys::signal::Signal;

use super::{Runtime, RuntimeError, RuntimeStatus, ServiceSpec};
use crate::runtime::process::tail;

const LOG_FILE: &str = "service.log";

pub struct SystemdRuntime {
    pub unit_dir: PathBuf,
}

pub fn unit_name(service: &str) -> String {
    // A blue-green slot (`web@green`) becomes `drover-svc-web.green`: `@`
    // would make it an instance of a template unit, and `.` cannot occur
    // in a service's name, so no two units share a name.
    format!("drover-svc-{}.service", service.replace('@', "."))
}

/// Quotes one word for a systemd command line or Environment= assignment:
/// double quotes, with `\` and `"` escaped, `%` doubled (specifiers) and `$`
/// doubled (no variable expansion).
fn quote(word: &str) -> String {
    let mut out = String::with_capacity(word.len() + 2);
    out.push('"');
    for c in word.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '%' => out.push_str("%%"),
            '$' => out.push_str("$$"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A path as a unit setting takes it: unquoted, with `%` doubled.
fn path_value(path: &std::path::Path) -> String {
    path.to_string_lossy().replace('%', "%%")
}

/// What every service unit gets, as our own units do: no privilege
/// escalation, the OS read-only, a private /tmp, no kernel tuning.
const HARDENING: &str = "NoNewPrivileges=yes\n\
     ProtectSystem=full\n\
     ProtectHome=read-only\n\
     PrivateTmp=yes\n\
     ProtectKernelTunables=yes\n\
     ProtectKernelModules=yes\n\
     ProtectControlGroups=yes\n\
     RestrictSUIDSGID=yes\n\
     LockPersonality=yes\n\
     RestrictRealtime=yes\n\
     SystemCallArchitectures=native\n";

/// The unit file for `spec`.
pub fn render_unit(spec: &ServiceSpec) -> String {
    let release = spec
        .release_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut exec = quote(&spec.program.to_string_lossy());
    for arg in &spec.args {
        exec.push(' ');
        exec.push_str(&quote(arg));
    }
    let mut unit = format!(
        "# Written by drover-agent; changes are overwritten at the next restart.\n\
         [Unit]\n\
         Description=Drover service {service} (release {short})\n\
         \n\
         [Service]\n\
         Type=exec\n\
         WorkingDirectory={workdir}\n\
         ExecStart={exec}\n",
        service = spec.service,
        short = &release[..release.len().min(12)],
        workdir = path_value(&spec.launch.workdir),
    );
    // systemd starts units with a clean environment; this is all of it.
    for (k, v) in &spec.launch.env {
        unit.push_str(&format!("Environment={}\n", quote(&format!("{k}={v}"))));
    }
    if let Some(r) = &spec.launch.run_as {
        // Numeric ids: what the agent resolved is what runs, whatever NSS
        // answers later. systemd drops supplementary groups itself.
        unit.push_str(&format!("User={}\nGroup={}\n", r.uid, r.gid));
    }
    unit.push_str(HARDENING);
    unit.push_str(&format!(
        "KillSignal={signal}\n\
         TimeoutStopSec={grace}ms\n\
         Restart=on-failure\n\
         RestartSec=1s\n\
         StandardOutput=append:{log}\n\
         StandardError=inherit\n\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n",
        signal = spec.stop_signal.as_str(),
        grace = spec.stop_grace.as_millis(),
        log = path_value(&spec.log_dir.join(LOG_FILE)),
    ));
    unit
}

fn systemctl(args: &[&str]) -> Result<String, RuntimeError> {
    let out = Command::new("systemctl")
        .args(args)
        .output()
        .map_err(|e| RuntimeError::Other(format!("running systemctl {}: {e}", args.join(" "))))?;
    if !out.status.success() {
        return Err(RuntimeError::Other(format!(
            "systemctl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[async_trait::async_trait]
impl Runtime for SystemdRuntime {
    async fn start(&self, spec: ServiceSpec) -> Result<(), RuntimeError> {
        let unit = unit_name(&spec.service);
        let err = |reason: String| RuntimeError::Start {
            service: spec.service.clone(),
            reason,
        };
        crate::releases::create_private_dir(&spec.log_dir).map_err(|e| err(e.to_string()))?;
        let path = self.unit_dir.join(&unit);
        let tmp = path.with_extension("service.tmp");
        std::fs::write(&tmp, render_unit(&spec))
            .map_err(|e| err(format!("writing {}: {e}", tmp.display())))?;
        std::fs::rename(&tmp, &path).map_err(|e| err(e.to_string()))?;
        tokio::task::spawn_blocking(move || {
            systemctl(&["daemon-reload"])?;
            systemctl(&["restart", &unit])
        })
        .await
        .map_err(|e| err(e.to_string()))??;
        Ok(())
    }

    async fn stop(&self, service: &str) -> Result<(), RuntimeError> {
        let unit = unit_name(service);
        if !self.unit_dir.join(&unit).exists() {
            return Ok(());
        }
        tokio::task::spawn_blocking(move || systemctl(&["stop", &unit]))
            .await
            .map_err(|e| RuntimeError::Other(e.to_string()))?
            .map(|_| ())
    }

    async fn kill(&self, service: &str) {
        let unit = unit_name(service);
        let _ =
            tokio::task::spawn_blocking(move || systemctl(&["kill", "--signal=SIGKILL", &unit]))
                .await;
    }

    async fn signal(&self, service: &str, signal: Signal) -> Result<(), RuntimeError> {
        let unit = unit_name(service);
        let arg = format!("--signal={}", signal.as_str());
        tokio::task::spawn_blocking(move || {
            systemctl(&["kill", "--kill-whom=main", &arg, &unit]).map(|_| ())
        })
        .await
        .map_err(|e| RuntimeError::Other(e.to_string()))?
        .map_err(|e| RuntimeError::Other(format!("signalling {service}: {e}")))
    }

    fn status(&self, service: &str) -> RuntimeStatus {
        let Ok(out) = systemctl(&[
            "show",
            "--property=ActiveState,MainPID,NRestarts",
            &unit_name(service),
        ]) else {
            return RuntimeStatus::default();
        };
        let mut status = RuntimeStatus::default();
        for line in out.lines() {
            match line.split_once('=') {
                Some(("ActiveState", v)) => status.running = v == "active",
                Some(("MainPID", v)) => status.pgid = v.parse().ok().filter(|p| *p > 0),
                Some(("NRestarts", v)) => status.restarts = v.parse().unwrap_or(0),
                _ => {}
            }
        }
        status
    }

    fn output_tail(&self, service: &str, lines: usize) -> String {
        // The log path is in the unit; read it back from there.
        let unit =
            std::fs::read_to_string(self.unit_dir.join(unit_name(service))).unwrap_or_default();
        unit.lines()
            .find_map(|l| l.strip_prefix("StandardOutput=append:"))
            .map(|p| tail(std::path::Path::new(p), lines))
            .unwrap_or_default()
    }

    async fn stop_all(&self) {
        // systemd keeps services running across agent restarts on purpose.
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn renders_a_quoted_unit() {
        let spec = ServiceSpec {
            service: "web".into(),
            release_dir: PathBuf::from(format!(
                "/var/lib/drover/services/web/releases/{}",
                "a".repeat(64)
            )),
            program: PathBuf::from("/var/lib/drover/services/web/current/bin/start"),
            args: vec!["--greeting".into(), "hi \"there\" 100% $HOME".into()],
            launch: crate::runtime::Launch {
                workdir: PathBuf::from("/var/lib/drover/services/web/current"),
                env: [("PORT".to_string(), "8081".to_string())].into(),
                run_as: Some(crate::runtime::RunAs {
                    user: "web".into(),
                    uid: 990,
                    gid: 991,
                    home: "/nonexistent".into(),
                }),
            },
            stop_signal: nix::sys::signal::Signal::SIGINT,
            stop_grace: Duration::from_secs(7),
            log_dir: PathBuf::from("/var/lib/drover/services/web/logs"),
        };
        let unit = render_unit(&spec);
        assert!(
            unit.contains("Description=Drover service web (release aaaaaaaaaaaa)"),
            "{unit}"
        );
        assert!(
            unit.contains(
                "ExecStart=\"/var/lib/drover/services/web/current/bin/start\" \"--greeting\" \"hi \\\"there\\\" 100%% $$HOME\"\n"
            ),
            "{unit}"
        );
        assert!(unit.contains("Environment=\"PORT=8081\"\n"), "{unit}");
        assert!(unit.contains("User=990\nGroup=991\n"), "{unit}");
        assert!(unit.contains("NoNewPrivileges=yes\n"), "{unit}");
        assert!(
            unit.contains("KillSignal=SIGINT\nTimeoutStopSec=7000ms\n"),
            "{unit}"
        );
        assert!(
            unit.contains("WorkingDirectory=/var/lib/drover/services/web/current\n")
                && unit.contains(
                    "StandardOutput=append:/var/lib/drover/services/web/logs/service.log\n"
                ),
            "{unit}"
        );
        assert_eq!(unit_name("web"), "drover-svc-web.service");
    }
}
