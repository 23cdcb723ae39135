//! Config bundles on the host (`drover_common::config_bundle`): where a
//! Restart's or Rollback's bundle goes, its secrets resolved.
//!
//! Rules:
//! 1. Nothing is believed: the bundle's digest is computed again and its
//!    checks run again before anything is written; a bundle of another
//!    service is refused.
//! 2. Every secret reference is resolved from the host ([`Secrets`]: the
//!    `--secrets-file`, then `--secrets-env-prefix`) or the command fails
//!    naming every missing secret, with nothing written and nothing
//!    restarted: no service ever starts with a blank secret.
//! 3. A bundle is placed whole in a new directory,
//!    `services/<svc>/configs/<digest>.<n>` (0700; files 0600, owned by the
//!    service's user when the agent runs it as another; `configs/` itself
//!    is 0711: passed through, never listed), and the service's
//!    `config` link (`$DROVER_CONFIG_DIR`) is switched to it atomically
//!    (a new link renamed over the old), so a service reading it sees one
//!    bundle or the other, never a mix. Secrets are only ever on the host,
//!    in these files.
//! 4. Directories other than the linked one and the one before it are
//!    removed after each switch.

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use drover_common::config_bundle::{self, ResolveError};
use drover_common::proto::ConfigBundle;

use crate::releases::Layout;
use crate::runtime::RunAs;

/// What a Restart or Rollback says about the unit's config.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ConfigChange<'a> {
    /// Leave it as it is (the command carries none).
    Keep,
    /// Run with this bundle.
    Set(&'a ConfigBundle),
    /// Run with none (a rollback of an environment's first config deploy).
    Clear,
}

impl<'a> ConfigChange<'a> {
    /// A command's `config` and `no_config` fields.
    pub fn of(config: Option<&'a ConfigBundle>, no_config: bool) -> ConfigChange<'a> {
        match (config, no_config) {
            (Some(b), _) => ConfigChange::Set(b),
            (None, true) => ConfigChange::Clear,
            (None, false) => ConfigChange::Keep,
        }
    }

    /// The change against the digest the unit runs with: `None` when there
    /// is nothing to change, `Some(None)` to remove it, `Some(Some(b))` to
    /// place `b`.
    pub fn against(self, current: Option<&str>) -> Option<Option<&'a ConfigBundle>> {
        match self {
            ConfigChange::Keep => None,
            ConfigChange::Set(b) if current == Some(b.digest.as_str()) => None,
            ConfigChange::Set(b) => Some(Some(b)),
            ConfigChange::Clear if current.is_none() => None,
            ConfigChange::Clear => Some(None),
        }
    }
}

/// Where the host's secrets come from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Secrets {
    /// `NAME=VALUE` lines (`#` comments), read at every use, so a secret
    /// rotated in the file is used by the next deploy without a restart.
    pub file: Option<PathBuf>,
    /// A secret NAME is also the agent's environment variable PREFIX+NAME.
    pub env_prefix: Option<String>,
}

impl Secrets {
    /// Everything the file holds (empty when there is no file); an
    /// unreadable file is an error, not an empty set.
    fn in_file(&self) -> Result<Vec<(String, String)>, String> {
        let Some(path) = &self.file else {
            return Ok(Vec::new());
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading the secrets file {}: {e}", path.display()))?;
        Ok(text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim().to_string(), v.to_string()))
            .collect())
    }

    /// Rule 2: the document of `bundle` with its secrets, or why not.
    pub fn resolve(&self, bundle: &ConfigBundle) -> Result<Vec<u8>, String> {
        let file = self.in_file()?;
        let lookup = |name: &str| {
            file.iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
                .or_else(|| {
                    let prefix = self.env_prefix.as_deref()?;
                    std::env::var(format!("{prefix}{name}")).ok()
                })
        };
        config_bundle::resolve(bundle, &lookup).map_err(|e| match e {
            ResolveError::Missing(m) => format!("config {}: {m}", short(&bundle.digest)),
            ResolveError::Document(d) => format!("config {}: {d}", short(&bundle.digest)),
        })
    }
}

fn short(digest: &str) -> &str {
    &digest[..digest.len().min(12)]
}

