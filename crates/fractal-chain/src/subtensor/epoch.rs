//! Which block a timelocked weight commit will be revealed at.
//!
//! Subtensor's epochs are stateful: an epoch runs when `tempo` blocks have
//! passed since the last one (`LastEpochBlock`), earlier when the subnet
//! owner scheduled one (`PendingEpochAt`), and unconditionally when the
//! subnet has gone too long without a step (`BlocksSinceLastStep`). Each
//! block, the chain first reveals the timelocked commits whose reveal epoch
//! has come (counting an epoch that is about to run in this block), then runs
//! the coinbase, which may run the epoch. A commit made in epoch `e` is
//! revealed in the first block whose pre-coinbase epoch is
//! `e + RevealPeriodEpochs`.
//!
//! We replay that per block from the storage read at the chain head, as the
//! reference SDK does (bittensor 11.3.0 through `get_encrypted_commit_v2`),
//! so the drand round we encrypt to is the one the chain will have ingested
//! when the reveal block comes.

/// Subtensor's upper bound on a subnet's tempo, in blocks; also how long a
/// subnet may go without a step before an epoch is forced.
pub const MAX_TEMPO: u64 = 50_400;

/// A commit is sent against the chain head and lands in the next block.
pub const INCLUSION_DELAY_BLOCKS: u64 = 1;

/// A subnet's epoch bookkeeping at one block (`SubtensorModule` storage).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochState {
    /// The block the state was read at.
    pub block: u64,
    pub tempo: u16,
    /// `LastEpochBlock`.
    pub last_epoch_block: u64,
    /// `PendingEpochAt`: an owner-triggered epoch, 0 if none.
    pub pending_epoch_at: u64,
    /// `SubnetEpochIndex`: epochs run so far.
    pub epoch_index: u64,
    /// `BlocksSinceLastStep`.
    pub blocks_since_last_step: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error("the subnet's tempo is 0: it runs no epochs, so a commit would never be revealed")]
    NoEpochs,
    #[error("no reveal block within {0} blocks of the head")]
    TooFar(u64),
}

impl EpochState {
    /// Whether the coinbase at `block` runs an epoch.
    fn epoch_due(&self, block: u64) -> bool {
        if self.tempo == 0 {
            return false;
        }
        let owner_triggered = self.pending_epoch_at != 0 && block >= self.pending_epoch_at;
        let starved = self.blocks_since_last_step > MAX_TEMPO;
        let tempo_passed = block.saturating_sub(self.last_epoch_block) >= u64::from(self.tempo);
        owner_triggered || starved || tempo_passed
    }

    /// The epoch the reveal step sees at `block`: it runs before the
    /// coinbase, and counts an epoch that is due in this block.
    fn epoch_before_coinbase(&self, block: u64) -> u64 {
        self.epoch_index + u64::from(self.epoch_due(block))
    }

    /// The state after the coinbase of `block`.
    fn after_coinbase(mut self, block: u64) -> Self {
        self.block = block;
        self.blocks_since_last_step += 1;
        if self.epoch_due(block) {
            self.last_epoch_block = block;
            self.pending_epoch_at = 0;
            self.epoch_index += 1;
            self.blocks_since_last_step = 0;
        }
        self
    }

    /// The first block at which the chain reveals a commit sent now (read at
    /// `self.block`, included [`INCLUSION_DELAY_BLOCKS`] later), for a subnet
    /// whose `RevealPeriodEpochs` is `reveal_period`.
    pub fn first_reveal_block(&self, reveal_period: u64) -> Result<u64, ScheduleError> {
        if self.tempo == 0 {
            return Err(ScheduleError::NoEpochs);
        }
        let inclusion = self.block + INCLUSION_DELAY_BLOCKS;
        let mut state = *self;
        for b in self.block + 1..inclusion {
            state = state.after_coinbase(b);
        }
        // The commit extrinsic runs after the coinbase of its block, but the
        // chain files it under the epoch the reveal step saw there.
        let target = state.epoch_before_coinbase(inclusion) + reveal_period;
        let horizon = reveal_period
            .saturating_mul(MAX_TEMPO)
            .saturating_add(MAX_TEMPO);
        for b in inclusion..=inclusion.saturating_add(horizon) {
            if state.epoch_before_coinbase(b) == target {
                return Ok(b);
            }
            state = state.after_coinbase(b);
        }
        Err(ScheduleError::TooFar(horizon))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(block: u64, tempo: u16, last: u64) -> EpochState {
        EpochState {
            block,
            tempo,
            last_epoch_block: last,
            pending_epoch_at: 0,
            epoch_index: 7,
            blocks_since_last_step: block - last,
        }
    }

    #[test]
    fn reveal_comes_reveal_period_epochs_after_the_commit_epoch() {
        // Epochs at 100, 150, 200, ...: a commit landing at 121 is in epoch 7
        // and revealed when epoch 8 (period 1) or 9 (period 2) starts.
        let s = state(120, 50, 100);
        assert_eq!(s.first_reveal_block(1), Ok(150));
        assert_eq!(s.first_reveal_block(2), Ok(200));
    }

    #[test]
    fn a_commit_landing_in_an_epoch_block_counts_in_the_new_epoch() {
        // The head is 149, the commit lands in 150, where epoch 8 runs.
        assert_eq!(state(149, 50, 100).first_reveal_block(1), Ok(200));
    }

    #[test]
    fn an_owner_triggered_epoch_moves_the_reveal_earlier() {
        let mut s = state(120, 50, 100);
        s.pending_epoch_at = 130;
        assert_eq!(s.first_reveal_block(1), Ok(130));
        // After it the tempo counts from the triggered epoch.
        assert_eq!(s.first_reveal_block(2), Ok(180));
    }

    #[test]
    fn a_subnet_without_epochs_is_refused() {
        assert_eq!(
            state(120, 0, 100).first_reveal_block(1),
            Err(ScheduleError::NoEpochs)
        );
    }
}
