//! The unpacker and the origin's inspection against good and hostile archives.

use super::*;

const MANIFEST: &str = "service = \"hello\"\n[start]\ncommand = \"bin/run\"\n";

/// The archive builder, with the mode these tests use (setuid set on
/// purpose: unpacking must drop it).
struct Builder(crate::artifact::build::ArchiveBuilder<Vec<u8>>);

impl Builder {
    fn new() -> Builder {
        Builder(crate::artifact::build::ArchiveBuilder::in_memory())
    }

    fn raw(self, name: &str, kind: EntryType, link: Option<&str>, data: &[u8]) -> Builder {
        Builder(self.0.raw(name, kind, link, 0o6755, data))
    }

    fn file(self, name: &str, data: &[u8]) -> Builder {
        self.raw(name, EntryType::Regular, None, data)
    }

    fn manifest(self) -> Builder {
        self.file("drover.toml", MANIFEST.as_bytes())
    }

    fn finish(self) -> Vec<u8> {
        self.0.finish()
    }
}

fn try_unpack(
    archive: Vec<u8>,
    limits: Limits,
) -> (tempfile::TempDir, Result<Manifest, UnpackError>) {
    let dir = tempfile::tempdir().unwrap();
    let result = unpack(&archive[..], &dir.path().join("release"), &limits);
    (dir, result)
}

/// Everything under `dir` except the release: must stay empty.
fn outside(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "release")
        .collect()
}

