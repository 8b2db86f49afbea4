//! Dagster context of a step task (`execute_step_k8s_job`): run id, job, step key and the Kubernetes Job
//! name, read from the task's kwargs repr (`saferepr` of the kwargs, which keeps the scalar fields of
//! `ExecuteStepArgs`: `pipeline_origin.pipeline_name`, `pipeline_run_id`, `step_keys_to_execute`).

use md5::{Digest, Md5};
use serde::Serialize;
use serde_json::Value;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DagsterContext {
    pub run_id: Option<String>,
    pub job: Option<String>,
    pub step_key: Option<String>,
    /// `dagster-step-<md5(run_id + step_key)>` (first attempt; retries append `-<n>`).
    pub k8s_job: Option<String>,
    /// `<dagster-url>/runs/<run_id>` when `--dagster-url` is set.
    pub url: Option<String>,
}

/// The string value of `'key': '...'` (or `"key": "..."`) in a Python repr.
fn quoted_after(text: &str, key: &str) -> Option<String> {
    for q in ['\'', '"'] {
        let needle = format!("{q}{key}{q}: ");
        if let Some(at) = text.find(&needle) {
            let rest = &text[at + needle.len()..];
            let open = rest.chars().next()?;
            if open != '\'' && open != '"' {
                continue;
            }
            let body = &rest[1..];
            let end = body.find(open)?;
            return Some(body[..end].to_string());
        }
    }
    None
}

/// The first element of `'key': ['a', ...]`.
fn first_list_item(text: &str, key: &str) -> Option<String> {
    for q in ['\'', '"'] {
        let needle = format!("{q}{key}{q}: [");
        if let Some(at) = text.find(&needle) {
            let rest = &text[at + needle.len()..];
            let open = rest.chars().next()?;
            if open != '\'' && open != '"' {
                return None;
            }
            let body = &rest[1..];
            let end = body.find(open)?;
            return Some(body[..end].to_string());
        }
    }
    None
}

/// Dagster's step Job name for `run_id` and `step_key`.
pub fn k8s_job_name(run_id: &str, step_key: &str) -> String {
    let digest = Md5::digest(format!("{run_id}{step_key}").as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("dagster-step-{hex}")
}

/// The kwargs as text, if they look like Dagster step arguments.
fn step_args_text(kwargs: &Value) -> Option<std::borrow::Cow<'_, str>> {
    let text = match kwargs {
        Value::String(s) => std::borrow::Cow::Borrowed(s.as_str()),
        other => std::borrow::Cow::Owned(other.to_string()),
    };
    (text.contains("execute_step_args_packed") || text.contains("ExecuteStepArgs")).then_some(text)
}

fn run_id_in(text: &str) -> Option<String> {
    quoted_after(text, "pipeline_run_id").or_else(|| quoted_after(text, "run_id"))
}

/// The Dagster run id of a step task's kwargs (the key of the state's run index).
pub fn run_id(kwargs: &Value) -> Option<String> {
    run_id_in(&step_args_text(kwargs)?)
}

/// The context of a task, if its kwargs look like Dagster step arguments.
pub fn context(kwargs: Option<&Value>, dagster_url: Option<&str>) -> Option<DagsterContext> {
    let text = step_args_text(kwargs?)?;
    let text = text.as_ref();
    let run_id = run_id_in(text);
    let job = quoted_after(text, "pipeline_name").or_else(|| quoted_after(text, "job_name"));
    let step_key = first_list_item(text, "step_keys_to_execute");
    let k8s_job = match (&run_id, &step_key) {
        (Some(r), Some(s)) => Some(k8s_job_name(r, s)),
        _ => None,
    };
    let url = match (dagster_url, &run_id) {
        (Some(base), Some(r)) => Some(format!("{}/runs/{r}", base.trim_end_matches('/'))),
        _ => None,
    };
    Some(DagsterContext {
        run_id,
        job,
        step_key,
        k8s_job,
        url,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_captured_kwargs_repr() {
        let repr = "{'execute_step_args_packed': {'__class__': 'ExecuteStepArgs', 'pipeline_origin': {'__class__': \
            'PipelinePythonOrigin', 'pipeline_name': 'ck8s_job', 'repository_origin': {...}}, 'pipeline_run_id': \
            'ba924453-6cab-4ef7-9f6b-ee3c7a9eef4a', 'step_keys_to_execute': ['say_hello'], 'instance_ref': {...}}, 'job_config_dict': {'jo...', ...}}";
        let c = context(
            Some(&Value::String(repr.into())),
            Some("http://dagster:3000/"),
        )
        .unwrap();
        assert_eq!(
            c.run_id.as_deref(),
            Some("ba924453-6cab-4ef7-9f6b-ee3c7a9eef4a")
        );
        assert_eq!(c.job.as_deref(), Some("ck8s_job"));
        assert_eq!(c.step_key.as_deref(), Some("say_hello"));
        assert_eq!(
            c.url.as_deref(),
            Some("http://dagster:3000/runs/ba924453-6cab-4ef7-9f6b-ee3c7a9eef4a")
        );
        assert!(c.k8s_job.unwrap().starts_with("dagster-step-"));
        assert_eq!(
            k8s_job_name("", ""),
            "dagster-step-d41d8cd98f00b204e9800998ecf8427e"
        );
        assert!(context(Some(&Value::String("{'x': 1}".into())), None).is_none());
        assert_eq!(
            run_id(&Value::String(repr.into())).as_deref(),
            Some("ba924453-6cab-4ef7-9f6b-ee3c7a9eef4a")
        );
        assert_eq!(run_id(&Value::String("{'run_id': 'x'}".into())), None);
    }
}
