//! The routers a coordinator's configuration declares (`[routers.NAME]`),
//! named by pipelines: a real nginx whose upstream file the coordinator
//! rewrites and reloads, and an exec hook (a script the test writes) with
//! the hook contract of `router/exec.rs`. Blue-green deploys run through
//! both with real agents.

use std::time::Duration;

use drover_tests::TestDir;
use drover_tests::blue_green::BlueGreenFleet;
use drover_tests::nginx::NginxLb;

/// A coordinator config file in `dir` declaring `routers` (TOML tables).
fn coordinator_config(dir: &TestDir, routers: &str) -> String {
    let path = dir.path().join("coordinator.toml");
    std::fs::write(&path, routers).unwrap();
    path.display().to_string()
}

/// TOML array of strings.
fn toml_array(words: &[String]) -> String {
    let quoted: Vec<String> = words.iter().map(|w| format!("{w:?}")).collect();
    format!("[{}]", quoted.join(", "))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blue_green_through_nginx_reloads_gracefully_and_drops_no_requests() {
    let dir = TestDir::new();
    let prefix = dir.sub("nginx");
    let upstream_file = prefix.join("upstreams.conf");
    // The reload command is known once nginx's paths are: the same as
    // NginxLb's (prefix, config and error log in `dir/nginx`).
    let p = prefix.display();
    let nginx = drover_tests::require_tool("nginx", "install Debian's nginx-light package");
    let reload = vec![
        nginx.display().to_string(),
        "-p".into(),
        p.to_string(),
        "-c".into(),
        format!("{p}/nginx.conf"),
        "-e".into(),
        format!("{p}/error.log"),
        "-s".into(),
        "reload".into(),
    ];
    let config = coordinator_config(
        &dir,
        &format!(
            "[routers.edge]\nkind = \"nginx\"\nupstream_file = {:?}\nreload = {}\n",
            upstream_file.display().to_string(),
            toml_array(&reload)
        ),
    );
    let bg = BlueGreenFleet::start_configured(2, &["--config", &config]).await;
    let servers: Vec<(String, u16, bool)> = bg
        .slots
        .iter()
        .enumerate()
        .flat_map(|(i, (blue, green))| {
            [
                (format!("web-{i}-blue"), *blue, true),
                (format!("web-{i}-green"), *green, false),
            ]
        })
        .collect();
    let servers: Vec<(&str, u16, bool)> = servers
        .iter()
        .map(|(n, p, r)| (n.as_str(), *p, *r))
        .collect();
    let lb = NginxLb::start(&dir, &[("web", &servers)]).await;
    assert_eq!(lb.upstream_file, upstream_file);
    assert_eq!(
        lb.reload[1..],
        reload[1..],
        "the harness reloads the same nginx"
    );
    let router = "{ name = \"edge\", backend = \"web\" }";
    bg.apply_through(router, "scale_down_delay_ms = 300", 20_000);
    let f = &bg.f;
    let deploy =
        |digest: String| tokio::task::block_in_place(|| f.deploy_through("hello-bg", &digest));
    let (code, out, err) = deploy(f.push("v1", &[]));
    assert_eq!(code, 0, "{out}\n{err}");

    // v2 under steady load through nginx: every reload is graceful.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let load = tokio::spawn(drover_tests::haproxy::steady_load(
        lb.frontends[0],
        "/version",
        stop_rx,
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (code, out, err) = deploy(f.push("v2", &[]));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = stop_tx.send(true);
    let seen = load.await.unwrap();
    assert_eq!(code, 0, "{out}\n{err}");
    eprintln!("v1 → v2 through nginx: {seen:?}");
    assert_eq!(seen.failed, 0, "{seen:?}");
    assert!(
        seen.answered.contains_key("v1") && seen.answered.contains_key("v2"),
        "{seen:?}"
    );
    let file = std::fs::read_to_string(&upstream_file).unwrap();
    assert!(file.contains("# drover: web-0-blue ready 100"), "{file}");
    assert!(
        file.contains("down; # drover: web-0-green maint 100"),
        "{file}"
    );
    for _ in 0..10 {
        let r = drover_tests::http_get_status(lb.frontends[0], "/version").await;
        assert_eq!(
            r.map(|(c, b)| (c, b.trim().to_string())),
            Ok((200, "v2".into()))
        );
    }
}

/// The hook of the exec router: keeps each server's `NAME STATE WEIGHT` in
/// the file given as its first argument and logs every call.
const HOOK: &str = r#"#!/bin/sh
set -eu
state=$1; op=$2; backend=$3
echo "$op $backend ${4:-} ${5:-}" >> "$state.log"
[ "$backend" = web ] || { echo "no backend $backend here" >&2; exit 3; }
case $op in
  servers) cat "$state" ;;
  in-flight) grep -q "^$4 " "$state" || exit 4; echo 0 ;;
  set-state) grep -q "^$4 " "$state" || exit 4; sed -i "s/^$4 [a-z]* /$4 $5 /" "$state" ;;
  set-weight) grep -q "^$4 " "$state" || exit 4; sed -i "s/^\($4 [a-z]*\) [0-9]*$/\1 $5/" "$state" ;;
  *) echo "unknown operation $op" >&2; exit 2 ;;
