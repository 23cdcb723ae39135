//! Blob files and their metadata.

use std::io;
use std::path::{Path, PathBuf};

use drover_common::artifact::{Digest, Hasher};
use drover_common::proto::ArtifactInfo;
use tokio::io::AsyncWriteExt;

pub struct BlobStore {
    root: PathBuf,
}

impl BlobStore {
    /// Opens (creating) the store under `root`, discarding uploads that a
    /// previous run left unfinished.
    pub fn open(root: &Path) -> io::Result<BlobStore> {
        for sub in ["blobs", "meta"] {
            std::fs::create_dir_all(root.join(sub))?;
        }
        let tmp = root.join("tmp");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir_all(&tmp)?;
        Ok(BlobStore {
            root: root.to_path_buf(),
        })
    }

    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs").join(digest.hex())
    }

    fn meta_path(&self, digest: &Digest) -> PathBuf {
        self.root
            .join("meta")
            .join(format!("{}.json", digest.hex()))
    }

    /// Metadata of a stored artifact, if there is one.
    pub fn info(&self, digest: &Digest) -> io::Result<Option<ArtifactInfo>> {
        match std::fs::read(self.meta_path(digest)) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(io::Error::other),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every stored artifact, newest first.
    pub fn list(&self) -> io::Result<Vec<ArtifactInfo>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(self.root.join("meta"))? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "json") {
                let bytes = std::fs::read(&path)?;
                out.push(serde_json::from_slice::<ArtifactInfo>(&bytes).map_err(io::Error::other)?);
            }
        }
        out.sort_by(|a, b| {
            b.uploaded_at_unix_ms
                .cmp(&a.uploaded_at_unix_ms)
                .then(a.sha256.cmp(&b.sha256))
        });
        Ok(out)
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

    /// Makes a fully written, digest-checked upload visible: fsync, rename
    /// into `blobs/`, then the metadata (atomically too).
    pub async fn commit(
        &self,
        mut pending: PendingBlob,
        digest: &Digest,
        info: &ArtifactInfo,
    ) -> io::Result<()> {
        let mut file = pending.file.take().expect("file present until commit");
        file.flush().await?;
        file.sync_all().await?;
        drop(file);
        tokio::fs::rename(&pending.path, self.blob_path(digest)).await?;
        let meta = serde_json::to_vec_pretty(info).map_err(io::Error::other)?;
        let tmp = self.root.join("tmp").join(format!("{}.json", digest.hex()));
        tokio::fs::write(&tmp, meta).await?;
        tokio::fs::File::open(&tmp).await?.sync_all().await?;
        tokio::fs::rename(&tmp, self.meta_path(digest)).await?;
        for dir in ["blobs", "meta"] {
            tokio::fs::File::open(self.root.join(dir))
                .await?
                .sync_all()
                .await?;
        }
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
