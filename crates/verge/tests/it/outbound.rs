//! Guests that talk to the world (issue 17): outbound HTTP by allowlist with
//! its guard against server-side request forgery, against real upstreams on
//! loopback (HTTP, and HTTPS under a test CA); secrets and configuration
//! through `wasi:config`; calls between functions in process.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use serde_json::Value;

use crate::kit::{TestNode, eventually, fixture, noise};

/// The upstreams listen here (not 127.0.0.1): a version allowed to reach
/// them with `--allow-private 127.0.0.2/32` is still refused 127.0.0.1.
const UPSTREAM_HOST: &str = "127.0.0.2";

/// `tests/it/upstream.py` on HTTP and HTTPS, with a CA of its own.
struct Upstream {
    child: Child,
    http: u16,
    https: u16,
    dir: tempfile::TempDir,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl is installed (apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Upstream {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
        let mut ca = vec!["req", "-x509", "-nodes", "-days", "2"];
        ca.extend(ec);
        ca.extend([
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-subj",
            "/CN=Verge test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        openssl(d, &ca);
        let mut csr = vec!["req", "-nodes"];
        csr.extend(ec);
        csr.extend([
            "-keyout",
            "leaf.key",
            "-out",
            "leaf.csr",
            "-subj",
            "/CN=upstream.test",
        ]);
        openssl(d, &csr);
        std::fs::write(
            d.join("leaf.ext"),
            "subjectAltName=DNS:upstream.test\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                "leaf.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                "leaf.pem",
                "-extfile",
                "leaf.ext",
            ],
        );
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/upstream.py");
        let mut child = Command::new("python3")
            .arg(script)
            .arg(UPSTREAM_HOST)
            .arg(d.join("leaf.pem"))
            .arg(d.join("leaf.key"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let f: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(f.len(), 4, "upstream.py printed {line:?}");
        Upstream {
            child,
            http: f[1].parse().unwrap(),
            https: f[3].parse().unwrap(),
            dir,
        }
    }

    fn ca(&self) -> String {
        self.dir.path().join("ca.pem").to_str().unwrap().to_string()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(mut stdin) = self.child.stdin.take() {
            let _ = stdin.write_all(b"");
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A node that resolves `upstream.test` to the upstreams' address and
/// `evil.test` to 127.0.0.1 (as a hosts entry would), with the flood cap at 4.
fn node() -> TestNode {
    TestNode::start_with(&[
        "--outbound-resolve",
        &format!("upstream.test={UPSTREAM_HOST}"),
        "--outbound-resolve",
        "evil.test=127.0.0.1",
        "--outbound-concurrency",
        "4",
        "--outbound-max-response",
        "2MiB",
    ])
}

/// Deploys fixture `fixture` as `name` on `/name` with `args`.
fn deploy(node: &TestNode, fixture_name: &str, name: &str, args: &[&str]) -> Value {
    let file = fixture(fixture_name);
    let route = format!("/{name}");
    let mut all = vec![
        "deploy",
        file.to_str().unwrap(),
        "--name",
        name,
        "--route",
        &route,
        "--json",
    ];
    all.extend_from_slice(args);
    serde_json::from_str(&node.cli_ok(&all)).unwrap()
}

/// A guest's answer, and the id of its invocation.
struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Vec<u8>,
    id: String,
}

impl Answer {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A guest's fetch of `url`.
fn fetch(
    node: &TestNode,
    function: &str,
    url: &str,
    extra: &[(&str, &str)],
    body: Option<Vec<u8>>,
) -> Answer {
    // Redirects reach the test as the guest answered them.
    let client = reqwest::blocking::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(std::time::Duration::from_secs(120))
        .build()
        .unwrap();
    let mut rb = client
        .post(format!("{}/{function}/fetch", node.url))
        .header("x-fetch-url", url);
    for (k, v) in extra {
        rb = rb.header(*k, *v);
    }
    if let Some(b) = body {
        rb = rb.header("x-fetch-method", "POST").body(b);
    }
    answer(rb.send().unwrap())
}

fn answer(r: reqwest::blocking::Response) -> Answer {
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let id = headers
        .get("verge-invocation-id")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    Answer {
        status,
        headers,
        body: r.bytes().unwrap().to_vec(),
        id,
    }
}

/// The invocation record of `id`, once written.
fn record(node: &TestNode, id: &str) -> Value {
    eventually("the invocation's record", || {
        let v: Vec<Value> = node
            .api_get(&format!("/v1/invocations?id={id}"))
            .json()
            .ok()?;
        v.into_iter().next()
    })
}

/// The only record of `function`, once written.
fn only_record(node: &TestNode, function: &str) -> Value {
    eventually("the function's record", || {
        let v: Vec<Value> = node
            .api_get(&format!("/v1/invocations?function={function}"))
            .json()
            .ok()?;
        v.into_iter().next()
    })
}

/// The stderr of invocation `id` (Verge's refusals are there).
fn stderr_of(node: &TestNode, id: &str) -> String {
    eventually("the invocation's output", || {
        let v: Value = node
            .api_get(&format!("/v1/logs?invocation={id}"))
            .json()
            .ok()?;
        let e = v.as_array()?.first()?["stderr"].as_str()?.to_string();
        Some(e)
    })
}

#[test]
fn guests_reach_allowed_hosts_only_and_never_private_addresses() {
    let up = Upstream::start();
    let node = node();
    let port = node.url.rsplit(':').next().unwrap().to_string();
    let grants = [
        "--allow-outbound",
        "http://upstream.test:*",
        "--allow-outbound",
        "https://upstream.test:*",
        "--allow-outbound",
        "http://evil.test:*",
        "--allow-outbound",
        "http://127.0.0.1:*",
        "--allow-outbound",
        "http://[::1]:*",
        "--allow-outbound",
        "http://localhost:*",
        "--allow-outbound",
        "http://169.254.169.254",
        "--allow-private",
        "127.0.0.2/32",
        "--outbound-ca",
        &up.ca(),
        "--timeout",
        "2s",
    ];
    for (fixture_name, name) in [
        ("rust-fetch", "rs"),
        ("python-fetch", "py"),
        ("js-fetch", "js"),
    ] {
        deploy(&node, fixture_name, name, &grants);
    }
    let echo = format!("http://upstream.test:{}/echo", up.http);
    let body = noise(1 << 20, 17);
    for name in ["rs", "py", "js"] {
        // 1 MiB there and back, byte for byte, headers both ways.
        let a = fetch(
            &node,
            name,
            &echo,
            &[("x-greeting", "hello from the guest")],
            Some(body.clone()),
        );
        assert_eq!(
            a.status,
            200,
            "{name}: {}",
            &a.text()[..a.text().len().min(300)]
        );
        assert!(
            a.body == body,
            "{name}: the body came back changed ({} bytes)",
            a.body.len()
        );
        assert_eq!(a.headers["x-upstream"], "python", "{name}");
        assert_eq!(
            a.headers["x-echo-x-greeting"], "hello from the guest",
            "{name}"
        );
        // Metered in the guest's record.
        let r = record(&node, &a.id);
        assert_eq!(r["outbound_requests"], 1, "{name}: {r}");
        assert_eq!(r["outbound_sent_bytes"], 1 << 20, "{name}: {r}");
        assert_eq!(r["outbound_received_bytes"], 1 << 20, "{name}: {r}");
        assert!(r["outbound_wait_us"].as_u64().unwrap() > 0, "{name}: {r}");

        // HTTPS, verified against the version's CA.
        let a = fetch(
            &node,
            name,
            &format!("https://upstream.test:{}/", up.https),
            &[],
            None,
        );
        assert_eq!(a.status, 200, "{name} https: {}", a.text());
        assert_eq!(a.headers["x-scheme"], "https");

        // A host the version does not list.
        let a = fetch(&node, name, "http://other.test/", &[], None);
        assert_eq!(a.status, 502, "{name}");
        assert!(
            a.text().to_lowercase().contains("denied"),
            "{name}: {}",
            a.text()
        );
        let err = stderr_of(&node, &a.id);
        assert!(
            err.contains("--allow-outbound http://other.test"),
            "{name}: {err}"
        );

        // A listed name that resolves to loopback.
        let a = fetch(
            &node,
            name,
            &format!("http://evil.test:{}/", up.http),
            &[],
            None,
        );
        assert_eq!(a.status, 502, "{name}: {}", a.text());
        assert!(
            a.text().to_lowercase().contains("prohibited"),
            "{name}: {}",
            a.text()
        );
    }

    // Every way to loopback, the metadata address and the node itself.
    let ssrf: Vec<(String, &str)> = vec![
        (format!("http://127.0.0.1:{}/", up.http), "loopback"),
        (format!("http://[::1]:{}/", up.http), "loopback"),
        (format!("http://localhost:{}/", up.http), "loopback"),
        (
            format!("http://evil.test:{}/", up.http),
            "evil.test resolves to it",
        ),
        (
            "http://169.254.169.254/latest/meta-data/".into(),
            "link-local",
        ),
        (
            format!("http://127.0.0.1:{port}/v1/functions"),
            "own listener",
        ),
        (
            format!(
                "http://upstream.test:{}/redirect?to=http://127.0.0.1:{}/",
                up.http, up.http
            ),
            "loopback",
        ),
    ];
    for (url, why) in &ssrf {
        let a = fetch(&node, "rs", url, &[("x-fetch-follow", "1")], None);
        assert_eq!(a.status, 502, "{url}: {}", a.text());
        assert!(
            a.text().contains("DestinationIpProhibited"),
            "{url}: {}",
            a.text()
        );
        let err = stderr_of(&node, &a.id);
        assert!(err.contains("refused") && err.contains(why), "{url}: {err}");
        if *why != "own listener" {
            assert!(
                err.contains("--allow-private"),
                "the refusal says what would allow it: {err}"
            );
        }
    }
    // The redirect itself reached the guest: its second request was refused.
    let a = fetch(
        &node,
        "rs",
        &format!(
            "http://upstream.test:{}/redirect?to=http://127.0.0.1:{}/",
            up.http, up.http
        ),
        &[],
        None,
    );
    assert_eq!(a.status, 302);
    assert!(
        a.headers["location"]
            .to_str()
            .unwrap()
            .contains("127.0.0.1")
    );

    // The node's own port, even for a version allowed all of loopback.
    deploy(
        &node,
        "rust-fetch",
        "own",
        &[
            "--allow-outbound",
            "*",
            "--allow-private",
            "127.0.0.0/8",
            "--allow-private",
            "::1/128",
        ],
    );
    for url in [
        format!("http://127.0.0.1:{port}/v1/functions"),
        format!("http://localhost:{port}/v1/functions"),
    ] {
        let a = fetch(&node, "own", &url, &[], None);
        assert_eq!(a.status, 502, "{url}: {}", a.text());
        let err = stderr_of(&node, &a.id);
        assert!(err.contains("this node's own listener"), "{url}: {err}");
    }
    // ... while the rest of loopback is what it granted.
    let a = fetch(
        &node,
        "own",
        &format!("http://127.0.0.1:{}/", up.http),
        &[],
        None,
    );
    assert_eq!(
        a.status,
        502,
        "the upstream listens on 127.0.0.2 only: {}",
        a.text()
    );
    let a = fetch(
        &node,
        "own",
        &format!("http://127.0.0.2:{}/", up.http),
        &[],
        None,
    );
    assert_eq!(a.status, 200, "{}", a.text());

    // A slow upstream is cut at the function's time limit (2 s).
    let a = fetch(
        &node,
        "rs",
        &format!("http://upstream.test:{}/slow?ms=20000", up.http),
        &[],
        None,
    );
    assert_eq!(a.status, 504, "{}", a.text());
    assert_eq!(record(&node, &a.id)["outcome"], "timeout");

    // A response over the node's limit (2 MiB) is cut.
    let a = fetch(
        &node,
        "rs",
        &format!("http://upstream.test:{}/big?n={}", up.http, 3 << 20),
        &[],
        None,
    );
    assert_eq!(a.status, 502, "{}", a.text());
    assert!(a.text().contains("HttpResponseBodySize"), "{}", a.text());

    // A flood is capped at 4 open requests, and the cap is in the error.
    let a = answer(
        node.http()
            .post(format!("{}/rs/flood?n=10", node.url))
            .header(
                "x-fetch-url",
                format!("http://upstream.test:{}/slow?ms=300", up.http),
            )
            .send()
            .unwrap(),
    );
    assert!(a.text().starts_with("ok=4 "), "{}", a.text());
    assert!(a.text().contains("ConnectionLimitReached"), "{}", a.text());
    let err = stderr_of(&node, &a.id);
    assert!(err.contains("at most 4 outbound requests"), "{err}");

    // `verge usage` shows the outbound traffic.
    eventually("the flood's record", || {
        (record(&node, &a.id)["outbound_requests"] == 4).then_some(())
    });
    let usage: Value = serde_json::from_str(&node.cli_ok(&["usage", "--json"])).unwrap();
    assert!(
        usage["total"]["outbound_requests"].as_u64().unwrap() >= 6,
        "{usage}"
    );
    assert!(
        usage["total"]["outbound_bytes"].as_u64().unwrap() >= 6 << 20,
        "{usage}"
    );
    let table = node.cli_ok(&["usage"]);
    assert!(table.contains("OUTBOUND"), "{table}");
}

#[test]
fn bad_grants_are_refused_with_what_is_wrong() {
    let node = TestNode::start();
    let file = fixture("rust-fetch");
    let file = file.to_str().unwrap();
    for (flags, needle) in [
        (vec!["--allow-outbound", "ftp://x.com"], "--allow-outbound"),
        (vec!["--allow-private", "10.0.0.0/33"], "--allow-private"),
        (vec!["--config", "no-equals"], "KEY=VALUE"),
        (vec!["--secret", "bad name"], "secret name"),
        (vec!["--allow-call", "Bad_Name"], "--allow-call"),
    ] {
        let mut args = vec!["deploy", file, "--name", "f"];
        args.extend(flags.iter().copied());
        let err = node.cli_err(&args);
        assert!(err.contains(needle), "{flags:?}: {err}");
    }
    // The API says the same to a client that skips the CLI's checks.
    let r = node
        .http()
        .post(format!(
            "{}/v1/functions/f/versions?allow_outbound=https://a%20b",
            node.url
        ))
        .bearer_auth(node.token())
        .body(std::fs::read(file).unwrap())
        .send()
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().unwrap().contains("--allow-outbound"));
    let dir = tempfile::tempdir().unwrap();
    let bad_ca = dir.path().join("ca.pem");
    std::fs::write(&bad_ca, "not a certificate").unwrap();
    let err = node.cli_err(&[
        "deploy",
        file,
        "--name",
        "f",
        "--outbound-ca",
        bad_ca.to_str().unwrap(),
    ]);
    assert!(err.contains("--outbound-ca"), "{err}");
    // Secrets: too large, a bad name.
    let big = "x".repeat(64 * 1024 + 1);
    let r = node
        .http()
        .put(format!("{}/v1/secrets/BIG?function=f", node.url))
        .bearer_auth(node.token())
        .body(big)
        .send()
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().unwrap().contains("64 KiB"));
    let r = node
        .http()
        .put(format!("{}/v1/secrets/bad%20name", node.url))
        .bearer_auth(node.token())
        .body("v")
        .send()
        .unwrap();
    assert_eq!(r.status(), 400);
}

/// `verge secret set` with `value` on standard input.
fn set_secret(node: &TestNode, name: &str, scope: &[&str], value: &str) -> String {
    let mut args = vec!["secret", "set", name];
    args.extend_from_slice(scope);
    let mut child = Command::new(crate::kit::VERGE)
        .args(&args)
        .env("VERGE_SERVER", &node.url)
        .env("VERGE_TOKEN", node.token())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{value}\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "secret set: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every file under `dir` that holds `needle`.
fn files_holding(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = std::fs::read(&p)
                && bytes.windows(needle.len()).any(|w| w == needle)
            {
                found.push(p.display().to_string());
            }
        }
    }
    found
}

#[test]
fn secrets_reach_only_their_guests_and_rotate_without_a_redeploy() {
    let node = TestNode::start();
    const FIRST: &str = "s3cr3t-first-7f4a91";
    const SECOND: &str = "s3cr3t-second-c02e55";
    let out = set_secret(&node, "API_KEY", &["--function", "rs"], FIRST);
    assert!(out.contains("secret API_KEY set"), "{out}");
    set_secret(&node, "API_KEY", &["--function", "py"], FIRST);
    set_secret(
        &node,
        "SHARED",
        &["--tenant", "default"],
        "tenant-wide-value",
    );
    for (fixture_name, name) in [("rust-fetch", "rs"), ("python-fetch", "py")] {
        deploy(
            &node,
            fixture_name,
            name,
            &[
                "--secret",
                "API_KEY",
                "--secret",
                "SHARED",
                "--config",
                "region=eu-west",
            ],
        );
    }
    // A version not granted the secret does not see it.
    deploy(&node, "rust-fetch", "nosy", &["--config", "region=eu-west"]);
    let get = |f: &str, key: &str| {
        let r = node
            .http()
            .get(format!("{}/{f}/config/{key}", node.url))
            .send()
            .unwrap();
        (r.status().as_u16(), r.text().unwrap())
    };
    for f in ["rs", "py"] {
        assert_eq!(get(f, "API_KEY"), (200, FIRST.to_string()), "{f}");
        assert_eq!(get(f, "SHARED"), (200, "tenant-wide-value".into()), "{f}");
        assert_eq!(get(f, "region"), (200, "eu-west".into()), "{f}");
        assert_eq!(get(f, "missing").0, 404, "{f}");
    }
    assert_eq!(get("nosy", "API_KEY").0, 404);
    assert_eq!(get("nosy", "SHARED").0, 404);
    assert_eq!(get("nosy", "region"), (200, "eu-west".into()));

    // Rotation: the next request reads the new value.
    let out = set_secret(&node, "API_KEY", &["--function", "rs"], SECOND);
    assert!(out.contains("updated"), "{out}");
    assert_eq!(get("rs", "API_KEY"), (200, SECOND.to_string()));
    assert_eq!(get("py", "API_KEY"), (200, FIRST.to_string()));

    // Listed by name, never by value; `verge show` shows config values
    // and secret names.
    let ls = node.cli_ok(&["secret", "ls"]);
    assert!(ls.contains("API_KEY") && ls.contains("function:rs"), "{ls}");
    assert!(ls.contains("tenant:default"), "{ls}");
    let shown = node.cli_ok(&["show", "rs", "--json"]);
    assert!(
        shown.contains("eu-west") && shown.contains("API_KEY"),
        "{shown}"
    );

    // Nowhere else: not in the data directory (database, logs), the API,
    // the records or the node's log.
    node.cli_ok(&["secret", "rm", "SHARED", "--tenant", "default"]);
    assert_eq!(get("rs", "SHARED").0, 404);
    for value in [FIRST, SECOND, "tenant-wide-value"] {
        let files = files_holding(&node.data_dir, value.as_bytes());
        assert!(
            files.is_empty(),
            "{value} is stored in the clear in {files:?}"
        );
        for path in [
            "/v1/secrets",
            "/v1/functions/rs",
            "/v1/functions/rs/versions",
            "/v1/invocations?limit=1000",
            "/v1/logs?limit=1000",
            "/v1/usage",
        ] {
            let body = node.api_get(path).text().unwrap();
            assert!(!body.contains(value), "{path} shows {value}");
        }
        assert!(!node.log().contains(value), "the node's log shows {value}");
    }
    // A removed secret is gone for its guests too.
    node.cli_ok(&["secret", "rm", "API_KEY", "--function", "rs"]);
    assert_eq!(get("rs", "API_KEY").0, 404);
    assert!(
        node.cli_err(&["secret", "rm", "API_KEY", "--function", "rs"])
            .contains("no secret")
    );
}

#[test]
fn functions_call_functions_in_process_with_their_parent_and_a_hop_limit() {
    let node = TestNode::start_with(&["--hop-limit", "5"]);
    for (name, next) in [("a", Some("b")), ("b", Some("c")), ("c", None)] {
        let name_env = format!("NAME={name}");
        let mut args = vec!["--env", &name_env];
        let next_env;
        if let Some(n) = next {
            next_env = format!("NEXT={n}");
            args.extend(["--env", &next_env, "--allow-call", n]);
        }
        deploy(&node, "rust-fetch", name, &args);
    }
    let r = node
        .http()
        .get(format!("{}/a/chain", node.url))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let a_id = r.headers()["verge-invocation-id"]
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(r.text().unwrap(), "a>b>c");
    // Each call is an invocation of its own, with the caller as its parent.
    let b = only_record(&node, "b");
    let c = only_record(&node, "c");
    assert_eq!(b["parent_id"], a_id.as_str(), "{b}");
    assert_eq!(c["parent_id"], b["invocation_id"], "{c}");
    assert_eq!(b["outcome"], "ok");
    let a = record(&node, &a_id);
    assert!(a.get("parent_id").is_none(), "{a}");
    // Calls are not outbound traffic.
    assert!(a.get("outbound_requests").is_none(), "{a}");

    // Without --allow-call: refused, and the guest's log says what to add.
    deploy(
        &node,
        "rust-fetch",
        "lone",
        &["--env", "NAME=lone", "--env", "NEXT=c"],
    );
    let a = answer(
        node.http()
            .get(format!("{}/lone/chain", node.url))
            .send()
            .unwrap(),
    );
    assert_eq!(a.status, 502);
    assert!(a.text().contains("HttpRequestDenied"), "{}", a.text());
    assert!(stderr_of(&node, &a.id).contains("--allow-call c"));

    // A cycle stops at the hop limit.
    for (name, next) in [("x", "y"), ("y", "x")] {
        deploy(
            &node,
            "rust-fetch",
            name,
            &[
                "--env",
                &format!("NAME={name}"),
                "--env",
                &format!("NEXT={next}"),
                "--allow-call",
                next,
            ],
        );
    }
    let r = node
        .http()
        .get(format!("{}/x/chain", node.url))
        .send()
        .unwrap();
    let status = r.status().as_u16();
    let body = r.text().unwrap();
    assert_eq!(status, 508, "{body}");
    assert!(body.starts_with("x>[508] y>[508] x>[508] y>"), "{body}");
    assert!(body.contains("limit 5"), "{body}");
}
