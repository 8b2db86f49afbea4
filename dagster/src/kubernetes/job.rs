//! The step Job body, field for field what `construct_dagster_k8s_job` (dagster-k8s 0.29) produces and
//! the Kubernetes client POSTs (spec: dagster-celery-k8s.md §3.2).
//!
//! Everything is assembled in API form (camelCase): user config is first converted with
//! [`super::schema::to_api`], so snake_case and camelCase input give the same Job.

use serde_json::{json, Map, Value};

use super::schema::to_api;

/// The Dagster version the Job's `app.kubernetes.io/version` label reports (the Python worker
/// reports its own; celeriac speaks for this one).
pub const DAGSTER_VERSION: &str = "1.13.27";
/// `DEFAULT_K8S_JOB_TTL_SECONDS_AFTER_FINISHED`.
pub const DEFAULT_TTL_SECONDS: u64 = 86_400;
/// Key of the Postgres password in Dagster's `postgres_password_secret`.
const PG_PASSWORD_KEY: &str = "postgresql-password";

/// Inputs of `construct_dagster_k8s_job`.
#[derive(Debug, Clone)]
pub struct JobInputs<'a> {
    /// `DagsterK8sJobConfig` as a dict (`job_config_dict` of the task).
    pub job_config: &'a Map<String, Value>,
    pub args: Option<Vec<String>>,
    pub job_name: &'a str,
    pub pod_name: Option<&'a str>,
    pub component: Option<&'a str>,
    pub labels: Vec<(String, String)>,
    pub env_vars: Vec<Value>,
    /// `UserDefinedDagsterK8sConfig` as a dict (snake_case or camelCase keys).
    pub user_config: &'a Map<String, Value>,
    /// Reported in `app.kubernetes.io/version` (the Python worker reports its own dagster version).
    pub dagster_version: &'a str,
}

/// `sanitize_k8s_label`: at most 63 characters, invalid characters → `-`, trimmed of `-`, `_`, `.`.
pub fn sanitize_label(v: &str) -> String {
    let cut: String = v.chars().take(63).collect();
    let replaced: String = cut
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .collect();
    replaced
        .trim_matches('-')
        .trim_matches('_')
        .trim_matches('.')
        .to_string()
}

fn obj(v: Option<&Value>, ty: &str) -> Map<String, Value> {
    match v.map(|v| to_api(v, ty)) {
        Some(Value::Object(m)) => m,
        _ => Map::new(),
    }
}

fn list(v: Option<&Value>, ty: &str) -> Vec<Value> {
    match v.map(|v| to_api(v, &format!("list[{ty}]"))) {
        Some(Value::Array(a)) => a,
        _ => Vec::new(),
    }
}

fn pop(m: &mut Map<String, Value>, key: &str) -> Option<Value> {
    m.shift_remove(key)
}

fn str_map(v: Option<&Value>) -> Map<String, Value> {
    v.and_then(Value::as_object).cloned().unwrap_or_default()
}

fn merge(parts: &[Map<String, Value>]) -> Map<String, Value> {
    let mut out = Map::new();
    for p in parts {
        for (k, v) in p {
            out.insert(k.clone(), v.clone());
        }
    }
    out
}

fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Object(m) => !m.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::String(s) => !s.is_empty(),
        Value::Bool(b) => *b,
        Value::Number(_) => true,
    }
}

/// Why a Job cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// Dagster's `parse_env_var`: a bare `env_vars` name must be set in the worker's environment.
    #[error("Tried to load environment variable {0}, but it was not set")]
    MissingEnv(String),
}

/// Builds the Job: the container, inside the pod template, inside the Job spec, each level merging
/// the user's config for it (`container_config`, `pod_spec_config`, `job_spec_config`, `job_config`)
/// with what the step's `DagsterK8sJobConfig` says, in Python's order.
pub fn construct_job(input: &JobInputs) -> Result<Value, JobError> {
    let jc = input.job_config;
    let udk = input.user_config;
    let dagster_labels = dagster_labels(input);
    let jc_labels = str_map(jc.get("labels"));
    let env = job_config_env(input, jc)?;
    let container = container(input, jc, udk, env, env_from_sources(jc));
    let template = pod_template(input, jc, udk, container, &dagster_labels, &jc_labels);
    let job_spec = job_spec(udk, template);

    let mut job_meta = obj(udk.get("job_metadata"), "V1ObjectMeta");
    let user_job_labels = pop(&mut job_meta, "labels")
        .and_then(|v| v.as_object().cloned())
        .unwrap_or_default();
    let mut job_meta_fields = Map::new();
    job_meta_fields.insert("name".into(), json!(input.job_name));
    job_meta_fields.insert(
        "labels".into(),
        Value::Object(merge(&[dagster_labels, user_job_labels, jc_labels])),
    );
    let mut head = Map::new();
    head.insert("apiVersion".into(), json!("batch/v1"));
    head.insert("kind".into(), json!("Job"));
    head.insert(
        "metadata".into(),
        Value::Object(merge(&[job_meta, job_meta_fields])),
    );
    head.insert("spec".into(), Value::Object(job_spec));
    let job = merge(&[obj(udk.get("job_config"), "V1Job"), head]);
    // A final pass drops nulls the way the Kubernetes client's serializer does.
    Ok(to_api(&Value::Object(job), "V1Job"))
}

