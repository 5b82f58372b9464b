//! Serving connections from whoever may connect (the metrics port, the tap
//! socket): a cap on the connections served at once, the rest waiting in
//! the listen backlog, a smaller cap per peer address (so one peer cannot
//! take the kubelet's turn), and a back-off when accepting fails (no
//! descriptors left): a flood can neither spin a core nor take every
//! descriptor.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::warn;

/// Longest wait after a failed accept.
const MAX_BACKOFF: Duration = Duration::from_secs(1);
const MIN_BACKOFF: Duration = Duration::from_millis(10);

/// Admission to a listener's connections.
pub(crate) struct Gate {
    what: &'static str,
    slots: Arc<Semaphore>,
    backoff: Duration,
    peers: Arc<Mutex<HashMap<IpAddr, usize>>>,
    per_peer: usize,
}

/// A peer's connection, counted until dropped.
pub(crate) struct PeerSlot {
    peers: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = peers.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                peers.remove(&self.ip);
            }
        }
    }
}

impl Gate {
    /// At most `max` connections of `what` at once, and `per_peer` from one
    /// address.
    pub(crate) fn new(what: &'static str, max: usize, per_peer: usize) -> Self {
        let peers = Arc::default();
        Gate { what, slots: Arc::new(Semaphore::new(max)), backoff: MIN_BACKOFF, peers, per_peer }
    }

    /// Counts a connection from `ip`, unless it has its share already.
    pub(crate) fn peer(&self, ip: IpAddr) -> Option<PeerSlot> {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let n = peers.entry(ip).or_default();
        if *n >= self.per_peer {
            return None;
        }
        *n += 1;
        Some(PeerSlot { peers: self.peers.clone(), ip })
    }

    /// Waits for room for one more connection: held until it is dropped.
    pub(crate) async fn room(&self) -> OwnedSemaphorePermit {
        self.slots.clone().acquire_owned().await.expect("the gate's semaphore is never closed")
    }

    /// Accepting succeeded.
    pub(crate) fn accepted(&mut self) {
        self.backoff = MIN_BACKOFF;
    }

    /// Accepting failed with `e`: waits, longer each time in a row.
    pub(crate) async fn failed(&mut self, e: std::io::Error) {
        warn!(listener = self.what, error = %e, wait_ms = self.backoff.as_millis() as u64, "cannot accept a connection");
        tokio::time::sleep(self.backoff).await;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }
}
