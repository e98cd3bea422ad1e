//! Issue 14, item 3: storage is bounded. Invocation records go by age and
//! size (their usage rolled up first); a full disk refuses writes clearly,
//! keeps deletes working and leaves nothing half-written.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use http::Method;

use crate::harness::{TestNode, invocation_id};
use crate::wat;

async fn usage(n: &TestNode) -> u64 {
    n.api(Method::GET, "/v1/usage?by=function", None)
        .await
        .json()["total"]["invocations"]
        .as_u64()
        .unwrap_or(0)
}

#[tokio::test]
async fn records_go_by_age_and_usage_still_answers() {
    let n = TestNode::with(|c| {
        c.retain.age = Duration::from_millis(300);
        c.prune_every = Duration::from_millis(100);
    })
    .await;
    n.deployed("h", wat::hello(), "route=/h").await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(invocation_id(&n.get("/h").await));
    }
    n.node.flush_ledger();
    assert_eq!(usage(&n).await, 5);
    // The records go; the usage they carried stays.
    let mut gone = false;
    for _ in 0..200 {
        let a = n
            .api(Method::GET, &format!("/v1/invocations?id={}", ids[0]), None)
            .await;
        if a.json().as_array().is_some_and(Vec::is_empty) {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gone, "the record outlived the retention age");
    assert_eq!(usage(&n).await, 5, "usage was lost with the records");
}

/// A tmpfs of `mib` MiB mounted for one test, unmounted when dropped.
struct Tmpfs {
    dir: Option<tempfile::TempDir>,
}

impl Tmpfs {
    fn mount(mib: u32) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "this test mounts a small tmpfs to fill a disk, which needs root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs { dir: Some(dir) }
    }

    fn path(&self) -> &Path {
        self.dir.as_ref().unwrap().path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if let Some(dir) = self.dir.take() {
            // Lazily: the node's last tasks may still hold a file open.
            let _ = Command::new("umount").arg("-l").arg(dir.path()).status();
        }
    }
}

fn leftovers(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p
                .file_name()
                .is_some_and(|n| n.to_string_lossy().contains(".tmp"))
            {
                out.push(p);
            }
        }
    }
    out
}

#[tokio::test]
async fn a_full_disk_refuses_writes_clearly_and_deletes_still_work() {
    let disk = Tmpfs::mount(40);
    let data = tempfile::Builder::new()
        .prefix("node")
        .tempdir_in(disk.path())
        .unwrap();
    let data_path = data.path().to_path_buf();
    let n = TestNode::in_dir(data, |_| {}).await;
    n.deployed("first", wat::hello(), "route=/first").await;
    assert!(data_path.join("reserve").exists(), "no reserve was kept");

    // Fill the disk.
    let filler = disk.path().join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![7u8; 1 << 20];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
    }
    // A write fails, saying what happened and what to do.
    let a = n.deploy("second", wat::path(), "route=/second").await;
    let detail = a.problem(507);
    assert!(
        detail.contains("disk") && detail.contains("verge rm"),
        "{detail}"
    );
    assert!(
        leftovers(&data_path).is_empty(),
        "{:?}",
        leftovers(&data_path)
    );
    let listed = n.api(Method::GET, "/v1/functions", None).await.json();
    assert!(
        !listed.to_string().contains("second"),
        "a refused deploy left a function: {listed}"
    );
    // What is deployed still serves; a delete frees space.
    assert_eq!(n.get("/first").await.status, 200);
    let a = n.api(Method::DELETE, "/v1/functions/first", None).await;
    assert_eq!(a.status, 204, "{}", a.text());
    assert_eq!(n.get("/first").await.status, 404);
    // With room again, deploys work.
    std::fs::remove_file(&filler).unwrap();
    n.deployed("second", wat::path(), "route=/second").await;
    assert_eq!(n.get("/second").await.status, 200);
    drop(n);
}

/// Versions with the same bytes share one loaded component: the second
/// function's first request loads nothing (no compile, no cache read), and
/// each function still runs and is metered as its own.
#[tokio::test]
async fn identical_components_are_loaded_once() {
    let node = TestNode::start().await;
    let loads =
        |h: &serde_json::Value| h["compiled"].as_u64().unwrap() + h["cache_hits"].as_u64().unwrap();
    node.deployed("one", wat::hello(), "route=/one").await;
    assert_eq!(node.get("/one").await.status, 200);
    let before = loads(&node.api(Method::GET, "/v1/health", None).await.json());
    for i in 0..20 {
        node.deployed(
            &format!("copy{i}"),
            wat::hello(),
            &format!("route=/copy{i}"),
        )
        .await;
        assert_eq!(node.get(&format!("/copy{i}")).await.status, 200);
    }
    let after = loads(&node.api(Method::GET, "/v1/health", None).await.json());
    assert_eq!(
        after, before,
        "20 copies of a loaded component loaded again"
    );
    let a = node.get("/copy7").await;
    let record = node.invocation(&invocation_id(&a)).await;
    assert_eq!(record["function"], "copy7");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_code_is_unloaded_and_loads_again_on_the_next_request() {
    let node = TestNode::with(|c| {
        c.unload_after = Some(std::time::Duration::from_secs(1));
        c.code_memory = None;
    })
    .await;
    let health = |h: serde_json::Value| {
        (
            h["versions_loaded"].as_u64().unwrap(),
            h["code_unloads"].as_u64().unwrap(),
        )
    };
    node.deployed("idle", wat::hello(), "route=/idle").await;
    let first = node.get("/idle").await;
    assert_eq!(first.status, 200);
    assert_eq!(
        health(node.api(Method::GET, "/v1/health", None).await.json()).0,
        1
    );
    // Not called for a second: its code goes.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (loaded, unloads) = health(node.api(Method::GET, "/v1/health", None).await.json());
        if loaded == 0 {
            assert_eq!(unloads, 1);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never unloaded");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // The next request loads it again (from the compile cache) and is cold.
    let again = node.get("/idle").await;
    assert_eq!(again.status, 200);
    let record = node.invocation(&invocation_id(&again)).await;
    assert_eq!(record["cold"], true);
    let h = node.api(Method::GET, "/v1/health", None).await.json();
    assert_eq!(health(h.clone()).0, 1);
    assert!(h["cache_hits"].as_u64().unwrap() >= 1, "{h}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_code_memory_bound_the_least_recently_used_code_goes() {
    let node = TestNode::with(|c| {
        c.unload_after = None;
        // Less than any component's code: all of it is past the bound.
        c.code_memory = Some(1);
    })
    .await;
    node.deployed("a", wat::hello(), "route=/a").await;
    assert_eq!(node.get("/a").await.status, 200);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let h = node.api(Method::GET, "/v1/health", None).await.json();
        if h["versions_loaded"] == 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never unloaded: {h}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(node.get("/a").await.status, 200);
}
