//! A scripted fleet for the driver's unit tests: hosts that answer pulls,
//! restarts and rollbacks as told (succeed, fail, never answer), report
//! health by the release they run (on tokio's paused clock: one heartbeat
//! per interval), and behave like agents towards repeated commands — a
//! command id already run is answered from its record, not run again.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use drover_common::proto::{
    Command, CommandStatus, CommandUpdate, PullCommand, ServiceHealth, Slot, command,
};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::effects::{Effects, HostView};

/// How a host answers one kind of command.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Succeed,
    Fail(String),
    /// Never answers: the caller's deadline decides.
    Hang,
    /// Answers after this long.
    After(Duration),
}

/// One scripted host.
#[derive(Debug, Clone)]
pub struct FakeHost {
    pub pull: Reply,
    pub restart: Reply,
    pub rollback: Reply,
    /// The release it runs.
    pub running: String,
    /// Releases that serve errors (`bad_errors` of each heartbeat's
    /// `requests`).
    pub bad: Vec<String>,
    /// Requests per heartbeat (200).
    pub requests: u64,
    /// Errors per heartbeat of a bad release (100: half).
    pub bad_errors: u64,
    /// Releases that crash: one restart per heartbeat while they run...
    pub crashing: Vec<String>,
    /// ...this many times at most (None: for ever).
    pub crash_limit: Option<u32>,
    /// When it began running `running`.
    pub since: Instant,
    /// Restarts counted before `since` (heartbeats count for the agent's life).
    pub restarts: u32,
    /// Switched release at `since`: no health until its next heartbeat.
    pub switched: bool,
    /// The first heartbeat after a switch was sampled during the restart
    /// and says "not ready" (as an agent's can).
    pub stale_first_beat: bool,
}

impl FakeHost {
    pub fn new(running: &str) -> FakeHost {
        FakeHost {
            pull: Reply::Succeed,
            restart: Reply::Succeed,
            rollback: Reply::Succeed,
            running: running.into(),
            bad: Vec::new(),
            requests: 200,
            bad_errors: 100,
            crashing: Vec::new(),
            crash_limit: None,
            since: Instant::now(),
            restarts: 0,
            switched: false,
            stale_first_beat: false,
        }
    }
}

pub const HEARTBEAT: Duration = Duration::from_millis(1000);

#[derive(Default)]
pub struct FakeFleet {
    pub hosts: Mutex<HashMap<String, FakeHost>>,
    /// Results of command ids already run (the agents' journals).
    done: Mutex<HashMap<String, CommandUpdate>>,
    /// (host, verb, artifact) of every command actually run, in order.
    pub runs: Mutex<Vec<(String, String, String)>>,
    /// Every send, repeats included.
    pub sends: Mutex<u32>,
    /// Rung when `sends` reaches `crash_at` (a test's simulated crash).
    pub crash: Notify,
    pub crash_at: Mutex<Option<u32>>,
    /// When the fleet's heartbeats began (sequences count from it).
    born: std::sync::OnceLock<Instant>,
}

impl FakeFleet {
    pub fn with_hosts(hosts: &[(&str, FakeHost)]) -> FakeFleet {
        let fleet = FakeFleet::default();
        for (id, h) in hosts {
            fleet
                .hosts
                .lock()
                .unwrap()
                .insert(id.to_string(), h.clone());
        }
        fleet
    }

    pub fn host_mut(&self, id: &str, change: impl FnOnce(&mut FakeHost)) {
        change(
            self.hosts
                .lock()
                .unwrap()
                .get_mut(id)
                .expect("a scripted host"),
        );
    }

    pub fn running(&self, id: &str) -> String {
        self.hosts.lock().unwrap()[id].running.clone()
    }

    /// How many times `verb` actually ran on `host`.
    pub fn ran(&self, host: &str, verb: &str) -> usize {
        self.runs
            .lock()
            .unwrap()
            .iter()
            .filter(|(h, v, _)| h == host && v == verb)
            .count()
    }

    fn restarts_now(h: &FakeHost) -> u32 {
        let crashing = h.crashing.contains(&h.running);
        let beats = (h.since.elapsed().as_millis() / HEARTBEAT.as_millis()) as u32;
        let crashes = if crashing { beats } else { 0 };
        h.restarts + h.crash_limit.map_or(crashes, |limit| crashes.min(limit))
    }

