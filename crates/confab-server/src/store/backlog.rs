//! Which groups of rows kept in memory are due to be written: the bookkeeping shared by the
//! retry keys (grouped by author) and the history index entries (grouped by room).
//!
//! Both write a group's rows to their table together, so that several share each page
//! written: once the group is full, or once its oldest row has fallen far enough behind the
//! newest message that memory (and what a restart must read back) stays bounded. Both keep a
//! stored low mark at or below every waiting row's message, which is the oldest group's.

use std::collections::BTreeSet;

/// Groups with rows waiting, by the rowid of the oldest message among them.
#[derive(Debug)]
pub(super) struct Backlog<K> {
    /// Each group with rows waiting, with the lowest message rowid among them.
    oldest: BTreeSet<(i64, K)>,
    /// Groups that filled up since rows were last written.
    full: Vec<K>,
    /// The low mark as stored.
    low: i64,
}

impl<K> Default for Backlog<K> {
    fn default() -> Self {
        Backlog {
            oldest: BTreeSet::new(),
            full: Vec::new(),
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
        self.full.push(group);
    }

    /// The group's rows, the oldest for message `first`, are written or gone.
    pub(super) fn done(&mut self, first: i64, group: K) {
        self.oldest.remove(&(first, group));
    }

    /// The low mark as read from the database.
    pub(super) fn set_stored_low(&mut self, low: i64) {
        self.low = low;
    }

    /// Writes the groups due now with `write`, which takes a group's rows out of memory,
    /// writes them and returns the lowest message rowid among them (`None` if it had none
    /// left: a group may be due twice). Due are at most `at_most` of the groups that filled
    /// up (the first to fill first; the others stay due, and grow meanwhile), and at most
    /// `at_most` of those whose oldest row is `behind` or more messages behind `newest` (the
    /// append's last rowid). Returns the low mark to store if it moved: the oldest waiting
    /// row's message, or past `newest` when nothing waits.
    ///
    /// Groups fill up together when their rows come in step (every room of a busy server
    /// taking a message a second, say): all of them at once made one commit write hundreds
    /// of thousands of rows while every message waited for it.
    pub(super) fn write_due<E>(
        &mut self,
        newest: Option<i64>,
        behind: i64,
        at_most: usize,
        mut write: impl FnMut(&K) -> Result<Option<i64>, E>,
    ) -> Result<Option<i64>, E> {
        let mut due: Vec<K> = self.full.drain(..self.full.len().min(at_most)).collect();
        if let Some(newest) = newest {
            due.extend(
                self.oldest
                    .iter()
                    .take_while(|&&(rowid, _)| rowid <= newest - behind)
                    .take(at_most)
                    .map(|(_, group)| group.clone()),
            );
        }
        for group in due {
            if let Some(first) = write(&group)? {
                self.done(first, group);
            }
        }
        let low = match (self.oldest.first(), newest) {
            (Some(&(oldest, _)), _) => oldest,
            (None, Some(newest)) => newest + 1,
            (None, None) => return Ok(None),
        };
        Ok((low != self.low).then(|| {
            self.low = low;
            low
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn groups_are_due_when_full_or_left_behind() {
        let mut firsts = std::collections::HashMap::from([("a", 10), ("b", 20), ("c", 95)]);
        let mut backlog = Backlog::default();
        backlog.set_stored_low(10);
        for (group, first) in &firsts {
            backlog.started(*first, *group);
        }
        backlog.filled("c");
        let mut written = Vec::new();
        let mut write_due = |backlog: &mut Backlog<&str>, firsts: &HashMap<_, _>, newest| {
            backlog.write_due(newest, 80, 1, |group| {
                written.push(group.to_string());
                Ok::<_, ()>(Some(firsts[group]))
            })
        };
        // c filled up; a and b are 80 or more behind rowid 100, but one is written per append.
        // The low mark moves up to b's.
        assert_eq!(write_due(&mut backlog, &firsts, Some(100)), Ok(Some(20)));
        // A deleted room's rowid handed out again to b.
        backlog.moved_down(20, 5, "b");
        firsts.insert("b", 5);
        assert_eq!(write_due(&mut backlog, &firsts, None), Ok(Some(5)));
        // b is written: nothing waits, so the mark goes past the newest message.
        assert_eq!(write_due(&mut backlog, &firsts, Some(300)), Ok(Some(301)));
        assert_eq!(
            write_due(&mut backlog, &firsts, Some(300)),
            Ok(None),
            "unmoved"
        );
        assert_eq!(written, ["c", "a", "b"]);
    }

    #[test]
    fn full_groups_are_written_a_few_per_append_first_filled_first() {
        let firsts = HashMap::from([("a", 1), ("b", 2), ("c", 3)]);
        let mut backlog = Backlog::default();
        for (group, first) in &firsts {
            backlog.started(*first, *group);
        }
        for group in ["b", "a", "c"] {
            backlog.filled(group);
        }
        let write_due = |backlog: &mut Backlog<&str>, written: &mut Vec<String>| {
            backlog.write_due(None, 1_000, 2, |group| {
                written.push(group.to_string());
                Ok::<_, ()>(Some(firsts[group]))
            })
        };
        let mut written = Vec::new();
        // Two per append: c waits for the next one, and the low mark with it.
        assert_eq!(write_due(&mut backlog, &mut written), Ok(Some(3)));
        assert_eq!(written, ["b", "a"]);
        assert_eq!(
            write_due(&mut backlog, &mut written),
            Ok(None),
            "nothing waits and no newest: no mark to store"
        );
        assert_eq!(written, ["b", "a", "c"]);
    }
}
