//! Property-based fuzzing (stable toolchain, `proptest`) of every decoder that reads bytes from outside
//! the process: the kombu envelope (AMQP header tables, the Redis JSON envelope), protocol v1/v2 task
//! bodies and headers, result documents, pidbox control messages, Celery events, Dagster serdes values
//! (plan snapshots, run bodies, step events, the coordinator hand-off, step-task keyword arguments),
//! event-log JSON in step output, and Flower API query strings.
//!
//! Each decoder gets two kinds of input: structure-aware (a real message of its kind, then fields
//! replaced by values of the wrong type, removed, added, nested hundreds deep, made huge, and the
//! serialized bytes cut or salted with invalid UTF-8) and raw bytes (arbitrary, plus JSON-ish token
//! soup). A decoder passes when no input panics and every failure is its typed error; each test counts
//! the inputs it fed and asserts at least [`MIN_INPUTS`] per decoder (`CELERIAC_FUZZ_INPUTS` changes the
//! count for a local run); `PROPTEST_RNG_SEED` replays a run (a failure prints the minimal failing
//! input).

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use celeriac_dagster::plan::{
    ActiveExecution, ExecutionPlan, KnownState, PlanSnapshot, RetryMode, SortKey, StepEvent,
};
use celeriac_dagster::run::RunRecord;
use celeriac_dagster::serdes;
use celeriac_dagster::step::args::StepTaskArgs;
use celeriac_dagster::submission::Handoff;
use celeriac_flower::state::{prepare_event, EventsState};
use celeriac_wire::broker::amqp::table_to_json;
use celeriac_wire::broker::redis::decode_envelope;
use celeriac_wire::json::parse_lenient;
use celeriac_wire::message::{self, Properties, RawMessage};
use celeriac_wire::pidbox::{glob_match, ControlRequest};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{json, Map, Value};

/// Inputs each decoder must receive in one test run (issue 14: ≥ 100,000).
const MIN_INPUTS: u64 = 100_000;

/// Inputs per decoder: [`MIN_INPUTS`], or `CELERIAC_FUZZ_INPUTS` (more for a long local run, fewer
/// while working on a strategy).
fn inputs() -> u64 {
    std::env::var("CELERIAC_FUZZ_INPUTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(MIN_INPUTS)
}

/// Runs `check` on `cases` inputs of `strategy`; returns how many were fed. A panic in `check` fails
/// the test with proptest's minimal failing input.
fn fuzz<S: Strategy>(
    name: &str,
    cases: u64,
    strategy: S,
    check: impl Fn(S::Value) -> Result<(), TestCaseError>,
) -> u64
where
    S::Value: std::fmt::Debug,
{
    let fed = AtomicU64::new(0);
    let mut runner = TestRunner::new(Config {
        cases: u32::try_from(cases).unwrap_or(u32::MAX),
        failure_persistence: None,
        // Shrinking a huge input through 100k-case strategies can take long; a minute is plenty.
        max_shrink_time: 60_000,
        ..Config::default()
    });
    let started = Instant::now();
    let result = runner.run(&strategy, |v| {
        fed.fetch_add(1, Ordering::Relaxed);
        check(v)
    });
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
    let n = fed.load(Ordering::Relaxed);
    eprintln!("fuzz {name}: {n} inputs in {:.1?}", started.elapsed());
    n
}

/// Splits [`MIN_INPUTS`] (times the scale) between a structured and a raw-bytes run.
fn budget(structured_share: u64) -> (u64, u64) {
    let total = inputs();
    let s = total * structured_share / 100;
    (s, total - s)
}

fn assert_fed(name: &str, n: u64) {
    assert!(n >= inputs(), "{name}: only {n} inputs were generated");
    eprintln!("fuzz {name}: total {n} inputs, no panic");
}

// ---------------------------------------------------------------------------------------------------
// Strategies: JSON values, mutations of a template, byte-level damage.

/// Keys and string values the decoders look for, so random values hit the interesting branches.
const WORDS: &[&str] = &[
    "task",
    "id",
    "args",
    "kwargs",
    "embed",
    "eta",
    "expires",
    "timelimit",
    "retries",
    "shadow",
    "root_id",
    "parent_id",
    "group",
    "argsrepr",
    "kwargsrepr",
    "origin",
    "ignore_result",
    "callbacks",
    "errbacks",
    "chord",
    "chain",
    "taskset",
    "__type__",
    "__value__",
    "datetime",
    "body",
    "headers",
    "properties",
    "content-type",
    "content-encoding",
    "body_encoding",
    "base64",
    "delivery_info",
    "exchange",
    "routing_key",
    "redelivered",
    "priority",
    "correlation_id",
    "reply_to",
    "delivery_mode",
    "expiration",
    "method",
    "arguments",
    "destination",
    "pattern",
    "matcher",
    "pcre",
    "glob",
    "ticket",
    "type",
    "hostname",
    "uuid",
    "timestamp",
    "clock",
    "utcoffset",
    "pid",
    "freq",
    "active",
    "processed",
    "name",
    "state",
    "result",
    "runtime",
    "exception",
    "traceback",
    "status",
    "SUCCESS",
    "FAILURE",
    "REVOKED",
    "STARTED",
    "task-received",
    "task-started",
    "task-succeeded",
    "task-failed",
    "worker-online",
    "worker-heartbeat",
    "worker-offline",
    "task-sent",
    "task-revoked",
    "task-retried",
    "exc_type",
    "exc_message",
    "exc_module",
    "__class__",
    "__enum__",
    "__set__",
    "__frozenset__",
    "__mapping_items__",
    "DagsterEvent",
    "StepOutputData",
    "StepRetryData",
    "StepOutputHandle",
    "event_type_value",
    "step_key",
    "event_specific_data",
    "step_output_handle",
    "output_name",
    "mapping_key",
    "seconds_to_wait",
    "STEP_OUTPUT",
    "STEP_SUCCESS",
    "STEP_FAILURE",
    "STEP_UP_FOR_RETRY",
    "STEP_START",
    "STEP_SKIPPED",
    "ExecutionPlanSnapshot",
    "snapshot_version",
    "steps",
    "step_keys_to_execute",
    "initial_known_state",
    "KnownExecutionState",
    "ready_outputs",
    "dynamic_mappings",
    "previous_retry_attempts",
    "PipelineRun",
    "DagsterRun",
    "run_id",
    "tags",
    "pipeline_name",
    "execute_step_args_packed",
    "job_config_dict",
    "job_namespace",
    "load_incluster_config",
    "job_wait_timeout",
    "pipeline_run_id",
    "known_state",
    "instance_ref",
    "pipeline_origin",
    "repository_origin",
    "entry_point",
    "version",
    "NaN",
    "Infinity",
    "-Infinity",
    "__celeriac_float__",
    "*",
    "?",
    "[",
    "]",
    "[!a-z]",
    ".*",
    "^",
    "$",
    "",
    " ",
    "None",
    "null",
    "limit",
    "offset",
    "sort_by",
    "search",
    "received_start",
    "received_end",
    "workername",
    "taskname",
    "-received",
    "2026-11-30 12:00",
    "state:SUCCESS",
    "name:",
    "kwargs:",
    "result:",
    "args:",
    "uuid:",
    "OR",
    "AND",
    "NOT",
    "(",
    ")",
    "\"",
    "'",
    "=",
    "\u{0}",
    "\u{ffff}",
    "é",
    "𝄞",
    "\u{202e}",
];

fn word() -> impl Strategy<Value = String> {
    prop::sample::select(WORDS).prop_map(str::to_string)
}

/// Any string: dictionary words, short random Unicode (control characters, surrogate-adjacent and
/// astral code points included), or random ASCII.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => word(),
        3 => prop::collection::vec(any::<char>(), 0..12).prop_map(String::from_iter),
        // Not the regex strategy "[ -~]{0,24}": proptest parses a `&str` pattern again for every value.
        2 => prop::collection::vec(0x20u8..0x7f, 0..24)
            .prop_map(|b| b.into_iter().map(char::from).collect()),
    ]
}

fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-3i64..300).prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        Just(json!(1e308)),
        Just(json!(-0.0)),
        Just(json!(1.5)),
    ]
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        1 => Just(Value::Null),
        1 => any::<bool>().prop_map(Value::Bool),
        2 => number(),
        4 => text().prop_map(Value::String),
    ]
}

/// Arbitrary JSON: up to 4 levels, up to 8 items a container, keys mostly from [`WORDS`].
fn arb_json() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(4, 48, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::vec((text(), inner), 0..8)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// One change to a JSON document.
#[derive(Debug, Clone)]
enum Mutation {
    /// Replace the node with another value (usually of another type).
    Replace(Value),
    /// Remove the node from its parent.
    Remove,
    /// Insert a key (objects) or an element (arrays).
    Insert(String, Value),
    /// Wrap the node in `n` arrays or objects (past serde_json's recursion limit of 128 at times).
    Nest(usize, bool),
    /// Replace the node by a string of this many characters.
    Huge(usize, char),
    /// Turn a string node into a number-looking, NaN or date-looking string, or a number into a string.
    Retype,
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        6 => arb_json().prop_map(Mutation::Replace),
        3 => Just(Mutation::Remove),
        3 => (text(), arb_json()).prop_map(|(k, v)| Mutation::Insert(k, v)),
        1 => (1usize..300, any::<bool>()).prop_map(|(n, o)| Mutation::Nest(n, o)),
        // Past every limit that cuts a value (200-character log quotes, 1,024-character reprs, the
        // 64 KiB message limit of `decode_and_use`): 50,000 × '𝄞' is 600 KB of escaped JSON.
        1 => (1_000usize..50_000, prop::sample::select(&['a', 'é', '𝄞', '"', '\\', '\u{0}'][..]))
            .prop_map(|(n, c)| Mutation::Huge(n, c)),
        2 => Just(Mutation::Retype),
    ]
}

/// A path into a document: at each level the child `selector % len`; stops early at leaves.
type Path = Vec<usize>;

fn path() -> impl Strategy<Value = Path> {
    prop::collection::vec(any::<usize>(), 0..6)
}

fn mutations() -> impl Strategy<Value = Vec<(Path, Mutation)>> {
    prop::collection::vec((path(), mutation()), 0..4)
}

/// Applies `m` at `path` in `doc`.
fn apply(doc: &mut Value, path: &[usize], m: &Mutation) {
    // Walk to the parent of the target, then act on the chosen child (or the root).
    let mut node = doc;
    let mut rest = path;
    loop {
        let len = match node {
            Value::Array(a) => a.len(),
            Value::Object(o) => o.len(),
            _ => 0,
        };
        let Some((&sel, tail)) = rest.split_first() else {
            break;
        };
        if len == 0 {
            break;
        }
        let i = sel % len;
        let child_is_container = match &*node {
            Value::Array(a) => a[i].is_array() || a[i].is_object(),
            Value::Object(o) => o
                .values()
                .nth(i)
                .is_some_and(|c| c.is_array() || c.is_object()),
            _ => false,
        };
        if tail.is_empty() || !child_is_container {
            // Act on child `i` of `node`.
            act_on_child(node, i, m);
            return;
        }
        node = match node {
            Value::Array(a) => &mut a[i],
            Value::Object(o) => match o.values_mut().nth(i) {
                Some(c) => c,
                None => return,
            },
            _ => return,
        };
        rest = tail;
    }
    act_on_node(node, m);
}

fn act_on_child(parent: &mut Value, i: usize, m: &Mutation) {
    match (parent, m) {
        (Value::Array(a), Mutation::Remove) => {
            a.remove(i);
        }
        (Value::Object(o), Mutation::Remove) => {
            if let Some(k) = o.keys().nth(i).cloned() {
                o.shift_remove(&k);
            }
        }
        (Value::Array(a), m) => act_on_node(&mut a[i], m),
        (Value::Object(o), m) => {
            if let Some(c) = o.values_mut().nth(i) {
                act_on_node(c, m);
            }
        }
        _ => {}
    }
}

fn act_on_node(node: &mut Value, m: &Mutation) {
    match m {
        Mutation::Replace(v) => *node = v.clone(),
        Mutation::Remove => *node = Value::Null,
        Mutation::Insert(k, v) => match node {
            Value::Object(o) => {
                o.insert(k.clone(), v.clone());
            }
            Value::Array(a) => a.push(v.clone()),
            _ => *node = Value::Object(Map::from_iter([(k.clone(), v.clone())])),
        },
        Mutation::Nest(n, as_object) => {
            let mut v = std::mem::take(node);
            // Built directly: `json!` with a value inside serializes (deep-copies) it, which made
            // nesting quadratic.
            for _ in 0..*n {
                v = if *as_object {
                    Value::Object(Map::from_iter([("k".to_string(), v)]))
                } else {
                    Value::Array(vec![v])
                };
            }
            *node = v;
        }
        Mutation::Huge(n, c) => *node = Value::String(std::iter::repeat_n(*c, *n).collect()),
        Mutation::Retype => {
            *node = match &*node {
                Value::String(s) => json!(s.len()),
                Value::Number(n) => json!(n.to_string()),
                Value::Bool(b) => json!(if *b { "True" } else { "False" }),
                Value::Null => json!("NaN"),
                Value::Array(a) => json!(format!("{a:?}")),
                Value::Object(_) => json!([]),
            }
        }
    }
}

fn mutated(template: &Value, muts: &[(Path, Mutation)]) -> Value {
    let mut v = template.clone();
    for (p, m) in muts {
        apply(&mut v, p, m);
    }
    v
}

