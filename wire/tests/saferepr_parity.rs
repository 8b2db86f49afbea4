//! `celeriac_wire::saferepr` against Celery 5.7's own `celery.utils.saferepr.saferepr` (and the
//! `argsrepr`/`kwargsrepr` headers of its real `app.amqp.as_task_v2`), run by `tests/peers/saferepr_cases.py`
//! in the project venv (`scripts/python-peers.sh`).
//!
//! Random JSON values (seeded: `SAFEREPR_SEED` overrides the seed, `SAFEREPR_VALUES` the number of values)
//! are written as JSON lines in Python's own dialect; both sides parse the same bytes, so `1.0` is a float on
//! both, object keys keep their order and bare `NaN`/`Infinity` load as floats.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::Engine as _;
use celeriac_wire::json::{parse_lenient, to_python_string, FLOAT_MARKER};
use celeriac_wire::saferepr::{
    argsrepr, kwargsrepr, saferepr, Repr, DEFAULT_MAXLEVELS, REPR_MAXSIZE,
};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, RngCore, SeedableRng};
use serde_json::{json, Map, Value};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// The project venv's python: `scripts/python-peers.sh` prints the venv as its last line (a missing peer
/// fails the test, never skips it).
fn python() -> PathBuf {
    let out = Command::new("bash")
        .arg(repo_root().join("scripts/python-peers.sh"))
        .stderr(Stdio::inherit())
        .output()
        .expect("running scripts/python-peers.sh");
    assert!(out.status.success(), "scripts/python-peers.sh failed");
    let venv = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_owned();
    PathBuf::from(venv).join("bin").join("python")
}

/// Runs the peer over `lines` (one case each) and returns its answer for each line.
fn run_peer(lines: &[String]) -> Vec<Value> {
    let path = std::env::temp_dir().join(format!(
        "celeriac-saferepr-{}-{}.jsonl",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
    ));
    {
        let mut f = std::fs::File::create(&path).expect("temp case file");
        for line in lines {
            f.write_all(line.as_bytes()).expect("write case");
            f.write_all(b"\n").expect("write case");
        }
    }
    let out = Command::new(python())
        .arg(repo_root().join("tests/peers/saferepr_cases.py"))
        .arg(&path)
        .stderr(Stdio::inherit())
        .output()
        .expect("running tests/peers/saferepr_cases.py");
    let _ = std::fs::remove_file(&path);
    assert!(out.status.success(), "saferepr_cases.py failed");
    let text = String::from_utf8(out.stdout).expect("peer prints UTF-8");
    let answers: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("peer prints JSON lines"))
        .collect();
    assert_eq!(answers.len(), lines.len(), "one answer per case");
    answers
}

/// Celeriac's answer to one case line, computed from the line itself (the bytes Python parses).
fn ours(line: &str) -> Value {
    let case = parse_lenient(line.as_bytes()).expect("case parses");
    if case.get("task").and_then(Value::as_bool) == Some(true) {
        let args = case["args"].as_array().expect("args");
        let kwargs = case["kwargs"].as_object().expect("kwargs");
        return json!([argsrepr(args), kwargsrepr(kwargs)]);
    }
    let maxlen = case["maxlen"].as_u64().map(|m| m as usize);
    let maxlevels = case["maxlevels"].as_u64().expect("maxlevels") as usize;
    let value = &case["value"];
    let repr = if case["tuple"].as_bool() == Some(true) {
        Repr::Tuple(value.as_array().expect("tuple case holds an array"))
    } else {
        Repr::Value(value)
    };
    Value::String(saferepr(repr, maxlen, maxlevels))
}

