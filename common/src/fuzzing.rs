//! Property checks on inputs an outsider controls, shared by the fuzz
//! targets (`fuzz/`, cargo-fuzz, `scripts/bench fuzz`) and the corpus
//! replay test that `scripts/test` runs. Each takes arbitrary bytes and
//! panics only when a property fails; bad input itself must never panic.

use std::collections::HashMap;
use std::io::Write;

use crate::artifact::{Limits, Manifest, inspect, unpack as unpack_archive};
use crate::labels::Selector;

/// `drover.toml`: a manifest that parses survives a TOML round trip.
pub fn manifest(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(manifest) = Manifest::parse(text) {
        let again = toml::to_string(&manifest).expect("a parsed manifest serializes");
        let reparsed = Manifest::parse(&again).expect("a serialized manifest parses");
        assert_eq!(manifest, reparsed);
    }
}

/// A tar stream (gzipped here, so mutations land on tar headers): the
/// origin's inspection and an agent's unpack write nothing outside their
/// destination, and what the inspection accepts, unpack accepts alike.
pub fn unpack(tar: &[u8]) {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(tar).expect("gzip into memory");
    let archive = gz.finish().expect("gzip into memory");
    let limits = Limits {
        max_entries: 64,
        max_unpacked_bytes: 1 << 20,
        ..Limits::default()
    };
    let outside = |dir: &std::path::Path| -> Vec<std::ffi::OsString> {
        std::fs::read_dir(dir)
            .expect("reading the temp dir")
            .map(|e| e.expect("a dir entry").file_name())
            .filter(|n| n != "dest")
            .collect()
    };
    let scratch = tempfile::tempdir().expect("a temp dir");
    let inspected = inspect(&archive[..], &scratch.path().join("dest"), &limits);
    assert!(
        outside(scratch.path()).is_empty(),
        "inspection wrote outside"
    );
    let dir = tempfile::tempdir().expect("a temp dir");
    let unpacked = unpack_archive(&archive[..], &dir.path().join("dest"), &limits);
    assert!(outside(dir.path()).is_empty(), "unpack wrote outside");
    if let Ok(m) = &inspected {
        match &unpacked {
            Ok(u) => assert_eq!(m, u),
            Err(e) => panic!("the origin accepted what an agent refuses: {e}"),
        }
    }
}

/// Label selectors: one that parses prints as text that parses to the
/// same selector; matching never panics.
pub fn selector(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(selector) = Selector::parse(text) {
        let printed = selector.to_string();
        let again = Selector::parse(&printed).expect("a printed selector parses");
        assert_eq!(again.to_string(), printed);
        let labels: HashMap<String, String> = [("env".to_string(), "prod".to_string())].into();
        let _ = selector.matches(&labels);
    }
}
