//! Guest components for in-process tests, written as WebAssembly text: a
//! core module against the canonical ABI of `wasi:http` (and
//! `wasi:keyvalue`), wrapped into a component by `wit-component` with
//! Verge's own WIT. No guest toolchain is needed, and each build takes
//! milliseconds.

use std::path::Path;

/// Imports every guest here may use, by wit-component's names.
const IMPORTS: &str = r#"
  (import "wasi:http/types@0.2.12" "[constructor]fields" (func $fields_new (result i32)))
  (import "wasi:http/types@0.2.12" "[constructor]outgoing-response" (func $resp_new (param i32) (result i32)))
  (import "wasi:http/types@0.2.12" "[method]outgoing-response.set-status-code" (func $set_status (param i32 i32) (result i32)))
  (import "wasi:http/types@0.2.12" "[method]outgoing-response.body" (func $resp_body (param i32 i32)))
  (import "wasi:http/types@0.2.12" "[method]outgoing-body.write" (func $body_write (param i32 i32)))
  (import "wasi:http/types@0.2.12" "[static]outgoing-body.finish" (func $body_finish (param i32 i32 i32 i32)))
  (import "wasi:http/types@0.2.12" "[static]response-outparam.set" (func $out_set (param i32 i32 i32 i32 i64 i32 i32 i32 i32)))
  (import "wasi:http/types@0.2.12" "[method]incoming-request.path-with-query" (func $path (param i32 i32)))
  (import "wasi:io/streams@0.2.12" "[method]output-stream.blocking-write-and-flush" (func $write (param i32 i32 i32 i32)))
  (import "wasi:io/streams@0.2.12" "[resource-drop]output-stream" (func $drop_out (param i32)))
  (import "wasi:http/types@0.2.12" "[method]incoming-request.consume" (func $consume (param i32 i32)))
  (import "wasi:http/types@0.2.12" "[method]incoming-body.stream" (func $in_stream (param i32 i32)))
  (import "wasi:io/streams@0.2.12" "[method]input-stream.blocking-read" (func $read (param i32 i64 i32)))
"#;

const KV_IMPORTS: &str = r#"
  (import "wasi:keyvalue/store@0.2.0-draft" "open" (func $kv_open (param i32 i32 i32)))
  (import "wasi:keyvalue/store@0.2.0-draft" "[method]bucket.set" (func $kv_set (param i32 i32 i32 i32 i32 i32)))
  (import "wasi:keyvalue/atomics@0.2.0-draft" "increment" (func $kv_incr (param i32 i32 i32 i64 i32)))
"#;

/// Helpers: `$head` sends a response head with a status and returns the
/// body's handle; `$send` writes bytes and finishes the body; `$respond`
/// does both. Memory: 64.. scratch for results, 256.. data, 4096.. heap.
const HELPERS: &str = r#"
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 4096))
  (func (export "cabi_realloc") (param i32 i32 i32 i32) (result i32)
    (local $p i32)
    (local.set $p (i32.and (i32.add (global.get $heap) (i32.const 7)) (i32.const -8)))
    (global.set $heap (i32.add (local.get $p) (local.get 3)))
    (if (i32.gt_u (global.get $heap) (i32.mul (memory.size) (i32.const 65536)))
      (then (drop (memory.grow (i32.const 16)))))
    (local.get $p))
  (func $head (param $out i32) (param $status i32) (result i32)
    (local $resp i32)
    (local.set $resp (call $resp_new (call $fields_new)))
    (drop (call $set_status (local.get $resp) (local.get $status)))
    (call $resp_body (local.get $resp) (i32.const 64))
    (call $out_set (local.get $out) (i32.const 0) (local.get $resp)
      (i32.const 0) (i64.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0))
    (i32.load (i32.const 68)))
  (func $write_body (param $body i32) (param $ptr i32) (param $len i32)
    (local $stream i32)
    (call $body_write (local.get $body) (i32.const 64))
    (local.set $stream (i32.load (i32.const 68)))
    (call $write (local.get $stream) (local.get $ptr) (local.get $len) (i32.const 64))
    (call $drop_out (local.get $stream)))
  (func $send (param $body i32) (param $ptr i32) (param $len i32)
    (call $write_body (local.get $body) (local.get $ptr) (local.get $len))
    (call $body_finish (local.get $body) (i32.const 0) (i32.const 0) (i32.const 64)))
  (func $respond (param $out i32) (param $status i32) (param $ptr i32) (param $len i32)
    (call $send (call $head (local.get $out) (local.get $status)) (local.get $ptr) (local.get $len)))
