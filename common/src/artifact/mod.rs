//! The artifact format: a `tar.gz` with `drover.toml` at its root,
//! identified by the sha256 of the file.
//!
//! - [`build`]: writing archives (tools and tests).
//! - [`chunks`]: content-defined chunks of the unpacked stream (issue 15, not wired in yet).
//! - [`digest`]: sha256 identities and hashing while streaming.
//! - [`manifest`]: `drover.toml`, parsed and validated.
//! - [`unpack`]: safe extraction into a release directory.

pub mod build;
pub mod chunks;
pub mod digest;
pub mod manifest;
pub mod signature;
pub mod tree;
pub mod unpack;

pub use digest::{Digest, DigestError, Hasher};
pub use manifest::{Manifest, ManifestError};
pub use unpack::{Limits, UnpackError, inspect, read_manifest, unpack};

/// Name of the manifest at the root of every artifact.
pub const MANIFEST_FILE: &str = "drover.toml";
