//! `celeriac-load-step`: the step program of the load test, installed as `dagster` on the workers' PATH
//! (or run by the process kubelet for the load image). Called as `dagster api execute_step
//! --compressed-input-json <b64(zlib(json))>` exactly like the real one, it reads the step it was given,
//! sleeps `LOAD_STEP_SECONDS` (default 0) and prints the serialized Dagster events a real one-output step
//! prints (STEP_START, STEP_OUTPUT `result`, STEP_SUCCESS), so workers and coordinators see real results
//! without the cost of a Python interpreter per step. With `LOAD_STEP_RELEASE_FILE` set it stops
//! sleeping as soon as that file exists. With `LOAD_STEP_DONE_FILE` set it appends
//! `<run_id> <step_key> <epoch seconds>` there as it exits.

use std::io::Read as _;

use base64::Engine as _;
use serde_json::{json, Value};

fn input() -> Result<Value, String> {
    let args: Vec<String> = std::env::args().collect();
    let i = args
        .iter()
        .position(|a| a == "--compressed-input-json")
        .ok_or("usage: dagster api execute_step --compressed-input-json <b64>")?;
    let b64 = args
        .get(i + 1)
        .ok_or("missing --compressed-input-json value")?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| format!("not base64: {e}"))?;
    let mut text = String::new();
    flate2::read::ZlibDecoder::new(&bytes[..])
        .read_to_string(&mut text)
        .map_err(|e| format!("not zlib: {e}"))?;
    serde_json::from_str(&text).map_err(|e| format!("not JSON: {e}"))
}

fn event(kind: &str, job: &str, run_id: &str, step: &str, data: Value, message: &str) -> String {
    let node = step.split('[').next().unwrap_or(step);
    let v = json!({
        "__class__": "DagsterEvent", "event_specific_data": data, "event_type_value": kind,
        "logging_tags": {"job_name": job, "op_name": node, "resource_fn_name": "None",
                         "resource_name": "None", "run_id": run_id, "step_key": step},
        "message": message, "pid": std::process::id(), "pipeline_name": job,
        "solid_handle": {"__class__": "SolidHandle", "name": node, "parent": null},
        "step_handle": {"__class__": "StepHandle", "key": step,
                        "solid_handle": {"__class__": "SolidHandle", "name": node, "parent": null}},
        "step_key": step, "step_kind_value": "COMPUTE",
    });
    celeriac_dagster::serdes::to_string(&v)
}

/// Sleeps `seconds`, or less when `release` (a path) appears first: the load test holds a whole batch
/// of steps in flight, measures, then releases them at once.
fn hold(seconds: f64, release: Option<&std::ffi::OsStr>) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs_f64(seconds.max(0.0));
    let Some(release) = release.map(std::path::Path::new) else {
        std::thread::sleep(deadline.saturating_duration_since(std::time::Instant::now()));
        return;
    };
    // Polled twice a second: with a thousand steps held, cheaper than anything cleverer.
    while !release.exists() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return;
        }
        std::thread::sleep(left.min(std::time::Duration::from_millis(500)));
    }
}

fn main() -> std::process::ExitCode {
    let args = match input() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("celeriac-load-step: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let run_id = args["pipeline_run_id"].as_str().unwrap_or_default();
    let step = args["step_keys_to_execute"][0].as_str().unwrap_or_default();
    let job = args["pipeline_origin"]["pipeline_name"]
        .as_str()
        .unwrap_or_default();
    let seconds: f64 = std::env::var("LOAD_STEP_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.0);
    let started = std::time::Instant::now();
    println!(
        "{}",
        event(
            "STEP_START",
            job,
            run_id,
            step,
            Value::Null,
            &format!("Started execution of step \"{step}\".")
        )
    );
    hold(
        seconds,
        std::env::var_os("LOAD_STEP_RELEASE_FILE").as_deref(),
    );
    let handle = json!({"__class__": "StepOutputHandle", "mapping_key": null, "output_name": "result", "step_key": step});
    let output = json!({"__class__": "StepOutputData", "metadata_entries": [], "step_output_handle": handle,
                        "type_check_data": {"__class__": "TypeCheckData", "description": null, "label": "result",
                                            "metadata_entries": [], "success": true}, "version": null});
    println!(
        "{}",
        event(
            "STEP_OUTPUT",
            job,
            run_id,
            step,
            output,
            "Yielded output \"result\" of type \"Any\". (Type check passed)."
        )
    );
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    println!(
        "{}",
        event(
            "STEP_SUCCESS",
            job,
            run_id,
            step,
            json!({"__class__": "StepSuccessData", "duration_ms": ms}),
            &format!("Finished execution of step \"{step}\" in {ms:.0}ms.")
        )
    );
    // LOAD_STEP_DONE_FILE: where the load test learns when the step ended (one line per step, appended
    // atomically: `<run_id> <step_key> <seconds since the epoch>`), the start of "step done → result".
    if let Ok(path) = std::env::var("LOAD_STEP_DONE_FILE") {
        use std::io::Write as _;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or_default();
        let line = format!("{run_id} {step} {now:.6}\n");
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
        {
            let _ = f.write_all(line.as_bytes());
        }
    }
    std::process::ExitCode::SUCCESS
}
