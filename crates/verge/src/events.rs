//! `verge trigger`, `dlq`, `schedule`, `async` and asynchronous invocations.

use anyhow::Result;
use clap::Subcommand;
use reqwest::Method;
use serde_json::{Value, json};
use verge_bus::{AsyncConfig, Job, Schedule, Trigger};

use crate::client::Client;
use crate::{print_json, query_string, table};

#[derive(Subcommand)]
pub enum TriggerAction {
    /// Deliver events of a type to a function (`*` matches one dot-separated segment, a final `>` the rest)
    Add {
        name: String,
        /// Event type, for example com.acme.order.created or dev.verge.function.*
        #[arg(long = "on", value_name = "TYPE")]
        on: String,
        /// Only events from this source
        #[arg(long)]
        source: Option<String>,
        /// Only events whose subject starts with this
        #[arg(long)]
        subject_prefix: Option<String>,
        /// The function's alias the deliveries resolve through
        #[arg(long, default_value = verge_spec::LIVE_ALIAS)]
        alias: String,
    },
    /// List triggers (of one function, or all)
    Ls { name: Option<String> },
    /// Remove a trigger by id
    Rm { id: String },
}

#[derive(Subcommand)]
pub enum DlqAction {
    /// Dead-lettered jobs (of one function, or all), newest first
    Ls { name: Option<String> },
    /// One dead letter with its payload and last error
    Show { id: String },
    /// Queue a dead letter again with fresh attempts
    Replay { id: String },
    /// Delete dead letters (of one function, or all)
    Purge { name: Option<String> },
}

#[derive(Subcommand)]
pub enum ScheduleAction {
    /// Fire a function on a cron schedule: "*/5 * * * *" (or six fields, seconds first)
    Add {
        name: String,
        cron: String,
        /// IANA time zone the expression is read in
        #[arg(long, default_value = "UTC")]
        tz: String,
        /// After downtime: skip missed firings, or run once for them
        #[arg(long, default_value = "skip", value_parser = ["skip", "once"])]
        missed: String,
        #[arg(long, default_value = verge_spec::LIVE_ALIAS)]
        alias: String,
    },
    /// List schedules (of one function, or all)
    Ls { name: Option<String> },
    /// Remove a schedule by id
    Rm { id: String },
}

fn ms_label(ms: i64) -> String {
    verge_spec::rfc3339_ms(ms)
}

fn filter(name: &Option<String>) -> String {
    match name {
        Some(n) => query_string(&format!("function={n}")),
        None => String::new(),
    }
}

pub async fn trigger(client: &Client, json: bool, action: TriggerAction) -> Result<()> {
    match action {
        TriggerAction::Add {
            name,
            on,
            source,
            subject_prefix,
            alias,
        } => {
            let t: Trigger = client
                .json(client.request(Method::POST, "/v1/triggers").json(&json!({
                    "function": name, "type": on, "source": source,
                    "subject_prefix": subject_prefix, "alias": alias,
                })))
                .await?;
            if json {
                return print_json(&t);
            }
            println!("trigger {}: {} -> {}:{}", t.id, t.ty, t.function, t.alias);
            Ok(())
        }
        TriggerAction::Ls { name } => {
            let ts: Vec<Trigger> = client
                .get(&format!("/v1/triggers{}", filter(&name)))
                .await?;
            if json {
                return print_json(&ts);
            }
            let rows: Vec<Vec<String>> = ts
                .iter()
                .map(|t| {
                    vec![
                        t.id.clone(),
                        t.ty.clone(),
                        t.source.clone().unwrap_or_else(|| "*".into()),
                        t.subject_prefix.clone().unwrap_or_else(|| "*".into()),
                        format!("{}:{}", t.function, t.alias),
                    ]
                })
                .collect();
            print!(
                "{}",
                table::render(&["ID", "TYPE", "SOURCE", "SUBJECT", "FUNCTION"], &rows)
            );
            Ok(())
        }
        TriggerAction::Rm { id } => {
            client
                .send(client.request(Method::DELETE, &format!("/v1/triggers/{id}")))
                .await?;
            if json {
                return print_json(&json!({ "removed": id }));
            }
            println!("removed trigger {id}");
            Ok(())
        }
    }
}

fn job_rows(jobs: &[Job]) -> Vec<Vec<String>> {
    jobs.iter()
        .map(|j| {
            vec![
                j.id.clone(),
                format!("{}:{}", j.function, j.alias),
                match &j.payload {
                    verge_bus::Payload::Event { event } => format!("event {}", event.ty),
                    verge_bus::Payload::Invoke { path, .. } => format!("invoke {path}"),
                },
                format!("{}/{}", j.attempts, j.max_attempts),
                j.last_error.clone().unwrap_or_default(),
            ]
        })
        .collect()
}

