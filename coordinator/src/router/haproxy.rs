//! HAProxy through its runtime API: one command per connection (the API
//! answers and closes), text in, text out.
//!
//! 1. A command is one line; success is an empty answer. "No such
//!    backend.", "Can't find backend." and "No such server." are told
//!    apart ([`RouterError`]); anything else is a refusal, quoted.
//! 2. Names are checked before they are sent: a backend or server name is
//!    what HAProxy's configuration allows (letters, digits, `-_.:`), so no
//!    input can smuggle a second command into the line.
//! 3. `show servers state <backend>` is read by its header line, not by
//!    column positions, so a newer HAProxy with more columns still parses.
//! 4. Every exchange has a deadline; a router that does not answer is
//!    unreachable, and nothing is retried here (the deploy engine decides).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{Router, RouterError, ServerState, ServerView, check_name, check_server, check_weight};

/// How long one exchange with the runtime API may take.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest answer read (a `show servers state` of a big backend).
const MAX_ANSWER: usize = 8 << 20;

/// Where HAProxy's runtime API listens: `stats socket` in its global
/// section, at `level admin`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuntimeAddr {
    /// A unix socket path.
    Unix(std::path::PathBuf),
    /// A TCP address, "host:port".
    Tcp(String),
}

impl std::fmt::Display for RuntimeAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RuntimeAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            RuntimeAddr::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

impl std::str::FromStr for RuntimeAddr {
    type Err = String;

    /// "unix:/run/haproxy/admin.sock", "tcp:127.0.0.1:9999", or a bare
    /// absolute path.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            return Ok(RuntimeAddr::Unix(path.into()));
        }
        if let Some(addr) = s.strip_prefix("tcp:") {
            return Ok(RuntimeAddr::Tcp(addr.to_string()));
        }
        if s.starts_with('/') {
            return Ok(RuntimeAddr::Unix(s.into()));
        }
        Err(format!(
            "{s:?} is not a runtime API address (unix:/path/to/admin.sock or tcp:host:port)"
        ))
    }
}

/// HAProxy, driven through its runtime API.
#[derive(Debug, Clone)]
pub struct Haproxy {
    addr: RuntimeAddr,
}

impl Haproxy {
    pub fn new(addr: RuntimeAddr) -> Haproxy {
        Haproxy { addr }
    }

    /// Sends one command and returns the answer (rule 4).
    async fn exchange(&self, command: &str) -> Result<String, RouterError> {
        let unreachable = |why: String| RouterError::Unreachable {
            at: self.addr.to_string(),
            why,
        };
        let line = format!("{command}\n");
        let talk = async {
            let answer = match &self.addr {
                RuntimeAddr::Unix(path) => {
                    say(tokio::net::UnixStream::connect(path).await?, &line).await?
                }
                RuntimeAddr::Tcp(addr) => {
                    say(tokio::net::TcpStream::connect(addr).await?, &line).await?
                }
            };
            Ok::<_, std::io::Error>(String::from_utf8_lossy(&answer).into_owned())
        };
        match tokio::time::timeout(EXCHANGE_TIMEOUT, talk).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(e)) => Err(unreachable(e.to_string())),
            Err(_) => Err(unreachable(format!(
                "no answer within {EXCHANGE_TIMEOUT:?}"
            ))),
        }
    }

    /// Runs a command whose success is an empty answer (rule 1).
    async fn command(&self, command: &str, backend: &str, server: &str) -> Result<(), RouterError> {
        let answer = self.exchange(command).await?;
        refusal(&answer, command, backend, server).map_or(Ok(()), Err)
    }
}

/// Writes `line` and reads the answer to its end (at most [`MAX_ANSWER`]).
async fn say<S>(mut stream: S, line: &str) -> std::io::Result<Vec<u8>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    stream.write_all(line.as_bytes()).await?;
    let mut answer = Vec::new();
    (&mut stream)
        .take(MAX_ANSWER as u64)
        .read_to_end(&mut answer)
        .await?;
    Ok(answer)
}

