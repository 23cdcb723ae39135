//! Executes coordinator commands: Pull, Verify, Restart, Rollback.
//!
//! Rules, in the order they are applied to every command:
//! 1. Fencing: a command whose epoch is below the highest seen for its shard
//!    is answered REJECTED_STALE and does nothing; one above it is answered
//!    REJECTED_UNFENCED (epochs rise only with a Fence or Welcome from the
//!    shard's leader, persisted before they count, so no command can raise
//!    one). After the per-service lock is taken (rule 3) the epoch is
//!    checked again: a Fence that arrived while it waited wins. Epochs
//!    belong to the coordinators' cluster id; a new one (a rebuilt store)
//!    resets them, logged. Raised epochs are acknowledged (FenceAck) only
//!    once persisted; coordinators command a shard's hosts only after that.
//! 2. Idempotency: a command id with a recorded result gets that result
//!    again; one still running is joined, not started twice.
//! 3. Commands for one service run one at a time; different services run
//!    in parallel.
//! 4. Restart to the release already active and ready is a no-op success;
//!    Rollback never downloads.
//! 5. With trusted signers (`--trust-signer`), a Pull accepts an artifact
//!    only with a valid signature from one of them (checked before any
//!    byte is fetched) and keeps it beside the cached archive; Restart and
//!    Rollback check that kept signature again before anything starts. So
//!    a coordinator alone cannot run code on a host.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use drover_common::artifact::Digest;
use drover_common::artifact::manifest::{Hook, Manifest, Probe, expand};
use drover_common::proto::{
    AgentMessage, Command, CommandStatus, ServiceVersion, ShardEpoch, command,
};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::disk::{self, DiskHealth};
use crate::health::{HealthBoard, Watch, probe_once};
use crate::pull::{self, PullLimits};
use crate::releases::{Layout, validate_service};
use crate::runtime::{Launch, Runtime, ServiceSpec, UserPolicy, parse_signal};
use crate::state::{Journal, RecordedResult, ServiceRecord};

/// Lines of service output attached to a failure.
const TAIL_LINES: usize = 20;
const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Without a readiness probe, a service is ready after running this long.
const READY_WITHOUT_PROBE: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct ExecutorConfig {
    pub layout: Layout,
    /// Host-level environment passed to every service (`--env`).
    pub env: BTreeMap<String, String>,
    /// Whom services run as (`--service-user`, `--allow-root-services`).
    pub users: UserPolicy,
    pub keep_releases: usize,
    pub limits: PullLimits,
    /// Stop what a crashed predecessor left running (process runtime).
    pub kill_leftovers: bool,
    /// How artifact sources are dialled (the agent's certificate under TLS).
    pub dialer: drover_common::tls::client::Dialer,
    /// Rule 5; empty: signatures are not checked.
    pub signers: drover_common::artifact::signature::TrustedSigners,
    /// Where journal and pull disk faults are reported (heartbeats).
    pub disk: Arc<DiskHealth>,
}

/// When a restart must be done by, and the whole time it was given.
#[derive(Debug, Clone, Copy)]
struct Deadline {
    at: Instant,
    of: Duration,
}

/// The final answer to a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub status: CommandStatus,
    pub reason: String,
    pub output_tail: String,
}

impl Outcome {
    fn ok(reason: impl Into<String>) -> Outcome {
        Outcome {
            status: CommandStatus::Succeeded,
            reason: reason.into(),
            output_tail: String::new(),
        }
    }

    fn failed(reason: impl Into<String>) -> Outcome {
        Outcome {
            status: CommandStatus::Failed,
            reason: reason.into(),
            output_tail: String::new(),
        }
    }

    fn with_tail(mut self, tail: String) -> Outcome {
        self.output_tail = tail;
        self
    }
}

pub struct Executor {
    cfg: ExecutorConfig,
    journal: Mutex<Journal>,
    runtime: Arc<dyn Runtime>,
    board: Arc<HealthBoard>,
    inflight: Mutex<HashMap<String, watch::Receiver<Option<Outcome>>>>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

fn parse_digest(s: &str) -> Result<Digest, String> {
    s.parse::<Digest>().map_err(|e| e.to_string())
}

impl Executor {
    pub fn new(
        cfg: ExecutorConfig,
        journal: Journal,
        runtime: Arc<dyn Runtime>,
        board: Arc<HealthBoard>,
    ) -> Arc<Executor> {
        Arc::new(Executor {
            cfg,
            journal: Mutex::new(journal),
            runtime,
            board,
            inflight: Mutex::new(HashMap::new()),
            locks: Mutex::new(HashMap::new()),
        })
    }

