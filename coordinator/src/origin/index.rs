//! The chunk index of each stored artifact (issue 15): computed from the
//! blob (its tar.gz decompressed, FastCDC over the tar stream) and kept in
//! `indexes/<sha256>` beside `blobs/`. The index is a pure function of the
//! blob, so a coordinator holding a replica makes the same one on first
//! use; its sha256 is in the artifact's metadata from the upload on.
//!
//! Chunks are served from the blob itself (`chunks_of`): one pass of
//! decompression, each asked chunk taken as the stream passes it and
//! hashed again before it leaves, so the origin keeps one copy of each
//! artifact (the tar.gz) and nothing unverified is ever sent.

use std::io::{self, Read};
use std::path::Path;

use drover_common::artifact::Digest;
use drover_common::artifact::chunks::ChunkIndex;
use prost::Message;

use super::BlobStore;

impl BlobStore {
    fn index_path(&self, digest: &Digest) -> std::path::PathBuf {
        self.root().join("indexes").join(digest.hex())
    }

    /// Computes (blocking) and keeps the index of the blob at `blob`,
    /// stored as `digest`'s; returns it.
    pub fn make_index(&self, blob: &Path, digest: &Digest) -> io::Result<ChunkIndex> {
        let index = ChunkIndex::of_gzip(io::BufReader::new(std::fs::File::open(blob)?))?;
        let path = self.index_path(digest);
        std::fs::create_dir_all(path.parent().expect("indexes/ has a parent"))?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, index.to_proto(digest).encode_to_vec())?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        Ok(index)
    }

    /// The index of a stored blob (blocking): read back, or made now when
    /// this coordinator has none yet (a replica, an older upload).
    pub fn index(&self, digest: &Digest) -> io::Result<ChunkIndex> {
        let path = self.index_path(digest);
        match std::fs::read(&path) {
            Ok(bytes) => {
                let wire = drover_common::proto::ChunkIndex::decode(bytes.as_slice())
                    .map_err(io::Error::other)?;
                let named: Digest = wire.index_sha256.parse().map_err(io::Error::other)?;
                match ChunkIndex::from_proto(&wire, &named) {
                    Ok(index) => return Ok(index),
                    Err(e) => {
                        tracing::warn!(%digest, error = %e, "a stored chunk index is damaged: making it again")
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        self.make_index(&self.blob_path(digest), digest)
    }

    /// Removes a blob's index (the blob was collected).
    pub fn remove_index(&self, digest: &Digest) {
        let _ = std::fs::remove_file(self.index_path(digest));
    }
}

/// Reads the chunks at `wanted` (offset, length, digest; sorted by offset)
/// out of the tar.gz `blob` in one pass (blocking), handing each to `send`
/// after checking its hash; stops early when `send` says so. A chunk whose
/// bytes do not match (a damaged blob) ends the pass with an error.
pub fn chunks_of(
    blob: &Path,
    wanted: &[(u64, u32, Digest)],
    mut send: impl FnMut(Digest, Vec<u8>) -> bool,
) -> io::Result<()> {
    let file = std::fs::File::open(blob)?;
    let mut tar = flate2::read::GzDecoder::new(io::BufReader::new(file));
    let mut at = 0u64;
    for &(offset, len, digest) in wanted {
        if offset < at {
            continue; // the same chunk twice
        }
        io::copy(&mut (&mut tar).take(offset - at), &mut io::sink())?;
        let mut data = vec![0u8; len as usize];
        tar.read_exact(&mut data)?;
        at = offset + u64::from(len);
        if Digest::of_bytes(&data) != digest {
            return Err(io::Error::other(format!(
                "the blob's chunk at byte {offset} does not hash to {digest}: the blob is damaged (droverctl artifact verify)"
            )));
        }
        if !send(digest, data) {
            return Ok(());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_come_out_of_the_blob_verified_in_one_pass() {
        let dir = tempfile::tempdir().unwrap();
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let tar: Vec<u8> = (0..2_000_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &tar).unwrap();
        let blob = dir.path().join("blob");
        std::fs::write(&blob, gz.finish().unwrap()).unwrap();
        let index = ChunkIndex::of_reader(&tar[..]).unwrap();
        assert!(index.chunks.len() >= 3, "{} chunks", index.chunks.len());
        let wanted: Vec<(u64, u32, Digest)> = index
            .chunks
            .iter()
            .zip(index.offsets())
            .skip(1)
            .map(|(c, o)| (o, c.len, c.digest))
            .collect();
        let mut got = Vec::new();
        chunks_of(&blob, &wanted, |d, data| {
            got.push((d, data.len()));
            true
        })
        .unwrap();
        assert_eq!(got.len(), wanted.len());
        // A chunk that is not what the blob holds there: refused.
        let mut wrong = wanted.clone();
        wrong[0].2 = Digest::of_bytes(b"other");
        assert!(chunks_of(&blob, &wrong, |_, _| true).is_err());
    }
}