#[test]
fn unpacks_files_dirs_and_inside_links() {
    let archive = Builder::new()
        .manifest()
        .raw("bin/", EntryType::Directory, None, b"")
        .file("bin/run", b"#!/bin/sh\n")
        .raw("lib/current", EntryType::Symlink, Some("../bin/run"), b"")
        .raw("bin/run2", EntryType::Link, Some("bin/run"), b"")
        .finish();
    let (dir, result) = try_unpack(archive, Limits::default());
    let manifest = result.unwrap();
    assert_eq!(manifest.service, "hello");
    let release = dir.path().join("release");
    assert_eq!(
        std::fs::read(release.join("lib/current")).unwrap(),
        b"#!/bin/sh\n"
    );
    assert_eq!(
        std::fs::read(release.join("bin/run2")).unwrap(),
        b"#!/bin/sh\n"
    );
    let mode = std::fs::metadata(release.join("bin/run"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o755, "setuid and setgid are dropped");
}

#[test]
fn nothing_of_a_release_is_writable_by_group_or_others() {
    let archive = Builder(
        Builder::new()
            .manifest()
            .0
            .raw("open/", EntryType::Directory, None, 0o777, b"")
            .raw("open/world", EntryType::Regular, None, 0o7777, b"x")
            .raw("open/deep/file", EntryType::Regular, None, 0o666, b"x"),
    )
    .finish();
    let (dir, result) = try_unpack(archive, Limits::default());
    result.unwrap();
    let release = dir.path().join("release");
    let mode = |p: &str| {
        std::fs::metadata(release.join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(mode("open"), 0o755);
    assert_eq!(mode("open/deep"), 0o755);
    assert_eq!(mode("open/world"), 0o755);
    assert_eq!(mode("open/deep/file"), 0o644);
}

#[test]
fn hostile_archives_are_refused_and_nothing_lands_outside() {
    type Expect = fn(&UnpackError) -> bool;
    let cases: Vec<(&str, Vec<u8>, Expect)> = vec![
        (
            "absolute path",
            Builder::new().manifest().file("/tmp/evil", b"x").finish(),
            |e| matches!(e, UnpackError::AbsolutePath(_)),
        ),
        (
            "dot-dot",
            Builder::new().manifest().file("../evil", b"x").finish(),
            |e| matches!(e, UnpackError::ParentDir(_)),
        ),
        (
            "nested dot-dot",
            Builder::new()
                .manifest()
                .file("a/../../evil", b"x")
                .finish(),
            |e| matches!(e, UnpackError::ParentDir(_)),
        ),
        (
            "absolute symlink",
            Builder::new()
                .manifest()
                .raw("evil", EntryType::Symlink, Some("/etc"), b"")
                .finish(),
            |e| matches!(e, UnpackError::LinkEscapes { .. }),
        ),
        (
            "escaping symlink",
            Builder::new()
                .manifest()
                .raw("a/evil", EntryType::Symlink, Some("../../x"), b"")
                .finish(),
            |e| matches!(e, UnpackError::LinkEscapes { .. }),
        ),
        (
            "symlink through a symlink",
            Builder::new()
                .manifest()
                .raw("s", EntryType::Symlink, Some("."), b"")
                .raw("evil", EntryType::Symlink, Some("s/../evil-target"), b"")
                .finish(),
            |e| matches!(e, UnpackError::LinkEscapes { .. }),
        ),
        (
            "write through a symlink to the parent",
            Builder::new()
                .manifest()
                .raw("s", EntryType::Symlink, Some("."), b"")
                .raw("up", EntryType::Symlink, Some("s/.."), b"")
                .file("up/evil", b"x")
                .finish(),
            |e| matches!(e, UnpackError::LinkEscapes { .. }),
        ),
        (
            "escaping hard link",
            Builder::new()
                .manifest()
                .raw("evil", EntryType::Link, Some("../x"), b"")
                .finish(),
            |e| matches!(e, UnpackError::LinkEscapes { .. }),
        ),
        (
            "absolute hard link",
            Builder::new()
                .manifest()
                .raw("evil", EntryType::Link, Some("/etc/passwd"), b"")
                .finish(),
            |e| matches!(e, UnpackError::LinkEscapes { .. }),
        ),
        (
            "device",
            Builder::new()
                .manifest()
                .raw("dev", EntryType::Char, None, b"")
                .finish(),
            |e| {
                matches!(
                    e,
                    UnpackError::SpecialFile {
                        kind: "character device",
                        ..
                    }
                )
            },
        ),
        (
            "block",
            Builder::new()
                .manifest()
                .raw("dev", EntryType::Block, None, b"")
                .finish(),
            |e| {
                matches!(
                    e,
                    UnpackError::SpecialFile {
                        kind: "block device",
                        ..
                    }
                )
            },
        ),
        (
            "fifo",
            Builder::new()
                .manifest()
                .raw("p", EntryType::Fifo, None, b"")
                .finish(),
            |e| matches!(e, UnpackError::SpecialFile { kind: "fifo", .. }),
        ),
        (
            "duplicate through a symlink",
            Builder::new()
                .manifest()
                .raw("x", EntryType::Symlink, Some("drover.toml"), b"")
                .file("x", b"overwrite")
                .finish(),
            |e| matches!(e, UnpackError::Duplicate(_)),
        ),
        (
            "no manifest",
            Builder::new().file("bin/run", b"x").finish(),
            |e| matches!(e, UnpackError::MissingManifest),
        ),
        (
            "bad manifest",
            Builder::new().file("drover.toml", b"service = 1").finish(),
            |e| matches!(e, UnpackError::InvalidManifest(_)),
        ),
        ("not gzip", b"definitely not a tarball".to_vec(), |e| {
            matches!(e, UnpackError::Corrupt(_))
        }),
    ];
    for (name, archive, expected) in cases {
        // The origin's inspection gives the agent's verdict.
        let scratch = tempfile::tempdir().unwrap();
        let inspected = inspect(
            &archive[..],
            &scratch.path().join("release"),
            &Limits::default(),
        );
        let err = inspected.expect_err(name);
        assert!(expected(&err), "{name}: inspection got {err:?}");
        assert!(
            outside(scratch.path()).is_empty(),
            "{name}: inspection wrote outside"
        );
        let (dir, result) = try_unpack(archive, Limits::default());
        let err = result.expect_err(name);
        assert!(expected(&err), "{name}: got {err:?}");
        assert_eq!(
            outside(dir.path()),
            Vec::<String>::new(),
            "{name}: wrote outside the release"
        );
    }
}

#[test]
fn inspection_writes_no_contents_and_wants_the_manifest_first() {
    let good = Builder::new()
        .manifest()
        .file("bin/run", b"#!/bin/sh\necho hi\n")
        .finish();
    let scratch = tempfile::tempdir().unwrap();
    let dest = scratch.path().join("x");
    assert_eq!(
        inspect(&good[..], &dest, &Limits::default())
            .unwrap()
            .service,
        "hello"
    );
    assert_eq!(std::fs::metadata(dest.join("bin/run")).unwrap().len(), 0);

    // Twenty files before the manifest: refused at the 16th entry.
    let late = (0..20)
        .fold(Builder::new(), |b, i| b.file(&format!("f{i}"), b"x"))
        .manifest()
        .finish();
    let r = inspect(&late[..], &scratch.path().join("late"), &Limits::default());
    assert!(
        matches!(&r, Err(UnpackError::ManifestNotFirst { entry, .. }) if entry == Path::new("f15")),
        "{r:?}"
    );
    // The agent still unpacks such an archive (artifacts pushed before).
    let (_d, r) = try_unpack(late, Limits::default());
    r.unwrap();

    // A large entry before the manifest: refused at its header, before
    // its data is decompressed.
    let noise: Vec<u8> = (0..2u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let bomb = Builder::new().file("big", &noise).manifest().finish();
    let r = inspect(&bomb[..], &scratch.path().join("bomb"), &Limits::default());
    assert!(
        matches!(r, Err(UnpackError::ManifestNotFirst { .. })),
        "{r:?}"
    );

    // A bomb after it: the ratio, counted on what arrived so far.
    let bomb = Builder::new()
        .manifest()
        .file("zeros", &vec![0u8; 8 << 20])
        .finish();
    let r = inspect(&bomb[..], &scratch.path().join("bomb2"), &Limits::default());
    assert!(matches!(r, Err(UnpackError::RatioTooHigh { .. })), "{r:?}");

    // A bad manifest is refused as soon as it is read.
    let bad = Builder::new()
        .file("drover.toml", b"service = 1")
        .file("zeros", &vec![0u8; 8 << 20])
        .finish();
    let r = inspect(&bad[..], &scratch.path().join("bad"), &Limits::default());
    assert!(matches!(r, Err(UnpackError::InvalidManifest(_))), "{r:?}");
}

#[test]
fn limits_are_enforced() {
    let many = (0..20)
        .fold(Builder::new().manifest(), |b, i| {
            b.file(&format!("f{i}"), b"x")
        })
        .finish();
    let (_d, r) = try_unpack(
        many,
        Limits {
            max_entries: 10,
            max_unpacked_bytes: 1 << 20,
            ..Limits::default()
        },
    );
    assert!(matches!(r, Err(UnpackError::TooManyEntries(10))), "{r:?}");
    let big = Builder::new()
        .manifest()
        .file("big", &vec![7u8; 4096])
        .finish();
    let (_d, r) = try_unpack(
        big,
        Limits {
            max_entries: 10,
            max_unpacked_bytes: 1024,
            ..Limits::default()
        },
    );
    assert!(matches!(r, Err(UnpackError::TooLarge(1024))), "{r:?}");
    // 8 MiB of zeros compress ~1000:1: over 100:1 (and over the floor).
    let bomb = Builder::new()
        .manifest()
        .file("zeros", &vec![0u8; 8 << 20])
        .finish();
    let compressed = bomb.len() as u64;
    let (_d, r) = try_unpack(bomb, Limits::default().for_archive(compressed));
    assert!(
        matches!(r, Err(UnpackError::RatioTooHigh { ratio: 100, .. })),
        "{r:?}"
    );
}

#[test]
fn reads_the_manifest_without_unpacking() {
    let archive = Builder::new().file("bin/run", b"x").manifest().finish();
    assert_eq!(read_manifest(&archive[..]).unwrap().service, "hello");
    let archive = Builder::new().file("bin/run", b"x").finish();
    assert!(matches!(
        read_manifest(&archive[..]),
        Err(UnpackError::MissingManifest)
    ));
}

#[test]
fn errors_read_well() {
    let (_d, r) = try_unpack(
        Builder::new().manifest().file("../evil", b"x").finish(),
        Limits::default(),
    );
    assert_eq!(
        r.unwrap_err().to_string(),
        "archive entry \"../evil\" has a '..' component"
    );
}
