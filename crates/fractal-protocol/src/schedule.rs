//! The subnet's model schedule: which manifests the grid serves, from and
//! until which block.
//!
//! The subnet owner publishes it on chain and every role reads it. It only
//! ever grows by an [`Upgrade`]: "from block N serve B; what was served
//! before stays served until N + grace, then retires". So at any block at
//! most two models are served, the newest one *active* and its predecessor
//! *retiring* during the grace period, which is what lets provers restart
//! onto the new model one at a time while apps keep getting videos.
//!
//! Before the first entry starts (or with no entry at all) the schedule pins
//! nothing and each node serves what it was started with.

use serde::{Deserialize, Serialize};

use crate::ManifestId;

/// The longest a schedule may grow: retired entries are history, kept so
/// `fractal manifest show` can tell what the grid ran; this bounds the
/// document every role reads.
pub const MAX_ENTRIES: usize = 64;

/// One manifest the subnet serves over a span of blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduledModel {
    pub manifest: ManifestId,
    /// The first block it is served at.
    pub from_block: u64,
    /// The first block it is no longer served at; `None` until a newer
    /// model is scheduled after it.
    pub until_block: Option<u64>,
}

/// Where a scheduled model stands at a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelState {
    /// Scheduled, not served yet.
    Pending,
    /// Served, and the newest model served.
    Active,
    /// Still served, but a newer model is active: its grace period.
    Retiring,
    /// No longer served.
    Retired,
}

impl ModelState {
    /// Whether provers are expected to serve it (and are scored on it).
    pub fn is_served(self) -> bool {
        matches!(self, ModelState::Active | ModelState::Retiring)
    }

    pub fn name(self) -> &'static str {
        match self {
            ModelState::Pending => "pending",
            ModelState::Active => "active",
            ModelState::Retiring => "retiring",
            ModelState::Retired => "retired",
        }
    }
}

/// The owner's one kind of change: from `at_block`, serve `manifest`; every
/// model served before it stays served until `at_block + grace_blocks`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upgrade {
    pub manifest: ManifestId,
    pub at_block: u64,
    pub grace_blocks: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleError {
    #[error(
        "block {at} is not in the future (the chain is at block {now}); schedule a later block"
    )]
    Past { at: u64, now: u64 },
    #[error("manifest {0} is already in the schedule; a model is scheduled once (publish a new manifest to serve it again)")]
    AlreadyScheduled(ManifestId),
    #[error("block {at} overlaps the upgrade to {previous} at block {previous_from}, which is served until block {previous_until}; schedule at block {previous_until} or later")]
    Overlaps {
        at: u64,
        previous: ManifestId,
        previous_from: u64,
        previous_until: u64,
    },
    #[error("a grace period of 0 blocks gives provers no time to move over; give at least 1")]
    NoGrace,
    #[error("block arithmetic overflows at block {0}")]
    Overflow(u64),
    #[error("the schedule already holds {MAX_ENTRIES} entries")]
    Full,
    #[error("malformed schedule: {0}")]
    Malformed(String),
}

/// The whole schedule, entries in the order they start.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSchedule {
    pub entries: Vec<ScheduledModel>,
}

impl ModelSchedule {
    /// The state of entry `i` at `block`.
    fn state_of(&self, i: usize, block: u64) -> ModelState {
        let e = &self.entries[i];
        if block < e.from_block {
            ModelState::Pending
        } else if e.until_block.is_some_and(|u| block >= u) {
            ModelState::Retired
        } else if self.entries[i + 1..].iter().any(|n| n.from_block <= block) {
            ModelState::Retiring
        } else {
            ModelState::Active
        }
    }

    /// Every entry with its state at `block`, in schedule order.
    pub fn at(&self, block: u64) -> Vec<(ScheduledModel, ModelState)> {
        (0..self.entries.len())
            .map(|i| (self.entries[i], self.state_of(i, block)))
            .collect()
    }

    /// The manifests served at `block`, newest first.
    pub fn served_at(&self, block: u64) -> Vec<(ManifestId, ModelState)> {
        let mut served: Vec<_> = self
            .at(block)
            .into_iter()
            .filter(|(_, s)| s.is_served())
            .map(|(e, s)| (e.manifest, s))
            .collect();
        served.reverse();
        served
    }

