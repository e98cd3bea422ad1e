//! In-process cost of serving one request: instantiate a fresh instance of a
//! pre-instantiated component, and instantiate + handle a GET to completion.
//!
//! Run: `cargo xtask guests && cargo bench -p verge-host --bench instantiate`
//! (fixtures are read from target/guests, or $VERGE_GUESTS_DIR).
//!
//! A second table measures the floor under Verge's figures: the same
//! component, on the same wasmtime configuration, served by wasmtime and
//! wasmtime-wasi-http alone (wired as their documentation shows, no Verge
//! code on the path), and instantiated in a bare `Store<()>` with every import
//! a trap (no WASI context at all). `VERGE_BENCH_FLOOR=0` skips it.

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

/// `VERGE_BENCH_ITERATIONS`, or `default` measured requests.
fn iterations_or(default: usize) -> usize {
    std::env::var("VERGE_BENCH_ITERATIONS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(default)
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
    let mut host = Host::new(config.clone())?;
    // As the node's usage ledger takes records: pushed under a mutex,
    // handed over in batches of 512 to a thread of its own (which here
    // only drops them), so that the loop pays what a node's request pays.
    if config.metering {
        let pending = Arc::new(std::sync::Mutex::new(Vec::with_capacity(512)));
        let (tx, rx) = std::sync::mpsc::channel::<Vec<verge_spec::UsageRecord>>();
        std::thread::spawn(move || {
            for batch in rx {
                drop(batch)
            }
        });
        let tx = std::sync::Mutex::new(tx);
        host.set_usage_sink(Arc::new(move |record| {
            let mut p = pending
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            p.push(record);
            if p.len() >= 512 {
                let batch = std::mem::replace(&mut *p, Vec::with_capacity(512));
                let _ = tx
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .send(batch);
            }
        }));
    }
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
        let iterations = iterations_or(iterations);
        let path = dir.join(format!("{name}.wasm"));
        let Ok(bytes) = std::fs::read(&path) else {
            eprintln!(
                "skipping {name}: {} missing (run `cargo xtask guests`)",
                path.display()
            );
            continue;
        };
        let (function, compile, from_cache) = load(&host, name, &bytes)?;

        let mut inst = Vec::with_capacity(iterations);
        let mut full = Vec::with_capacity(iterations);
        rt.block_on(async {
            for i in 0..iterations + 100 {
                let t = Instant::now();
                host.instantiate_only(&function).await?;
                let a = t.elapsed();
                let b = verge_request(&host, &function).await?;
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
    if std::env::var("VERGE_BENCH_FLOOR").as_deref() != Ok("0") {
        floor::table(&dir, only.as_deref(), &config, &host, &rt)?;
    }
    Ok(())
}

/// Loads `bytes` as a node does, and returns the function with the time its
/// first load (compile) and a load from the cache took. Measures the code a
/// node serves once settled: large components start on baseline code,
/// optimized code replaces it.
fn load(host: &Host, name: &str, bytes: &[u8]) -> anyhow::Result<(Function, Duration, Duration)> {
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(bytes));
    let compiled = host.load(&sha, || Ok(bytes.to_vec()))?;
    let compile = compiled.load_time;
    if host.wants_optimizing(&compiled) {
        host.optimize(&compiled, || Ok(bytes.to_vec()))?;
    }
    let cached = host.load(&sha, || Ok(bytes.to_vec()))?;
    let from_cache = cached.load_time;
    Ok((
        // The environment every node function gets.
        Function::new(
            Arc::new(cached),
            name,
            1,
            vec![(
                "VERGE_EVENTS_URL".to_string(),
                verge_host::EVENTS_URL.to_string(),
            )],
        ),
        compile,
        from_cache,
    ))
}

/// One GET through Verge's host, from the call to the last byte of the body.
async fn verge_request(host: &Host, function: &Function) -> anyhow::Result<Duration> {
    let req = http::Request::builder()
        .uri("http://localhost/")
        .body(Empty::<bytes::Bytes>::new())?;
    let t = Instant::now();
    let resp = host.invoke(function, "bench", req).await?;
    let body = resp.into_body().collect().await?.to_bytes();
    let b = t.elapsed();
    anyhow::ensure!(body.starts_with(b"Hello"), "unexpected body {body:?}");
    Ok(b)
}

/// wasmtime and wasmtime-wasi-http without Verge.
mod floor {
    use std::path::Path;
    use std::time::{Duration, Instant};

    use http_body_util::{BodyExt, Empty};
    use wasmtime::component::{Component, InstancePre, Linker, ResourceTable};
    use wasmtime::{Engine, Store};
    use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
    use wasmtime_wasi_http::p2::bindings::ProxyPre;
    use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
    use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

    use super::{iterations_or, percentile, us};

    /// The smallest store data wasmtime-wasi-http serves with.
    struct Plain {
        wasi: WasiCtx,
        http: WasiHttpCtx,
        table: ResourceTable,
    }

    impl WasiView for Plain {
        fn ctx(&mut self) -> WasiCtxView<'_> {
            WasiCtxView {
                ctx: &mut self.wasi,
                table: &mut self.table,
            }
        }
    }

    impl WasiHttpView for Plain {
        fn http(&mut self) -> WasiHttpCtxView<'_> {
            WasiHttpCtxView {
                ctx: &mut self.http,
                table: &mut self.table,
                hooks: Default::default(),
            }
        }
    }

    fn plain() -> Plain {
        Plain {
            wasi: WasiCtx::builder().build(),
            http: WasiHttpCtx::new(),
            table: ResourceTable::new(),
        }
    }

    pub fn table(
        dir: &Path,
        only: Option<&str>,
        config: &verge_host::HostConfig,
        host: &verge_host::Host,
        rt: &tokio::runtime::Runtime,
    ) -> anyhow::Result<()> {
        let engine = Engine::new(&verge_host::wasmtime_config(
            config,
            verge_host::Tier::Optimized,
        ))?;
        println!();
        println!(
            "| guest | wasmtime alone: instantiate+drop, imports trap, p50 | p99 | wasmtime + wasmtime-wasi-http: instantiate+handle p50 | p99 | Verge, same loop: instantiate+handle p50 | p99 |"
        );
        println!("|---|---|---|---|---|---|---|");
        if only.is_none() {
            // The least a component can be: one core module, one page of
            // memory, no imports, no table, nothing to initialize.
            let empty = wat::parse_str(
                r#"(component
                    (core module $m (memory (export "memory") 1) (func (export "f")))
                    (core instance (instantiate $m)))"#,
            )?;
            let empty = Component::new(&engine, empty)?;
            let pre = Linker::<()>::new(&engine).instantiate_pre(&empty)?;
            let mut inst: Vec<Duration> = Vec::with_capacity(5000);
            rt.block_on(async {
                for i in 0..5100 {
                    let t = Instant::now();
                    let mut store = Store::new(&engine, ());
                    store.set_epoch_deadline(u64::MAX);
                    pre.instantiate_async(&mut store).await?;
                    drop(store);
                    if i >= 100 {
                        inst.push(t.elapsed());
                    }
                }
                Ok::<_, anyhow::Error>(())
            })?;
            println!(
                "| empty component | {} µs | {} µs | - | - | - | - |",
                us(percentile(&mut inst, 0.5)),
                us(percentile(&mut inst, 0.99)),
            );
        }
        for (name, iterations) in [
            ("rust-hello", 5000),
            ("c-hello", 5000),
            ("python-hello", 1000),
        ] {
            if only.is_some_and(|o| o != name) {
                continue;
            }
            let iterations = iterations_or(iterations);
            let Ok(bytes) = std::fs::read(dir.join(format!("{name}.wasm"))) else {
                continue;
            };
            let component = Component::new(&engine, &bytes)?;
            let mut bare = Linker::<()>::new(&engine);
            bare.define_unknown_imports_as_traps(&component)?;
            let bare: InstancePre<()> = bare.instantiate_pre(&component)?;
            let mut linker = Linker::<Plain>::new(&engine);
            wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
            wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
            let proxy = ProxyPre::new(linker.instantiate_pre(&component)?)?;
            let function = super::load(host, name, &bytes)?.0;

            let mut inst: Vec<Duration> = Vec::with_capacity(iterations);
            let mut full: Vec<Duration> = Vec::with_capacity(iterations);
            let mut verge: Vec<Duration> = Vec::with_capacity(iterations);
            rt.block_on(async {
                for i in 0..iterations + 100 {
                    let t = Instant::now();
                    let mut store = Store::new(&engine, ());
                    store.set_epoch_deadline(u64::MAX);
                    bare.instantiate_async(&mut store).await?;
                    drop(store);
                    let a = t.elapsed();

                    let req =
                        http::Request::builder()
                            .uri("http://localhost/")
                            .body(Empty::<bytes::Bytes>::new().map_err(
                                |never| -> wasmtime_wasi_http::Error { match never {} },
                            ))?;
                    let t = Instant::now();
                    let mut store = Store::new(&engine, plain());
                    store.set_epoch_deadline(u64::MAX);
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    let req = store
                        .data_mut()
                        .http()
                        .new_incoming_request(Scheme::Http, req)?;
                    let out = store.data_mut().http().new_response_outparam(tx)?;
                    let task = tokio::spawn({
                        let proxy = proxy.clone();
                        async move {
                            let p = proxy.instantiate_async(&mut store).await?;
                            p.wasi_http_incoming_handler()
                                .call_handle(&mut store, req, out)
                                .await
                        }
                    });
                    let resp = rx.await??;
                    let body = resp.into_body().collect().await?.to_bytes();
                    task.await??;
                    let b = t.elapsed();
                    anyhow::ensure!(body.starts_with(b"Hello"), "unexpected body {body:?}");

                    let c = super::verge_request(host, &function).await?;
                    if i >= 100 {
                        inst.push(a);
                        full.push(b);
                        verge.push(c);
                    }
                }
                Ok::<_, anyhow::Error>(())
            })?;
            println!(
                "| {name} | {} µs | {} µs | {} µs | {} µs | {} µs | {} µs |",
                us(percentile(&mut inst, 0.5)),
                us(percentile(&mut inst, 0.99)),
                us(percentile(&mut full, 0.5)),
                us(percentile(&mut full, 0.99)),
                us(percentile(&mut verge, 0.5)),
                us(percentile(&mut verge, 0.99)),
            );
        }
        Ok(())
    }
}
