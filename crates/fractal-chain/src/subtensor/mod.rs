//! Bittensor's subtensor as a [`Chain`] (cargo feature `subtensor`).
//!
//! One subnet (`netuid`) of a real node, over subxt's WebSocket client. Calls
//! are built dynamically against the node's own runtime metadata, so a
//! runtime upgrade that keeps the call and field names keeps working; the
//! metadata checked in under `fixtures/subtensor/` (spec 461) is what the
//! offline tests encode and decode against, next to the reference SDK's
//! vectors.
//!
//! | [`Chain`] method | subtensor |
//! | --- | --- |
//! | `block`, `wait_for_block_after` | best block number, polled |
//! | `hyperparams` | `SubnetInfoRuntimeApi::get_subnet_hyperparams` + `MaxAllowedUids`, `Burn`, `SubnetOwnerCut` storage |
//! | `metagraph` | `NeuronInfoRuntimeApi::get_neurons_lite` + `BlockAtRegistration` |
//! | `register` | `burned_register(netuid, hotkey)`, signed by the coldkey |
//! | `serve_axon` | `serve_axon(netuid, version, ip, port, ip_type, protocol, 0, 0)`, signed by the hotkey |
//! | `set_weights` | `set_weights`, or commit-reveal (below) where the subnet enables it |
//! | `add_stake` | `add_stake(hotkey, netuid, amount)`, signed by the coldkey |
//! | `balance` | `System::Account` free balance |
//! | `model_schedule` | the owner hotkey's (`SubnetOwnerHotkey`) `Commitments::CommitmentOf` entry ([`commitment`]) |
//! | `schedule_upgrade` | `Commitments::set_commitment`, signed by the subnet owner's hotkey |
//! | `manifest`, `publish_manifest` | not on chain (too large for a commitment): nodes serve documents by id |
//!
//! **Commit-reveal.** A subnet with `commit_reveal_weights_enabled` refuses
//! `set_weights` (`CommitRevealEnabled`). Subtensor offers two ways to commit,
//! and we use the one the chain's `CommitRevealWeightsVersion` asks for:
//!
//! - **Timelocked (version 4, "CRv4"; subtensor's default and what the SDK
//!   sends).** The weights are encrypted to the drand quicknet round that the
//!   chain will hold when the commit's reveal epoch begins ([`timelock`];
//!   the reveal block is replayed from the subnet's epoch bookkeeping in
//!   [`epoch`]) and sent with `commit_timelocked_mechanism_weights` (main
//!   mechanism). The chain decrypts and applies them itself: nothing is kept
//!   here, and a validator that is down at reveal time loses nothing.
//! - **Hash commit (any other version).** `commit_weights(netuid, H)` now,
//!   `reveal_weights` with the same uids, values, salt and version key in
//!   epoch `commit_epoch + reveal_period`. [`commit_hash`] is subtensor's
//!   `get_commit_hash`; pending commits (with their salts) are kept in a JSON
//!   file before the commit is sent, so a restart loses none, and a
//!   background task reveals each one in its reveal epoch (read from the
//!   chain's `WeightCommits`, `SubnetEpochIndex` and `RevealPeriodEpochs`, so
//!   no reveal is paid for before it can succeed).

pub mod commitment;
pub mod epoch;
pub mod timelock;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use fractal_protocol::{Hotkey, Keypair, ManifestId, ModelManifest, ModelSchedule, Upgrade};
use scale_decode::DecodeAsType;
use serde::{Deserialize, Serialize};
use subxt::config::substrate::SpecVersionForRange;
use subxt::config::SubstrateConfig;
use subxt::dynamic::Value;
use subxt::ext::codec::Encode;
use subxt::metadata::Metadata;
use subxt::utils::{AccountId32, MultiSignature};
use subxt::{OfflineClient, OnlineClient};

use self::epoch::EpochState;
use self::timelock::WeightsPayload;
use crate::{
    normalize_weights, AxonInfo, BlockNumber, Chain, ChainError, Hyperparams, Metagraph,
    NeuronInfo, Rao, Uid,
};

const PALLET: &str = "SubtensorModule";

/// Signs extrinsics with one of our sr25519 keys (substrate signing context,
/// so a wallet's keys sign exactly as btcli would).
struct KeySigner<'a>(&'a Keypair);

impl subxt::tx::Signer<SubstrateConfig> for KeySigner<'_> {
    fn account_id(&self) -> AccountId32 {
        AccountId32(self.0.hotkey().0)
    }
    fn sign(&self, payload: &[u8]) -> MultiSignature {
        MultiSignature::Sr25519(self.0.sign(payload))
    }
}

fn account(h: &Hotkey) -> Value {
    Value::from_bytes(h.0)
}

fn u16s(v: &[u16]) -> Value {
    Value::unnamed_composite(v.iter().map(|&x| Value::u128(x as u128)))
}

/// The calls this backend sends, as dynamic payloads checked against the
/// node's metadata when they are signed.
pub mod calls {
    use super::*;
    use subxt::tx::DynamicPayload;

