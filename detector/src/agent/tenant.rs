//! Tenants: the unit the node's capacity is shared by. A process belongs to
//! its Kubernetes pod where its cgroup path names one, else to its login
//! user's service manager where it runs below one, else to its cgroup: a
//! workload cannot multiply its tenant by making cgroups.
//! Each tenant may hold only so many watched processes and so many pending
//! decisions, so a fork or exec storm in one pod can neither fill the node's
//! process cap nor queue ahead of another pod's processes.

use std::{collections::HashMap, io::Read, sync::Arc};

use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Most bytes of `/proc/PID/cgroup` read (one line per hierarchy).
const MAX_CGROUP_FILE: u64 = 64 << 10;

/// Decisions one tenant may have made at once: the rest of the node's
/// decision room stays free for other tenants.
const DECIDING_PER_TENANT: usize = 2;

/// A tenant's name: its pod's cgroup, or its own cgroup.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Tenant(String);

impl Tenant {
    /// The tenant of `pid`; processes whose cgroup cannot be read share one.
    pub fn of(pid: u32) -> Self {
        let text = std::fs::File::open(format!("/proc/{pid}/cgroup")).ok().and_then(|f| {
            let mut text = String::new();
            f.take(MAX_CGROUP_FILE).read_to_string(&mut text).ok().map(|_| text)
        });
        Tenant::from_cgroup_file(text.as_deref().unwrap_or(""))
    }

    /// The tenant named by the text of a `/proc/PID/cgroup` file.
    pub(crate) fn from_cgroup_file(text: &str) -> Self {
        let path = cgroup_path(text).unwrap_or("?");
        Tenant(tenant_path(path).to_owned())
    }
}

impl std::fmt::Display for Tenant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The path that tells tenants apart. On a unified (v2) node, the file's
/// one line. On a v1 or hybrid node, the memory controller's (container
/// runtimes always place a container there, for its limit; in the unified
/// hierarchy of a hybrid node containers may share a path), else the pids
/// controller's, else the first.
fn cgroup_path(text: &str) -> Option<&str> {
    let mut lines = text.lines().filter_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        Some((controllers, path))
    });
    let lines: Vec<(&str, &str)> = lines.by_ref().take(64).collect();
    let named = |name: &str| lines.iter().find(|(c, _)| c.split(',').any(|c| c == name)).map(|(_, p)| *p);
    match lines.as_slice() {
        [("", path)] => Some(path),
        _ => named("memory").or_else(|| named("pids")).or(lines.first().map(|(_, p)| *p)),
    }
}

/// The part of `path` a workload cannot multiply: its pod, else a login
/// user's service manager, else the whole path.
fn tenant_path(path: &str) -> &str {
    if names_pod(path) {
        return pod_of(path);
    }
    user_manager(path).unwrap_or(path)
}

/// A login user's service manager (`/user.slice/user-UID.slice/user@UID.service`):
/// everything below it is delegated to that user, who can make scopes,
/// slices and services there at will (`systemd-run --user --scope`), so
/// it is one tenant.
fn user_manager(path: &str) -> Option<&str> {
    const USERS: &str = "/user.slice/";
    let mut parts = path.strip_prefix(USERS)?.splitn(3, '/');
    let (slice, manager) = (parts.next()?, parts.next()?);
    let is_slice = slice.starts_with("user-") && slice.ends_with(".slice");
    let is_manager = manager.starts_with("user@") && manager.ends_with(".service");
    (is_slice && is_manager).then(|| &path[..USERS.len() + slice.len() + 1 + manager.len()])
}

fn names_pod(path: &str) -> bool {
    path.split('/').any(|c| c.starts_with("pod") || c.contains("-pod"))
}

/// The path up to its first pod component (`kubepods-burstable-pod<uid>.slice`
/// with the systemd driver, `pod<uid>` with cgroupfs), or the whole path. The
/// first: cgroups a workload makes below its pod, whatever their names, stay
/// its pod's.
fn pod_of(path: &str) -> &str {
    let mut at = 0;
    for component in path.split('/') {
        at += component.len();
        if names_pod(component) {
            return &path[..at];
        }
        at += 1;
    }
    path
}

