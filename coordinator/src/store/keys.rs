//! Every key the coordinator writes, in one place: the store's layout.
//! All live under the prefix (`--key-prefix`, default `/drover`):
//!
//! ```text
//! cluster-id                              written once; agents' epochs belong to it
//! members/<id>                            a live coordinator (bound to its session lease)
//! elections/shard-<n>                     the leader of shard n (bound to its session lease)
//! artifacts/<sha256>                      ArtifactInfo
//! pipelines/<name>                        Pipeline
//! deploys/<id>                            a deploy record (JSON)
//! active/<pipeline>                       the pipeline's running deploy
//! idempotency/<pipeline>/<key>            the deploy a start key made
//! known-good/<pipeline>                   the last release that completed
//! passed/<pipeline>/<stage>/<sha256>      present once the artifact passed the stage
//! environments/<pipeline>/<stage>         an Environment: what runs there
//! audit/<service>/<ms>-<deploy>-<write>-<n>  AuditEvent, append-only
//! audit/<service>/<ms>-command-<uuid>     a command sent by hand
//! evidence/<deploy>/<stage>.<step>        BakeEvidence of a canary step being baked
//! trains/<id>                             a release train's record (JSON)
//! train-keys/<key>                        the train a start key made
//! flags/<pipeline>/<environment>/<name>   a feature flag's FlagState
//! notify/subscriptions/<name>             a webhook Subscription
//! notify/outbox/<ms>-<deploy>-<write>-<n> a notifiable AuditEvent, written with it
//! notify/cursors/<name>                   how far a subscription's deliveries got (JSON)
//! notify/heads/<name>                     its delivery being retried (JSON)
//! ```
//!
//! Architecture Invariant: no other module spells a key's layout. Modules
//! that range or watch keep a prefix from here (those ending in `/` or
//! `shard-`) and append only what the layout puts after it (a member id, a
//! shard number, a sha256, a pipeline name).