/// Damage to serialized bytes.
#[derive(Debug, Clone)]
enum ByteDamage {
    /// Overwrite the byte at `pos % len`.
    Set(usize, u8),
    /// Insert bytes that are not UTF-8 (lone continuation, overlong, surrogate, 0xFF, truncated).
    InvalidUtf8(usize, &'static [u8]),
    /// Cut the document at `pos % len`.
    Truncate(usize),
    /// Insert a bare `NaN`/`Infinity` token or a quote/backslash.
    Token(usize, &'static [u8]),
}

const BAD_UTF8: &[&[u8]] = &[
    b"\x80",
    b"\xc3",
    b"\xc0\xaf",
    b"\xed\xa0\x80",
    b"\xff\xfe",
    b"\xf4\x90\x80\x80",
    b"\xe2\x82",
];
const TOKENS: &[&[u8]] = &[
    b"NaN",
    b"Infinity",
    b"-Infinity",
    b"\"",
    b"\\",
    b"\\u",
    b"\\ud800",
    b"{",
    b"[",
    b"]",
    b"}",
    b",",
    b":",
    b"1e999999",
    b"-",
    b"0.",
    b"tru",
    b"\x00",
];

fn byte_damage() -> impl Strategy<Value = Vec<ByteDamage>> {
    let one = prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(p, b)| ByteDamage::Set(p, b)),
        (any::<usize>(), prop::sample::select(BAD_UTF8))
            .prop_map(|(p, b)| ByteDamage::InvalidUtf8(p, b)),
        any::<usize>().prop_map(ByteDamage::Truncate),
        (any::<usize>(), prop::sample::select(TOKENS)).prop_map(|(p, t)| ByteDamage::Token(p, t)),
    ];
    // Half the documents stay intact so the structured mutations reach the decoders' later stages.
    prop_oneof![
        1 => Just(Vec::new()),
        1 => prop::collection::vec(one, 1..4),
    ]
}

fn damage(mut bytes: Vec<u8>, d: &[ByteDamage]) -> Vec<u8> {
    for x in d {
        let len = bytes.len().max(1);
        match x {
            ByteDamage::Set(p, b) => {
                if !bytes.is_empty() {
                    bytes[p % len] = *b;
                }
            }
            ByteDamage::InvalidUtf8(p, b) | ByteDamage::Token(p, b) => {
                let at = (p % len).min(bytes.len());
                bytes.splice(at..at, b.iter().copied());
            }
            ByteDamage::Truncate(p) => bytes.truncate(p % len),
        }
    }
    bytes
}

/// Raw input: arbitrary bytes, token soup (JSON-ish fragments), deep bracket runs and huge documents.
fn raw_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => prop::collection::vec(any::<u8>(), 0..256),
        4 => prop::collection::vec(
            prop_oneof![
                prop::sample::select(TOKENS).prop_map(<[u8]>::to_vec),
                prop::sample::select(BAD_UTF8).prop_map(<[u8]>::to_vec),
                word().prop_map(|w| format!("\"{w}\"").into_bytes()),
                number().prop_map(|n| n.to_string().into_bytes()),
            ],
            0..40,
        )
        .prop_map(|parts| parts.concat()),
        1 => (1usize..100_000, prop::sample::select(&[b'[', b'{'][..])).prop_map(|(n, b)| {
            let mut v = vec![b; n];
            if b == b'{' {
                v = b"{\"a\":".repeat(n);
            }
            v
        }),
        1 => (0usize..200).prop_map(|n| {
            // Deep but valid: just under and over the recursion limit.
            let mut s = "[".repeat(n);
            s.push('1');
            s.push_str(&"]".repeat(n));
            s.into_bytes()
        }),
    ]
}

/// Serializes as Python's `json.dumps` would (the form peers send).
fn to_bytes(v: &Value) -> Vec<u8> {
    celeriac_wire::json::to_python_string(v, false).into_bytes()
}

// ---------------------------------------------------------------------------------------------------
// Templates: real messages of each kind.

fn repo_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default()
}