/// The decisions each tenant has pending, and its room to make them.
pub struct Tenants {
    /// Most processes watched per tenant.
    quota: usize,
    /// Most decisions pending per tenant.
    max_queued: usize,
    pending: HashMap<Tenant, (usize, Arc<Semaphore>)>,
}

impl Tenants {
    /// Tenants that may each watch `quota` processes and queue `max_queued` decisions.
    pub fn new(quota: usize, max_queued: usize) -> Self {
        Tenants { quota, max_queued, pending: HashMap::new() }
    }

    /// Whether a tenant with `watched` processes watched may watch one more.
    pub fn may_watch(&self, watched: usize) -> Result<(), String> {
        match watched >= self.quota {
            true => {
                Err(format!("its pod or cgroup already has {watched} processes watched (--max-processes-per-tenant)"))
            }
            false => Ok(()),
        }
    }

    /// Whether `tenant` may queue one more decision.
    pub fn may_queue(&self, tenant: &Tenant) -> Result<(), String> {
        match self.pending.get(tenant) {
            Some((n, _)) if *n >= self.max_queued => {
                Err(format!("its pod or cgroup already has {n} processes waiting for a decision"))
            }
            _ => Ok(()),
        }
    }

    /// Counts a decision as pending for `tenant`; returns the room it must
    /// take before it runs.
    pub fn enqueue(&mut self, tenant: &Tenant) -> Arc<Semaphore> {
        let entry =
            self.pending.entry(tenant.clone()).or_insert_with(|| (0, Arc::new(Semaphore::new(DECIDING_PER_TENANT))));
        entry.0 += 1;
        entry.1.clone()
    }

    /// A decision of `tenant` is reached.
    pub fn done(&mut self, tenant: &Tenant) {
        if let Some((n, _)) = self.pending.get_mut(tenant) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.pending.remove(tenant);
            }
        }
    }
}

/// Processes watched per tenant, counted once for all of a rescan's
/// refused processes.
#[derive(Default)]
pub struct Watching(Option<HashMap<Tenant, usize>>);

impl Watching {
    /// How many of `watched` (each watched process's tenant, counted at
    /// the first call) are `tenant`'s.
    pub fn of<'a>(&mut self, watched: impl Iterator<Item = &'a Tenant>, tenant: &Tenant) -> usize {
        let counts = self.0.get_or_insert_with(|| {
            let mut counts: HashMap<Tenant, usize> = HashMap::new();
            for t in watched {
                *counts.entry(t.clone()).or_default() += 1;
            }
            counts
        });
        counts.get(tenant).copied().unwrap_or(0)
    }
}

/// The probes of each tenant's ended processes that the kernel has not
/// closed yet: a tenant whose processes come and go without end waits for
/// its own backlog, not another's.
#[derive(Default)]
pub struct DetachBacklog {
    /// (number of the batch's last probe in the detach sequence, tenant,
    /// probes), in the order detached.
    batches: std::collections::VecDeque<(u64, Tenant, u64)>,
}

impl DetachBacklog {
    /// Probes `from + 1 ..= to` of the detach sequence are `tenant`'s.
    pub fn add(&mut self, tenant: Tenant, (from, to): (u64, u64)) {
        if to > from {
            self.batches.push_back((to, tenant, to - from));
        }
    }

    /// Probes of `tenant` not closed yet, when `closed` of the sequence are.
    pub fn of(&mut self, tenant: &Tenant, closed: u64) -> u64 {
        while self.batches.front().is_some_and(|(last, _, _)| *last <= closed) {
            self.batches.pop_front();
        }
        self.batches.iter().filter(|(_, t, _)| t == tenant).map(|(last, _, n)| (last - closed).min(*n)).sum()
    }
}