/// Rule 1: `bundle` is whole, and `service`'s.
pub fn check(bundle: &ConfigBundle, service: &str) -> Result<(), String> {
    if bundle.service != service {
        return Err(format!(
            "config bundle is {}'s, not {service}'s",
            bundle.service
        ));
    }
    let computed = config_bundle::digest(bundle);
    if bundle.digest != computed {
        return Err(format!(
            "config bundle digest {} does not match its content ({computed})",
            bundle.digest
        ));
    }
    config_bundle::check(bundle)
        .map(|_| ())
        .map_err(|problems| {
            let list: Vec<String> = problems.iter().map(|(f, p)| format!("{f}: {p}")).collect();
            format!("config bundle refused: {}", list.join("; "))
        })
}

/// Rules 1 to 3 up to the switch: the bundle checked, resolved and written
/// whole into a new directory, returned. Nothing the service sees changes.
pub fn prepare(
    layout: &Layout,
    bundle: &ConfigBundle,
    service: &str,
    document_name: &str,
    secrets: &Secrets,
    owner: Option<&RunAs>,
) -> Result<PathBuf, String> {
    check(bundle, service)?;
    let document = secrets.resolve(bundle)?;
    let write = || -> std::io::Result<PathBuf> {
        let root = layout.configs_dir(service);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(&root)?;
        // Whatever the umask: the service's user must pass through.
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o711))?;
        let stamp = drover_common::time::now_unix_ms();
        let mut dir = root.join(format!("{}.{stamp}", bundle.digest));
        let mut n = 0;
        while dir.exists() {
            n += 1;
            dir = root.join(format!("{}.{stamp}-{n}", bundle.digest));
        }
        let tmp = root.join(format!(".{}.tmp", bundle.digest));
        let _ = std::fs::remove_dir_all(&tmp);
        mkdir(&tmp, owner)?;
        for f in &bundle.files {
            write_file(&tmp, &f.path, &f.content, owner)?;
        }
        write_file(&tmp, document_name, &document, owner)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, &dir)?;
        std::fs::File::open(&root)?.sync_all()?;
        Ok(dir)
    };
    write().map_err(|e| format!("placing config {}: {e}", short(&bundle.digest)))
}

fn mkdir(dir: &Path, owner: Option<&RunAs>) -> std::io::Result<()> {
    std::fs::DirBuilder::new().mode(0o700).create(dir)?;
    chown(dir, owner)
}

fn chown(path: &Path, owner: Option<&RunAs>) -> std::io::Result<()> {
    match owner {
        Some(o) => std::os::unix::fs::chown(path, Some(o.uid), Some(o.gid)),
        None => Ok(()),
    }
}

/// Writes `rel` (a checked relative path) under `dir`, parents included.
fn write_file(dir: &Path, rel: &str, bytes: &[u8], owner: Option<&RunAs>) -> std::io::Result<()> {
    let path = dir.join(rel);
    let mut parent = dir.to_path_buf();
    for part in Path::new(rel).parent().into_iter().flat_map(|p| p.iter()) {
        parent.push(part);
        if !parent.is_dir() {
            mkdir(&parent, owner)?;
        }
    }
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    chown(&path, owner)
}

/// The digest of the bundle the service's `config` link points to (what
/// the service reads, whatever the journal says: a crash may come between
/// the journal's write and the switch).
pub fn linked(layout: &Layout, service: &str) -> Option<String> {
    let target = std::fs::read_link(layout.config_link(service)).ok()?;
    let name = target.file_name()?.to_str()?;
    let digest = name.split('.').next()?;
    layout
        .configs_dir(service)
        .join(name)
        .is_dir()
        .then(|| digest.to_string())
}

/// Rule 3's switch: the service's `config` link to `dir` (None: removed),
/// then rule 4.
pub fn switch(layout: &Layout, service: &str, dir: Option<&Path>) -> std::io::Result<()> {
    let link = layout.config_link(service);
    match dir {
        Some(dir) => {
            let name = dir.file_name().expect("a bundle's directory has a name");
            let tmp = layout.service_dir(service).join(".config.tmp");
            let _ = std::fs::remove_file(&tmp);
            std::os::unix::fs::symlink(Path::new("configs").join(name), &tmp)?;
            std::fs::rename(&tmp, &link)?;
        }
        None => match std::fs::remove_file(&link) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        },
    }
    std::fs::File::open(layout.service_dir(service))?.sync_all()?;
    prune(layout, service, dir);
    Ok(())
}

