//! A real `nats-server` for tests (feature `testkit`): JetStream on a
//! loopback port with `sync_interval: always`, stopped and restarted on the
//! same port and store. The binary is `$NATS_SERVER` or `nats-server` on
//! the PATH (`scripts/test` installs the pinned release).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A running (or stopped) nats-server.
pub struct NatsServer {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
    config: PathBuf,
    /// The monitoring port, when it has one (`/healthz`).
    monitor: Option<u16>,
    /// The leaf node listener, on a hub.
    leaf_port: Option<u16>,
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

    /// A hub server for edges: JetStream domain `hub` and a leaf node
    /// listener that does not advertise the cluster's other servers.
    pub fn hub() -> Self {
        let leaf = free_port();
        let mut s = Self::with_config(&format!(
            "server_name: hub-{leaf}\njetstream {{ store_dir: \"{{dir}}/js\", domain: hub, sync_interval: always }}\nleafnodes {{ listen: 127.0.0.1:{leaf}, no_advertise: true }}\n"
        ));
        s.leaf_port = Some(leaf);
        s
    }

    /// A leaf server with its own JetStream domain `domain`, linked to a
    /// hub's leaf listener at `remote` (`host:port`, e.g. a [`Proxy`]).
    pub fn leaf(domain: &str, remote: std::net::SocketAddr) -> Self {
        Self::with_config(&format!(
            "server_name: {domain}-{}\njetstream {{ store_dir: \"{{dir}}/js\", domain: {domain}, sync_interval: always }}\nleafnodes {{ reconnect: \"1s\", remotes: [{{ urls: [\"nats-leaf://{remote}\"], ignore_discovered_servers: true }}] }}\n",
            free_port()
        ))
    }

    /// The hub's leaf listener (`NatsServer::hub`).
    pub fn leaf_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.leaf_port.unwrap_or(0)))
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
            "listen: 127.0.0.1:{port}\nmax_payload: 16MB\n{}",
            extra.replace("{dir}", &dir.display().to_string())
        );
        std::fs::write(&config, text).unwrap_or_else(|e| panic!("{}: {e}", config.display()));
        let mut s = NatsServer {
            child: None,
            port,
            dir,
            config,
            monitor: None,
            leaf_port: None,
        };
        s.resume();
        s
    }

    /// Waits until the server's `/healthz` says JetStream is ready (a
    /// server without a monitoring port: at once).
    pub fn wait_ready(&self) {
        use std::io::{Read, Write};
        let Some(port) = self.monitor else { return };
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = TcpStream::connect(("127.0.0.1", port))
                .and_then(|mut c| {
                    c.write_all(b"GET /healthz HTTP/1.0\r\n\r\n")?;
                    let mut s = String::new();
                    c.read_to_string(&mut s)?;
                    Ok(s.starts_with("HTTP/1.0 200") || s.starts_with("HTTP/1.1 200"))
                })
                .unwrap_or(false);
            if ok {
                return;
            }
            assert!(
                Instant::now() < until,
                "nats-server on {} never became ready",
                self.port
            );
            std::thread::sleep(Duration::from_millis(100));
        }
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

/// A NATS cluster of `n` JetStream servers on loopback (routes between
/// them), each stopped and restarted on its own.
pub struct NatsCluster {
    pub servers: Vec<NatsServer>,
}

impl NatsCluster {
    pub fn start(n: usize) -> Self {
        let routes: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let route_urls: Vec<String> = routes
            .iter()
            .map(|p| format!("nats-route://127.0.0.1:{p}"))
            .collect();
        let servers: Vec<NatsServer> = routes
            .iter()
            .enumerate()
            .map(|(i, port)| {
                let monitor = free_port();
                let mut s = NatsServer::with_config(&format!(
                    "server_name: s{i}\nhttp: 127.0.0.1:{monitor}\njetstream {{ store_dir: \"{{dir}}/js\", sync_interval: always }}\ncluster {{ name: c, listen: 127.0.0.1:{port}, routes: [{}] }}\n",
                    route_urls.join(", ")
                ));
                s.monitor = Some(monitor);
                s
            })
            .collect();
        // A new cluster elects its JetStream leader first.
        for s in &servers {
            s.wait_ready();
        }
        NatsCluster { servers }
    }

    /// Every server's URL, comma-separated (what `--nats` takes).
    pub fn url(&self) -> String {
        self.servers
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// A TCP proxy whose link a test can cut, heal and delay (simulates an
/// edge's uplink; `tc netem` is not available).
pub struct Proxy {
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    delay_ms: Arc<AtomicU64>,
    conns: Arc<std::sync::Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    /// Listens on an ephemeral loopback port and forwards to `target`.
    /// While cut, the port refuses connections (as a host that is gone
    /// would), so a NATS leaf does not count a link that closes at once.
    pub fn start(target: SocketAddr) -> Self {
        let listener = match TcpListener::bind("127.0.0.1:0") {
            Ok(l) => l,
            Err(e) => panic!("the proxy could not listen: {e}"),
        };
        let addr = listener.local_addr().unwrap_or(target);
        let cut = Arc::new(AtomicBool::new(false));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let conns: Arc<std::sync::Mutex<Vec<TcpStream>>> = Arc::default();
        let (c, d, cs) = (cut.clone(), delay_ms.clone(), conns.clone());
        std::thread::spawn(move || {
            let mut listening = Some(listener);
            loop {
                if c.load(Ordering::SeqCst) {
                    listening = None;
                } else if listening.is_none() {
                    listening = TcpListener::bind(addr).ok();
                }
                let Some(l) = &listening else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let _ = l.set_nonblocking(true);
                let client = match l.accept() {
                    Ok((client, _)) => client,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                };
                let _ = client.set_nonblocking(false);
                let Ok(server) = TcpStream::connect(target) else {
                    let _ = client.shutdown(std::net::Shutdown::Both);
                    continue;
                };
                let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
                    continue;
                };
                if let Ok(mut guard) = cs.lock() {
                    guard.extend([c2, s2]);
                }
                let (Ok(c3), Ok(s3)) = (client.try_clone(), server.try_clone()) else {
                    continue;
                };
                pipe(client, s3, d.clone());
                pipe(server, c3, d.clone());
            }
        });
        Proxy {
            addr,
            cut,
            delay_ms,
            conns,
        }
    }

    /// `http://` and the proxy's address.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Cuts the link: open connections are closed, new ones refused.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        if let Ok(mut conns) = self.conns.lock() {
            for s in conns.drain(..) {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    /// Heals the link.
    pub fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }

    /// Delays every byte by `ms` milliseconds each way (0: none).
    pub fn delay(&self, ms: u64) {
        self.delay_ms.store(ms, Ordering::SeqCst);
    }
}

/// Copies `from` to `to`, each chunk held until its delay has passed (a
/// latency, not a bandwidth limit: reading goes on meanwhile).
fn pipe(mut from: TcpStream, mut to: TcpStream, delay_ms: Arc<AtomicU64>) {
    use std::io::{Read, Write};
    let (tx, rx) = std::sync::mpsc::channel::<(Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let due =
                        Instant::now() + Duration::from_millis(delay_ms.load(Ordering::SeqCst));
                    if tx.send((due, buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            }
        }
    });
    std::thread::spawn(move || {
        while let Ok((due, bytes)) = rx.recv() {
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if to.write_all(&bytes).is_err() {
                break;
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Both);
    });
}
