//! The Remote Configuration client state machine, without I/O: builds each
//! request from the full state, verifies a response before anything of it is
//! applied, and computes which configs are new, changed, unchanged or gone.

use std::collections::BTreeMap;

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use sha2::{Digest, Sha256};

use super::protocol::{
    Client, ClientState, ClientTracer, ConfigState, Request, Response, SignedTargets, TargetFileHash, TargetFileMeta,
};

/// The product this client subscribes to.
pub const PRODUCT: &str = "SCA_DETECTION";

/// How applying a config went (`ConfigState.apply_state`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ApplyState {
    /// Received, not applied yet.
    Unacknowledged = 1,
    /// Applied.
    Acknowledged = 2,
    /// Could not be applied (see the error).
    Error = 3,
}

/// Who this client says it is.
#[derive(Clone, Debug)]
pub struct Identity {
    /// `DD_SERVICE`.
    pub service: String,
    /// `DD_ENV`.
    pub env: String,
    /// `DD_VERSION`.
    pub app_version: String,
}

/// A config held by the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held {
    /// Config id (from the path).
    pub id: String,
    /// Product.
    pub product: String,
    /// `custom.v`.
    pub version: u64,
    /// Length of its file.
    pub length: u64,
    /// sha256 of its file, hex.
    pub sha256: String,
    /// How applying it went.
    pub state: ApplyState,
    /// Why it failed, for [`ApplyState::Error`].
    pub error: String,
}

/// What a response changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// A new or changed config, verified against the signed targets.
    Put {
        /// Path.
        path: String,
        /// Its content.
        raw: Vec<u8>,
    },
    /// A config no longer sent.
    Remove {
        /// Path.
        path: String,
    },
}

/// A response rejected as a whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RejectError(pub String);

/// The client's state.
#[derive(Clone, Debug)]
pub struct RcClient {
    id: String,
    runtime_id: String,
    identity: Identity,
    targets_version: u64,
    backend_state: String,
    error: Option<String>,
    held: BTreeMap<String, Held>,
}

