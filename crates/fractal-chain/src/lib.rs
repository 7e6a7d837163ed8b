//! The chain Fractal nodes meet on.
//!
//! * [`Chain`]: what provers, verifiers and the gateway need from a chain —
//!   block number, metagraph, register, serve_axon, set_weights, add_stake.
//! * [`local::LocalChain`]: the embedded default, a one-subnet chain kept in
//!   SQLite that produces blocks and runs [`yuma`] consensus every tempo.
//! * [`server`] / [`remote::RemoteChain`]: the local chain over HTTP on
//!   loopback (`fractal chain serve`), so several processes share one chain.
//!   Reads are open; every state change is a btauth/1-signed request.
//! * [`subtensor::SubtensorChain`] (feature `subtensor`): one subnet of a
//!   real Bittensor node over subxt, with commit-reveal weights.
//!
//! Amounts are in rao (1 TAO = 10^9 rao), as on Bittensor.

pub mod local;
pub mod remote;
pub mod server;
#[cfg(feature = "subtensor")]
pub mod subtensor;
pub mod yuma;

use std::net::IpAddr;

use async_trait::async_trait;
use fractal_protocol::schedule::ScheduleError;
use fractal_protocol::{Hotkey, Keypair, ManifestId, ModelManifest, ModelSchedule, Upgrade};
use serde::{Deserialize, Serialize};

pub use local::LocalChain;
pub use remote::RemoteChain;

pub type BlockNumber = u64;
pub type Uid = u16;

/// An amount in rao.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Rao(pub u64);

impl Rao {
    pub const PER_TAO: u64 = 1_000_000_000;
    pub fn from_tao(tao: f64) -> Option<Rao> {
        let rao = tao * Self::PER_TAO as f64;
        (rao.is_finite() && rao >= 0.0 && rao <= u64::MAX as f64).then(|| Rao(rao.round() as u64))
    }
    pub fn as_tao(self) -> f64 {
        self.0 as f64 / Self::PER_TAO as f64
    }
}

impl std::fmt::Display for Rao {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "τ{:.4}", self.as_tao())
    }
}

/// Where a neuron serves (Bittensor's `AxonInfo`, reduced to what HTTP needs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AxonInfo {
    pub ip: IpAddr,
    pub port: u16,
    /// The node's software version, for operators; not checked by the chain.
    pub version: u32,
}

impl AxonInfo {
    pub fn base_url(&self) -> String {
        match self.ip {
            IpAddr::V4(ip) => format!("http://{ip}:{}", self.port),
            IpAddr::V6(ip) => format!("http://[{ip}]:{}", self.port),
        }
    }
}

/// One row of the metagraph.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NeuronInfo {
    pub uid: Uid,
    pub hotkey: Hotkey,
    pub coldkey: Hotkey,
    pub stake: Rao,
    pub axon: Option<AxonInfo>,
    pub validator_permit: bool,
    pub rank: f64,
    pub trust: f64,
    pub consensus: f64,
    pub incentive: f64,
    pub dividends: f64,
    pub validator_trust: f64,
    /// Emission earned in the last epoch.
    pub emission: Rao,
    pub registered_at: BlockNumber,
    pub last_update: BlockNumber,
}

/// The subnet's rules, fixed when a local chain is created.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hyperparams {
    pub netuid: u16,
    pub max_uids: u16,
    pub max_validators: u16,
    /// Blocks between epochs; Yuma runs when `block % tempo == 0`.
    pub tempo: u64,
    /// New neurons cannot be pruned for this many blocks.
    pub immunity_period: u64,
    /// Neurons whose last weights are older than this are inactive.
    pub activity_cutoff: u64,
    /// Minimum blocks between two `set_weights` of one hotkey.
    pub weights_rate_limit: u64,
    /// `set_weights` must carry a version key at least this large.
    pub weights_version_key: u64,
    pub min_allowed_weights: u16,
    /// Consensus majority (Bittensor's kappa, 0.5).
    pub kappa: f64,
    /// Bonds EMA: `B = (1 - m) * ΔB + m * B_prev` with `m = bonds_moving_average / 10^6`.
    pub bonds_moving_average: u64,
    /// Burned from the coldkey on registration.
    pub burn: Rao,
    /// Emitted per block, paid out at each epoch.
    pub block_emission: Rao,
    /// Fraction of each epoch's emission paid to the subnet owner.
    pub owner_cut: f64,
    /// Free balance granted the first time a coldkey is seen (a development
    /// faucet: the local chain has no transfers from outside).
    pub dev_faucet: Rao,
}