/// What an answer says went wrong, if anything (rule 1).
fn refusal(answer: &str, command: &str, backend: &str, server: &str) -> Option<RouterError> {
    let text = answer.trim();
    match text {
        "" => None,
        "No such backend." | "Can't find backend." => {
            Some(RouterError::UnknownBackend(backend.to_string()))
        }
        "No such server." => Some(RouterError::UnknownServer {
            backend: backend.to_string(),
            server: server.to_string(),
        }),
        _ => Some(RouterError::Refused {
            command: command.to_string(),
            answer: text.to_string(),
        }),
    }
}

/// The servers in a `show servers state` answer (rule 3).
fn parse_servers_state(answer: &str) -> Result<Vec<ServerView>, String> {
    let mut lines = answer.lines().filter(|l| !l.trim().is_empty());
    let version = lines.next().ok_or("an empty answer")?;
    if version.trim() != "1" {
        return Err(format!("unknown servers-state format {version:?}"));
    }
    let header: Vec<&str> = lines
        .next()
        .and_then(|h| h.strip_prefix('#'))
        .ok_or("no header line")?
        .split_whitespace()
        .collect();
    let column = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .ok_or_else(|| format!("no {name} column"))
    };
    let (be, srv, addr, port, op, admin, weight) = (
        column("be_name")?,
        column("srv_name")?,
        column("srv_addr")?,
        column("srv_port")?,
        column("srv_op_state")?,
        column("srv_admin_state")?,
        column("srv_uweight")?,
    );
    lines
        .map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let get = |i: usize| f.get(i).copied().ok_or(format!("short line {line:?}"));
            let num = |i: usize| -> Result<u32, String> {
                get(i)?.parse::<u32>().map_err(|e| format!("{line:?}: {e}"))
            };
            // SRV_ADMF_*: any maintenance bit (forced, inherited, from
            // configuration, DNS, hostname) is MAINT; else a drain bit.
            let admin_bits = num(admin)?;
            let state = if admin_bits & (0x01 | 0x02 | 0x04 | 0x20 | 0x40) != 0 {
                ServerState::Maint
            } else if admin_bits & (0x08 | 0x10) != 0 {
                ServerState::Drain
            } else {
                ServerState::Ready
            };
            Ok(ServerView {
                backend: get(be)?.to_string(),
                server: get(srv)?.to_string(),
                state,
                // SRV_ST_RUNNING (2) or starting (1, slow start).
                up: matches!(num(op)?, 1 | 2),
                weight: num(weight)?,
                address: format!("{}:{}", get(addr)?, get(port)?),
            })
        })
        .collect()
}

/// The current sessions (`scur`) of `server` in a `show stat` answer
/// (CSV, read by its header line).
fn parse_in_flight(answer: &str, backend: &str, server: &str) -> Result<Option<u64>, String> {
    let mut lines = answer.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<&str> = lines
        .next()
        .and_then(|h| h.strip_prefix("# "))
        .ok_or("no header line")?
        .split(',')
        .collect();
    let column = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .ok_or_else(|| format!("no {name} column"))
    };
    let (px, sv, scur) = (column("pxname")?, column("svname")?, column("scur")?);
    for line in lines {
        let f: Vec<&str> = line.split(',').collect();
        if f.get(px) == Some(&backend) && f.get(sv) == Some(&server) {
            let v = f.get(scur).ok_or(format!("short line {line:?}"))?;
            return v.parse().map(Some).map_err(|e| format!("{line:?}: {e}"));
        }
    }
    Ok(None)
}

#[async_trait::async_trait]
impl Router for Haproxy {
    async fn set_state(
        &self,
        backend: &str,
        server: &str,
        state: ServerState,
    ) -> Result<(), RouterError> {
        check_server(backend, server)?;
        let command = format!("set server {backend}/{server} state {}", state.name());
        self.command(&command, backend, server).await
    }

    async fn set_weight(
        &self,
        backend: &str,
        server: &str,
        weight: u32,
    ) -> Result<(), RouterError> {
        check_server(backend, server)?;
        check_weight(weight)?;
        let command = format!("set server {backend}/{server} weight {weight}");
        self.command(&command, backend, server).await
    }