fn fixture(path: &str) -> Value {
    let p = repo_root().join(path);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serdes::parse(text.as_bytes()).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A protocol-2 step task as Dagster 1.13.27's executor published it (headers, body, properties).
fn captured_step_task() -> (Value, Value, Value) {
    let v = fixture("dagster/tests/fixtures/versions/1.13.27/task_messages.json");
    let m = &v[0];
    (
        m["headers"].clone(),
        m["body"].clone(),
        m["properties"].clone(),
    )
}

fn v2_headers(task: &str) -> Value {
    json!({"lang": "py", "task": task, "id": "9a0f0c2e-8f1a-4b7e-9d55-5b1e6c0f2a11",
        "shadow": null, "eta": "2026-11-30T12:00:00.123456+00:00", "expires": null, "group": null,
        "group_index": null, "retries": 0, "timelimit": [null, null], "root_id": "9a0f0c2e",
        "parent_id": null, "argsrepr": "(1, 2)", "kwargsrepr": "{}", "origin": "gen1@host",
        "ignore_result": false, "stamped_headers": null, "stamps": {}})
}

fn v1_body() -> Value {
    json!({"task": "tasks.add", "id": "5b1e6c0f", "args": [1, 2], "kwargs": {"x": 1},
        "retries": 0, "eta": null, "expires": {"__type__": "datetime", "__value__": "2026-11-30T12:00:00"},
        "utc": true, "callbacks": null, "errbacks": null, "timelimit": [10, 5], "taskset": null,
        "chord": null})
}

fn properties_from(v: &Value) -> Properties {
    let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
    Properties {
        correlation_id: s("correlation_id"),
        reply_to: s("reply_to"),
        delivery_mode: v
            .get("delivery_mode")
            .and_then(Value::as_u64)
            .map(|d| d as u8),
        priority: v.get("priority").and_then(Value::as_u64).map(|p| p as u8),
        expiration: s("expiration"),
    }
}

const CONTENT_TYPES: &[&str] = &[
    "application/json",
    "application/json",
    "application/json",
    "",
    "application/x-python-serialize",
    "application/x-yaml",
    "text/plain",
    "application/json; charset=utf-8",
];

/// What the worker does with a request it decoded: the pieces that read the request's fields.
fn use_request(req: &message::TaskRequest) {
    let _ = req.is_expired(chrono::Utc::now());
    let _ = celeriac_wire::saferepr::argsrepr(&req.args);
    let _ = celeriac_wire::saferepr::kwargsrepr(&req.kwargs);
    let _ = celeriac_wire::json::to_python_string(&req.embed, false);
    if let Ok(a) = StepTaskArgs::from_kwargs(&req.kwargs) {
        let _ = celeriac_dagster::step::command::command_args(&a.entry_point, &a.compressed_input);
    }
}

fn decode_and_use(raw: &RawMessage) -> Result<(), TestCaseError> {
    for limit in [None, Some(64 * 1024)] {
        match message::decode(raw, &["json".to_string()], limit) {
            Ok(req) => use_request(&req),
            Err(e) => {
                prop_assert!(!e.to_string().is_empty());
                let _ = (e.disposition(), e.stores_failure(), raw.task_id_hint());
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------
// Decoders.

/// Protocol v1/v2/hybrid task bodies and headers (`message::decode`), then the request as the worker
/// uses it (reprs, `execute_step_k8s_job` keyword arguments, the step command).
#[test]
fn task_messages() {
    let (step_headers, step_body, step_props) = captured_step_task();
    let templates: Vec<(Value, Value, Value)> = vec![
        (step_headers, step_body, step_props),
        (
            v2_headers("tasks.add"),
            json!([[1, 2], {"k": "v"}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]),
            json!({"correlation_id": "9a0f0c2e", "reply_to": "r", "priority": 3, "delivery_mode": 2}),
        ),
        (json!({}), v1_body(), json!({"correlation_id": "5b1e6c0f"})),
        (v2_headers("tasks.add"), v1_body(), json!({})),
    ];
    let structured = (
        0..templates.len(),
        mutations(),
        mutations(),
        byte_damage(),
        prop::sample::select(CONTENT_TYPES),
    );
    let (s, r) = budget(70);
    let mut n = fuzz(
        "task message (structured)",
        s,
        structured,
        |(t, hm, bm, d, ct)| {
            let (h, b, p) = &templates[t];
            let headers = match mutated(h, &hm) {
                Value::Object(m) => m,
                _ => Map::new(),
            };
            let raw = RawMessage {
                body: damage(to_bytes(&mutated(b, &bm)), &d),
                content_type: ct.to_string(),
                content_encoding: "utf-8".into(),
                headers,
                properties: properties_from(p),
                ..Default::default()
            };
            decode_and_use(&raw)
        },
    );
    let raw_input = (
        raw_bytes(),
        prop::sample::select(CONTENT_TYPES),
        any::<bool>(),
    );
    n += fuzz(
        "task message (raw bytes)",
        r,
        raw_input,
        |(body, ct, v2)| {
            let headers = if v2 {
                v2_headers("tasks.add")
                    .as_object()
                    .cloned()
                    .unwrap_or_default()
            } else {
                Map::new()
            };
            decode_and_use(&RawMessage {
                body,
                content_type: ct.to_string(),
                headers,
                ..Default::default()
            })
        },
    );
    assert_fed("task message", n);
}

/// kombu's Redis envelope (`decode_envelope`), base64 body included, then the task decoder.
#[test]
fn redis_envelope() {
    let (headers, body, _) = captured_step_task();
    let envelope = |body_bytes: &[u8], headers: &Value| {
        let mut env = json!({"body": base64::engine::general_purpose::STANDARD.encode(body_bytes),
            "content-encoding": "utf-8", "content-type": "application/json", "headers": null,
            "properties": {"correlation_id": "69781fc0", "reply_to": "5f38e22e", "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": "dagster"}, "priority": 0,
                "body_encoding": "base64", "delivery_tag": "0a4c4d0e-5f5e-4d3e-8d52-1d1f0b0b7e7e"}});
        // Cloned, not through `json!` (which serializes a value to copy it).
        env["headers"] = headers.clone();
        env
    };
    let structured = (
        mutations(),
        byte_damage(),
        mutations(),
        byte_damage(),
        any::<bool>(),
    );
    let (s, r) = budget(70);
    let mut n = fuzz(
        "redis envelope (structured)",
        s,
        structured,
        |(bm, bd, em, ed, plain)| {
            let inner = damage(to_bytes(&mutated(&body, &bm)), &bd);
            let mut env = envelope(&inner, &headers);
            if plain {
                // kombu without base64: the body as a JSON string.
                env["body"] = json!(String::from_utf8_lossy(&inner));
                env["properties"]["body_encoding"] = Value::Null;
            }
            let bytes = damage(to_bytes(&mutated(&env, &em)), &ed);
            let (raw, _) = decode_envelope(&bytes, "dagster");
            decode_and_use(&raw)
        },
    );
    n += fuzz("redis envelope (raw bytes)", r, raw_bytes(), |bytes| {
        let (raw, _) = decode_envelope(&bytes, "dagster");
        decode_and_use(&raw)
    });
    assert_fed("redis envelope", n);
}

// AMQP field tables: written here byte by byte (the wire format of a basic.properties `headers`), read
// by the parser lapin uses (amq-protocol-types), converted by `table_to_json`, then decoded as task
// headers.

#[derive(Debug, Clone)]
enum Amqp {
    Bool(bool),
    I8(i8),
    I32(i32),
    I64(i64),
    F32(f32),
    F64(f64),
    Decimal(u8, u32),
    /// A long string: arbitrary bytes (invalid UTF-8 included).
    LongStr(Vec<u8>),
    Bytes(Vec<u8>),
    Timestamp(u64),
    Void,
    Array(Vec<Amqp>),
    Table(Vec<(Vec<u8>, Amqp)>),
    /// `n` tables nested in each other around a value.
    Deep(usize, Box<Amqp>),
}

fn amqp_value() -> impl Strategy<Value = Amqp> {
    let bytes = prop_oneof![
        text().prop_map(String::into_bytes),
        prop::collection::vec(any::<u8>(), 0..24),
    ];
    let leaf = prop_oneof![
        any::<bool>().prop_map(Amqp::Bool),
        any::<i8>().prop_map(Amqp::I8),
        any::<i32>().prop_map(Amqp::I32),
        any::<i64>().prop_map(Amqp::I64),
        any::<f32>().prop_map(Amqp::F32),
        any::<f64>().prop_map(Amqp::F64),
        (any::<u8>(), any::<u32>()).prop_map(|(s, v)| Amqp::Decimal(s, v)),
        bytes.clone().prop_map(Amqp::LongStr),
        bytes.clone().prop_map(Amqp::Bytes),
        any::<u64>().prop_map(Amqp::Timestamp),
        Just(Amqp::Void),
    ];
    leaf.prop_recursive(4, 32, 6, move |inner| {
        let key = prop_oneof![
            word().prop_map(String::into_bytes),
            prop::collection::vec(any::<u8>(), 0..8),
        ];
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Amqp::Array),
            prop::collection::vec((key, inner.clone()), 0..6).prop_map(Amqp::Table),
            (1usize..3000, inner).prop_map(|(n, v)| Amqp::Deep(n, Box::new(v))),
        ]
    })
}

fn put_long(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_be_bytes());
    out.extend_from_slice(b);
}

fn write_table(out: &mut Vec<u8>, entries: &[(Vec<u8>, Amqp)]) {
    let mut inner = Vec::new();
    for (k, v) in entries {
        let k = &k[..k.len().min(255)];
        inner.push(k.len() as u8);
        inner.extend_from_slice(k);
        write_value(&mut inner, v);
    }
    put_long(out, &inner);
}

fn write_value(out: &mut Vec<u8>, v: &Amqp) {
    match v {
        Amqp::Bool(b) => out.extend_from_slice(&[b't', u8::from(*b)]),
        Amqp::I8(i) => out.extend_from_slice(&[b'b', *i as u8]),
        Amqp::I32(i) => {
            out.push(b'I');
            out.extend_from_slice(&i.to_be_bytes());
        }
        Amqp::I64(i) => {
            out.push(b'l');
            out.extend_from_slice(&i.to_be_bytes());
        }
        Amqp::F32(f) => {
            out.push(b'f');
            out.extend_from_slice(&f.to_be_bytes());
        }
        Amqp::F64(f) => {
            out.push(b'd');
            out.extend_from_slice(&f.to_be_bytes());
        }
        Amqp::Decimal(s, v) => {
            out.extend_from_slice(&[b'D', *s]);
            out.extend_from_slice(&v.to_be_bytes());
        }
        Amqp::LongStr(b) => {
            out.push(b'S');
            put_long(out, b);
        }
        Amqp::Bytes(b) => {
            out.push(b'x');
            put_long(out, b);
        }
        Amqp::Timestamp(t) => {
            out.push(b'T');
            out.extend_from_slice(&t.to_be_bytes());
        }
        Amqp::Void => out.push(b'V'),
        Amqp::Array(items) => {
            out.push(b'A');
            let mut inner = Vec::new();
            for i in items {
                write_value(&mut inner, i);
            }
            put_long(out, &inner);
        }
        Amqp::Table(entries) => {
            out.push(b'F');
            write_table(out, entries);
        }
        Amqp::Deep(n, v) => {
            // Built iteratively: a recursive writer (and a nested `Amqp` value) would need the deep
            // stack this case is about.
            let mut cur = Vec::new();
            write_value(&mut cur, v);
            for _ in 0..*n {
                let mut entry = vec![1u8, b'k'];
                entry.extend_from_slice(&cur);
                cur = vec![b'F'];
                put_long(&mut cur, &entry);
            }
            out.extend_from_slice(&cur);
        }
    }
}

type ParsedHeaders = Result<Option<Map<String, Value>>, String>;
/// The parser thread's input and output.
type ParserLink = (
    std::sync::mpsc::Sender<Vec<u8>>,
    std::sync::mpsc::Receiver<ParsedHeaders>,
);

/// Parses a header table as lapin does, on a thread with the stack the worker gives lapin (see
/// `cli/src/main.rs`). One long-lived parser thread: a fresh 256 MiB stack per input paid a page fault
/// for every stack page a deep table touched, again and again.
fn parse_amqp_headers(bytes: Vec<u8>) -> Option<Map<String, Value>> {
    use std::sync::mpsc::channel;
    use std::sync::{Mutex, OnceLock};
    static PARSER: OnceLock<Mutex<ParserLink>> = OnceLock::new();
    let parser = PARSER.get_or_init(|| {
        let (in_tx, in_rx) = channel::<Vec<u8>>();
        let (out_tx, out_rx) = channel::<ParsedHeaders>();
        std::thread::Builder::new()
            .name("amqp-header-parser".into())
            .stack_size(256 * 1024 * 1024)
            .spawn(move || {
                for bytes in in_rx {
                    let parsed = std::panic::catch_unwind(|| {
                        amq_protocol_types::parsing::parse_field_table(bytes.as_slice())
                            .ok()
                            .map(|(_, t)| table_to_json(&t))
                    })
                    .map_err(|p| {
                        p.downcast_ref::<String>()
                            .cloned()
                            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_else(|| "a panic".into())
                    });
                    if out_tx.send(parsed).is_err() {
                        return;
                    }
                }
            })
            .expect("the parser thread starts");
        Mutex::new((in_tx, out_rx))
    });
    let guard = parser.lock().unwrap_or_else(|p| p.into_inner());
    guard.0.send(bytes).expect("the parser thread is alive");
    match guard.1.recv().expect("the parser thread answers") {
        Ok(parsed) => parsed,
        Err(panic) => panic!("parsing an AMQP header table panicked: {panic}"),
    }
}

#[test]
fn amqp_header_tables() {
    let base = v2_headers("tasks.add");
    let entries = || -> Vec<(Vec<u8>, Amqp)> {
        base.as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| {
                let a = match v {
                    Value::String(s) => Amqp::LongStr(s.clone().into_bytes()),
                    Value::Bool(b) => Amqp::Bool(*b),
                    Value::Number(n) => Amqp::I64(n.as_i64().unwrap_or(0)),
                    Value::Array(_) => Amqp::Array(vec![Amqp::Void, Amqp::Void]),
                    _ => Amqp::Void,
                };
                (k.clone().into_bytes(), a)
            })
            .collect()
    };
    let base_entries = entries();
    let structured = (
        prop::collection::vec((any::<usize>(), amqp_value()), 0..4),
        prop::collection::vec(any::<usize>(), 0..2),
        byte_damage(),
    );
    let (s, r) = budget(70);
    let mut n = fuzz(
        "amqp headers (structured)",
        s,
        structured,
        |(replace, remove, d)| {
            let mut e = base_entries.clone();
            for (i, v) in replace {
                let i = i % (e.len() + 1);
                if i == e.len() {
                    e.push((b"x-extra".to_vec(), v));
                } else {
                    e[i].1 = v;
                }
            }
            for i in remove {
                if !e.is_empty() {
                    let i = i % e.len();
                    e.remove(i);
                }
            }
            let mut bytes = Vec::new();
            write_table(&mut bytes, &e);
            let bytes = damage(bytes, &d);
            if let Some(headers) = parse_amqp_headers(bytes) {
                decode_and_use(&RawMessage {
                    body: br#"[[1, 2], {}, {}]"#.to_vec(),
                    content_type: "application/json".into(),
                    headers,
                    ..Default::default()
                })?;
            }
            Ok(())
        },
    );
    n += fuzz("amqp headers (raw bytes)", r, raw_bytes(), |mut bytes| {
        // A plausible length prefix half the time, so the parser reads entries rather than stopping.
        if bytes.len() % 2 == 0 {
            let mut framed = Vec::new();
            put_long(&mut framed, &bytes);
            bytes = framed;
        }
        parse_amqp_headers(bytes);
        Ok(())
    });
    assert_fed("amqp headers", n);
}

