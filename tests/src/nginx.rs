//! A real nginx on loopback for router tests: one HTTP frontend per
//! upstream, proxying without retries (a request sent to a server that is
//! down fails, as its client would see), the upstreams in a file of their
//! own written in the format the coordinator's nginx router keeps
//! (`router/nginx.rs`), and the reload command that router runs. Stopped
//! when dropped.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::{ChildGuard, TestDir, free_port, http_get_status, require_tool, wait_until};

/// An upstream server: name, loopback port, ready (else `down`).
pub type Server<'a> = (&'a str, u16, bool);

pub struct NginxLb {
    /// The upstream file the router rewrites.
    pub upstream_file: PathBuf,
    /// The command that reloads this nginx (for `[routers.NAME] reload`).
    pub reload: Vec<String>,
    /// Each upstream's frontend, in the order given.
    pub frontends: Vec<SocketAddr>,
    _child: ChildGuard,
}

impl NginxLb {
    /// Starts nginx in `dir/nginx` with `upstreams` (name, servers: name,
    /// loopback port, ready) and waits until every frontend answers.
    pub async fn start(dir: &TestDir, upstreams: &[(&str, &[Server<'_>])]) -> NginxLb {
        let bin = require_tool("nginx", "install Debian's nginx-light package");
        let prefix = dir.sub("nginx");
        let upstream_file = prefix.join("upstreams.conf");
        let mut file = String::new();
        let mut servers_conf = String::new();
        let mut frontends = Vec::new();
        for (name, servers) in upstreams {
            file.push_str(&format!("upstream {name} {{\n"));
            for (server, port, ready) in *servers {
                let (down, state) = if *ready {
                    ("", "ready")
                } else {
                    (" down", "maint")
                };
                file.push_str(&format!(
                    "    server 127.0.0.1:{port} weight=100{down}; # drover: {server} {state} 100\n"
                ));
            }
            file.push_str("}\n");
            let port = free_port();
            frontends.push(SocketAddr::from(([127, 0, 0, 1], port)));
            servers_conf.push_str(&format!(
                "  server {{ listen 127.0.0.1:{port}; location / {{ proxy_pass http://{name}; proxy_next_upstream off; }} }}\n"
            ));
        }
        std::fs::write(&upstream_file, file).expect("writing the upstream file");
        let p = prefix.display();
        let conf = prefix.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "daemon off;\nworker_processes 1;\npid {p}/nginx.pid;\nerror_log {p}/error.log;\n\
                 events {{ worker_connections 512; }}\n\
                 http {{\n  access_log off;\n  client_body_temp_path {p}/body;\n  proxy_temp_path {p}/proxy;\n\
                 fastcgi_temp_path {p}/fastcgi;\n  uwsgi_temp_path {p}/uwsgi;\n  scgi_temp_path {p}/scgi;\n\
                 include {};\n{servers_conf}}}\n",
                upstream_file.display()
            ),
        )
        .expect("writing nginx.conf");
        let base = [
            "-p".to_string(),
            prefix.display().to_string(),
            "-c".to_string(),
            conf.display().to_string(),
            "-e".to_string(),
            prefix.join("error.log").display().to_string(),
        ];
        let mut cmd = std::process::Command::new(&bin);
        cmd.args(&base);
        let child = ChildGuard::spawn("nginx", cmd, &dir.path().join("nginx.log"));
        let mut reload = vec![bin.display().to_string()];
        reload.extend(base.iter().cloned());
        reload.extend(["-s".to_string(), "reload".to_string()]);
        let lb = NginxLb {
            upstream_file,
            reload,
            frontends,
            _child: child,
        };
        for fe in &lb.frontends {
            let fe = *fe;
            wait_until("nginx's frontend", Duration::from_secs(20), || async move {
                http_get_status(fe, "/").await.map(|_| ())
            })
            .await;
        }
        wait_until("nginx's pid file", Duration::from_secs(20), || async {
            std::fs::metadata(prefix.join("nginx.pid"))
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
        .await;
        lb
    }
}