    fn call(name: &str, fields: Vec<Value>) -> DynamicPayload<Vec<Value>> {
        subxt::dynamic::transaction(PALLET, name, fields)
    }

    pub fn burned_register(netuid: u16, hotkey: &Hotkey) -> DynamicPayload<Vec<Value>> {
        call(
            "burned_register",
            vec![Value::u128(netuid as u128), account(hotkey)],
        )
    }

    pub fn add_stake(netuid: u16, hotkey: &Hotkey, amount: Rao) -> DynamicPayload<Vec<Value>> {
        call(
            "add_stake",
            vec![
                account(hotkey),
                Value::u128(netuid as u128),
                Value::u128(amount.0 as u128),
            ],
        )
    }

    pub fn set_weights(
        netuid: u16,
        uids: &[u16],
        values: &[u16],
        version_key: u64,
    ) -> DynamicPayload<Vec<Value>> {
        call(
            "set_weights",
            vec![
                Value::u128(netuid as u128),
                u16s(uids),
                u16s(values),
                Value::u128(version_key as u128),
            ],
        )
    }

    pub fn commit_weights(netuid: u16, hash: [u8; 32]) -> DynamicPayload<Vec<Value>> {
        call(
            "commit_weights",
            vec![Value::u128(netuid as u128), Value::from_bytes(hash)],
        )
    }

    /// A timelocked commit for the subnet's main mechanism (`mecid` 0), as
    /// the reference SDK sends it.
    pub fn commit_timelocked(
        netuid: u16,
        commit: &[u8],
        reveal_round: u64,
        commit_reveal_version: u16,
    ) -> DynamicPayload<Vec<Value>> {
        call(
            "commit_timelocked_mechanism_weights",
            vec![
                Value::u128(netuid as u128),
                Value::u128(0),
                Value::from_bytes(commit),
                Value::u128(reveal_round as u128),
                Value::u128(commit_reveal_version as u128),
            ],
        )
    }

    pub fn reveal_weights(c: &PendingCommit) -> DynamicPayload<Vec<Value>> {
        call(
            "reveal_weights",
            vec![
                Value::u128(c.netuid as u128),
                u16s(&c.uids),
                u16s(&c.values),
                u16s(&c.salt),
                Value::u128(c.version_key as u128),
            ],
        )
    }

    /// `ip_type` 4 or 6, the address as a big-endian u128, protocol 0 (HTTP).
    pub fn serve_axon(netuid: u16, axon: &AxonInfo) -> DynamicPayload<Vec<Value>> {
        let (ip, ip_type) = match axon.ip {
            IpAddr::V4(v4) => (u32::from(v4) as u128, 4u8),
            IpAddr::V6(v6) => (u128::from(v6), 6u8),
        };
        call(
            "serve_axon",
            vec![
                Value::u128(netuid as u128),
                Value::u128(axon.version as u128),
                Value::u128(ip),
                Value::u128(axon.port as u128),
                Value::u128(ip_type as u128),
                Value::u128(0),
                Value::u128(0),
                Value::u128(0),
            ],
        )
    }
}

/// Subtensor's `get_commit_hash`: BlakeTwo256 over the SCALE encoding of
/// `(hotkey, netuid, uids, values, salt, version_key)` (the subnet's main
/// mechanism, whose storage index is the netuid itself).
pub fn commit_hash(
    hotkey: &Hotkey,
    netuid: u16,
    uids: &[u16],
    values: &[u16],
    salt: &[u16],
    version_key: u64,
) -> [u8; 32] {
    use blake2::digest::{consts::U32, Digest};
    let preimage = (hotkey.0, netuid, uids, values, salt, version_key).encode();
    blake2::Blake2b::<U32>::digest(&preimage).into()
}

/// A hash commit waiting for its reveal epoch, with everything the reveal
/// must repeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PendingCommit {
    pub hotkey: Hotkey,
    pub netuid: u16,
    pub hash: String,
    pub uids: Vec<u16>,
    pub values: Vec<u16>,
    pub salt: Vec<u16>,
    pub version_key: u64,
    pub commit_block: BlockNumber,
}

/// Pending commits in a JSON file, rewritten whole (temp file, fsync,
/// rename) on every change so a crash leaves the old or the new list.
pub struct CommitStore {
    path: PathBuf,
    pending: Mutex<Vec<PendingCommit>>,
}

impl CommitStore {
    pub fn open(path: &Path) -> Result<Self, ChainError> {
        let pending = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| ChainError::Storage(format!("{}: {e}", path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(ChainError::Storage(format!("{}: {e}", path.display()))),
        };
        Ok(CommitStore {
            path: path.to_owned(),
            pending: Mutex::new(pending),
        })
    }

    pub fn pending(&self) -> Vec<PendingCommit> {
        self.pending.lock().unwrap().clone()
    }

    fn save(&self, list: &[PendingCommit]) -> Result<(), ChainError> {
        let err = |e: std::io::Error| ChainError::Storage(format!("{}: {e}", self.path.display()));
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let tmp = self.path.with_extension("tmp");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(err)?;
            f.write_all(&serde_json::to_vec_pretty(list).expect("serializable"))
                .map_err(err)?;
            f.sync_all().map_err(err)?;
        }
        std::fs::rename(&tmp, &self.path).map_err(err)
    }