/// Remote-control requests as the worker's control consumer reads them (`parse_lenient` +
/// `ControlRequest::parse`), then addressing (glob/pcre matchers) and the reply.
#[test]
fn pidbox_requests() {
    let templates = [
        json!({"method": "ping", "arguments": {}, "destination": ["celery@worker-7.example"],
            "pattern": null, "matcher": null, "ticket": "a3b6c7d8-0e2f-4a1b-9c3d-5e6f7a8b9c0d",
            "reply_to": {"exchange": "reply.celery.pidbox", "routing_key": "c1d2e3f4-aaaa-4bbb-8ccc-ddddeeeeffff"}}),
        json!({"method": "revoke", "arguments": {"task_id": ["t1", "t2"], "terminate": true, "signal": "SIGTERM"},
            "destination": null, "pattern": "celery@*", "matcher": "glob", "ticket": "t"}),
        json!({"method": "pool_grow", "arguments": {"n": 2}, "pattern": "^celery@w.*$", "matcher": "pcre"}),
    ];
    let structured = (0..templates.len(), mutations(), byte_damage());
    let (s, r) = budget(70);
    let handle = |bytes: &[u8]| -> Result<(), TestCaseError> {
        match parse_lenient(bytes)
            .map_err(|e| e.to_string())
            .and_then(|b| ControlRequest::parse(&b).map_err(|e| e.to_string()))
        {
            Ok(req) => {
                if req.addressed_to("celery@worker-7.example") {
                    let _ = req.reply("celery@worker-7.example", json!({"ok": "pong"}), 7);
                }
            }
            Err(e) => prop_assert!(!e.is_empty()),
        }
        Ok(())
    };
    let mut n = fuzz("pidbox (structured)", s, structured, |(t, m, d)| {
        handle(&damage(to_bytes(&mutated(&templates[t], &m)), &d))
    });
    n += fuzz("pidbox (raw bytes)", r, raw_bytes(), |b| handle(&b));
    assert_fed("pidbox", n);
}