    /// What every service runs now, for Hello.
    pub fn services(&self) -> Vec<ServiceVersion> {
        let journal = self.journal.lock().expect("journal lock");
        journal
            .state
            .services
            .iter()
            .filter(|(_, r)| r.current.is_some())
            .map(|(name, r)| ServiceVersion {
                service: name.clone(),
                current_artifact: r.current.clone().unwrap_or_default(),
                previous_artifact: r.previous.clone().unwrap_or_default(),
                current_since_unix_ms: r.current_since_unix_ms,
            })
            .collect()
    }

    fn service_lock(&self, service: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .expect("locks lock")
            .entry(service.to_string())
            .or_default()
            .clone()
    }

    fn save(&self, change: impl FnOnce(&mut crate::state::LocalState)) -> Result<(), String> {
        let mut journal = self.journal.lock().expect("journal lock");
        change(&mut journal.state);
        match journal.save() {
            Ok(()) => {
                self.cfg.disk.clear(disk::Source::Journal);
                Ok(())
            }
            Err(e) => {
                let problem = format!("journal: cannot write the state journal: {e}");
                self.cfg.disk.set(disk::Source::Journal, problem.clone());
                Err(problem)
            }
        }
    }

    fn record(&self, service: &str) -> ServiceRecord {
        self.journal
            .lock()
            .expect("journal lock")
            .state
            .services
            .get(service)
            .cloned()
            .unwrap_or_default()
    }

    /// Raises the highest epoch of each shard to what a coordinator says its
    /// leader holds (Welcome, Fence), persisted before anything else can
    /// run: from then on a deposed leader's commands are rejected-stale.
    /// Returns whether the epochs are durable (then they are acknowledged).
    pub fn raise_epochs(&self, epochs: &[ShardEpoch]) -> bool {
        let mut journal = self.journal.lock().expect("journal lock");
        let mut raised = false;
        for e in epochs {
            let highest = journal.state.epochs.entry(e.shard).or_insert(0);
            if e.epoch > *highest {
                *highest = e.epoch;
                raised = true;
            }
        }
        if raised && let Err(e) = journal.save() {
            warn!(error = %e, "cannot persist the shard epochs; not acknowledging them");
            return false;
        }
        true
    }

    /// Rule 1's cluster: adopts the coordinators' cluster id; a different
    /// one than the journal's resets every shard's epoch (logged).
    pub fn join_cluster(&self, cluster_id: &str, authenticated: bool) {
        if cluster_id.is_empty() {
            return;
        }
        let mut journal = self.journal.lock().expect("journal lock");
        if journal.state.cluster_id == cluster_id {
            return;
        }
        if !journal.state.cluster_id.is_empty() {
            warn!(
                from = %journal.state.cluster_id,
                to = %cluster_id,
                authenticated,
                "the coordinators belong to a new cluster (a rebuilt store): resetting every shard epoch"
            );
            journal.state.epochs.clear();
        }
        journal.state.cluster_id = cluster_id.to_string();
        if let Err(e) = journal.save() {
            warn!(error = %e, "cannot persist the cluster id");
        }
    }

    /// The highest epoch this host holds for `shard`.
    fn epoch_of(&self, shard: u32) -> u64 {
        self.journal
            .lock()
            .expect("journal lock")
            .state
            .epochs
            .get(&shard)
            .copied()
            .unwrap_or(0)
    }

