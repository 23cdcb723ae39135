//! nginx as a router: an upstream file the coordinator rewrites, then
//! nginx reloaded. nginx (open source) has no runtime API, but its reload
//! is graceful: new workers take new connections with the new upstreams,
//! old workers finish the requests they have. So a drained server is
//! simply left out (`down`), and nothing is ever in flight for us to wait
//! on.
//!
//! The file holds `upstream` blocks whose server lines carry the server's
//! name and state in a trailing comment, which is how it is read back:
//!
//! ```text
//! upstream web {
//!     server 127.0.0.1:8081 weight=100; # drover: web-0-blue ready 100
//!     server 127.0.0.1:8082 weight=100 down; # drover: web-0-green maint 100
//! }
//! ```
//!
//! Lines without a `# drover:` comment are kept as they are. Every change
//! is one atomic rewrite (temp file, rename) and one reload; a reload that
//! fails puts the previous file back (and reloads it), so nginx and the
//! file never disagree. Changes to one file are serialized in this
//! process.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use super::{Router, RouterError, ServerState, ServerView, check_server, check_weight};

/// How long a reload may take.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct Nginx {
    file: PathBuf,
    reload: Vec<String>,
}

/// One server line of the file, as read.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Line {
    backend: String,
    name: String,
    address: String,
    state: ServerState,
    weight: u32,
}

impl Line {
    /// The line as written: `down` unless ready with a weight (nginx
    /// weights start at 1, so weight 0 is `down` too).
    fn render(&self) -> String {
        let down = if self.state != ServerState::Ready || self.weight == 0 {
            " down"
        } else {
            ""
        };
        format!(
            "    server {} weight={}{down}; # drover: {} {} {}",
            self.address,
            self.weight.max(1),
            self.name,
            self.state.name(),
            self.weight
        )
    }
}

/// The file's lines, each a server of ours or text kept as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    Server(Line),
    Text(String),
}

/// Reads `text`: every line, the servers ours.
fn parse(text: &str) -> Result<Vec<Entry>, String> {
    let mut out = Vec::new();
    let mut backend: Option<String> = None;
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if let Some(rest) = line.strip_prefix("upstream ") {
            backend = Some(rest.trim_end_matches('{').trim().to_string());
        } else if line == "}" {
            backend = None;
        }
        let Some((server, comment)) = line.split_once("# drover:") else {
            out.push(Entry::Text(raw.to_string()));
            continue;
        };
        let bad = |why: &str| format!("line {}: {why}: {raw:?}", n + 1);
        let backend = backend
            .clone()
            .ok_or_else(|| bad("a server outside an upstream block"))?;
        let address = server
            .trim()
            .strip_prefix("server ")
            .and_then(|s| s.split_whitespace().next())
            .map(|a| a.trim_end_matches(';').to_string())
            .ok_or_else(|| bad("not a server line"))?;
        let words: Vec<&str> = comment.split_whitespace().collect();
        let [name, state, weight] = words[..] else {
            return Err(bad("the drover comment is not `NAME STATE WEIGHT`"));
        };
        let state = match state {
            "ready" => ServerState::Ready,
            "drain" => ServerState::Drain,
            "maint" => ServerState::Maint,
            _ => return Err(bad("unknown state")),
        };
        let weight = weight
            .parse()
            .map_err(|_| bad("the weight is not a number"))?;
        out.push(Entry::Server(Line {
            backend,
            name: name.to_string(),
            address,
            state,
            weight,
        }));
    }
    Ok(out)
}

fn render(entries: &[Entry]) -> String {
    let mut out = String::new();
    for e in entries {
        match e {
            Entry::Server(l) => out.push_str(&l.render()),
            Entry::Text(t) => out.push_str(t),
        }
        out.push('\n');
    }
    out
}

/// The lock of `file` in this process (every change is read, modify,
/// write, reload).
fn lock_of(file: &Path) -> Arc<Mutex<()>> {
    static LOCKS: OnceLock<Mutex<HashMap<PathBuf, Arc<Mutex<()>>>>> = OnceLock::new();
    LOCKS
        .get_or_init(Default::default)
        .lock()
        .expect("nginx locks")
        .entry(file.to_path_buf())
        .or_default()
        .clone()
}

