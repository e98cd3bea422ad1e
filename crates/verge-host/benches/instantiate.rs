//! In-process cost of serving one request: instantiate a fresh instance of a
//! pre-instantiated component, and instantiate + handle a GET to completion.
//!
//! Run: `cargo xtask guests && cargo bench -p verge-host --bench instantiate`
//! (fixtures are read from target/guests, or $VERGE_GUESTS_DIR).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty};
use verge_host::{Function, Host, HostConfig};

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    let i = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[i]
}

fn us(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e6)
}

#[allow(unsafe_code)]
fn main() -> anyhow::Result<()> {
    // As `verge up` does: wasmtime builds an error on every store drop
    // (fiber disposal), and with RUST_BACKTRACE=1 in the environment each
    // would capture a backtrace, which is not what the node pays.
    // SAFETY: no other thread exists yet.
    unsafe { std::env::set_var("RUST_LIB_BACKTRACE", "0") };
    let dir = std::env::var_os("VERGE_GUESTS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/guests"));
    // VERGE_BENCH_CACHE keeps compiled code between runs (for profiling);
    // VERGE_BENCH_ONLY=name runs one guest; VERGE_BENCH_ITERATIONS=n
    // overrides the number of measured requests.
    let tmp = tempfile::tempdir()?;
    let cache = std::env::var_os("VERGE_BENCH_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| tmp.path().to_path_buf());
    let only = std::env::var("VERGE_BENCH_ONLY").ok();
    let mut config = HostConfig::new(&cache);
    // VERGE_BENCH_PLAIN=1: no metering and no slow lane (what they cost).
    if std::env::var_os("VERGE_BENCH_PLAIN").is_some() {
        config.metering = false;
        config.demote_after = None;
    }
    let host = Host::new(config)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    println!(
        "| guest | size | compile | load from cache | instantiate p50 | instantiate p99 | instantiate+handle p50 | instantiate+handle p99 |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (name, iterations) in [
        ("rust-hello", 5000),
        ("c-hello", 5000),
        ("js-hello", 1000),
        ("python-hello", 1000),
    ] {
        if only.as_deref().is_some_and(|o| o != name) {
            continue;
        }
        let iterations = std::env::var("VERGE_BENCH_ITERATIONS")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(iterations);
        let path = dir.join(format!("{name}.wasm"));
        let Ok(bytes) = std::fs::read(&path) else {
            eprintln!(
                "skipping {name}: {} missing (run `cargo xtask guests`)",
                path.display()
            );
            continue;
        };
        let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
        let compiled = host.load(&sha, || Ok(bytes.clone()))?;
        let compile = compiled.load_time;
        // Measure the code a node serves once settled: large components
        // start on baseline code, optimized code replaces it.
        if host.wants_optimizing(&compiled) {
            host.optimize(&compiled, || Ok(bytes.clone()))?;
        }
        let cached = host.load(&sha, || Ok(bytes.clone()))?;
        let from_cache = cached.load_time;
        let function = Function::new(Arc::new(cached), name, 1, Vec::new());

        let mut inst = Vec::with_capacity(iterations);
        let mut full = Vec::with_capacity(iterations);
        rt.block_on(async {
            for i in 0..iterations + 100 {
                let t = Instant::now();
                host.instantiate_only(&function).await?;
                let a = t.elapsed();
                let req = http::Request::builder()
                    .uri("http://localhost/")
                    .body(Empty::<bytes::Bytes>::new())?;
                let t = Instant::now();
                let resp = host.invoke(&function, "bench", req).await?;
                let body = resp.into_body().collect().await?.to_bytes();
                let b = t.elapsed();
                anyhow::ensure!(body.starts_with(b"Hello"), "unexpected body {body:?}");
                if i >= 100 {
                    inst.push(a);
                    full.push(b);
                }
            }
            Ok::<_, anyhow::Error>(())
        })?;
        println!(
            "| {name} | {} KB | {:.0} ms | {:.1} ms | {} µs | {} µs | {} µs | {} µs |",
            bytes.len() / 1000,
            compile.as_secs_f64() * 1e3,
            from_cache.as_secs_f64() * 1e3,
            us(percentile(&mut inst, 0.5)),
            us(percentile(&mut inst, 0.99)),
            us(percentile(&mut full, 0.5)),
            us(percentile(&mut full, 0.99)),
        );
    }
    Ok(())
}