    /// Handles one command from a coordinator; every update goes to `reply`.
    pub async fn handle(self: &Arc<Self>, cmd: Command, reply: mpsc::Sender<AgentMessage>) {
        // 1. Fencing, then 2. a recorded result.
        enum Gate {
            Reject(String),
            Unfenced(String),
            Recorded(RecordedResult),
            Run,
        }
        let gate = {
            let journal = self.journal.lock().expect("journal lock");
            let highest = journal.state.epochs.get(&cmd.shard).copied().unwrap_or(0);
            if cmd.epoch < highest {
                Gate::Reject(format!(
                    "epoch {} is below {highest}, the highest seen for shard {}; a newer leader owns this shard",
                    cmd.epoch, cmd.shard
                ))
            } else if cmd.epoch > highest {
                Gate::Unfenced(format!(
                    "epoch {} is above {highest}, the epoch shard {} was fenced at here; only the shard leader's Fence raises it",
                    cmd.epoch, cmd.shard
                ))
            } else {
                match journal.state.result(&cmd.command_id) {
                    Some(r) => Gate::Recorded(r.clone()),
                    None => Gate::Run,
                }
            }
        };
        match gate {
            Gate::Reject(reason) => {
                warn!(command_id = %cmd.command_id, %reason, "rejected stale command");
                let _ = reply
                    .send(cmd.update(CommandStatus::RejectedStale, &reason, ""))
                    .await;
                return;
            }
            Gate::Unfenced(reason) => {
                warn!(command_id = %cmd.command_id, %reason, "rejected unfenced command");
                let _ = reply
                    .send(cmd.update(CommandStatus::RejectedUnfenced, &reason, ""))
                    .await;
                return;
            }
            Gate::Recorded(r) => {
                let status = CommandStatus::try_from(r.status).unwrap_or(CommandStatus::Failed);
                let _ = reply
                    .send(cmd.update(status, &r.reason, &r.output_tail))
                    .await;
                return;
            }
            Gate::Run => {}
        }
        // 2b. Join a run of the same command already under way.
        let (running, tx) = {
            let mut inflight = self.inflight.lock().expect("inflight lock");
            match inflight.get(&cmd.command_id) {
                Some(rx) => (Some(rx.clone()), None),
                None => {
                    let (tx, rx) = watch::channel(None);
                    inflight.insert(cmd.command_id.clone(), rx);
                    (None, Some(tx))
                }
            }
        };
        if let Some(mut rx) = running {
            let _ = reply
                .send(cmd.update(CommandStatus::Accepted, "already running", ""))
                .await;
            let outcome = rx
                .wait_for(|o| o.is_some())
                .await
                .ok()
                .and_then(|o| o.clone());
            if let Some(o) = outcome {
                let _ = reply
                    .send(cmd.update(o.status, &o.reason, &o.output_tail))
                    .await;
            }
            return;
        }
        let tx = tx.expect("set when not running");
        let _ = reply
            .send(cmd.update(CommandStatus::Accepted, "", ""))
            .await;
        let started = Instant::now();
        let outcome = self.execute(&cmd).await;
        info!(command_id = %cmd.command_id, status = ?outcome.status, reason = %outcome.reason, took = ?started.elapsed(), "command finished");
        let recorded = RecordedResult {
            command_id: cmd.command_id.clone(),
            status: outcome.status as i32,
            reason: outcome.reason.clone(),
            output_tail: outcome.output_tail.clone(),
        };
        if let Err(e) = self.save(|s| s.record(recorded)) {
            warn!(error = %e, "command result not recorded");
        }
        self.inflight
            .lock()
            .expect("inflight lock")
            .remove(&cmd.command_id);
        let _ = tx.send(Some(outcome.clone()));
        let _ = reply
            .send(cmd.update(outcome.status, &outcome.reason, &outcome.output_tail))
            .await;
    }

    async fn execute(&self, cmd: &Command) -> Outcome {
        if cmd.command_id.is_empty() || cmd.command_id.len() > 256 {
            return Outcome::failed("command_id must be 1-256 characters");
        }
        let (service, result) = match &cmd.action {
            Some(command::Action::Pull(p)) => (p.service.clone(), None),
            Some(command::Action::Verify(v)) => (v.service.clone(), None),
            Some(command::Action::Restart(r)) => (r.service.clone(), None),
            Some(command::Action::Rollback(r)) => (r.service.clone(), None),
            None => (
                String::new(),
                Some(Outcome::failed("the command carries no action")),
            ),
        };
        if let Some(o) = result {
            return o;
        }
        if let Err(e) = validate_service(&service) {
            return Outcome::failed(e);
        }
        let lock = self.service_lock(&service);
        let _guard = lock.lock().await;
        // Rule 1 again: a Fence may have arrived while this command waited.
        let highest = self.epoch_of(cmd.shard);
        if cmd.epoch < highest {
            return Outcome {
                status: CommandStatus::RejectedStale,
                reason: format!(
                    "epoch {} fell below {highest} for shard {} while the command waited for the service",
                    cmd.epoch, cmd.shard
                ),
                output_tail: String::new(),
            };
        }
        match cmd.action.as_ref().expect("checked above") {
            command::Action::Pull(p) => self.pull(p).await,
            command::Action::Verify(v) => match parse_digest(&v.artifact) {
                Ok(d) => match pull::verify(&self.cfg.layout, &v.service, &d).await {
                    Ok(()) => Outcome::ok(format!("{d} verified")),
                    Err(e) => Outcome::failed(e),
                },
                Err(e) => Outcome::failed(e),
            },
            command::Action::Restart(r) => match parse_digest(&r.artifact) {
                Ok(d) => self.activate(&r.service, &d, r.ready_timeout_ms).await,
                Err(e) => Outcome::failed(e),
            },
            command::Action::Rollback(r) => {
                self.rollback(&r.service, &r.artifact, r.ready_timeout_ms)
                    .await
            }
        }
    }

