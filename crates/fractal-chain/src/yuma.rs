//! Yuma consensus, one epoch, as subtensor's `epoch` runs it (the dense
//! form of `run_epoch.rs`, in f64 where subtensor uses I32F32 fixed point,
//! which is why results agree to about 1e-9 rather than bit for bit).
//!
//! Per epoch, with `S` the normalised active validator stake and `W` the
//! row-normalised weights of permitted validators:
//! 1. consensus `C_j` = the largest weight on `j` that validators holding
//!    at least `kappa` of the stake give (stake-weighted median);
//! 2. clipped weights `W'_ij = min(W_ij, C_j)`; ranks `R = Wᵀ' S`,
//!    trust `R / (Wᵀ S)`, incentive `R / ΣR`, validator trust `Σ_j W'_ij`;
//! 3. bonds: `ΔB_ij ∝ W'_ij S_i` (column-normalised), EMA with the previous
//!    bonds, column-normalised again;
//! 4. dividends `D_i ∝ Σ_j B_ij I_j`.
//!
//! The whole computation is a pure function of its input, in a fixed
//! iteration order, so every node that replays a chain gets the same result.

use crate::{BlockNumber, Uid};

/// What an epoch reads from the chain (index = uid).
#[derive(Debug, Clone)]
pub struct EpochInput {
    pub block: BlockNumber,
    /// Stake per uid in rao.
    pub stake: Vec<f64>,
    pub last_update: Vec<BlockNumber>,
    pub registered_at: Vec<BlockNumber>,
    /// Validator permits as decided by the previous epoch.
    pub validator_permit: Vec<bool>,
    /// Sparse weight rows: `weights[i]` = what uid `i` last set.
    pub weights: Vec<Vec<(Uid, u16)>>,
    /// Dense bonds from the previous epoch (`n × n`, may be all zero).
    pub bonds: Vec<Vec<f64>>,
    pub kappa: f64,
    pub bonds_moving_average: u64,
    pub activity_cutoff: u64,
    pub max_validators: u16,
}

/// What an epoch writes back (index = uid).
#[derive(Debug, Clone, PartialEq)]
pub struct EpochOutput {
    pub active: Vec<bool>,
    pub rank: Vec<f64>,
    pub trust: Vec<f64>,
    pub consensus: Vec<f64>,
    pub incentive: Vec<f64>,
    pub dividends: Vec<f64>,
    pub validator_trust: Vec<f64>,
    pub bonds: Vec<Vec<f64>>,
    pub validator_permit: Vec<bool>,
    /// Normalised active stake, used to pay validators when nobody earned.
    pub active_stake: Vec<f64>,
}

fn normalize(v: &mut [f64]) {
    let sum: f64 = v.iter().sum();
    if sum > 0.0 {
        v.iter_mut().for_each(|x| *x /= sum);
    }
}

fn col_normalize(m: &mut [Vec<f64>]) {
    let n = m.first().map_or(0, Vec::len);
    for j in 0..n {
        let sum: f64 = m.iter().map(|row| row[j]).sum();
        if sum > 0.0 {
            m.iter_mut().for_each(|row| row[j] /= sum);
        }
    }
}

/// Stake-weighted median of one column, subtensor's `weighted_median`:
/// the score `v` such that the stake strictly below `v` is at most
/// `1 - kappa` of the total and the stake at or below `v` exceeds it.
/// Equivalently the largest score that holders of at least `kappa` of the
/// stake give or exceed.
pub fn weighted_median(stake: &[f64], score: &[f64], kappa: f64) -> f64 {
    let mut pairs: Vec<(f64, f64)> = stake
        .iter()
        .zip(score)
        .filter(|(s, _)| **s > 0.0)
        .map(|(s, v)| (*v, *s))
        .collect();
    if pairs.is_empty() {
        return 0.0;
    }
    let total: f64 = pairs.iter().map(|p| p.1).sum();
    let minority = total - kappa * total;
    pairs.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut below_or_at = 0.0;
    let mut i = 0;
    while i < pairs.len() {
        let value = pairs[i].0;
        // Sum the whole tie group so equal scores act as one pivot.
        while i < pairs.len() && pairs[i].0 == value {
            below_or_at += pairs[i].1;
            i += 1;
        }
        if minority < below_or_at {
            return value;
        }
    }
    pairs.last().map_or(0.0, |p| p.0)
}