    async fn servers(&self, backend: &str) -> Result<Vec<ServerView>, RouterError> {
        check_name("backend", backend)?;
        let command = format!("show servers state {backend}");
        let answer = self.exchange(&command).await?;
        if let Some(e) =
            refusal(&answer, &command, backend, "").filter(|_| !answer.starts_with('1'))
        {
            return Err(e);
        }
        parse_servers_state(&answer).map_err(|why| RouterError::Refused {
            command,
            answer: why,
        })
    }

    async fn in_flight(&self, backend: &str, server: &str) -> Result<u64, RouterError> {
        check_server(backend, server)?;
        // Servers only (type 4), every proxy: filtered here by name.
        let command = "show stat -1 4 -1".to_string();
        let answer = self.exchange(&command).await?;
        match parse_in_flight(&answer, backend, server) {
            Ok(Some(n)) => Ok(n),
            Ok(None) => Err(RouterError::UnknownServer {
                backend: backend.to_string(),
                server: server.to_string(),
            }),
            Err(why) => Err(RouterError::Refused {
                command,
                answer: why,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What HAProxy 2.6 answers (trimmed to the columns that matter, in
    /// another order, and one more column, as a newer version might).
    const STATE: &str = "1\n# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight srv_port future_column\n\
        3 web 1 blue 127.0.0.1 2 0 100 100 18081 x\n\
        3 web 2 green 127.0.0.1 2 8 7 0 18082 x\n\
        3 web 3 old 127.0.0.1 0 1 0 0 18083 x\n\n";

    #[test]
    fn servers_state_is_read_by_its_header() {
        let servers = parse_servers_state(STATE).unwrap();
        let brief: Vec<(&str, ServerState, bool, u32, &str)> = servers
            .iter()
            .map(|s| {
                (
                    s.server.as_str(),
                    s.state,
                    s.up,
                    s.weight,
                    s.address.as_str(),
                )
            })
            .collect();
        assert_eq!(
            brief,
            [
                ("blue", ServerState::Ready, true, 100, "127.0.0.1:18081"),
                ("green", ServerState::Drain, true, 7, "127.0.0.1:18082"),
                ("old", ServerState::Maint, false, 0, "127.0.0.1:18083"),
            ]
        );
        assert!(parse_servers_state("2\n# be_name\n").is_err());
        assert!(parse_servers_state("1\n# be_name srv_name\n3 web\n").is_err());
    }

    #[test]
    fn in_flight_is_read_from_show_stat_by_its_header() {
        let stat = "# pxname,svname,qcur,qmax,scur,smax\nweb,blue,0,0,3,9\nweb,green,0,0,0,1\n\n";
        assert_eq!(parse_in_flight(stat, "web", "blue"), Ok(Some(3)));
        assert_eq!(parse_in_flight(stat, "web", "green"), Ok(Some(0)));
        assert_eq!(parse_in_flight(stat, "web", "purple"), Ok(None));
        assert!(parse_in_flight("oops", "web", "blue").is_err());
    }

    #[test]
    fn answers_are_told_apart_and_names_cannot_carry_commands() {
        assert_eq!(refusal("\n", "c", "web", "blue"), None);
        assert_eq!(
            refusal("No such server.\n\n", "c", "web", "blue"),
            Some(RouterError::UnknownServer {
                backend: "web".into(),
                server: "blue".into()
            })
        );
        assert_eq!(
            refusal("Can't find backend.\n", "c", "web", ""),
            Some(RouterError::UnknownBackend("web".into()))
        );
        assert!(matches!(
            refusal("Permission denied\n", "c", "web", "blue"),
            Some(RouterError::Refused { .. })
        ));
        assert!(check_name("backend", "web-eu_1.a:b").is_ok());
        for bad in ["", "web\nshutdown sessions", "a b", "web/x", "web;x"] {
            assert!(check_name("backend", bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            "unix:/run/h.sock".parse::<RuntimeAddr>(),
            Ok(RuntimeAddr::Unix("/run/h.sock".into()))
        );
        assert_eq!(
            "tcp:127.0.0.1:9999".parse::<RuntimeAddr>(),
            Ok(RuntimeAddr::Tcp("127.0.0.1:9999".into()))
        );
        assert!("haproxy.sock".parse::<RuntimeAddr>().is_err());
    }
}
