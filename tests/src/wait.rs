//! Waiting for a condition, with a deadline.

use std::future::Future;
use std::time::Duration;

const POLL: Duration = Duration::from_millis(25);

/// Polls `check` until it returns `Some`, or panics after `timeout` naming
/// `what` and the last observation.
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match check().await {
            Ok(v) => return v,
            Err(last) if tokio::time::Instant::now() >= deadline => {
                panic!("timed out after {timeout:?} waiting for {what}; last seen: {last}")
            }
            Err(_) => tokio::time::sleep(POLL).await,
        }
    }
}

/// Like [`wait_until`] for a boolean condition.
pub async fn wait_until_ok<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_until(what, timeout, || {
        let fut = check();
        async move {
            if fut.await {
                Ok(())
            } else {
                Err("condition false".to_string())
            }
        }
    })
    .await
}