    /// The newest model served at `block`: what a new job gets by default.
    pub fn active_at(&self, block: u64) -> Option<ManifestId> {
        self.served_at(block).first().map(|(id, _)| *id)
    }

    /// Where `manifest` stands at `block`; `None` when it was never scheduled.
    pub fn state(&self, manifest: &ManifestId, block: u64) -> Option<ModelState> {
        let i = self.entries.iter().position(|e| &e.manifest == manifest)?;
        Some(self.state_of(i, block))
    }

    /// Whether the schedule pins anything at `block`; when it does not,
    /// nodes serve what they were started with.
    pub fn pins_anything_at(&self, block: u64) -> bool {
        self.active_at(block).is_some()
    }

    /// The schedule after `up`, checked against the chain's block `now`.
    pub fn with_upgrade(&self, up: Upgrade, now: u64) -> Result<ModelSchedule, ScheduleError> {
        if up.at_block <= now {
            return Err(ScheduleError::Past {
                at: up.at_block,
                now,
            });
        }
        if self.entries.iter().any(|e| e.manifest == up.manifest) {
            return Err(ScheduleError::AlreadyScheduled(up.manifest));
        }
        if up.grace_blocks == 0 {
            return Err(ScheduleError::NoGrace);
        }
        if self.entries.len() >= MAX_ENTRIES {
            return Err(ScheduleError::Full);
        }
        let until = up
            .at_block
            .checked_add(up.grace_blocks)
            .ok_or(ScheduleError::Overflow(up.at_block))?;
        if let Some(last) = self.entries.last() {
            // Only one move at a time: the last upgrade must have started,
            // and the model it replaced retired, before the next starts.
            let busy_until = self
                .entries
                .iter()
                .filter_map(|e| e.until_block)
                .max()
                .unwrap_or(0)
                .max(last.from_block.saturating_add(1));
            if up.at_block < busy_until {
                return Err(ScheduleError::Overlaps {
                    at: up.at_block,
                    previous: last.manifest,
                    previous_from: last.from_block,
                    previous_until: busy_until,
                });
            }
        }
        let mut next = self.clone();
        for e in &mut next.entries {
            if e.until_block.is_none() {
                e.until_block = Some(until);
            }
        }
        next.entries.push(ScheduledModel {
            manifest: up.manifest,
            from_block: up.at_block,
            until_block: None,
        });
        next.validate()?;
        Ok(next)
    }

