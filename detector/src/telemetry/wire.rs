//! Instrumentation telemetry v2 as the Datadog tracers send it to the
//! agent's `/telemetry/proxy/api/v2/apmtelemetry`: one envelope per request,
//! its payload named by `request_type`.

use serde::{Deserialize, Serialize};

/// One request's body.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Always `v2`.
    pub api_version: String,
    /// When it was sent, in seconds since the epoch.
    pub tracer_time: u64,
    /// The runtime it is about: one per watched process.
    pub runtime_id: String,
    /// Increases with each request of a runtime.
    pub seq_id: u64,
    /// The application the process runs.
    pub application: Application,
    /// The node.
    pub host: Host,
    /// What it says.
    #[serde(flatten)]
    pub payload: Payload,
}

/// A request's type and payload (a `message-batch` item has the same
/// shape).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "request_type", content = "payload", rename_all = "kebab-case")]
pub enum Payload {
    /// The runtime started (sent once, first).
    AppStarted(AppStarted),
    /// Dependencies found, or whose metadata changed (each with all of it).
    AppDependenciesLoaded(Dependencies),
    /// The runtime is alive.
    AppHeartbeat(Empty),
    /// The runtime ended.
    AppClosing(Empty),
    /// Several of the above, in order.
    MessageBatch(Vec<Payload>),
}

impl Payload {
    /// Its `request_type` (the `DD-Telemetry-Request-Type` header).
    pub fn request_type(&self) -> &'static str {
        match self {
            Payload::AppStarted(_) => "app-started",
            Payload::AppDependenciesLoaded(_) => "app-dependencies-loaded",
            Payload::AppHeartbeat(_) => "app-heartbeat",
            Payload::AppClosing(_) => "app-closing",
            Payload::MessageBatch(_) => "message-batch",
        }
    }
}

/// A payload with nothing in it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Empty {}

/// `app-started`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AppStarted {
    /// Configuration in effect: none, the process's own tracer (if any)
    /// reports its own.
    pub configuration: Vec<serde_json::Value>,
}

/// `app-dependencies-loaded`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dependencies {
    /// The dependencies.
    pub dependencies: Vec<Dependency>,
}

/// A dependency of the catalog, as installed in the process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dependency {
    /// Its distribution name, normalized.
    pub name: String,
    /// Its version.
    pub version: String,
    /// What is known about it: reachability, one entry per advisory.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metadata: Vec<Metadata>,
}

/// One entry of a dependency's metadata.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    /// `reachability`.
    #[serde(rename = "type")]
    pub kind: String,
    /// A [`Reachability`] as a JSON string.
    pub value: String,
}

/// Whether an advisory's code was reached in the runtime.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reachability {
    /// The advisory's id.
    pub id: String,
    /// Where it was first reached; empty while it is not.
    pub reached: Vec<Reached>,
}

/// Where a vulnerable function was reached from: its first caller of user
/// code.
pub use crate::pyproc::callers::Caller as Reached;

impl Metadata {
    /// The reachability entry of advisory `id`.
    pub fn reachability(id: &str, reached: Option<&Reached>) -> Self {
        let value = Reachability { id: id.to_owned(), reached: reached.into_iter().cloned().collect() };
        Metadata { kind: "reachability".into(), value: serde_json::to_string(&value).unwrap_or_default() }
    }

    /// The reachability it holds, if it is one.
    pub fn as_reachability(&self) -> Option<Reachability> {
        (self.kind == "reachability").then(|| serde_json::from_str(&self.value).ok()).flatten()
    }
}

/// The application a runtime runs, as the tracers describe it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Application {
    /// `DD_SERVICE` of the process.
    pub service_name: String,
    /// `DD_ENV` of the process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<String>,
    /// `DD_VERSION` of the process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_version: Option<String>,
    /// `python`.
    pub language_name: String,
    /// The interpreter's version.
    pub language_version: String,
    /// This agent's marker: `detector/<version>`, never a ddtrace version.
    pub tracer_version: String,
    /// `CPython`.
    pub runtime_name: String,
    /// The interpreter's version.
    pub runtime_version: String,
}

/// The node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Host {
    /// `DD_HOSTNAME`, else the node's name.
    pub hostname: String,
    /// `Linux`.
    pub os: String,
    /// The kernel's name.
    pub kernel_name: String,
    /// The kernel's release.
    pub kernel_release: String,
    /// The kernel's version.
    pub kernel_version: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn payloads_are_named_by_request_type_and_batches_nest() {
        let deps = Payload::AppDependenciesLoaded(Dependencies {
            dependencies: vec![Dependency {
                name: "requests".into(),
                version: "2.31.0".into(),
                metadata: vec![Metadata::reachability("GHSA-1", None)],
            }],
        });
        let batch = Payload::MessageBatch(vec![deps.clone(), Payload::AppHeartbeat(Empty {})]);
        let v = serde_json::to_value(&batch).unwrap();
        assert_eq!(v["request_type"], "message-batch");
        assert_eq!(v["payload"][1], json!({"request_type": "app-heartbeat", "payload": {}}));
        let meta = &v["payload"][0]["payload"]["dependencies"][0]["metadata"][0];
        assert_eq!(meta["type"], "reachability");
        // A JSON string, not an object, as the backend reads it.
        assert_eq!(meta["value"], "{\"id\":\"GHSA-1\",\"reached\":[]}");
        assert_eq!(serde_json::from_value::<Payload>(v).unwrap(), batch);
    }
}