/// Top `k` uids by stake among those with non-zero stake (subtensor's
/// `is_topk_nonzero`); ties go to the lower uid.
pub fn top_k_nonzero(stake: &[f64], k: usize) -> Vec<bool> {
    let mut order: Vec<usize> = (0..stake.len()).filter(|&i| stake[i] > 0.0).collect();
    order.sort_by(|&a, &b| stake[b].total_cmp(&stake[a]).then(a.cmp(&b)));
    let mut permit = vec![false; stake.len()];
    for &i in order.iter().take(k) {
        permit[i] = true;
    }
    permit
}

pub fn epoch(input: &EpochInput) -> EpochOutput {
    let n = input.stake.len();
    let active: Vec<bool> = (0..n)
        .map(|i| input.last_update[i] + input.activity_cutoff >= input.block)
        .collect();

    let mut stake = input.stake.clone();
    normalize(&mut stake);
    let mut active_stake: Vec<f64> = (0..n)
        .map(|i| {
            if active[i] && input.validator_permit[i] {
                stake[i]
            } else {
                0.0
            }
        })
        .collect();
    normalize(&mut active_stake);

    // Weights of permitted validators, no self-weight, none on a uid that
    // registered after the validator last set them; rows sum to 1.
    let mut w = vec![vec![0.0f64; n]; n];
    for (i, row) in input.weights.iter().enumerate().take(n) {
        if !input.validator_permit[i] {
            continue;
        }
        for &(j, value) in row {
            let j = j as usize;
            if j >= n || j == i || input.last_update[i] <= input.registered_at[j] {
                continue;
            }
            w[i][j] = value as f64 / u16::MAX as f64;
        }
        normalize(&mut w[i]);
    }

    let column = |m: &[Vec<f64>], j: usize| -> Vec<f64> { m.iter().map(|row| row[j]).collect() };
    let weighted_sum =
        |m: &[Vec<f64>], j: usize| -> f64 { (0..n).map(|i| active_stake[i] * m[i][j]).sum() };

    let preranks: Vec<f64> = (0..n).map(|j| weighted_sum(&w, j)).collect();
    let consensus: Vec<f64> = (0..n)
        .map(|j| weighted_median(&active_stake, &column(&w, j), input.kappa))
        .collect();
    let clipped: Vec<Vec<f64>> = w
        .iter()
        .map(|row| row.iter().zip(&consensus).map(|(x, c)| x.min(*c)).collect())
        .collect();
    let validator_trust: Vec<f64> = clipped.iter().map(|row| row.iter().sum()).collect();
    let rank: Vec<f64> = (0..n).map(|j| weighted_sum(&clipped, j)).collect();
    let trust: Vec<f64> = rank
        .iter()
        .zip(&preranks)
        .map(|(r, p)| if *p > 0.0 { r / p } else { 0.0 })
        .collect();
    let mut incentive = rank.clone();
    normalize(&mut incentive);

    // Bonds: previous bonds without those on re-registered uids, then EMA
    // towards this epoch's stake-weighted clipped weights.
    let mut bonds: Vec<Vec<f64>> = (0..n)
        .map(|i| {
            (0..n)
                .map(|j| {
                    let prev = input.bonds.get(i).and_then(|r| r.get(j)).copied();
                    match prev {
                        Some(b) if input.last_update[i] > input.registered_at[j] => b,
                        _ => 0.0,
                    }
                })
                .collect()
        })
        .collect();
    col_normalize(&mut bonds);
    let mut delta: Vec<Vec<f64>> = (0..n)
        .map(|i| clipped[i].iter().map(|x| x * active_stake[i]).collect())
        .collect();
    col_normalize(&mut delta);
    let keep = input.bonds_moving_average as f64 / 1_000_000.0;
    let mut ema: Vec<Vec<f64>> = (0..n)
        .map(|i| {
            (0..n)
                .map(|j| (1.0 - keep) * delta[i][j] + keep * bonds[i][j])
                .collect()
        })
        .collect();
    col_normalize(&mut ema);

    let mut dividends: Vec<f64> = ema
        .iter()
        .map(|row| row.iter().zip(&incentive).map(|(b, inc)| b * inc).sum())
        .collect();
    normalize(&mut dividends);

    let validator_permit = top_k_nonzero(&stake, input.max_validators as usize);
    for (i, row) in ema.iter_mut().enumerate() {
        if !validator_permit[i] {
            row.iter_mut().for_each(|b| *b = 0.0);
        }
    }

    EpochOutput {
        active,
        rank,
        trust,
        consensus,
        incentive,
        dividends,
        validator_trust,
        bonds: ema,
        validator_permit,
        active_stake,
    }
}

