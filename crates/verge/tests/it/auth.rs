//! The control API needs the admin token; user routes do not.

use crate::kit::TestNode;

#[test]
fn the_api_needs_a_token_and_says_nothing_without_one() {
    let node = TestNode::start();
    node.deploy("rust-hello", "hello", "/hello");
    let token = node.token();
    let hex = token.strip_prefix("verge_").unwrap();
    assert!(hex.len() * 4 >= 128, "at least 128 bits");
    assert!(
        node.stdout.contains("admin.token"),
        "the start prints where the token is: {}",
        node.stdout
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(node.data_dir.join("admin.token"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    // Only the hash is stored in the database.
    let db = std::fs::read(node.data_dir.join("verge.db")).unwrap();
    let wal = std::fs::read(node.data_dir.join("verge.db-wal")).unwrap_or_default();
    let needle = hex.as_bytes();
    for bytes in [&db, &wal] {
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle),
            "token stored in clear"
        );
    }

    let http = node.http();
    for (method, path) in verge_paths() {
        let req = http.request(method.parse().unwrap(), format!("{}{path}", node.url));
        let resp = req.send().unwrap();
        assert_eq!(resp.status(), 401, "{method} {path} without a token");
        // A problem body like every API error (issue 14), that says nothing
        // but how to authenticate.
        let problem: serde_json::Value = resp.json().unwrap();
        assert_eq!(problem["status"], 401, "{problem}");
        assert_eq!(
            problem["detail"], "send a valid token as Authorization: Bearer TOKEN",
            "{method} {path}"
        );
        let resp = http
            .request(method.parse().unwrap(), format!("{}{path}", node.url))
            .bearer_auth("verge_0000")
            .send()
            .unwrap();
        assert_eq!(resp.status(), 401, "{method} {path} with a wrong token");
    }
    assert_eq!(
        http.get(format!("{}/v1/health", node.url))
            .send()
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        http.get(format!("{}/hello", node.url))
            .send()
            .unwrap()
            .status(),
        200,
        "user routes are public"
    );
    let openapi = node.api_get("/v1/openapi.json");
    assert_eq!(openapi.status(), 200);
    let doc: serde_json::Value = openapi.json().unwrap();
    assert!(doc["paths"]["/v1/functions/{name}/versions"]["post"].is_object());

    // The CLI finds the token through the data directory, and says what to do when it cannot.
    let out = std::process::Command::new(crate::kit::VERGE)
        .args(["ls", "--data-dir"])
        .arg(&node.data_dir)
        .env_remove("VERGE_SERVER")
        .env_remove("VERGE_TOKEN")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("hello"));
    let out = std::process::Command::new(crate::kit::VERGE)
        .args(["ls"])
        .env("VERGE_SERVER", &node.url)
        .env("VERGE_TOKEN", "verge_wrong")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("VERGE_TOKEN"));
}

fn verge_paths() -> Vec<(&'static str, String)> {
    verge_node::API_ROUTES
        .iter()
        .filter(|(_, p)| *p != "/v1/health")
        .map(|(m, p)| (*m, p.replace("{name}", "hello")))
        .collect()
}