    pub fn add(&self, c: PendingCommit) -> Result<(), ChainError> {
        let mut list = self.pending.lock().unwrap();
        let mut next = list.clone();
        next.push(c);
        self.save(&next)?;
        *list = next;
        Ok(())
    }

    pub fn remove(&self, hash: &str) -> Result<(), ChainError> {
        let mut list = self.pending.lock().unwrap();
        let next: Vec<_> = list.iter().filter(|c| c.hash != hash).cloned().collect();
        self.save(&next)?;
        *list = next;
        Ok(())
    }
}

// Decoding targets for what the node answers. Fields are matched by name and
// the rest are skipped, so new fields in a later runtime do not break them.

#[derive(Debug, DecodeAsType)]
struct AxonInfoRaw {
    version: u32,
    ip: u128,
    port: u16,
    ip_type: u8,
}

#[derive(Debug, DecodeAsType)]
struct NeuronInfoLiteRaw {
    hotkey: AccountId32,
    coldkey: AccountId32,
    uid: u16,
    axon_info: AxonInfoRaw,
    stake: Vec<(AccountId32, u64)>,
    rank: u16,
    emission: u64,
    incentive: u16,
    consensus: u16,
    trust: u16,
    validator_trust: u16,
    dividends: u16,
    last_update: u64,
    validator_permit: bool,
}

/// The parts of `SubnetHyperparams` that map onto [`Hyperparams`].
#[derive(Debug, Clone, PartialEq, DecodeAsType)]
pub struct SubnetHyperparamsRaw {
    pub kappa: u16,
    pub immunity_period: u16,
    pub min_allowed_weights: u16,
    pub tempo: u16,
    pub weights_version: u64,
    pub weights_rate_limit: u64,
    pub activity_cutoff: u16,
    pub bonds_moving_avg: u64,
    pub max_validators: u16,
    pub commit_reveal_period: u64,
    pub commit_reveal_weights_enabled: bool,
}

fn decode_err(what: &str, e: impl std::fmt::Display) -> ChainError {
    ChainError::Transport(format!("decoding {what}: {e}"))
}

/// Decodes `bytes` as the runtime's type `ty`, all of them: trailing bytes
/// mean the answer is not what we think it is.
fn decode_all<T: DecodeAsType>(
    md: &Metadata,
    ty: u32,
    bytes: &[u8],
    what: &str,
) -> Result<T, ChainError> {
    let mut rest = bytes;
    let value = T::decode_as_type(&mut rest, ty, md.types()).map_err(|e| decode_err(what, e))?;
    if !rest.is_empty() {
        return Err(decode_err(what, format!("{} bytes left over", rest.len())));
    }
    Ok(value)
}

fn api_output_type(md: &Metadata, api: &str, method: &str) -> Result<u32, ChainError> {
    md.runtime_api_trait_by_name(api)
        .and_then(|t| t.method_by_name(method).map(|m| m.output_ty()))
        .ok_or_else(|| {
            ChainError::Transport(format!("the node has no runtime API {api}::{method}"))
        })
}

fn fraction(x: u16) -> f64 {
    x as f64 / u16::MAX as f64
}

fn axon_from(raw: &AxonInfoRaw) -> Option<AxonInfo> {
    let ip = match raw.ip_type {
        4 => IpAddr::from(std::net::Ipv4Addr::from(u32::try_from(raw.ip).ok()?)),
        6 => IpAddr::from(std::net::Ipv6Addr::from(raw.ip)),
        _ => return None,
    };
    (raw.ip != 0 && raw.port != 0).then_some(AxonInfo {
        ip,
        port: raw.port,
        version: raw.version,
    })
}

/// Decodes the answer of `NeuronInfoRuntimeApi_get_neurons_lite` into
/// metagraph rows (`registered_at` left 0; [`SubtensorChain::metagraph`]
/// fills it from storage).
pub fn decode_neurons_lite(md: &Metadata, bytes: &[u8]) -> Result<Vec<NeuronInfo>, ChainError> {
    let ty = api_output_type(md, "NeuronInfoRuntimeApi", "get_neurons_lite")?;
    let raw: Vec<NeuronInfoLiteRaw> = decode_all(md, ty, bytes, "neurons")?;
    Ok(raw
        .into_iter()
        .map(|n| NeuronInfo {
            uid: n.uid,
            hotkey: Hotkey(n.hotkey.0),
            coldkey: Hotkey(n.coldkey.0),
            stake: Rao(n.stake.iter().map(|(_, s)| *s).sum()),
            axon: axon_from(&n.axon_info),
            validator_permit: n.validator_permit,
            rank: fraction(n.rank),
            trust: fraction(n.trust),
            consensus: fraction(n.consensus),
            incentive: fraction(n.incentive),
            dividends: fraction(n.dividends),
            validator_trust: fraction(n.validator_trust),
            emission: Rao(n.emission),
            registered_at: 0,
            last_update: n.last_update,
        })
        .collect())
}

