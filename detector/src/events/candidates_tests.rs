use super::*;

fn ask(pid: u32, code: u64) -> Ask {
    Ask { pid, generation: 1, code, name: 0x10, globals: 0x20, id: 0 }
}

/// The ask made for the code object, with the id it was given.
fn asked(c: &mut Candidates) -> Ask {
    let asks = c.take_asks();
    assert_eq!(asks.len(), 1, "{asks:?}");
    asks[0]
}

#[test]
fn a_code_object_is_asked_about_once_and_its_starts_come_back_resolved() {
    let mut c = Candidates::default();
    assert_eq!(c.seen(ask(7, 0x100), (1, 10)), Seen::Waiting);
    assert_eq!(c.seen(ask(7, 0x100), (2, 20)), Seen::Waiting);
    let a = asked(&mut c);
    assert_eq!(c.resolved(a, Some(Some(3))), Some(vec![(1, 10), (2, 20)]));
    c.told(a.key(), 30);
    assert_eq!(c.seen(ask(7, 0x100), (1, 25)), Seen::Resolved { target: Some(3), retell: false });
    // After the kernel was told: its verdict was evicted, and it is told again.
    assert_eq!(c.seen(ask(7, 0x100), (1, 40)), Seen::Resolved { target: Some(3), retell: true });
    assert!(c.take_asks().is_empty());
}

#[test]
fn a_resolution_is_folded_once_due_and_only_if_not_told_again() {
    let mut c = Candidates::default();
    c.seen(ask(7, 0x100), (1, 10));
    let a = asked(&mut c);
    c.resolved(a, Some(Some(3)));
    c.told(a.key(), 30);
    assert!(c.due(29).is_empty());
    c.told(a.key(), 50);
    assert!(c.due(40).is_empty(), "told again at 50");
    assert_eq!(c.due(50), vec![(a.key(), Some(3))]);
    assert_eq!(c.gone(a.key()), Some(Some(3)));
    assert_eq!(c.resolution(a.key()), None);
}

#[test]
fn a_late_resolution_of_a_deallocated_code_object_is_not_the_next_ones() {
    let mut c = Candidates::default();
    c.seen(ask(7, 0x100), (1, 10));
    let old = asked(&mut c);
    // Deallocated while its walk runs; another code object at its address.
    assert_eq!(c.gone(old.key()), None);
    c.seen(ask(7, 0x100), (1, 20));
    let new = asked(&mut c);
    assert_eq!(c.resolved(old, Some(Some(3))), None);
    assert_eq!(c.resolution(new.key()), None);
    assert_eq!(c.resolved(new, Some(None)), Some(vec![(1, 20)]));
    assert_eq!(c.capped().0, 1, "the first object's held start");
}

#[test]
fn a_process_holds_a_bounded_number_of_starts_and_code_objects() {
    let mut c = Candidates::default();
    for i in 0..MAX_HELD_PER_PROCESS as u64 + 5 {
        c.seen(ask(7, 0x100), (1, i));
    }
    assert_eq!(c.capped().0, 5);
    for code in 0..MAX_WAITING_PER_PROCESS as u64 + 3 {
        c.seen(ask(8, 0x1000 + code * 8), (1, 0));
    }
    assert_eq!(c.capped().1, 3);
    // Another process is not held back by either.
    c.seen(ask(9, 0x100), (1, 0));
    assert_eq!(c.take_asks().iter().filter(|a| a.pid == 9).count(), 1);
}

#[test]
fn a_failed_or_refused_resolution_is_asked_about_again() {
    let mut c = Candidates::default();
    c.seen(ask(7, 0x100), (1, 10));
    let a = asked(&mut c);
    assert_eq!(c.resolved(a, None), Some(Vec::new()));
    assert_eq!(c.capped().0, 1);
    let pending = PendingHits { generation: 1, code: 0x100, name: 0x10, globals: 0x20, hits: 1 };
    c.ask_unresolved(&[(7, pending)]);
    let a = asked(&mut c);
    c.refused(a);
    c.ask_unresolved(&[(7, pending)]);
    assert_eq!(asked(&mut c).key(), a.key());
}
