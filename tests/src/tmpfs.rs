//! A tmpfs mounted for a test (needs root: scripts/test and CI run as
//! root): a disk of a fixed size (host_safety.rs), or memory instead of
//! disk for tests that move gigabytes through many agents
//! (distribution.rs). Unmounted (lazily) when dropped.

use std::path::{Path, PathBuf};

pub struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` (as mount(8) takes it: "4m", "6g") on
    /// `path`, created first.
    pub fn mount(path: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(path).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .expect("running mount");
        assert!(
            out.status.success(),
            "mounting a tmpfs needs root (scripts/test and CI run as root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(path.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}
