//! The JSON of the Datadog Agent's `/v0.7/config` endpoint (proto field
//! names), and of the TUF `targets.json` its responses carry. Bytes fields
//! are base64 strings.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `ClientGetConfigsRequest`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Request {
    /// Who asks, and everything it has applied.
    pub client: Client,
    /// Files the client holds, so the agent can skip sending them again.
    pub cached_target_files: Vec<TargetFileMeta>,
}

/// `Client`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Client {
    /// The client's state.
    pub state: ClientState,
    /// A UUID for this client, stable for its lifetime.
    pub id: String,
    /// Products subscribed to.
    pub products: Vec<String>,
    /// Presents as a tracer (the agent requires `client_tracer` then).
    pub is_tracer: bool,
    /// Tracer identity.
    pub client_tracer: ClientTracer,
    /// Capability bit field, big-endian, base64.
    pub capabilities: String,
}

/// `ClientState`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClientState {
    /// TUF root version (1: the embedded root).
    pub root_version: u64,
    /// `signed.version` of the last targets applied.
    pub targets_version: u64,
    /// Every config held, with how applying it went.
    pub config_states: Vec<ConfigState>,
    /// The last response was rejected.
    pub has_error: bool,
    /// Why.
    pub error: String,
    /// `signed.custom.opaque_backend_state`, echoed.
    pub backend_client_state: String,
}

/// `ConfigState`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ConfigState {
    /// Config id (the path's `<config_id>`).
    pub id: String,
    /// `custom.v` of the config's target file.
    pub version: u64,
    /// Product.
    pub product: String,
    /// 1 unacknowledged, 2 acknowledged, 3 error.
    pub apply_state: u64,
    /// The error, for state 3.
    pub apply_error: String,
}

/// `ClientTracer`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClientTracer {
    /// A UUID, distinct from the client id.
    pub runtime_id: String,
    /// Language (must not be empty).
    pub language: String,
    /// Version of this client.
    pub tracer_version: String,
    /// `DD_SERVICE`.
    pub service: String,
    /// `DD_ENV`.
    pub env: String,
    /// `DD_VERSION`.
    pub app_version: String,
    /// Tags.
    pub tags: Vec<String>,
}

/// A cached target file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TargetFileMeta {
    /// Path.
    pub path: String,
    /// Length in bytes.
    pub length: u64,
    /// Hashes.
    pub hashes: Vec<TargetFileHash>,
}

/// A hash of a target file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TargetFileHash {
    /// `sha256`.
    pub algorithm: String,
    /// Hex digest.
    pub hash: String,
}

/// `ClientGetConfigsResponse`. Every field is optional: `{}` means
/// "nothing new".
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Response {
    /// New TUF roots (base64), oldest first.
    #[serde(default)]
    pub roots: Vec<String>,
    /// TUF `targets.json` (base64).
    #[serde(default)]
    pub targets: String,
    /// Files the client does not have yet.
    #[serde(default)]
    pub target_files: Vec<TargetFile>,
    /// Paths of every config the client must now hold.
    #[serde(default)]
    pub client_configs: Vec<String>,
    /// 0 OK, 1 expired: drop every config.
    #[serde(default)]
    pub config_status: u64,
}

/// A target file's content.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TargetFile {
    /// Path.
    pub path: String,
    /// Content (base64).
    pub raw: String,
}

/// TUF `targets.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct SignedTargets {
    /// The signed part (signatures are the agent's to check).
    pub signed: Signed,
}

/// `signed`.
#[derive(Debug, Clone, Deserialize)]
pub struct Signed {
    /// Targets version.
    pub version: u64,
    /// Backend state to echo.
    #[serde(default)]
    pub custom: Option<SignedCustom>,
    /// Every target file, by path.
    #[serde(default)]
    pub targets: BTreeMap<String, TargetDesc>,
}

/// `signed.custom`.
#[derive(Debug, Clone, Deserialize)]
pub struct SignedCustom {
    /// Opaque state to echo as `backend_client_state`.
    #[serde(default)]
    pub opaque_backend_state: Option<String>,
}

/// A target file's description.
#[derive(Debug, Clone, Deserialize)]
pub struct TargetDesc {
    /// Length in bytes.
    pub length: u64,
    /// Hashes by algorithm.
    pub hashes: BTreeMap<String, String>,
    /// Config metadata.
    #[serde(default)]
    pub custom: Option<TargetCustom>,
}

/// `custom` of a target file.
#[derive(Debug, Clone, Deserialize)]
pub struct TargetCustom {
    /// Config version.
    #[serde(default)]
    pub v: Option<u64>,
}