impl Default for Hyperparams {
    fn default() -> Self {
        Hyperparams {
            netuid: 1,
            max_uids: 256,
            max_validators: 64,
            tempo: 10,
            immunity_period: 100,
            activity_cutoff: 5000,
            weights_rate_limit: 5,
            weights_version_key: 1,
            min_allowed_weights: 1,
            kappa: 0.5,
            bonds_moving_average: 900_000,
            burn: Rao(Rao::PER_TAO),
            block_emission: Rao(Rao::PER_TAO),
            owner_cut: 0.18,
            dev_faucet: Rao(1000 * Rao::PER_TAO),
        }
    }
}

/// A snapshot of the subnet at one block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metagraph {
    pub block: BlockNumber,
    pub netuid: u16,
    pub neurons: Vec<NeuronInfo>,
}

impl Metagraph {
    pub fn neuron(&self, hotkey: &Hotkey) -> Option<&NeuronInfo> {
        self.neurons.iter().find(|n| &n.hotkey == hotkey)
    }
    pub fn by_uid(&self, uid: Uid) -> Option<&NeuronInfo> {
        self.neurons.iter().find(|n| n.uid == uid)
    }
}

/// What can go wrong talking to a chain. Rule violations carry enough to act
/// on, and travel as JSON from `fractal chain serve` to [`RemoteChain`].
#[derive(Debug, thiserror::Error, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChainError {
    #[error("hotkey {0} is not registered on this subnet")]
    NotRegistered(Hotkey),
    #[error("hotkey {0} is already registered (uid {1})")]
    AlreadyRegistered(Hotkey, Uid),
    #[error("hotkey {hotkey} belongs to coldkey {owner}, not to the signer")]
    NotOwner { hotkey: Hotkey, owner: Hotkey },
    #[error("insufficient balance: need {need}, have {have}")]
    InsufficientBalance { need: Rao, have: Rao },
    #[error("subnet is full and every neuron is still immune; try again after block {retry_at}")]
    SubnetFull { retry_at: BlockNumber },
    #[error("weights set too often: last at block {last}, next allowed at block {next}")]
    WeightsRateLimited {
        last: BlockNumber,
        next: BlockNumber,
    },
    #[error("weights version key {got} is older than the subnet's {need}")]
    VersionKeyTooOld { got: u64, need: u64 },
    #[error("weights for unknown uid {0}")]
    UnknownUid(Uid),
    #[error("invalid weights: {0}")]
    InvalidWeights(String),
    #[error("hotkey {0} has no validator permit")]
    NoValidatorPermit(Hotkey),
    #[error("only the subnet owner ({owner}) may change the model schedule, not {signer}")]
    NotSubnetOwner { signer: Hotkey, owner: Hotkey },
    #[error("manifest {0} is not published on this chain; publish it first")]
    UnknownManifest(ManifestId),
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
    #[error("not possible on this chain: {0}")]
    Unsupported(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("chain storage: {0}")]
    Storage(String),
    #[error("chain transport: {0}")]
    Transport(String),
}

impl ChainError {
    /// Stable machine-readable code, used on the wire.
    pub fn code(&self) -> &'static str {
        match self {
            ChainError::NotRegistered(_) => "not_registered",
            ChainError::AlreadyRegistered(..) => "already_registered",
            ChainError::NotOwner { .. } => "not_owner",
            ChainError::InsufficientBalance { .. } => "insufficient_balance",
            ChainError::SubnetFull { .. } => "subnet_full",
            ChainError::WeightsRateLimited { .. } => "weights_rate_limited",
            ChainError::VersionKeyTooOld { .. } => "version_key_too_old",
            ChainError::UnknownUid(_) => "unknown_uid",
            ChainError::InvalidWeights(_) => "invalid_weights",
            ChainError::NoValidatorPermit(_) => "no_validator_permit",
            ChainError::NotSubnetOwner { .. } => "not_subnet_owner",
            ChainError::UnknownManifest(_) => "unknown_manifest",
            ChainError::Schedule(_) => "bad_schedule",
            ChainError::Unsupported(_) => "unsupported",
            ChainError::Invalid(_) => "invalid_request",
            ChainError::Storage(_) => "storage",
            ChainError::Transport(_) => "transport",
        }
    }
}

impl From<rusqlite::Error> for ChainError {
    fn from(e: rusqlite::Error) -> Self {
        ChainError::Storage(e.to_string())
    }
}

