//! The artifact origin: content-addressed blobs on local disk.
//!
//! Layout under `<data-dir>/artifacts/`: `blobs/<sha256>` (immutable) and
//! `tmp/` (uploads in flight; emptied at start). A blob appears only by
//! rename after its digest was checked and it was fsynced, so a reader never
//! sees a partial one. Metadata (ArtifactInfo) is in the Store under
//! `<prefix>/artifacts/<sha256>`, written after the blob.

mod blobs;

pub use blobs::{BlobStore, PendingBlob};
