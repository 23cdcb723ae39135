//! Content-defined chunks of an artifact's unpacked tar stream (issue 15):
//! FastCDC (2020) finds cut points in the bytes themselves, so two
//! releases that differ in one file share almost every chunk, and each
//! chunk is named by its sha256. The index (every chunk in order) is
//! itself addressed by its sha256, so it can be fetched and verified like
//! any blob.
//!
//! The origin computes the index at upload (`origin/index.rs`), serves it
//! and the chunks (`api/chunks.rs`); agents rebuild the tar stream from
//! chunks they hold, their peers' and the origin's (`agent/src/pull/`).

use std::io::Read;

use super::digest::{Digest, Hasher};

/// FastCDC's bounds: chunks of 64 KiB to 1 MiB, 256 KiB on average (a
/// 200 MB release is ~800 chunks; a one-file change touches one or two).
pub const MIN_CHUNK: u32 = 64 * 1024;
pub const AVG_CHUNK: u32 = 256 * 1024;
pub const MAX_CHUNK: u32 = 1024 * 1024;

/// One chunk: its sha256 and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRef {
    pub digest: Digest,
    pub len: u32,
}

/// The chunks of a byte stream, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChunkIndex {
    pub chunks: Vec<ChunkRef>,
}

impl ChunkIndex {
    /// Chunks everything `reader` yields.
    pub fn of_reader(reader: impl Read) -> std::io::Result<ChunkIndex> {
        let mut chunks = Vec::new();
        let cdc = fastcdc::v2020::StreamCDC::new(reader, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK);
        for chunk in cdc {
            let chunk = chunk.map_err(|e| match e {
                fastcdc::v2020::Error::IoError(io) => io,
                other => std::io::Error::other(other.to_string()),
            })?;
            let mut hasher = Hasher::default();
            hasher.update(&chunk.data);
            let (digest, len) = hasher.finish();
            chunks.push(ChunkRef {
                digest,
                len: len as u32,
            });
        }
        Ok(ChunkIndex { chunks })
    }

    /// Chunks everything the gzip stream `reader` decompresses to: the
    /// index of a `tar.gz` artifact.
    pub fn of_gzip(reader: impl Read) -> std::io::Result<ChunkIndex> {
        ChunkIndex::of_reader(flate2::read::GzDecoder::new(reader))
    }

    /// Where each chunk starts in the stream.
    pub fn offsets(&self) -> Vec<u64> {
        let mut at = 0u64;
        self.chunks
            .iter()
            .map(|c| {
                let start = at;
                at += u64::from(c.len);
                start
            })
            .collect()
    }

    /// The index on the wire, for artifact `artifact`.
    pub fn to_proto(&self, artifact: &Digest) -> crate::proto::ChunkIndex {
        crate::proto::ChunkIndex {
            sha256: artifact.hex(),
            index_sha256: self.digest().hex(),
            chunks: self
                .chunks
                .iter()
                .map(|c| crate::proto::ChunkEntry {
                    sha256: c.digest.as_bytes().to_vec(),
                    length: c.len,
                })
                .collect(),
        }
    }

    /// An index received from someone else: every entry well formed and
    /// the whole hashing to `expected` (what the puller was told), so
    /// nothing else about it need be trusted.
    pub fn from_proto(
        index: &crate::proto::ChunkIndex,
        expected: &Digest,
    ) -> Result<ChunkIndex, IndexError> {
        let mut chunks = Vec::with_capacity(index.chunks.len());
        for (i, c) in index.chunks.iter().enumerate() {
            let digest = Digest::from_slice(&c.sha256).ok_or(IndexError::BadEntry(i))?;
            if c.length == 0 || c.length > MAX_CHUNK {
                return Err(IndexError::BadEntry(i));
            }
            chunks.push(ChunkRef {
                digest,
                len: c.length,
            });
        }
        let index = ChunkIndex { chunks };
        let actual = index.digest();
        if actual != *expected {
            return Err(IndexError::Mismatch {
                expected: *expected,
                actual,
            });
        }
        Ok(index)
    }

    /// The bytes the chunks add up to.
    pub fn total_len(&self) -> u64 {
        self.chunks.iter().map(|c| u64::from(c.len)).sum()
    }

