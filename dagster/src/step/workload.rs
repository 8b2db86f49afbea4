//! Resolves a step into what its launcher runs (spec §3.1 steps 6–10 and §3.2): the step Job exactly as
//! `construct_dagster_k8s_job` builds it for the Kubernetes launcher, or the command and the
//! environment that Job's container would get for a local process. The launchers never read Dagster's
//! `job_config` or user-defined Kubernetes config themselves.

use std::path::Path;

use k8s_openapi::api::batch::v1::Job;
use serde_json::{json, Map, Value};
use tracing::{debug, info};

use crate::k8s_config::literal_container_env;
use crate::kubernetes::job::{construct_job, JobInputs, DAGSTER_VERSION};
use crate::launcher::{JobBody, StepJob, StepProcess, Workload, WorkloadKind};
use crate::step::args::StepTaskArgs;

/// A step as the step task knows it before it is resolved for a launcher.
#[derive(Debug, Clone)]
pub struct Step<'a> {
    /// The Job (and pod, or process) name.
    pub job_name: &'a str,
    /// `[*entry_point, "api", "execute_step", "--compressed-input-json", …]`: the container's `args`.
    pub command: Vec<String>,
    /// The Job's explicit `env_vars` (`DAGSTER_RUN_JOB_NAME`, `DAGSTER_RUN_STEP_KEY`), in order.
    pub env: Vec<(String, String)>,
    /// `dagster/job`, `dagster/op`, `dagster/run-id`[, `dagster/code-location`] (unsanitised values).
    pub labels: Vec<(String, String)>,
    /// `DagsterK8sJobConfig._asdict()` as sent by the publisher (unknown keys kept).
    pub job_config: &'a Map<String, Value>,
    /// The op tag's user-defined k8s config with the step's `per_step_k8s_config` merged onto it
    /// ([`crate::k8s_config::merge_user_config`], keys as sent: snake_case or camelCase).
    pub user_config: Value,
}

