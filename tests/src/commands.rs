//! Building commands and sending them through a coordinator's SendCommand.

use drover_common::proto::{
    Command, CommandUpdate, PullCommand, RestartCommand, RollbackCommand, SendCommandRequest, Slot,
    StopCommand, VerifyCommand, command,
};

use crate::Coordinator;

/// The shard hand-sent test commands use: beyond the elected shards, so no
/// leader's epoch reaches it and each test controls its epochs.
pub const TEST_SHARD: u32 = 1000;

/// A command in [`TEST_SHARD`] at `epoch`.
pub fn cmd(id: &str, epoch: u64, action: command::Action) -> Command {
    Command {
        command_id: id.to_string(),
        shard: TEST_SHARD,
        epoch,
        action: Some(action),
    }
}

pub fn pull(service: &str, digest: &str) -> command::Action {
    command::Action::Pull(PullCommand {
        service: service.into(),
        artifact: digest.into(),
        ..Default::default()
    })
}

pub fn verify(service: &str, digest: &str) -> command::Action {
    command::Action::Verify(VerifyCommand {
        service: service.into(),
        artifact: digest.into(),
    })
}

pub fn restart(service: &str, digest: &str) -> command::Action {
    command::Action::Restart(RestartCommand {
        service: service.into(),
        artifact: digest.into(),
        ready_timeout_ms: 20_000,
        ..Default::default()
    })
}

/// Restart into a blue-green slot.
pub fn restart_slot(service: &str, digest: &str, slot: Slot) -> command::Action {
    command::Action::Restart(RestartCommand {
        service: service.into(),
        artifact: digest.into(),
        ready_timeout_ms: 20_000,
        slot: slot as i32,
        ..Default::default()
    })
}

/// Stop a blue-green slot.
pub fn stop(service: &str, slot: Slot) -> command::Action {
    command::Action::Stop(StopCommand {
        service: service.into(),
        slot: slot as i32,
    })
}

/// Rollback to the previous release (`digest` empty) or a named one.
pub fn rollback(service: &str, digest: &str) -> command::Action {
    command::Action::Rollback(RollbackCommand {
        service: service.into(),
        artifact: digest.into(),
        ready_timeout_ms: 20_000,
        ..Default::default()
    })
}

impl Coordinator {
    /// Sends `command` to `host_id` and waits for its final update.
    pub async fn send(
        &self,
        host_id: &str,
        command: Command,
    ) -> Result<CommandUpdate, tonic::Status> {
        self.deployer()
            .await
            .send_command(SendCommandRequest {
                host_id: host_id.to_string(),
                command: Some(command),
                timeout_ms: 60_000,
            })
            .await
            .map(|r| r.into_inner())
    }

    /// Pushes an artifact with the real `droverctl artifact push`; returns its digest.
    pub fn push(&self, path: &std::path::Path, service: &str, version: &str) -> String {
        let (code, out, err) = self.droverctl(&[
            "artifact",
            "push",
            path.to_str().expect("utf-8 path"),
            "--service",
            service,
            "--version",
            version,
        ]);
        assert_eq!(code, 0, "droverctl artifact push failed: {err}");
        out.trim().to_string()
    }
}

/// The command succeeded.
pub fn ok(update: &CommandUpdate) {
    assert_eq!(
        update.status(),
        drover_common::proto::CommandStatus::Succeeded,
        "{update:?}"
    );
}

/// The command failed, saying `reason_part`.
pub fn failed(update: &CommandUpdate, reason_part: &str) {
    assert_eq!(
        update.status(),
        drover_common::proto::CommandStatus::Failed,
        "{update:?}"
    );
    assert!(
        update.reason.contains(reason_part),
        "reason {:?} lacks {reason_part:?}",
        update.reason
    );
}
