//! Config bundles as the coordinator keeps them: pushed per service and
//! environment (`configs/<service>/<environment>/<digest>`, a
//! `ConfigVersion`), immutable, found by digest when a deploy places them.
//!
//! Rules:
//! 1. A push is checked whole (`drover_common::config_bundle::check`) and
//!    its environment must be a stage of a pipeline of its service; bad
//!    input changes nothing.
//! 2. The digest is computed here; a pushed digest that differs is refused.
//! 3. A bundle is written once (compared on the key being missing); the
//!    same content pushed again answers the version already kept, with
//!    who pushed it first.
//! 4. The coordinator keeps secret *names* only: the document holds
//!    references, resolved on hosts.

use std::sync::Arc;

use drover_common::config_bundle;
use drover_common::proto::{ConfigBundle, ConfigVersion};
use prost::Message;

use crate::deploy::deployments::DeployError;
use crate::deploy::pipeline::Pipelines;
use crate::store::keys::Keys;
use crate::store::{Compare, Op, Store, Txn};

pub struct Configs {
    store: Arc<dyn Store>,
    keys: Keys,
    pipelines: Arc<Pipelines>,
}

impl Configs {
    pub fn new(store: Arc<dyn Store>, keys: Keys, pipelines: Arc<Pipelines>) -> Arc<Configs> {
        Arc::new(Configs {
            store,
            keys,
            pipelines,
        })
    }

    /// Rules 1 to 3.
    pub async fn push(
        &self,
        mut bundle: ConfigBundle,
        who: &str,
        now: u64,
    ) -> Result<ConfigVersion, DeployError> {
        let secrets = config_bundle::check(&bundle).map_err(|problems| {
            let list: Vec<String> = problems.iter().map(|(f, p)| format!("{f}: {p}")).collect();
            DeployError::Invalid(list.join("; "))
        })?;
        self.environment_exists(&bundle.service, &bundle.environment)
            .await?;
        bundle.files.sort_by(|a, b| a.path.cmp(&b.path));
        bundle.digest = config_bundle::digest(&bundle);
        let key = self
            .keys
            .config(&bundle.service, &bundle.environment, &bundle.digest);
        let version = ConfigVersion {
            bundle: Some(bundle),
            pushed_by: who.to_string(),
            pushed_at_unix_ms: now,
            secrets,
        };
        let written = self
            .store
            .txn(Txn {
                compares: vec![Compare::Missing(key.clone())],
                success: vec![Op::put(key.clone(), version.encode_to_vec())],
                failure: vec![],
            })
            .await?;
        if written.succeeded {
            return Ok(version);
        }
        let kept = self.store.get(&key).await?.ok_or_else(|| {
            DeployError::Conflict("the config bundle was removed while pushed; push again".into())
        })?;
        decode(&kept.value)
    }

    /// Rule 1: `environment` is a stage of a pipeline of `service`.
    async fn environment_exists(
        &self,
        service: &str,
        environment: &str,
    ) -> Result<(), DeployError> {
        let pipelines: Vec<_> = self
            .pipelines
            .list()
            .await?
            .into_iter()
            .filter(|p| p.service == service)
            .collect();
        if pipelines.is_empty() {
            return Err(DeployError::Invalid(format!(
                "service: no pipeline deploys service {service:?}"
            )));
        }
        if !pipelines
            .iter()
            .any(|p| p.stages.iter().any(|s| s.name == environment))
        {
            let mut names: Vec<&str> = pipelines
                .iter()
                .flat_map(|p| p.stages.iter().map(|s| s.name.as_str()))
                .collect();
            names.sort();
            names.dedup();
            return Err(DeployError::Invalid(format!(
                "environment: no pipeline of {service} has a stage {environment:?} (its environments: {})",
                names.join(", ")
            )));
        }
        Ok(())
    }

    /// The bundle `digest` of `service`'s `environment`, whole.
    pub async fn get(
        &self,
        service: &str,
        environment: &str,
        digest: &str,
    ) -> Result<Option<ConfigBundle>, DeployError> {
        load(
            self.store.as_ref(),
            &self.keys,
            service,
            environment,
            digest,
        )
        .await
    }

    /// Versions of `service` (in `environment`, or all), newest first,
    /// without their contents.
    pub async fn list(
        &self,
        service: &str,
        environment: &str,
    ) -> Result<Vec<ConfigVersion>, DeployError> {
        let prefix = if environment.is_empty() {
            self.keys.service_configs(service)
        } else {
            self.keys.configs(service, environment)
        };
        let mut versions = Vec::new();
        for kv in self.store.range(&prefix).await?.0 {
            let mut v = decode(&kv.value)?;
            if let Some(b) = &mut v.bundle {
                b.document.clear();
                for f in &mut b.files {
                    f.content.clear();
                }
            }
            versions.push(v);
        }
        versions.sort_by_key(|v| std::cmp::Reverse(v.pushed_at_unix_ms));
        Ok(versions)
    }
}

/// The bundle `digest` of `service`'s `environment` in `store`, whole
/// (`None` for an empty digest or one never pushed).
pub async fn load(
    store: &dyn Store,
    keys: &Keys,
    service: &str,
    environment: &str,
    digest: &str,
) -> Result<Option<ConfigBundle>, DeployError> {
    if digest.is_empty() {
        return Ok(None);
    }
    match store
        .get(&keys.config(service, environment, digest))
        .await?
    {
        None => Ok(None),
        Some(kv) => Ok(decode(&kv.value)?.bundle),
    }
}

fn decode(bytes: &[u8]) -> Result<ConfigVersion, DeployError> {
    ConfigVersion::decode(bytes)
        .map_err(|e| DeployError::Invalid(format!("a stored config bundle is unreadable: {e}")))
}