impl Step<'_> {
    /// The step in the form `kind` of launcher runs; the Job's client settings come from the task's
    /// arguments.
    pub fn resolve(&self, kind: WorkloadKind, args: &StepTaskArgs) -> Workload {
        match kind {
            WorkloadKind::Job => Workload::Job(Box::new(StepJob::new(
                self.job(),
                args.load_incluster_config,
                args.kubeconfig_file.clone(),
            ))),
            WorkloadKind::Process => Workload::Process(self.process()),
        }
    }

    /// The step Job (`construct_dagster_k8s_job` with the step worker component, the pod named after
    /// the Job) and its step container's name.
    pub fn job(&self) -> Result<JobBody, String> {
        let empty = Map::new();
        let body = construct_job(&JobInputs {
            job_config: self.job_config,
            args: Some(self.command.clone()),
            job_name: self.job_name,
            pod_name: Some(self.job_name),
            component: Some("step_worker"),
            labels: self.labels.clone(),
            env_vars: self
                .env
                .iter()
                .map(|(k, v)| json!({"name": k, "value": v}))
                .collect(),
            user_config: self.user_config.as_object().unwrap_or(&empty),
            dagster_version: DAGSTER_VERSION,
        })
        .map_err(|e| e.to_string())?;
        let container = body
            .pointer("/spec/template/spec/containers/0/name")
            .and_then(Value::as_str)
            .unwrap_or("dagster")
            .to_string();
        let job: Job = serde_json::from_value(body)
            .map_err(|e| format!("the step Job does not parse as a Kubernetes Job: {e}"))?;
        Ok(JobBody {
            job: Box::new(job),
            container,
        })
    }

    /// The step as a local process: its command and [`Self::local_env`].
    pub fn process(&self) -> StepProcess {
        StepProcess {
            command: self.command.clone(),
            env: self.local_env(),
        }
    }

    /// The environment added to the worker's for a local step process, in the order the Job's
    /// container lists it (later entries win): [`Self::env`] (`DAGSTER_RUN_JOB_NAME`,
    /// `DAGSTER_RUN_STEP_KEY`), `DAGSTER_HOME` (only if that directory exists here; otherwise the
    /// worker's own stays), `job_config.env_vars` (`K=V`, or `K` copied from the worker's environment)
    /// and the literal `env` values of the merged container config. Secret-backed entries
    /// (`postgres_password_secret`, `value_from`) have no local value: the worker's environment (e.g.
    /// `DAGSTER_PG_PASSWORD`) is inherited instead.
    pub fn local_env(&self) -> Vec<(String, String)> {
        let job_name = self.job_name;
        let mut env = self.env.clone();
        if let Some(home) = self.job_config.get("dagster_home").and_then(Value::as_str) {
            if Path::new(home).is_dir() {
                info!(job = %job_name, dagster_home = home, "step uses the job config's DAGSTER_HOME");
                env.push(("DAGSTER_HOME".into(), home.to_string()));
            } else {
                info!(
                    job = %job_name,
                    dagster_home = home,
                    worker_dagster_home = std::env::var("DAGSTER_HOME").unwrap_or_default(),
                    "the job config's DAGSTER_HOME does not exist here; the step keeps the worker's"
                );
            }
        }
        if let Some(Value::Array(vars)) = self.job_config.get("env_vars") {
            for v in vars.iter().filter_map(Value::as_str) {
                match v.split_once('=') {
                    Some((k, val)) => env.push((k.to_string(), val.to_string())),
                    None => match std::env::var(v) {
                        Ok(val) => env.push((v.to_string(), val)),
                        Err(_) => {
                            debug!(job = %job_name, var = v, "env_vars entry is not set in the worker; skipped")
                        }
                    },
                }
            }
        }
        env.extend(literal_container_env(&self.user_config));
        env
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step<'a>(job_config: &'a Map<String, Value>, user_config: Value) -> Step<'a> {
        Step {
            job_name: "dagster-step-test",
            command: vec!["dagster".into(), "api".into()],
            env: vec![("STEP_ENV".into(), "42".into())],
            labels: vec![("dagster/op".into(), "my op".into())],
            job_config,
            user_config,
        }
    }

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn local_env_follows_the_job_container_order() {
        std::env::set_var("CELERIAC_T_FROM_WORKER", "w");
        let jc = map(
            json!({"dagster_home": "/nonexistent/celeriac", "env_vars": ["A=1", "CELERIAC_T_FROM_WORKER", "CELERIAC_T_UNSET_X"]}),
        );
        let user = json!({"container_config": {"env": [{"name": "B", "value": "2"},
            {"name": "S", "value_from": {"secret_key_ref": {"name": "x", "key": "y"}}}]}});
        let env = step(&jc, user).local_env();
        let names: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["STEP_ENV", "A", "CELERIAC_T_FROM_WORKER", "B"]);
        let jc = map(json!({"dagster_home": std::env::temp_dir()}));
        assert!(step(&jc, Value::Null)
            .local_env()
            .iter()
            .any(|(k, _)| k == "DAGSTER_HOME"));
    }

    #[test]
    fn job_names_its_step_container_and_keeps_build_errors() {
        let jc = map(json!({"job_image": "img:1"}));
        let body = step(&jc, json!({"container_config": {"name": "main"}}))
            .job()
            .expect("a Job");
        assert_eq!(body.container, "main");
        assert_eq!(body.job.metadata.name.as_deref(), Some("dagster-step-test"));
        let labels = body.job.metadata.labels.unwrap_or_default();
        assert_eq!(labels.get("dagster/op").map(String::as_str), Some("my-op"));
        assert_eq!(
            step(&jc, json!({})).job().expect("a Job").container,
            "dagster"
        );
        let jc = map(json!({"env_vars": ["CELERIAC_SURELY_UNSET_VAR"]}));
        let err = step(&jc, json!({})).job().unwrap_err();
        assert!(err.contains("CELERIAC_SURELY_UNSET_VAR"), "{err}");
    }

    /// The launcher takes the Job for its create request; the step does not keep it.
    #[test]
    fn the_job_is_handed_over_once() {
        let jc = map(json!({"job_image": "img:1"}));
        let job = crate::launcher::StepJob::new(step(&jc, json!({})).job(), false, None);
        assert_eq!(job.take_body().expect("the Job").container, "dagster");
        let again = job.take_body().map(|_| ()).unwrap_err();
        assert!(
            again.contains("handed to the API server already"),
            "{again}"
        );
    }

    #[test]
    fn an_unset_bare_env_var_only_fails_the_job_form() {
        let jc = map(json!({"env_vars": ["CELERIAC_SURELY_UNSET_VAR"]}));
        let s = step(&jc, json!({}));
        // A local process skips it (nothing to copy); the Job cannot be built without it.
        assert_eq!(
            s.process().env,
            vec![("STEP_ENV".to_string(), "42".to_string())]
        );
        assert!(s.job().is_err());
    }
}
