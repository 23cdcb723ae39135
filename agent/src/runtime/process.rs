//! The `process` runtime: the agent is the supervisor.
//!
//! Each service runs in its own process group, its stdout and stderr copied
//! to `<logs>/service.log` (rotated at 10 MiB, three old files kept). When it
//! exits on its own it is started again after a backoff (0.5 s doubling to
//! 30 s, reset after a minute of running), and the restart is counted.
//! Stopping sends the manifest's stop signal to the group, waits the grace
//! period, then SIGKILLs the group.

use std::collections::HashMap;
use std::io::Write;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use file_rotate::compression::Compression;
use file_rotate::suffix::AppendCount;
use file_rotate::{ContentLimit, FileRotate};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Child;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{Runtime, RuntimeError, RuntimeStatus, ServiceSpec};

const LOG_FILE: &str = "service.log";
const LOG_ROTATE_BYTES: usize = 10 << 20;
const LOG_KEEP: usize = 3;
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
const HEALTHY_RUN: Duration = Duration::from_secs(60);

struct Supervised {
    stop: CancellationToken,
    task: JoinHandle<()>,
    status: Arc<Mutex<RuntimeStatus>>,
    spec: ServiceSpec,
}

#[derive(Default)]
pub struct ProcessRuntime {
    services: Mutex<HashMap<String, Supervised>>,
}

impl ProcessRuntime {
    pub fn new() -> ProcessRuntime {
        ProcessRuntime::default()
    }
}

/// Stops a process group: `signal`, then SIGKILL after `grace`.
async fn terminate(child: &mut Child, pgid: i32, signal: Signal, grace: Duration) {
    let group = Pid::from_raw(pgid);
    let _ = killpg(group, signal);
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        warn!(
            pgid,
            "service ignored its stop signal for the grace period; killing it"
        );
        let _ = killpg(group, Signal::SIGKILL);
        let _ = child.wait().await;
    }
    // Whatever else is left in the group goes too.
    let _ = killpg(group, Signal::SIGKILL);
}

fn copy_lines(
    reader: impl AsyncRead + Unpin + Send + 'static,
    log: Arc<Mutex<FileRotate<AppendCount>>>,
) {
    tokio::spawn(async move {
        let mut lines = BufReader::new(reader).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let mut log = log.lock().expect("log lock");
            let _ = writeln!(log, "{line}");
        }
    });
}

