//! The authorization policy: who may do what, where. Pure; the file format
//! is TOML:
//!
//! ```toml
//! # Roles beyond the built-in viewer, deployer, approver and admin.
//! [roles]
//! release-manager = ["deploys.read", "deploys.start", "deploys.approve"]
//!
//! # Groups named here, in addition to the groups a certificate carries.
//! [groups]
//! sre = ["user/alice", "user/bob"]
//!
//! [[grant]]
//! to = ["group/sre"]          # user/NAME, group/NAME or "*" (any user)
//! role = "approver"
//! pipelines = ["*"]           # globs; default every pipeline
//! environments = ["prod"]     # globs over stage names; default every stage
//! ```
//!
//! Rules:
//! 1. Default deny: a user is allowed an action only if some grant names
//!    the user (or a group of theirs, or `*`), its role holds the
//!    permission, and its globs match the pipeline and environment asked
//!    about. A scope left open (`None`) matches any grant.
//! 2. Agents and coordinators are not subjects of grants: an agent may read
//!    artifacts (its pulls); a coordinator may read artifacts (replication)
//!    and forward its callers' requests (checked as those callers).
//! 3. Without a policy file the [`Policy::default`] grants each built-in
//!    role to the group of the same name, everywhere (`droverctl ca issue
//!    user alice --role deployer` puts alice in group `deployer`).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use drover_common::tls::identity::{Kind, SpiffeId};
use globset::{Glob, GlobSet, GlobSetBuilder};
use serde::Deserialize;

/// One action the API guards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Permission {
    HostsRead,
    ArtifactsRead,
    ArtifactsPush,
    PipelinesRead,
    PipelinesWrite,
    DeploysRead,
    DeploysStart,
    DeploysControl,
    DeploysApprove,
    CommandsSend,
    /// Reading the whole store (a backup): admin only.
    StoreBackup,
}

impl Permission {
    pub const ALL: [Permission; 11] = [
        Permission::HostsRead,
        Permission::ArtifactsRead,
        Permission::ArtifactsPush,
        Permission::PipelinesRead,
        Permission::PipelinesWrite,
        Permission::DeploysRead,
        Permission::DeploysStart,
        Permission::DeploysControl,
        Permission::DeploysApprove,
        Permission::CommandsSend,
        Permission::StoreBackup,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Permission::HostsRead => "hosts.read",
            Permission::ArtifactsRead => "artifacts.read",
            Permission::ArtifactsPush => "artifacts.push",
            Permission::PipelinesRead => "pipelines.read",
            Permission::PipelinesWrite => "pipelines.write",
            Permission::DeploysRead => "deploys.read",
            Permission::DeploysStart => "deploys.start",
            Permission::DeploysControl => "deploys.control",
            Permission::DeploysApprove => "deploys.approve",
            Permission::CommandsSend => "commands.send",
            Permission::StoreBackup => "store.backup",
        }
    }

    pub fn parse(s: &str) -> Option<Permission> {
        Permission::ALL.into_iter().find(|p| p.as_str() == s)
    }
}

/// The built-in roles.
pub fn builtin_role(name: &str) -> Option<BTreeSet<Permission>> {
    use Permission::*;
    let viewer = [HostsRead, ArtifactsRead, PipelinesRead, DeploysRead];
    let set: BTreeSet<Permission> = match name {
        "viewer" => viewer.into_iter().collect(),
        "deployer" => viewer
            .into_iter()
            .chain([ArtifactsPush, DeploysStart, DeploysControl])
            .collect(),
        "approver" => viewer.into_iter().chain([DeploysApprove]).collect(),
        "admin" => Permission::ALL.into_iter().collect(),
        _ => return None,
    };
    Some(set)
}

pub const BUILTIN_ROLES: [&str; 4] = ["viewer", "deployer", "approver", "admin"];

/// A caller as the policy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    pub id: SpiffeId,
    /// Groups from the certificate.
    pub groups: Vec<String>,
}

/// Where an action applies; `None` means "anywhere" (rule 1).
#[derive(Debug, Clone, Copy, Default)]
pub struct Scope<'a> {
    pub pipeline: Option<&'a str>,
    pub environment: Option<&'a str>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    roles: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    groups: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    grant: Vec<GrantFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantFile {
    to: Vec<String>,
    role: String,
    #[serde(default = "everything")]
    pipelines: Vec<String>,
    #[serde(default = "everything")]
    environments: Vec<String>,
}

