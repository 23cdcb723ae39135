//! Safe extraction of an artifact into a release directory.
//!
//! Every write goes through a `cap_std::fs::Dir` opened on the destination,
//! so no entry can write outside it whatever links earlier entries made.
//! On top of that, each entry is checked and refused with a reason:
//! absolute paths, `..`, device/fifo/sparse entries, links that leave the
//! release (checked lexically when created and by real resolution at the
//! end), and more entries or bytes than the limits. Files are created
//! exclusively (a duplicate entry is refused, never written through a link),
//! and modes are masked to 0755: no setuid/setgid, no group or other write
//! (a service, running as another user, can read its release, never change
//! it); directories are created 0755 whatever the archive says.

use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use cap_std::ambient_authority;
use cap_std::fs::{Dir, DirBuilder, DirBuilderExt, OpenOptions};
use flate2::read::GzDecoder;
use tar::EntryType;

use super::MANIFEST_FILE;
use super::manifest::{Manifest, ManifestError};

/// Size limits of one artifact.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_entries: u64,
    pub max_unpacked_bytes: u64,
    /// Unpacked bytes allowed per compressed byte (a gzip bomb's ratio is
    /// ~1000:1); 0 turns the check off.
    pub max_ratio: u64,
    /// The compressed size of the archive being unpacked (0: unknown, no
    /// ratio check); see [`Limits::for_archive`].
    pub compressed_bytes: u64,
    /// Free space the destination's file system keeps while unpacking: a
    /// file that would eat into it is refused before it is written (0: no
    /// check).
    pub keep_free_bytes: u64,
}

/// Archives this small may unpack to this much whatever their ratio (a
/// manifest and a script compress very well).
const RATIO_FLOOR: u64 = 1 << 20;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_entries: 100_000,
            max_unpacked_bytes: 4 << 30,
            max_ratio: 100,
            compressed_bytes: 0,
            keep_free_bytes: 0,
        }
    }
}

impl Limits {
    /// Why an archive of `compressed` bytes that unpacks to `unpacked` is
    /// refused before a byte of it is fetched (a pull by chunks knows both
    /// from the index), if it is: the ratio, or a tar stream larger than
    /// the unpacked limit plus the most its headers can add.
    pub fn refuses(&self, compressed: u64, unpacked: u64) -> Option<UnpackError> {
        let headers = self.max_entries.saturating_add(2).saturating_mul(1024);
        if unpacked > self.max_unpacked_bytes.saturating_add(headers) {
            return Some(UnpackError::TooLarge(self.max_unpacked_bytes));
        }
        if self.max_ratio > 0
            && compressed > 0
            && unpacked > compressed.saturating_mul(self.max_ratio).max(RATIO_FLOOR)
        {
            return Some(UnpackError::RatioTooHigh {
                compressed,
                ratio: self.max_ratio,
            });
        }
        None
    }