/// The labels Dagster puts on the Job and its pod: `app.kubernetes.io/*` and the step's own.
fn dagster_labels(input: &JobInputs) -> Map<String, Value> {
    let mut dagster_labels = Map::new();
    dagster_labels.insert("app.kubernetes.io/name".into(), json!("dagster"));
    dagster_labels.insert("app.kubernetes.io/instance".into(), json!("dagster"));
    dagster_labels.insert(
        "app.kubernetes.io/version".into(),
        json!(sanitize_label(input.dagster_version)),
    );
    dagster_labels.insert("app.kubernetes.io/part-of".into(), json!("dagster"));
    if let Some(c) = input.component {
        dagster_labels.insert("app.kubernetes.io/component".into(), json!(c));
    }
    for (k, v) in &input.labels {
        dagster_labels.insert(k.clone(), json!(sanitize_label(v)));
    }
    dagster_labels
}

/// The container's `env` from the job config, before the user's: the given env vars,
/// `DAGSTER_HOME`, the Postgres password secret, then `env_vars` (`NAME=value` or a name read from
/// the worker's environment).
fn job_config_env(input: &JobInputs, jc: &Map<String, Value>) -> Result<Vec<Value>, JobError> {
    let jc_str = |k: &str| jc.get(k).and_then(Value::as_str).map(str::to_owned);
    let mut env: Vec<Value> = input
        .env_vars
        .iter()
        .map(|e| to_api(e, "V1EnvVar"))
        .collect();
    if let Some(home) = jc_str("dagster_home") {
        env.push(json!({"name": "DAGSTER_HOME", "value": home}));
    }
    if let Some(secret) = jc_str("postgres_password_secret") {
        env.push(json!({"name": "DAGSTER_PG_PASSWORD", "valueFrom": {"secretKeyRef": {"name": secret, "key": PG_PASSWORD_KEY}}}));
    }
    let mut job_config_env: Vec<Value> = Vec::new();
    for v in jc
        .get("env_vars")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
    {
        job_config_env.push(match v.split_once('=') {
            Some((k, val)) => json!({"name": k, "value": val}),
            None => json!({"name": v, "value": std::env::var(v).map_err(|_| JobError::MissingEnv(v.to_string()))?}),
        });
    }
    let mut all_env = env;
    all_env.extend(job_config_env);
    Ok(all_env)
}

/// The container's `envFrom` from the job config: config maps, then secrets.
fn env_from_sources(jc: &Map<String, Value>) -> Vec<Value> {
    jc.get("env_config_maps")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(|c| json!({"configMapRef": {"name": c}}))
        .chain(
            jc.get("env_secrets")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .map(|s| json!({"secretRef": {"name": s}})),
        )
        .collect()
}

/// The step's container: the user's `container_config` with image, pull policy, env, mounts,
/// resources and security context filled from the job config where the user gave none.
fn container(
    input: &JobInputs,
    jc: &Map<String, Value>,
    udk: &Map<String, Value>,
    env: Vec<Value>,
    env_from_sources: Vec<Value>,
) -> Map<String, Value> {
    let mut container_config = obj(udk.get("container_config"), "V1Container");
    if let Some(args) = &input.args {
        container_config.insert("args".into(), json!(args));
    }
    let user_env = pop(&mut container_config, "env")
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default();
    let user_env_from = pop(&mut container_config, "envFrom")
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default();
    let image = pop(&mut container_config, "image")
        .unwrap_or_else(|| jc.get("job_image").cloned().unwrap_or(Value::Null));
    let pull_policy = pop(&mut container_config, "imagePullPolicy")
        .unwrap_or_else(|| jc.get("image_pull_policy").cloned().unwrap_or(Value::Null));
    let user_mounts = pop(&mut container_config, "volumeMounts")
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default();
    let user_resources = pop(&mut container_config, "resources").unwrap_or_else(|| json!({}));
    let name = pop(&mut container_config, "name").unwrap_or_else(|| json!("dagster"));
    let mut volume_mounts = list(jc.get("volume_mounts"), "V1VolumeMount");
    volume_mounts.extend(user_mounts);
    let resources = if truthy(&user_resources) {
        user_resources
    } else {
        Value::Object(obj(jc.get("resources"), "V1ResourceRequirements"))
    };
    let security_context = pop(&mut container_config, "securityContext").unwrap_or_else(|| {
        jc.get("security_context")
            .map(|s| to_api(s, "V1SecurityContext"))
            .unwrap_or(Value::Null)
    });

    let mut all_env = env;
    all_env.extend(user_env);
    let mut all_env_from = env_from_sources;
    all_env_from.extend(user_env_from);
    let mut container_fields = Map::new();
    container_fields.insert("name".into(), name);
    container_fields.insert("image".into(), image);
    container_fields.insert("imagePullPolicy".into(), pull_policy);
    container_fields.insert("env".into(), Value::Array(all_env));
    container_fields.insert("envFrom".into(), Value::Array(all_env_from));
    container_fields.insert("volumeMounts".into(), Value::Array(volume_mounts));
    container_fields.insert("resources".into(), resources);
    let mut sc = Map::new();
    if truthy(&security_context) {
        sc.insert("securityContext".into(), security_context);
    }
    merge(&[container_config, container_fields, sc])
}

