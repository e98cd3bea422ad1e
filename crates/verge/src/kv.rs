//! `verge kv`: the node's replicated key-value store.

use anyhow::{Result, bail};
use clap::Subcommand;
use reqwest::Method;
use serde_json::Value;

use crate::client::Client;
use crate::{print_json, query_string, table};

#[derive(Subcommand)]
pub enum KvAction {
    /// Buckets on this node and their entry counts (tombstones included)
    Buckets,
    /// Read a key
    Get {
        bucket: String,
        key: String,
        /// Write the value's exact bytes to stdout (no newline), also when
        /// they are not UTF-8 text
        #[arg(long)]
        raw: bool,
    },
    /// Write a value
    Set {
        bucket: String,
        key: String,
        value: String,
    },
    /// Delete a key
    Del { bucket: String, key: String },
    /// Add to a counter (default 1; negative subtracts)
    Incr {
        bucket: String,
        key: String,
        #[arg(allow_hyphen_values = true)]
        by: Option<i64>,
    },
    /// List the keys of a bucket
    Ls {
        bucket: String,
        #[arg(long, default_value = "")]
        prefix: String,
    },
    /// This replica: node id, tombstones, collection, stale writes, clock skew, peers
    Status,
    /// Writes a re-bootstrap set aside instead of applying (newest first)
    Stale {
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
}

fn ago(ms: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    let s = now.saturating_sub(ms) / 1000;
    match s {
        0..=59 => format!("{s}s ago"),
        60..=3599 => format!("{}m ago", s / 60),
        3600..=86_399 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86_400),
    }
}

#[derive(Subcommand)]
pub enum TokenAction {
    /// Create a token: an admin token, or with --tenant one that may use only
    /// that tenant's key-value buckets, or with --replication one that may
    /// only replicate (what a peer or an edge holds), or with --metrics one
    /// that may only read /v1/metrics (what Prometheus holds). The token is
    /// shown once.
    Create {
        name: String,
        #[arg(long, conflicts_with_all = ["replication", "metrics"])]
        tenant: Option<String>,
        /// Limit the token to the replication endpoints (/v1/replication/...)
        #[arg(long, conflicts_with = "metrics")]
        replication: bool,
        /// Limit the token to reading the node's metrics (/v1/metrics)
        #[arg(long)]
        metrics: bool,
    },
    /// List tokens (names and tenants; never the tokens)
    Ls,
    /// Remove a token
    Rm { name: String },
}

pub async fn token(client: &Client, json: bool, action: TokenAction) -> Result<()> {
    match action {
        TokenAction::Create {
            name,
            tenant,
            replication,
            metrics,
        } => {
            let scope = if metrics {
                Some(verge_spec::SCOPE_METRICS)
            } else {
                replication.then_some(verge_spec::SCOPE_REPLICATION)
            };
            let v: Value =
                client
                    .json(client.request(Method::POST, "/v1/tokens").json(
                        &serde_json::json!({ "name": name, "tenant": tenant, "scope": scope }),
                    ))
                    .await?;
            if json {
                return print_json(&v);
            }
            match (tenant, replication) {
                _ if metrics => println!(
                    "metrics token {name} (/v1/metrics only; for Prometheus' authorization.credentials):"
                ),
                (Some(t), _) => println!("token {name} for tenant {t} (key-value API only):"),
                (None, true) => {
                    println!(
                        "replication token {name} (/v1/replication/... only; for --peer-token):"
                    )
                }
                (None, false) => println!("admin token {name}:"),
            }
            println!("{}", v["token"].as_str().unwrap_or(""));
            println!("it is shown once; give it to its user as VERGE_TOKEN");
            Ok(())
        }
        TokenAction::Ls => {
            let v: Value = client.get("/v1/tokens").await?;
            if json {
                return print_json(&v);
            }
            let rows: Vec<Vec<String>> = v
                .as_array()
                .into_iter()
                .flatten()
                .map(|t| {
                    vec![
                        t["name"].as_str().unwrap_or("").to_string(),
                        t["tenant"].as_str().unwrap_or("(admin)").to_string(),
                        t["scope"].as_str().unwrap_or("all").to_string(),
                        t["created_at"].as_str().unwrap_or("").to_string(),
                    ]
                })
                .collect();
            print!(
                "{}",
                table::render(&["NAME", "TENANT", "SCOPE", "CREATED"], &rows)
            );
            Ok(())
        }
        TokenAction::Rm { name } => {
            client
                .send(client.request(Method::DELETE, &format!("/v1/tokens/{name}")))
                .await?;
            if json {
                return print_json(&serde_json::json!({ "removed": name }));
            }
            println!("removed token {name}");
            Ok(())
        }
    }
}