    /// These limits for an archive of `compressed_bytes`.
    pub fn for_archive(self, compressed_bytes: u64) -> Limits {
        Limits {
            compressed_bytes,
            ..self
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("archive entry {0:?} has an absolute path")]
    AbsolutePath(PathBuf),
    #[error("archive entry {0:?} has a '..' component")]
    ParentDir(PathBuf),
    #[error("archive entry {path:?} links to {target:?}, outside the release")]
    LinkEscapes { path: PathBuf, target: PathBuf },
    #[error("archive entry {path:?} is a {kind}; only files, directories and links are allowed")]
    SpecialFile { path: PathBuf, kind: &'static str },
    #[error("archive entry {0:?} lies under something that is not a directory inside the release")]
    BadParent(PathBuf),
    #[error("archive entry {0:?} appears twice")]
    Duplicate(PathBuf),
    #[error("archive has more than {0} entries")]
    TooManyEntries(u64),
    #[error("archive unpacks to more than {0} bytes")]
    TooLarge(u64),
    #[error(
        "archive of {compressed} bytes declares more than {ratio} times as much unpacked (a compression bomb?); refused before writing it"
    )]
    RatioTooHigh { compressed: u64, ratio: u64 },
    #[error(
        "no space to unpack {path:?} ({needed} bytes): {free} bytes free, {keep} of them kept free"
    )]
    NoSpace {
        path: PathBuf,
        needed: u64,
        free: u64,
        keep: u64,
    },
    #[error(
        "{MANIFEST_FILE} must come first in an upload (among the first {MANIFEST_WITHIN_ENTRIES} entries and {MANIFEST_WITHIN_BYTES} bytes of the tar stream); it was not found before entry {entry:?} at byte {offset} (push a directory and droverctl builds it so, or name {MANIFEST_FILE} first to tar)"
    )]
    ManifestNotFirst { entry: PathBuf, offset: u64 },
    #[error("archive has no {MANIFEST_FILE} at its root")]
    MissingManifest,
    #[error(transparent)]
    InvalidManifest(#[from] ManifestError),
    #[error("archive is not a valid tar.gz: {0}")]
    Corrupt(io::Error),
    #[error("writing the release: {0}")]
    Io(io::Error),
}

impl UnpackError {
    /// The I/O error of writing the release, if that is what this is (a
    /// caller tells a full disk from a bad archive by it, never by text).
    pub fn write_error(&self) -> Option<&io::Error> {
        match self {
            UnpackError::Io(e) => Some(e),
            _ => None,
        }
    }
}

/// What the destination's file system has left, re-read only when the
/// running estimate says a file might not fit.
struct FreeSpace {
    estimate: Option<u64>,
}

impl FreeSpace {
    fn reserve(
        &mut self,
        dest: &Path,
        path: &Path,
        size: u64,
        keep: u64,
    ) -> Result<(), UnpackError> {
        if keep == 0 {
            return Ok(());
        }
        let fits = |free: u64| free >= size.saturating_add(keep);
        if !self.estimate.is_some_and(fits) {
            let st = nix::sys::statvfs::statvfs(dest).map_err(|e| UnpackError::Io(e.into()))?;
            self.estimate = Some(st.blocks_available() * st.fragment_size());
        }
        let free = self.estimate.unwrap_or(0);
        if !fits(free) {
            return Err(UnpackError::NoSpace {
                path: path.to_path_buf(),
                needed: size,
                free,
                keep,
            });
        }
        self.estimate = Some(free - size);
        Ok(())
    }
}

/// Copies an entry's bytes into `file`: a failed read is a corrupt
/// archive, a failed write is the destination's ([`UnpackError::Io`]).
fn copy_entry(entry: &mut impl Read, file: &mut std::fs::File) -> Result<u64, UnpackError> {
    use std::io::Write;
    let mut buf = vec![0u8; 64 * 1024];
    let mut copied = 0u64;
    loop {
        let n = match entry.read(&mut buf) {
            Ok(0) => return Ok(copied),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(UnpackError::Corrupt(e)),
        };
        file.write_all(&buf[..n]).map_err(UnpackError::Io)?;
        copied += n as u64;
    }
}

/// Checks an entry path: relative, no `..`. Returns it without `.` parts.
fn clean_path(raw: &Path) -> Result<PathBuf, UnpackError> {
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::ParentDir => return Err(UnpackError::ParentDir(raw.to_path_buf())),
            Component::RootDir | Component::Prefix(_) => {
                return Err(UnpackError::AbsolutePath(raw.to_path_buf()));
            }
        }
    }
    Ok(out)
}

/// True when `target`, read from the directory holding `link`, stays
/// inside the root (lexically).
fn link_stays_inside(link: &Path, target: &Path) -> bool {
    if target.is_absolute() {
        return false;
    }
    let mut depth: i64 = link.components().count() as i64 - 1;
    for c in target.components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::ParentDir => depth -= 1,
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => return false,
        }
        if depth < 0 {
            return false;
        }
    }
    true
}

