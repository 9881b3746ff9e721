//! Ordered commit tracking for offset-based brokers (Kafka partitions).
//!
//! Messages of one partition are processed concurrently, so they finish out of order; but a
//! Kafka commit of offset `n` says "everything below `n` is done". Committing the offset of
//! whatever finished last would skip a message still in flight, and a crash would then lose
//! it. The tracker commits only up to the first gap: the committable position is one past the
//! highest offset below which every started message is done.

use std::collections::BTreeSet;

/// One partition's in-flight offsets.
#[derive(Debug, Default, Clone)]
pub struct CommitTracker {
    /// Started and not yet done.
    in_flight: BTreeSet<i64>,
    /// Done while something below them is still in flight.
    done_above_gap: BTreeSet<i64>,
    /// The highest offset started so far.
    highest_started: Option<i64>,
    /// The first offset ever started: committing it would record no progress.
    first_started: Option<i64>,
    /// The position last returned by [`CommitTracker::committable`] (next offset to read).
    committed: Option<i64>,
}

impl CommitTracker {
    /// An empty tracker.
    pub fn new() -> CommitTracker {
        CommitTracker::default()
    }

    /// A message at `offset` started processing. Offsets must be started in increasing order
    /// (the order the partition delivers them); a repeat or a lower offset is ignored, since
    /// after a rebalance the broker may redeliver what was already started.
    pub fn start(&mut self, offset: i64) {
        if self.highest_started.is_some_and(|h| offset <= h) {
            return;
        }
        self.highest_started = Some(offset);
        self.first_started.get_or_insert(offset);
        self.in_flight.insert(offset);
    }

    /// The message at `offset` is done (its effect committed, or dead-lettered).
    pub fn done(&mut self, offset: i64) {
        if self.in_flight.remove(&offset) {
            self.done_above_gap.insert(offset);
        }
        // Everything done below the lowest in-flight offset no longer needs remembering.
        let floor = self.in_flight.first().copied().unwrap_or(i64::MAX);
        self.done_above_gap = self.done_above_gap.split_off(&floor);
    }

    /// The position to commit (the next offset to read), if it moved since the last call:
    /// one past the highest offset with nothing in flight at or below it.
    pub fn committable(&mut self) -> Option<i64> {
        let high = self.highest_started?;
        let position = match self.in_flight.first() {
            Some(&lowest) => lowest,
            None => high + 1,
        };
        let last = self.committed.or(self.first_started)?;
        if position <= last {
            return None;
        }
        self.committed = Some(position);
        Some(position)
    }

    /// The current position (next offset to read) if any progress was made, whether or not
    /// it was returned by [`CommitTracker::committable`] before: what a synchronous commit on
    /// partition revoke writes.
    pub fn position(&self) -> Option<i64> {
        let high = self.highest_started?;
        let position = self.in_flight.first().copied().unwrap_or(high + 1);
        (position > self.first_started?).then_some(position)
    }

    /// Offsets started and not done.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_gap_holds_the_commit_back_until_it_closes() {
        let mut t = CommitTracker::new();
        for o in 10..15 {
            t.start(o);
        }
        t.done(12);
        t.done(13);
        assert_eq!(
            t.committable(),
            None,
            "10 is still in flight: no progress to commit"
        );
        assert_eq!(t.position(), None);
        t.done(10);
        assert_eq!(t.committable(), Some(11));
        t.done(11);
        assert_eq!(t.committable(), Some(14), "11–13 done, 14 in flight");
        t.done(14);
        assert_eq!(t.position(), Some(15));
        assert_eq!(
            t.committable(),
            Some(15),
            "everything done: read from 15 next"
        );
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn redelivered_offsets_are_ignored() {
        let mut t = CommitTracker::new();
        t.start(5);
        t.start(5);
        t.start(3);
        t.done(5);
        assert_eq!(t.committable(), Some(6));
    }

    proptest! {
        /// Whatever order messages finish in, the committed position never passes an offset
        /// that is still in flight, and ends one past the last offset.
        #[test]
        fn random_completion_order_never_commits_past_a_gap(
            n in 1usize..60,
            order in proptest::collection::vec(any::<u16>(), 60),
        ) {
            let mut t = CommitTracker::new();
            let base = 1000i64;
            for i in 0..n {
                t.start(base + i as i64);
            }
            let mut pending: Vec<i64> = (0..n).map(|i| base + i as i64).collect();
            let mut done: std::collections::BTreeSet<i64> = Default::default();
            let mut k = 0;
            while !pending.is_empty() {
                let pick = usize::from(order[k % order.len()]) % pending.len();
                k += 1;
                let offset = pending.swap_remove(pick);
                t.done(offset);
                done.insert(offset);
                if let Some(pos) = t.committable() {
                    // Every offset below the committed position is done.
                    for o in base..pos {
                        prop_assert!(done.contains(&o), "committed {pos} past unfinished {o}");
                    }
                }
            }
            prop_assert_eq!(t.committable().unwrap_or(base + n as i64), base + n as i64);
        }
    }
}
