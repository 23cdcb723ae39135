//! Feature flags on the host: each `HostFlags` a coordinator sends (it
//! replaces the earlier set) is written to `services/<service>/flags.json`
//! (`{"flags": {"NAME": true|false}}`, atomically replaced, 0644 so the
//! service reads it; a service finds it as `$DROVER_FLAGS_FILE`). A file
//! is written only when its content changes (every coordinator sends the
//! same set); a service left out of the set gets `{"flags": {}}`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use drover_common::proto::HostFlags;
use tracing::{info, warn};

use crate::releases::Layout;

pub struct FlagFiles {
    layout: Layout,
    /// Per service, the content last written.
    written: Mutex<BTreeMap<String, Vec<u8>>>,
}

impl FlagFiles {
    pub fn new(layout: Layout) -> FlagFiles {
        FlagFiles {
            layout,
            written: Mutex::new(BTreeMap::new()),
        }
    }

    /// Writes every service's flags that changed.
    pub fn apply(&self, flags: &HostFlags) {
        let mut written = self.written.lock().expect("flags lock");
        let mut now: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        for s in &flags.services {
            if drover_common::ids::validate_service(&s.service).is_err() {
                warn!(service = %s.service, "flags for a service name we would not use; ignored");
                continue;
            }
            let sorted: BTreeMap<&String, &bool> = s.flags.iter().collect();
            let body = serde_json::json!({ "flags": sorted });
            now.insert(
                s.service.clone(),
                serde_json::to_vec(&body).expect("serializes"),
            );
        }
        let gone: BTreeSet<String> = written
            .keys()
            .filter(|s| !now.contains_key(*s))
            .cloned()
            .collect();
        for service in gone {
            now.insert(service, br#"{"flags":{}}"#.to_vec());
        }
        for (service, body) in now {
            if written.get(&service) == Some(&body) {
                continue;
            }
            let path = self.layout.flags_file(&service);
            let result = std::fs::create_dir_all(self.layout.service_dir(&service))
                .and_then(|_| crate::state::write_durably_as(&path, &body, 0o644));
            match result {
                Ok(()) => {
                    info!(%service, flags = %String::from_utf8_lossy(&body), "feature flags written");
                    written.insert(service, body);
                }
                Err(e) => {
                    warn!(%service, path = %path.display(), error = %e, "cannot write the feature flags")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_common::proto::ServiceFlags;

    #[test]
    fn flags_are_written_when_they_change_and_emptied_when_a_service_leaves() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout {
            data_dir: dir.path().to_path_buf(),
        };
        let files = FlagFiles::new(layout.clone());
        let set = |on: bool| HostFlags {
            services: vec![ServiceFlags {
                service: "web".into(),
                flags: [("beta".to_string(), on)].into(),
            }],
        };
        files.apply(&set(true));
        let read = || std::fs::read_to_string(layout.flags_file("web")).unwrap();
        assert_eq!(read(), r#"{"flags":{"beta":true}}"#);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(layout.flags_file("web"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o644);
        files.apply(&set(false));
        assert_eq!(read(), r#"{"flags":{"beta":false}}"#);
        files.apply(&HostFlags::default());
        assert_eq!(read(), r#"{"flags":{}}"#);
        files.apply(&HostFlags {
            services: vec![ServiceFlags {
                service: "../etc".into(),
                flags: Default::default(),
            }],
        });
        assert!(!dir.path().join("etc").exists());
    }
}