    /// Checks what [`ModelSchedule::with_upgrade`] guarantees, for a
    /// schedule read from elsewhere (a chain, a file).
    pub fn validate(&self) -> Result<(), ScheduleError> {
        let bad = |m: String| Err(ScheduleError::Malformed(m));
        if self.entries.len() > MAX_ENTRIES {
            return Err(ScheduleError::Full);
        }
        for (i, e) in self.entries.iter().enumerate() {
            if self.entries[..i].iter().any(|p| p.manifest == e.manifest) {
                return bad(format!("manifest {} appears twice", e.manifest));
            }
            if e.until_block.is_some_and(|u| u <= e.from_block) {
                return bad(format!(
                    "manifest {} ends at or before it starts",
                    e.manifest
                ));
            }
            let last = i + 1 == self.entries.len();
            if last != e.until_block.is_none() {
                return bad(format!(
                    "only the newest entry is open-ended (entry {i} of {})",
                    self.entries.len()
                ));
            }
            if let Some(next) = self.entries.get(i + 1) {
                if next.from_block <= e.from_block {
                    return bad("entries must start in increasing block order".into());
                }
                if e.until_block.is_some_and(|u| u < next.from_block) {
                    return bad(format!(
                        "a gap between {} and {}: nothing would be served",
                        e.manifest, next.manifest
                    ));
                }
            }
        }
        // At most two served at once.
        for e in &self.entries {
            if self.served_at(e.from_block).len() > 2 {
                return bad(format!(
                    "more than two models served at block {}",
                    e.from_block
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Digest32;

    fn id(i: u8) -> ManifestId {
        ManifestId(Digest32([i; 32]))
    }

    fn up(i: u8, at_block: u64, grace_blocks: u64) -> Upgrade {
        Upgrade {
            manifest: id(i),
            at_block,
            grace_blocks,
        }
    }

    #[test]
    fn an_upgrade_moves_from_one_model_to_the_next_over_the_grace_period() {
        let s = ModelSchedule::default()
            .with_upgrade(up(1, 5, 10), 0)
            .unwrap();
        assert!(!s.pins_anything_at(4), "nothing pinned before the start");
        assert_eq!(s.served_at(5), vec![(id(1), ModelState::Active)]);
        let s = s.with_upgrade(up(2, 100, 20), 50).unwrap();
        assert_eq!(s.served_at(99), vec![(id(1), ModelState::Active)]);
        assert_eq!(s.state(&id(2), 99), Some(ModelState::Pending));
        assert_eq!(
            s.served_at(100),
            vec![(id(2), ModelState::Active), (id(1), ModelState::Retiring)]
        );
        assert_eq!(s.active_at(119), Some(id(2)));
        assert_eq!(s.served_at(120), vec![(id(2), ModelState::Active)]);
        assert_eq!(s.state(&id(1), 120), Some(ModelState::Retired));
        assert_eq!(s.state(&id(3), 120), None);
        s.validate().unwrap();
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<ModelSchedule>(&json).unwrap(), s);
    }

    #[test]
    fn bad_upgrades_are_refused_by_name() {
        let s = ModelSchedule::default()
            .with_upgrade(up(1, 5, 10), 0)
            .unwrap()
            .with_upgrade(up(2, 100, 20), 50)
            .unwrap();
        assert_eq!(
            s.with_upgrade(up(3, 50, 5), 50),
            Err(ScheduleError::Past { at: 50, now: 50 })
        );
        assert_eq!(
            s.with_upgrade(up(2, 200, 5), 50),
            Err(ScheduleError::AlreadyScheduled(id(2)))
        );
        assert_eq!(
            s.with_upgrade(up(3, 110, 5), 50),
            Err(ScheduleError::Overlaps {
                at: 110,
                previous: id(2),
                previous_from: 100,
                previous_until: 120
            })
        );
        assert_eq!(
            s.with_upgrade(up(3, 200, 0), 50),
            Err(ScheduleError::NoGrace)
        );
        assert_eq!(
            s.with_upgrade(up(3, u64::MAX, 5), 50),
            Err(ScheduleError::Overflow(u64::MAX))
        );
        // Exactly at the end of the grace period is fine.
        let s = s.with_upgrade(up(3, 120, 5), 50).unwrap();
        assert_eq!(s.served_at(121).len(), 2);
        // A pending first entry cannot be overtaken by an earlier one.
        let p = ModelSchedule::default()
            .with_upgrade(up(1, 100, 10), 0)
            .unwrap();
        assert!(matches!(
            p.with_upgrade(up(2, 50, 10), 0),
            Err(ScheduleError::Overlaps { .. })
        ));
    }

    #[test]
    fn validation_refuses_what_upgrades_cannot_build() {
        let e = |m, from_block, until_block| ScheduledModel {
            manifest: id(m),
            from_block,
            until_block,
        };
        let cases = [
            vec![e(1, 5, None), e(2, 9, None)],
            vec![e(1, 5, Some(20)), e(2, 9, Some(30))],
            vec![e(1, 5, Some(20)), e(1, 9, None)],
            vec![e(1, 9, Some(20)), e(2, 5, None)],
            vec![e(1, 5, Some(8)), e(2, 9, None)],
            vec![e(1, 5, Some(5)), e(2, 5, None)],
            vec![e(1, 5, Some(50)), e(2, 9, Some(50)), e(3, 10, None)],
        ];
        for entries in cases {
            let s = ModelSchedule { entries };
            assert!(
                matches!(s.validate(), Err(ScheduleError::Malformed(_))),
                "{s:?}"
            );
        }
    }

    #[test]
    fn the_schedule_is_bounded() {
        let mut s = ModelSchedule::default();
        for i in 0..MAX_ENTRIES as u64 {
            s = s.with_upgrade(up(i as u8, 10 * i + 10, 1), 0).unwrap();
        }
        assert_eq!(
            s.with_upgrade(up(200, 10_000, 1), 0),
            Err(ScheduleError::Full)
        );
    }
}