"#;

/// A component whose `handle(request, out)` is `body` (WAT instructions;
/// locals `$req` and `$out`), with `data` at address 256.
pub fn guest(body: &str, data: &str, kv: bool) -> Vec<u8> {
    let wat = format!(
        r#"(module
  {IMPORTS}
  {kv_imports}
  {HELPERS}
  (data (i32.const 256) "{data}")
  (func (export "wasi:http/incoming-handler@0.2.12#handle") (param $req i32) (param $out i32)
    {body})
)"#,
        kv_imports = if kv { KV_IMPORTS } else { "" },
    );
    let mut module = wat::parse_str(&wat).unwrap_or_else(|e| panic!("{e}\n{wat}"));
    let mut resolve = wit_parser::Resolve::default();
    let wit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../wit");
    let (pkg, _) = resolve.push_dir(&wit).unwrap();
    let world = resolve.select_world(&[pkg], Some("function")).unwrap();
    wit_component::embed_component_metadata(
        &mut module,
        &resolve,
        world,
        wit_component::StringEncoding::UTF8,
    )
    .unwrap();
    wit_component::ComponentEncoder::default()
        .module(&module)
        .unwrap()
        .validate(true)
        .encode()
        .unwrap()
}

/// Answers 200 `hello`.
pub fn hello() -> Vec<u8> {
    guest(
        "(call $respond (local.get $out) (i32.const 200) (i32.const 256) (i32.const 5))",
        "hello",
        false,
    )
}

/// Answers 200 with the request's path and query.
pub fn path() -> Vec<u8> {
    guest(
        "(call $path (local.get $req) (i32.const 128))
         (call $respond (local.get $out) (i32.const 200)
           (i32.load (i32.const 132)) (i32.load (i32.const 136)))",
        "",
        false,
    )
}

/// Traps at once.
pub fn trap() -> Vec<u8> {
    guest("unreachable", "", false)
}

/// Spins until stopped.
pub fn spin() -> Vec<u8> {
    guest("(loop $l (br $l))", "", false)
}

/// Answers with an error code (`DNS-timeout`) instead of a response.
pub fn error_code() -> Vec<u8> {
    guest(
        "(call $out_set (local.get $out) (i32.const 1) (i32.const 0)
           (i32.const 0) (i64.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0))",
        "",
        false,
    )
}

/// Sends a 200 head and part of a body, then traps.
pub fn trap_after_head() -> Vec<u8> {
    guest(
        "(call $write_body (call $head (local.get $out) (i32.const 200)) (i32.const 256) (i32.const 7))
         unreachable",
        "partial",
        false,
    )
}