/// `(product, config id)` of a config path, or `None` if malformed:
/// `datadog/<org>/<PRODUCT>/<id>/<name>` or `employee/<PRODUCT>/<id>/<name>`.
pub fn parse_path(path: &str) -> Option<(&str, &str)> {
    let parts: Vec<&str> = path.split('/').collect();
    match parts.as_slice() {
        ["datadog", _, product, id, _] | ["employee", product, id, _] => Some((product, id)),
        _ => None,
    }
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

impl RcClient {
    /// A fresh client with random ids.
    pub fn new(identity: Identity) -> Self {
        RcClient {
            id: uuid::Uuid::new_v4().to_string(),
            runtime_id: uuid::Uuid::new_v4().to_string(),
            identity,
            targets_version: 0,
            backend_state: String::new(),
            error: None,
            held: BTreeMap::new(),
        }
    }

    /// The configs held, by path.
    pub fn held(&self) -> &BTreeMap<String, Held> {
        &self.held
    }

    /// The next request: the whole state, every time.
    pub fn request(&self) -> Request {
        let config_states = self
            .held
            .values()
            .map(|h| ConfigState {
                id: h.id.clone(),
                version: h.version,
                product: h.product.clone(),
                apply_state: h.state as u64,
                apply_error: h.error.clone(),
            })
            .collect();
        let cached_target_files = self
            .held
            .iter()
            .map(|(path, h)| TargetFileMeta {
                path: path.clone(),
                length: h.length,
                hashes: vec![TargetFileHash { algorithm: "sha256".into(), hash: h.sha256.clone() }],
            })
            .collect();
        Request {
            client: Client {
                state: ClientState {
                    root_version: 1,
                    targets_version: self.targets_version,
                    config_states,
                    has_error: self.error.is_some(),
                    error: self.error.clone().unwrap_or_default(),
                    backend_client_state: self.backend_state.clone(),
                },
                id: self.id.clone(),
                products: vec![PRODUCT.into()],
                is_tracer: true,
                client_tracer: ClientTracer {
                    runtime_id: self.runtime_id.clone(),
                    language: "python".into(),
                    tracer_version: env!("CARGO_PKG_VERSION").into(),
                    service: self.identity.service.clone(),
                    env: self.identity.env.clone(),
                    app_version: self.identity.app_version.clone(),
                    tags: Vec::new(),
                },
                // No capability bits: this client only reads SCA_DETECTION.
                capabilities: B64.encode([0u8]),
            },
            cached_target_files,
        }
    }

    /// Verifies `resp` and, if it is sound, applies it to the state and
    /// returns the changes. A rejected response changes nothing but the
    /// error reported in the next request.
    pub fn update(&mut self, resp: Response) -> Result<Vec<Change>, RejectError> {
        match self.verify(&resp) {
            Ok(changes) => {
                self.error = None;
                Ok(changes)
            }
            Err(e) => {
                self.error = Some(e.0.clone());
                Err(e)
            }
        }
    }

    fn verify(&mut self, resp: &Response) -> Result<Vec<Change>, RejectError> {
        let reject = |m: String| RejectError(m);
        if resp.config_status == 1 {
            // Expired: every config goes.
            let paths: Vec<String> = self.held.keys().cloned().collect();
            self.held.clear();
            return Ok(paths.into_iter().map(|path| Change::Remove { path }).collect());
        }
        if resp.targets.is_empty() {
            return Ok(Vec::new()); // nothing new
        }
        let raw = B64.decode(&resp.targets).map_err(|e| reject(format!("targets: invalid base64: {e}")))?;
        let signed: SignedTargets =
            serde_json::from_slice(&raw).map_err(|e| reject(format!("targets: invalid TUF targets: {e}")))?;
        let files: BTreeMap<&str, &str> = resp.target_files.iter().map(|f| (f.path.as_str(), f.raw.as_str())).collect();

        // Compute everything before touching the state.
        let mut next: BTreeMap<String, Held> = BTreeMap::new();
        let mut puts = Vec::new();
        for path in &resp.client_configs {
            let Some((product, id)) = parse_path(path) else {
                return Err(reject(format!("malformed config path {path:?}")));
            };
            if product != PRODUCT {
                continue;
            }
            let desc =
                signed.signed.targets.get(path).ok_or_else(|| reject(format!("{path}: not in the signed targets")))?;
            let want =
                desc.hashes.get("sha256").ok_or_else(|| reject(format!("{path}: no sha256 in the signed targets")))?;
            let version = desc.custom.as_ref().and_then(|c| c.v).unwrap_or(0);
            let unchanged = self.held.get(path).filter(|h| h.sha256 == *want && h.length == desc.length);
            if let Some(h) = unchanged {
                next.insert(path.clone(), Held { version, ..h.clone() });
                continue;
            }
            let content =
                files.get(path.as_str()).ok_or_else(|| reject(format!("{path}: missing from target_files")))?;
            let content = B64.decode(content).map_err(|e| reject(format!("{path}: invalid base64: {e}")))?;
            if content.len() as u64 != desc.length {
                return Err(reject(format!(
                    "{path}: length {} does not match the signed length {}",
                    content.len(),
                    desc.length
                )));
            }
            let got = sha256_hex(&content);
            if got != want.to_ascii_lowercase() {
                return Err(reject(format!("{path}: sha256 {got} does not match the signed {want}")));
            }
            next.insert(
                path.clone(),
                Held {
                    id: id.to_owned(),
                    product: product.to_owned(),
                    version,
                    length: desc.length,
                    sha256: got,
                    state: ApplyState::Unacknowledged,
                    error: String::new(),
                },
            );
            puts.push(Change::Put { path: path.clone(), raw: content });
        }
        let mut changes: Vec<Change> =
            self.held.keys().filter(|p| !next.contains_key(*p)).map(|p| Change::Remove { path: p.clone() }).collect();
        changes.extend(puts);
        self.held = next;
        self.targets_version = signed.signed.version;
        self.backend_state = signed.signed.custom.and_then(|c| c.opaque_backend_state).unwrap_or_default();
        Ok(changes)
    }

    /// Records how applying the config at `path` went.
    pub fn acknowledge(&mut self, path: &str, result: Result<(), String>) {
        if let Some(h) = self.held.get_mut(path) {
            (h.state, h.error) = match result {
                Ok(()) => (ApplyState::Acknowledged, String::new()),
                Err(e) => (ApplyState::Error, e),
            };
        }
    }
}

#[cfg(test)]
mod tests;