esac
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blue_green_through_an_exec_hook_follows_its_contract() {
    let dir = TestDir::new();
    let hook = dir.path().join("hook.sh");
    std::fs::write(&hook, HOOK).unwrap();
    let state = dir.path().join("lb-state");
    std::fs::write(
        &state,
        "web-0-blue ready 100\nweb-0-green maint 100\nweb-1-blue ready 100\nweb-1-green maint 100\n",
    )
    .unwrap();
    let command = vec![
        "/bin/sh".to_string(),
        hook.display().to_string(),
        state.display().to_string(),
    ];
    let config = coordinator_config(
        &dir,
        &format!(
            "[routers.hook]\nkind = \"exec\"\ncommand = {}\n",
            toml_array(&command)
        ),
    );
    let bg = BlueGreenFleet::start_configured(2, &["--config", &config]).await;
    let f = &bg.f;
    bg.apply_through(
        "{ name = \"hook\", backend = \"web\" }",
        "scale_down_delay_ms = 300",
        20_000,
    );
    let v1 = f.push("v1", &[]);
    let (code, out, err) = tokio::task::block_in_place(|| f.deploy_through("hello-bg", &v1));
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(
        std::fs::read_to_string(&state).unwrap(),
        "web-0-blue maint 100\nweb-0-green ready 100\nweb-1-blue maint 100\nweb-1-green ready 100\n"
    );
    let log = std::fs::read_to_string(dir.path().join("lb-state.log")).unwrap();
    let green_ready = log.find("set-state web web-0-green ready").expect(&log);
    let blue_drain = log.find("set-state web web-0-blue drain").expect(&log);
    assert!(
        green_ready < blue_drain,
        "green takes traffic before blue drains:\n{log}"
    );

    // A backend the hook does not know (exit 3): the deploy fails before
    // any slot starts, nothing moved.
    bg.apply_through(
        "{ name = \"hook\", backend = \"api\" }",
        "scale_down_delay_ms = 300",
        20_000,
    );
    let v2 = f.push("v2", &[]);
    let (code, _, _) = tokio::task::block_in_place(|| f.deploy_through("hello-bg", &v2));
    assert_ne!(code, 0);
    let d = f.coord.latest_deploy("hello-bg").await;
    assert!(
        d.reason.contains("the router has no backend \"api\""),
        "{}",
        d.reason
    );
    assert_eq!(bg.slot_starts(0, "blue", "v2"), 0, "no slot started");
    // A router no configuration declares.
    bg.apply_through(
        "{ name = \"nowhere\", backend = \"web\" }",
        "scale_down_delay_ms = 300",
        20_000,
    );
    let (code, _, _) = tokio::task::block_in_place(|| f.deploy_through("hello-bg", &v2));
    assert_ne!(code, 0);
    let d = f.coord.latest_deploy("hello-bg").await;
    assert!(
        d.reason.contains("no router named \"nowhere\""),
        "{}",
        d.reason
    );
    assert!(
        std::fs::read_to_string(&state)
            .unwrap()
            .contains("web-0-green ready 100")
    );
}