/// Decodes the answer of `SubnetInfoRuntimeApi_get_subnet_hyperparams`
/// (`None` for a subnet that does not exist).
pub fn decode_hyperparams(
    md: &Metadata,
    bytes: &[u8],
) -> Result<Option<SubnetHyperparamsRaw>, ChainError> {
    let ty = api_output_type(md, "SubnetInfoRuntimeApi", "get_subnet_hyperparams")?;
    decode_all(md, ty, bytes, "hyperparams")
}

/// Metadata from its SCALE bytes (`meta` + version + registry).
pub fn metadata_from_bytes(bytes: &[u8]) -> Result<Metadata, ChainError> {
    Metadata::decode_from(bytes).map_err(|e| decode_err("metadata", e))
}

/// A client that builds and signs extrinsics without a node, for a chain
/// whose genesis, versions and metadata are known (the offline tests).
pub fn offline_client(
    metadata: &[u8],
    genesis_hash: [u8; 32],
    spec_version: u32,
    transaction_version: u32,
) -> Result<OfflineClient<SubstrateConfig>, ChainError> {
    let md = metadata_from_bytes(metadata)?;
    let config = SubstrateConfig::builder()
        .set_genesis_hash(genesis_hash.into())
        .set_metadata_for_spec_versions([(spec_version, Arc::new(md))])
        .set_spec_version_for_block_ranges([SpecVersionForRange {
            block_range: 0..u64::MAX,
            spec_version,
            transaction_version,
        }])
        .build();
    Ok(OfflineClient::new_with_config(config))
}

/// Maps a failed extrinsic onto [`ChainError`]. Subtensor's error names are
/// stable across runtimes; everything else keeps the node's message.
fn dispatch_error(message: String, signer: &Hotkey, target: Option<&Hotkey>) -> ChainError {
    let has = |name: &str| message.contains(name);
    let target = *target.unwrap_or(signer);
    if has("HotKeyNotRegisteredInSubNet") || has("HotKeyNotRegisteredInNetwork") {
        ChainError::NotRegistered(target)
    } else if has("NeuronNoValidatorPermit") {
        ChainError::NoValidatorPermit(*signer)
    } else if has("CommitRevealEnabled") {
        ChainError::Invalid("the subnet uses commit-reveal weights (set_weights refused)".into())
    } else if has("IncorrectCommitRevealVersion") {
        ChainError::Invalid(format!(
            "the chain expects another commit-reveal version than {} (CommitRevealWeightsVersion)",
            timelock::COMMIT_REVEAL_VERSION
        ))
    } else {
        ChainError::Invalid(message)
    }
}

fn transport(e: impl std::fmt::Display) -> ChainError {
    ChainError::Transport(e.to_string())
}

/// One subnet of a subtensor node.
pub struct SubtensorChain {
    api: OnlineClient<SubstrateConfig>,
    netuid: u16,
    commits: Arc<CommitStore>,
    /// Keys that have commits to reveal, for the reveal task.
    reveal_keys: Arc<Mutex<BTreeMap<Hotkey, Keypair>>>,
    reveal_task: tokio::task::JoinHandle<()>,
    /// Unix seconds now: what a timelocked commit's drand round is timed from.
    clock: Clock,
}

/// A source of the current Unix time in seconds.
pub type Clock = Arc<dyn Fn() -> f64 + Send + Sync>;

fn system_clock() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The largest commit the chain stores (`MAX_CRV3_COMMIT_SIZE_BYTES`).
pub const MAX_TIMELOCKED_COMMIT_BYTES: usize = 5000;

impl Drop for SubtensorChain {
    fn drop(&mut self) {
        self.reveal_task.abort();
    }
}

