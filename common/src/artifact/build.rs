//! Writing artifacts: a tar.gz builder for tools and tests. `raw` writes
//! entries exactly as given (no path checks), so tests can build the hostile
//! archives that unpacking must refuse.

use std::io::Write;

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
