//! The executor's fencing rule (rule 1 of `executor/mod.rs`) on a real journal:
//! below the fenced epoch is stale, above it is unfenced, only a Fence
//! raises it (durably, so it survives a restart), and a new cluster id
//! resets it.

use std::sync::Arc;
use std::time::Duration;

use drover_agent::executor::{Executor, ExecutorConfig};
use drover_agent::health::HealthBoard;
use drover_agent::pull::PullLimits;
use drover_agent::releases::Layout;
use drover_agent::runtime::process::ProcessRuntime;
use drover_agent::state::Journal;
use drover_common::proto::{
    AgentMessage, Command, CommandStatus, ShardEpoch, VerifyCommand, agent_message, command,
};

fn executor(data: &std::path::Path) -> Arc<Executor> {
    let runtime = Arc::new(ProcessRuntime::new());
    let board = Arc::new(HealthBoard::new(runtime.clone(), Duration::from_secs(1)));
    Executor::new(
        ExecutorConfig {
            layout: Layout {
                data_dir: data.to_path_buf(),
            },
            env: Default::default(),
            slot_ports: Default::default(),
            users: Default::default(),
            keep_releases: 3,
            limits: PullLimits {
                max_artifact_bytes: 1 << 20,
                unpack: drover_common::artifact::Limits {
                    max_entries: 100,
                    max_unpacked_bytes: 1 << 20,
                    ..Default::default()
                },
            },
            kill_leftovers: false,
            dialer: drover_common::tls::client::Dialer::plaintext(),
            peer_dialer: drover_common::tls::client::Dialer::plaintext(),
            signers: Default::default(),
            disk: Default::default(),
            chunks: drover_agent::chunk_cache::ChunkCache::open(Layout {
                data_dir: data.to_path_buf(),
            }),
            secrets: Default::default(),
        },
        Journal::open(data).unwrap(),
        runtime,
        board,
    )
}

/// The final status of a verify command with `epoch` on shard 1.
async fn verify_at(executor: &Arc<Executor>, id: &str, epoch: u64) -> (CommandStatus, String) {
    let (tx, mut rx) = tokio::sync::mpsc::channel(8);
    let cmd = Command {
        command_id: id.into(),
        shard: 1,
        epoch,
        action: Some(command::Action::Verify(VerifyCommand {
            service: "hello".into(),
            artifact: "a".repeat(64),
        })),
    };
    executor.clone().handle(cmd, tx).await;
    let mut last = None;
    while let Ok(AgentMessage {
        msg: Some(agent_message::Msg::CommandUpdate(u)),
    }) = rx.try_recv()
    {
        last = Some((u.status(), u.reason));
    }
    last.expect("a final update")
}

#[tokio::test]
async fn epochs_rise_only_by_fence_and_a_new_cluster_resets_them() {
    let dir = tempfile::tempdir().unwrap();
    let ex = executor(dir.path());
    ex.join_cluster("cluster-a", true);
    assert!(ex.raise_epochs(&[ShardEpoch { shard: 1, epoch: 5 }]));

    let (status, reason) = verify_at(&ex, "above", 6).await;
    assert_eq!(status, CommandStatus::RejectedUnfenced, "{reason}");
    assert!(
        reason.contains("only the shard leader's Fence raises it"),
        "{reason}"
    );
    let (status, _) = verify_at(&ex, "below", 4).await;
    assert_eq!(status, CommandStatus::RejectedStale);
    // At the fenced epoch the command runs (and fails: nothing to verify).
    let (status, reason) = verify_at(&ex, "at", 5).await;
    assert_eq!(status, CommandStatus::Failed, "{reason}");
    // A command never raised the epoch: 6 is still unfenced.
    let (status, _) = verify_at(&ex, "above-again", 6).await;
    assert_eq!(status, CommandStatus::RejectedUnfenced);

    // The fenced epoch is durable: a restarted agent holds it.
    drop(ex);
    let ex = executor(dir.path());
    let (status, _) = verify_at(&ex, "below-after-restart", 4).await;
    assert_eq!(status, CommandStatus::RejectedStale);
    // The same cluster changes nothing; a new one resets every epoch.
    ex.join_cluster("cluster-a", true);
    let (status, _) = verify_at(&ex, "still-stale", 4).await;
    assert_eq!(status, CommandStatus::RejectedStale);
    ex.join_cluster("cluster-b", true);
    assert!(ex.raise_epochs(&[ShardEpoch { shard: 1, epoch: 2 }]));
    let (status, reason) = verify_at(&ex, "new-cluster", 2).await;
    assert_eq!(status, CommandStatus::Failed, "past fencing: {reason}");
}

/// The journal's temp file's name taken by a directory: no journal write
/// can succeed, whoever runs the test. Removing it heals the journal.
fn break_journal(data: &std::path::Path) -> std::path::PathBuf {
    let blocker = data.join("state.json.tmp");
    std::fs::create_dir(&blocker).unwrap();
    blocker
}

#[tokio::test]
async fn an_epoch_that_cannot_be_persisted_is_not_raised_nor_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let ex = executor(dir.path());
    ex.join_cluster("cluster-a", true);
    assert!(ex.raise_epochs(&[ShardEpoch { shard: 1, epoch: 5 }]));
    let blocker = break_journal(dir.path());
    assert!(
        !ex.raise_epochs(&[ShardEpoch { shard: 1, epoch: 6 }]),
        "not durable, not acknowledged"
    );
    let (status, reason) = verify_at(&ex, "at-6", 6).await;
    assert_eq!(
        status,
        CommandStatus::RejectedUnfenced,
        "nothing runs at an epoch only memory holds: {reason}"
    );
    std::fs::remove_dir(&blocker).unwrap();
    assert!(ex.raise_epochs(&[ShardEpoch { shard: 1, epoch: 6 }]));
    let (status, _) = verify_at(&ex, "at-6-again", 6).await;
    assert_ne!(status, CommandStatus::RejectedUnfenced);
}

#[tokio::test]
async fn a_result_that_cannot_be_recorded_fails_the_command_and_is_not_remembered() {
    let dir = tempfile::tempdir().unwrap();
    let ex = executor(dir.path());
    ex.join_cluster("cluster-a", true);
    assert!(ex.raise_epochs(&[ShardEpoch { shard: 1, epoch: 5 }]));
    let blocker = break_journal(dir.path());
    let (status, reason) = verify_at(&ex, "v1", 5).await;
    assert_eq!(status, CommandStatus::Failed, "{reason}");
    assert!(reason.contains("could not be recorded"), "{reason}");
    std::fs::remove_dir(&blocker).unwrap();
    // Sent again, it runs again (nothing was remembered) and its result is
    // recorded now: the same answer from the journal after a restart.
    let (again, reason) = verify_at(&ex, "v1", 5).await;
    assert!(!reason.contains("could not be recorded"), "{reason}");
    drop(ex);
    let ex = executor(dir.path());
    assert_eq!(verify_at(&ex, "v1", 5).await.0, again);
}
