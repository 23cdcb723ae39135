//! Locating the workspace binaries.
//!
//! Cargo only exposes `CARGO_BIN_EXE_*` for binaries of the test's own
//! package, so the harness builds the workspace's binaries once per test
//! process (`cargo build --bins`, a no-op when fresh) and finds them next to
//! the test executable. `scripts/test` builds first and sets
//! `DROVER_SKIP_BUILD=1` to skip that step.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// The target directory of the running test (`target/debug` or `target/release`).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // Tests run from target/<profile>/deps/<test>-<hash>; the harness's own
    // binaries (drover-bench) from target/<profile>/.
    let dir = exe.parent().expect("executable has a parent dir");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().expect("deps has a parent").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// The features test builds have (fault-injection knobs); scripts/test
/// passes the same.
pub const FEATURES: &str = "drover-coordinator/fault-injection";

fn build_once() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        if std::env::var_os("DROVER_SKIP_BUILD").is_some() {
            return;
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let workspace = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
        let mut cmd = Command::new(cargo);
        cmd.current_dir(workspace)
            .args(["build", "--quiet", "--workspace", "--bins"])
            .args(["--features", FEATURES]);
        if target_dir().file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("running cargo build --bins");
        assert!(status.success(), "cargo build --workspace --bins failed");
    });
}

/// Path of the workspace binary `name`, built if needed.
pub fn bin(name: &str) -> PathBuf {
    build_once();
    let path = target_dir().join(name);
    assert!(
        path.is_file(),
        "{} does not exist; run `cargo build --workspace --bins` (scripts/test does)",
        path.display()
    );
    path
}