/// Hostile glob patterns must not take exponential time (one request per node name is matched).
#[test]
fn pidbox_glob_is_not_exponential() {
    let host = "celery@worker-7.example.internal.cluster.local";
    let started = Instant::now();
    for pattern in [
        "*".repeat(40) + "x",
        "*a".repeat(30) + "x",
        "*?".repeat(30) + "!",
        "*[a-z]".repeat(30) + "!",
    ] {
        assert!(!glob_match(&pattern, host), "{pattern}");
    }
    assert!(glob_match("*@*.local", host));
    assert!(glob_match("celery@worker-[0-9].*", host));
    assert!(!glob_match("celery@worker-[!0-9].*", host));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "glob matching took {:?}",
        started.elapsed()
    );
}

/// Celery events as flower-compat's consumer reads them: `parse_lenient`, `unbatch`, `prepare_event`,
/// merged into the state, which is then queried.
#[test]
fn celery_events() {
    let task = json!({"hostname": "celery@w1", "utcoffset": 0, "pid": 11, "clock": 5,
        "uuid": "0a1b2c3d-4e5f-6789-abcd-ef0123456789", "timestamp": 1_795_393_521.27,
        "type": "task-received", "name": "tasks.add", "args": "(1, 2)", "kwargs": "{'x': 1}",
        "root_id": "0a1b2c3d", "parent_id": null, "retries": 0, "eta": null, "expires": null,
        "local_received": 1_795_393_521.28});
    let worker = json!({"hostname": "celery@w1", "utcoffset": 0, "pid": 11, "clock": 6,
        "freq": 2.0, "active": 1, "processed": 4, "loadavg": [0.1, 0.2, 0.3],
        "sw_ident": "celeriac", "sw_ver": "0.1.0", "sw_sys": "Linux",
        "timestamp": 1_795_393_522.0, "type": "worker-heartbeat"});
    let succeeded = json!({"hostname": "celery@w1", "uuid": "0a1b2c3d-4e5f-6789-abcd-ef0123456789",
        "result": "3", "runtime": 0.01, "type": "task-succeeded", "timestamp": 1_795_393_523.0, "clock": 7});
    let templates = [task, worker, succeeded];
    let one = (0..templates.len(), mutations());
    let structured = (
        prop::collection::vec(one, 1..5),
        any::<bool>(),
        byte_damage(),
    );
    let state = RefCell::new(EventsState::new(200, None));
    let feed = |bytes: &[u8]| {
        let Ok(body) = parse_lenient(bytes) else {
            return;
        };
        let mut st = state.borrow_mut();
        for e in celeriac_wire::events::unbatch(body) {
            if let Value::Object(m) = e {
                st.apply(&prepare_event(m, 1_795_393_530.0));
            }
        }
    };
    let query = || {
        let st = state.borrow();
        let q = celeriac_flower::api::task_query(&HashMap::from([
            ("search".to_string(), "state:SUCCESS".to_string()),
            ("sort_by".to_string(), "-received".to_string()),
        ]));
        if let Ok(q) = q {
            if let Ok(page) = st.query(&q) {
                for t in page.tasks {
                    let _ = (t.as_dict(), t.list_entry());
                }
            }
        }
        for w in st.workers.values() {
            let _ = w.alive(1_795_393_530.0);
        }
    };
    let (s, r) = budget(70);
    let mut n = fuzz(
        "events (structured)",
        s,
        structured,
        |(events, batch, d)| {
            let docs: Vec<Value> = events
                .iter()
                .map(|(t, m)| mutated(&templates[*t], m))
                .collect();
            let bytes = if batch {
                damage(to_bytes(&Value::Array(docs)), &d)
            } else {
                let mut last = Vec::new();
                for doc in &docs {
                    last = damage(to_bytes(doc), &d);
                    feed(&last);
                }
                last
            };
            feed(&bytes);
            query();
            // A fresh state now and then: every mutated hostname is a worker (up to flower-compat's
            // MAX_WORKERS), and walking them all at every input made the run quadratic.
            if state.borrow().event_count > 2_000 {
                *state.borrow_mut() = EventsState::new(200, None);
            }
            Ok(())
        },
    );
    n += fuzz("events (raw bytes)", r, raw_bytes(), |b| {
        feed(&b);
        Ok(())
    });
    query();
    assert_fed("events", n);
}

/// A fresh engine on the fixture plan with its first steps in flight (what a result is applied to).
fn fixture_engine() -> ActiveExecution {
    let v = fixture("dagster/tests/fixtures/plan_snapshot_fan_in_and_nested_map.json");
    let snap = PlanSnapshot::decode(&v).expect("fixture snapshot");
    let plan = ExecutionPlan::rebuild("j", &snap).expect("fixture plan");
    let mut e =
        ActiveExecution::new(plan, RetryMode::Enabled, SortKey::Default, 0.0).expect("engine");
    e.get_steps_to_execute(0.0).expect("submit");
    e
}

fn dagster_event(kind: &str, step: &str, data: Value) -> Value {
    json!({"__class__": "DagsterEvent", "event_specific_data": data, "event_type_value": kind,
        "logging_tags": {}, "message": "m", "pid": 1, "pipeline_name": "j", "solid_handle": null,
        "step_handle": {"__class__": "StepHandle", "key": step, "solid_handle": {"__class__": "SolidHandle", "name": step, "parent": null}},
        "step_key": step, "step_kind_value": "COMPUTE"})
}

