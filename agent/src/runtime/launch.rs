//! How every process of a service is launched: as whom, where, and with
//! which environment. The service itself, its hooks and its exec probes all
//! go through [`Launch::command`], so none of them can differ.
//!
//! Rules:
//! 1. A service runs as an unprivileged user: the manifest's `user`, else
//!    the agent's `--service-user` (default `nobody`). Root only when the
//!    agent was started with `--allow-root-services`.
//! 2. The switch happens in the child before exec, in this order: setgid to
//!    the user's primary group, setgroups to none (supplementary groups
//!    dropped; the standard library does it when a uid is set and no groups
//!    are), setuid. An agent that is not root cannot switch users: it runs
//!    services as itself, and a manifest naming another user is refused.
//! 3. The environment is cleared and rebuilt: PATH (the agent's `--env
//!    PATH=` or a fixed system path), HOME/USER/LOGNAME of the run-as user,
//!    LANG/LC_ALL/TZ when the agent has them, then the agent's `--env`
//!    settings, the `DROVER_*` facts, then the manifest's `env`. Nothing
//!    else of the agent's own environment reaches a service.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The PATH a service gets unless the agent sets one with `--env`.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Variables of the agent's own environment a service may inherit (rule 3).
const INHERITED: &[&str] = &["LANG", "LC_ALL", "TZ"];

/// A user a service runs as (rule 2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    pub user: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

/// The agent's settings for rule 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserPolicy {
    /// `--service-user`: whom services run as when their manifest says nothing.
    pub default_user: String,
    /// `--allow-root-services`.
    pub allow_root: bool,
}

impl Default for UserPolicy {
    fn default() -> Self {
        UserPolicy {
            default_user: "nobody".into(),
            allow_root: false,
        }
    }
}

impl UserPolicy {
    /// Whom a service whose manifest asks for `wanted` runs as; `None`:
    /// as the agent itself (an unprivileged agent, rule 2).
    pub fn resolve(&self, wanted: Option<&str>) -> Result<Option<RunAs>, String> {
        let me = nix::unistd::Uid::effective();
        if !me.is_root() {
            return match wanted {
                None => Ok(None),
                Some(name) => {
                    let user = lookup(name)?;
                    if user.uid == me.as_raw() {
                        Ok(None)
                    } else {
                        Err(format!(
                            "the manifest asks for user {name:?}, but the agent runs unprivileged \
                             (uid {me}) and cannot switch users"
                        ))
                    }
                }
            };
        }
        let name = wanted.unwrap_or(&self.default_user);
        let user = lookup(name)?;
        if user.uid == 0 && !self.allow_root {
            return Err(format!(
                "user {name:?} is root; services run as root only when the agent is started \
                 with --allow-root-services"
            ));
        }
        Ok(Some(user))
    }
}

fn lookup(name: &str) -> Result<RunAs, String> {
    match nix::unistd::User::from_name(name) {
        Ok(Some(u)) => Ok(RunAs {
            user: u.name,
            uid: u.uid.as_raw(),
            gid: u.gid.as_raw(),
            home: u.dir,
        }),
        Ok(None) => Err(format!("user {name:?} does not exist on this host")),
        Err(e) => Err(format!("looking up user {name:?}: {e}")),
    }
}

/// The base environment of rule 3, before the agent's `--env` settings.
pub fn base_environment(run_as: Option<&RunAs>) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    env.insert("PATH".to_string(), DEFAULT_PATH.to_string());
    for key in INHERITED {
        if let Ok(v) = std::env::var(key) {
            env.insert(key.to_string(), v);
        }
    }
    let (user, home) = match run_as {
        Some(r) => (r.user.clone(), r.home.display().to_string()),
        None => {
            let me = nix::unistd::User::from_uid(nix::unistd::Uid::effective())
                .ok()
                .flatten();
            (
                me.as_ref().map(|u| u.name.clone()).unwrap_or_default(),
                me.map(|u| u.dir.display().to_string())
                    .unwrap_or_else(|| "/".into()),
            )
        }
    };
    env.insert("HOME".into(), home);
    env.insert("USER".into(), user.clone());
    env.insert("LOGNAME".into(), user);
    env
}

/// How a service's processes start: its own, its hooks', its exec probes'.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub workdir: PathBuf,
    /// The whole environment (rule 3); nothing is inherited.
    pub env: BTreeMap<String, String>,
    /// `None`: as the agent itself.
    pub run_as: Option<RunAs>,
}

impl Launch {
    /// A command for `program` that starts as rules 2 and 3 say.
    pub fn command(&self, program: &Path) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(program);
        cmd.env_clear().envs(&self.env).current_dir(&self.workdir);
        if let Some(r) = &self.run_as {
            cmd.gid(r.gid).uid(r.uid);
        }
        cmd
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_needs_the_agents_permission() {
        if !nix::unistd::Uid::effective().is_root() {
            return; // rule 1 applies to a root agent only; the next test covers the rest
        }
        let strict = UserPolicy::default();
        assert_eq!(strict.resolve(None).unwrap().unwrap().user, "nobody");
        let e = strict.resolve(Some("root")).unwrap_err();
        assert!(e.contains("--allow-root-services"), "{e}");
        let e = strict.resolve(Some("no-such-user-xyz")).unwrap_err();
        assert!(e.contains("does not exist"), "{e}");
        let lax = UserPolicy {
            allow_root: true,
            ..UserPolicy::default()
        };
        assert_eq!(lax.resolve(Some("root")).unwrap().unwrap().uid, 0);
    }

    #[test]
    fn the_base_environment_holds_only_the_allowlist() {
        let run_as = RunAs {
            user: "svc".into(),
            uid: 1234,
            gid: 1234,
            home: "/home/svc".into(),
        };
        let env = base_environment(Some(&run_as));
        let keys: Vec<&str> = env.keys().map(|k| k.as_str()).collect();
        for k in &keys {
            assert!(
                ["PATH", "HOME", "USER", "LOGNAME"].contains(k) || INHERITED.contains(k),
                "{k} is not on the allowlist"
            );
        }
        assert_eq!(env["HOME"], "/home/svc");
        assert_eq!(env["PATH"], DEFAULT_PATH);
    }
}