pub async fn dlq(client: &Client, json: bool, action: DlqAction) -> Result<()> {
    match action {
        DlqAction::Ls { name } => {
            let jobs: Vec<Job> = client.get(&format!("/v1/dlq{}", filter(&name))).await?;
            if json {
                return print_json(&jobs);
            }
            if jobs.is_empty() {
                println!("no dead letters");
                return Ok(());
            }
            print!(
                "{}",
                table::render(
                    &["ID", "FUNCTION", "WHAT", "ATTEMPTS", "LAST ERROR"],
                    &job_rows(&jobs)
                )
            );
            Ok(())
        }
        DlqAction::Show { id } => {
            let job: Job = client.get(&format!("/v1/dlq/{id}")).await?;
            print_job(json, &job)
        }
        DlqAction::Replay { id } => {
            let job: Job = client
                .json(client.request(Method::POST, &format!("/v1/dlq/{id}/replay")))
                .await?;
            if json {
                return print_json(&job);
            }
            println!("queued {} again for {}:{}", job.id, job.function, job.alias);
            Ok(())
        }
        DlqAction::Purge { name } => {
            let r: Value = client
                .json(client.request(Method::DELETE, &format!("/v1/dlq{}", filter(&name))))
                .await?;
            if json {
                return print_json(&r);
            }
            println!("purged {} dead letters", r["purged"]);
            Ok(())
        }
    }
}

/// A job for people: status, attempts, last error.
pub fn print_job(json: bool, job: &Job) -> Result<()> {
    if json {
        return print_json(job);
    }
    println!("job       {}", job.id);
    println!("function  {}:{}", job.function, job.alias);
    println!("status    {:?}", job.state);
    println!("attempts  {} of {}", job.attempts, job.max_attempts);
    println!("created   {}", ms_label(job.created_ms));
    if let Some(e) = &job.last_error {
        println!("error     {e}");
    }
    match &job.payload {
        verge_bus::Payload::Event { event } => {
            println!("event     {} {} from {}", event.ty, event.id, event.source)
        }
        verge_bus::Payload::Invoke { path, body, .. } => {
            println!("invoke    POST {path} ({} bytes)", body.len())
        }
    }
    Ok(())
}

pub async fn job(client: &Client, json: bool, id: &str) -> Result<()> {
    let job: Job = client.get(&format!("/v1/jobs/{id}")).await?;
    print_job(json, &job)
}

pub async fn schedule(client: &Client, json: bool, action: ScheduleAction) -> Result<()> {
    match action {
        ScheduleAction::Add {
            name,
            cron,
            tz,
            missed,
            alias,
        } => {
            let s: Schedule = client
                .json(client.request(Method::POST, "/v1/schedules").json(&json!({
                    "function": name, "cron": cron, "tz": tz, "missed": missed, "alias": alias,
                })))
                .await?;
            if json {
                return print_json(&s);
            }
            println!(
                "schedule {}: \"{}\" ({}) -> {}:{}, next {}",
                s.id,
                s.cron,
                s.tz,
                s.function,
                s.alias,
                ms_label(s.next_ms)
            );
            Ok(())
        }
        ScheduleAction::Ls { name } => {
            let ss: Vec<Schedule> = client
                .get(&format!("/v1/schedules{}", filter(&name)))
                .await?;
            if json {
                return print_json(&ss);
            }
            let rows: Vec<Vec<String>> = ss
                .iter()
                .map(|s| {
                    vec![
                        s.id.clone(),
                        s.cron.clone(),
                        s.tz.clone(),
                        format!("{}:{}", s.function, s.alias),
                        s.missed.clone(),
                        ms_label(s.next_ms),
                        s.last_ms.map(ms_label).unwrap_or_else(|| "-".into()),
                    ]
                })
                .collect();
            print!(
                "{}",
                table::render(
                    &["ID", "CRON", "TZ", "FUNCTION", "MISSED", "NEXT", "LAST"],
                    &rows
                )
            );
            Ok(())
        }
        ScheduleAction::Rm { id } => {
            client
                .send(client.request(Method::DELETE, &format!("/v1/schedules/{id}")))
                .await?;
            if json {
                return print_json(&json!({ "removed": id }));
            }
            println!("removed schedule {id}");
            Ok(())
        }
    }
}

/// `verge async NAME [--retries N] [--max-age D] [--on-success T] [--on-failure T]`.
pub async fn async_config(client: &Client, json: bool, name: &str, body: Value) -> Result<()> {
    let path = format!("/v1/functions/{name}/async");
    let empty = body
        .as_object()
        .is_none_or(|o| o.values().all(Value::is_null));
    let c: AsyncConfig = if empty {
        client.get(&path).await?
    } else {
        client
            .json(client.request(Method::PUT, &path).json(&body))
            .await?
    };
    if json {
        return print_json(&c);
    }
    println!("retries     {}", c.max_retries);
    println!("max age     {} s", c.max_age_ms / 1000);
    println!("on success  {}", c.on_success.as_deref().unwrap_or("-"));
    println!("on failure  {}", c.on_failure.as_deref().unwrap_or("-"));
    Ok(())
}