impl Nginx {
    pub fn new(file: PathBuf, reload: Vec<String>) -> Nginx {
        Nginx { file, reload }
    }

    fn unreachable(&self, why: impl std::fmt::Display) -> RouterError {
        RouterError::Unreachable {
            at: self.file.display().to_string(),
            why: why.to_string(),
        }
    }

    fn read(&self) -> Result<Vec<Entry>, RouterError> {
        let text = std::fs::read_to_string(&self.file).map_err(|e| self.unreachable(e))?;
        parse(&text).map_err(|why| RouterError::Refused {
            command: format!("reading {}", self.file.display()),
            answer: why,
        })
    }

    /// Changes `server` of `backend` with `change`, writes the file and
    /// reloads nginx; nothing changes when the server is already so.
    fn change(
        &self,
        backend: &str,
        server: &str,
        change: impl Fn(&mut Line),
    ) -> Result<(), RouterError> {
        check_server(backend, server)?;
        let lock = lock_of(&self.file);
        let _held = lock.lock().expect("nginx file lock");
        let before = std::fs::read_to_string(&self.file).map_err(|e| self.unreachable(e))?;
        let mut entries = self.read()?;
        if !entries
            .iter()
            .any(|e| matches!(e, Entry::Server(l) if l.backend == backend))
        {
            return Err(RouterError::UnknownBackend(backend.to_string()));
        }
        let Some(line) = entries.iter_mut().find_map(|e| match e {
            Entry::Server(l) if l.backend == backend && l.name == server => Some(l),
            _ => None,
        }) else {
            return Err(RouterError::UnknownServer {
                backend: backend.to_string(),
                server: server.to_string(),
            });
        };
        let was = line.clone();
        change(line);
        if *line == was {
            return Ok(()); // idempotent: no rewrite, no reload
        }
        self.write(&render(&entries))?;
        if let Err(e) = self.run_reload() {
            // Put nginx and the file back where they were.
            let _ = self.write(&before);
            let _ = self.run_reload();
            return Err(e);
        }
        Ok(())
    }

    fn write(&self, text: &str) -> Result<(), RouterError> {
        let tmp = self.file.with_extension("drover-tmp");
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, &self.file))
            .map_err(|e| self.unreachable(e))
    }

    /// Runs the reload command; its failure says what it printed.
    fn run_reload(&self) -> Result<(), RouterError> {
        let (program, args) = self
            .reload
            .split_first()
            .ok_or_else(|| RouterError::Refused {
                command: "reload".into(),
                answer: "no reload command configured".into(),
            })?;
        let mut child = std::process::Command::new(program)
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| RouterError::Unreachable {
                at: program.clone(),
                why: e.to_string(),
            })?;
        let deadline = std::time::Instant::now() + RELOAD_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(()),
                Ok(Some(status)) => {
                    let mut err = String::new();
                    if let Some(mut e) = child.stderr.take() {
                        use std::io::Read;
                        let _ = e.read_to_string(&mut err);
                    }
                    return Err(RouterError::Refused {
                        command: self.reload.join(" "),
                        answer: format!("{status}: {}", err.trim()),
                    });
                }
                Ok(None) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                _ => {
                    let _ = child.kill();
                    return Err(RouterError::Refused {
                        command: self.reload.join(" "),
                        answer: format!("did not finish within {RELOAD_TIMEOUT:?}"),
                    });
                }
            }
        }
    }
}

/// Runs a blocking file-and-reload operation off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, RouterError> + Send + 'static,
) -> Result<T, RouterError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(RouterError::Refused {
            command: "nginx".into(),
            answer: e.to_string(),
        })
    })
}

#[async_trait::async_trait]
impl Router for Nginx {
    async fn set_state(
        &self,
        backend: &str,
        server: &str,
        state: ServerState,
    ) -> Result<(), RouterError> {
        let (this, backend, server) = (self.clone(), backend.to_string(), server.to_string());
        blocking(move || this.change(&backend, &server, |l| l.state = state)).await
    }

