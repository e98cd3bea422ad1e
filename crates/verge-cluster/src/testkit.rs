//! A real `nats-server` for tests (feature `testkit`): JetStream on a
//! loopback port with `sync_interval: always`, stopped and restarted on the
//! same port and store. The binary is `$NATS_SERVER` or `nats-server` on
//! the PATH (`scripts/test` installs the pinned release).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// A running (or stopped) nats-server.
pub struct NatsServer {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
    config: PathBuf,
}

fn binary() -> String {
    std::env::var("NATS_SERVER").unwrap_or_else(|_| "nats-server".into())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

impl NatsServer {
    /// A JetStream server.
    pub fn start() -> Self {
        Self::with_config("jetstream { store_dir: \"{dir}/js\", sync_interval: always }\n")
    }

    /// A server without JetStream.
    pub fn without_jetstream() -> Self {
        Self::with_config("")
    }

    /// A JetStream server that wants user `verge`, password `secret`.
    pub fn with_password() -> Self {
        Self::with_config(
            "jetstream { store_dir: \"{dir}/js\", sync_interval: always }\nauthorization { user: verge, password: secret }\n",
        )
    }

    fn with_config(extra: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "verge-nats-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let port = free_port();
        let config = dir.join("nats.conf");
        let text = format!(
            "listen: 127.0.0.1:{port}\n{}",
            extra.replace("{dir}", &dir.display().to_string())
        );
        std::fs::write(&config, text).unwrap_or_else(|e| panic!("{}: {e}", config.display()));
        let mut s = NatsServer {
            child: None,
            port,
            dir,
            config,
        };
        s.resume();
        s
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server (kill -9).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and store.
    pub fn resume(&mut self) {
        self.stop();
        let log = self.dir.join("nats.log");
        let child = Command::new(binary())
            .arg("-c")
            .arg(&self.config)
            .arg("-l")
            .arg(&log)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "could not start {} ({e}); install nats-server 2.15.1 (scripts/test does) or set NATS_SERVER",
                    binary()
                )
            });
        self.child = Some(child);
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let until = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            assert!(
                Instant::now() < until,
                "nats-server did not listen on {addr}; its log: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