/// Opens the bucket `""` (the one `wasmtime serve -Skeyvalue` knows), sets
/// `k` to `v` and answers `stored`; on an error, answers 500 `kv error`.
pub fn kv_default_bucket() -> Vec<u8> {
    guest(
        ";; open(\"\") -> result<bucket, error> at 128
         (call $kv_open (i32.const 256) (i32.const 0) (i32.const 128))
         (if (i32.load8_u (i32.const 128))
           (then (call $respond (local.get $out) (i32.const 500) (i32.const 264) (i32.const 8)) (return)))
         ;; set(\"k\", \"v\")
         (call $kv_set (i32.load (i32.const 132)) (i32.const 256) (i32.const 1) (i32.const 257) (i32.const 1) (i32.const 128))
         (if (i32.load8_u (i32.const 128))
           (then (call $respond (local.get $out) (i32.const 500) (i32.const 264) (i32.const 8)) (return)))
         (call $respond (local.get $out) (i32.const 200) (i32.const 258) (i32.const 6))",
        "kvstoredkv error",
        true,
    )
}

/// Increments counter `n` in bucket `b` by one and answers 200, then traps
/// (so that its platform events and its writes both happen).
pub fn kv_writer() -> Vec<u8> {
    guest(
        "(call $kv_open (i32.const 256) (i32.const 1) (i32.const 128))
         (if (i32.load8_u (i32.const 128)) (then unreachable))
         (call $kv_incr (i32.load (i32.const 132)) (i32.const 257) (i32.const 1) (i64.const 1) (i32.const 160))
         (call $respond (local.get $out) (i32.const 200) (i32.const 258) (i32.const 2))",
        "bnok",
        true,
    )
}

/// Reads the request body to its end and answers 200 `read`; answers 500
/// `failed` when reading fails (a body cut by the node, say).
pub fn read_body() -> Vec<u8> {
    guest(
        "(local $stream i32)
         (call $consume (local.get $req) (i32.const 128))
         (call $in_stream (i32.load (i32.const 132)) (i32.const 128))
         (local.set $stream (i32.load (i32.const 132)))
         (block $done
           (loop $more
             (call $read (local.get $stream) (i64.const 65536) (i32.const 144))
             (if (i32.load8_u (i32.const 144))
               (then
                 ;; stream-error: 1 closed (the end), 0 failed
                 (br_if $done (i32.eq (i32.load8_u (i32.const 148)) (i32.const 1)))
                 (call $respond (local.get $out) (i32.const 500) (i32.const 260) (i32.const 6))
                 (return)))
             (br $more)))
         (call $respond (local.get $out) (i32.const 200) (i32.const 256) (i32.const 4))",
        "readfailed",
        false,
    )
}

/// Counts its requests in linear memory (address 1024) and answers the
/// count: 1 on every request of a fresh instance, 1, 2, 3... on a reused
/// one. A path ending in `t` traps, in `s` spins, in `m` asks for 250 MiB
/// more memory (refused under the default limit) and answers anyway.
pub fn counter() -> Vec<u8> {
    guest(
        "(local $n i32) (local $p i32) (local $last i32)
         (i32.store (i32.const 1024) (i32.add (i32.load (i32.const 1024)) (i32.const 1)))
         (call $path (local.get $req) (i32.const 128))
         (local.set $last (i32.load8_u
           (i32.add (i32.load (i32.const 132)) (i32.sub (i32.load (i32.const 136)) (i32.const 1)))))
         (if (i32.eq (local.get $last) (i32.const 116)) (then unreachable))
         (if (i32.eq (local.get $last) (i32.const 115)) (then (loop $l (br $l))))
         (if (i32.eq (local.get $last) (i32.const 109))
           (then (drop (memory.grow (i32.const 4000)))))
         (local.set $n (i32.load (i32.const 1024)))
         (local.set $p (i32.const 620))
         (loop $d
           (local.set $p (i32.sub (local.get $p) (i32.const 1)))
           (i32.store8 (local.get $p) (i32.add (i32.const 48) (i32.rem_u (local.get $n) (i32.const 10))))
           (local.set $n (i32.div_u (local.get $n) (i32.const 10)))
           (br_if $d (local.get $n)))
         (call $respond (local.get $out) (i32.const 200) (local.get $p) (i32.sub (i32.const 620) (local.get $p)))",
        "",
        false,
    )
}

/// Answers 200 `once` on its instance's first request and traps on any
/// later one: a component that cannot serve twice.
pub fn once() -> Vec<u8> {
    guest(
        "(if (i32.load (i32.const 1024)) (then unreachable))
         (i32.store (i32.const 1024) (i32.const 1))
         (call $respond (local.get $out) (i32.const 200) (i32.const 256) (i32.const 4))",
        "once",
        false,
    )
}

/// Counts like [`counter`], but leaves its response body unfinished
/// (written, never finished nor dropped) on a path ending in `u`.
pub fn counter_unfinished() -> Vec<u8> {
    guest(
        "(local $last i32) (local $body i32)
         (i32.store (i32.const 1024) (i32.add (i32.load (i32.const 1024)) (i32.const 1)))
         (call $path (local.get $req) (i32.const 128))
         (local.set $last (i32.load8_u
           (i32.add (i32.load (i32.const 132)) (i32.sub (i32.load (i32.const 136)) (i32.const 1)))))
         (i32.store8 (i32.const 600) (i32.add (i32.const 48) (i32.load (i32.const 1024))))
         (if (i32.eq (local.get $last) (i32.const 117))
           (then
             (local.set $body (call $head (local.get $out) (i32.const 200)))
             (call $write_body (local.get $body) (i32.const 600) (i32.const 1))
             (return)))
         (call $respond (local.get $out) (i32.const 200) (i32.const 600) (i32.const 1))",
        "",
        false,
    )
}
