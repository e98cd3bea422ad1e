//! What a version may reach (deploy flags) and `verge secret`.

use std::io::Read;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::Value;

use crate::client::Client;
use crate::{form_url, print_json, query_string, table};

/// Deploy flags granting outbound HTTP, calls, configuration and secrets.
#[derive(Args, Debug, Default)]
pub struct GrantArgs {
    /// Let the function send HTTP requests to [SCHEME://]HOST[:PORT][/PATH]
    /// (repeatable), for example https://api.example.com, https://*.example.com
    /// or * for any host [default: none]
    #[arg(long = "allow-outbound", value_name = "URL")]
    allow_outbound: Vec<String>,
    /// Let allowed hosts resolve to addresses in this private, loopback or
    /// link-local range (repeatable), for example 10.0.0.0/8 [default: refused]
    #[arg(long = "allow-private", value_name = "CIDR")]
    allow_private: Vec<String>,
    /// Trust the CA certificates in this PEM file for HTTPS, besides the platform's roots
    #[arg(long = "outbound-ca", value_name = "FILE")]
    outbound_ca: Option<PathBuf>,
    /// Let the function call function NAME in process at http://NAME.fn.verge.internal/ (repeatable)
    #[arg(long = "allow-call", value_name = "NAME")]
    allow_call: Vec<String>,
    /// KEY=VALUE the guest reads through wasi:config (repeatable; shown by `verge show`)
    #[arg(long = "config", value_name = "K=V")]
    config: Vec<String>,
    /// Give the guest secret NAME through wasi:config (repeatable; set it with `verge secret set`)
    #[arg(long = "secret", value_name = "NAME")]
    secret: Vec<String>,
}

impl GrantArgs {
    /// The deploy's query parameters, each checked here first.
    pub fn query(&self) -> Result<Vec<(&'static str, String)>> {
        let mut out = Vec::new();
        for r in &self.allow_outbound {
            verge_spec::OutboundRule::parse(r)?;
            out.push(("allow_outbound", r.clone()));
        }
        for c in &self.allow_private {
            verge_spec::Cidr::parse(c)?;
            out.push(("allow_private", c.clone()));
        }
        if let Some(path) = &self.outbound_ca {
            let pem = std::fs::read_to_string(path)
                .with_context(|| format!("--outbound-ca: could not read {}", path.display()))?;
            out.push(("outbound_ca", pem));
        }
        for f in &self.allow_call {
            verge_spec::validate_function_name(f).context("--allow-call")?;
            out.push(("allow_call", f.clone()));
        }
        for kv in &self.config {
            let Some((k, _)) = kv.split_once('=') else {
                bail!("--config {kv:?}: write it as KEY=VALUE");
            };
            verge_spec::validate_config_key(k)?;
            out.push(("config", kv.clone()));
        }
        for s in &self.secret {
            verge_spec::validate_secret_name(s)?;
            out.push(("secret", s.clone()));
        }
        Ok(out)
    }
}

#[derive(Subcommand)]
pub enum SecretAction {
    /// Set a secret from standard input (one trailing newline dropped):
    /// `printf %s "$KEY" | verge secret set API_KEY --function pay`. A new
    /// value takes effect at the next request, without a redeploy.
    Set {
        name: String,
        #[command(flatten)]
        scope: Scope,
    },
    /// List secrets: names, scopes and dates, never values
    Ls,
    /// Remove a secret
    Rm {
        name: String,
        #[command(flatten)]
        scope: Scope,
    },
}

/// Whose secret: a function's, or a tenant's (every function of it).
#[derive(Args, Debug)]
pub struct Scope {
    /// The secret belongs to this function
    #[arg(long, conflicts_with = "tenant")]
    function: Option<String>,
    /// The secret belongs to this tenant's functions [default: the default tenant]
    #[arg(long)]
    tenant: Option<String>,
}

impl Scope {
    fn query(&self) -> String {
        let mut q = Vec::new();
        if let Some(f) = &self.function {
            q.push(("function", f.as_str()));
        }
        if let Some(t) = &self.tenant {
            q.push(("tenant", t.as_str()));
        }
        query_string(&form_url(q))
    }
}

pub async fn secret(client: &Client, json: bool, action: SecretAction) -> Result<()> {
    match action {
        SecretAction::Set { name, scope } => {
            verge_spec::validate_secret_name(&name)?;
            let mut value = Vec::new();
            std::io::stdin()
                .take(verge_spec::MAX_SECRET_BYTES as u64 + 2)
                .read_to_end(&mut value)
                .context("could not read the secret from standard input")?;
            if value.ends_with(b"\n") {
                value.pop();
                if value.ends_with(b"\r") {
                    value.pop();
                }
            }
            let path = format!("/v1/secrets/{name}{}", scope.query());
            let v: Value = client
                .json(client.request(Method::PUT, &path).body(value))
                .await?;
            if json {
                return print_json(&v);
            }
            let verb = if v["created"].as_bool() == Some(true) {
                "set"
            } else {
                "updated"
            };
            println!(
                "secret {name} {verb} ({}); versions granted it (--secret {name}) read the new value from their next request",
                v["scope"].as_str().unwrap_or("")
            );
            Ok(())
        }
        SecretAction::Ls => {
            let v: Value = client.get("/v1/secrets").await?;
            if json {
                return print_json(&v);
            }
            let rows: Vec<Vec<String>> = v
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| {
                    ["name", "scope", "created_at", "updated_at"]
                        .iter()
                        .map(|k| s[*k].as_str().unwrap_or("").to_string())
                        .collect()
                })
                .collect();
            if rows.is_empty() {
                println!("no secrets; set one with `verge secret set NAME --function F < file`");
                return Ok(());
            }
            print!(
                "{}",
                table::render(&["NAME", "SCOPE", "CREATED", "UPDATED"], &rows)
            );
            Ok(())
        }
        SecretAction::Rm { name, scope } => {
            verge_spec::validate_secret_name(&name)?;
            let path = format!("/v1/secrets/{name}{}", scope.query());
            client.send(client.request(Method::DELETE, &path)).await?;
            if json {
                return print_json(&serde_json::json!({ "removed": name }));
            }
            println!("secret {name} removed");
            Ok(())
        }
    }
}