async fn supervise(spec: ServiceSpec, stop: CancellationToken, status: Arc<Mutex<RuntimeStatus>>) {
    let log = Arc::new(Mutex::new(FileRotate::new(
        spec.log_dir.join(LOG_FILE),
        AppendCount::new(LOG_KEEP),
        ContentLimit::BytesSurpassed(LOG_ROTATE_BYTES),
        Compression::None,
        None,
    )));
    let mut backoff = BACKOFF_MIN;
    loop {
        let mut cmd = spec.launch.command(&spec.program);
        cmd.args(&spec.args)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        match cmd.spawn() {
            Ok(mut child) => {
                let pgid = child.id().map(|p| p as i32);
                if let Some(out) = child.stdout.take() {
                    copy_lines(out, log.clone());
                }
                if let Some(err) = child.stderr.take() {
                    copy_lines(err, log.clone());
                }
                {
                    let mut s = status.lock().expect("status lock");
                    s.running = true;
                    s.pgid = pgid;
                }
                info!(service = %spec.service, pid = ?pgid, "service started");
                tokio::select! {
                    _ = stop.cancelled() => {
                        if let Some(pgid) = pgid {
                            terminate(&mut child, pgid, spec.stop_signal, spec.stop_grace).await;
                        }
                        let mut s = status.lock().expect("status lock");
                        s.running = false;
                        s.pgid = None;
                        info!(service = %spec.service, "service stopped");
                        return;
                    }
                    exit = child.wait() => {
                        if let Some(pgid) = pgid {
                            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
                        }
                        let mut s = status.lock().expect("status lock");
                        s.running = false;
                        s.pgid = None;
                        s.restarts += 1;
                        warn!(service = %spec.service, ?exit, restarts = s.restarts, "service exited; starting it again");
                    }
                }
            }
            Err(e) => {
                let _ = writeln!(
                    log.lock().expect("log lock"),
                    "drover-agent: cannot start {}: {e}",
                    spec.program.display()
                );
                warn!(service = %spec.service, error = %e, "cannot start service");
            }
        }
        if started.elapsed() > HEALTHY_RUN {
            backoff = BACKOFF_MIN;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

#[async_trait::async_trait]
impl Runtime for ProcessRuntime {
    async fn start(&self, spec: ServiceSpec) -> Result<(), RuntimeError> {
        self.stop(&spec.service).await?;
        crate::releases::create_private_dir(&spec.log_dir).map_err(|e| RuntimeError::Start {
            service: spec.service.clone(),
            reason: format!("creating {}: {e}", spec.log_dir.display()),
        })?;
        if !spec.program.is_file() {
            return Err(RuntimeError::Start {
                service: spec.service.clone(),
                reason: format!("{} does not exist", spec.program.display()),
            });
        }
        let stop = CancellationToken::new();
        let status = Arc::new(Mutex::new(RuntimeStatus::default()));
        let task = tokio::spawn(supervise(spec.clone(), stop.clone(), status.clone()));
        self.services.lock().expect("services lock").insert(
            spec.service.clone(),
            Supervised {
                stop,
                task,
                status,
                spec,
            },
        );
        Ok(())
    }

    async fn stop(&self, service: &str) -> Result<(), RuntimeError> {
        let supervised = self.services.lock().expect("services lock").remove(service);
        if let Some(s) = supervised {
            s.stop.cancel();
            let _ = s.task.await;
        }
        Ok(())
    }

    async fn kill(&self, service: &str) {
        let pgid = self.status(service).pgid;
        if let Some(pgid) = pgid {
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        }
    }

    async fn signal(&self, service: &str, signal: Signal) -> Result<(), RuntimeError> {
        let pid = self.status(service).pgid.ok_or_else(|| {
            RuntimeError::Other(format!("{service} is not running; nothing to signal"))
        })?;
        // The group's leader is the service's main process.
        nix::sys::signal::kill(Pid::from_raw(pid), signal)
            .map_err(|e| RuntimeError::Other(format!("signalling {service}: {e}")))
    }

    fn status(&self, service: &str) -> RuntimeStatus {
        self.services
            .lock()
            .expect("services lock")
            .get(service)
            .map(|s| *s.status.lock().expect("status lock"))
            .unwrap_or_default()
    }

    fn output_tail(&self, service: &str, lines: usize) -> String {
        let dir = self
            .services
            .lock()
            .expect("services lock")
            .get(service)
            .map(|s| s.spec.log_dir.clone());
        dir.map(|d| tail(&d.join(LOG_FILE), lines))
            .unwrap_or_default()
    }

    async fn stop_all(&self) {
        let names: Vec<String> = self
            .services
            .lock()
            .expect("services lock")
            .keys()
            .cloned()
            .collect();
        for name in names {
            let _ = self.stop(&name).await;
        }
    }
}

/// The last `n` lines of a file (empty when unreadable).
pub fn tail(path: &std::path::Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dir: &std::path::Path, script: &str) -> ServiceSpec {
        let program = dir.join("run.sh");
        std::fs::write(&program, format!("#!/bin/sh\n{script}\n")).unwrap();
        std::os::unix::fs::PermissionsExt::set_mode(
            &mut std::fs::metadata(&program).unwrap().permissions(),
            0o755,
        );
        std::fs::set_permissions(
            &program,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        ServiceSpec {
            service: "t".into(),
            release_dir: dir.to_path_buf(),
            program,
            args: vec![],
            launch: crate::runtime::Launch {
                workdir: dir.to_path_buf(),
                env: [("GREETING".to_string(), "hello".to_string())].into(),
                run_as: None,
            },
            stop_signal: Signal::SIGTERM,
            stop_grace: Duration::from_secs(2),
            log_dir: dir.join("logs"),
        }
    }

    async fn wait_for(mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < deadline, "condition not met in time");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn runs_logs_restarts_on_crash_and_stops() {
        let dir = tempfile::tempdir().unwrap();
        let rt = ProcessRuntime::new();
        // Exits at once the first time, then stays up.
        let marker = dir.path().join("ran-once");
        let script = format!(
            "echo \"$GREETING from pid $$\"\nif [ ! -e {m} ]; then touch {m}; exit 3; fi\nexec sleep 60",
            m = marker.display()
        );
        rt.start(spec(dir.path(), &script)).await.unwrap();
        wait_for(|| rt.status("t").restarts == 1 && rt.status("t").running).await;
        wait_for(|| rt.output_tail("t", 10).matches("hello from pid").count() == 2).await;
        let pgid = rt.status("t").pgid.unwrap();
        rt.stop("t").await.unwrap();
        assert!(!rt.status("t").running);
        assert!(
            nix::sys::signal::killpg(Pid::from_raw(pgid), None).is_err(),
            "group gone"
        );
    }

    #[tokio::test]
    async fn a_service_ignoring_sigterm_is_killed_after_the_grace() {
        let dir = tempfile::tempdir().unwrap();
        let rt = ProcessRuntime::new();
        // The marker says the trap is in place: stopping earlier would race it.
        let marker = dir.path().join("trap-set");
        let script = format!(
            "trap '' TERM\ntouch {}\nwhile true; do sleep 0.1; done",
            marker.display()
        );
        let mut s = spec(dir.path(), &script);
        s.stop_grace = Duration::from_millis(300);
        rt.start(s).await.unwrap();
        wait_for(|| rt.status("t").running && marker.exists()).await;
        let started = Instant::now();
        rt.stop("t").await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
