//! One coordinator and one agent, web-1, that can run the sample service:
//! the set-up of the tests of single commands and what they ask of it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::{Agent, Coordinator, TestDir, free_port, http_get_status, wait_until, wait_until_ok};

/// A coordinator and web-1 (with `extra` agent flags) that runs the
/// sample service on the returned port; connected.
pub async fn one_agent(dir: &TestDir, extra: &[&str]) -> (Coordinator, Agent, u16) {
    let coord = Coordinator::start(dir, "coord", &[]).await;
    let port = free_port();
    let agent = Agent::start_sample(dir, "web-1", &[&coord], port, extra);
    wait_until_ok("the agent", Duration::from_secs(20), || async {
        coord.host("web-1").await.is_ok()
    })
    .await;
    (coord, agent, port)
}

/// What the sample service on `port` answers on /, once it answers.
pub async fn sample_answer(port: u16) -> String {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_until(
        "the sample service to answer",
        Duration::from_secs(10),
        || async {
            match http_get_status(addr, "/").await {
                Ok((200, body)) => Ok(body),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await
}

/// Where a test writes the artifacts it builds.
pub fn artifacts_dir(dir: &TestDir) -> PathBuf {
    dir.sub("artifacts")
}