    /// The index's own identity: the sha256 of its canonical text, one
    /// line `<sha256> <len>` per chunk.
    pub fn digest(&self) -> Digest {
        let mut hasher = Hasher::default();
        for c in &self.chunks {
            hasher.update(format!("{} {}\n", c.digest.hex(), c.len).as_bytes());
        }
        hasher.finish().0
    }

    /// The bytes of this index's chunks that `other` also holds: what a
    /// host that has `other` need not fetch.
    pub fn shared_bytes(&self, other: &ChunkIndex) -> u64 {
        let held: std::collections::HashSet<Digest> =
            other.chunks.iter().map(|c| c.digest).collect();
        self.chunks
            .iter()
            .filter(|c| held.contains(&c.digest))
            .map(|c| u64::from(c.len))
            .sum()
    }
}

/// Why a received index is not the one asked for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IndexError {
    #[error("chunk {0} of the index is malformed (digest not 32 bytes, or length 0 or over 1 MiB)")]
    BadEntry(usize),
    #[error("the index hashes to {actual}, not the expected {expected}")]
    Mismatch { expected: Digest, actual: Digest },
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic, incompressible bytes (xorshift).
    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// An uncompressed tar of twenty 1 MiB files (file `changed` differs
    /// by `seed`).
    fn release(changed: usize, seed: u64) -> Vec<u8> {
        let mut tar = tar::Builder::new(Vec::new());
        for i in 0..20 {
            let body = noise(1 << 20, if i == changed { seed } else { 1000 + i as u64 });
            let mut header = tar::Header::new_gnu();
            header.set_size(body.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            tar.append_data(&mut header, format!("data/{i}.bin"), &body[..])
                .unwrap();
        }
        tar.into_inner().unwrap()
    }

    #[test]
    fn a_one_file_change_shares_almost_every_chunk() {
        let (v1, v2) = (release(7, 1), release(7, 2));
        let (a, b) = (
            ChunkIndex::of_reader(&v1[..]).unwrap(),
            ChunkIndex::of_reader(&v2[..]).unwrap(),
        );
        assert_eq!(a.total_len(), v1.len() as u64);
        assert!(a.chunks.iter().all(|c| c.len <= MAX_CHUNK));
        let fresh = b.total_len() - b.shared_bytes(&a);
        // One 1 MiB file of 20 changed: at most its bytes and the chunks
        // that straddle its edges are new.
        assert!(
            fresh <= (1 << 20) + 2 * u64::from(MAX_CHUNK),
            "{fresh} new bytes of {}",
            b.total_len()
        );
        assert!(fresh >= 1 << 20, "the changed file is new: {fresh}");
        // Same bytes, same index; different bytes, different identity.
        assert_eq!(ChunkIndex::of_reader(&v1[..]).unwrap(), a);
        assert_ne!(a.digest(), b.digest());
    }

    #[test]
    fn an_index_on_the_wire_is_checked_against_its_digest() {
        let a = ChunkIndex::of_reader(&release(3, 1)[..]).unwrap();
        let artifact = Digest::of_reader(&b"x"[..]).unwrap().0;
        let wire = a.to_proto(&artifact);
        assert_eq!(ChunkIndex::from_proto(&wire, &a.digest()).unwrap(), a);
        let offsets = a.offsets();
        assert_eq!(offsets[0], 0);
        assert_eq!(offsets[1], u64::from(a.chunks[0].len));
        // A chunk dropped, a length changed, a digest cut short: refused.
        let mut short = wire.clone();
        short.chunks.pop();
        assert!(matches!(
            ChunkIndex::from_proto(&short, &a.digest()),
            Err(IndexError::Mismatch { .. })
        ));
        let mut longer = wire.clone();
        longer.chunks[0].length += 1;
        assert!(ChunkIndex::from_proto(&longer, &a.digest()).is_err());
        let mut cut = wire;
        cut.chunks[2].sha256.truncate(31);
        assert_eq!(
            ChunkIndex::from_proto(&cut, &a.digest()),
            Err(IndexError::BadEntry(2))
        );
    }
}
