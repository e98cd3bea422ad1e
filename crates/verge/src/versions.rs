//! `verge versions`, `promote`, `canary`, `rollback` and `alias`: the
//! commands that move traffic between versions.

use anyhow::{Result, bail};
use clap::Subcommand;
use reqwest::Method;
use verge_spec::{Alias, AliasTarget, Canary, LIVE_ALIAS, VersionInfo};

use crate::client::Client;
use crate::{print_json, table};

#[derive(Subcommand)]
pub enum AliasAction {
    /// List a function's aliases
    Ls { name: String },
    /// Point an alias at a version (creating the alias), optionally with a canary
    Set {
        name: String,
        alias: String,
        version: u64,
        /// A second version that gets --weight percent of the requests
        #[arg(long, requires = "weight")]
        canary: Option<u64>,
        /// Percent of requests the canary gets (1-99)
        #[arg(long, requires = "canary")]
        weight: Option<u32>,
        /// Requests with the same value of this header always get the same version
        #[arg(long)]
        sticky_header: Option<String>,
        /// Requests with the same value of this cookie always get the same version
        #[arg(long)]
        sticky_cookie: Option<String>,
    },
    /// Remove an alias (not `live`, not one that routes use)
    Rm { name: String, alias: String },
}

fn alias_path(name: &str, alias: &str) -> String {
    format!("/v1/functions/{name}/aliases/{alias}")
}

async fn put(client: &Client, name: &str, alias: &str, target: &AliasTarget) -> Result<Alias> {
    client
        .json(
            client
                .request(Method::PUT, &alias_path(name, alias))
                .json(target),
        )
        .await
}

async fn current(client: &Client, name: &str, alias: &str) -> Result<Option<Alias>> {
    let aliases: Vec<Alias> = client.get(&format!("/v1/functions/{name}/aliases")).await?;
    Ok(aliases.into_iter().find(|a| a.name == alias))
}

fn print_alias(json: bool, name: &str, a: &Alias, verb: &str) -> Result<()> {
    if json {
        return print_json(a);
    }
    println!("{name}:{} {verb} {}", a.name, a.target.describe());
    if let Some(h) = &a.target.sticky_header {
        println!("sticky by header {h}");
    }
    if let Some(c) = &a.target.sticky_cookie {
        println!("sticky by cookie {c}");
    }
    Ok(())
}

/// `verge versions NAME`.
pub async fn versions(client: &Client, json: bool, name: &str) -> Result<()> {
    verge_spec::validate_function_name(name)?;
    let vs: Vec<VersionInfo> = client
        .get(&format!("/v1/functions/{name}/versions"))
        .await?;
    if json {
        return print_json(&vs);
    }
    let rows: Vec<Vec<String>> = vs
        .iter()
        .map(|v| {
            vec![
                v.version.to_string(),
                if v.aliases.is_empty() {
                    "-".into()
                } else {
                    v.aliases.join(",")
                },
                table::size(v.size),
                v.sha256.chars().take(12).collect(),
                v.code.clone().unwrap_or_else(|| "not loaded".into()),
                instances(v),
                v.deployed_by.clone(),
                v.created_at.clone(),
            ]
        })
        .collect();
    print!(
        "{}",
        table::render(
            &[
                "VERSION",
                "ALIASES",
                "SIZE",
                "SHA256",
                "CODE",
                "INSTANCES",
                "BY",
                "CREATED"
            ],
            &rows
        )
    );
    Ok(())
}

/// How a version gets its instances: `fresh` (one per request, the
/// default), `reuse N`, `prewarm K`, and whether reuse fell back.
fn instances(v: &VersionInfo) -> String {
    let mut parts = Vec::new();
    match v.reuse {
        Some(n) if n > 1 && v.reuse_fell_back => parts.push(format!("fresh (reuse {n} failed)")),
        Some(n) if n > 1 => parts.push(format!("reuse {n}")),
        _ => {}
    }
    if let Some(k) = v.prewarm.filter(|k| *k > 0) {
        parts.push(format!("prewarm {k}"));
    }
    if parts.is_empty() {
        "fresh".into()
    } else {
        parts.join(", ")
    }
}