fn everything() -> Vec<String> {
    vec!["*".into()]
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Who {
    AnyUser,
    User(String),
    Group(String),
}

#[derive(Debug)]
struct Grant {
    to: Vec<Who>,
    role: String,
    permissions: BTreeSet<Permission>,
    pipelines: GlobSet,
    environments: GlobSet,
}

/// A parsed, checked policy.
#[derive(Debug)]
pub struct Policy {
    /// group → members ("user/alice").
    groups: HashMap<String, HashSet<String>>,
    grants: Vec<Grant>,
}

fn globs(field: &str, patterns: &[String]) -> Result<GlobSet, String> {
    if patterns.is_empty() {
        return Err(format!("{field} is empty (use [\"*\"] for everything)"));
    }
    let mut b = GlobSetBuilder::new();
    for p in patterns {
        b.add(Glob::new(p).map_err(|e| format!("{field}: {p:?}: {e}"))?);
    }
    b.build().map_err(|e| format!("{field}: {e}"))
}

fn parse_who(s: &str) -> Result<Who, String> {
    if s == "*" {
        return Ok(Who::AnyUser);
    }
    let check = |name: &str| {
        drover_common::tls::identity::validate_name(name)
            .map(|_| name.to_string())
            .map_err(|e| format!("{s:?}: {e}"))
    };
    match s.split_once('/') {
        Some(("user", name)) => Ok(Who::User(check(name)?)),
        Some(("group", name)) => Ok(Who::Group(check(name)?)),
        _ => Err(format!(
            "{s:?} is not user/NAME, group/NAME or \"*\" (agents and coordinators take no grants)"
        )),
    }
}

impl Policy {
    /// Parses and checks a policy file's text; errors name the field.
    pub fn parse(text: &str) -> Result<Policy, String> {
        let file: PolicyFile = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut roles: HashMap<String, BTreeSet<Permission>> = BUILTIN_ROLES
            .iter()
            .map(|r| (r.to_string(), builtin_role(r).expect("built-in")))
            .collect();
        for (name, perms) in &file.roles {
            if builtin_role(name).is_some() {
                return Err(format!("roles.{name}: a built-in role cannot be redefined"));
            }
            let mut set = BTreeSet::new();
            for p in perms {
                set.insert(Permission::parse(p).ok_or_else(|| {
                    format!(
                        "roles.{name}: unknown permission {p:?} (known: {})",
                        Permission::ALL.map(Permission::as_str).join(", ")
                    )
                })?);
            }
            roles.insert(name.clone(), set);
        }
        let mut groups = HashMap::new();
        for (name, members) in &file.groups {
            let mut set = HashSet::new();
            for m in members {
                match parse_who(m).map_err(|e| format!("groups.{name}: {e}"))? {
                    Who::User(u) => set.insert(format!("user/{u}")),
                    _ => return Err(format!("groups.{name}: members are user/NAME, got {m:?}")),
                };
            }
            groups.insert(name.clone(), set);
        }
        let mut grants = Vec::new();
        for (i, g) in file.grant.iter().enumerate() {
            let at = format!("grant[{i}]");
            let permissions = roles
                .get(&g.role)
                .cloned()
                .ok_or_else(|| format!("{at}.role: unknown role {:?}", g.role))?;
            if g.to.is_empty() {
                return Err(format!("{at}.to is empty"));
            }
            let to =
                g.to.iter()
                    .map(|w| parse_who(w).map_err(|e| format!("{at}.to: {e}")))
                    .collect::<Result<_, _>>()?;
            grants.push(Grant {
                to,
                role: g.role.clone(),
                permissions,
                pipelines: globs(&format!("{at}.pipelines"), &g.pipelines)?,
                environments: globs(&format!("{at}.environments"), &g.environments)?,
            });
        }
        Ok(Policy { groups, grants })
    }

    /// Rule 2 and rule 1 together.
    pub fn allows(&self, subject: &Subject, permission: Permission, scope: Scope<'_>) -> bool {
        match subject.id.kind {
            Kind::Agent | Kind::Coordinator => permission == Permission::ArtifactsRead,
            Kind::Etcd => false,
            Kind::User => self
                .grants_of(subject, scope)
                .any(|grant| grant.permissions.contains(&permission)),
        }
    }

    /// Whether a grant gives `subject` the role named `role` at `scope`.
    pub fn holds_role(&self, subject: &Subject, role: &str, scope: Scope<'_>) -> bool {
        subject.id.kind == Kind::User && self.grants_of(subject, scope).any(|g| g.role == role)
    }

    /// The grants that name `subject` and cover `scope`.
    fn grants_of<'a>(
        &'a self,
        subject: &'a Subject,
        scope: Scope<'a>,
    ) -> impl Iterator<Item = &'a Grant> + 'a {
        let user = format!("user/{}", subject.id.name);
        self.grants.iter().filter(move |grant| {
            grant.to.iter().any(|w| match w {
                Who::AnyUser => true,
                Who::User(u) => *u == subject.id.name,
                Who::Group(g) => {
                    subject.groups.iter().any(|sg| sg == g)
                        || self.groups.get(g).is_some_and(|m| m.contains(&user))
                }
            }) && scope.pipeline.is_none_or(|p| grant.pipelines.is_match(p))
                && scope
                    .environment
                    .is_none_or(|e| grant.environments.is_match(e))
        })
    }

    pub fn grant_count(&self) -> usize {
        self.grants.len()
    }
}