/// Result documents a step task stores (`{"status", "result": [serialized DagsterEvent, ...]}` or a
/// FAILURE), read as the coordinator applies them to its engine and as flower-compat shows them.
#[test]
fn result_documents() {
    let output = |step: &str, name: &str, mk: Value| {
        dagster_event(
            "STEP_OUTPUT",
            step,
            json!({"__class__": "StepOutputData",
            "step_output_handle": {"__class__": "StepOutputHandle", "step_key": step,
                "output_name": name, "mapping_key": mk}, "type_check_data": null, "version": null,
            "metadata": {}}),
        )
    };
    let events = [
        output("two", "b", Value::Null),
        dagster_event(
            "STEP_SUCCESS",
            "two",
            json!({"__class__": "StepSuccessData", "duration_ms": 4.5}),
        ),
        output("emit", "result", json!("x")),
        dagster_event(
            "STEP_UP_FOR_RETRY",
            "emit",
            json!({"__class__": "StepRetryData",
            "error": null, "seconds_to_wait": 1.5}),
        ),
        dagster_event(
            "STEP_FAILURE",
            "two",
            json!({"__class__": "StepFailureData", "error": null,
            "user_failure_data": null}),
        ),
    ];
    let failure = json!({"status": "FAILURE", "result": {"exc_type": "ValueError",
        "exc_message": ["boom"], "exc_module": "builtins"}, "traceback": "Traceback...",
        "children": [], "date_done": "2026-11-30T12:00:00.000000+00:00", "task_id": "t"});
    let one_event = (0..events.len(), mutations());
    let structured = (
        prop::collection::vec(one_event, 0..4),
        mutations(),
        byte_damage(),
        any::<bool>(),
    );
    let engine = RefCell::new((fixture_engine(), 0u32));
    let apply = |meta: &Value| -> Result<(), TestCaseError> {
        let mut guard = engine.borrow_mut();
        let (e, uses) = &mut *guard;
        *uses += 1;
        if *uses > 500 || e.is_complete() {
            *e = fixture_engine();
            *uses = 0;
        }
        // coordinator/src/run.rs::apply_events on a SUCCESS document.
        if let Some(list) = meta.get("result").and_then(Value::as_array) {
            for raw in list {
                let Some(text) = raw.as_str() else { continue };
                match StepEvent::parse(text) {
                    Ok(ev) => {
                        if e.handle_event(&ev, 1.0).is_ok() {
                            let _ = e.get_steps_to_execute(2.0);
                            let _ = e.plan_events(2.0);
                            let _ = e.sleep_interval(2.0);
                        }
                    }
                    Err(err) => prop_assert!(!err.to_string().is_empty()),
                }
            }
        }
        let mut resp = Map::new();
        celeriac_flower::results::fill_response(&mut resp, Some(meta));
        let _ = celeriac_wire::json::python_repr(meta);
        Ok(())
    };
    let (s, r) = budget(70);
    let mut n = fuzz(
        "result documents (structured)",
        s,
        structured,
        |(evs, dm, d, fail)| {
            let doc = if fail {
                failure.clone()
            } else {
                let list: Vec<Value> = evs
                    .iter()
                    .map(|(i, m)| Value::String(serdes::to_string(&mutated(&events[*i], m))))
                    .collect();
                let mut doc = json!({"status": "SUCCESS", "result": null, "traceback": null,
                    "children": [], "date_done": "2026-11-30T12:00:00.000000+00:00", "task_id": "t"});
                doc["result"] = Value::Array(list);
                doc
            };
            let bytes = damage(to_bytes(&mutated(&doc, &dm)), &d);
            if let Ok(meta) = parse_lenient(&bytes) {
                apply(&meta)?;
            }
            Ok(())
        },
    );
    n += fuzz("result documents (raw bytes)", r, raw_bytes(), |b| {
        if let Ok(meta) = parse_lenient(&b) {
            apply(&meta)?;
        }
        // A raw event string inside an otherwise valid document.
        let text = String::from_utf8_lossy(&b).into_owned();
        apply(&json!({"status": "SUCCESS", "result": [text]}))
    });
    assert_fed("result documents", n);
}

fn zlib(bytes: &[u8]) -> Vec<u8> {
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
    let _ = z.write_all(bytes);
    z.finish().unwrap_or_default()
}