impl SubtensorChain {
    /// Connects to `url` (`ws://` for a local node, `wss://` otherwise).
    /// Pending weight commits live in `state_dir/commits-<netuid>.json`.
    pub async fn connect(url: &str, netuid: u16, state_dir: &Path) -> Result<Self, ChainError> {
        let api = if url.starts_with("ws://") {
            OnlineClient::<SubstrateConfig>::from_insecure_url(url).await
        } else {
            OnlineClient::<SubstrateConfig>::from_url(url).await
        }
        .map_err(|e| ChainError::Transport(format!("{url}: {e}")))?;
        let commits = Arc::new(CommitStore::open(
            &state_dir.join(format!("commits-{netuid}.json")),
        )?);
        let reveal_keys = Arc::new(Mutex::new(BTreeMap::new()));
        let task = {
            let (api, commits, keys) = (api.clone(), commits.clone(), reveal_keys.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(12)).await;
                    let held: Vec<Keypair> = keys.lock().unwrap().values().cloned().collect();
                    for key in held {
                        if let Err(e) = reveal_due(&api, &commits, &key).await {
                            tracing::warn!("revealing weights: {e}");
                        }
                    }
                }
            })
        };
        let chain = SubtensorChain {
            api,
            netuid,
            commits,
            reveal_keys,
            reveal_task: task,
            clock: Arc::new(system_clock),
        };
        if chain.raw_hyperparams(&chain.at().await?).await?.is_none() {
            return Err(ChainError::Invalid(format!(
                "subnet {netuid} does not exist on {url}"
            )));
        }
        Ok(chain)
    }

    pub fn netuid(&self) -> u16 {
        self.netuid
    }

    /// Replaces the wall clock timelocked commits are timed from (tests use
    /// a fixed time whose drand round is public).
    pub fn set_clock(&mut self, clock: Clock) {
        self.clock = clock;
    }

    /// The node's runtime spec version.
    pub async fn spec_version(&self) -> Result<u32, ChainError> {
        Ok(self.at().await?.spec_version())
    }

    pub fn pending_commits(&self) -> Vec<PendingCommit> {
        self.commits.pending()
    }

    async fn at(&self) -> Result<AtBlock, ChainError> {
        self.api.at_current_block().await.map_err(transport)
    }

    async fn raw_hyperparams(
        &self,
        at: &AtBlock,
    ) -> Result<Option<SubnetHyperparamsRaw>, ChainError> {
        let bytes = subnet_api_call(
            at,
            "SubnetInfoRuntimeApi_get_subnet_hyperparams",
            self.netuid,
        )
        .await?;
        decode_hyperparams(&at.metadata(), &bytes)
    }

    /// The subnet's rules; an error if it does not exist.
    async fn existing_hyperparams(&self, at: &AtBlock) -> Result<SubnetHyperparamsRaw, ChainError> {
        self.raw_hyperparams(at)
            .await?
            .ok_or_else(|| ChainError::Invalid(format!("subnet {} does not exist", self.netuid)))
    }

    async fn submit(
        &self,
        signer: &Keypair,
        call: subxt::tx::DynamicPayload<Vec<Value>>,
        target: Option<&Hotkey>,
    ) -> Result<(), ChainError> {
        submit(&self.api, signer, call)
            .await
            .map_err(|m| dispatch_error(m, &signer.hotkey(), target))
    }

    async fn commit_weights(
        &self,
        hotkey: &Keypair,
        uids: Vec<u16>,
        values: Vec<u16>,
        version_key: u64,
    ) -> Result<(), ChainError> {
        use rand::Rng;
        let mut rng = rand::rngs::OsRng;
        let salt: Vec<u16> = (0..8).map(|_| rng.gen()).collect();
        let hash = commit_hash(
            &hotkey.hotkey(),
            self.netuid,
            &uids,
            &values,
            &salt,
            version_key,
        );
        let pending = PendingCommit {
            hotkey: hotkey.hotkey(),
            netuid: self.netuid,
            hash: hex::encode(hash),
            uids,
            values,
            salt,
            version_key,
            commit_block: self.block().await?,
        };
        // Kept before it is sent: a commit whose salt is lost can never be revealed.
        self.commits.add(pending.clone())?;
        self.reveal_keys
            .lock()
            .unwrap()
            .insert(hotkey.hotkey(), hotkey.clone());
        if let Err(e) = self
            .submit(hotkey, calls::commit_weights(self.netuid, hash), None)
            .await
        {
            self.commits.remove(&pending.hash)?;
            return Err(e);
        }
        Ok(())
    }
}

impl SubtensorChain {
    /// Encrypts the weights to the drand round the chain will hold when the
    /// commit's reveal epoch begins, and sends the commit; the chain reveals
    /// it. Everything is read at one block, as the reference SDK does.
    async fn commit_timelocked(
        &self,
        at: &AtBlock,
        hotkey: &Keypair,
        payload: WeightsPayload,
    ) -> Result<(), ChainError> {
        let net = || vec![Value::u128(self.netuid as u128)];
        let state = EpochState {
            block: at.block_number(),
            tempo: storage_u64(at, "Tempo", net()).await? as u16,
            last_epoch_block: storage_u64(at, "LastEpochBlock", net()).await?,
            pending_epoch_at: storage_u64(at, "PendingEpochAt", net()).await?,
            epoch_index: storage_u64(at, "SubnetEpochIndex", net()).await?,
            blocks_since_last_step: storage_u64(at, "BlocksSinceLastStep", net()).await?,
        };
        let period = storage_u64(at, "RevealPeriodEpochs", net()).await?;
        let reveal_block = state
            .first_reveal_block(period)
            .map_err(|e| ChainError::Invalid(e.to_string()))?;
        // Aura's slot is the block time (12 s on finney, 0.25 s on a
        // fast-blocks localnet); the round is timed in wall-clock seconds.
        let slot_ms = at
            .constants()
            .entry(subxt::dynamic::constant::<u64>("Aura", "SlotDuration"))
            .map_err(|e| decode_err("Aura::SlotDuration", e))?;
        let round = timelock::reveal_round(
            reveal_block,
            state.block,
            slot_ms as f64 / 1000.0,
            (self.clock)(),
        );
        let commit = timelock::encrypt(&payload.encode(), round);
        if commit.len() > MAX_TIMELOCKED_COMMIT_BYTES {
            return Err(ChainError::InvalidWeights(format!(
                "{} weights make a {}-byte timelocked commit; the chain takes at most {MAX_TIMELOCKED_COMMIT_BYTES}",
                payload.uids.len(),
                commit.len()
            )));
        }
        let call =
            calls::commit_timelocked(self.netuid, &commit, round, timelock::COMMIT_REVEAL_VERSION);
        self.submit(hotkey, call, None).await?;
        tracing::info!(
            reveal_block,
            drand_round = round,
            "weights committed, timelocked; the chain reveals them at block {reveal_block}"
        );
        Ok(())
    }
}

