//! Releases on disk:
//!
//! ```text
//! <data>/cache/<sha256>.tar.gz      verified artifacts (Verify re-hashes these)
//! <data>/cache/<sha256>.part        a pull in progress (resumed from its length)
//! <data>/cache/<sha256>.tar         an artifact pulled by chunks: its unpacked tar stream
//! <data>/cache/<sha256>.chunks      ... and its chunk index (served to peers, reused)
//! <data>/cache/<sha256>.tar.part    a chunked pull in progress
//! <data>/services/<service>/releases/<sha256>/   unpacked releases
//! <data>/services/<service>/releases/<sha256>.tree   what each holds (checked before it starts)
//! <data>/services/<service>/current -> releases/<sha256>   switched atomically
//! <data>/services/<service>/logs/   the service's output (process runtime)
//! <data>/services/<service>/slots/<blue|green>/{current,logs}   a blue-green slot's
//! <data>/services/<service>/flags.json   its feature flags (0644: the service reads it)
//! ```
//!
//! Permissions: services run as unprivileged users and must reach their
//! release, so the data dir is 0711 (others may pass through, never list);
//! everything they have no business reading is private to the agent:
//! `cache/` and `logs/` 0700, the journal and the lock 0600. Release trees
//! are root's and read-only to services (the unpacker masks modes to 0755).

use std::path::{Path, PathBuf};

use drover_common::artifact::Digest;

use crate::unit::{Unit, slot_name};

/// Creates `dir` (and its parents) and makes it the agent's alone (0700).
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Paths of one agent's data directory.
#[derive(Debug, Clone)]
pub struct Layout {
    pub data_dir: PathBuf,
}

/// Service names become path components: only safe ones are accepted.
pub use drover_common::ids::validate_service;

impl Layout {
    pub fn cache_dir(&self) -> PathBuf {
        self.data_dir.join("cache")
    }

    pub fn cached(&self, digest: &Digest) -> PathBuf {
        self.cache_dir().join(format!("{digest}.tar.gz"))
    }

    /// The trusted signature a Pull accepted for `digest` (JSON).
    pub fn signature(&self, digest: &Digest) -> PathBuf {
        self.cache_dir().join(format!("{digest}.sig"))
    }

    /// An artifact pulled by chunks: its tar stream (see `chunk_cache`).
    pub fn cached_tar(&self, digest: &Digest) -> PathBuf {
        self.cache_dir().join(format!("{digest}.tar"))
    }

    /// The chunk index of [`Layout::cached_tar`] (the proto, encoded).
    pub fn chunk_index(&self, digest: &Digest) -> PathBuf {
        self.cache_dir().join(format!("{digest}.chunks"))
    }

    pub fn partial_tar(&self, digest: &Digest) -> PathBuf {
        self.cache_dir().join(format!("{digest}.tar.part"))
    }

    /// The artifact is on this host, as a verified file or by chunks.
    pub fn is_cached(&self, digest: &Digest) -> bool {
        self.cached(digest).exists()
            || (self.cached_tar(digest).exists() && self.chunk_index(digest).exists())
    }

    /// Removes every cached form of `digest`.
    pub fn remove_cached(&self, digest: &Digest) {
        for path in [
            self.cached(digest),
            self.cached_tar(digest),
            self.chunk_index(digest),
            self.signature(digest),
        ] {
            let _ = std::fs::remove_file(path);
        }
    }

    pub fn partial(&self, digest: &Digest) -> PathBuf {
        self.cache_dir().join(format!("{digest}.part"))
    }

    pub fn service_dir(&self, service: &str) -> PathBuf {
        self.data_dir.join("services").join(service)
    }

    /// The service's feature flags, kept current by the agent.
    pub fn flags_file(&self, service: &str) -> PathBuf {
        self.service_dir(service).join("flags.json")
    }

    /// The service's config bundles, one directory each
    /// (`config_bundles.rs`).
    pub fn configs_dir(&self, service: &str) -> PathBuf {
        self.service_dir(service).join("configs")
    }

    /// The link to the service's current config bundle
    /// (`$DROVER_CONFIG_DIR`).
    pub fn config_link(&self, service: &str) -> PathBuf {
        self.service_dir(service).join("config")
    }

    pub fn releases_dir(&self, service: &str) -> PathBuf {
        self.service_dir(service).join("releases")
    }

    pub fn release(&self, service: &str, digest: &Digest) -> PathBuf {
        self.releases_dir(service).join(digest.hex())
    }