/// Compares celeriac with Celery on every line; panics listing the mismatches.
fn assert_parity(lines: &[String], seed: u64) -> usize {
    let theirs = run_peer(lines);
    let mut failures = Vec::new();
    for (line, want) in lines.iter().zip(&theirs) {
        let got = ours(line);
        if &got != want {
            failures.push(format!(
                "case:   {line}\ncelery: {}\nours:   {}",
                to_python_string(want, false),
                to_python_string(&got, false)
            ));
        }
    }
    if !failures.is_empty() {
        for f in failures.iter().take(20) {
            eprintln!("{f}\n");
        }
        panic!(
            "{} of {} cases differ from Celery's saferepr (seed {seed}; first 20 above)",
            failures.len(),
            lines.len()
        );
    }
    lines.len()
}

fn seed() -> u64 {
    std::env::var("SAFEREPR_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5afe_4e94)
}

// ---------------------------------------------------------------------------------------------------
// Random values
// ---------------------------------------------------------------------------------------------------

const PLAIN: &[char] = &[
    'a', 'b', 'c', 'd', 'e', 'x', 'y', 'z', 'A', 'Q', 'Z', '0', '1', '7', '9', '_', '-', '.', '/',
    ':',
];
const SPECIAL: &[char] = &[
    '\'',
    '"',
    '\\',
    '\n',
    '\t',
    '\r',
    '\0',
    '\u{1}',
    '\u{8}',
    '\u{c}',
    '\u{1b}',
    '\u{1f}',
    '\u{7f}',
    '\u{80}',
    '\u{85}',
    '\u{a0}',
    'é',
    'ß',
    'Ω',
    'ж',
    '中',
    '文',
    '\u{300}',
    '\u{200b}',
    '\u{2028}',
    '\u{2029}',
    '\u{feff}',
    '\u{fffd}',
    '\u{ffff}',
    '😀',
    '🦀',
    '\u{10ffff}',
    '{',
    '}',
    '[',
    ']',
    '(',
    ')',
    ',',
    '%',
    '$',
    '`',
    '#',
];

struct Gen {
    rng: StdRng,
    /// Nodes the value being generated may still have (keeps random trees small).
    nodes: usize,
}

impl Gen {
    fn string_of_len(&mut self, len: usize) -> String {
        // Per string: how often (per 1024) spaces and special characters appear; some strings have none.
        let space = *[0, 0, 51, 205, 512].choose(&mut self.rng).unwrap_or(&0);
        let special = *[0, 51, 205, 614].choose(&mut self.rng).unwrap_or(&0);
        (0..len)
            .map(|_| {
                // One draw per character (a debug build spends most of this test generating strings).
                let r = self.rng.next_u32();
                let pick = (r >> 20) as usize;
                if r & 0x3ff < space {
                    ' '
                } else if (r >> 10) & 0x3ff < special {
                    SPECIAL[pick % SPECIAL.len()]
                } else {
                    PLAIN[pick % PLAIN.len()]
                }
            })
            .collect()
    }

    fn text(&mut self, len: std::ops::Range<usize>) -> String {
        let len = self.rng.gen_range(len);
        self.string_of_len(len)
    }

    fn string(&mut self) -> String {
        let len = match self.rng.gen_range(0..100) {
            0..=54 => self.rng.gen_range(0..12),
            55..=79 => self.rng.gen_range(12..100),
            80..=89 => self.rng.gen_range(100..900),
            // Keeps big trees (cheap to cut, slow to generate in a debug build) small.
            _ if self.nodes > 20 && self.rng.gen_bool(0.7) => self.rng.gen_range(12..100),
            _ => self.rng.gen_range(1000..1050), // around the 1024 budget
        };
        self.string_of_len(len)
    }

    fn key(&mut self) -> String {
        let len = match self.rng.gen_range(0..20) {
            0 => 0,
            1 => self.rng.gen_range(30..300),
            19 => self.rng.gen_range(1000..1040),
            _ => self.rng.gen_range(1..16),
        };
        self.string_of_len(len)
    }

    fn int(&mut self) -> Value {
        match self.rng.gen_range(0..10) {
            0..=4 => json!(self.rng.gen_range(-20i64..200)),
            5 => json!(self.rng.gen::<i64>()),
            6 => json!(self.rng.gen_range(i64::MAX as u64 + 1..=u64::MAX)),
            7 => json!(*[i64::MIN, i64::MAX, -1, 0, 1_000_000_007, -(1 << 53)]
                .choose(&mut self.rng)
                .unwrap_or(&0)),
            8 => json!(*[u64::MAX, i64::MAX as u64 + 1, 10_000_000_000_000_000_000]
                .choose(&mut self.rng)
                .unwrap_or(&u64::MAX)),
            _ => json!(10i64.pow(self.rng.gen_range(0..19)) * if self.rng.gen() { 1 } else { -1 }),
        }
    }

    fn float(&mut self) -> Value {
        let f = match self.rng.gen_range(0..10) {
            0 | 1 => f64::from(self.rng.gen_range(-1000i32..1000)), // integral: `3.0`
            2 => *[
                0.0,
                -0.0,
                1e16,
                1e15,
                9_999_999_999_999_998.0,
                1e17,
                1e21,
                1e22,
                1e-4,
                1e-5,
                0.1,
                0.3,
                1.5,
                5e-324,
                f64::MAX,
                f64::MIN_POSITIVE,
                -f64::MAX,
                123_456_789_012_345_680.0,
                1_795_394_196.227_308_3,
                2f64.powi(53) + 2.0,
            ]
            .choose(&mut self.rng)
            .unwrap_or(&0.0),
            3 | 4 => {
                let bits = self.rng.gen::<u64>();
                let f = f64::from_bits(bits);
                if f.is_finite() {
                    f
                } else {
                    0.25
                }
            }
            _ => {
                let exp = self.rng.gen_range(-30i32..30);
                let sign = if self.rng.gen() { 1.0 } else { -1.0 };
                sign * self.rng.gen::<f64>() * 10f64.powi(exp)
            }
        };
        json!(f)
    }

    fn non_finite(&mut self) -> Value {
        let name = *["NaN", "Infinity", "-Infinity"]
            .choose(&mut self.rng)
            .unwrap_or(&"NaN");
        json!({ FLOAT_MARKER: name })
    }

    fn leaf(&mut self) -> Value {
        match self.rng.gen_range(0..100) {
            0..=34 => Value::String(self.string()),
            35..=54 => self.int(),
            55..=71 => self.float(),
            72..=79 => Value::Null,
            80..=89 => Value::Bool(self.rng.gen()),
            90..=91 => self.non_finite(),
            92..=95 => json!([]),
            _ => json!({}),
        }
    }

    fn len(&mut self) -> usize {
        match self.rng.gen_range(0..20) {
            0..=2 => 0,
            3 => 1,
            4..=16 => self.rng.gen_range(1..7),
            17 | 18 => self.rng.gen_range(7..40),
            _ => self.rng.gen_range(40..300), // cut somewhere inside by the 1024 budget
        }
    }

    fn value(&mut self, depth: usize) -> Value {
        self.nodes = self.nodes.saturating_sub(1);
        let leaf_p = match depth {
            _ if self.nodes == 0 => 1.0,
            0 => 0.15,
            1 => 0.4,
            2 => 0.55,
            d if d >= 12 => 1.0,
            _ => 0.7,
        };
        if self.rng.gen_bool(leaf_p) {
            return self.leaf();
        }
        let n = self.len().min(self.nodes);
        if self.rng.gen_bool(0.5) {
            Value::Array((0..n).map(|_| self.value(depth + 1)).collect())
        } else {
            let mut m = Map::new();
            for _ in 0..n {
                let k = self.key();
                let v = self.value(depth + 1);
                m.insert(k, v);
            }
            Value::Object(m)
        }
    }

    /// A chain of nested containers, `depth` deep, with a few siblings at each level.
    fn deep(&mut self, depth: usize) -> Value {
        if depth == 0 {
            return self.leaf();
        }
        let inner = self.deep(depth - 1);
        let before = self.rng.gen_range(0..3);
        let after = self.rng.gen_range(0..3);
        if self.rng.gen() {
            let mut items: Vec<Value> = (0..before).map(|_| self.leaf()).collect();
            items.push(inner);
            items.extend((0..after).map(|_| self.leaf()));
            Value::Array(items)
        } else {
            let mut m = Map::new();
            for _ in 0..before {
                m.insert(self.key(), self.leaf());
            }
            m.insert(self.key(), inner);
            for _ in 0..after {
                m.insert(self.key(), self.leaf());
            }
            Value::Object(m)
        }
    }

    /// A Dagster step's kwargs (the captured ones) with strings, numbers and containers perturbed so the
    /// 1024-character cut falls at every kind of token.
    fn dagster_kwargs(&mut self, template: &Value) -> Value {
        self.perturb(template, 0)
    }

    fn perturb(&mut self, v: &Value, depth: usize) -> Value {
        match v {
            Value::String(s) => match self.rng.gen_range(0..10) {
                0 => Value::String(self.text(0..60)),
                1 => {
                    let extra = self.text(1..30);
                    Value::String(format!("{s}{extra}"))
                }
                2 => Value::String(s.chars().take(self.rng.gen_range(0..=s.len())).collect()),
                _ => v.clone(),
            },
            Value::Array(items) => {
                let mut out: Vec<Value> =
                    items.iter().map(|i| self.perturb(i, depth + 1)).collect();
                if self.rng.gen_bool(0.2) {
                    out.push(self.value(depth + 1));
                }
                Value::Array(out)
            }
            Value::Object(m) => {
                let mut out = Map::new();
                for (k, val) in m {
                    if self.rng.gen_bool(0.05) {
                        continue;
                    }
                    let key = if self.rng.gen_bool(0.05) {
                        format!("{k}{}", self.text(1..12))
                    } else {
                        k.clone()
                    };
                    out.insert(key, self.perturb(val, depth + 1));
                }
                if self.rng.gen_bool(0.1) {
                    out.insert(self.key(), self.value(depth + 1));
                }
                Value::Object(out)
            }
            Value::Number(_) if self.rng.gen_bool(0.3) => {
                if self.rng.gen() {
                    self.int()
                } else {
                    self.float()
                }
            }
            Value::Null | Value::Bool(_) if self.rng.gen_bool(0.2) => self.leaf(),
            _ => v.clone(),
        }
    }
}

/// One case line; `value` is the value already written in Python's JSON dialect.
fn saferepr_case(value: &str, tuple: bool, maxlen: Option<usize>, maxlevels: usize) -> String {
    let maxlen = maxlen.map_or_else(|| "null".to_owned(), |m| m.to_string());
    format!(
        r#"{{"maxlen": {maxlen}, "maxlevels": {maxlevels}, "tuple": {tuple}, "value": {value}}}"#
    )
}

fn task_case(args: &[Value], kwargs: &Map<String, Value>) -> String {
    to_python_string(
        &json!({"task": true, "args": args, "kwargs": kwargs}),
        false,
    )
}

/// The body kwargs of the `say_hello` step message in captures/celery_k8s_step_task.json (key order as
/// published); the `produce_number` message's differ only in the step key.
const CAPTURED_SAY_HELLO_KWARGS: &str = concat!(
    r#"{"execute_step_args_packed":{"__class__":"ExecuteStepArgs","pipeline_origin":{"__class__":"P"#,
    r#"ipelinePythonOrigin","pipeline_name":"ck8s_job","repository_origin":{"__class__":"Repository"#,
    r#"PythonOrigin","executable_path":"/usr/local/bin/python3","code_pointer":{"__class__":"FileCo"#,
    r#"dePointer","python_file":"job_ck8s.py","fn_name":"ck8s_job","working_directory":"/opt/dagste"#,
    r#"r/research"},"container_image":null,"entry_point":["dagster"],"container_context":null}},"pi"#,
    r#"peline_run_id":"ba924453-6cab-4ef7-9f6b-ee3c7a9eef4a","step_keys_to_execute":["say_hello"],""#,
    r#"instance_ref":{"__class__":"InstanceRef","local_artifact_storage_data":{"__class__":"Configu"#,
    r#"rableClassData","module_name":"dagster.core.storage.root","class_name":"LocalArtifactStorage"#,
    r#"","config_yaml":"base_dir: /opt/dagster/research/home\n"},"compute_logs_data":{"__class__":""#,
    r#"ConfigurableClassData","module_name":"dagster.core.storage.local_compute_log_manager","class"#,
    r#"_name":"LocalComputeLogManager","config_yaml":"base_dir: /opt/dagster/research/home/storage\"#,
    r#"n"},"scheduler_data":{"__class__":"ConfigurableClassData","module_name":"dagster.core.schedu"#,
    r#"ler","class_name":"DagsterDaemonScheduler","config_yaml":"{}\n"},"run_coordinator_data":{"__"#,
    r#"class__":"ConfigurableClassData","module_name":"dagster.core.run_coordinator","class_name":""#,
    r#"QueuedRunCoordinator","config_yaml":"{}\n"},"run_launcher_data":{"__class__":"ConfigurableCl"#,
    r#"assData","module_name":"dagster_celery_k8s","class_name":"CeleryK8sRunLauncher","config_yaml"#,
    r#"":"backend:\n  env: DAGSTER_CELERY_BACKEND_URL\nbroker:\n  env: DAGSTER_CELERY_BROKER_URL\nd"#,
    r#"agster_home: /opt/dagster/dagster_home\ninstance_config_map: dagster-instance\njob_namespace"#,
    r#": default\nkubeconfig_file: /opt/dagster/research/kubeconfig.yaml\nload_incluster_config: fa"#,
    r#"lse\npostgres_password_secret: dagster-postgresql-secret\n"},"settings":{"telemetry":{"enabl"#,
    r#"ed":false}},"run_storage_data":{"__class__":"ConfigurableClassData","module_name":"dagster_p"#,
    r#"ostgres","class_name":"PostgresRunStorage","config_yaml":"postgres_db:\n  db_name: dagster_r"#,
    r#"esearch\n  hostname: 127.0.0.1\n  password:\n    env: DAGSTER_PG_PASSWORD\n  port: 5432\n  u"#,
    r#"sername: postgres\n"},"event_storage_data":{"__class__":"ConfigurableClassData","module_name"#,
    r#"":"dagster_postgres","class_name":"PostgresEventLogStorage","config_yaml":"postgres_db:\n  d"#,
    r#"b_name: dagster_research\n  hostname: 127.0.0.1\n  password:\n    env: DAGSTER_PG_PASSWORD\n"#,
    r#"  port: 5432\n  username: postgres\n"},"schedule_storage_data":{"__class__":"ConfigurableCla"#,
    r#"ssData","module_name":"dagster_postgres","class_name":"PostgresScheduleStorage","config_yaml"#,
    r#"":"postgres_db:\n  db_name: dagster_research\n  hostname: 127.0.0.1\n  password:\n    env: D"#,
    r#"AGSTER_PG_PASSWORD\n  port: 5432\n  username: postgres\n"},"custom_instance_class_data":null"#,
    r#","storage_data":{"__class__":"ConfigurableClassData","module_name":"dagster_postgres","class"#,
    r#"_name":"DagsterPostgresStorage","config_yaml":"postgres_db:\n  db_name: dagster_research\n  "#,
    r#"hostname: 127.0.0.1\n  password:\n    env: DAGSTER_PG_PASSWORD\n  port: 5432\n  username: po"#,
    r#"stgres\n"},"secrets_loader_data":null,"defs_state_storage_data":null},"retry_mode":{"__enum_"#,
    r#"_":"RetryMode.DEFERRED"},"known_state":{"__class__":"KnownExecutionState","previous_retry_at"#,
    r#"tempts":{},"dynamic_mappings":{},"step_output_versions":[],"ready_outputs":{"__set__":[]},"p"#,
    r#"arent_state":null},"should_verify_step":true,"print_serialized_events":true},"job_config_dic"#,
    r#"t":{"job_image":"example.com/research/user-code:1.0","dagster_home":"/opt/dagster/dagster_ho"#,
    r#"me","image_pull_policy":"IfNotPresent","image_pull_secrets":[],"service_account_name":"dagst"#,
    r#"er-sa","instance_config_map":"dagster-instance","postgres_password_secret":"dagster-postgres"#,
    r#"ql-secret","env_config_maps":["my-env-cm"],"env_secrets":["my-env-secret"],"env_vars":[],"vo"#,
    r#"lume_mounts":[],"volumes":[],"labels":{},"resources":{},"scheduler_name":null,"security_cont"#,
    r#"ext":{}},"job_namespace":"default","user_defined_k8s_config_dict":{"container_config":{},"po"#,
    r#"d_template_spec_metadata":{},"pod_spec_config":{},"job_config":{},"job_metadata":{},"job_spe"#,
    r#"c_config":{},"deployment_metadata":{},"service_metadata":{},"service_spec_config":{},"merge_"#,
    r#"behavior":"DEEP"},"per_step_k8s_config":{"add_one":{"container_config":{"env":[{"name":"PER_"#,
    r#"STEP_ENV","value":"1"}]},"pod_template_spec_metadata":{},"pod_spec_config":{},"job_config":{"#,
    r#"},"job_metadata":{},"job_spec_config":{}}},"load_incluster_config":false,"job_wait_timeout":"#,
    r#"600.0,"kubeconfig_file":"/opt/dagster/research/kubeconfig.yaml"}"#,
);

/// The kwargs of the two step messages `dagster_celery_k8s` published (say_hello, produce_number).
fn captured_kwargs() -> Vec<Map<String, Value>> {
    [
        CAPTURED_SAY_HELLO_KWARGS.to_owned(),
        CAPTURED_SAY_HELLO_KWARGS.replace("\"say_hello\"", "\"produce_number\""),
    ]
    .iter()
    .map(
        |text| match parse_lenient(text.as_bytes()).expect("captured kwargs parse") {
            Value::Object(m) => m,
            other => panic!("unexpected kwargs {other}"),
        },
    )
    .collect()
}

#[test]
fn random_values_match_celery_saferepr() {
    let seed = seed();
    let values: usize = std::env::var("SAFEREPR_VALUES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2500);
    let mut g = Gen {
        rng: StdRng::seed_from_u64(seed),
        nodes: 0,
    };
    let templates: Vec<Value> = captured_kwargs().into_iter().map(Value::Object).collect();
    let mut lines = Vec::new();

    // Hand-picked edge cases first.
    let edge = vec![
        json!(null),
        json!(true),
        json!(""),
        json!("'"),
        json!("\"'\\\n"),
        json!(" "),
        json!([]),
        json!({}),
        json!([[]]),
        json!([{}]),
        json!({"": ""}),
        json!([[[[]]]]),
        json!([[[[[[[[1]]]]]]]]),
        json!({"a": {"b": {"c": {"d": {}}}}}),
        json!(-0.0),
        json!(0.0),
        json!(1e16),
        json!(1e-5),
        json!(u64::MAX),
        json!(i64::MIN),
        json!(818_650_564_465_832.0 + 0.25), // halfway: Python prints ...832.2
        json!(2f64.powi(-25)),               // 2.9802322387695312e-08
        json!([1e22, 1e-7, 1.5e300, 5e-324, f64::MAX]),
        json!("x".repeat(1024)),
        json!("x".repeat(1023)),
        json!("x".repeat(1022)),
        json!(format!("{} y", "x".repeat(1030))),
        json!(["x".repeat(1020), 1]),
        json!(["x".repeat(1019), [1, 2]]),
    ];
    for v in &edge {
        let text = to_python_string(v, false);
        for maxlen in [
            None,
            Some(0),
            Some(1),
            Some(2),
            Some(3),
            Some(5),
            Some(REPR_MAXSIZE),
        ] {
            lines.push(saferepr_case(&text, false, maxlen, DEFAULT_MAXLEVELS));
        }
        if v.is_array() {
            lines.push(saferepr_case(
                &text,
                true,
                Some(REPR_MAXSIZE),
                DEFAULT_MAXLEVELS,
            ));
        }
    }

    for i in 0..values {
        g.nodes = if g.rng.gen_bool(0.1) {
            g.rng.gen_range(100..400)
        } else {
            g.rng.gen_range(1..100)
        };
        let v = if i % 10 == 0 {
            let depth = g.rng.gen_range(1..16);
            g.deep(depth)
        } else if i % 10 == 1 {
            let t = templates[i % templates.len()].clone();
            g.dagster_kwargs(&t)
        } else {
            g.value(0)
        };
        let text = to_python_string(&v, false);
        // The headers' configuration, no limit, and a short budget with another depth limit.
        lines.push(saferepr_case(
            &text,
            false,
            Some(REPR_MAXSIZE),
            DEFAULT_MAXLEVELS,
        ));
        lines.push(saferepr_case(&text, false, None, DEFAULT_MAXLEVELS));
        let maxlen = g.rng.gen_range(0..160);
        let maxlevels = *[0, 1, 2, 3, 4, 6].choose(&mut g.rng).unwrap_or(&3);
        lines.push(saferepr_case(&text, false, Some(maxlen), maxlevels));
        if let Value::Array(items) = &v {
            lines.push(saferepr_case(
                &text,
                true,
                Some(REPR_MAXSIZE),
                DEFAULT_MAXLEVELS,
            ));
            if items.len() <= 1 || g.rng.gen_bool(0.3) {
                let maxlen = g.rng.gen_range(0..60);
                lines.push(saferepr_case(&text, true, Some(maxlen), DEFAULT_MAXLEVELS));
            }
        }
        // Through Celery's real `as_task_v2`, now and then.
        if i % 5 == 0 {
            let args: Vec<Value> = match &v {
                Value::Array(a) => a.clone(),
                _ => (0..g.rng.gen_range(0..3)).map(|_| g.value(1)).collect(),
            };
            let kwargs = match &v {
                Value::Object(m) if !m.contains_key(FLOAT_MARKER) => m.clone(),
                _ => Map::new(),
            };
            lines.push(task_case(&args, &kwargs));
        }
    }
    let n = assert_parity(&lines, seed);
    assert!(n >= 5000, "only {n} cases");
    eprintln!("{n} saferepr cases match Celery 5.7 (seed {seed})");
}

/// The `kwargsrepr` headers of the two step messages `dagster_celery_k8s` published
/// (captures/celery_k8s_step_task.json), for the kwargs of [`captured_kwargs`].
const CAPTURED_KWARGSREPR: [&str; 2] = [
    "{'execute_step_args_packed': {'__class__': 'ExecuteStepArgs', 'pipeline_origin': {'__class__': 'PipelinePythonOrigin', 'pipeline_name': 'ck8s_job', 'repository_origin': {...}}, 'pipeline_run_id': 'ba924453-6cab-4ef7-9f6b-ee3c7a9eef4a', 'step_keys_to_execute': ['say_hello'], 'instance_ref': {'__class__': 'InstanceRef', 'local_artifact_storage_data': {...}, 'compute_logs_data': {...}, 'scheduler_data': {...}, 'run_coordinator_data': {...}, 'run_launcher_data': {...}, 'settings': {...}, 'run_storage_data': {...}, 'event_storage_data': {...}, 'schedule_storage_data': {...}, 'custom_instance_class_data': None, 'storage_data': {...}, 'secrets_loader_data': None, 'defs_state_storage_data': None}, 'retry_mode': {'__enum__': 'RetryMode.DEFERRED'}, 'known_state': {'__class__': 'KnownExecutionState', 'previous_retry_attempts': {...}, 'dynamic_mappings': {...}, 'step_output_versions': [...], 'ready_outputs': {...}, 'parent_state': None}, 'should_verify_step': True, 'print_serialized_events': True}, 'job_config_dict': {'jo...', ...}}",
    "{'execute_step_args_packed': {'__class__': 'ExecuteStepArgs', 'pipeline_origin': {'__class__': 'PipelinePythonOrigin', 'pipeline_name': 'ck8s_job', 'repository_origin': {...}}, 'pipeline_run_id': 'ba924453-6cab-4ef7-9f6b-ee3c7a9eef4a', 'step_keys_to_execute': ['produce_number'], 'instance_ref': {'__class__': 'InstanceRef', 'local_artifact_storage_data': {...}, 'compute_logs_data': {...}, 'scheduler_data': {...}, 'run_coordinator_data': {...}, 'run_launcher_data': {...}, 'settings': {...}, 'run_storage_data': {...}, 'event_storage_data': {...}, 'schedule_storage_data': {...}, 'custom_instance_class_data': None, 'storage_data': {...}, 'secrets_loader_data': None, 'defs_state_storage_data': None}, 'retry_mode': {'__enum__': 'RetryMode.DEFERRED'}, 'known_state': {'__class__': 'KnownExecutionState', 'previous_retry_attempts': {...}, 'dynamic_mappings': {...}, 'step_output_versions': [...], 'ready_outputs': {...}, 'parent_state': None}, 'should_verify_step': True, 'print_serialized_events': True}, 'job_config_dict', ...}",
];

#[test]
fn dagster_step_kwargsrepr_matches_the_capture() {
    let kwargs = captured_kwargs();
    assert_eq!(kwargs.len(), CAPTURED_KWARGSREPR.len());
    for (kw, want) in kwargs.iter().zip(CAPTURED_KWARGSREPR) {
        assert_eq!(kwargsrepr(kw), want);
        assert_eq!(argsrepr(&[]), "()");
    }
}

/// The same against the raw captures themselves (AMQP and Redis), when the reference directory is here.
#[test]
fn dagster_step_headers_match_the_raw_captures() {
    let dir = Path::new("/work/shared/reference/captures");
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut checked = 0;
    let mut check = |body: &[u8], headers: &Value| {
        let body = parse_lenient(body).expect("body parses");
        let args = body[0].as_array().expect("args");
        let kwargs = body[1].as_object().expect("kwargs");
        assert_eq!(json!(argsrepr(args)), headers["argsrepr"]);
        assert_eq!(json!(kwargsrepr(kwargs)), headers["kwargsrepr"]);
        checked += 1;
    };
    if let Ok(text) = std::fs::read(dir.join("celery_k8s_step_task.json")) {
        let capture = parse_lenient(&text).expect("capture parses");
        for m in capture["messages"].as_array().expect("messages") {
            let body = b64
                .decode(m["body_b64"].as_str().expect("body_b64"))
                .expect("base64 body");
            check(&body, &m["properties"]["application_headers"]);
        }
    }
    if let Ok(text) = std::fs::read(dir.join("celery_k8s_step_task_redis.json")) {
        let capture = parse_lenient(&text).expect("capture parses");
        for m in capture["publish_phase"]["messages"]
            .as_array()
            .expect("messages")
        {
            let payload = parse_lenient(
                m["raw_lpush_payload_utf8"]
                    .as_str()
                    .expect("payload")
                    .as_bytes(),
            )
            .expect("payload parses");
            let body = b64
                .decode(payload["body"].as_str().expect("body"))
                .expect("base64 body");
            check(&body, &payload["headers"]);
        }
    }
    eprintln!("{checked} captured messages checked");
}
