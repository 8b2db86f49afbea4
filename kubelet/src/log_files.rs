//! Which log file belongs to which container. The pod tasks fill it as they start containers; the
//! `/containerLogs` endpoint ([`crate::logs`]) reads it. It stands apart from both so the node's shared
//! state can hold it without importing the HTTP endpoint.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

use tokio::sync::watch;

/// One container's log file and whether the container has exited.
#[derive(Clone)]
pub struct LogFile {
    pub path: PathBuf,
    pub exited: watch::Receiver<bool>,
}

/// Which log file belongs to which `(namespace, pod, container)`.
#[derive(Default)]
pub struct LogIndex(Mutex<HashMap<(String, String, String), LogFile>>);

impl LogIndex {
    pub fn insert(&self, ns: &str, pod: &str, container: &str, file: LogFile) {
        if let Ok(mut m) = self.0.lock() {
            m.insert((ns.into(), pod.into(), container.into()), file);
        }
    }

    pub fn remove_pod(&self, ns: &str, pod: &str) {
        if let Ok(mut m) = self.0.lock() {
            m.retain(|(n, p, _), _| !(n == ns && p == pod));
        }
    }

    pub fn get(&self, ns: &str, pod: &str, container: &str) -> Option<LogFile> {
        self.0
            .lock()
            .ok()?
            .get(&(ns.to_string(), pod.to_string(), container.to_string()))
            .cloned()
    }
}