    /// The record of what release `digest` holds, file by file (JSON).
    pub fn release_tree(&self, service: &str, digest: &Digest) -> PathBuf {
        self.releases_dir(service)
            .join(format!("{}.tree", digest.hex()))
    }

    /// Where a unit keeps its `current` link and its logs: the service's
    /// directory, or `slots/<slot>` in it.
    pub fn unit_dir(&self, unit: &Unit) -> PathBuf {
        match slot_name(unit.slot) {
            None => self.service_dir(&unit.service),
            Some(slot) => self.service_dir(&unit.service).join("slots").join(slot),
        }
    }

    pub fn current_link(&self, unit: &Unit) -> PathBuf {
        self.unit_dir(unit).join("current")
    }

    pub fn log_dir(&self, unit: &Unit) -> PathBuf {
        self.unit_dir(unit).join("logs")
    }

    /// Points the unit's `current` at the release atomically: a new
    /// symlink under a temp name, renamed over the old one.
    pub fn switch_current(&self, unit: &Unit, digest: &Digest) -> std::io::Result<()> {
        let dir = self.unit_dir(unit);
        std::fs::create_dir_all(&dir)?;
        let link = self.current_link(unit);
        let tmp = dir.join(".current.tmp");
        let _ = std::fs::remove_file(&tmp);
        let releases = match unit.slot {
            drover_common::proto::Slot::None => PathBuf::from("releases"),
            _ => Path::new("../..").join("releases"),
        };
        std::os::unix::fs::symlink(releases.join(digest.hex()), &tmp)?;
        std::fs::rename(&tmp, &link)?;
        std::fs::File::open(dir)?.sync_all()
    }

    /// Removes releases (and their cached archives) beyond the newest
    /// `keep`, never `protect`ed ones (current and previous). Returns the
    /// digests removed.
    pub fn prune(
        &self,
        service: &str,
        releases: &mut Vec<String>,
        keep: usize,
        protect: &[Option<&str>],
    ) -> Vec<String> {
        let mut removed = Vec::new();
        while releases.len() > keep {
            let Some(pos) = releases
                .iter()
                .position(|r| !protect.contains(&Some(r.as_str())))
            else {
                break;
            };
            let digest = releases.remove(pos);
            removed.push(digest);
        }
        for hex in &removed {
            if let Ok(digest) = hex.parse::<Digest>() {
                let _ = std::fs::remove_dir_all(self.release(service, &digest));
                let _ = std::fs::remove_file(self.release_tree(service, &digest));
                self.remove_cached(&digest);
            }
        }
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prune_keeps_the_newest_and_never_current_or_previous() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout {
            data_dir: dir.path().to_path_buf(),
        };
        let mut releases: Vec<String> = ["a", "b", "c", "d", "e"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        // "a" is still the previous release (a rollback target): it stays.
        let removed = layout.prune("web", &mut releases, 3, &[Some("e"), Some("a")]);
        assert_eq!(removed, ["b", "c"]);
        assert_eq!(releases, ["a", "d", "e"]);
    }

    #[test]
    fn switch_is_a_rename_of_a_relative_link() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout {
            data_dir: dir.path().to_path_buf(),
        };
        let d1: Digest = "1".repeat(64).parse().unwrap();
        let d2: Digest = "2".repeat(64).parse().unwrap();
        for d in [&d1, &d2] {
            std::fs::create_dir_all(layout.release("web", d)).unwrap();
        }
        let web = Unit::plain("web");
        layout.switch_current(&web, &d1).unwrap();
        layout.switch_current(&web, &d2).unwrap();
        let target = std::fs::read_link(layout.current_link(&web)).unwrap();
        assert_eq!(target, Path::new("releases").join(d2.hex()));
        assert!(layout.current_link(&web).join(".").exists());
        // A slot's link lives in its own directory and reaches the same releases.
        let green = Unit::new("web", drover_common::proto::Slot::Green);
        layout.switch_current(&green, &d1).unwrap();
        assert!(layout.current_link(&green).join(".").exists());
        assert_eq!(
            std::fs::canonicalize(layout.current_link(&green)).unwrap(),
            std::fs::canonicalize(layout.release("web", &d1)).unwrap()
        );
        assert_eq!(
            std::fs::read_link(layout.current_link(&web)).unwrap(),
            Path::new("releases").join(d2.hex()),
            "the plain process's link is untouched"
        );
    }
}