type AtBlock = subxt::client::OnlineClientAtBlock<SubstrateConfig>;

/// A `SubtensorModule` storage value read as u64; unset entries read as the
/// default the runtime's metadata declares for them.
async fn storage_u64(at: &AtBlock, entry: &str, keys: Vec<Value>) -> Result<u64, ChainError> {
    let addr = subxt::dynamic::storage::<Vec<Value>, Value>(PALLET, entry);
    at.storage()
        .fetch(addr, keys)
        .await
        .map_err(transport)?
        .decode_as::<u64>()
        .map_err(|e| decode_err(entry, e))
}

/// A runtime API that takes the netuid, answered as raw SCALE bytes.
async fn subnet_api_call(at: &AtBlock, function: &str, netuid: u16) -> Result<Vec<u8>, ChainError> {
    at.runtime_apis()
        .call_raw(function, Some(&netuid.encode()))
        .await
        .map_err(transport)
}

async fn submit(
    api: &OnlineClient<SubstrateConfig>,
    signer: &Keypair,
    call: subxt::tx::DynamicPayload<Vec<Value>>,
) -> Result<(), String> {
    let at = api.at_current_block().await.map_err(|e| e.to_string())?;
    at.tx()
        .sign_and_submit_then_watch_default(&call, &KeySigner(signer))
        .await
        .map_err(|e| e.to_string())?
        .wait_for_finalized_success()
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// When a pending commit may be revealed, from the chain's own bookkeeping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevealTiming {
    /// Not in the chain's commit list (yet, or any more).
    NotOnChain,
    NotYet,
    Due,
    Expired,
}

/// Subtensor reveals a commit made in epoch `e` during epoch
/// `e + reveal_period` exactly (`is_reveal_block_range`); later it expires.
pub fn reveal_timing(
    on_chain_epoch: Option<u64>,
    current_epoch: u64,
    reveal_period: u64,
) -> RevealTiming {
    match on_chain_epoch {
        None => RevealTiming::NotOnChain,
        Some(e) => match current_epoch.cmp(&e.saturating_add(reveal_period)) {
            std::cmp::Ordering::Less => RevealTiming::NotYet,
            std::cmp::Ordering::Equal => RevealTiming::Due,
            std::cmp::Ordering::Greater => RevealTiming::Expired,
        },
    }
}

/// A commit younger than this many blocks may still be on its way into a
/// block; it is not dropped for being missing from the chain's list.
const COMMIT_GRACE_BLOCKS: u64 = 20;

/// Reveals `key`'s pending commits whose epoch has come. Timing comes from
/// the chain's `WeightCommits`, `SubnetEpochIndex` and `RevealPeriodEpochs`,
/// so no reveal is sent (and paid for) before it can succeed; commits the
/// chain no longer holds, or that expired, are dropped with a warning.
async fn reveal_due(
    api: &OnlineClient<SubstrateConfig>,
    commits: &CommitStore,
    key: &Keypair,
) -> Result<(), ChainError> {
    let mine: Vec<PendingCommit> = commits
        .pending()
        .into_iter()
        .filter(|c| c.hotkey == key.hotkey())
        .collect();
    if mine.is_empty() {
        return Ok(());
    }
    let at = api.at_current_block().await.map_err(transport)?;
    let block = at.block_number();
    for c in mine {
        let net = Value::u128(c.netuid as u128);
        let epoch = storage_u64(&at, "SubnetEpochIndex", vec![net.clone()]).await?;
        let period = storage_u64(&at, "RevealPeriodEpochs", vec![net.clone()]).await?;
        let addr = subxt::dynamic::storage::<Vec<Value>, Vec<(subxt::utils::H256, u64, u64, u64)>>(
            PALLET,
            "WeightCommits",
        );
        let on_chain = match at
            .storage()
            .try_fetch(addr, vec![net, account(&key.hotkey())])
            .await
            .map_err(transport)?
        {
            None => Vec::new(),
            Some(v) => v.decode().map_err(|e| decode_err("WeightCommits", e))?,
        };
        let commit_epoch = on_chain
            .iter()
            .find(|(h, ..)| hex::encode(h.0) == c.hash)
            .map(|&(_, e, ..)| e);
        match reveal_timing(commit_epoch, epoch, period) {
            RevealTiming::NotYet => {}
            RevealTiming::NotOnChain if block <= c.commit_block + COMMIT_GRACE_BLOCKS => {}
            RevealTiming::NotOnChain | RevealTiming::Expired => {
                tracing::warn!(hash = %c.hash, epoch, "weight commit can no longer be revealed; dropped");
                commits.remove(&c.hash)?;
            }
            RevealTiming::Due => match submit(api, key, calls::reveal_weights(&c)).await {
                Ok(()) => {
                    tracing::info!(hash = %c.hash, "weights revealed");
                    commits.remove(&c.hash)?;
                }
                Err(m) if m.contains("RevealTooEarly") => {}
                Err(m)
                    if m.contains("ExpiredWeightCommit")
                        || m.contains("NoWeightsCommitFound")
                        || m.contains("InvalidRevealCommitHashNotMatch") =>
                {
                    tracing::warn!(hash = %c.hash, "weight commit can no longer be revealed: {m}");
                    commits.remove(&c.hash)?;
                }
                Err(m) => return Err(ChainError::Transport(m)),
            },
        }
    }
    Ok(())
}

