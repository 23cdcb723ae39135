//! The chunks this agent holds (issue 15). An artifact pulled by chunks
//! is kept as its unpacked tar stream (`cache/<sha256>.tar`) beside its
//! chunk index (`cache/<sha256>.chunks`); together they are what the agent
//! reuses for the next release and serves to its peers.
//!
//! Rules:
//! 1. An artifact is held only when both files are there and the index
//!    file is well formed; the index is written before the tar is renamed
//!    into place, so a crash in between leaves nothing half-held.
//! 2. Every chunk read from here is hashed again before it is used or
//!    served: a damaged cache file costs a fetch, never a bad byte.
//! 3. The in-memory view (which artifacts, where each chunk lies) is
//!    rebuilt from the directory after every change (`rescan`), never per
//!    heartbeat or per request.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use drover_common::artifact::Digest;
use drover_common::artifact::chunks::ChunkIndex;
use prost::Message;
use tracing::warn;

use crate::releases::Layout;

/// Where one chunk lies in a held tar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub artifact: Digest,
    pub path: PathBuf,
    pub offset: u64,
    pub len: u32,
}

#[derive(Default)]
struct Held {
    /// Held artifacts and their indexes.
    artifacts: BTreeMap<Digest, Arc<ChunkIndex>>,
    /// Each chunk digest → one place it lies (any artifact holding it).
    chunks: HashMap<Digest, Location>,
}

pub struct ChunkCache {
    layout: Layout,
    held: RwLock<Held>,
}

impl std::fmt::Debug for ChunkCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkCache")
            .field("held", &self.held())
            .finish()
    }
}

impl ChunkCache {
    /// The cache as the directory holds it now.
    pub fn open(layout: Layout) -> Arc<ChunkCache> {
        let cache = Arc::new(ChunkCache {
            layout,
            held: RwLock::new(Held::default()),
        });
        cache.rescan();
        cache
    }

    /// Rule 3: rebuilds the view from `cache/`.
    pub fn rescan(&self) {
        let mut held = Held::default();
        let entries = match std::fs::read_dir(self.layout.cache_dir()) {
            Ok(e) => e,
            Err(_) => {
                *self.held.write().expect("chunk cache lock") = held;
                return;
            }
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(hex) = name.to_str().and_then(|n| n.strip_suffix(".chunks")) else {
                continue;
            };
            let Ok(artifact) = hex.parse::<Digest>() else {
                continue;
            };
            let tar = self.layout.cached_tar(&artifact);
            if !tar.exists() {
                continue;
            }
            match read_index(&self.layout, &artifact) {
                Ok(index) => {
                    for (chunk, offset) in index.chunks.iter().zip(index.offsets()) {
                        held.chunks.entry(chunk.digest).or_insert(Location {
                            artifact,
                            path: tar.clone(),
                            offset,
                            len: chunk.len,
                        });
                    }
                    held.artifacts.insert(artifact, Arc::new(index));
                }
                Err(e) => warn!(%artifact, error = %e, "chunk index unreadable: not held"),
            }
        }
        *self.held.write().expect("chunk cache lock") = held;
    }

    /// Artifacts held whole (hex), for Hello and heartbeats.
    pub fn held(&self) -> Vec<String> {
        let held = self.held.read().expect("chunk cache lock");
        held.artifacts.keys().map(|d| d.hex()).collect()
    }

    pub fn index(&self, artifact: &Digest) -> Option<Arc<ChunkIndex>> {
        let held = self.held.read().expect("chunk cache lock");
        held.artifacts.get(artifact).cloned()
    }

    pub fn locate(&self, chunk: &Digest) -> Option<Location> {
        let held = self.held.read().expect("chunk cache lock");
        held.chunks.get(chunk).cloned()
    }

    /// Rule 2: the chunk's bytes, read (blocking) and hashed again; `None`
    /// when it is not held or no longer matches.
    pub fn read_verified(&self, chunk: &Digest) -> Option<Vec<u8>> {
        let at = self.locate(chunk)?;
        let mut buf = vec![0u8; at.len as usize];
        let file = std::fs::File::open(&at.path).ok()?;
        file.read_exact_at(&mut buf, at.offset).ok()?;
        if Digest::of_bytes(&buf) != *chunk {
            warn!(chunk = %chunk, file = %at.path.display(), "a held chunk no longer matches its digest");
            return None;
        }
        Some(buf)
    }
}

/// Reads a held artifact's index file (rule 1: well formed, and its
/// chunks hash to the index digest it names).
pub fn read_index(layout: &Layout, artifact: &Digest) -> Result<ChunkIndex, String> {
    let path = layout.chunk_index(artifact);
    let bytes = std::fs::read(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let wire = drover_common::proto::ChunkIndex::decode(bytes.as_slice())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let named: Digest = wire
        .index_sha256
        .parse()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    ChunkIndex::from_proto(&wire, &named).map_err(|e| format!("{}: {e}", path.display()))
}

/// Writes `index` as `artifact`'s index file, durably (before the tar).
pub fn write_index(layout: &Layout, artifact: &Digest, index: &ChunkIndex) -> std::io::Result<()> {
    let bytes = index.to_proto(artifact).encode_to_vec();
    crate::state::write_durably(&layout.chunk_index(artifact), &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_means_index_and_tar_and_every_read_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout {
            data_dir: dir.path().to_path_buf(),
        };
        std::fs::create_dir_all(layout.cache_dir()).unwrap();
        let bytes: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let index = ChunkIndex::of_reader(&bytes[..]).unwrap();
        let artifact = Digest::of_bytes(b"artifact");
        write_index(&layout, &artifact, &index).unwrap();
        let cache = ChunkCache::open(layout.clone());
        assert!(
            cache.held().is_empty(),
            "an index without its tar is not held"
        );
        std::fs::write(layout.cached_tar(&artifact), &bytes).unwrap();
        cache.rescan();
        assert_eq!(cache.held(), vec![artifact.hex()]);
        let first = index.chunks[0];
        assert_eq!(
            cache.read_verified(&first.digest).unwrap(),
            bytes[..first.len as usize]
        );
        // A damaged tar: the chunk is no longer served.
        let mut damaged = bytes.clone();
        damaged[10] ^= 1;
        std::fs::write(layout.cached_tar(&artifact), &damaged).unwrap();
        assert_eq!(cache.read_verified(&first.digest), None);
        layout.remove_cached(&artifact);
        cache.rescan();
        assert!(cache.held().is_empty());
        assert_eq!(cache.locate(&first.digest), None);
    }
}
