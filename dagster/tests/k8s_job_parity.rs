//! Parity with Dagster: for a matrix of job configs and user-defined k8s configs (resources, env,
//! volumes, secrets, tags and per-step config, snake_case and camelCase), celeriac's Job body equals
//! what the real `dagster_k8s.job.construct_dagster_k8s_job` (dagster-k8s 0.29.27) builds and the
//! Kubernetes Python client serializes — compared as JSON, field by field.

use std::io::Write;
use std::process::{Command, Stdio};

use celeriac_dagster::kubernetes::job::{construct_job, JobInputs};
use serde_json::{json, Map, Value};

const PYTHON: &str = r#"
import json, sys, kubernetes
from dagster_k8s.job import construct_dagster_k8s_job, DagsterK8sJobConfig, UserDefinedDagsterK8sConfig
api = kubernetes.client.ApiClient()
out = []
for c in json.load(sys.stdin):
    job = construct_dagster_k8s_job(
        DagsterK8sJobConfig(**c["job_config"]), c["args"], c["job_name"],
        UserDefinedDagsterK8sConfig.from_dict(c["user_config"]), pod_name=c["pod_name"],
        component=c["component"], labels=c["labels"], env_vars=c["env_vars"])
    out.append(api.sanitize_for_serialization(job))
print(json.dumps(out))
"#;

fn python() -> String {
    let home = std::env::var("HOME").unwrap_or_default();
    format!("{home}/.cache/celeriac/venv/bin/python")
}

fn base_job_config() -> Map<String, Value> {
    json!({
        "job_image": "example.com/user-code:1.0", "dagster_home": null, "image_pull_policy": "IfNotPresent",
        "image_pull_secrets": [], "service_account_name": null, "instance_config_map": "dagster-instance",
        "postgres_password_secret": null, "env_config_maps": [], "env_secrets": [], "env_vars": [],
        "volume_mounts": [], "volumes": [], "labels": {}, "resources": {}, "scheduler_name": null,
        "security_context": {}
    })
    .as_object()
    .cloned()
    .unwrap_or_default()
}

fn case(job_config: Value, user_config: Value) -> Value {
    let mut jc = base_job_config();
    if let Value::Object(over) = job_config {
        jc.extend(over);
    }
    json!({
        "job_config": jc, "user_config": user_config,
        "args": ["dagster", "api", "execute_step", "--compressed-input-json", "eJzLSM3JyQcABiwCFQ=="],
        "job_name": "dagster-step-2200769509be473b93badf403ceec29a", "pod_name": "dagster-step-2200769509be473b93badf403ceec29a",
        "component": "step_worker",
        "labels": {"dagster/job": "ck8s_job", "dagster/op": "add_one", "dagster/run-id": "f93bb44e-0000-0000-0000-00000000754f"},
        "env_vars": [{"name": "DAGSTER_RUN_JOB_NAME", "value": "ck8s_job"}, {"name": "DAGSTER_RUN_STEP_KEY", "value": "add_one"}],
    })
}