#[async_trait]
impl Chain for SubtensorChain {
    async fn block(&self) -> Result<BlockNumber, ChainError> {
        Ok(self.at().await?.block_number())
    }

    async fn wait_for_block_after(
        &self,
        block: BlockNumber,
        timeout: Duration,
    ) -> Result<BlockNumber, ChainError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let now = self.block().await?;
            if now > block || tokio::time::Instant::now() >= deadline {
                return Ok(now);
            }
            tokio::time::sleep_until(
                deadline.min(tokio::time::Instant::now() + Duration::from_secs(2)),
            )
            .await;
        }
    }

    async fn hyperparams(&self) -> Result<Hyperparams, ChainError> {
        let at = self.at().await?;
        let raw = self.existing_hyperparams(&at).await?;
        let net = Value::u128(self.netuid as u128);
        let max_uids = storage_u64(&at, "MaxAllowedUids", vec![net.clone()]).await?;
        let burn = storage_u64(&at, "Burn", vec![net]).await?;
        let owner_cut = storage_u64(&at, "SubnetOwnerCut", vec![]).await?;
        Ok(Hyperparams {
            netuid: self.netuid,
            max_uids: max_uids as u16,
            max_validators: raw.max_validators,
            tempo: raw.tempo as u64,
            immunity_period: raw.immunity_period as u64,
            activity_cutoff: raw.activity_cutoff as u64,
            weights_rate_limit: raw.weights_rate_limit,
            weights_version_key: raw.weights_version,
            min_allowed_weights: raw.min_allowed_weights,
            kappa: fraction(raw.kappa),
            bonds_moving_average: raw.bonds_moving_avg,
            burn: Rao(burn),
            // Emission on subtensor is set by the network (dynamic TAO), not per subnet.
            block_emission: Rao(0),
            owner_cut: fraction(owner_cut as u16),
            dev_faucet: Rao(0),
        })
    }

    async fn metagraph(&self) -> Result<Metagraph, ChainError> {
        let at = self.at().await?;
        let bytes =
            subnet_api_call(&at, "NeuronInfoRuntimeApi_get_neurons_lite", self.netuid).await?;
        let mut neurons = decode_neurons_lite(&at.metadata(), &bytes)?;
        let addr = subxt::dynamic::storage::<(u16, u16), u64>(PALLET, "BlockAtRegistration");
        for n in &mut neurons {
            if let Some(v) = at
                .storage()
                .try_fetch(addr.clone(), (self.netuid, n.uid))
                .await
                .map_err(transport)?
            {
                n.registered_at = v
                    .decode()
                    .map_err(|e| decode_err("BlockAtRegistration", e))?;
            }
        }
        Ok(Metagraph {
            block: at.block_number(),
            netuid: self.netuid,
            neurons,
        })
    }

    async fn register(&self, coldkey: &Keypair, hotkey: &Hotkey) -> Result<Uid, ChainError> {
        if let Some(n) = self.metagraph().await?.neuron(hotkey) {
            return Err(ChainError::AlreadyRegistered(*hotkey, n.uid));
        }
        self.submit(
            coldkey,
            calls::burned_register(self.netuid, hotkey),
            Some(hotkey),
        )
        .await?;
        self.metagraph()
            .await?
            .neuron(hotkey)
            .map(|n| n.uid)
            .ok_or(ChainError::NotRegistered(*hotkey))
    }

    async fn serve_axon(&self, hotkey: &Keypair, axon: AxonInfo) -> Result<(), ChainError> {
        self.submit(hotkey, calls::serve_axon(self.netuid, &axon), None)
            .await
    }

    async fn set_weights(
        &self,
        hotkey: &Keypair,
        weights: &[(Uid, u16)],
        version_key: u64,
    ) -> Result<(), ChainError> {
        let mg = self.metagraph().await?;
        let raw = self.existing_hyperparams(&self.at().await?).await?;
        if mg.neuron(&hotkey.hotkey()).is_none() {
            return Err(ChainError::NotRegistered(hotkey.hotkey()));
        }
        let normalized = normalize_weights(
            weights,
            |uid| mg.by_uid(uid).is_some(),
            raw.min_allowed_weights,
        )?;
        let (uids, values): (Vec<u16>, Vec<u16>) = normalized.into_iter().unzip();
        if raw.commit_reveal_weights_enabled {
            // Reveal what is due first (the chain keeps at most 10 unrevealed
            // commits); a failed reveal must not stop new commits.
            if let Err(e) = reveal_due(&self.api, &self.commits, hotkey).await {
                tracing::warn!("revealing weights: {e}");
            }
            let at = self.at().await?;
            let version = storage_u64(&at, "CommitRevealWeightsVersion", vec![]).await?;
            if version == u64::from(timelock::COMMIT_REVEAL_VERSION) {
                let payload = WeightsPayload {
                    hotkey: hotkey.hotkey().0.to_vec(),
                    uids,
                    values,
                    version_key,
                };
                self.commit_timelocked(&at, hotkey, payload).await
            } else {
                tracing::debug!(
                    version,
                    "the chain's commit-reveal version is not ours: hash commit"
                );
                self.commit_weights(hotkey, uids, values, version_key).await
            }
        } else {
            self.submit(
                hotkey,
                calls::set_weights(self.netuid, &uids, &values, version_key),
                None,
            )
            .await
        }
    }

    async fn add_stake(
        &self,
        coldkey: &Keypair,
        hotkey: &Hotkey,
        amount: Rao,
    ) -> Result<(), ChainError> {
        self.submit(
            coldkey,
            calls::add_stake(self.netuid, hotkey, amount),
            Some(hotkey),
        )
        .await
    }

    async fn balance(&self, coldkey: &Hotkey) -> Result<Rao, ChainError> {
        #[derive(DecodeAsType)]
        struct AccountData {
            free: u64,
        }
        #[derive(DecodeAsType)]
        struct AccountInfo {
            data: AccountData,
        }
        let at = self.at().await?;
        let addr = subxt::dynamic::storage::<([u8; 32],), AccountInfo>("System", "Account");
        match at
            .storage()
            .try_fetch(addr, (coldkey.0,))
            .await
            .map_err(transport)?
        {
            None => Ok(Rao(0)),
            Some(v) => Ok(Rao(v
                .decode()
                .map_err(|e| decode_err("System::Account", e))?
                .data
                .free)),
        }
    }

    async fn model_schedule(&self) -> Result<ModelSchedule, ChainError> {
        let at = self.at().await?;
        let owner = self.owner_hotkey(&at).await?;
        commitment::schedule_in(&self.commitment_fields(&at, &owner).await?)
    }

    /// Manifest documents are not on chain here (see [`commitment`]).
    async fn manifest(&self, _id: &ManifestId) -> Result<Option<ModelManifest>, ChainError> {
        Ok(None)
    }

    async fn publish_manifest(
        &self,
        _owner: &Keypair,
        _manifest: &ModelManifest,
    ) -> Result<ManifestId, ChainError> {
        Err(ChainError::Unsupported(
            "subtensor holds no manifest documents (a commitment field is at most 128 bytes): schedule the manifest by id, and nodes serve the document at GET /v1/manifests/{id}"
                .into(),
        ))
    }

    async fn schedule_upgrade(
        &self,
        owner: &Keypair,
        up: Upgrade,
    ) -> Result<ModelSchedule, ChainError> {
        let at = self.at().await?;
        let expected = self.owner_hotkey(&at).await?;
        if owner.hotkey() != expected {
            return Err(ChainError::NotSubnetOwner {
                signer: owner.hotkey(),
                owner: expected,
            });
        }
        let fields = self.commitment_fields(&at, &expected).await?;
        let next = commitment::schedule_in(&fields)?.with_upgrade(up, at.block_number())?;
        let call =
            commitment::set_commitment(self.netuid, commitment::fields_with(&fields, &next)?);
        self.submit(owner, call, None).await?;
        Ok(next)
    }
}