/// Dagster serdes values from the run storage: the stored plan snapshot (zlib + JSON, then the plan
/// rebuilt and started), run bodies, known state, step events and the coordinator hand-off.
#[test]
fn dagster_serdes_values() {
    let snapshot = fixture("dagster/tests/fixtures/plan_snapshot_fan_in_and_nested_map.json");
    let runs = fixture("dagster/tests/fixtures/versions/1.13.27/job_bodies.json");
    let run = runs
        .as_array()
        .and_then(|a| a.first())
        .map(|r| r.get("run_body").cloned().unwrap_or_else(|| r.clone()))
        .unwrap_or(Value::Null);
    let known = snapshot
        .get("initial_known_state")
        .filter(|k| !k.is_null())
        .cloned()
        .unwrap_or_else(|| json!({"__class__": "KnownExecutionState",
            "dynamic_mappings": {"emit": {"result": ["x", "y"]}},
            "previous_retry_attempts": {"emit": 1}, "ready_outputs": {"__set__": [
                {"__class__": "StepOutputHandle", "step_key": "emit", "output_name": "result", "mapping_key": "x"}]},
            "skipped_nodes": {"__set__": []}, "parent_state": null, "step_output_versions": []}));
    let handoff = json!({"version": 1, "job_config_dict": {"job_image": "img", "dagster_home": "/opt/dagster"},
        "job_namespace": "ns", "per_step_k8s_config": {}, "load_incluster_config": false,
        "kubeconfig_file": null, "job_wait_timeout": 86400.0, "retry_mode": {"__enum__": "RetryMode.ENABLED"},
        "task_default_queue": "dagster", "task_default_priority": 5, "broker": "amqp://guest:***@h//",
        "backend": "rpc://", "executor_name": "celery_k8s_job_executor"});
    let templates = [snapshot, run, known, handoff];
    let decode_all = |which: usize, v: &Value| {
        match which {
            0 => {
                if let Ok(snap) = PlanSnapshot::decode(v) {
                    if let Ok(plan) = ExecutionPlan::rebuild("j", &snap) {
                        if let Ok(mut e) =
                            ActiveExecution::new(plan, RetryMode::Enabled, SortKey::Default, 0.0)
                        {
                            let _ = e.get_steps_to_execute(0.0);
                            let _ = e.plan_events(0.0);
                            let _ = e.get_known_state();
                        }
                    }
                }
            }
            1 => {
                if let Ok(r) = RunRecord::decode(v) {
                    let _ = r.location_name();
                }
            }
            2 => {
                if let Ok(k) = KnownState::decode(v, "known_state") {
                    let _ = k.to_serdes_string();
                }
            }
            _ => {
                let _ = Handoff::decode(v);
            }
        }
        let _ = StepEvent::decode(v);
    };
    let structured = (
        0..templates.len(),
        mutations(),
        byte_damage(),
        any::<bool>(),
    );
    let (s, r) = budget(70);
    let mut n = fuzz(
        "dagster serdes (structured)",
        s,
        structured,
        |(t, m, d, compressed)| {
            let v = mutated(&templates[t], &m);
            if d.is_empty() && !compressed {
                // Intact text: decode the value directly (the parse is covered by the other cases).
                decode_all(t, &v);
                return Ok(());
            }
            let text = damage(serdes::to_string(&v).into_bytes(), &d);
            let parsed = if compressed {
                serdes::parse_zlib(&zlib(&text))
            } else {
                serdes::parse(&text)
            };
            match parsed {
                Ok(v) => decode_all(t, &v),
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
            Ok(())
        },
    );
    n += fuzz("dagster serdes (raw bytes)", r, raw_bytes(), |b| {
        // Raw bytes as a stored (zlib) snapshot body and as JSON text.
        if let Err(e) = PlanSnapshot::from_stored(&b) {
            prop_assert!(!e.to_string().is_empty());
        }
        if let Ok(v) = serdes::parse(&b) {
            for t in 0..templates.len() {
                decode_all(t, &v);
            }
        }
        Ok(())
    });
    assert_fed("dagster serdes", n);
}

/// Event-log JSON in a step process's output (`filter_events`, the port of
/// `filter_dagster_events_from_cli_logs`), each event then read by the engine's decoder.
#[test]
fn step_output_event_log() {
    let log = std::fs::read_to_string(repo_root().join("dagster/tests/fixtures/step_pod.log"))
        .expect("step_pod.log");
    let lines: Vec<String> = log.lines().map(str::to_string).collect();
    let event = |v: &Value| serdes::to_string(v);
    let line_edit = prop_oneof![
        (any::<usize>(), any::<usize>()).prop_map(|(i, j)| (0u8, i, j, Value::Null)),
        (any::<usize>(), mutations()).prop_map(|(i, m)| (
            1u8,
            i,
            0,
            Value::Array(
                m.into_iter()
                    .map(|(p, mu)| json!([p, format!("{mu:?}")]))
                    .collect()
            )
        )),
        (any::<usize>(), arb_json()).prop_map(|(i, v)| (2u8, i, 0, v)),
    ];
    let structured = (
        prop::collection::vec(line_edit, 0..4),
        mutations(),
        byte_damage(),
    );
    let check = |text: &str| -> Result<(), TestCaseError> {
        for e in celeriac_dagster::events::filter_events(text) {
            if let Err(err) = StepEvent::parse(&e) {
                prop_assert!(!err.to_string().is_empty());
            }
        }
        Ok(())
    };
    let base_event = dagster_event("STEP_START", "two", Value::Null);
    let (s, r) = budget(70);
    let mut n = fuzz("event-log (structured)", s, structured, |(edits, m, d)| {
        let mut ls = lines.clone();
        for (kind, i, j, v) in edits {
            let len = ls.len().max(1);
            match kind {
                // Split a line in two (events printed over several lines).
                0 if !ls.is_empty() => {
                    let l = ls[i % len].clone();
                    let cut = l
                        .char_indices()
                        .nth(j % (l.chars().count() + 1))
                        .map_or(l.len(), |c| c.0);
                    ls[i % len] = l[..cut].to_string();
                    ls.insert(i % len + 1, l[cut..].to_string());
                }
                // A mutated DagsterEvent line.
                1 => ls.insert(i % (ls.len() + 1), event(&mutated(&base_event, &[]))),
                _ => ls.insert(i % (ls.len() + 1), to_python_line(&v)),
            }
        }
        ls.push(event(&mutated(&base_event, &m)));
        let bytes = damage(ls.join("\n").into_bytes(), &d);
        check(&String::from_utf8_lossy(&bytes))
    });
    n += fuzz("event-log (raw bytes)", r, raw_bytes(), |b| {
        let text = String::from_utf8_lossy(&b);
        check(&text)?;
        check(&format!("{{\n{text}\n}}"))
    });
    assert_fed("event-log", n);
}

fn to_python_line(v: &Value) -> String {
    celeriac_wire::json::to_python_string(v, false)
}

/// Flower API query strings: `/api/tasks` parameters (`task_query`, the search grammar, dates) run
/// against a state holding tasks, from generated pairs and from raw percent-encoded query strings.
#[test]
fn flower_query_strings() {
    let mut state = EventsState::new(100, None);
    for (i, (name, st)) in [
        ("tasks.add", "task-succeeded"),
        ("dagster.step", "task-failed"),
        ("x", "task-received"),
    ]
    .into_iter()
    .enumerate()
    {
        let uuid = format!("00000000-0000-0000-0000-00000000000{i}");
        for kind in ["task-received", st] {
            let e = json!({"hostname": "celery@w1", "uuid": uuid, "type": kind, "name": name,
                "args": "(1,)", "kwargs": "{'run_id': 'r1', 'n': 2}", "result": "'ok'",
                "timestamp": 1_795_393_521.0 + i as f64, "clock": i, "exception": "ValueError('boom')"});
            if let Value::Object(m) = e {
                state.apply(&prepare_event(m, 1_795_393_530.0));
            }
        }
    }
    const KEYS: &[&str] = &[
        "limit",
        "offset",
        "sort_by",
        "search",
        "received_start",
        "received_end",
        "workername",
        "taskname",
        "state",
        "refresh",
        "status",
    ];
    let value = prop_oneof![
        3 => text(),
        2 => prop::collection::vec(word(), 0..8).prop_map(|w| w.join(" ")),
        1 => any::<i64>().prop_map(|i| i.to_string()),
        1 => (0u32..10_000, 0u32..100, 0u32..100, prop::option::of((0u32..100, 0u32..100)))
            .prop_map(|(y, m, d, hm)| match hm {
                Some((h, mi)) => format!("{y:04}-{m:02}-{d:02} {h:02}:{mi:02}"),
                None => format!("{y:04}-{m:02}-{d:02}"),
            }),
        1 => (1usize..3000).prop_map(|n| "a".repeat(n)),
        1 => (1usize..500).prop_map(|n| "(".repeat(n) + "name:x" + &")".repeat(n)),
    ];
    let pairs = prop::collection::vec((prop::sample::select(KEYS), value), 0..6);
    let run = |q: &HashMap<String, String>| -> Result<(), TestCaseError> {
        match celeriac_flower::api::task_query(q) {
            Ok(tq) => match state.query(&tq) {
                Ok(page) => {
                    for t in page.tasks {
                        let _ = t.list_entry();
                    }
                }
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            },
            Err(e) => {
                let text = format!("{e:?}");
                prop_assert!(!text.is_empty());
            }
        }
        if let Some(s) = q.get("search") {
            let _ = celeriac_flower::search::parse(s);
        }
        Ok(())
    };
    let (s, r) = budget(70);
    let mut n = fuzz("flower query (structured)", s, pairs, |pairs| {
        run(&pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
    });
    n += fuzz("flower query (raw bytes)", r, raw_bytes(), |b| {
        // As axum's `Query<HashMap<String, String>>` reads a query string (form-urlencoded, lossy).
        let q: HashMap<String, String> = url::form_urlencoded::parse(&b).into_owned().collect();
        let text = String::from_utf8_lossy(&b).into_owned();
        run(&q)?;
        run(&HashMap::from([("search".to_string(), text)]))
    });
    assert_fed("flower query", n);
}