fn path(bucket: &str, key: &str) -> String {
    let enc: String = form_urlencoded::byte_serialize(key.as_bytes()).collect();
    format!("/v1/kv/{bucket}/{}", enc.replace('+', "%20"))
}

/// Adds `tenant=` to a path's query when one was given.
fn scoped(path: String, tenant: Option<&str>) -> String {
    match tenant {
        None => path,
        Some(t) => {
            let sep = if path.contains('?') { '&' } else { '?' };
            let enc: String = form_urlencoded::byte_serialize(t.as_bytes()).collect();
            format!("{path}{sep}tenant={enc}")
        }
    }
}

pub async fn kv(client: &Client, json: bool, tenant: Option<&str>, action: KvAction) -> Result<()> {
    let path = |bucket: &str, key: &str| scoped(path(bucket, key), tenant);
    match action {
        KvAction::Buckets => {
            let v: Value = client.get(&scoped("/v1/kv".into(), tenant)).await?;
            if json {
                return print_json(&v);
            }
            let rows: Vec<Vec<String>> = v
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|b| {
                            vec![
                                b["bucket"].as_str().unwrap_or("").to_string(),
                                b["tenant"].as_str().unwrap_or("").to_string(),
                                b["entries"].to_string(),
                            ]
                        })
                        .collect()
                })
                .unwrap_or_default();
            print!("{}", table::render(&["BUCKET", "TENANT", "ENTRIES"], &rows));
            Ok(())
        }
        KvAction::Get { bucket, key, raw } => {
            if raw {
                let r = client
                    .send(
                        client
                            .request(Method::GET, &path(&bucket, &key))
                            .header(reqwest::header::ACCEPT, "application/octet-stream"),
                    )
                    .await?;
                let bytes = r.bytes().await?;
                use std::io::Write;
                let mut out = std::io::stdout().lock();
                out.write_all(&bytes)?;
                out.flush()?;
                return Ok(());
            }
            let v: Value = client.get(&path(&bucket, &key)).await?;
            if json {
                return print_json(&v);
            }
            match v["kind"].as_str() {
                Some("count") => println!("{}", v["count"]),
                _ => println!("{}", v["value"].as_str().unwrap_or("")),
            }
            Ok(())
        }
        KvAction::Set { bucket, key, value } => {
            client
                .send(
                    client
                        .request(Method::PUT, &path(&bucket, &key))
                        .body(value),
                )
                .await?;
            if json {
                return print_json(&serde_json::json!({ "bucket": bucket, "key": key }));
            }
            println!("set {bucket}/{key}");
            Ok(())
        }
        KvAction::Del { bucket, key } => {
            client
                .send(client.request(Method::DELETE, &path(&bucket, &key)))
                .await?;
            if json {
                return print_json(&serde_json::json!({ "deleted": key }));
            }
            println!("deleted {bucket}/{key}");
            Ok(())
        }
        KvAction::Incr { bucket, key, by } => {
            let by = by.unwrap_or(1);
            let v: Value = client
                .json(client.request(
                    Method::POST,
                    &scoped(
                        format!(
                            "{}/incr{}",
                            self::path(&bucket, &key),
                            query_string(&format!("by={by}"))
                        ),
                        tenant,
                    ),
                ))
                .await?;
            if json {
                return print_json(&v);
            }
            println!("{}", v["count"]);
            Ok(())
        }
        KvAction::Ls { bucket, prefix } => {
            if bucket.is_empty() {
                bail!("give a bucket; list them with `verge kv buckets`");
            }
            let q: String = form_urlencoded::Serializer::new(String::new())
                .append_pair("prefix", &prefix)
                .finish();
            let v: Value = client
                .get(&scoped(format!("/v1/kv/{bucket}?{q}"), tenant))
                .await?;
            if json {
                return print_json(&v);
            }
            for k in v["keys"].as_array().into_iter().flatten() {
                println!("{}", k.as_str().unwrap_or(""));
            }
            Ok(())
        }
        KvAction::Status => {
            let v: Value = client.get("/v1/replication/status").await?;
            if json {
                return print_json(&v);
            }
            let n = |k: &str| v[k].as_u64().unwrap_or(0);
            println!("replica     {}", v["node"].as_str().unwrap_or("?"));
            println!(
                "entries     {} ({} tombstones)",
                n("entries"),
                n("tombstones")
            );
            println!(
                "collected   {} tombstones (grace {} s)",
                n("collected_total"),
                n("grace_ms") / 1000
            );
            println!(
                "stale       {} writes set aside by re-bootstraps",
                n("stale_total")
            );
            println!(
                "clock skew  {} remote stamps beyond {} ms ahead since start",
                n("skewed"),
                n("max_skew_ms")
            );
            for p in v["peers"].as_array().into_iter().flatten() {
                println!("peer        {}", p.as_str().unwrap_or(""));
            }
            let rows: Vec<Vec<String>> = v["replicas"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| {
                    vec![
                        r["node"].as_str().unwrap_or("").to_string(),
                        r["name"].as_str().unwrap_or("-").to_string(),
                        r["acked_seq"].to_string(),
                        r["pulled_seq"].to_string(),
                        ago(r["last_seen_ms"].as_u64().unwrap_or(0)),
                        if r["expired"].as_bool().unwrap_or(false) {
                            "expired".into()
                        } else {
                            "active".into()
                        },
                    ]
                })
                .collect();
            if !rows.is_empty() {
                println!();
                print!(
                    "{}",
                    table::render(
                        &[
                            "REPLICA",
                            "REACHED AS",
                            "ACKED",
                            "PULLED",
                            "LAST SEEN",
                            "STATE"
                        ],
                        &rows
                    )
                );
            }
            Ok(())
        }
        KvAction::Stale { limit } => {
            let v: Value = client
                .get(&format!("/v1/replication/stale?limit={limit}"))
                .await?;
            if json {
                return print_json(&v);
            }
            let rows: Vec<Vec<String>> = v
                .as_array()
                .into_iter()
                .flatten()
                .map(|w| {
                    let write = &w["write"];
                    let shown = if let Some(s) = write["value"].as_str() {
                        format!("set {s:?}")
                    } else if let Some(c) = write["count"].as_i64() {
                        format!("count {c}")
                    } else {
                        "delete".into()
                    };
                    vec![
                        w["at"].as_str().unwrap_or("").to_string(),
                        format!(
                            "{}/{}",
                            w["bucket"].as_str().unwrap_or(""),
                            w["key"].as_str().unwrap_or("")
                        ),
                        shown,
                        w["reason"].as_str().unwrap_or("").to_string(),
                    ]
                })
                .collect();
            if rows.is_empty() {
                println!("no stale writes");
            } else {
                print!(
                    "{}",
                    table::render(&["SET ASIDE", "KEY", "WRITE", "REASON"], &rows)
                );
            }
            Ok(())
        }
    }
}