/// How one epoch's emission is paid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payout {
    pub owner: u64,
    /// Per uid: miner share (by incentive) plus validator share (by dividends).
    pub neurons: Vec<u64>,
}

/// Splits `total` rao: `owner_cut` to the subnet owner, the rest half to
/// miners by incentive and half to validators by dividends (subtensor
/// normalises by `Σ incentive + Σ dividends`). When nobody earned anything
/// the validators' share follows active stake, as subtensor does.
/// Rounding dust goes to the owner so nothing is created or lost.
pub fn payout(total: u64, owner_cut: f64, out: &EpochOutput) -> Payout {
    let owner_share = (total as f64 * owner_cut.clamp(0.0, 1.0)).floor() as u64;
    let rest = (total - owner_share) as f64;
    let n = out.incentive.len();
    let sum: f64 = out.incentive.iter().sum::<f64>() + out.dividends.iter().sum::<f64>();
    let mut neurons = vec![0u64; n];
    if sum > 0.0 {
        for (i, slot) in neurons.iter_mut().enumerate() {
            *slot = ((out.incentive[i] + out.dividends[i]) / sum * rest).floor() as u64;
        }
    } else if out.active_stake.iter().any(|s| *s > 0.0) {
        for (i, slot) in neurons.iter_mut().enumerate() {
            *slot = (out.active_stake[i] * rest).floor() as u64;
        }
    }
    let paid: u64 = neurons.iter().sum();
    Payout {
        owner: total - paid,
        neurons,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: u16 = u16::MAX;

    /// `n` neurons, all registered at block 0, weights set at block 1,
    /// permits for those with stake; epoch at block 10.
    fn input(stake: &[f64], weights: Vec<Vec<(Uid, u16)>>) -> EpochInput {
        let n = stake.len();
        EpochInput {
            block: 10,
            stake: stake.to_vec(),
            last_update: vec![1; n],
            registered_at: vec![0; n],
            validator_permit: stake.iter().map(|s| *s > 0.0).collect(),
            weights,
            bonds: vec![vec![0.0; n]; n],
            kappa: 0.5,
            bonds_moving_average: 900_000,
            activity_cutoff: 5000,
            max_validators: 64,
        }
    }

    fn close(a: &[f64], b: &[f64]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= 1e-6, "{a:?} != {b:?}");
        }
    }

    #[test]
    fn weighted_median_is_the_largest_value_kappa_of_the_stake_supports() {
        // Half the stake at 0.2, half at 0.8: kappa 0.5 is just met at 0.8.
        assert_eq!(weighted_median(&[0.5, 0.5], &[0.2, 0.8], 0.5), 0.8);
        // 60% at 0.2: 0.8 has only 40% support.
        assert_eq!(weighted_median(&[0.6, 0.4], &[0.2, 0.8], 0.5), 0.2);
        assert_eq!(
            weighted_median(&[0.3, 0.3, 0.4], &[0.9, 0.1, 0.5], 0.5),
            0.5
        );
        // Zero-stake voters do not count.
        assert_eq!(weighted_median(&[0.0, 1.0], &[1.0, 0.3], 0.5), 0.3);
        assert_eq!(weighted_median(&[0.0, 0.0], &[1.0, 0.3], 0.5), 0.0);
    }

    #[test]
    fn two_agreeing_validators_share_dividends_by_stake() {
        // uids 0,1 validators (stake 3:1), uids 2,3 miners; both validators
        // weight miner 2 three times miner 3.
        let w = vec![
            vec![(2, FULL), (3, FULL / 3)],
            vec![(2, FULL), (3, FULL / 3)],
            vec![],
            vec![],
        ];
        let out = epoch(&input(&[3.0, 1.0, 0.0, 0.0], w));
        close(&out.incentive, &[0.0, 0.0, 0.75, 0.25]);
        close(&out.consensus, &[0.0, 0.0, 0.75, 0.25]);
        close(&out.trust, &[0.0, 0.0, 1.0, 1.0]);
        close(&out.validator_trust, &[1.0, 1.0, 0.0, 0.0]);
        // Bonds follow stake (3:1) on every miner, so dividends do too.
        close(&out.dividends, &[0.75, 0.25, 0.0, 0.0]);
        close(
            &out.bonds.iter().map(|r| r[2]).collect::<Vec<_>>(),
            &[0.75, 0.25, 0.0, 0.0],
        );
    }

    #[test]
    fn a_lone_outlier_validator_is_clipped_and_loses_dividends() {
        // Validators 0 and 1 (40% each) back miner 3; validator 2 (20%)
        // alone backs miner 4. Kappa 0.5: miner 4's consensus is 0.
        let w = vec![
            vec![(3, FULL)],
            vec![(3, FULL)],
            vec![(4, FULL)],
            vec![],
            vec![],
        ];
        let out = epoch(&input(&[0.4, 0.4, 0.2, 0.0, 0.0], w));
        close(&out.consensus, &[0.0, 0.0, 0.0, 1.0, 0.0]);
        close(&out.incentive, &[0.0, 0.0, 0.0, 1.0, 0.0]);
        close(&out.validator_trust, &[1.0, 1.0, 0.0, 0.0, 0.0]);
        close(&out.dividends, &[0.5, 0.5, 0.0, 0.0, 0.0]);
        // Miner 4 got weight, but none of it survives clipping.
        close(&out.trust, &[0.0, 0.0, 0.0, 1.0, 0.0]);
        close(&out.rank, &[0.0, 0.0, 0.0, 0.8, 0.0]);
    }

    #[test]
    fn partial_outlier_is_clipped_to_consensus() {
        // Validator 0 (70%): miners 2,3 evenly. Validator 1 (30%): all on 3.
        // Consensus: miner 2 → 0.5 (70% support), miner 3 → 0.5 (70% give ≥ 0.5).
        let w = vec![vec![(2, FULL), (3, FULL)], vec![(3, FULL)], vec![], vec![]];
        let out = epoch(&input(&[0.7, 0.3, 0.0, 0.0], w));
        close(&out.consensus, &[0.0, 0.0, 0.5, 0.5]);
        // Validator 1's 1.0 on miner 3 is clipped to 0.5.
        close(&out.validator_trust, &[1.0, 0.5, 0.0, 0.0]);
        // ranks: miner2 = 0.7*0.5 = 0.35; miner3 = 0.7*0.5 + 0.3*0.5 = 0.5
        close(&out.rank, &[0.0, 0.0, 0.35, 0.5]);
        close(&out.incentive, &[0.0, 0.0, 0.35 / 0.85, 0.5 / 0.85]);
        // preranks: miner3 = 0.35 + 0.3 = 0.65 → trust 0.5/0.65
        close(&out.trust, &[0.0, 0.0, 1.0, 0.5 / 0.65]);
        // Bonds: miner2 all validator 0; miner3 0.35:0.15 → 0.7:0.3.
        let i2 = 0.35 / 0.85;
        let i3 = 0.5 / 0.85;
        close(&out.dividends, &[i2 + 0.7 * i3, 0.3 * i3, 0.0, 0.0]);
    }

    #[test]
    fn bonds_are_an_ema_so_early_supporters_earn_more() {
        // Epoch 1: only validator 0 backs miner 2. Epoch 2: both (equal stake).
        let mut first = input(&[1.0, 1.0, 0.0], vec![vec![(2, FULL)], vec![], vec![]]);
        first.last_update = vec![1, 0, 0];
        first.registered_at = vec![0, 0, 0];
        // Validator 1 has never set weights (last_update 0 ≤ registration 0).
        let out1 = epoch(&first);
        close(
            &out1.bonds.iter().map(|r| r[2]).collect::<Vec<_>>(),
            &[1.0, 0.0, 0.0],
        );
        let mut second = input(
            &[1.0, 1.0, 0.0],
            vec![vec![(2, FULL)], vec![(2, FULL)], vec![]],
        );
        second.bonds = out1.bonds.clone();
        second.block = 20;
        second.last_update = vec![11, 11, 0];
        let out2 = epoch(&second);
        // ΔB = [0.5, 0.5]; B = 0.1·ΔB + 0.9·[1, 0] = [0.95, 0.05].
        close(
            &out2.bonds.iter().map(|r| r[2]).collect::<Vec<_>>(),
            &[0.95, 0.05, 0.0],
        );
        close(&out2.dividends, &[0.95, 0.05, 0.0]);
    }

    #[test]
    fn inactive_and_unpermitted_validators_do_not_count() {
        let w = vec![vec![(2, FULL)], vec![(3, FULL)], vec![], vec![]];
        let mut inp = input(&[1.0, 9.0, 0.0, 0.0], w.clone());
        // Validator 1 holds most stake but last set weights long ago.
        inp.block = 6000;
        inp.last_update = vec![5990, 1, 0, 0];
        let out = epoch(&inp);
        assert_eq!(out.active, vec![true, false, false, false]);
        close(&out.incentive, &[0.0, 0.0, 1.0, 0.0]);
        // Without a permit, validator 1's weights are ignored too.
        let mut inp = input(&[1.0, 9.0, 0.0, 0.0], w);
        inp.validator_permit = vec![true, false, false, false];
        let out = epoch(&inp);
        close(&out.incentive, &[0.0, 0.0, 1.0, 0.0]);
        // ...and it gains a permit for the next epoch from its stake.
        assert_eq!(out.validator_permit, vec![true, true, false, false]);
    }

    #[test]
    fn weights_on_a_newly_registered_uid_are_ignored_until_refreshed() {
        // Validator 0 set weights at block 5; uid 2 re-registered at block 7
        // (a new hotkey took the slot), so the old weight must not count.
        let mut inp = input(
            &[1.0, 0.0, 0.0],
            vec![vec![(1, FULL), (2, FULL)], vec![], vec![]],
        );
        inp.last_update = vec![5, 0, 0];
        inp.registered_at = vec![0, 0, 7];
        let out = epoch(&inp);
        close(&out.incentive, &[0.0, 1.0, 0.0]);
    }

    #[test]
    fn permits_go_to_the_top_k_nonzero_stakes() {
        assert_eq!(
            top_k_nonzero(&[5.0, 0.0, 7.0, 5.0], 2),
            vec![true, false, true, false]
        );
        assert_eq!(top_k_nonzero(&[0.0, 0.0], 64), vec![false, false]);
    }

    #[test]
    fn payout_splits_owner_miners_validators_and_conserves_rao() {
        let w = vec![vec![(2, FULL)], vec![(2, FULL)], vec![]];
        let out = epoch(&input(&[1.0, 1.0, 0.0], w));
        let p = payout(10_000_000_000, 0.18, &out);
        // 18% owner; of the 82%: miner 2 half, validators a quarter each.
        assert_eq!(p.neurons, vec![2_050_000_000, 2_050_000_000, 4_100_000_000]);
        assert_eq!(p.owner, 1_800_000_000);
        assert_eq!(p.owner + p.neurons.iter().sum::<u64>(), 10_000_000_000);
        // Nobody earned: validators are paid by active stake.
        let idle = epoch(&input(&[3.0, 1.0, 0.0], vec![vec![], vec![], vec![]]));
        let p = payout(1000, 0.0, &idle);
        assert_eq!(p.neurons, vec![750, 250, 0]);
    }
}