/// Rule 4: keeps the linked directory and the newest other one.
fn prune(layout: &Layout, service: &str, current: Option<&Path>) {
    let Ok(entries) = std::fs::read_dir(layout.configs_dir(service)) else {
        return;
    };
    let mut others: Vec<(std::time::SystemTime, PathBuf)> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| Some(p.as_path()) != current)
        .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p)))
        .collect();
    others.sort();
    others.pop(); // the one before: a rollback's, and what a reader may still hold
    for (_, p) in others {
        let _ = std::fs::remove_dir_all(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_common::proto::{ConfigFile, ConfigFormat};

    fn bundle(doc: &str) -> ConfigBundle {
        let mut b = ConfigBundle {
            service: "web".into(),
            environment: "prod".into(),
            format: ConfigFormat::Toml as i32,
            document: doc.as_bytes().to_vec(),
            files: vec![ConfigFile {
                path: "certs/ca.pem".into(),
                content: b"PEM".to_vec(),
            }],
            digest: String::new(),
        };
        b.digest = config_bundle::digest(&b);
        b
    }

    fn layout(dir: &Path) -> Layout {
        let l = Layout {
            data_dir: dir.to_path_buf(),
        };
        std::fs::create_dir_all(l.service_dir("web")).unwrap();
        l
    }

    #[test]
    fn places_resolves_and_switches_whole_bundles() {
        let tmp = tempfile::tempdir().unwrap();
        let l = layout(tmp.path());
        let secrets_file = tmp.path().join("secrets");
        std::fs::write(&secrets_file, "# comment\nDB=hunter2\n").unwrap();
        let secrets = Secrets {
            file: Some(secrets_file),
            env_prefix: None,
        };
        let b = bundle("db = \"secret://DB\"\nlevel = 1\n");
        let dir = prepare(&l, &b, "web", "app.toml", &secrets, None).unwrap();
        assert!(
            !l.config_link("web").exists(),
            "nothing seen before the switch"
        );
        switch(&l, "web", Some(&dir)).unwrap();
        let doc = std::fs::read_to_string(l.config_link("web").join("app.toml")).unwrap();
        assert!(doc.contains("hunter2"), "{doc}");
        assert_eq!(
            std::fs::read(l.config_link("web").join("certs/ca.pem")).unwrap(),
            b"PEM"
        );
        let mode = std::fs::metadata(dir.join("app.toml"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // Three more switches: only the linked one and the one before stay.
        let mut last = dir;
        for level in 2..5 {
            let b = bundle(&format!("db = \"secret://DB\"\nlevel = {level}\n"));
            let d = prepare(&l, &b, "web", "app.toml", &secrets, None).unwrap();
            switch(&l, "web", Some(&d)).unwrap();
            last = d;
        }
        let left = std::fs::read_dir(l.configs_dir("web")).unwrap().count();
        assert_eq!(left, 2);
        assert_eq!(
            std::fs::canonicalize(l.config_link("web")).unwrap(),
            std::fs::canonicalize(&last).unwrap()
        );
        let digest = last.file_name().unwrap().to_str().unwrap();
        assert_eq!(linked(&l, "web").as_deref(), digest.split('.').next());
        switch(&l, "web", None).unwrap();
        assert!(!l.config_link("web").exists());
        assert_eq!(linked(&l, "web"), None);
    }

    #[test]
    fn refuses_missing_secrets_bad_digests_and_other_services() {
        let tmp = tempfile::tempdir().unwrap();
        let l = layout(tmp.path());
        let none = Secrets::default();
        let b = bundle("db = \"secret://DB_PASSWORD\"\n");
        let e = prepare(&l, &b, "web", "app.toml", &none, None).unwrap_err();
        assert!(
            e.contains("secret DB_PASSWORD not available on this host"),
            "{e}"
        );
        assert!(!l.configs_dir("web").exists(), "nothing written");
        let mut forged = bundle("x = 1\n");
        forged.document = b"x = 2\n".to_vec();
        let e = prepare(&l, &forged, "web", "app.toml", &none, None).unwrap_err();
        assert!(e.contains("does not match its content"), "{e}");
        let e = prepare(&l, &bundle("x = 1\n"), "api", "app.toml", &none, None).unwrap_err();
        assert!(e.contains("not api's"), "{e}");
        // From the environment, with the prefix.
        let env = Secrets {
            file: None,
            env_prefix: Some("DROVER_TEST_SECRET_CFG_".into()),
        };
        // SAFETY: this test's own variable; no other test reads it.
        unsafe { std::env::set_var("DROVER_TEST_SECRET_CFG_DB_PASSWORD", "s3cret") };
        let dir = prepare(&l, &b, "web", "app.toml", &env, None).unwrap();
        assert!(
            std::fs::read_to_string(dir.join("app.toml"))
                .unwrap()
                .contains("s3cret")
        );
    }
}