/// Resolves a symlink confined to the release: escaping is an error,
/// dangling (inside) is fine.
fn check_link(root: &Dir, path: &Path, target: &Path) -> Result<(), UnpackError> {
    match root.canonicalize(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(_) => Err(UnpackError::LinkEscapes {
            path: path.to_path_buf(),
            target: target.to_path_buf(),
        }),
    }
}

/// Creates the directories above an entry; a parent that is not a directory
/// inside the release (a file, or a link leading out) is refused.
/// How the unpacker creates directories: 0755, parents too.
fn release_dirs() -> DirBuilder {
    let mut builder = DirBuilder::new();
    builder.recursive(true).mode(RELEASE_MODE_MASK);
    builder
}

/// The most a file or directory of a release may allow.
pub const RELEASE_MODE_MASK: u32 = 0o755;

fn create_parents(root: &Dir, path: &Path) -> Result<(), UnpackError> {
    let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) else {
        return Ok(());
    };
    root.create_dir_with(parent, &release_dirs())
        .map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists
            | io::ErrorKind::PermissionDenied
            | io::ErrorKind::NotADirectory => UnpackError::BadParent(path.to_path_buf()),
            _ => UnpackError::Io(e),
        })
}

/// Unpacks the tar.gz read from `archive` into `dest`, which must not exist
/// yet, and returns its validated manifest. On error the caller removes
/// `dest` (it is a temp dir by convention).
pub fn unpack(archive: impl Read, dest: &Path, limits: &Limits) -> Result<Manifest, UnpackError> {
    run(archive, dest, limits, Pass::Unpack)
}

/// Unpacks an uncompressed tar stream (an artifact rebuilt from its
/// verified chunks) with exactly the same checks as [`unpack`]; there is
/// no compression ratio to judge, the size limit still holds.
pub fn unpack_tar(tar: impl Read, dest: &Path, limits: &Limits) -> Result<Manifest, UnpackError> {
    let limits = Limits {
        max_ratio: 0,
        compressed_bytes: 0,
        ..*limits
    };
    run(tar, dest, &limits, Pass::UnpackTar)
}

/// The origin's check of an upload, as it arrives: every entry goes
/// through exactly the unpacker's checks (the same code, so the origin
/// refuses what any agent with these limits would), into `scratch` (which
/// must not exist; the caller removes it) with files left empty: only the
/// tree's shape is written, never its contents. On top, `drover.toml` must
/// come among the first [`MANIFEST_WITHIN_ENTRIES`] entries and
/// [`MANIFEST_WITHIN_BYTES`] of the tar stream, and is validated as soon as
/// it is read, so a bomb placed before it costs almost nothing.
pub fn inspect(
    archive: impl Read,
    scratch: &Path,
    limits: &Limits,
) -> Result<Manifest, UnpackError> {
    run(archive, scratch, limits, Pass::Inspect)
}

/// Entries an upload may have before `drover.toml`, itself included.
pub const MANIFEST_WITHIN_ENTRIES: u64 = 16;
/// Bytes of tar stream (decompressed) an upload may have up to the end of
/// `drover.toml`'s header.
pub const MANIFEST_WITHIN_BYTES: u64 = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// An agent making a release.
    Unpack,
    /// The same from an uncompressed tar stream.
    UnpackTar,
    /// The origin checking an upload.
    Inspect,
}

/// Counts the bytes read through it.
struct Counting<R> {
    inner: R,
    count: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(n)
    }
}

