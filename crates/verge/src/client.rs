//! The CLI's view of a node: where it is, the token, and JSON calls with
//! errors turned into sentences that say what to do.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
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

/// Parses sizes such as `64MiB`, `512k`, `1048576`.
pub fn parse_size(s: &str) -> Result<usize> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: usize = num
        .parse()
        .map_err(|_| anyhow!("invalid size {s:?}; write for example 64MiB, 512KiB or 1048576"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => bail!("invalid size unit in {s:?}; use B, KiB, MiB or GiB"),
    };
    n.checked_mul(mult)
        .ok_or_else(|| anyhow!("size {s:?} is too large"))
}

/// Parses durations such as `30s`, `500ms`, `2m`.
pub fn parse_duration(s: &str) -> Result<std::time::Duration> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| anyhow!("invalid duration {s:?}; write for example 30s or 500ms"))?;
    Ok(match unit {
        "ms" => std::time::Duration::from_millis(n),
        "" | "s" => std::time::Duration::from_secs(n),
        "m" => std::time::Duration::from_secs(n * 60),
        _ => bail!("invalid duration unit in {s:?}; use ms, s or m"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_size("10").unwrap(), 10);
        assert!(parse_size("x").is_err());
        assert!(parse_size("1PB").is_err());
        assert_eq!(parse_duration("500ms").unwrap().as_millis(), 500);
        assert_eq!(parse_duration("2m").unwrap().as_secs(), 120);
    }
}