/// `verge promote NAME VERSION [--alias A]`: all of the alias's traffic to one version.
pub async fn promote(
    client: &Client,
    json: bool,
    name: &str,
    version: u64,
    alias: &str,
) -> Result<()> {
    let a = put(client, name, alias, &AliasTarget::single(version)).await?;
    print_alias(json, name, &a, "->")
}

/// `verge canary NAME VERSION --weight W`: the alias keeps its main version
/// and sends W percent to VERSION.
pub async fn canary(
    client: &Client,
    json: bool,
    name: &str,
    version: u64,
    weight: u32,
    alias: &str,
    (sticky_header, sticky_cookie): (Option<String>, Option<String>),
) -> Result<()> {
    let Some(now) = current(client, name, alias).await? else {
        bail!(
            "function {name} has no alias {alias:?}; create it with `verge promote {name} VERSION --alias {alias}`"
        );
    };
    if now.target.version == version {
        bail!(
            "version {version} already gets the main share of {name}:{alias}; pick another version for the canary"
        );
    }
    let target = AliasTarget {
        version: now.target.version,
        canary: Some(Canary { version, weight }),
        sticky_header,
        sticky_cookie,
    };
    let a = put(client, name, alias, &target).await?;
    print_alias(json, name, &a, "->")
}

/// `verge rollback NAME [--alias A]`.
pub async fn rollback(client: &Client, json: bool, name: &str, alias: &str) -> Result<()> {
    let a: Alias = client
        .json(client.request(
            Method::POST,
            &format!("{}/rollback", alias_path(name, alias)),
        ))
        .await?;
    print_alias(json, name, &a, "rolled back to")
}

/// `verge alias ls|set|rm`.
pub async fn alias(client: &Client, json: bool, action: AliasAction) -> Result<()> {
    match action {
        AliasAction::Ls { name } => {
            let aliases: Vec<Alias> = client.get(&format!("/v1/functions/{name}/aliases")).await?;
            if json {
                return print_json(&aliases);
            }
            let rows: Vec<Vec<String>> = aliases
                .iter()
                .map(|a| {
                    let sticky = match (&a.target.sticky_header, &a.target.sticky_cookie) {
                        (Some(h), _) => format!("header {h}"),
                        (None, Some(c)) => format!("cookie {c}"),
                        _ => "-".into(),
                    };
                    vec![
                        a.name.clone(),
                        a.target.describe(),
                        sticky,
                        a.previous
                            .as_ref()
                            .map_or_else(|| "-".into(), AliasTarget::describe),
                        a.updated_at.clone(),
                    ]
                })
                .collect();
            print!(
                "{}",
                table::render(&["ALIAS", "TARGET", "STICKY", "PREVIOUS", "UPDATED"], &rows)
            );
            Ok(())
        }
        AliasAction::Set {
            name,
            alias,
            version,
            canary,
            weight,
            sticky_header,
            sticky_cookie,
        } => {
            let target = AliasTarget {
                version,
                canary: canary
                    .zip(weight)
                    .map(|(version, weight)| Canary { version, weight }),
                sticky_header,
                sticky_cookie,
            };
            let a = put(client, &name, &alias, &target).await?;
            print_alias(json, &name, &a, "->")
        }
        AliasAction::Rm { name, alias } => {
            if alias == LIVE_ALIAS {
                bail!(
                    "the live alias cannot be removed; point it elsewhere with `verge promote {name} VERSION`"
                );
            }
            client
                .send(client.request(Method::DELETE, &alias_path(&name, &alias)))
                .await?;
            if json {
                return print_json(&serde_json::json!({ "removed": alias }));
            }
            println!("removed alias {name}:{alias}");
            Ok(())
        }
    }
}
