//! The CLI's view of a node: where it is, the token, and JSON calls with
//! errors turned into sentences that say what to do.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde::de::DeserializeOwned;
use verge_spec::Problem;

/// The data directory used when neither `--data-dir` nor `VERGE_DATA_DIR` is given.
pub fn default_data_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("verge");
    }
    match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        Some(home) => PathBuf::from(home).join(".local/share/verge"),
        None => PathBuf::from("verge-data"),
    }
}

/// A client bound to one node.
pub struct Client {
    pub server: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Client {
    /// Finds the server (flag/`VERGE_SERVER`, else the node file in the data
    /// directory, else 127.0.0.1:8080) and the token (flag/`VERGE_TOKEN`, else
    /// the token file in the data directory).
    pub fn discover(
        server: Option<String>,
        token: Option<String>,
        data_dir: &Path,
    ) -> Result<Self> {
        let server = match server {
            Some(s) => s,
            None => read_node_url(data_dir).unwrap_or_else(|| "http://127.0.0.1:8080".into()),
        };
        let server = server.trim_end_matches('/').to_string();
        let token = match token {
            Some(t) => Some(t),
            None => std::fs::read_to_string(data_dir.join(verge_node::TOKEN_FILE))
                .ok()
                .map(|t| t.trim().to_string()),
        };
        let http = reqwest::Client::builder()
            .build()
            .context("while creating the HTTP client")?;
        Ok(Self {
            server,
            token,
            http,
        })
    }

    /// The node's URL.
    pub fn base_url(&self) -> &str {
        &self.server
    }

    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let mut rb = self.http.request(method, format!("{}{path}", self.server));
        if let Some(t) = &self.token {
            rb = rb.bearer_auth(t);
        }
        rb
    }

    /// Sends and checks the status; turns failures into actionable errors.
    pub async fn send(&self, rb: RequestBuilder) -> Result<Response> {
        let resp = rb.send().await.map_err(|e| {
            if e.is_connect() {
                anyhow!(
                    "could not reach a Verge node at {}; start one with `verge up`, or point at one with --server / VERGE_SERVER",
                    self.server
                )
            } else {
                anyhow!("request to {} failed: {e}", self.server)
            }
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        Err(self.error_of(resp).await)
    }

    async fn error_of(&self, resp: Response) -> anyhow::Error {
        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED {
            return anyhow!(
                "the node at {} refused the token; set VERGE_TOKEN (the token is in <data-dir>/{} on the node's machine) or pass --data-dir",
                self.server,
                verge_node::TOKEN_FILE
            );
        }
        let body = resp.text().await.unwrap_or_default();
        match serde_json::from_str::<Problem>(&body) {
            Ok(p) => anyhow!("{} ({}): {}", p.title, p.status, p.detail),
            Err(_) => anyhow!("the node answered {status}: {}", body.trim()),
        }
    }

    pub async fn json<T: DeserializeOwned>(&self, rb: RequestBuilder) -> Result<T> {
        let resp = self.send(rb).await?;
        resp.json().await.context("while reading the node's answer")
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.json(self.request(Method::GET, path)).await
    }
}

fn read_node_url(data_dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(data_dir.join(verge_node::NODE_FILE)).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["url"].as_str().map(str::to_string)
}
