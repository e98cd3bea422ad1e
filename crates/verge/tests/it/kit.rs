//! Test kit: real `verge up` processes on ephemeral ports with temporary data
//! directories, the real CLI, and fixtures built by `cargo xtask guests`.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const VERGE: &str = env!("CARGO_BIN_EXE_verge");

/// A guest fixture built by `cargo xtask guests`.
pub fn fixture(name: &str) -> PathBuf {
    let dir = std::env::var_os("VERGE_GUESTS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/guests"));
    let path = dir.join(format!("{name}.wasm"));
    assert!(
        path.is_file(),
        "fixture {} is missing; build the fixtures with `cargo xtask guests`",
        path.display()
    );
    path
}

/// A running node.
pub struct TestNode {
    child: Child,
    pub url: String,
    pub data_dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    log: Arc<Mutex<String>>,
    pub stdout: String,
    extra: Vec<String>,
    /// The admin token, when not the node's own (a cluster's second node).
    token: Option<String>,
}

impl TestNode {
    /// A node with a fresh data directory.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// A node with a fresh data directory and extra `verge up` arguments.
    pub fn start_with(extra: &[&str]) -> Self {
        Self::start_command("up", extra)
    }

    /// An edge node (`verge edge` with `extra`).
    pub fn start_edge(extra: &[&str]) -> Self {
        Self::start_command("edge", extra)
    }

    fn start_command(command: &str, extra: &[&str]) -> Self {
        Self::start_command_env(command, extra, &[])
    }

    /// `verge up` with `extra` and, for this start only, environment `env`
    /// (a restart does without it).
    pub fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_command_env("up", extra, env)
    }

    fn start_command_env(command: &str, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_path_buf();
        let mut args = vec![command.to_string()];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut node = Self::spawn_env(dir, args, env);
        node._tmp = Some(tmp);
        node
    }

    /// `extra`: the subcommand (`up`, `edge`), then its arguments.
    fn spawn(data_dir: PathBuf, extra: Vec<String>) -> Self {
        Self::spawn_env(data_dir, extra, &[])
    }

    fn spawn_env(data_dir: PathBuf, extra: Vec<String>, env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(VERGE)
            .envs(env.iter().copied())
            .arg(&extra[0])
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&data_dir)
            .args(&extra[1..])
            .env("VERGE_LOG", "info")
            .env_remove("VERGE_SERVER")
            .env_remove("VERGE_TOKEN")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn verge up");
        let log = Arc::new(Mutex::new(String::new()));
        let mut stderr = child.stderr.take().expect("stderr");
        let sink = log.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(180);
        let mut seen = String::new();
        let url = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    seen.push_str(&line);
                    seen.push('\n');
                    if let Some(url) = line.strip_prefix("verge listening on ") {
                        break url.trim().to_string();
                    }
                }
                Err(_) => panic!(
                    "verge up did not start; stdout:\n{seen}\nstderr:\n{}",
                    log.lock().unwrap()
                ),
            }
        };
        // Keep draining stdout so the node never blocks on a full pipe.
        std::thread::spawn(move || while rx.recv().is_ok() {});
        TestNode {
            child,
            url,
            data_dir,
            _tmp: None,
            log,
            stdout: seen,
            extra,
            token: None,
        }
    }

    /// kill -9; the data directory stays ([`TestNode::kill9_and_restart`]
    /// starts it again).
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// kill -9 (if still running), then start again on the same data directory.
    pub fn kill9_and_restart(mut self) -> Self {
        self.kill9();
        let tmp = self._tmp.take();
        let mut next = Self::spawn(self.data_dir.clone(), self.extra.clone());
        next._tmp = tmp;
        next.token = self.token.take();
        next
    }

    /// Stops the node; its data directory lives as long as the result.
    pub fn stop_keeping_dir(mut self) -> tempfile::TempDir {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self._tmp
            .take()
            .expect("a node started with a temporary directory")
    }

    /// The node's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU time the node's process has used so far (user + system), ms.
    pub fn cpu_ms(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        // Fields after the command name (which may hold spaces), 1-based
        // fields 14 and 15: utime and stime in USER_HZ (100 on Linux).
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
        ticks as f64 * 10.0
    }

    /// Uses `token` as the admin token (a cluster's: its first node wrote it).
    pub fn with_token(mut self, token: String) -> Self {
        self.token = Some(token);
        self
    }

    /// The admin token the node wrote (or was given).
    pub fn token(&self) -> String {
        if let Some(t) = &self.token {
            return t.clone();
        }
        std::fs::read_to_string(self.data_dir.join("admin.token"))
            .expect("token file")
            .trim()
            .to_string()
    }

    /// What the node logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until the node's log contains `needle`.
    pub fn wait_for_log(&self, needle: &str) -> String {
        eventually(&format!("the node's log contains {needle:?}"), || {
            let log = self.log();
            log.contains(needle).then_some(log)
        })
    }

    /// Waits until the captured output of `function`'s invocations (what
    /// `verge logs` shows; guest output never goes to the node's log)
    /// contains `needle`.
    pub fn wait_for_output(&self, function: &str, needle: &str) -> String {
        eventually(
            &format!("{function}'s invocation output contains {needle:?}"),
            || {
                let text = self
                    .api_get(&format!("/v1/logs?function={function}"))
                    .text()
                    .ok()?;
                text.contains(needle).then_some(text)
            },
        )
    }

    /// The CLI, pointed at this node through VERGE_SERVER / VERGE_TOKEN.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(VERGE)
            .args(args)
            .env("VERGE_SERVER", &self.url)
            .env("VERGE_TOKEN", self.token())
            .env_remove("VERGE_DATA_DIR")
            .output()
            .expect("run verge")
    }

    /// The CLI; panics unless it succeeds; returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "verge {args:?} failed:\nstdout: {}\nstderr: {}\nnode log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The CLI; panics if it succeeds; returns stderr.
    pub fn cli_err(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            !out.status.success(),
            "verge {args:?} should have failed; stdout: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// Deploys a fixture through the CLI.
    pub fn deploy(&self, fixture_name: &str, name: &str, route: &str) -> serde_json::Value {
        let file = fixture(fixture_name);
        let out = self.cli_ok(&[
            "deploy",
            file.to_str().unwrap(),
            "--name",
            name,
            "--route",
            route,
            "--json",
        ]);
        serde_json::from_str(&out).expect("deploy --json prints JSON")
    }

    /// An HTTP client (no token).
    pub fn http(&self) -> reqwest::blocking::Client {
        reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()
            .unwrap()
    }

    /// GET a path with the admin token.
    pub fn api_get(&self, path: &str) -> reqwest::blocking::Response {
        self.http()
            .get(format!("{}{path}", self.url))
            .bearer_auth(self.token())
            .send()
            .unwrap()
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` until it yields a value (a condition, never a fixed
/// sleep); fails naming `what` after 30 s.
pub fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "never happened: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs curl with `args`; returns (status code, headers, body).
pub fn curl(args: &[&str]) -> (u16, String, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let headers = dir.path().join("headers");
    let out = Command::new("curl")
        .args(["-sS", "-o", "-", "-D"])
        .arg(&headers)
        .args(args)
        .output()
        .expect("curl is installed (apt-get install curl)");
    assert!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let headers = std::fs::read_to_string(&headers).unwrap();
    // The last status line (after any `100 Continue`).
    let status = headers
        .lines()
        .rfind(|l| l.starts_with("HTTP/"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status line");
    (status, headers.to_ascii_lowercase(), out.stdout)
}

/// Deterministic pseudo-random bytes.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

pub use verge_cluster::testkit::Proxy;
