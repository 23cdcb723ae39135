//! The behaviour every Store backend must have; each backend's tests call
//! [`run`].

use std::time::Duration;

use tokio_stream::StreamExt;

use super::{Compare, Op, Store, StoreError, Txn, WatchEvent};

pub async fn run(store: &dyn Store) {
    // Puts bump the revision; create_revision stays, mod_revision moves.
    let r1 = store
        .txn(Txn {
            success: vec![Op::put("/p/a", "1")],
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(r1.succeeded);
    let r2 = store
        .txn(Txn {
            success: vec![Op::put("/p/a", "2"), Op::put("/p/b", "x")],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(r2.revision, r1.revision + 1, "one revision per transaction");
    let a = store.get("/p/a").await.unwrap().unwrap();
    assert_eq!(
        (a.create_revision, a.mod_revision, a.value.as_slice()),
        (r1.revision, r2.revision, &b"2"[..])
    );

    // Compare-and-swap: a stale mod revision fails and applies the failure branch.
    let stale = store
        .txn(Txn {
            compares: vec![Compare::ModRevision("/p/a".into(), r1.revision)],
            success: vec![Op::put("/p/a", "3")],
            failure: vec![Op::put("/p/failed", "yes")],
        })
        .await
        .unwrap();
    assert!(!stale.succeeded);
    assert_eq!(store.get("/p/a").await.unwrap().unwrap().value, b"2");
    assert!(store.get("/p/failed").await.unwrap().is_some());
    let fresh = store
        .txn(Txn {
            compares: vec![
                Compare::ModRevision("/p/a".into(), r2.revision),
                Compare::CreateRevision("/p/a".into(), r1.revision),
                Compare::Exists("/p/b".into()),
                Compare::Missing("/p/none".into()),
                Compare::Value("/p/b".into(), b"x".to_vec()),
            ],
            success: vec![Op::put("/p/a", "3")],
            failure: vec![],
        })
        .await
        .unwrap();
    assert!(fresh.succeeded);
    // A failed compare with no failure ops changes nothing, not even the revision.
    let before = store.range("/").await.unwrap().1;
    let noop = store
        .txn(Txn {
            compares: vec![Compare::Missing("/p/a".into())],
            success: vec![Op::put("/p/z", "z")],
            failure: vec![],
        })
        .await
        .unwrap();
    assert!(!noop.succeeded);
    assert_eq!(store.range("/").await.unwrap().1, before);

    // Prefix reads are sorted and exact about the prefix.
    store
        .txn(Txn {
            success: vec![Op::put("/pa/other", "o")],
            ..Default::default()
        })
        .await
        .unwrap();
    let (kvs, _) = store.range("/p/").await.unwrap();
    let keys: Vec<&str> = kvs.iter().map(|k| k.key.as_str()).collect();
    assert_eq!(keys, ["/p/a", "/p/b", "/p/failed"]);

    // Watches see puts and deletes under their prefix only.
    let mut watch = store.watch("/w/").await.unwrap();
    store
        .txn(Txn {
            success: vec![Op::put("/w/1", "a"), Op::put("/x/1", "b")],
            ..Default::default()
        })
        .await
        .unwrap();
    store
        .txn(Txn {
            success: vec![Op::DeletePrefix("/w/".into())],
            ..Default::default()
        })
        .await
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        matches!(first, WatchEvent::Put(ref kv) if kv.key == "/w/1"),
        "{first:?}"
    );
    let second = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        matches!(second, WatchEvent::Delete { ref key, .. } if key == "/w/1"),
        "{second:?}"
    );

    watches_keep_revision_order_and_never_skip(store).await;

    // Leases: keys die with them; keep-alive extends; expiry ends them.
    let lease = store.grant_lease(Duration::from_millis(300)).await.unwrap();
    store
        .txn(Txn {
            success: vec![Op::Put {
                key: "/l/k".into(),
                value: b"v".to_vec(),
                lease,
            }],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(store.get("/l/k").await.unwrap().unwrap().lease, lease);
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        store.keep_alive(lease).await.unwrap();
    }
    assert!(
        store.get("/l/k").await.unwrap().is_some(),
        "kept alive past its TTL"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while store.get("/l/k").await.unwrap().is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the lease expired and took its key"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(matches!(
        store.keep_alive(lease).await,
        Err(StoreError::NoLease(_))
    ));
    let gone = store
        .txn(Txn {
            success: vec![Op::Put {
                key: "/l/k2".into(),
                value: b"v".to_vec(),
                lease,
            }],
            ..Default::default()
        })
        .await;
    assert!(
        matches!(gone, Err(StoreError::NoLease(_))),
        "no puts on an ended lease"
    );
    let lease2 = store.grant_lease(Duration::from_secs(60)).await.unwrap();
    store
        .txn(Txn {
            success: vec![Op::Put {
                key: "/l/k3".into(),
                value: b"v".to_vec(),
                lease: lease2,
            }],
            ..Default::default()
        })
        .await
        .unwrap();
    // Compare on the lease a key is bound to.
    let bound = |lease| Txn {
        compares: vec![Compare::Lease("/l/k3".into(), lease)],
        success: vec![Op::put("/l/probe", "x")],
        ..Default::default()
    };
    assert!(store.txn(bound(lease2)).await.unwrap().succeeded);
    assert!(!store.txn(bound(lease2 + 1)).await.unwrap().succeeded);
    store.revoke(lease2).await.unwrap();
    assert!(
        store.get("/l/k3").await.unwrap().is_none(),
        "revoke deletes the lease's keys"
    );
}

/// Writers at once: a watcher sees their changes in revision order. A
/// watcher that does not read while 5,000 changes are made gets every one
/// of them in order, or all of them up to a point and then
/// [`StoreError::Lagged`] naming a revision at or before that point: never
/// a gap. Returns whether it lagged.
pub async fn watches_keep_revision_order_and_never_skip(store: &dyn Store) -> bool {
    let mut watch = store.watch("/o/").await.unwrap();
    let writer = |w: usize| async move {
        for i in 0..25 {
            store
                .txn(Txn {
                    success: vec![Op::put(format!("/o/{w}/{i}"), "x")],
                    ..Default::default()
                })
                .await
                .unwrap();
        }
    };
    tokio::join!(writer(0), writer(1), writer(2), writer(3));
    let mut last = 0;
    for _ in 0..100 {
        let e = tokio::time::timeout(Duration::from_secs(5), watch.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(e.revision() > last, "{} after {last}", e.revision());
        last = e.revision();
    }

    let (_, start) = store.range("/lag/").await.unwrap();
    let mut slow = store.watch("/lag/").await.unwrap();
    for t in 0..50 {
        store
            .txn(Txn {
                success: (0..100)
                    .map(|i| Op::put(format!("/lag/{:05}", t * 100 + i), "x"))
                    .collect(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let mut delivered: Vec<(String, u64)> = Vec::new();
    let lagged = loop {
        if delivered.len() == 5000 {
            break None;
        }
        match tokio::time::timeout(Duration::from_secs(10), slow.next()).await {
            Ok(Some(Ok(e))) => delivered.push((e.key().to_string(), e.revision())),
            Ok(Some(Err(StoreError::Lagged { after }))) => break Some(after),
            other => panic!("after {} events: {other:?}", delivered.len()),
        }
    };
    for (n, (key, _)) in delivered.iter().enumerate() {
        assert_eq!(key, &format!("/lag/{n:05}"), "no gap, in order");
    }
    if let Some(after) = lagged {
        let last = delivered.last().map_or(start, |(_, r)| *r);
        assert!(
            after >= start && after <= last,
            "re-read from {} though {last} was the last delivered",
            after + 1
        );
        assert!(
            slow.next().await.is_none(),
            "a lagged watch ends after its error"
        );
    }
    lagged.is_some()
}
