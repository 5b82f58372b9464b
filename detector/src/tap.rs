//! The tap: a running agent's live event stream on a local unix socket, one
//! JSON line per event, for `detector dump` run inside the agent's pod. Any
//! number of clients; a slow one loses events (and is told how many) rather
//! than slowing the agent.

use std::{
    io,
    path::{Path, PathBuf},
    sync::Arc,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::broadcast,
};
use tracing::{debug, info};

use crate::listen::Gate;

/// Where the agent listens unless told otherwise, and where `dump` looks.
pub const DEFAULT_PATH: &str = "/run/detector/tap.sock";

/// Events buffered per client before the slowest starts losing them.
const BACKLOG: usize = 4096;

/// Clients served at once (`detector dump` sessions on the node).
const MAX_CLIENTS: usize = 64;

/// The agent's side of the tap.
pub struct Tap {
    sender: broadcast::Sender<Arc<str>>,
    path: PathBuf,
}

impl Tap {
    /// Listens on `path`, replacing a stale socket left by a killed agent
    /// but never one a live agent serves; only root may connect.
    pub fn bind(path: &Path) -> io::Result<Tap> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(io::ErrorKind::AddrInUse, "another agent is serving its tap there"));
        }
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        let (sender, _) = broadcast::channel(BACKLOG);
        let tx = sender.clone();
        info!(path = %path.display(), "serving the event tap");
        tokio::spawn(async move {
            let mut gate = Gate::new("tap", MAX_CLIENTS, MAX_CLIENTS);
            loop {
                let slot = gate.room().await;
                match listener.accept().await {
                    Ok((stream, _)) => {
                        gate.accepted();
                        let events = tx.subscribe();
                        tokio::spawn(async move {
                            serve(stream, events).await;
                            drop(slot);
                        });
                    }
                    Err(e) => gate.failed(e).await,
                }
            }
        });
        Ok(Tap { sender, path: path.to_owned() })
    }

    /// The sender the printer publishes on.
    pub fn sender(&self) -> broadcast::Sender<Arc<str>> {
        self.sender.clone()
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn serve(mut stream: UnixStream, mut events: broadcast::Receiver<Arc<str>>) {
    loop {
        let line = match events.recv().await {
            Ok(line) => line,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                debug!(dropped = n, "tap client too slow");
                format!("{{\"type\":\"dropped\",\"events\":{n}}}").into()
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        if stream.write_all(&buf).await.is_err() {
            return; // the client went away
        }
    }
}

/// The client's side: each line the agent sends, until it closes.
pub async fn connect(path: &Path) -> io::Result<tokio::io::Lines<BufReader<UnixStream>>> {
    let stream = UnixStream::connect(path).await.map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "cannot connect to a running agent's tap at {}: {e} (is `detector run` running here?)",
                path.display()
            ),
        )
    })?;
    Ok(BufReader::new(stream).lines())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn clients_see_every_event_and_a_slow_one_is_told_what_it_lost() {
        let path = std::env::temp_dir().join(format!("detector-tap-test-{}.sock", std::process::id()));
        let tap = Tap::bind(&path).unwrap();
        let mut fast = connect(&path).await.unwrap();
        let slow = UnixStream::connect(&path).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await; // both subscribed
        let tx = tap.sender();
        // Far more than the backlog and the socket buffer: the sender never
        // waits, the slow reader falls behind.
        let line: Arc<str> = format!("{{\"type\":\"hit\",\"pad\":\"{}\"}}", "x".repeat(200)).into();
        for i in 0..20_000 {
            tx.send(line.clone()).unwrap();
            if i < 100 {
                // The fast reader gets each event as it is sent.
                assert_eq!(fast.next_line().await.unwrap().as_deref(), Some(&*line));
            }
        }
        let mut slow = BufReader::new(slow).lines();
        let mut dropped = 0;
        while let Ok(Ok(Some(l))) = tokio::time::timeout(std::time::Duration::from_millis(500), slow.next_line()).await
        {
            if let Some(n) = l.strip_prefix("{\"type\":\"dropped\",\"events\":") {
                dropped += n.trim_end_matches('}').parse::<u64>().unwrap();
            }
        }
        assert!(dropped > 0, "the slow client was told nothing");
        let err = Tap::bind(&path).err().expect("a live tap is not replaced");
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        drop(tap);
        assert!(!path.exists(), "the socket is removed with the tap");
    }
}