    /// Rule 5 at pull time: the accepted signature, kept for activation.
    fn accept_signature(
        &self,
        service: &str,
        digest: &Digest,
        signatures: &[drover_common::proto::ArtifactSignature],
    ) -> Result<(), String> {
        if self.cfg.signers.is_empty() {
            return Ok(());
        }
        let key = self
            .cfg
            .signers
            .verify(service, &digest.hex(), signatures)
            .map_err(|e| format!("refused: {e}"))?;
        let sig = signatures
            .iter()
            .find(|s| s.key_id == key)
            .expect("verify returned the id of one of them");
        let path = self.cfg.layout.signature(digest);
        crate::releases::create_private_dir(&self.cfg.layout.cache_dir())
            .map_err(|e| e.to_string())?;
        let json = serde_json::to_vec(sig).map_err(|e| e.to_string())?;
        crate::state::write_durably(&path, &json)
            .map_err(|e| format!("writing {}: {e}", path.display()))
    }

    /// Rule 5 at activation: the kept signature must still verify.
    fn check_signature(&self, service: &str, digest: &Digest) -> Result<(), String> {
        if self.cfg.signers.is_empty() {
            return Ok(());
        }
        let path = self.cfg.layout.signature(digest);
        let sig: drover_common::proto::ArtifactSignature = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| {
                format!(
                    "not activated: no trusted signature was accepted for {digest} when it was pulled"
                )
            })?;
        self.cfg
            .signers
            .verify(service, &digest.hex(), &[sig])
            .map(|_| ())
            .map_err(|e| format!("not activated: {e}"))
    }

    async fn pull(&self, p: &drover_common::proto::PullCommand) -> Outcome {
        let (service, sources) = (p.service.as_str(), p.sources.as_slice());
        let digest = match parse_digest(&p.artifact) {
            Ok(d) => d,
            Err(e) => return Outcome::failed(e),
        };
        if let Err(e) = self.accept_signature(service, &digest, &p.signatures) {
            warn!(%digest, service, reason = %e, "pull refused: untrusted artifact");
            return Outcome::failed(e);
        }
        let layout = &self.cfg.layout;
        if layout.release(service, &digest).is_dir() && layout.cached(&digest).exists() {
            return Outcome::ok(format!("{digest} is already on this host"));
        }
        let fetched = match pull::download(
            layout,
            &digest,
            sources,
            p.size_bytes,
            &self.cfg.limits,
            &self.cfg.dialer,
        )
        .await
        {
            Ok(n) => n,
            Err(e) => return self.pull_failed(e),
        };
        match pull::unpack_release(layout, service, &digest, &self.cfg.limits).await {
            Ok(m) => {
                self.cfg.disk.clear(disk::Source::Pull);
                let keep = self.cfg.keep_releases;
                let mut removed = Vec::new();
                if let Err(e) = self.save(|s| {
                    let rec = s.services.entry(service.to_string()).or_default();
                    if !rec.releases.contains(&digest.hex()) {
                        // Oldest first: releases are pruned in the order
                        // they arrived (activation moves one to the end).
                        rec.releases.push(digest.hex());
                    }
                    // Pruned after every pull too: a host that pulls ahead
                    // (prefetch) never holds more than `keep` releases.
                    let pulled = Some(digest.hex());
                    let protect = [rec.current.clone(), rec.previous.clone(), pulled];
                    let protect: Vec<Option<&str>> = protect.iter().map(|p| p.as_deref()).collect();
                    removed = layout.prune(service, &mut rec.releases, keep, &protect);
                }) {
                    return Outcome::failed(e);
                }
                if !removed.is_empty() {
                    info!(%service, removed = ?removed, "pruned old releases after a pull");
                }
                Outcome::ok(format!(
                    "pulled {digest} ({} {}, {fetched} bytes fetched)",
                    m.service, m.version
                ))
            }
            Err(e) => {
                // The archive is fine by digest but unusable: drop it.
                let _ = std::fs::remove_file(layout.cached(&digest));
                self.pull_failed(e)
            }
        }
    }

