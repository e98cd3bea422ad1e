//! Reading and storing values of growing size: `get` latency p50 and the
//! bytes of the stored entry, per value size.
//!
//! Run: `cargo bench -p verge-kv --bench values`

use std::time::{Duration, Instant};

use verge_kv::{Kv, Value};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let kv = Kv::open(dir.path(), 1)?;
    println!("| value | stored entry | get p50 | get p99 |");
    println!("|---|---|---|---|");
    for (size, label, reads) in [
        (1usize << 10, "1 KiB", 2000),
        (64 << 10, "64 KiB", 500),
        (1 << 20, "1 MiB", 100),
    ] {
        // Binary, as a guest may store it.
        let value: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
        let key = format!("k{size}");
        kv.set("bench", &key, &value)?;
        let mut times: Vec<Duration> = Vec::with_capacity(reads);
        for _ in 0..reads {
            let t = Instant::now();
            let got = kv.get("bench", &key)?;
            times.push(t.elapsed());
            assert!(matches!(got, Some(Value::Bytes(ref b)) if b.len() == size));
        }
        times.sort();
        let entry: usize = rusqlite::Connection::open(dir.path().join("kv.db"))?.query_row(
            "SELECT length(entry) FROM entries WHERE key = ?1",
            [&key],
            |r| r.get(0),
        )?;
        println!(
            "| {label} | {} | {:.1} µs | {:.1} µs |",
            human(entry),
            times[reads / 2].as_secs_f64() * 1e6,
            times[reads * 99 / 100].as_secs_f64() * 1e6,
        );
    }
    Ok(())
}

fn human(n: usize) -> String {
    if n >= 1 << 20 {
        format!("{:.2} MiB", n as f64 / (1u64 << 20) as f64)
    } else {
        format!("{:.1} KiB", n as f64 / 1024.0)
    }
}
