//! The health of the host's disk, as the agent finds it, for heartbeats.
//!
//! Rules:
//! 1. A full, read-only or over-quota file system is a *disk fault*
//!    ([`Fault`]), told apart from other I/O errors by errno, never by
//!    message text. Operations that meet one stop at once (retrying cannot
//!    help) and say "disk: …" with the path.
//! 2. Problems come from four sources ([`Source`]); each is set when its
//!    operation meets a fault and cleared when that operation next
//!    succeeds: the journal (every write of `state.json`), pulls, a write
//!    probe of the data dir (write, fsync, remove `.probe`, every
//!    `--disk-check-interval`, so a disk gone read-only is seen while the
//!    host is idle), and the free-space floor ([`low_space_floor`]).
//! 3. Every heartbeat carries the current problems; the coordinator shows a
//!    host with any as DEGRADED.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// A disk fault (rule 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Full,
    ReadOnly,
    Quota,
}

impl Fault {
    /// The fault behind `e`, if it is one.
    pub fn of(e: &io::Error) -> Option<Fault> {
        match e.raw_os_error() {
            Some(nix::libc::ENOSPC) => Some(Fault::Full),
            Some(nix::libc::EROFS) => Some(Fault::ReadOnly),
            Some(nix::libc::EDQUOT) => Some(Fault::Quota),
            _ => None,
        }
    }

    /// "disk: no space left on the device writing PATH".
    pub fn describe(self, path: &Path) -> String {
        let what = match self {
            Fault::Full => "no space left on the device",
            Fault::ReadOnly => "read-only file system",
            Fault::Quota => "quota exceeded",
        };
        format!("disk: {what} writing {}", path.display())
    }
}

/// Where a problem was found (rule 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Source {
    Journal,
    Pull,
    Probe,
    LowSpace,
}

/// The host's current disk problems, shared by the executor, the disk
/// watch and the heartbeat.
#[derive(Debug, Default)]
pub struct DiskHealth {
    problems: Mutex<BTreeMap<Source, String>>,
}

impl DiskHealth {
    pub fn set(&self, source: Source, problem: String) {
        let mut problems = self.problems.lock().expect("disk health lock");
        if problems.get(&source) != Some(&problem) {
            warn!(?source, %problem, "host disk problem");
            problems.insert(source, problem);
        }
    }

    pub fn clear(&self, source: Source) {
        if let Some(was) = self
            .problems
            .lock()
            .expect("disk health lock")
            .remove(&source)
        {
            info!(?source, %was, "host disk problem cleared");
        }
    }

    /// One line per problem, in source order (rule 3).
    pub fn problems(&self) -> Vec<String> {
        self.problems
            .lock()
            .expect("disk health lock")
            .values()
            .cloned()
            .collect()
    }
}

/// Free space under which a file system counts as full: 5% of it, at most
/// 64 MiB. Unpacking also keeps this much free.
pub fn low_space_floor(total_bytes: u64) -> u64 {
    (total_bytes / 20).min(64 << 20)
}

/// (total, available) bytes of the file system holding `dir`.
pub fn space(dir: &Path) -> Option<(u64, u64)> {
    let st = nix::sys::statvfs::statvfs(dir).ok()?;
    let frag = st.fragment_size();
    Some((st.blocks() * frag, st.blocks_available() * frag))
}

/// Writes, syncs and removes a small file in `dir`.
pub fn probe(dir: &Path) -> Result<(), String> {
    use std::io::Write;
    let path = dir.join(".probe");
    let result = (|| {
        let mut f = std::fs::File::create(&path)?;
        f.write_all(b"drover-agent disk probe\n")?;
        f.sync_all()?;
        std::fs::remove_file(&path)
    })();
    result.map_err(|e| match Fault::of(&e) {
        Some(fault) => fault.describe(&path),
        None => format!("disk: writing {}: {e}", path.display()),
    })
}

/// Checks `dir` every `interval` until `shutdown` (rule 2's probe and floor).
pub async fn watch(
    dir: PathBuf,
    health: std::sync::Arc<DiskHealth>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let dir2 = dir.clone();
        let probed = tokio::task::spawn_blocking(move || probe(&dir2))
            .await
            .unwrap_or_else(|e| Err(format!("disk: the probe task failed: {e}")));
        match probed {
            Ok(()) => health.clear(Source::Probe),
            Err(e) => health.set(Source::Probe, e),
        }
        match space(&dir) {
            Some((total, available)) if available < low_space_floor(total) => health.set(
                Source::LowSpace,
                format!(
                    "disk: {} has {available} of {total} bytes free (under the floor of {})",
                    dir.display(),
                    low_space_floor(total)
                ),
            ),
            _ => health.clear(Source::LowSpace),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_are_told_by_errno() {
        let full = io::Error::from_raw_os_error(nix::libc::ENOSPC);
        assert_eq!(Fault::of(&full), Some(Fault::Full));
        assert_eq!(
            Fault::of(&io::Error::from_raw_os_error(nix::libc::EROFS)),
            Some(Fault::ReadOnly)
        );
        assert_eq!(
            Fault::of(&io::Error::from_raw_os_error(nix::libc::EACCES)),
            None
        );
        assert_eq!(
            Fault::Full.describe(Path::new("/d/x")),
            "disk: no space left on the device writing /d/x"
        );
    }

    #[test]
    fn problems_are_set_and_cleared_per_source() {
        let h = DiskHealth::default();
        h.set(Source::Probe, "disk: probe".into());
        h.set(Source::Journal, "journal: x".into());
        assert_eq!(h.problems(), ["journal: x", "disk: probe"]);
        h.clear(Source::Probe);
        assert_eq!(h.problems(), ["journal: x"]);
    }

    #[test]
    fn the_floor_is_five_percent_at_most_64_mib() {
        assert_eq!(low_space_floor(4 << 20), (4 << 20) / 20);
        assert_eq!(low_space_floor(1 << 40), 64 << 20);
    }

    #[test]
    fn a_writable_dir_passes_the_probe() {
        let dir = tempfile::tempdir().unwrap();
        probe(dir.path()).unwrap();
        assert!(!dir.path().join(".probe").exists());
    }
}