    /// A failed pull's answer; a disk fault is also the host's problem
    /// until a pull succeeds again.
    fn pull_failed(&self, e: pull::PullError) -> Outcome {
        if let pull::PullError::Disk(problem) = &e {
            self.cfg.disk.set(disk::Source::Pull, problem.clone());
        }
        Outcome::failed(e.to_string())
    }

    async fn rollback(&self, service: &str, artifact: &str, ready_timeout_ms: u32) -> Outcome {
        let rec = self.record(service);
        let target = if artifact.is_empty() {
            match rec.previous {
                Some(p) => p,
                None => {
                    return Outcome::failed(format!(
                        "{service} has no previous release to roll back to"
                    ));
                }
            }
        } else {
            artifact.to_string()
        };
        let digest = match parse_digest(&target) {
            Ok(d) => d,
            Err(e) => return Outcome::failed(e),
        };
        if !self.cfg.layout.release(service, &digest).is_dir() {
            return Outcome::failed(format!(
                "release {digest} of {service} is not on this host; rollback never downloads"
            ));
        }
        self.activate(service, &digest, ready_timeout_ms).await
    }

    /// The runtime spec and health watch of a release.
    fn spec(
        &self,
        service: &str,
        digest: &Digest,
        manifest: &Manifest,
    ) -> Result<(ServiceSpec, Watch), String> {
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
            service: service.to_string(),
            release_dir: release,
            program,
            args,
            launch,
            stop_signal: parse_signal(&manifest.start.stop_signal)?,
            stop_grace: manifest.start.stop_grace,
            log_dir: self.cfg.layout.log_dir(service),
        };
        Ok((spec, watch))
    }

    /// Runs one hook as the service (see `runtime::launch`), for at most its
    /// own timeout and never past `deadline` (the restart's). A hook that
    /// fails or overruns is named with its exit status or the limit it hit,
    /// and the tail of what it printed.
    async fn run_hook(
        &self,
        name: &str,
        hook: &Hook,
        spec: &ServiceSpec,
        deadline: Deadline,
    ) -> Result<(), Outcome> {
        let program = if hook.command[0].starts_with('/') {
            PathBuf::from(&hook.command[0])
        } else {
            spec.release_dir.join(&hook.command[0])
        };
        let left = deadline.at.saturating_duration_since(Instant::now());
        let (limit, which) = if hook.timeout <= left {
            (hook.timeout, format!("its timeout of {:?}", hook.timeout))
        } else {
            (
                left,
                format!(
                    "the restart's deadline of {:?}: ready_timeout_ms, a deploy's stuck_timeout",
                    deadline.of
                ),
            )
        };
        let mut cmd = spec.launch.command(&program);
        cmd.args(&hook.command[1..])
            .process_group(0)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .map_err(|e| Outcome::failed(format!("{name} hook {}: {e}", program.display())))?;
        let pgid = child.id().map(|p| nix::unistd::Pid::from_raw(p as i32));
        // Output is read as it comes into a bounded tail (see output.rs):
        // a hook printing gigabytes costs the agent 64 KiB per stream.
        let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
        let mut out = crate::output::BoundedTail::default();
        let mut err = crate::output::BoundedTail::default();
        let run = async {
            let (_, _, status) = tokio::join!(
                async {
                    if let Some(s) = stdout {
                        let _ = out.read_all(s).await;
                    }
                },
                async {
                    if let Some(s) = stderr {
                        let _ = err.read_all(s).await;
                    }
                },
                child.wait()
            );
            status
        };
        let finished = tokio::time::timeout(limit, run).await;
        let tail = || {
            [out.render(TAIL_LINES), err.render(TAIL_LINES)]
                .into_iter()
                .filter(|t| !t.is_empty())
                .collect::<Vec<_>>()
                .join("\n")
        };
        let status = match finished {
            Err(_) => {
                // The whole group: whatever the hook started goes too.
                if let Some(pgid) = pgid {
                    let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
                }
                return Err(Outcome::failed(format!(
                    "{name} hook did not finish within {which}; killed"
                ))
                .with_tail(tail()));
            }
            Ok(status) => status
                .map_err(|e| Outcome::failed(format!("{name} hook {}: {e}", program.display())))?,
        };
        if status.success() {
            return Ok(());
        }
        Err(Outcome::failed(format!("{name} hook failed: {status}")).with_tail(tail()))
    }

    /// Makes `digest` the running release of `service` (Restart and Rollback).
    async fn activate(&self, service: &str, digest: &Digest, ready_timeout_ms: u32) -> Outcome {
        let layout = &self.cfg.layout;
        // Never run unverified bits.
        if let Err(e) = pull::verify(layout, service, digest).await {
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
        let (spec, watch) = match self.spec(service, digest, &manifest) {
            Ok(s) => s,
            Err(e) => return Outcome::failed(format!("cannot start: {e}")),
        };
        let rec = self.record(service);
        let has_probe = watch.readiness.is_some();
        if rec.current.as_deref() == Some(digest.hex().as_str())
            && self.runtime.status(service).running
        {
            let ready = match &watch.readiness {
                Some(p) => probe_once(p, &watch.launch).await.is_ok(),
                None => true,
            };
            if ready {
                return Outcome::ok(format!("{digest} is already active and ready"));
            }
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
            let rec = s.services.entry(service.to_string()).or_default();
            if rec.current.as_deref() != Some(hex.as_str()) {
                rec.previous = rec.current.take();
                rec.current = Some(hex.clone());
                rec.current_since_unix_ms = drover_common::time::now_unix_ms();
            }
            rec.releases.retain(|r| r != &hex);
            rec.releases.push(hex.clone());
        }) {
            return Outcome::failed(e);
        }
        if let Err(e) = layout.switch_current(service, digest) {
            return Outcome::failed(format!("switching current: {e}"));
        }
        let restarts_before;
        {
            self.board.unwatch(service);
            if let Err(e) = self.runtime.start(spec.clone()).await {
                return Outcome::failed(e.to_string())
                    .with_tail(self.runtime.output_tail(service, TAIL_LINES));
            }
            restarts_before = self.runtime.status(service).restarts;
            self.board.watch(service, watch.clone());
        }
        let started = Instant::now();
        let mut last_error = String::from("no probe ran yet");
        loop {
            let status = self.runtime.status(service);
            if status.restarts > restarts_before {
                return Outcome::failed(format!(
                    "{service} exited while starting ({} restarts)",
                    status.restarts
                ))
                .with_tail(self.runtime.output_tail(service, TAIL_LINES));
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
                    None => started.elapsed() >= READY_WITHOUT_PROBE,
                };
                if ready {
                    break;
                }
            }
            if Instant::now() >= deadline.at {
                return Outcome::failed(format!(
                    "{service} not ready within {timeout:?} of the restart: {last_error}"
                ))
                .with_tail(self.runtime.output_tail(service, TAIL_LINES));
            }
            let pause = watch
                .readiness
                .as_ref()
                .map(|p| p.interval)
                .unwrap_or(Duration::from_millis(100));
            tokio::time::sleep(pause.min(Duration::from_millis(250))).await;
        }
        let _ = has_probe;
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
        let pgid = self.runtime.status(service).pgid;
        let keep = self.cfg.keep_releases;
        let mut removed = Vec::new();
        if let Err(e) = self.save(|s| {
            let rec = s.services.entry(service.to_string()).or_default();
            rec.pgid = pgid;
            let protect = [rec.current.clone(), rec.previous.clone()];
            let protect: Vec<Option<&str>> = protect.iter().map(|p| p.as_deref()).collect();
            removed = layout.prune(service, &mut rec.releases, keep, &protect);
        }) {
            warn!(error = %e, "could not record the started service");
        }
        if !removed.is_empty() {
            info!(%service, removed = ?removed, "pruned old releases");
        }
        Outcome::ok(format!(
            "{service} runs {digest} and is ready after {} ms",
            started.elapsed().as_millis()
        ))
    }

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
        for (service, rec) in services {
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
                self.cfg
                    .layout
                    .switch_current(&service, &current)
                    .map_err(|e| e.to_string())?;
                let manifest = pull::read_release_manifest(&release, &service)?;
                let (spec, watch) = self.spec(&service, &current, &manifest)?;
                self.runtime.start(spec).await.map_err(|e| e.to_string())?;
                self.board.watch(&service, watch);
                Ok::<_, String>(())
            }
            .await;
            match started {
                Ok(()) => {
                    info!(%service, release = %current, "service started again after agent start")
                }
                Err(e) => {
                    warn!(%service, error = %e, "could not start the service after agent start")
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

    /// Stops every service (agent shutdown, process runtime).
    pub async fn shutdown(&self) {
        self.runtime.stop_all().await;
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