/// Takes a tenant's room, then the node's: a tenant with a long queue holds
/// at most [`DECIDING_PER_TENANT`] places in the node's queue.
pub async fn room(
    tenant: Arc<Semaphore>,
    node: Arc<Semaphore>,
) -> Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)> {
    let mine = tenant.acquire_owned().await.ok()?;
    let ours = node.acquire_owned().await.ok()?;
    Some((mine, ours))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenants_backlog_is_what_it_detached_and_is_not_closed_yet() {
        let (a, b) = (Tenant("/a".into()), Tenant("/b".into()));
        let mut backlog = DetachBacklog::default();
        backlog.add(a.clone(), (0, 4));
        backlog.add(b.clone(), (4, 5));
        // Probes detached by no tenant's end (a change of strategy) count
        // in the sequence, not in a tenant's backlog.
        backlog.add(a.clone(), (7, 10));
        assert_eq!((backlog.of(&a, 0), backlog.of(&b, 0)), (7, 1));
        assert_eq!((backlog.of(&a, 3), backlog.of(&b, 3)), (4, 1));
        assert_eq!((backlog.of(&a, 5), backlog.of(&b, 5)), (3, 0));
        assert_eq!((backlog.of(&a, 8), backlog.of(&b, 8)), (2, 0));
        assert_eq!(backlog.of(&a, 10), 0);
        assert!(backlog.batches.is_empty());
    }

    #[test]
    fn a_pod_is_the_tenant_of_its_containers() {
        let systemd =
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod12ab.slice/cri-containerd-9f.scope\n";
        assert_eq!(
            Tenant::from_cgroup_file(systemd).0,
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod12ab.slice"
        );
        let cgroupfs = "0::/kubepods/besteffort/pod12ab/9f\n";
        assert_eq!(Tenant::from_cgroup_file(cgroupfs).0, "/kubepods/besteffort/pod12ab");
        let nested = "0::/kubepods/pod12ab/9f/pod-made-by-the-workload/x\n";
        assert_eq!(Tenant::from_cgroup_file(nested).0, "/kubepods/pod12ab", "the workload cannot split its pod");
        assert_eq!(Tenant::from_cgroup_file("0::/system.slice/ssh.service\n").0, "/system.slice/ssh.service");
    }

    #[test]
    fn a_login_user_cannot_split_its_service_manager() {
        let manager = "/user.slice/user-1000.slice/user@1000.service";
        for leaf in ["app.slice/run-r1.scope", "app.slice/a/b/c.scope", "session.slice/dbus.service"] {
            let file = format!("0::{manager}/{leaf}\n");
            assert_eq!(Tenant::from_cgroup_file(&file).0, manager, "{leaf}");
        }
        assert_eq!(Tenant::from_cgroup_file(&format!("0::{manager}\n")).0, manager);
        // A login session's scope is root's to make: its own tenant.
        let session = "0::/user.slice/user-1000.slice/session-4.scope\n";
        assert_eq!(Tenant::from_cgroup_file(session).0, "/user.slice/user-1000.slice/session-4.scope");
    }

    #[test]
    fn v1_nodes_use_the_memory_controller_and_garbage_is_one_tenant() {
        let hybrid = "12:pids:/a\n1:name=systemd:/b\n0::/c\n";
        assert_eq!(Tenant::from_cgroup_file(hybrid).0, "/a");
        assert_eq!(Tenant::from_cgroup_file("3:memory:/m\n").0, "/m");
        let hybrid_root = "5:pids:/x\n4:cpu,memory:/kubepods/pod9/c1\n0::/system.slice/containerd.service\n";
        assert_eq!(Tenant::from_cgroup_file(hybrid_root).0, "/kubepods/pod9");
        assert_eq!(Tenant::from_cgroup_file("4:memory:/docker/c1\n0::/\n").0, "/docker/c1");
        assert_eq!(Tenant::from_cgroup_file("garbage").0, "?");
        assert_eq!(Tenant::from_cgroup_file("").0, "?");
    }

    #[test]
    fn quotas_count_watched_and_queued() {
        let mut t = Tenants::new(2, 1);
        let a = Tenant("a".into());
        assert!(t.may_watch(1).is_ok());
        assert!(t.may_watch(2).is_err());
        let _room = t.enqueue(&a);
        assert!(t.may_queue(&a).is_err());
        assert!(t.may_queue(&Tenant("b".into())).is_ok());
        t.done(&a);
        assert!(t.may_queue(&a).is_ok());
        assert!(t.pending.is_empty());
    }
}
