//! Process limits.

use nix::sys::resource::{Resource, getrlimit, setrlimit};

/// Raises the open-file soft limit to the hard limit: a coordinator holds a
/// socket per agent, and the common default of 1024 is far too low.
/// Returns the limit now in force.
pub fn raise_fd_limit() -> std::io::Result<u64> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(hard)
}
