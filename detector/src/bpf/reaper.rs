//! Detaching in the background. Closing a perf-event uprobe makes the kernel
//! unregister it under the global trace `event_mutex` and wait for an RCU
//! grace period there: about 90 ms per uprobe on this kernel, one at a time,
//! and every attach waits for that mutex too. Detached links are therefore
//! buried by a thread of their own that gives way to attaches, so a burst of
//! exits never stalls the event loop nor delays watching new processes.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
        mpsc,
    },
    time::Duration,
};

/// Longest a detached probe waits for attaches to finish: a stream of
/// attaches cannot starve closing (each held probe is a descriptor).
const MAX_GIVE_WAY: Duration = Duration::from_millis(200);

/// A detached probe, closed when dropped.
pub type Buried = Box<dyn Send>;

/// The thread that closes detached links.
pub struct Reaper {
    tx: Option<mpsc::Sender<Buried>>,
    pending: Arc<AtomicUsize>,
    attaching: Arc<AtomicUsize>,
    /// Links buried so far, and closed so far: links are closed in the
    /// order they were buried, so a link buried as the n-th is closed once
    /// `closed` reaches n.
    buried: AtomicU64,
    closed: Arc<AtomicU64>,
}

/// While alive, the reaper closes nothing (an attach is in progress).
pub struct Attaching(Arc<AtomicUsize>);

impl Drop for Attaching {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Reaper {
    /// Starts the thread.
    pub fn start() -> Self {
        let (tx, rx) = mpsc::channel::<Buried>();
        let pending = Arc::new(AtomicUsize::new(0));
        let attaching = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicU64::new(0));
        let (p, a, c) = (pending.clone(), attaching.clone(), closed.clone());
        let spawned = std::thread::Builder::new().name("detector-reaper".into()).spawn(move || {
            for link in rx {
                let since = std::time::Instant::now();
                while a.load(Ordering::SeqCst) > 0 && since.elapsed() < MAX_GIVE_WAY {
                    std::thread::sleep(Duration::from_millis(2));
                }
                drop(link);
                c.fetch_add(1, Ordering::SeqCst);
                p.fetch_sub(1, Ordering::SeqCst);
            }
        });
        // Without the thread, links are closed inline (slower, still correct).
        let tx = spawned.ok().map(|_| tx);
        Reaper { tx, pending, attaching, buried: AtomicU64::new(0), closed }
    }

    /// Closes `link` soon.
    pub fn bury(&self, link: Buried) {
        self.buried.fetch_add(1, Ordering::SeqCst);
        self.pending.fetch_add(1, Ordering::SeqCst);
        let sent = match &self.tx {
            Some(tx) => tx.send(link).map_err(|e| e.0),
            None => Err(link),
        };
        if let Err(link) = sent {
            drop(link);
            self.closed.fetch_add(1, Ordering::SeqCst);
            self.pending.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Holds closing back until the returned guard is dropped.
    pub fn attaching(&self) -> Attaching {
        self.attaching.fetch_add(1, Ordering::SeqCst);
        Attaching(self.attaching.clone())
    }

    /// Waits until every buried link is closed, at most `limit`; returns
    /// whether they all are.
    pub fn wait_empty(&self, limit: Duration) -> bool {
        let deadline = std::time::Instant::now() + limit;
        while self.pending() > 0 {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    /// Links detached and not closed yet.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::SeqCst)
    }

    /// Links buried so far, and closed so far (in the order buried).
    pub fn sequence(&self) -> (u64, u64) {
        (self.buried.load(Ordering::SeqCst), self.closed.load(Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Flag(Arc<AtomicUsize>);
    impl Drop for Flag {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn closes_in_the_background_and_gives_way_to_attaches() {
        let r = Reaper::start();
        let closed = Arc::new(AtomicUsize::new(0));
        let guard = r.attaching();
        r.bury(Box::new(Flag(closed.clone())));
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!((closed.load(Ordering::SeqCst), r.pending()), (0, 1), "held back while attaching");
        drop(guard);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while r.pending() > 0 {
            assert!(std::time::Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(closed.load(Ordering::SeqCst), 1);
        assert_eq!(r.sequence(), (1, 1));
    }

    #[test]
    fn attaches_without_end_delay_closing_only_so_long() {
        let r = Reaper::start();
        let closed = Arc::new(AtomicUsize::new(0));
        let _forever = r.attaching();
        r.bury(Box::new(Flag(closed.clone())));
        let deadline = std::time::Instant::now() + 10 * MAX_GIVE_WAY;
        while closed.load(Ordering::SeqCst) == 0 {
            assert!(std::time::Instant::now() < deadline, "starved by an attach that never ends");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