/// The key layout under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_string(),
        }
    }

    pub fn cluster_id(&self) -> String {
        format!("{}/cluster-id", self.prefix)
    }

    pub fn members(&self) -> String {
        format!("{}/members/", self.prefix)
    }

    pub fn member(&self, id: &str) -> String {
        format!("{}{id}", self.members())
    }

    /// The prefix of every election key; the shard number follows it.
    pub fn elections(&self) -> String {
        format!("{}/elections/shard-", self.prefix)
    }

    pub fn election(&self, shard: u32) -> String {
        format!("{}{shard}", self.elections())
    }

    pub fn artifacts(&self) -> String {
        format!("{}/artifacts/", self.prefix)
    }

    pub fn artifact(&self, sha256: &str) -> String {
        format!("{}{sha256}", self.artifacts())
    }

    pub fn pipelines(&self) -> String {
        format!("{}/pipelines/", self.prefix)
    }

    pub fn pipeline(&self, name: &str) -> String {
        format!("{}{name}", self.pipelines())
    }

    pub fn deploys(&self) -> String {
        format!("{}/deploys/", self.prefix)
    }

    pub fn deploy(&self, id: &str) -> String {
        format!("{}{id}", self.deploys())
    }

    /// Every pipeline's running deploy marker.
    pub fn actives(&self) -> String {
        format!("{}/active/", self.prefix)
    }

    /// Every pipeline's known-good release.
    pub fn known_goods(&self) -> String {
        format!("{}/known-good/", self.prefix)
    }

    /// Every environment of every pipeline.
    pub fn environments(&self) -> String {
        format!("{}/environments/", self.prefix)
    }

    pub fn active(&self, pipeline: &str) -> String {
        format!("{}/active/{pipeline}", self.prefix)
    }

    pub fn idempotency(&self, pipeline: &str, key: &str) -> String {
        format!("{}/idempotency/{pipeline}/{key}", self.prefix)
    }

    pub fn known_good(&self, pipeline: &str) -> String {
        format!("{}/known-good/{pipeline}", self.prefix)
    }

    /// Present once `artifact` passed stage `stage` of `pipeline`.
    pub fn passed(&self, pipeline: &str, stage: &str, artifact: &str) -> String {
        format!("{}/passed/{pipeline}/{stage}/{artifact}", self.prefix)
    }

    /// The Environment (what runs) of a stage of a pipeline.
    pub fn environment(&self, pipeline: &str, stage: &str) -> String {
        format!("{}/environments/{pipeline}/{stage}", self.prefix)
    }

    /// The prefix of a service's audit events (sorted by time).
    pub fn audit(&self, service: &str) -> String {
        format!("{}/audit/{service}/", self.prefix)
    }

    /// Event `n` of one write of a deploy; the zero-padded time sorts them.
    /// An audit event: `write` tells the writes of one deploy (or train)
    /// in the same millisecond apart (`w<record's write count>`, or
    /// `t<random>` for a train's), `n` the events of one write.
    pub fn audit_event(
        &self,
        service: &str,
        at_unix_ms: u64,
        deploy: &str,
        write: &str,
        n: usize,
    ) -> String {
        format!(
            "{}{at_unix_ms:016}-{deploy}-{write}-{n}",
            self.audit(service)
        )
    }

    /// A command sent by hand.
    pub fn audit_command(&self, service: &str, at_unix_ms: u64, id: &str) -> String {
        format!("{}{at_unix_ms:016}-command-{id}", self.audit(service))
    }

    /// The evidence of canary step `step` of stage `stage` of a deploy,
    /// while it bakes.
    pub fn trains(&self) -> String {
        format!("{}/trains/", self.prefix)
    }

    pub fn train(&self, id: &str) -> String {
        format!("{}{id}", self.trains())
    }

    pub fn flags(&self) -> String {
        format!("{}/flags/", self.prefix)
    }

    pub fn flag(&self, pipeline: &str, environment: &str, name: &str) -> String {
        format!("{}{pipeline}/{environment}/{name}", self.flags())
    }

    /// Config bundles of `service`'s `environment` (a ConfigVersion each).
    pub fn configs(&self, service: &str, environment: &str) -> String {
        format!("{}/configs/{service}/{environment}/", self.prefix)
    }

    /// Every config bundle of `service`.
    pub fn service_configs(&self, service: &str) -> String {
        format!("{}/configs/{service}/", self.prefix)
    }

    pub fn config(&self, service: &str, environment: &str, digest: &str) -> String {
        format!("{}{digest}", self.configs(service, environment))
    }

    pub fn subscriptions(&self) -> String {
        format!("{}/notify/subscriptions/", self.prefix)
    }

    pub fn subscription(&self, name: &str) -> String {
        format!("{}{name}", self.subscriptions())
    }

    pub fn outbox(&self) -> String {
        format!("{}/notify/outbox/", self.prefix)
    }

    /// The outbox entry of an audit event (named as its audit key is).
    pub fn outbox_entry(&self, at_unix_ms: u64, deploy: &str, write: &str, n: usize) -> String {
        format!("{}{at_unix_ms:013}-{deploy}-{write}-{n}", self.outbox())
    }

    pub fn notify_cursor(&self, name: &str) -> String {
        format!("{}/notify/cursors/{name}", self.prefix)
    }

    pub fn notify_head(&self, name: &str) -> String {
        format!("{}/notify/heads/{name}", self.prefix)
    }

    pub fn train_key(&self, key: &str) -> String {
        format!("{}/train-keys/{key}", self.prefix)
    }

    pub fn evidence(&self, deploy: &str, stage: usize, step: usize) -> String {
        format!("{}/evidence/{deploy}/{stage}.{step}", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::Keys;

    #[test]
    fn the_layout_is_the_documented_one() {
        let k = Keys::new("/drover");
        assert_eq!(k.cluster_id(), "/drover/cluster-id");
        assert_eq!(k.member("c1"), "/drover/members/c1");
        assert_eq!(k.election(7), "/drover/elections/shard-7");
        assert_eq!(k.artifact("ab"), "/drover/artifacts/ab");
        assert_eq!(k.pipeline("p"), "/drover/pipelines/p");
        assert_eq!(k.deploy("d"), "/drover/deploys/d");
        assert_eq!(k.active("p"), "/drover/active/p");
        assert_eq!(k.idempotency("p", "k"), "/drover/idempotency/p/k");
        assert_eq!(k.known_good("p"), "/drover/known-good/p");
        assert_eq!(k.passed("p", "s", "a"), "/drover/passed/p/s/a");
        assert_eq!(k.environment("p", "s"), "/drover/environments/p/s");
        assert_eq!(k.audit("svc"), "/drover/audit/svc/");
        assert_eq!(
            k.audit_event("svc", 42, "d1", "w00000007", 3),
            "/drover/audit/svc/0000000000000042-d1-w00000007-3"
        );
        assert_eq!(
            k.audit_command("svc", 42, "u"),
            "/drover/audit/svc/0000000000000042-command-u"
        );
        // Every single key lies under its range prefix.
        assert!(k.member("c1").starts_with(&k.members()));
        assert!(k.election(3).starts_with(&k.elections()));
        assert!(k.deploy("d").starts_with(&k.deploys()));
    }
}