fn cases() -> Vec<Value> {
    vec![
        case(json!({}), json!({})),
        case(
            json!({"dagster_home": "/opt/dagster/dagster_home", "postgres_password_secret": "dagster-postgresql-secret"}),
            json!({}),
        ),
        case(
            json!({"env_config_maps": ["cm1", "cm2"], "env_secrets": ["s1"]}),
            json!({}),
        ),
        case(
            json!({"env_vars": ["A=1", "WITH_EQ=x=y", "CELERIAC_PARITY_FROM_ENV"]}),
            json!({}),
        ),
        case(
            json!({"volumes": [{"name": "data", "persistent_volume_claim": {"claim_name": "pvc"}}, {"name": "cfg", "config_map": {"name": "cm", "default_mode": 420}}],
                   "volume_mounts": [{"name": "data", "mount_path": "/data", "read_only": true}]}),
            json!({}),
        ),
        case(
            json!({"image_pull_secrets": [{"name": "regcred"}], "service_account_name": "dagster-sa", "image_pull_policy": "Always"}),
            json!({}),
        ),
        case(
            json!({"labels": {"team": "research", "cost-center": "42"}}),
            json!({}),
        ),
        case(
            json!({"resources": {"limits": {"cpu": "2", "memory": "4Gi"}, "requests": {"cpu": "500m"}}}),
            json!({}),
        ),
        case(
            json!({"resources": {"limits": {"cpu": "2"}}}),
            json!({"container_config": {"resources": {"limits": {"nvidia.com/gpu": "1"}}}}),
        ),
        case(
            json!({}),
            json!({"container_config": {"env": [{"name": "TOKEN", "value_from": {"secret_key_ref": {"name": "tok", "key": "t"}}}, {"name": "PLAIN", "value": "1"}]}}),
        ),
        case(
            json!({}),
            json!({"container_config": {"imagePullPolicy": "Never", "volumeMounts": [{"name": "x", "mountPath": "/x"}], "envFrom": [{"configMapRef": {"name": "extra"}}]}}),
        ),
        case(
            json!({}),
            json!({"pod_spec_config": {"node_selector": {"disk_type": "ssd"}, "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
                   "affinity": {"node_affinity": {"required_during_scheduling_ignored_during_execution": {"node_selector_terms": [{"match_expressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]}}}}}),
        ),
        case(
            json!({}),
            json!({"pod_spec_config": {"containers": [{"name": "sidecar", "image": "busybox", "args": ["sleep", "3600"]}]}}),
        ),
        case(
            json!({}),
            json!({"pod_template_spec_metadata": {"annotations": {"sidecar.istio.io/inject": "false"}, "labels": {"pod-label": "p"}}}),
        ),
        case(
            json!({"labels": {"team": "a"}}),
            json!({"job_metadata": {"labels": {"team": "user-wins-not", "job-label": "j"}, "annotations": {"note": "n"}}}),
        ),
        case(
            json!({}),
            json!({"job_spec_config": {"active_deadline_seconds": 3600, "backoff_limit": 3, "ttl_seconds_after_finished": 60}}),
        ),
        case(
            json!({"security_context": {"run_as_user": 1000, "read_only_root_filesystem": true}}),
            json!({}),
        ),
        case(
            json!({"security_context": {"run_as_user": 1000}}),
            json!({"container_config": {"security_context": {"run_as_non_root": true, "capabilities": {"drop": ["ALL"]}}}}),
        ),
        case(
            json!({"scheduler_name": "volcano", "service_account_name": "a"}),
            json!({"pod_spec_config": {"service_account_name": "b", "automount_service_account_token": false}}),
        ),
        case(
            json!({}),
            json!({"pod_spec_config": {"host_ipc": true, "dns_config": {"nameservers": ["1.1.1.1"]}, "priority_class_name": "high"}}),
        ),
        case(
            json!({}),
            json!({"container_config": {"image": "override:2", "name": "main", "command": ["python"], "working_dir": "/app"}, "job_config": {"metadata": {"annotations": {"ignored": "x"}}}}),
        ),
        case(
            json!({"volumes": [{"name": "v", "secret": {"secret_name": "s"}}]}),
            json!({"pod_spec_config": {"volumes": [{"name": "w", "emptyDir": {"medium": "Memory"}}]}}),
        ),
    ]
}

#[test]
fn step_jobs_match_construct_dagster_k8s_job() {
    std::env::set_var("CELERIAC_PARITY_FROM_ENV", "from-the-worker-env");
    let cases = cases();
    assert!(cases.len() >= 20);
    let mut child = Command::new(python())
        .args(["-c", PYTHON])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the project venv's python (scripts/python-peers.sh)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(
            serde_json::to_string(&cases)
                .expect("cases serialize")
                .as_bytes(),
        )
        .expect("write cases");
    let out = child.wait_with_output().expect("python ran");
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let expected: Vec<Value> = serde_json::from_slice(&out.stdout).expect("python output JSON");
    for (i, (c, want)) in cases.iter().zip(&expected).enumerate() {
        let labels: Vec<(String, String)> = c["labels"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect()
            })
            .unwrap_or_default();
        let args: Vec<String> = c["args"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        let got = construct_job(&JobInputs {
            job_config: c["job_config"].as_object().expect("job config"),
            args: Some(args),
            job_name: c["job_name"].as_str().unwrap_or_default(),
            pod_name: c["pod_name"].as_str(),
            component: c["component"].as_str(),
            labels,
            env_vars: c["env_vars"].as_array().cloned().unwrap_or_default(),
            user_config: c["user_config"].as_object().expect("user config"),
            dagster_version: "1.13.27",
        })
        .expect("job builds");
        assert_eq!(
            &got, want,
            "case {i}: {}\nceleriac: {}\ndagster:  {}",
            c["user_config"], got, want
        );
    }
}