    async fn set_weight(
        &self,
        backend: &str,
        server: &str,
        weight: u32,
    ) -> Result<(), RouterError> {
        check_weight(weight)?;
        let (this, backend, server) = (self.clone(), backend.to_string(), server.to_string());
        blocking(move || this.change(&backend, &server, |l| l.weight = weight)).await
    }

    async fn servers(&self, backend: &str) -> Result<Vec<ServerView>, RouterError> {
        let entries = self.read()?;
        let servers: Vec<ServerView> = entries
            .into_iter()
            .filter_map(|e| match e {
                Entry::Server(l) if l.backend == backend => Some(ServerView {
                    backend: l.backend,
                    server: l.name,
                    state: l.state,
                    up: true,
                    weight: l.weight,
                    address: l.address,
                }),
                _ => None,
            })
            .collect();
        if servers.is_empty() {
            return Err(RouterError::UnknownBackend(backend.to_string()));
        }
        Ok(servers)
    }

    /// nginx's reload lets old workers finish their requests: nothing is
    /// left for a drain to wait on.
    async fn in_flight(&self, backend: &str, server: &str) -> Result<u64, RouterError> {
        let servers = self.servers(backend).await?;
        if !servers.iter().any(|s| s.server == server) {
            return Err(RouterError::UnknownServer {
                backend: backend.to_string(),
                server: server.to_string(),
            });
        }
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "# written by hand\nupstream web {\n    server 127.0.0.1:8081 weight=100; # drover: web-0-blue ready 100\n    server 127.0.0.1:8082 weight=1 down; # drover: web-0-green maint 0\n    keepalive 8;\n}\n";

    #[test]
    fn the_file_reads_and_renders_back_the_same() {
        let entries = parse(FILE).unwrap();
        assert_eq!(render(&entries), FILE);
        let servers: Vec<&Line> = entries
            .iter()
            .filter_map(|e| match e {
                Entry::Server(l) => Some(l),
                _ => None,
            })
            .collect();
        assert_eq!(servers.len(), 2);
        assert_eq!(
            (
                servers[1].name.as_str(),
                servers[1].state,
                servers[1].weight
            ),
            ("web-0-green", ServerState::Maint, 0)
        );
        assert_eq!(servers[0].address, "127.0.0.1:8081");
    }

    #[test]
    fn drained_and_weightless_servers_are_down_and_bad_lines_are_named() {
        let mut l = Line {
            backend: "web".into(),
            name: "a".into(),
            address: "127.0.0.1:1".into(),
            state: ServerState::Drain,
            weight: 5,
        };
        assert!(l.render().contains("weight=5 down;"), "{}", l.render());
        l.state = ServerState::Ready;
        assert!(l.render().contains("weight=5; #"), "{}", l.render());
        l.weight = 0;
        assert!(l.render().contains("weight=1 down;"), "{}", l.render());
        let err = parse("upstream web {\n    server x; # drover: a sleepy 1\n}\n").unwrap_err();
        assert!(err.starts_with("line 2: unknown state"), "{err}");
        let err = parse("    server x; # drover: a ready 1\n").unwrap_err();
        assert!(err.contains("outside an upstream block"), "{err}");
    }

    #[tokio::test]
    async fn a_failed_reload_puts_the_file_back() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("upstreams.conf");
        std::fs::write(&file, FILE).unwrap();
        let failing = Nginx::new(file.clone(), vec!["false".into()]);
        let err = failing
            .set_state("web", "web-0-green", ServerState::Ready)
            .await
            .unwrap_err();
        assert!(matches!(err, RouterError::Refused { .. }), "{err}");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), FILE);
        let ok = Nginx::new(file.clone(), vec!["true".into()]);
        ok.set_state("web", "web-0-green", ServerState::Ready)
            .await
            .unwrap();
        let servers = ok.servers("web").await.unwrap();
        assert_eq!(servers[1].state, ServerState::Ready);
        assert_eq!(
            ok.set_state("api", "x", ServerState::Ready).await,
            Err(RouterError::UnknownBackend("api".into()))
        );
        assert!(matches!(
            ok.set_state("web", "nope", ServerState::Ready).await,
            Err(RouterError::UnknownServer { .. })
        ));
    }
}
