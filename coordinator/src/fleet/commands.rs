//! Commands in flight to agents: who waits for which command's final update.

use std::collections::HashMap;
use std::sync::Mutex;

use std::time::Duration;

use drover_common::proto::{
    Command, CommandStatus, CommandUpdate, CoordinatorMessage, coordinator_message,
};
use tokio::sync::oneshot;

use super::Registry;

/// Why a command got no final update.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("host {0} is not connected to this coordinator")]
    NotConnected(String),
    #[error("the stream of host {0} closed")]
    StreamClosed(String),
    #[error(
        "no final result from host {0} within {1:?}; the command may still finish: send the same command_id again to get its result"
    )]
    Timeout(String, Duration),
    #[error(
        "host {0} has not acknowledged epoch {2} of shard {1} on this stream; it is not commanded until it does"
    )]
    Unfenced(String, u32, u64),
}

/// How long a command waits for its host to acknowledge the shard's epoch.
const FENCE_WAIT: Duration = Duration::from_secs(10);

/// True for the updates that end a command.
pub fn is_final(status: CommandStatus) -> bool {
    matches!(
        status,
        CommandStatus::Succeeded
            | CommandStatus::Failed
            | CommandStatus::RejectedStale
            | CommandStatus::RejectedUnfenced
    )
}

/// (host id, command id).
type Key = (String, String);

#[derive(Default)]
pub struct PendingCommands {
    waiters: Mutex<HashMap<Key, Vec<oneshot::Sender<CommandUpdate>>>>,
}

impl PendingCommands {
    /// Registers interest in the final update of `command_id` on `host_id`.
    pub fn wait(&self, host_id: &str, command_id: &str) -> oneshot::Receiver<CommandUpdate> {
        let (tx, rx) = oneshot::channel();
        self.waiters
            .lock()
            .expect("pending lock")
            .entry((host_id.to_string(), command_id.to_string()))
            .or_default()
            .push(tx);
        rx
    }

    /// Delivers an update from `host_id`; final ones wake every waiter.
    pub fn deliver(&self, host_id: &str, update: CommandUpdate) {
        if !is_final(update.status()) {
            return;
        }
        let waiters = self
            .waiters
            .lock()
            .expect("pending lock")
            .remove(&(host_id.to_string(), update.command_id.clone()));
        for tx in waiters.into_iter().flatten() {
            let _ = tx.send(update.clone());
        }
    }

    /// Sends `command` to `host_id` over its stream and waits up to
    /// `timeout` for the final update.
    pub async fn send(
        &self,
        registry: &Registry,
        host_id: &str,
        command: Command,
        timeout: Duration,
    ) -> Result<CommandUpdate, SendError> {
        let session = registry
            .session(host_id)
            .ok_or_else(|| SendError::NotConnected(host_id.to_string()))?;
        // A host is commanded for a shard only once it acknowledged the
        // epoch on this stream (its Welcome or a Fence, persisted).
        let (shard, epoch) = (command.shard, command.epoch);
        let mut fenced = session.fenced.clone();
        let acked = matches!(
            tokio::time::timeout(
                FENCE_WAIT.min(timeout),
                fenced.wait_for(|m| m.get(&shard).copied().unwrap_or(0) >= epoch),
            )
            .await,
            Ok(Ok(_))
        );
        if !acked {
            return Err(SendError::Unfenced(host_id.to_string(), shard, epoch));
        }
        let command_id = command.command_id.clone();
        let done = self.wait(host_id, &command_id);
        let message = CoordinatorMessage {
            msg: Some(coordinator_message::Msg::Command(command)),
        };
        if session.outbound.send(Box::new(Ok(message))).await.is_err() {
            self.forget(host_id, &command_id);
            return Err(SendError::StreamClosed(host_id.to_string()));
        }
        match tokio::time::timeout(timeout, done).await {
            Ok(Ok(update)) => Ok(update),
            // The waiter is dropped only when the host's stream went away.
            Ok(Err(_)) => Err(SendError::StreamClosed(host_id.to_string())),
            Err(_) => {
                self.forget(host_id, &command_id);
                Err(SendError::Timeout(host_id.to_string(), timeout))
            }
        }
    }

    /// Forgets waiters that gave up (timed out), so the map cannot grow.
    pub fn forget(&self, host_id: &str, command_id: &str) {
        let mut waiters = self.waiters.lock().expect("pending lock");
        let key = (host_id.to_string(), command_id.to_string());
        if let Some(list) = waiters.get_mut(&key) {
            list.retain(|tx| !tx.is_closed());
            if list.is_empty() {
                waiters.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(id: &str, status: CommandStatus) -> CommandUpdate {
        CommandUpdate {
            command_id: id.into(),
            status: status as i32,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn final_updates_wake_waiters_and_progress_does_not() {
        let p = PendingCommands::default();
        let a = p.wait("h", "c1");
        let b = p.wait("h", "c1");
        p.deliver("h", update("c1", CommandStatus::Accepted));
        p.deliver("other", update("c1", CommandStatus::Succeeded));
        p.deliver("h", update("c1", CommandStatus::Failed));
        assert_eq!(a.await.unwrap().status(), CommandStatus::Failed);
        assert_eq!(b.await.unwrap().status(), CommandStatus::Failed);
    }

    #[tokio::test]
    async fn a_host_is_commanded_only_at_an_epoch_it_acknowledged() {
        use crate::fleet::registry::SessionHandle;
        use drover_common::proto::{Hello, coordinator_message};
        let registry = Registry::new(
            crate::metrics::Metrics::default(),
            crate::fleet::registry::Retention::default(),
        );
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        let (acks, fenced) = tokio::sync::watch::channel(HashMap::new());
        let handle = SessionHandle {
            outbound: tx,
            cancel: tokio_util::sync::CancellationToken::new(),
            fenced,
        };
        let hello = Hello {
            host_id: "h".into(),
            heartbeat_interval_ms: 1000,
            ..Default::default()
        };
        registry.connect(hello, "peer".into(), handle).unwrap();
        let p = std::sync::Arc::new(PendingCommands::default());
        let cmd = Command {
            command_id: "c1".into(),
            shard: 3,
            epoch: 7,
            action: None,
        };
        // Not acknowledged (or only a lower epoch): never sent.
        acks.send_replace(HashMap::from([(3, 6)]));
        let err = p
            .send(&registry, "h", cmd.clone(), Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(matches!(err, SendError::Unfenced(_, 3, 7)), "{err}");
        assert!(rx.try_recv().is_err(), "nothing reached the host");
        // Acknowledged: sent, and its final update answers.
        acks.send_replace(HashMap::from([(3, 7)]));
        let sending = {
            let (p, registry) = (p.clone(), &registry);
            async move { p.send(registry, "h", cmd, Duration::from_secs(5)).await }
        };
        let answering = async {
            let item = rx.recv().await.unwrap();
            let Ok(CoordinatorMessage {
                msg: Some(coordinator_message::Msg::Command(sent)),
            }) = *item
            else {
                panic!("a command");
            };
            assert_eq!((sent.shard, sent.epoch), (3, 7));
            p.deliver("h", update("c1", CommandStatus::Succeeded));
        };
        let (result, ()) = tokio::join!(sending, answering);
        assert_eq!(result.unwrap().status(), CommandStatus::Succeeded);
    }

    #[test]
    fn forgotten_waiters_leave_nothing_behind() {
        let p = PendingCommands::default();
        drop(p.wait("h", "c1"));
        p.forget("h", "c1");
        assert!(p.waiters.lock().unwrap().is_empty());
    }
}
