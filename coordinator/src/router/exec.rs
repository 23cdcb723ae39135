//! A router behind a command the operator configured (`[routers.NAME]
//! kind = "exec"`): for any load balancer Drover does not speak to itself.
//! The command is run (never through a shell) with the operation as its
//! arguments:
//!
//! ```text
//! COMMAND set-state BACKEND SERVER ready|drain|maint
//! COMMAND set-weight BACKEND SERVER WEIGHT        (0..=256)
//! COMMAND servers BACKEND        → one line per server: NAME STATE WEIGHT
//! COMMAND in-flight BACKEND SERVER → one number (0 if it cannot tell)
//! ```
//!
//! Exit 0: done (it must be idempotent: the same call again changes
//! nothing). Exit 3: no such backend; exit 4: no such server; anything
//! else: refused, and its stderr is the reason. Each call gets 10 s.

use std::time::Duration;

use super::{Router, RouterError, ServerState, ServerView, check_name, check_weight};

/// How long one call of the hook may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Exit codes of the contract.
const NO_SUCH_BACKEND: i32 = 3;
const NO_SUCH_SERVER: i32 = 4;

pub struct ExecHook {
    command: Vec<String>,
}

impl ExecHook {
    pub fn new(command: Vec<String>) -> ExecHook {
        ExecHook { command }
    }

    /// Runs the hook with `args` (`OP BACKEND [SERVER …]`); its stdout on
    /// success.
    async fn call(&self, args: &[&str]) -> Result<String, RouterError> {
        let (backend, server) = (args.get(1).copied(), args.get(2).copied());
        check_name("backend", backend.unwrap_or_default())?;
        if let Some(server) = server {
            check_name("server", server)?;
        }
        let (program, fixed) = self
            .command
            .split_first()
            .ok_or_else(|| RouterError::Refused {
                command: args.join(" "),
                answer: "no command configured".into(),
            })?;
        let run = tokio::process::Command::new(program)
            .args(fixed)
            .args(args)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output();
        let output = match tokio::time::timeout(CALL_TIMEOUT, run).await {
            Ok(Ok(o)) => o,
            Ok(Err(e)) => {
                return Err(RouterError::Unreachable {
                    at: program.clone(),
                    why: e.to_string(),
                });
            }
            Err(_) => {
                return Err(RouterError::Refused {
                    command: args.join(" "),
                    answer: format!("{program} did not finish within {CALL_TIMEOUT:?}"),
                });
            }
        };
        match output.status.code() {
            Some(0) => Ok(String::from_utf8_lossy(&output.stdout).into_owned()),
            Some(NO_SUCH_BACKEND) => Err(RouterError::UnknownBackend(
                backend.unwrap_or_default().to_string(),
            )),
            Some(NO_SUCH_SERVER) => Err(RouterError::UnknownServer {
                backend: backend.unwrap_or_default().to_string(),
                server: server.unwrap_or_default().to_string(),
            }),
            _ => Err(RouterError::Refused {
                command: args.join(" "),
                answer: format!(
                    "{}: {}",
                    output.status,
                    String::from_utf8_lossy(&output.stderr).trim()
                ),
            }),
        }
    }
}

/// One line of `servers`: NAME STATE WEIGHT.
fn parse_server(backend: &str, line: &str) -> Option<ServerView> {
    let mut words = line.split_whitespace();
    let (name, state, weight) = (words.next()?, words.next()?, words.next()?);
    let state = match state {
        "ready" => ServerState::Ready,
        "drain" => ServerState::Drain,
        "maint" => ServerState::Maint,
        _ => return None,
    };
    Some(ServerView {
        backend: backend.to_string(),
        server: name.to_string(),
        state,
        up: true,
        weight: weight.parse().ok()?,
        address: String::new(),
    })
}

#[async_trait::async_trait]
impl Router for ExecHook {
    async fn set_state(
        &self,
        backend: &str,
        server: &str,
        state: ServerState,
    ) -> Result<(), RouterError> {
        self.call(&["set-state", backend, server, state.name()])
            .await
            .map(|_| ())
    }

    async fn set_weight(
        &self,
        backend: &str,
        server: &str,
        weight: u32,
    ) -> Result<(), RouterError> {
        check_weight(weight)?;
        let weight = weight.to_string();
        self.call(&["set-weight", backend, server, &weight])
            .await
            .map(|_| ())
    }

    async fn servers(&self, backend: &str) -> Result<Vec<ServerView>, RouterError> {
        let out = self.call(&["servers", backend]).await?;
        out.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                parse_server(backend, l).ok_or_else(|| RouterError::Refused {
                    command: format!("servers {backend}"),
                    answer: format!("not `NAME STATE WEIGHT`: {l:?}"),
                })
            })
            .collect()
    }

    async fn in_flight(&self, backend: &str, server: &str) -> Result<u64, RouterError> {
        let out = self.call(&["in-flight", backend, server]).await?;
        out.trim().parse().map_err(|_| RouterError::Refused {
            command: format!("in-flight {backend} {server}"),
            answer: format!("not a number: {:?}", out.trim()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_lines_are_name_state_weight() {
        let s = parse_server("web", "web-0-blue ready 100").unwrap();
        assert_eq!(
            (s.server.as_str(), s.state, s.weight),
            ("web-0-blue", ServerState::Ready, 100)
        );
        assert!(parse_server("web", "web-0-blue sleepy 100").is_none());
        assert!(parse_server("web", "web-0-blue ready").is_none());
    }

    #[tokio::test]
    async fn exit_codes_are_the_contract() {
        let hook = |code: i32| {
            ExecHook::new(vec![
                "sh".into(),
                "-c".into(),
                format!("echo 'it broke' >&2; exit {code}"),
                "hook".into(),
            ])
        };
        assert_eq!(
            hook(3).set_state("web", "a", ServerState::Ready).await,
            Err(RouterError::UnknownBackend("web".into()))
        );
        assert!(matches!(
            hook(4).set_state("web", "a", ServerState::Ready).await,
            Err(RouterError::UnknownServer { .. })
        ));
        let err = hook(1)
            .set_state("web", "a", ServerState::Ready)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("it broke"), "{err}");
        hook(0)
            .set_state("web", "a", ServerState::Ready)
            .await
            .unwrap();
        let missing = ExecHook::new(vec!["/no/such/hook".into()]);
        assert!(matches!(
            missing.set_state("web", "a", ServerState::Ready).await,
            Err(RouterError::Unreachable { .. })
        ));
        assert!(matches!(
            hook(0).set_state("web", "a\nb", ServerState::Ready).await,
            Err(RouterError::Refused { .. })
        ));
    }
}
