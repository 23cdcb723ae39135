//! Hooks (pre_start, post_start, validate): run as the service runs, in
//! their own process group, with bounded output, for at most their own
//! timeout and never past the restart's deadline.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use drover_common::artifact::manifest::Hook;

use super::{Executor, Outcome, TAIL_LINES};
use crate::runtime::ServiceSpec;

/// When a restart must be done by, and the whole time it was given.
#[derive(Debug, Clone, Copy)]
pub(super) struct Deadline {
    pub(super) at: Instant,
    pub(super) of: Duration,
}

impl Executor {
    /// Runs one hook as the service (see `runtime::launch`), for at most its
    /// own timeout and never past `deadline` (the restart's). A hook that
    /// fails or overruns is named with its exit status or the limit it hit,
    /// and the tail of what it printed.
    pub(super) async fn run_hook(
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
        // The restart's deadline, not the hook's own timeout, is what
        // makes a host stuck.
        let at_deadline = hook.timeout > left;
        let (limit, which) = if !at_deadline {
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
                let failed =
                    Outcome::failed(format!("{name} hook did not finish within {which}; killed"))
                        .with_tail(tail());
                return Err(if at_deadline {
                    failed.at_deadline()
                } else {
                    failed
                });
            }
            Ok(status) => status
                .map_err(|e| Outcome::failed(format!("{name} hook {}: {e}", program.display())))?,
        };
        if status.success() {
            return Ok(());
        }
        Err(Outcome::failed(format!("{name} hook failed: {status}")).with_tail(tail()))
    }
}
