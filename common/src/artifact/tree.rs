//! What an unpacked release holds, file by file: recorded once when the
//! release is made (and made durable on the way: every file and directory
//! fsynced), checked again before the release is started. A release torn
//! by a crash, a full disk or a stray edit differs from its record and is
//! never started.
//!
//! The walk never follows a link: links are recorded by their target.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::Digest;

/// One entry of a release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Entry {
    File {
        sha256: String,
        size: u64,
        /// Permission bits.
        mode: u32,
    },
    Dir,
    Symlink {
        target: PathBuf,
    },
}

/// Every entry of a release by its path inside it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tree {
    pub entries: BTreeMap<PathBuf, Entry>,
}

/// How a release differs from its record.
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error("{path} is missing from the release")]
    Missing { path: PathBuf },
    #[error("{path} is in the release but not in its record")]
    Unexpected { path: PathBuf },
    #[error("{path} differs from its record ({what})")]
    Differs { path: PathBuf, what: &'static str },
    #[error("reading the release at {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> TreeError + '_ {
    move |source| TreeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Walks `root`: each entry by its path inside it; `sync` fsyncs every
/// file and directory on the way.
fn walk(root: &Path, sync: bool) -> Result<Tree, TreeError> {
    let mut tree = Tree::default();
    let mut dirs = vec![PathBuf::new()];
    while let Some(rel) = dirs.pop() {
        let dir = root.join(&rel);
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .map_err(io_at(&dir))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(io_at(&dir))?;
        names.sort();
        for name in names {
            let path = rel.join(&name);
            let full = root.join(&path);
            let meta = std::fs::symlink_metadata(&full).map_err(io_at(&full))?;
            let entry = if meta.file_type().is_symlink() {
                Entry::Symlink {
                    target: std::fs::read_link(&full).map_err(io_at(&full))?,
                }
            } else if meta.is_dir() {
                dirs.push(path.clone());
                Entry::Dir
            } else if meta.is_file() {
                let file = File::open(&full).map_err(io_at(&full))?;
                if sync {
                    file.sync_all().map_err(io_at(&full))?;
                }
                let (digest, size) = Digest::of_reader(file).map_err(io_at(&full))?;
                Entry::File {
                    sha256: digest.hex(),
                    size,
                    mode: meta.permissions().mode() & 0o7777,
                }
            } else {
                return Err(TreeError::Differs {
                    path,
                    what: "not a file, directory or link",
                });
            };
            tree.entries.insert(path, entry);
        }
        if sync {
            File::open(&dir)
                .and_then(|d| d.sync_all())
                .map_err(io_at(&dir))?;
        }
    }
    Ok(tree)
}

/// Records the release at `root` and makes it durable: every file and
/// directory is fsynced before this returns.
pub fn record(root: &Path) -> Result<Tree, TreeError> {
    walk(root, true)
}

/// Checks the release at `root` against its record.
pub fn verify(root: &Path, recorded: &Tree) -> Result<(), TreeError> {
    let found = walk(root, false)?;
    for (path, want) in &recorded.entries {
        let Some(got) = found.entries.get(path) else {
            return Err(TreeError::Missing { path: path.clone() });
        };
        let what = match (want, got) {
            (a, b) if a == b => continue,
            (Entry::File { sha256: a, .. }, Entry::File { sha256: b, .. }) if a != b => "contents",
            (Entry::File { size: a, .. }, Entry::File { size: b, .. }) if a != b => "size",
            (Entry::File { .. }, Entry::File { .. }) => "permissions",
            (Entry::Symlink { .. }, Entry::Symlink { .. }) => "link target",
            _ => "kind",
        };
        return Err(TreeError::Differs {
            path: path.clone(),
            what,
        });
    }
    if let Some(path) = found
        .entries
        .keys()
        .find(|p| !recorded.entries.contains_key(*p))
    {
        return Err(TreeError::Unexpected { path: path.clone() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("bin")).unwrap();
        std::fs::write(dir.path().join("bin/start"), b"#!/bin/sh\n").unwrap();
        std::fs::write(dir.path().join("drover.toml"), b"service = \"x\"\n").unwrap();
        std::os::unix::fs::symlink("bin/start", dir.path().join("run")).unwrap();
        dir
    }

    #[test]
    fn a_release_matches_its_record_until_anything_changes() {
        let dir = release();
        let tree = record(dir.path()).unwrap();
        assert_eq!(tree.entries.len(), 4);
        verify(dir.path(), &tree).unwrap();

        // Torn: a file cut short.
        std::fs::write(dir.path().join("bin/start"), b"#!/bin").unwrap();
        let e = verify(dir.path(), &tree).unwrap_err().to_string();
        assert!(e.contains("bin/start differs"), "{e}");

        let dir = release();
        let tree = record(dir.path()).unwrap();
        std::fs::remove_file(dir.path().join("drover.toml")).unwrap();
        let e = verify(dir.path(), &tree).unwrap_err().to_string();
        assert!(e.contains("drover.toml is missing"), "{e}");

        let dir = release();
        let tree = record(dir.path()).unwrap();
        std::fs::write(dir.path().join("extra"), b"").unwrap();
        let e = verify(dir.path(), &tree).unwrap_err().to_string();
        assert!(e.contains("extra is in the release but not"), "{e}");

        let dir = release();
        let tree = record(dir.path()).unwrap();
        std::fs::remove_file(dir.path().join("run")).unwrap();
        std::os::unix::fs::symlink("drover.toml", dir.path().join("run")).unwrap();
        let e = verify(dir.path(), &tree).unwrap_err().to_string();
        assert!(
            e.contains("run differs from its record (link target)"),
            "{e}"
        );
    }
}