impl Default for Policy {
    /// Rule 3.
    fn default() -> Policy {
        let mut text = String::new();
        for role in BUILTIN_ROLES {
            text.push_str(&format!(
                "[[grant]]\nto = [\"group/{role}\"]\nrole = \"{role}\"\n"
            ));
        }
        Policy::parse(&text).expect("the default policy parses")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str, groups: &[&str]) -> Subject {
        Subject {
            id: SpiffeId::parse(&format!("spiffe://example.org/user/{name}")).unwrap(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
        }
    }

    fn at<'a>(pipeline: &'a str, env: &'a str) -> Scope<'a> {
        Scope {
            pipeline: Some(pipeline),
            environment: Some(env),
        }
    }

    const POLICY: &str = r#"
[roles]
starter = ["deploys.read", "deploys.start"]

[groups]
sre = ["user/alice"]

[[grant]]
to = ["user/ci"]
role = "deployer"
environments = ["staging"]

[[grant]]
to = ["user/ci"]
role = "starter"
environments = ["prod"]

[[grant]]
to = ["group/sre"]
role = "approver"
pipelines = ["hello-*"]
environments = ["prod"]

[[grant]]
to = ["*"]
role = "viewer"
"#;

    #[test]
    fn grants_apply_by_subject_role_and_scope() {
        use Permission::*;
        let p = Policy::parse(POLICY).unwrap();
        let ci = user("ci", &[]);
        let alice = user("alice", &[]);
        let bob = user("bob", &["sre"]);
        let carol = user("carol", &[]);
        // CI deploys to staging and may start prod deploys, never approve them.
        assert!(p.allows(&ci, DeploysStart, at("hello-prod", "staging")));
        assert!(p.allows(&ci, DeploysControl, at("hello-prod", "staging")));
        assert!(p.allows(&ci, DeploysStart, at("hello-prod", "prod")));
        assert!(!p.allows(&ci, DeploysControl, at("hello-prod", "prod")));
        assert!(!p.allows(&ci, DeploysApprove, at("hello-prod", "prod")));
        // Only sre approves prod, by the policy's group or the certificate's.
        assert!(p.allows(&alice, DeploysApprove, at("hello-prod", "prod")));
        assert!(p.allows(&bob, DeploysApprove, at("hello-prod", "prod")));
        assert!(!p.allows(&alice, DeploysApprove, at("other", "prod")));
        assert!(!p.allows(&alice, DeploysApprove, at("hello-prod", "staging")));
        assert!(!p.allows(&carol, DeploysApprove, at("hello-prod", "prod")));
        // Everyone reads; nobody sends commands or writes pipelines.
        assert!(p.allows(&carol, DeploysRead, Scope::default()));
        assert!(!p.allows(&carol, CommandsSend, Scope::default()));
        assert!(!p.allows(&ci, PipelinesWrite, at("hello-prod", "staging")));
        // An open scope matches any grant holding the permission.
        assert!(p.allows(&ci, DeploysControl, Scope::default()));
    }

    #[test]
    fn agents_and_coordinators_only_read_artifacts() {
        let p = Policy::default();
        for kind in ["agent/web-1", "coordinator/c1"] {
            let s = Subject {
                id: SpiffeId::parse(&format!("spiffe://example.org/{kind}")).unwrap(),
                groups: vec!["admin".into()],
            };
            assert!(p.allows(&s, Permission::ArtifactsRead, Scope::default()));
            for perm in Permission::ALL {
                if perm != Permission::ArtifactsRead {
                    assert!(!p.allows(&s, perm, Scope::default()), "{kind} {perm:?}");
                }
            }
        }
    }

    #[test]
    fn default_policy_binds_role_groups_and_denies_the_rest() {
        let p = Policy::default();
        let dev = user("dev", &["deployer"]);
        let nobody = user("nobody", &[]);
        assert!(p.allows(&dev, Permission::DeploysStart, at("x", "prod")));
        assert!(!p.allows(&dev, Permission::DeploysApprove, at("x", "prod")));
        for perm in Permission::ALL {
            assert!(!p.allows(&nobody, perm, Scope::default()));
        }
        let admin = user("root", &["admin"]);
        assert!(p.allows(&admin, Permission::CommandsSend, Scope::default()));
    }

    #[test]
    fn bad_policies_name_the_field() {
        for (text, needle) in [
            (
                "[[grant]]\nto = [\"user/a\"]\nrole = \"nope\"\n",
                "grant[0].role",
            ),
            ("[roles]\nx = [\"deploys.fly\"]\n", "roles.x"),
            ("[roles]\nadmin = []\n", "roles.admin"),
            (
                "[[grant]]\nto = [\"agent/web-1\"]\nrole = \"viewer\"\n",
                "grant[0].to",
            ),
            ("[groups]\nsre = [\"group/x\"]\n", "groups.sre"),
            (
                "[[grant]]\nto = [\"*\"]\nrole = \"viewer\"\npipelines = [\"[\"]\n",
                "grant[0].pipelines",
            ),
            ("[[grant]]\nto = []\nrole = \"viewer\"\n", "grant[0].to"),
            ("grant = 3", "grant"),
            ("[[grnt]]\n", "grnt"),
        ] {
            let err = Policy::parse(text).unwrap_err();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }
}
