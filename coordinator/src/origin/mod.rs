//! The artifact origin: content-addressed blobs on local disk.
//!
//! Layout under `<data-dir>/artifacts/`: `blobs/<sha256>` (immutable),
//! `meta/<sha256>.json` (ArtifactInfo as proto JSON), `tmp/` (uploads in
//! flight; emptied at start). A blob appears only by rename after its digest
//! was checked and it was fsynced, so a reader never sees a partial one.
//!
//! Metadata lives beside the blobs until the Store (issue 4) takes it over.

mod blobs;

pub use blobs::{BlobStore, PendingBlob};
