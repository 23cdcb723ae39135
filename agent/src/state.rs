//! The agent's local state journal: what runs where, recent command results
//! and the highest epoch seen per shard. Written atomically (temp file,
//! fsync, rename, fsync of the directory) after every change and reloaded at
//! start, so a kill -9 at any moment leaves either the old or the new state.

use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Command results remembered for idempotent answers to re-sent commands.
pub const MAX_RESULTS: usize = 4096;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRecord {
    /// Active release (sha256), if any.
    pub current: Option<String>,
    /// The release before it, kept unpacked for rollback.
    pub previous: Option<String>,
    pub current_since_unix_ms: u64,
    /// Releases on disk in activation order, oldest first.
    pub releases: Vec<String>,
    /// Process group of the running service (process runtime), so an agent
    /// restarted after a crash can stop what its predecessor left running.
    pub pgid: Option<i32>,
    /// The config bundle it runs with (digest), if any.
    #[serde(default)]
    pub config: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedResult {
    pub command_id: String,
    /// A terminal `CommandStatus` as its i32.
    pub status: i32,
    pub reason: String,
    pub output_tail: String,
    /// It failed at the command's deadline (a stuck step).
    #[serde(default)]
    pub deadline_exceeded: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalState {
    pub services: BTreeMap<String, ServiceRecord>,
    /// Oldest first.
    pub results: VecDeque<RecordedResult>,
    pub epochs: BTreeMap<u32, u64>,
    /// The coordinators' cluster the epochs belong to ("" before the first
    /// Welcome).
    #[serde(default)]
    pub cluster_id: String,
}

impl LocalState {
    pub fn result(&self, command_id: &str) -> Option<&RecordedResult> {
        self.results
            .iter()
            .rev()
            .find(|r| r.command_id == command_id)
    }

    pub fn record(&mut self, result: RecordedResult) {
        self.results.retain(|r| r.command_id != result.command_id);
        self.results.push_back(result);
        while self.results.len() > MAX_RESULTS {
            self.results.pop_front();
        }
    }
}

/// The journal file and its last saved contents.
pub struct Journal {
    path: PathBuf,
    pub state: LocalState,
}

impl Journal {
    /// Loads `<data>/state.json`, or starts empty when there is none.
    pub fn open(data_dir: &Path) -> anyhow::Result<Journal> {
        let path = data_dir.join("state.json");
        let state = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                anyhow::anyhow!(
                    "{} is corrupt: {e}; move it away to start fresh",
                    path.display()
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => LocalState::default(),
            Err(e) => return Err(anyhow::anyhow!("reading {}: {e}", path.display())),
        };
        Ok(Journal { path, state })
    }

    /// Writes the state atomically.
    pub fn save(&self) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(&self.state).map_err(std::io::Error::other)?;
        write_durably(&self.path, &bytes)
    }

    /// Applies `change` and writes the result: the state in memory changes
    /// only once it is on disk, so nothing is believed (an epoch, a
    /// command's result) that a crash would forget.
    pub fn commit(&mut self, change: impl FnOnce(&mut LocalState)) -> std::io::Result<()> {
        let mut next = self.state.clone();
        change(&mut next);
        let bytes = serde_json::to_vec_pretty(&next).map_err(std::io::Error::other)?;
        write_durably(&self.path, &bytes)?;
        self.state = next;
        Ok(())
    }
}

/// An exclusive lock on the data dir, held for the agent's life
/// (`agent.lock`, with the holder's pid inside).
pub struct DataDirLock {
    _file: nix::fcntl::Flock<std::fs::File>,
}

/// Takes the data dir's lock, or says which process holds it.
pub fn lock_data_dir(data_dir: &Path) -> anyhow::Result<DataDirLock> {
    use std::io::{Read, Seek};
    let path = data_dir.join("agent.lock");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(mut locked) => {
            locked.set_len(0)?;
            locked.rewind()?;
            write!(locked, "{}", std::process::id())?;
            locked.sync_all()?;
            Ok(DataDirLock { _file: locked })
        }
        Err((mut f, _)) => {
            let mut holder = String::new();
            let _ = f.read_to_string(&mut holder);
            anyhow::bail!(
                "another agent (pid {}) is using data dir {}; one agent per data dir",
                holder.trim(),
                data_dir.display()
            )
        }
    }
}

/// Replaces `path` with `bytes` atomically and durably: temp file, fsync,
/// rename, fsync of the directory; the file is the agent's alone (0600).
pub fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_durably_as(path, bytes, 0o600)
}

/// [`write_durably`] with the file's permission bits.
pub fn write_durably_as(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    // The mode asked for, whatever the umask.
    file.set_permissions(std::fs::Permissions::from_mode(mode))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.state, LocalState::default());
        j.state.epochs.insert(3, 42);
        j.state.services.insert(
            "web".into(),
            ServiceRecord {
                current: Some("a".repeat(64)),
                ..Default::default()
            },
        );
        j.state.record(RecordedResult {
            command_id: "c1".into(),
            status: 3,
            reason: String::new(),
            output_tail: String::new(),
            deadline_exceeded: false,
        });
        j.save().unwrap();
        let again = Journal::open(dir.path()).unwrap();
        assert_eq!(again.state, j.state);
        assert!(!dir.path().join("state.json.tmp").exists());
    }

    #[test]
    fn a_change_that_cannot_be_written_is_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        j.commit(|s| {
            s.epochs.insert(1, 5);
        })
        .unwrap();
        // The temp file's name taken by a directory: no write can succeed,
        // whoever runs the test.
        std::fs::create_dir(dir.path().join("state.json.tmp")).unwrap();
        assert!(
            j.commit(|s| {
                s.epochs.insert(1, 6);
            })
            .is_err()
        );
        assert_eq!(j.state.epochs[&1], 5, "memory keeps what is on disk");
        assert_eq!(Journal::open(dir.path()).unwrap().state, j.state);
    }

    #[test]
    fn a_corrupt_journal_is_an_error_that_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("state.json"), b"{not json").unwrap();
        let err = Journal::open(dir.path()).err().unwrap().to_string();
        assert!(
            err.contains("is corrupt") && err.contains("move it away"),
            "{err}"
        );
    }

    #[test]
    fn results_are_bounded_and_latest_wins() {
        let mut s = LocalState::default();
        for i in 0..MAX_RESULTS + 10 {
            s.record(RecordedResult {
                command_id: format!("c{i}"),
                status: 3,
                reason: String::new(),
                output_tail: String::new(),
                deadline_exceeded: false,
            });
        }
        assert_eq!(s.results.len(), MAX_RESULTS);
        assert!(s.result("c0").is_none());
        s.record(RecordedResult {
            command_id: "c20".into(),
            status: 4,
            reason: "x".into(),
            output_tail: String::new(),
            deadline_exceeded: false,
        });
        assert_eq!(s.result("c20").unwrap().status, 4);
    }
}