/// The pod template: the user's `pod_spec_config` and `pod_template_spec_metadata` around the
/// container, with volumes, pull secrets, service account and scheduler from the job config.
fn pod_template(
    input: &JobInputs,
    jc: &Map<String, Value>,
    udk: &Map<String, Value>,
    container: Map<String, Value>,
    dagster_labels: &Map<String, Value>,
    jc_labels: &Map<String, Value>,
) -> Value {
    let mut pod_spec_config = obj(udk.get("pod_spec_config"), "V1PodSpec");
    let user_volumes = pop(&mut pod_spec_config, "volumes")
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default();
    let mut volumes = list(jc.get("volumes"), "V1Volume");
    volumes.extend(user_volumes);
    let mut template_meta = obj(udk.get("pod_template_spec_metadata"), "V1ObjectMeta");
    let user_pod_labels = pop(&mut template_meta, "labels")
        .and_then(|v| v.as_object().cloned())
        .unwrap_or_default();
    let service_account = pop(&mut pod_spec_config, "serviceAccountName").unwrap_or_else(|| {
        jc.get("service_account_name")
            .cloned()
            .unwrap_or(Value::Null)
    });
    let scheduler = pop(&mut pod_spec_config, "schedulerName")
        .unwrap_or_else(|| jc.get("scheduler_name").cloned().unwrap_or(Value::Null));
    let automount =
        pop(&mut pod_spec_config, "automountServiceAccountToken").unwrap_or(json!(true));
    let user_containers = pop(&mut pod_spec_config, "containers")
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default();
    let user_pull_secrets = pop(&mut pod_spec_config, "imagePullSecrets")
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default();
    let mut pull_secrets = list(jc.get("image_pull_secrets"), "V1LocalObjectReference");
    pull_secrets.extend(user_pull_secrets);
    let mut containers = vec![Value::Object(container)];
    containers.extend(user_containers);

    let pod_name = input
        .pod_name
        .map(str::to_owned)
        .unwrap_or_else(|| format!("{}-pod", input.job_name));
    let mut meta_fields = Map::new();
    meta_fields.insert("name".into(), json!(pod_name));
    meta_fields.insert(
        "labels".into(),
        Value::Object(merge(&[
            dagster_labels.clone(),
            jc_labels.clone(),
            user_pod_labels,
        ])),
    );
    let mut spec_head = Map::new();
    spec_head.insert("restartPolicy".into(), json!("Never"));
    let mut spec_tail = Map::new();
    spec_tail.insert("imagePullSecrets".into(), Value::Array(pull_secrets));
    spec_tail.insert("serviceAccountName".into(), service_account);
    spec_tail.insert("automountServiceAccountToken".into(), automount);
    spec_tail.insert("containers".into(), Value::Array(containers));
    spec_tail.insert("volumes".into(), Value::Array(volumes));
    let mut sched = Map::new();
    if truthy(&scheduler) {
        sched.insert("schedulerName".into(), scheduler);
    }
    json!({
        "metadata": merge(&[template_meta, meta_fields]),
        "spec": merge(&[spec_head, pod_spec_config, spec_tail, sched]),
    })
}

/// The Job spec: Dagster's TTL and `backoffLimit: 0` under the user's `job_spec_config`.
fn job_spec(udk: &Map<String, Value>, template: Value) -> Map<String, Value> {
    let mut defaults = Map::new();
    defaults.insert("ttlSecondsAfterFinished".into(), json!(DEFAULT_TTL_SECONDS));
    defaults.insert("backoffLimit".into(), json!(0));
    let mut template_part = Map::new();
    template_part.insert("template".into(), template);
    merge(&[
        defaults,
        obj(udk.get("job_spec_config"), "V1JobSpec"),
        template_part,
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_env_var_is_an_error() {
        let jc = json!({"env_vars": ["CELERIAC_SURELY_UNSET_VAR"]})
            .as_object()
            .cloned()
            .unwrap_or_default();
        let udk = Map::new();
        let input = JobInputs {
            job_config: &jc,
            args: None,
            job_name: "j",
            pod_name: None,
            component: None,
            labels: vec![],
            env_vars: vec![],
            user_config: &udk,
            dagster_version: "1.13.27",
        };
        assert!(matches!(
            construct_job(&input),
            Err(JobError::MissingEnv(_))
        ));
    }

    #[test]
    fn labels_are_sanitized_like_dagster() {
        assert_eq!(sanitize_label("my job/with spaces!"), "my-job-with-spaces");
        assert_eq!(sanitize_label(&"x".repeat(80)).len(), 63);
        assert_eq!(sanitize_label("-_.ok._-"), "ok");
    }
}