fn run(
    archive: impl Read,
    dest: &Path,
    limits: &Limits,
    pass: Pass,
) -> Result<Manifest, UnpackError> {
    use std::sync::atomic::Ordering::Relaxed;
    std::fs::create_dir(dest).map_err(UnpackError::Io)?;
    let root = Dir::open_ambient_dir(dest, ambient_authority()).map_err(UnpackError::Io)?;
    let compressed = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let decompressed = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = Counting {
        inner: archive,
        count: compressed.clone(),
    };
    let stream: Box<dyn Read> = match pass {
        Pass::UnpackTar => Box::new(counted),
        Pass::Unpack | Pass::Inspect => Box::new(GzDecoder::new(counted)),
    };
    let mut tar = tar::Archive::new(Counting {
        inner: stream,
        count: decompressed.clone(),
    });
    let mut entries_seen = 0u64;
    let mut bytes = 0u64;
    let mut links = Vec::new();
    let mut space = FreeSpace { estimate: None };
    let mut manifest_seen = false;
    for entry in tar.entries().map_err(UnpackError::Corrupt)? {
        let mut entry = entry.map_err(UnpackError::Corrupt)?;
        entries_seen += 1;
        if entries_seen > limits.max_entries {
            return Err(UnpackError::TooManyEntries(limits.max_entries));
        }
        let raw = entry.path().map_err(UnpackError::Corrupt)?.into_owned();
        let path = clean_path(&raw)?;
        let is_manifest = path == Path::new(MANIFEST_FILE);
        if pass == Pass::Inspect && !manifest_seen {
            // Checked at the header, before the entry's data is read: a
            // large entry ahead of the manifest is never decompressed.
            let read = decompressed.load(Relaxed);
            let through = if is_manifest {
                read
            } else {
                read.saturating_add(entry.header().size().unwrap_or(u64::MAX))
            };
            if (!is_manifest && entries_seen >= MANIFEST_WITHIN_ENTRIES)
                || through > MANIFEST_WITHIN_BYTES
            {
                return Err(UnpackError::ManifestNotFirst {
                    entry: raw,
                    offset: read,
                });
            }
        }
        let kind = entry.header().entry_type();
        if path.as_os_str().is_empty() {
            if kind == EntryType::Directory {
                continue; // "./" itself
            }
            return Err(UnpackError::AbsolutePath(raw));
        }
        let special = |kind| {
            Err(UnpackError::SpecialFile {
                path: path.clone(),
                kind,
            })
        };
        match kind {
            EntryType::Directory => {
                root.create_dir_with(&path, &release_dirs())
                    .map_err(UnpackError::Io)?;
            }
            EntryType::Regular | EntryType::Continuous => {
                let size = entry.header().size().map_err(UnpackError::Corrupt)?;
                bytes = bytes.saturating_add(size);
                if bytes > limits.max_unpacked_bytes {
                    return Err(UnpackError::TooLarge(limits.max_unpacked_bytes));
                }
                // The whole archive's size when known; while an upload
                // arrives, what has arrived so far.
                let compressed_bytes = match (limits.compressed_bytes, pass) {
                    (0, Pass::Inspect) => compressed.load(Relaxed),
                    (n, _) => n,
                };
                if limits.max_ratio > 0
                    && compressed_bytes > 0
                    && bytes
                        > compressed_bytes
                            .saturating_mul(limits.max_ratio)
                            .max(RATIO_FLOOR)
                {
                    return Err(UnpackError::RatioTooHigh {
                        compressed: compressed_bytes,
                        ratio: limits.max_ratio,
                    });
                }
                let write_contents = pass != Pass::Inspect || is_manifest;
                if write_contents {
                    space.reserve(dest, &path, size, limits.keep_free_bytes)?;
                }
                create_parents(&root, &path)?;
                let file = root
                    .open_with(&path, OpenOptions::new().write(true).create_new(true))
                    .map_err(|e| match e.kind() {
                        io::ErrorKind::AlreadyExists => UnpackError::Duplicate(path.clone()),
                        _ => UnpackError::Io(e),
                    })?;
                let mut file = file.into_std();
                // The entry reader yields at most the header's size.
                let copied = if write_contents {
                    copy_entry(&mut entry, &mut file)?
                } else {
                    io::copy(&mut entry, &mut io::sink()).map_err(UnpackError::Corrupt)?
                };
                if copied != size {
                    return Err(UnpackError::Corrupt(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("entry {path:?} is truncated"),
                    )));
                }
                let mode = entry.header().mode().unwrap_or(0o644) & RELEASE_MODE_MASK;
                file.set_permissions(std::fs::Permissions::from_mode(mode))
                    .map_err(UnpackError::Io)?;
                if is_manifest {
                    manifest_seen = true;
                    if pass == Pass::Inspect {
                        // Refused now, before the rest is decompressed.
                        let text = root
                            .read_to_string(MANIFEST_FILE)
                            .map_err(UnpackError::Io)?;
                        Manifest::parse(&text)?;
                    }
                }
            }
            EntryType::Symlink | EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(UnpackError::Corrupt)?
                    .ok_or_else(|| {
                        UnpackError::Corrupt(io::Error::other(format!(
                            "link {path:?} has no target"
                        )))
                    })?
                    .into_owned();
                create_parents(&root, &path)?;
                let made = if kind == EntryType::Symlink {
                    if !link_stays_inside(&path, &target) {
                        return Err(UnpackError::LinkEscapes { path, target });
                    }
                    root.symlink(&target, &path)
                } else {
                    // A hard link names another entry of the archive.
                    let source = clean_path(&target).map_err(|_| UnpackError::LinkEscapes {
                        path: path.clone(),
                        target: target.clone(),
                    })?;
                    root.hard_link(&source, &root, &path)
                };
                made.map_err(|e| match e.kind() {
                    io::ErrorKind::AlreadyExists => UnpackError::Duplicate(path.clone()),
                    io::ErrorKind::PermissionDenied => UnpackError::LinkEscapes {
                        path: path.clone(),
                        target: target.clone(),
                    },
                    _ => UnpackError::Io(e),
                })?;
                if kind == EntryType::Symlink {
                    // Resolve it for real now, so no later entry is written
                    // through it; the end re-checks links that later entries
                    // may have redirected.
                    check_link(&root, &path, &target)?;
                    links.push((path, target));
                }
            }
            EntryType::Char => return special("character device"),
            EntryType::Block => return special("block device"),
            EntryType::Fifo => return special("fifo"),
            EntryType::GNUSparse => return special("sparse file"),
            _ => return special("special entry"),
        }
    }
    // Lexical checks cannot see links through links (`s -> .` and then
    // `a -> s/../x`); resolve each for real, confined to the release.
    for (path, target) in &links {
        check_link(&root, path, target)?;
    }
    let text = match root.read_to_string(MANIFEST_FILE) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(UnpackError::MissingManifest),
        Err(e) => return Err(UnpackError::Io(e)),
    };
    Ok(Manifest::parse(&text)?)
}

/// Reads and validates the manifest of a tar.gz without unpacking it (the
/// origin checks uploads with this).
pub fn read_manifest(archive: impl Read) -> Result<Manifest, UnpackError> {
    let mut tar = tar::Archive::new(GzDecoder::new(archive));
    for entry in tar.entries().map_err(UnpackError::Corrupt)? {
        let mut entry = entry.map_err(UnpackError::Corrupt)?;
        let path = entry.path().map_err(UnpackError::Corrupt)?.into_owned();
        if clean_path(&path).is_ok_and(|p| p == Path::new(MANIFEST_FILE))
            && entry.header().entry_type() == EntryType::Regular
        {
            let mut text = String::new();
            entry
                .by_ref()
                .take(1 << 20)
                .read_to_string(&mut text)
                .map_err(UnpackError::Corrupt)?;
            return Ok(Manifest::parse(&text)?);
        }
    }
    Err(UnpackError::MissingManifest)
}

#[cfg(test)]
mod tests;