impl SubtensorChain {
    /// The subnet owner's hotkey: the account whose commitment holds the
    /// model schedule.
    async fn owner_hotkey(&self, at: &AtBlock) -> Result<Hotkey, ChainError> {
        let addr = subxt::dynamic::storage::<(u16,), [u8; 32]>(PALLET, "SubnetOwnerHotkey");
        let raw = at
            .storage()
            .try_fetch(addr, (self.netuid,))
            .await
            .map_err(transport)?
            .ok_or_else(|| {
                ChainError::Invalid(format!("subnet {} has no owner hotkey", self.netuid))
            })?
            .decode()
            .map_err(|e| decode_err("SubnetOwnerHotkey", e))?;
        Ok(Hotkey(raw))
    }

    /// The fields of `who`'s commitment on this subnet (none when unset).
    async fn commitment_fields(
        &self,
        at: &AtBlock,
        who: &Hotkey,
    ) -> Result<Vec<Value>, ChainError> {
        let addr = subxt::dynamic::storage::<(u16, [u8; 32]), Value>("Commitments", "CommitmentOf");
        match at
            .storage()
            .try_fetch(addr, (self.netuid, who.0))
            .await
            .map_err(transport)?
        {
            None => Ok(Vec::new()),
            Some(v) => commitment::registration_fields(
                &v.decode().map_err(|e| decode_err("CommitmentOf", e))?,
            ),
        }
    }
}
