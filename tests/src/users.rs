//! Real unprivileged users, made for one test and removed after it.
//!
//! Tests of least privilege need a user that is neither root nor shared
//! with anything else on the machine: `SystemUser::create` runs `useradd`
//! (a system user with its own group, no home, no login) and dropping it
//! runs `userdel`. Creating users needs root; a test that needs one fails,
//! saying so, when it is not root.

use std::process::Command;

/// A user created for a test; deleted on drop.
pub struct SystemUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl SystemUser {
    pub fn create() -> SystemUser {
        assert!(
            nix::unistd::Uid::effective().is_root(),
            "this test creates users and runs services as them: run it as root"
        );
        let useradd = crate::require_tool("useradd", "install Debian's passwd package");
        let name = format!("drvt{:08x}", rand_u32());
        let out = Command::new(useradd)
            .args([
                "--system",
                "--user-group",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                &name,
            ])
            .output()
            .expect("running useradd");
        assert!(
            out.status.success(),
            "useradd {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let user = nix::unistd::User::from_name(&name)
            .expect("looking up the new user")
            .expect("the new user exists");
        SystemUser {
            name,
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
        }
    }
}

impl Drop for SystemUser {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.name).output();
    }
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.finish() as u32
}
