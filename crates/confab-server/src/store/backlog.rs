//! Which groups of rows kept in memory are due to be written: the bookkeeping shared by the
//! retry keys (grouped by author) and the history index entries (grouped by room).
//!
//! Both write a group's rows to their table together, so that several share each page
//! written: once the group is full, or once its oldest row has fallen far enough behind the
//! newest message that memory (and what a restart must read back) stays bounded. Both keep a
//! stored low mark at or below every waiting row's message (the oldest group's, or a little
//! below it: it is stored again only once it has moved a quarter of the way to `behind`).

use std::collections::{BTreeSet, VecDeque};

/// Rows an append may write from due groups, per message it stored (at least one group is
/// written whenever one is due). Groups come due together when their rows come in step: in
/// W2 every author falls `retry_keys::MERGE_BEHIND` behind within the same second, every
/// 100,000 messages, and written eight authors per commit their keys made a burst of work
/// that every message queued behind. Twice the rate rows come in keeps up with them and
/// spreads such a wave over half its period: W2 at half load, p99 at arrival 1.2-1.5 ms
/// against 3.5-3.9 (BENCHMARKS.md, 2026-12-03, a third EPYC host).
const WRITTEN_PER_MESSAGE: usize = 2;

/// Groups with rows waiting, by the rowid of the oldest message among them.
#[derive(Debug)]
pub(super) struct Backlog<K> {
    /// Each group with rows waiting, with the lowest message rowid among them.
    oldest: BTreeSet<(i64, K)>,
    /// Groups that filled up since rows were last written, the first to fill first.
    full: VecDeque<K>,
    /// The low mark as stored.
    low: i64,
}

impl<K> Default for Backlog<K> {
    fn default() -> Self {
        Backlog {
            oldest: BTreeSet::new(),
            full: VecDeque::new(),
            low: 0,
        }
    }
}

impl<K: Ord + Clone> Backlog<K> {
    /// A group now has rows waiting, the oldest for the message `rowid`.
    pub(super) fn started(&mut self, rowid: i64, group: K) {
        self.oldest.insert((rowid, group));
    }

    /// The group's oldest waiting row is now `rowid`, below `first` (rowids only grow, unless
    /// a deleted room took the newest messages and its rowids are handed out again).
    pub(super) fn moved_down(&mut self, first: i64, rowid: i64, group: K) {
        if let Some((_, group)) = self.oldest.take(&(first, group)) {
            self.oldest.insert((rowid, group));
        }
    }

    /// The group has filled up: it is due from the next [`Backlog::write_due`] on.
    pub(super) fn filled(&mut self, group: K) {
        self.full.push_back(group);
    }

    /// The group's rows, the oldest for message `first`, are written or gone.
    pub(super) fn done(&mut self, first: i64, group: K) {
        self.oldest.remove(&(first, group));
    }

    /// The low mark as read from the database.
    pub(super) fn set_stored_low(&mut self, low: i64) {
        self.low = low;
    }