    /// Runs `cmd` on `host` as its script says.
    async fn run(&self, host: &str, cmd: &Command) -> Result<CommandUpdate, String> {
        let (verb, artifact) = match &cmd.action {
            Some(command::Action::Pull(p)) => ("pull", p.artifact.clone()),
            Some(command::Action::Restart(r)) => ("restart", r.artifact.clone()),
            Some(command::Action::Rollback(r)) => ("rollback", r.artifact.clone()),
            _ => ("other", String::new()),
        };
        let reply = {
            let hosts = self.hosts.lock().unwrap();
            let h = hosts
                .get(host)
                .ok_or_else(|| format!("host {host} is not connected"))?;
            match verb {
                "pull" => h.pull.clone(),
                "restart" => h.restart.clone(),
                "rollback" => h.rollback.clone(),
                _ => Reply::Succeed,
            }
        };
        let failed = match reply {
            Reply::Hang => std::future::pending().await,
            Reply::After(d) => {
                tokio::time::sleep(d).await;
                None
            }
            Reply::Fail(why) => Some(why),
            Reply::Succeed => None,
        };
        self.runs
            .lock()
            .unwrap()
            .push((host.to_string(), verb.to_string(), artifact.clone()));
        if failed.is_none() && verb != "pull" {
            self.host_mut(host, |h| {
                h.restarts = Self::restarts_now(h);
                h.running = artifact;
                h.since = Instant::now();
                h.switched = true;
            });
        }
        Ok(CommandUpdate {
            command_id: cmd.command_id.clone(),
            status: if failed.is_some() {
                CommandStatus::Failed
            } else {
                CommandStatus::Succeeded
            } as i32,
            reason: failed.unwrap_or_default(),
            ..Default::default()
        })
    }
}

#[async_trait::async_trait]
impl Effects for FakeFleet {
    async fn send(
        &self,
        host: &str,
        cmd: Command,
        timeout: Duration,
        patience: Duration,
    ) -> Result<CommandUpdate, String> {
        {
            let mut sends = self.sends.lock().unwrap();
            *sends += 1;
            if Some(*sends) == *self.crash_at.lock().unwrap() {
                self.crash.notify_one();
            }
        }
        if let Some(done) = self.done.lock().unwrap().get(&cmd.command_id) {
            return Ok(done.clone());
        }
        let deadline = timeout.max(patience);
        let update = tokio::time::timeout(deadline, self.run(host, &cmd))
            .await
            .map_err(|_| format!("no result from {host} within {deadline:?}"))??;
        self.done
            .lock()
            .unwrap()
            .insert(cmd.command_id.clone(), update.clone());
        Ok(update)
    }

    fn host_in(&self, host: &str, service: &str, _slot: Slot) -> Option<HostView> {
        let hosts = self.hosts.lock().unwrap();
        let h = hosts.get(host)?;
        let beats = h.since.elapsed().as_millis() / HEARTBEAT.as_millis();
        let bad = h.bad.contains(&h.running);
        let born = *self.born.get_or_init(Instant::now);
        Some(HostView {
            heartbeat_interval_ms: HEARTBEAT.as_millis() as u32,
            // One heartbeat per interval, for every host alike.
            heartbeat_sequence: 1 + (born.elapsed().as_millis() / HEARTBEAT.as_millis()) as u64,
            health: (beats > 0 || !h.switched).then(|| ServiceHealth {
                service: service.to_string(),
                ready: !(h.stale_first_beat && h.switched && beats <= 1),
                live: true,
                restarts: Self::restarts_now(h),
                request_count: h.requests,
                error_count: if bad { h.bad_errors } else { 0 },
                latency_p50_ms: 5.0,
                latency_p99_ms: 20.0,
                interval_ms: HEARTBEAT.as_millis() as u32,
                ..Default::default()
            }),
        })
    }

    async fn pull_commands(
        &self,
        service: &str,
        artifact: &str,
        hosts: &[String],
    ) -> Vec<PullCommand> {
        let pull = PullCommand {
            service: service.to_string(),
            artifact: artifact.to_string(),
            sources: vec!["http://origin".into()],
            size_bytes: 1,
            ..Default::default()
        };
        vec![pull; hosts.len()]
    }
}