/// The operations every backend offers. Signers are passed in: a coldkey
/// pays for registration and stake, a hotkey serves and sets weights.
#[async_trait]
pub trait Chain: Send + Sync {
    async fn block(&self) -> Result<BlockNumber, ChainError>;
    /// Waits until the chain is past `block` (or `timeout` passes) and
    /// returns the current block; the way to follow new blocks.
    async fn wait_for_block_after(
        &self,
        block: BlockNumber,
        timeout: std::time::Duration,
    ) -> Result<BlockNumber, ChainError>;
    async fn hyperparams(&self) -> Result<Hyperparams, ChainError>;
    async fn metagraph(&self) -> Result<Metagraph, ChainError>;
    /// Burned registration of `hotkey`, paid by `coldkey`.
    async fn register(&self, coldkey: &Keypair, hotkey: &Hotkey) -> Result<Uid, ChainError>;
    async fn serve_axon(&self, hotkey: &Keypair, axon: AxonInfo) -> Result<(), ChainError>;
    /// Sets the signer's weights; values are normalised so the largest is 65535.
    async fn set_weights(
        &self,
        hotkey: &Keypair,
        weights: &[(Uid, u16)],
        version_key: u64,
    ) -> Result<(), ChainError>;
    async fn add_stake(
        &self,
        coldkey: &Keypair,
        hotkey: &Hotkey,
        amount: Rao,
    ) -> Result<(), ChainError>;
    async fn balance(&self, coldkey: &Hotkey) -> Result<Rao, ChainError>;
    /// Which manifests the subnet serves when ([`fractal_protocol::schedule`]).
    async fn model_schedule(&self) -> Result<ModelSchedule, ChainError>;
    /// A manifest the owner published, by id; the backend checks that the
    /// document hashes to `id`, so the carrier need not be trusted.
    async fn manifest(&self, id: &ManifestId) -> Result<Option<ModelManifest>, ChainError>;
    /// Makes `manifest` readable by id (subnet owner only).
    async fn publish_manifest(
        &self,
        owner: &Keypair,
        manifest: &ModelManifest,
    ) -> Result<ManifestId, ChainError>;
    /// Adds an upgrade to the model schedule (subnet owner only).
    async fn schedule_upgrade(
        &self,
        owner: &Keypair,
        up: Upgrade,
    ) -> Result<ModelSchedule, ChainError>;
}

/// Scales weights so the largest becomes 65535 (Bittensor's
/// `max_upscale_to_u16`), after checking them against the subnet's rules.
pub fn normalize_weights(
    weights: &[(Uid, u16)],
    known: impl Fn(Uid) -> bool,
    min_allowed: u16,
) -> Result<Vec<(Uid, u16)>, ChainError> {
    let mut seen = std::collections::BTreeSet::new();
    for &(uid, _) in weights {
        if !known(uid) {
            return Err(ChainError::UnknownUid(uid));
        }
        if !seen.insert(uid) {
            return Err(ChainError::InvalidWeights(format!(
                "uid {uid} appears twice"
            )));
        }
    }
    let max = weights.iter().map(|&(_, w)| w).max().unwrap_or(0);
    if max == 0 {
        return Err(ChainError::InvalidWeights("all weights are zero".into()));
    }
    let nonzero = weights.iter().filter(|&&(_, w)| w > 0).count();
    if nonzero < min_allowed as usize {
        return Err(ChainError::InvalidWeights(format!(
            "{nonzero} non-zero weights, the subnet needs at least {min_allowed}"
        )));
    }
    let mut out: Vec<(Uid, u16)> = weights
        .iter()
        .filter(|&&(_, w)| w > 0)
        .map(|&(uid, w)| {
            let scaled = (w as u64 * u16::MAX as u64 + max as u64 / 2) / max as u64;
            (uid, scaled as u16)
        })
        .collect();
    out.sort_by_key(|&(uid, _)| uid);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_upscale_to_u16_max_and_check_rules() {
        let ok = normalize_weights(&[(3, 10), (1, 5)], |u| u < 4, 1).unwrap();
        assert_eq!(ok, vec![(1, 32768), (3, 65535)]);
        assert_eq!(
            normalize_weights(&[(9, 1)], |u| u < 4, 1),
            Err(ChainError::UnknownUid(9))
        );
        assert!(matches!(
            normalize_weights(&[(1, 1), (1, 2)], |_| true, 1),
            Err(ChainError::InvalidWeights(_))
        ));
        assert!(matches!(
            normalize_weights(&[(1, 0)], |_| true, 1),
            Err(ChainError::InvalidWeights(_))
        ));
        assert!(matches!(
            normalize_weights(&[(1, 7)], |_| true, 2),
            Err(ChainError::InvalidWeights(_))
        ));
    }

    #[test]
    fn rao_tao_conversions() {
        assert_eq!(Rao::from_tao(1.5), Some(Rao(1_500_000_000)));
        assert_eq!(Rao::from_tao(-1.0), None);
        assert_eq!(Rao::from_tao(f64::NAN), None);
        assert_eq!(Rao(2_500_000_000).to_string(), "τ2.5000");
    }
}
