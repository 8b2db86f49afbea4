//! The order in which executable steps are handed out, and the op tags it reads. Dagster parses the
//! tags with Python's `int()`, so [`python_int`] accepts exactly what `int()` accepts: a tag value
//! Python rejects fails the run here too, instead of silently sorting as 0.

use crate::plan::error::PlanError;
use crate::plan::execution_plan::Step;

/// Op tag that gives a step's priority for Dagster's default ordering (`dagster/priority`).
pub const PRIORITY_TAG: &str = "dagster/priority";
/// Op tag of a step's priority on the Celery queue (`dagster-celery/priority`).
pub const CELERY_STEP_PRIORITY_TAG: &str = "dagster-celery/priority";
/// Legacy op tag naming a step's concurrency pool.
pub const GLOBAL_CONCURRENCY_TAG: &str = "dagster/concurrency_key";

/// Python's `int(text)` for tag values: surrounding whitespace, a sign, digits with single
/// underscores between them.
pub fn python_int(text: &str) -> Option<i64> {
    let t = text.trim();
    let (neg, digits) = match t.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    if digits.is_empty()
        || digits.starts_with('_')
        || digits.ends_with('_')
        || digits.contains("__")
    {
        return None;
    }
    let clean: String = digits.chars().filter(|c| *c != '_').collect();
    if !clean.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let n: i64 = clean.parse().ok()?;
    Some(if neg { -n } else { n })
}

/// The order in which executable steps are handed out (a stable sort, lowest key first).
#[derive(Debug, Clone, PartialEq)]
pub enum SortKey {
    /// `_default_sort_key`: `-int(tags["dagster/priority"])`, 0 when absent.
    Default,
    /// `core_celery_execution_loop`'s `priority_for_step`: `-(step priority) - run priority`, the
    /// step priority being the `dagster-celery/priority` tag (`task_default_priority` when absent).
    Celery {
        run_priority: i64,
        task_default_priority: i64,
    },
}

impl SortKey {
    /// The sort key of a step (lower first).
    pub fn key(&self, step: &Step) -> Result<i64, PlanError> {
        let tag = |name: &str, default: i64| -> Result<i64, PlanError> {
            match step.tags.get(name) {
                None => Ok(default),
                Some(v) => python_int(v).ok_or_else(|| PlanError::Priority {
                    step_key: step.key.clone(),
                    tag: name.to_string(),
                    value: v.clone(),
                }),
            }
        };
        Ok(match self {
            SortKey::Default => -tag(PRIORITY_TAG, 0)?,
            SortKey::Celery {
                run_priority,
                task_default_priority,
            } => -tag(CELERY_STEP_PRIORITY_TAG, *task_default_priority)? - run_priority,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_int_accepts_what_int_accepts() {
        assert_eq!(python_int(" 4 "), Some(4));
        assert_eq!(python_int("+7"), Some(7));
        assert_eq!(python_int("-3"), Some(-3));
        assert_eq!(python_int("1_0"), Some(10));
        assert_eq!(python_int("1__0"), None);
        assert_eq!(python_int("_1"), None);
        assert_eq!(python_int("4.0"), None);
        assert_eq!(python_int(""), None);
        assert_eq!(python_int("high"), None);
    }
}