    /// Writes groups due now with `write`, which takes a group's rows out of memory, writes
    /// them and returns the lowest message rowid among them and how many rows it wrote (`None`
    /// if it had none left: a group may be due twice). Due are the groups that filled up (the
    /// first to fill first), then those whose oldest row is `behind` or more messages behind
    /// `newest` (the append's last rowid), oldest first; they are written until
    /// [`WRITTEN_PER_MESSAGE`] rows per message the append `stored` are, at least one group,
    /// and the others stay due for the next append. Returns the low
    /// mark to store: the oldest waiting row's message (or past `newest` when nothing waits)
    /// if it is below the stored one, or a quarter of `behind` or more above it. A mark left
    /// a little low only has a restart read back a few more messages, while storing each
    /// move dirtied the marks' page in most commits while waves of groups were written, a
    /// WAL frame more in commits that otherwise write one or two.
    pub(super) fn write_due<E>(
        &mut self,
        newest: Option<i64>,
        behind: i64,
        stored: usize,
        mut write: impl FnMut(&K) -> Result<Option<(i64, usize)>, E>,
    ) -> Result<Option<i64>, E> {
        let budget = (stored * WRITTEN_PER_MESSAGE).max(1);
        let mut written = 0;
        loop {
            let (group, was_behind) = if let Some(group) = self.full.pop_front() {
                (group, false)
            } else {
                match (self.oldest.first(), newest) {
                    (Some((rowid, group)), Some(newest)) if *rowid <= newest - behind => {
                        (group.clone(), true)
                    }
                    _ => break,
                }
            };
            match write(&group)? {
                Some((first, rows)) => {
                    self.done(first, group);
                    written += rows;
                }
                // A group in `oldest` has rows; should it not, it must not stay first.
                None if was_behind => {
                    self.oldest.pop_first();
                }
                None => {}
            }
            if written >= budget {
                break;
            }
        }
        let low = match (self.oldest.first(), newest) {
            (Some(&(oldest, _)), _) => oldest,
            (None, Some(newest)) => newest + 1,
            (None, None) => return Ok(None),
        };
        let moved = low < self.low || low - self.low >= behind / 4;
        Ok(moved.then(|| {
            self.low = low;
            low
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// Writes what `backlog` has due, recording the groups written; each group of `groups`
    /// has its first rowid and its number of rows, and is written whole.
    fn write_due(
        backlog: &mut Backlog<&'static str>,
        groups: &mut HashMap<&'static str, (i64, usize)>,
        newest: Option<i64>,
        stored: usize,
        written: &mut Vec<&'static str>,
    ) -> Result<Option<i64>, ()> {
        backlog.write_due(newest, 80, stored, |group| {
            written.push(group);
            Ok(groups.remove(group))
        })
    }

    #[test]
    fn full_groups_then_those_left_behind_are_written_up_to_the_budget() {
        let mut groups = HashMap::from([("a", (10, 3)), ("b", (40, 3)), ("c", (95, 5))]);
        let mut backlog = Backlog::default();
        backlog.set_stored_low(10);
        for (group, (first, _)) in &groups {
            backlog.started(*first, *group);
        }
        backlog.filled("c");
        let mut written = Vec::new();
        // c filled up; a and b are 80 or more behind rowid 130, the oldest first. c's 5 rows
        // and a's 3 reach the 6 of an append of 3 messages: b waits, and the low mark moves
        // up to it.
        let low = write_due(&mut backlog, &mut groups, Some(130), 3, &mut written);
        assert_eq!(low, Ok(Some(40)));
        assert_eq!(written, ["c", "a"]);
        // A deleted room's rowid handed out again to b: the mark goes down at once.
        backlog.moved_down(40, 5, "b");
        groups.insert("b", (5, 3));
        let low = write_due(&mut backlog, &mut groups, None, 3, &mut written);
        assert_eq!(low, Ok(Some(5)), "nothing due without a newest message");
        // b is written: nothing waits, so the mark goes past the newest message.
        let low = write_due(&mut backlog, &mut groups, Some(300), 3, &mut written);
        assert_eq!(low, Ok(Some(301)));
        assert_eq!(written, ["c", "a", "b"]);
        // A new group 9 above the stored mark: under a quarter of `behind`, so left.
        backlog.started(310, "d");
        let low = write_due(&mut backlog, &mut groups, Some(320), 3, &mut written);
        assert_eq!(low, Ok(None), "moved too little to store");
        groups.insert("d", (310, 1));
        let low = write_due(&mut backlog, &mut groups, Some(400), 3, &mut written);
        assert_eq!(low, Ok(Some(401)), "d written as it fell behind");
        assert_eq!(written, ["c", "a", "b", "d"]);
    }

    #[test]
    fn a_group_over_the_budget_is_written_alone_first_filled_first() {
        let mut groups = HashMap::from([("a", (1, 9)), ("b", (2, 9)), ("c", (3, 9))]);
        let mut backlog = Backlog::default();
        for (group, (first, _)) in &groups {
            backlog.started(*first, *group);
        }
        for group in ["b", "a", "c", "b"] {
            backlog.filled(group);
        }
        let mut written = Vec::new();
        for stored in [2, 0] {
            write_due(&mut backlog, &mut groups, None, stored, &mut written).unwrap();
        }
        assert_eq!(written, ["b", "a"], "one group per append");
        // c, then b again (already written).
        for _ in 0..2 {
            write_due(&mut backlog, &mut groups, None, 2, &mut written).unwrap();
        }
        assert_eq!(written, ["b", "a", "c", "b"]);
    }
}
