//! The origin's check of an upload while it arrives: the bytes go to the
//! pending blob and, through a channel, to the unpacker's own checks
//! (`drover_common::artifact::inspect`) on a blocking thread, in one pass.
//! An archive any agent would refuse is refused here, naming the entry,
//! often before the upload ends (the inspector stops reading and the next
//! chunk finds it gone); nothing is stored.

use std::io::Read;
use std::path::PathBuf;

use drover_common::artifact::{Limits, Manifest, UnpackError, inspect};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Chunks in flight to the inspector; the upload waits when it lags.
const QUEUE: usize = 8;

/// One upload under inspection.
pub struct Inspection {
    /// `None` once the input is closed.
    input: Option<mpsc::Sender<Vec<u8>>>,
    verdict: JoinHandle<Result<Manifest, UnpackError>>,
}

impl Inspection {
    /// Starts inspecting into `scratch` (created, and removed at the end).
    pub fn start(scratch: PathBuf, limits: Limits) -> Inspection {
        let (tx, rx) = mpsc::channel(QUEUE);
        let verdict = tokio::task::spawn_blocking(move || {
            let reader = ChannelReader {
                rx,
                chunk: Vec::new(),
                pos: 0,
            };
            let result = inspect(reader, &scratch, &limits);
            let _ = std::fs::remove_dir_all(&scratch);
            result
        });
        Inspection {
            input: Some(tx),
            verdict,
        }
    }

    /// Passes `bytes` on; false when the inspector has stopped reading (it
    /// refused the archive: [`Inspection::finish`] says why).
    pub async fn feed(&mut self, bytes: &[u8]) -> bool {
        match &self.input {
            Some(tx) => tx.send(bytes.to_vec()).await.is_ok(),
            None => false,
        }
    }

    /// Ends the input and returns the verdict.
    pub async fn finish(mut self) -> Result<Manifest, UnpackError> {
        self.input = None;
        match (&mut self.verdict).await {
            Ok(verdict) => verdict,
            Err(e) => Err(UnpackError::Io(std::io::Error::other(format!(
                "the inspection task failed: {e}"
            )))),
        }
    }
}

/// The receiving end of the channel as a blocking `Read`.
struct ChannelReader {
    rx: mpsc::Receiver<Vec<u8>>,
    chunk: Vec<u8>,
    pos: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.chunk.len() {
            match self.rx.blocking_recv() {
                Some(chunk) => {
                    self.chunk = chunk;
                    self.pos = 0;
                }
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len() - self.pos);
        buf[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_common::artifact::build::ArchiveBuilder;

    async fn verdict(archive: &[u8]) -> Result<Manifest, UnpackError> {
        let dir = tempfile::tempdir().unwrap();
        let mut inspection = Inspection::start(dir.path().join("scratch"), Limits::default());
        for chunk in archive.chunks(1000) {
            if !inspection.feed(chunk).await {
                break;
            }
        }
        let v = inspection.finish().await;
        assert!(!dir.path().join("scratch").exists(), "scratch removed");
        v
    }

    const MANIFEST: &[u8] = b"service = \"a\"\n[start]\ncommand = \"bin/a\"\n";

    #[tokio::test]
    async fn a_good_archive_passes_and_a_hostile_one_is_named() {
        let with = |path: &str| {
            ArchiveBuilder::in_memory()
                .file("drover.toml", MANIFEST)
                .file(path, b"x")
                .finish()
        };
        assert_eq!(verdict(&with("bin/a")).await.unwrap().service, "a");
        let evil = with("../../etc/cron.d/x");
        let e = verdict(&evil).await.unwrap_err();
        assert!(e.to_string().contains("\"../../etc/cron.d/x\""), "{e}");
    }
}
