//! The permissions the launcher needs, checked up front with SelfSubjectAccessReview (which every
//! authenticated identity may create), so a missing RBAC rule is reported once, by name, instead of
//! as a 403 deep inside a step. This list is the documented least-privilege Role.

use k8s_openapi::api::authorization::v1::SelfSubjectAccessReview;
use kube::api::PostParams;
use kube::Api;
use serde_json::json;

/// `(apiGroup, resource, verb)` the launcher uses, in its namespace of Jobs.
pub const REQUIRED: &[(&str, &str, &str)] = &[
    ("batch", "jobs", "create"),
    ("batch", "jobs", "get"),
    ("batch", "jobs", "list"),
    ("batch", "jobs", "watch"),
    ("batch", "jobs", "delete"),
    ("", "pods", "get"),
    ("", "pods", "list"),
    ("", "pods", "watch"),
    ("", "pods/log", "get"),
];

/// Returns the missing permissions, as `verb resource[.group]` strings.
pub async fn missing(client: &kube::Client, namespace: &str) -> Result<Vec<String>, kube::Error> {
    let api: Api<SelfSubjectAccessReview> = Api::all(client.clone());
    let mut missing = Vec::new();
    for (group, resource, verb) in REQUIRED {
        let (resource, subresource) = resource.split_once('/').unwrap_or((resource, ""));
        let review: SelfSubjectAccessReview = serde_json::from_value(json!({
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SelfSubjectAccessReview",
            "spec": {"resourceAttributes": {
                "namespace": namespace, "group": group, "resource": resource,
                "subresource": subresource, "verb": verb,
            }}
        }))
        .map_err(kube::Error::SerdeError)?;
        let answer = api.create(&PostParams::default(), &review).await?;
        if !answer.status.is_some_and(|s| s.allowed) {
            let full = if subresource.is_empty() {
                resource.to_string()
            } else {
                format!("{resource}/{subresource}")
            };
            let named = if group.is_empty() {
                full
            } else {
                format!("{full}.{group}")
            };
            missing.push(format!("{verb} {named}"));
        }
    }
    Ok(missing)
}

/// The least-privilege Role the worker documents (and the chart renders), built from [`REQUIRED`].
pub fn role(name: &str, namespace: &str) -> serde_json::Value {
    let mut rules: Vec<(String, String, Vec<String>)> = Vec::new();
    for (group, resource, verb) in REQUIRED {
        match rules
            .iter_mut()
            .find(|(g, r, _)| g == group && r == resource)
        {
            Some((_, _, verbs)) => verbs.push(verb.to_string()),
            None => rules.push((
                group.to_string(),
                resource.to_string(),
                vec![verb.to_string()],
            )),
        }
    }
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": name, "namespace": namespace},
        "rules": rules.into_iter().map(|(g, r, v)| json!({"apiGroups": [g], "resources": [r], "verbs": v})).collect::<Vec<_>>(),
    })
}
