//! The artifact origin: content-addressed blobs on local disk.
//!
//! Layout under `<data-dir>/artifacts/`: `blobs/<sha256>` (immutable),
//! `indexes/<sha256>` (its chunk index, `index.rs`) and `tmp/` (uploads in
//! flight; emptied at start). A blob appears only by
//! rename after its digest was checked and it was fsynced, so a reader never
//! sees a partial one. Metadata (ArtifactInfo) is in the Store under
//! `<prefix>/artifacts/<sha256>`, written after the blob.

//! Every upload is inspected as it arrives (`inspect.rs`): an archive an
//! agent would refuse is refused at push.
//!
//! With several coordinators, a blob missing here is copied from a peer the
//! first time it is fetched (`replicate.rs`).

mod blobs;
mod index;
mod inspect;
mod replicate;
pub mod retention;
mod scrub;

pub use blobs::{BlobStore, PendingBlob};
pub use index::chunks_of;
pub use inspect::Inspection;
pub use replicate::{PEER_FETCH, Replicator};
pub use scrub::scrub;
