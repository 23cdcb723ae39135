//! Writing artifacts: a tar.gz builder for tools and tests. `raw` writes
//! entries exactly as given (no path checks), so tests can build the hostile
//! archives that unpacking must refuse. [`from_dir`] builds an artifact
//! from a directory the way the origin wants it: `drover.toml` first.

use std::io::{self, Write};
use std::path::Path;

use flate2::Compression;
use flate2::write::GzEncoder;
use tar::EntryType;

pub struct ArchiveBuilder<W: Write> {
    tar: tar::Builder<GzEncoder<W>>,
}

impl ArchiveBuilder<Vec<u8>> {
    /// A builder writing into memory.
    pub fn in_memory() -> Self {
        ArchiveBuilder::new(Vec::new())
    }
}

impl<W: Write> ArchiveBuilder<W> {
    pub fn new(out: W) -> Self {
        ArchiveBuilder {
            tar: tar::Builder::new(GzEncoder::new(out, Compression::fast())),
        }
    }

    /// Appends an entry with `name` and `link` written byte for byte.
    pub fn raw(
        mut self,
        name: &str,
        kind: EntryType,
        link: Option<&str>,
        mode: u32,
        data: &[u8],
    ) -> Self {
        let mut h = tar::Header::new_gnu();
        let field = &mut h.as_old_mut().name;
        field.fill(0);
        field[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(link) = link {
            let field = &mut h.as_old_mut().linkname;
            field.fill(0);
            field[..link.len()].copy_from_slice(link.as_bytes());
        }
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_mtime(0);
        h.set_cksum();
        self.tar.append(&h, data).expect("writing to the archive");
        self
    }

    /// A regular file (mode 0644).
    pub fn file(self, name: &str, data: &[u8]) -> Self {
        self.raw(name, EntryType::Regular, None, 0o644, data)
    }

    /// An executable file (mode 0755).
    pub fn executable(self, name: &str, data: &[u8]) -> Self {
        self.raw(name, EntryType::Regular, None, 0o755, data)
    }

    pub fn finish(self) -> W {
        self.tar
            .into_inner()
            .expect("finishing the tar stream")
            .finish()
            .expect("finishing the gzip stream")
    }
}

/// Writes the tar.gz of directory `dir` to `out`: `drover.toml` first (the
/// origin requires it among the first entries), then each directory's
/// entries in name order, before what is under them; modes kept (masked to 0755 by agents), symlinks as symlinks,
/// times and owners zeroed so the same tree gives the same bytes.
pub fn from_dir(dir: &Path, out: impl Write) -> io::Result<()> {
    let manifest = dir.join(super::MANIFEST_FILE);
    if !manifest.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{} has no {}", dir.display(), super::MANIFEST_FILE),
        ));
    }
    let mut tar = tar::Builder::new(GzEncoder::new(out, Compression::default()));
    append(&mut tar, &manifest, Path::new(super::MANIFEST_FILE))?;
    let mut stack = vec![std::path::PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let mut names: Vec<_> = std::fs::read_dir(dir.join(&rel))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<io::Result<_>>()?;
        names.sort();
        // Reversed so the walk pops them in name order.
        let mut subdirs = Vec::new();
        for name in names {
            let rel = rel.join(&name);
            if rel == Path::new(super::MANIFEST_FILE) {
                continue;
            }
            let path = dir.join(&rel);
            append(&mut tar, &path, &rel)?;
            if std::fs::symlink_metadata(&path)?.is_dir() {
                subdirs.push(rel);
            }
        }
        stack.extend(subdirs.into_iter().rev());
    }
    tar.into_inner()?.finish()?;
    Ok(())
}

fn append<W: Write>(tar: &mut tar::Builder<W>, path: &Path, name: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::symlink_metadata(path)?;
    let mut h = tar::Header::new_gnu();
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mode(meta.permissions().mode() & 0o7777);
    let kind = meta.file_type();
    if kind.is_dir() {
        h.set_entry_type(EntryType::Directory);
        h.set_size(0);
        tar.append_data(&mut h, name, io::empty())
    } else if kind.is_symlink() {
        h.set_entry_type(EntryType::Symlink);
        h.set_size(0);
        tar.append_link(&mut h, name, std::fs::read_link(path)?)
    } else if kind.is_file() {
        h.set_entry_type(EntryType::Regular);
        h.set_size(meta.len());
        tar.append_data(&mut h, name, std::fs::File::open(path)?)
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a file, directory or symlink", path.display()),
        ))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_directory_becomes_an_artifact_with_its_manifest_first() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("bin")).unwrap();
        std::fs::create_dir_all(d.join("a")).unwrap();
        std::fs::write(d.join("a/data"), b"x").unwrap();
        std::fs::write(d.join("bin/run"), b"#!/bin/sh\n").unwrap();
        std::os::unix::fs::symlink("bin/run", d.join("start")).unwrap();
        std::fs::write(
            d.join("drover.toml"),
            b"service = \"s\"\n[start]\ncommand = \"bin/run\"\n",
        )
        .unwrap();
        let mut bytes = Vec::new();
        super::from_dir(d, &mut bytes).unwrap();
        let mut again = Vec::new();
        super::from_dir(d, &mut again).unwrap();
        assert_eq!(bytes, again, "the same tree gives the same bytes");
        let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(&bytes[..]));
        let names: Vec<String> = tar
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        // Each directory's entries in name order, before what is under them.
        assert_eq!(
            names,
            ["drover.toml", "a", "bin", "start", "a/data", "bin/run"]
        );
        let scratch = tempfile::tempdir().unwrap();
        let m = crate::artifact::inspect(
            &bytes[..],
            &scratch.path().join("x"),
            &crate::artifact::Limits::default(),
        )
        .unwrap();
        assert_eq!(m.service, "s");
    }
}
