//! Blob files and their metadata.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use drover_common::artifact::{Digest, Hasher};
use drover_common::proto::ArtifactInfo;
use prost::Message;
use tokio::io::AsyncWriteExt;

use crate::store::{Op, Store, Txn};

pub struct BlobStore {
    root: PathBuf,
    store: Arc<dyn Store>,
    /// `<prefix>/artifacts/`: one key per artifact, its ArtifactInfo.
    meta_prefix: String,
}

fn store_error(e: crate::store::StoreError) -> io::Error {
    io::Error::other(e.to_string())
}

impl BlobStore {
    /// Opens (creating) the store under `root`, discarding uploads that a
    /// previous run left unfinished.
    pub fn open(root: &Path, store: Arc<dyn Store>, key_prefix: &str) -> io::Result<BlobStore> {
        std::fs::create_dir_all(root.join("blobs"))?;
        let tmp = root.join("tmp");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir_all(&tmp)?;
        Ok(BlobStore {
            root: root.to_path_buf(),
            store,
            meta_prefix: crate::store::keys::Keys::new(key_prefix).artifacts(),
        })
    }

    /// `<data-dir>/artifacts`.
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs").join(digest.hex())
    }

    pub fn meta_key(&self, digest: &Digest) -> String {
        format!("{}{}", self.meta_prefix, digest.hex())
    }

    /// Metadata of a stored artifact, if there is one.
    pub async fn info(&self, digest: &Digest) -> io::Result<Option<ArtifactInfo>> {
        match self
            .store
            .get(&self.meta_key(digest))
            .await
            .map_err(store_error)?
        {
            Some(kv) => ArtifactInfo::decode(kv.value.as_slice())
                .map(Some)
                .map_err(io::Error::other),
            None => Ok(None),
        }
    }

    /// Adds `signatures` (those not there yet) to a stored artifact's
    /// metadata; returns the metadata as stored.
    pub async fn add_signatures(
        &self,
        digest: &Digest,
        signatures: &[drover_common::proto::ArtifactSignature],
    ) -> io::Result<Option<ArtifactInfo>> {
        let Some(mut info) = self.info(digest).await? else {
            return Ok(None);
        };
        let before = info.signatures.len();
        for sig in signatures {
            if !info.signatures.contains(sig) {
                info.signatures.push(sig.clone());
            }
        }
        if info.signatures.len() != before {
            self.put_info(digest, &info).await?;
        }
        Ok(Some(info))
    }

    /// Every stored artifact, newest first.
    pub async fn list(&self) -> io::Result<Vec<ArtifactInfo>> {
        let (kvs, _) = self
            .store
            .range(&self.meta_prefix)
            .await
            .map_err(store_error)?;
        let mut out = kvs
            .iter()
            .map(|kv| ArtifactInfo::decode(kv.value.as_slice()).map_err(io::Error::other))
            .collect::<io::Result<Vec<_>>>()?;
        out.sort_by(|a, b| {
            b.uploaded_at_unix_ms
                .cmp(&a.uploaded_at_unix_ms)
                .then(a.sha256.cmp(&b.sha256))
        });
        Ok(out)
    }

    /// Every stored artifact's metadata with its store mod revision (what a
    /// collection compares against).
    pub async fn list_with_revisions(&self) -> io::Result<Vec<(ArtifactInfo, u64)>> {
        let (kvs, _) = self
            .store
            .range(&self.meta_prefix)
            .await
            .map_err(store_error)?;
        kvs.iter()
            .map(|kv| {
                ArtifactInfo::decode(kv.value.as_slice())
                    .map(|i| (i, kv.mod_revision))
                    .map_err(io::Error::other)
            })
            .collect()
    }

    /// Removes this coordinator's copy of a collected artifact.
    pub async fn remove_blob(&self, digest: &Digest) {
        let _ = tokio::fs::remove_file(self.blob_path(digest)).await;
        self.remove_index(digest);
    }

    /// Removes blobs here whose metadata is gone (collected elsewhere)
    /// and that are older than `min_age` (an upload writes its blob before
    /// its metadata). Returns how many.
    pub async fn drop_orphans(&self, min_age: std::time::Duration) -> io::Result<usize> {
        let mut removed = 0;
        let mut dir = tokio::fs::read_dir(self.root.join("blobs")).await?;
        while let Some(entry) = dir.next_entry().await? {
            let Some(digest) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<Digest>().ok())
            else {
                continue;
            };
            let old = entry
                .metadata()
                .await
                .ok()
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age >= min_age);
            if old && self.info(&digest).await?.is_none() {
                self.remove_blob(&digest).await;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Changes to the artifact metadata (a new upload anywhere).
    pub async fn watch_metadata(&self) -> io::Result<crate::store::WatchStream> {
        self.store
            .watch(&self.meta_prefix)
            .await
            .map_err(store_error)
    }

    /// Starts an upload into a temp file.
    pub async fn begin(&self) -> io::Result<PendingBlob> {
        let path = self.root.join("tmp").join(uuid::Uuid::new_v4().to_string());
        let file = tokio::fs::File::create_new(&path).await?;
        Ok(PendingBlob {
            file: Some(file),
            path,
            hasher: Hasher::default(),
        })
    }

    /// Makes a digest-checked copy of a blob whose metadata is already in
    /// the store visible: fsync, rename into `blobs/`, fsync the directory.
    pub async fn commit_replica(
        &self,
        mut pending: PendingBlob,
        digest: &Digest,
    ) -> io::Result<()> {
        let mut file = pending.file.take().expect("file present until commit");
        file.flush().await?;
        file.sync_all().await?;
        drop(file);
        tokio::fs::rename(&pending.path, self.blob_path(digest)).await?;
        tokio::fs::File::open(self.root.join("blobs"))
            .await?
            .sync_all()
            .await
    }

    /// Makes a fully written, digest-checked upload visible: fsync, rename
    /// into `blobs/`, then the metadata in the store. A blob without
    /// metadata (a crash in between) is simply uploaded again.
    pub async fn commit(
        &self,
        pending: PendingBlob,
        digest: &Digest,
        info: &ArtifactInfo,
    ) -> io::Result<()> {
        self.commit_replica(pending, digest).await?;
        self.put_info(digest, info).await
    }

    /// Moves a damaged blob aside to `damaged/<sha256>-<ms>` (kept for a
    /// post-mortem, never served) and returns where it went.
    pub async fn quarantine(&self, digest: &Digest) -> io::Result<PathBuf> {
        let dir = self.root.join("damaged");
        tokio::fs::create_dir_all(&dir).await?;
        let to = dir.join(format!(
            "{}-{}",
            digest.hex(),
            drover_common::time::now_unix_ms()
        ));
        tokio::fs::rename(self.blob_path(digest), &to).await?;
        Ok(to)
    }

    /// Marks an artifact lost (`lost_at_unix_ms`, 0 clears it); returns
    /// its metadata as stored, or `None` when there is none.
    pub async fn set_lost(
        &self,
        digest: &Digest,
        lost_at_unix_ms: u64,
    ) -> io::Result<Option<ArtifactInfo>> {
        let Some(mut info) = self.info(digest).await? else {
            return Ok(None);
        };
        if info.lost_at_unix_ms != lost_at_unix_ms {
            info.lost_at_unix_ms = lost_at_unix_ms;
            self.put_info(digest, &info).await?;
        }
        Ok(Some(info))
    }

    /// Writes an artifact's metadata.
    async fn put_info(&self, digest: &Digest, info: &ArtifactInfo) -> io::Result<()> {
        self.store
            .txn(Txn {
                success: vec![Op::put(self.meta_key(digest), info.encode_to_vec())],
                ..Default::default()
            })
            .await
            .map_err(store_error)?;
        Ok(())
    }
}

/// An upload in progress: bytes go to a temp file and through the hasher.
/// Dropped without commit, the temp file is removed.
pub struct PendingBlob {
    file: Option<tokio::fs::File>,
    path: PathBuf,
    hasher: Hasher,
}

impl PendingBlob {
    pub async fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.hasher.update(bytes);
        self.file
            .as_mut()
            .expect("file present until commit")
            .write_all(bytes)
            .await
    }

    pub fn len(&self) -> u64 {
        self.hasher.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hasher.is_empty()
    }

    /// The digest and size of what was written so far.
    pub fn digest(&self) -> (Digest, u64) {
        self.hasher.clone().finish()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub async fn flush(&mut self) -> io::Result<()> {
        self.file
            .as_mut()
            .expect("file present until commit")
            .flush()
            .await
    }
}

impl Drop for PendingBlob {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
