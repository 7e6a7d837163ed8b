//! The embedded local chain: one subnet, state in SQLite, Yuma every tempo.
//!
//! Every state change is computed on a copy of the in-memory state, written
//! to SQLite in one transaction, and only then made visible; a crash loses
//! at most the change in flight, and a restart resumes from the file.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use fractal_protocol::{Hotkey, Keypair, ManifestId, ModelManifest, ModelSchedule, Upgrade};
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use tokio::sync::watch;

use crate::yuma::{self, EpochInput};
use crate::{
    normalize_weights, AxonInfo, BlockNumber, Chain, ChainError, Hyperparams, Metagraph,
    NeuronInfo, Rao, Uid,
};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS balances (coldkey TEXT PRIMARY KEY, rao INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS neurons (
    uid INTEGER PRIMARY KEY,
    hotkey TEXT NOT NULL UNIQUE,
    coldkey TEXT NOT NULL,
    stake INTEGER NOT NULL,
    registered_at INTEGER NOT NULL,
    last_update INTEGER NOT NULL,
    axon TEXT,
    validator_permit INTEGER NOT NULL,
    rank REAL NOT NULL,
    trust REAL NOT NULL,
    consensus REAL NOT NULL,
    incentive REAL NOT NULL,
    dividends REAL NOT NULL,
    validator_trust REAL NOT NULL,
    emission INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS weights (src INTEGER NOT NULL, dst INTEGER NOT NULL, value INTEGER NOT NULL, PRIMARY KEY (src, dst));
CREATE TABLE IF NOT EXISTS bonds (src INTEGER NOT NULL, dst INTEGER NOT NULL, value REAL NOT NULL, PRIMARY KEY (src, dst));
CREATE TABLE IF NOT EXISTS manifests (id TEXT PRIMARY KEY, document TEXT NOT NULL, published_at INTEGER NOT NULL);
";

#[derive(Clone)]
struct State {
    block: BlockNumber,
    params: Hyperparams,
    owner: Hotkey,
    balances: BTreeMap<Hotkey, u64>,
    /// Indexed by uid; uids are dense `0..len`.
    neurons: Vec<NeuronInfo>,
    weights: Vec<Vec<(Uid, u16)>>,
    /// Sparse bonds per validator row.
    bonds: Vec<Vec<(Uid, f64)>>,
    /// Which manifests the subnet serves when (stored in `meta`).
    schedule: ModelSchedule,
}

struct Inner {
    conn: Connection,
    state: State,
}

/// See the module docs. Cheap to share behind an `Arc`.
pub struct LocalChain {
    inner: Mutex<Inner>,
    blocks: watch::Sender<BlockNumber>,
}

fn storage(e: impl std::fmt::Display) -> ChainError {
    ChainError::Storage(e.to_string())
}

impl LocalChain {
    /// Opens the chain stored at `path`, creating it with `params` and
    /// `owner` (the subnet owner's coldkey) if the file is new. An existing
    /// chain keeps its own parameters; they are never silently replaced.
    pub fn open(path: &Path, params: Hyperparams, owner: Hotkey) -> Result<Self, ChainError> {
        let conn = Connection::open(path)?;
        Self::from_connection(conn, params, owner)
    }

    /// A chain that lives only in memory (tests, benchmarks).
    pub fn in_memory(params: Hyperparams, owner: Hotkey) -> Result<Self, ChainError> {
        Self::from_connection(Connection::open_in_memory()?, params, owner)
    }

    fn from_connection(
        mut conn: Connection,
        params: Hyperparams,
        owner: Hotkey,
    ) -> Result<Self, ChainError> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(SCHEMA)?;
        validate_params(&params)?;
        let state = {
            let tx = conn.transaction()?;
            let existing: Option<String> = tx
                .query_row("SELECT value FROM meta WHERE key = 'params'", [], |r| {
                    r.get(0)
                })
                .optional()?;
            let state = match existing {
                Some(_) => load_state(&tx)?,
                None => {
                    let meta = [
                        ("params", serde_json::to_string(&params).map_err(storage)?),
                        ("owner", owner.to_ss58()),
                        ("block", "0".to_string()),
                    ];
                    for (k, v) in meta {
                        tx.execute(
                            "INSERT INTO meta (key, value) VALUES (?1, ?2)",
                            params![k, v],
                        )?;
                    }
                    State {
                        block: 0,
                        params,
                        owner,
                        balances: BTreeMap::new(),
                        neurons: Vec::new(),
                        weights: Vec::new(),
                        bonds: Vec::new(),
                        schedule: ModelSchedule::default(),
                    }
                }
            };
            tx.commit()?;
            state
        };
        let (blocks, _) = watch::channel(state.block);
        Ok(LocalChain {
            inner: Mutex::new(Inner { conn, state }),
            blocks,
        })
    }

    fn with_state<T>(
        &self,
        change: impl FnOnce(&mut State, &Transaction) -> Result<T, ChainError>,
    ) -> Result<T, ChainError> {
        let mut inner = self
            .inner
            .lock()
            .map_err(|_| storage("chain state lock poisoned"))?;
        let Inner { conn, state } = &mut *inner;
        let mut next = state.clone();
        let tx = conn.transaction()?;
        let out = change(&mut next, &tx)?;
        tx.commit()?;
        *state = next;
        Ok(out)
    }

    fn read<T>(&self, f: impl FnOnce(&State) -> T) -> Result<T, ChainError> {
        let inner = self
            .inner
            .lock()
            .map_err(|_| storage("chain state lock poisoned"))?;
        Ok(f(&inner.state))
    }

    /// Produces the next block, running an epoch when it is a tempo boundary.
    pub fn produce_block(&self) -> Result<BlockNumber, ChainError> {
        let block = self.with_state(|s, tx| {
            s.block += 1;
            tx.execute(
                "UPDATE meta SET value = ?1 WHERE key = 'block'",
                params![s.block.to_string()],
            )?;
            if s.params.tempo > 0 && s.block % s.params.tempo == 0 {
                run_epoch(s, tx)?;
            }
            Ok(s.block)
        })?;
        self.blocks.send_replace(block);
        Ok(block)
    }

    /// Produces `n` blocks; returns the last.
    pub fn produce_blocks(&self, n: u64) -> Result<BlockNumber, ChainError> {
        let mut last = self.read(|s| s.block)?;
        for _ in 0..n {
            last = self.produce_block()?;
        }
        Ok(last)
    }

    /// Produces a block every `interval` until the returned task is aborted.
    pub fn spawn_block_producer(
        self: &Arc<Self>,
        interval: Duration,
    ) -> tokio::task::JoinHandle<()> {
        let chain = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let c = Arc::clone(&chain);
                match tokio::task::spawn_blocking(move || c.produce_block()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::error!(error = %e, "producing a block failed"),
                    Err(e) => tracing::error!(error = %e, "block producer panicked"),
                }
            }
        })
    }

    /// The key this chain's HTTP server signs as and is addressed by;
    /// created on first use and kept in the chain file, so clients' signed
    /// writes stay valid across restarts.
    pub fn node_key(&self) -> Result<Keypair, ChainError> {
        self.with_state(|_, tx| {
            let stored: Option<String> = tx
                .query_row(
                    "SELECT value FROM meta WHERE key = 'node_phrase'",
                    [],
                    |r| r.get(0),
                )
                .optional()?;
            let phrase = match stored {
                Some(p) => p,
                None => {
                    let (phrase, _) = Keypair::generate(12).map_err(storage)?;
                    tx.execute(
                        "INSERT INTO meta (key, value) VALUES ('node_phrase', ?1)",
                        params![phrase],
                    )?;
                    phrase
                }
            };
            Keypair::from_phrase(&phrase, None).map_err(storage)
        })
    }

    pub fn owner(&self) -> Result<Hotkey, ChainError> {
        self.read(|s| s.owner)
    }

    /// Last weights set by `uid` (as stored: normalised to max 65535).
    pub fn weights_of(&self, uid: Uid) -> Result<Vec<(Uid, u16)>, ChainError> {
        self.read(|s| s.weights.get(uid as usize).cloned().unwrap_or_default())
    }

    /// Checks SQLite's own integrity of the chain file.
    pub fn integrity_check(&self) -> Result<(), ChainError> {
        let inner = self
            .inner
            .lock()
            .map_err(|_| storage("chain state lock poisoned"))?;
        let result: String = inner
            .conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
        if result == "ok" {
            Ok(())
        } else {
            Err(ChainError::Storage(format!("integrity check: {result}")))
        }
    }

    // The `*_signed_by` calls apply an extrinsic whose signer the caller has
    // already authenticated (in-process: held the key; over HTTP: btauth).

    pub fn register_signed_by(&self, coldkey: &Hotkey, hotkey: &Hotkey) -> Result<Uid, ChainError> {
        self.with_state(|s, tx| {
            if let Some(n) = s.neurons.iter().find(|n| &n.hotkey == hotkey) {
                return Err(ChainError::AlreadyRegistered(*hotkey, n.uid));
            }
            let burn = s.params.burn.0;
            let have = balance_of(s, tx, coldkey)?;
            if have < burn {
                return Err(ChainError::InsufficientBalance {
                    need: Rao(burn),
                    have: Rao(have),
                });
            }
            let uid = if s.neurons.len() < s.params.max_uids as usize {
                s.neurons.len() as Uid
            } else {
                let uid = neuron_to_prune(s)?;
                // The pruned hotkey's stake goes back to its coldkey.
                let old = s.neurons[uid as usize].clone();
                let back = balance_of(s, tx, &old.coldkey)? + old.stake.0;
                set_balance(s, tx, &old.coldkey, back)?;
                uid
            };
            set_balance(s, tx, coldkey, have - burn)?;
            let neuron = NeuronInfo {
                uid,
                hotkey: *hotkey,
                coldkey: *coldkey,
                stake: Rao(0),
                axon: None,
                validator_permit: false,
                rank: 0.0,
                trust: 0.0,
                consensus: 0.0,
                incentive: 0.0,
                dividends: 0.0,
                validator_trust: 0.0,
                emission: Rao(0),
                registered_at: s.block,
                last_update: s.block,
            };
            if uid as usize == s.neurons.len() {
                s.neurons.push(neuron);
                s.weights.push(Vec::new());
                s.bonds.push(Vec::new());
            } else {
                s.neurons[uid as usize] = neuron;
                s.weights[uid as usize].clear();
                s.bonds[uid as usize].clear();
            }
            tx.execute("DELETE FROM weights WHERE src = ?1", params![uid])?;
            tx.execute("DELETE FROM bonds WHERE src = ?1", params![uid])?;
            write_neuron(tx, &s.neurons[uid as usize])?;
            Ok(uid)
        })
    }

    pub fn serve_axon_signed_by(&self, hk: &Hotkey, axon: AxonInfo) -> Result<(), ChainError> {
        self.with_state(|s, tx| {
            let n = s
                .neurons
                .iter_mut()
                .find(|n| &n.hotkey == hk)
                .ok_or(ChainError::NotRegistered(*hk))?;
            n.axon = Some(axon);
            write_neuron(tx, n)
        })
    }

    pub fn set_weights_signed_by(
        &self,
        hk: &Hotkey,
        weights: &[(Uid, u16)],
        version_key: u64,
    ) -> Result<(), ChainError> {
        self.with_state(|s, tx| {
            let uid = s
                .neurons
                .iter()
                .find(|n| &n.hotkey == hk)
                .map(|n| n.uid)
                .ok_or(ChainError::NotRegistered(*hk))?;
            if version_key < s.params.weights_version_key {
                return Err(ChainError::VersionKeyTooOld {
                    got: version_key,
                    need: s.params.weights_version_key,
                });
            }
            let neuron = &s.neurons[uid as usize];
            let self_only = weights.iter().all(|&(dst, _)| dst == uid);
            if !neuron.validator_permit && !self_only {
                return Err(ChainError::NoValidatorPermit(*hk));
            }
            // The first weights after registration are never rate limited.
            let has_set = !s.weights[uid as usize].is_empty();
            let next = neuron.last_update + s.params.weights_rate_limit;
            if has_set && s.block < next {
                return Err(ChainError::WeightsRateLimited {
                    last: neuron.last_update,
                    next,
                });
            }
            let count = s.neurons.len();
            let min = if self_only {
                1
            } else {
                s.params.min_allowed_weights
            };
            let row = normalize_weights(weights, |u| (u as usize) < count, min)?;
            tx.execute("DELETE FROM weights WHERE src = ?1", params![uid])?;
            let mut insert =
                tx.prepare("INSERT INTO weights (src, dst, value) VALUES (?1, ?2, ?3)")?;
            for &(dst, v) in &row {
                insert.execute(params![uid, dst, v])?;
            }
            s.weights[uid as usize] = row;
            let neuron = &mut s.neurons[uid as usize];
            neuron.last_update = s.block;
            write_neuron(tx, neuron)
        })
    }

    pub fn add_stake_signed_by(
        &self,
        ck: &Hotkey,
        hotkey: &Hotkey,
        amount: Rao,
    ) -> Result<(), ChainError> {
        if amount.0 == 0 {
            return Err(ChainError::Invalid("stake amount must be positive".into()));
        }
        self.with_state(|s, tx| {
            let idx = s
                .neurons
                .iter()
                .position(|n| &n.hotkey == hotkey)
                .ok_or(ChainError::NotRegistered(*hotkey))?;
            if &s.neurons[idx].coldkey != ck {
                return Err(ChainError::NotOwner {
                    hotkey: *hotkey,
                    owner: s.neurons[idx].coldkey,
                });
            }
            let have = balance_of(s, tx, ck)?;
            if have < amount.0 {
                return Err(ChainError::InsufficientBalance {
                    need: amount,
                    have: Rao(have),
                });
            }
            set_balance(s, tx, ck, have - amount.0)?;
            let n = &mut s.neurons[idx];
            n.stake = Rao(n.stake.0.saturating_add(amount.0));
            write_neuron(tx, n)
        })
    }
}

impl LocalChain {
    /// The model schedule as of the current block.
    pub fn model_schedule_now(&self) -> Result<(BlockNumber, ModelSchedule), ChainError> {
        self.read(|s| (s.block, s.schedule.clone()))
    }

    /// A published manifest by id, from the chain file.
    pub fn manifest_by_id(&self, id: &ManifestId) -> Result<Option<ModelManifest>, ChainError> {
        let inner = self
            .inner
            .lock()
            .map_err(|_| storage("chain state lock poisoned"))?;
        let doc: Option<String> = inner
            .conn
            .query_row(
                "SELECT document FROM manifests WHERE id = ?1",
                params![id.to_string()],
                |r| r.get(0),
            )
            .optional()?;
        doc.map(|d| {
            let m = ModelManifest::parse(&d).map_err(storage)?;
            if m.id() != *id {
                return Err(storage(format!(
                    "manifest stored as {id} hashes to {}",
                    m.id()
                )));
            }
            Ok(m)
        })
        .transpose()
    }

    /// Stores `manifest` so every role can read it by id; only the subnet
    /// owner may. Publishing the same manifest again changes nothing.
    pub fn publish_manifest_signed_by(
        &self,
        signer: &Hotkey,
        manifest: &ModelManifest,
    ) -> Result<ManifestId, ChainError> {
        manifest
            .validate()
            .map_err(|e| ChainError::Invalid(e.to_string()))?;
        let id = manifest.id();
        let document =
            String::from_utf8(manifest.canonical_bytes()).map_err(|e| storage(e.to_string()))?;
        self.with_state(|s, tx| {
            require_owner(s, signer)?;
            tx.execute(
                "INSERT OR IGNORE INTO manifests (id, document, published_at) VALUES (?1, ?2, ?3)",
                params![id.to_string(), document, s.block as i64],
            )?;
            Ok(id)
        })
    }

    /// Adds `up` to the model schedule; only the subnet owner may, only for
    /// a published manifest, and only as [`ModelSchedule::with_upgrade`]
    /// allows at the current block.
    pub fn schedule_upgrade_signed_by(
        &self,
        signer: &Hotkey,
        up: Upgrade,
    ) -> Result<ModelSchedule, ChainError> {
        self.with_state(|s, tx| {
            require_owner(s, signer)?;
            let published: Option<i64> = tx
                .query_row(
                    "SELECT 1 FROM manifests WHERE id = ?1",
                    params![up.manifest.to_string()],
                    |r| r.get(0),
                )
                .optional()?;
            if published.is_none() {
                return Err(ChainError::UnknownManifest(up.manifest));
            }
            let next = s.schedule.with_upgrade(up, s.block)?;
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('model_schedule', ?1)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                params![serde_json::to_string(&next).map_err(storage)?],
            )?;
            s.schedule = next.clone();
            Ok(next)
        })
    }
}

fn require_owner(s: &State, signer: &Hotkey) -> Result<(), ChainError> {
    if signer == &s.owner {
        Ok(())
    } else {
        Err(ChainError::NotSubnetOwner {
            signer: *signer,
            owner: s.owner,
        })
    }
}

fn validate_params(p: &Hyperparams) -> Result<(), ChainError> {
    let bad = |what: &str| Err(ChainError::Invalid(format!("hyperparameter {what}")));
    if p.max_uids == 0 || p.max_validators == 0 {
        return bad("max_uids and max_validators must be positive");
    }
    if p.tempo == 0 {
        return bad("tempo must be positive");
    }
    if !(0.0..=1.0).contains(&p.kappa) || !(0.0..=1.0).contains(&p.owner_cut) {
        return bad("kappa and owner_cut must be in [0, 1]");
    }
    if p.bonds_moving_average > 1_000_000 {
        return bad("bonds_moving_average must be at most 1000000");
    }
    Ok(())
}

/// Free balance; a coldkey seen for the first time receives the dev faucet.
fn balance_of(s: &mut State, tx: &Transaction, coldkey: &Hotkey) -> Result<u64, ChainError> {
    if let Some(b) = s.balances.get(coldkey) {
        return Ok(*b);
    }
    let grant = s.params.dev_faucet.0;
    set_balance(s, tx, coldkey, grant)?;
    Ok(grant)
}

fn set_balance(
    s: &mut State,
    tx: &Transaction,
    coldkey: &Hotkey,
    rao: u64,
) -> Result<(), ChainError> {
    s.balances.insert(*coldkey, rao);
    tx.execute(
        "INSERT INTO balances (coldkey, rao) VALUES (?1, ?2)
         ON CONFLICT(coldkey) DO UPDATE SET rao = excluded.rao",
        params![coldkey.to_ss58(), rao as i64],
    )?;
    Ok(())
}

/// The lowest pruning score (last epoch's emission) among neurons past
/// their immunity period; ties go to the earliest registered, then the
/// lowest uid. When every neuron is still immune, registration is refused.
fn neuron_to_prune(s: &State) -> Result<Uid, ChainError> {
    let immune_until = |n: &NeuronInfo| n.registered_at + s.params.immunity_period;
    s.neurons
        .iter()
        .filter(|n| immune_until(n) <= s.block)
        .min_by_key(|n| (n.emission.0, n.registered_at, n.uid))
        .map(|n| n.uid)
        .ok_or_else(|| ChainError::SubnetFull {
            retry_at: s.neurons.iter().map(immune_until).min().unwrap_or(s.block),
        })
}

fn write_neuron(tx: &Transaction, n: &NeuronInfo) -> Result<(), ChainError> {
    let axon = n
        .axon
        .as_ref()
        .map(|a| serde_json::to_string(a).expect("axon serialises"));
    tx.execute(
        "INSERT OR REPLACE INTO neurons (uid, hotkey, coldkey, stake, registered_at, last_update, axon,
            validator_permit, rank, trust, consensus, incentive, dividends, validator_trust, emission)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
        params![
            n.uid,
            n.hotkey.to_ss58(),
            n.coldkey.to_ss58(),
            n.stake.0 as i64,
            n.registered_at as i64,
            n.last_update as i64,
            axon,
            n.validator_permit,
            n.rank,
            n.trust,
            n.consensus,
            n.incentive,
            n.dividends,
            n.validator_trust,
            n.emission.0 as i64,
        ],
    )?;
    Ok(())
}

fn parse_key(s: String) -> Result<Hotkey, ChainError> {
    Hotkey::from_ss58(&s)
        .map_err(|e| ChainError::Storage(format!("bad key {s:?} in chain file: {e}")))
}

fn load_state(tx: &Transaction) -> Result<State, ChainError> {
    let meta = |key: &str| -> Result<String, ChainError> {
        Ok(
            tx.query_row("SELECT value FROM meta WHERE key = ?1", params![key], |r| {
                r.get(0)
            })?,
        )
    };
    let params: Hyperparams = serde_json::from_str(&meta("params")?).map_err(storage)?;
    let owner = parse_key(meta("owner")?)?;
    let block: BlockNumber = meta("block")?.parse().map_err(storage)?;

    let mut balances = BTreeMap::new();
    let mut stmt = tx.prepare("SELECT coldkey, rao FROM balances")?;
    for row in stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))? {
        let (k, v) = row?;
        balances.insert(parse_key(k)?, v as u64);
    }

    let mut neurons = Vec::new();
    let mut stmt = tx.prepare(
        "SELECT uid, hotkey, coldkey, stake, registered_at, last_update, axon, validator_permit,
                rank, trust, consensus, incentive, dividends, validator_trust, emission
         FROM neurons ORDER BY uid",
    )?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let uid: Uid = r.get(0)?;
        if uid as usize != neurons.len() {
            return Err(ChainError::Storage(format!("uids are not dense at {uid}")));
        }
        let axon: Option<String> = r.get(6)?;
        neurons.push(NeuronInfo {
            uid,
            hotkey: parse_key(r.get(1)?)?,
            coldkey: parse_key(r.get(2)?)?,
            stake: Rao(r.get::<_, i64>(3)? as u64),
            registered_at: r.get::<_, i64>(4)? as u64,
            last_update: r.get::<_, i64>(5)? as u64,
            axon: axon
                .map(|a| serde_json::from_str(&a))
                .transpose()
                .map_err(storage)?,
            validator_permit: r.get(7)?,
            rank: r.get(8)?,
            trust: r.get(9)?,
            consensus: r.get(10)?,
            incentive: r.get(11)?,
            dividends: r.get(12)?,
            validator_trust: r.get(13)?,
            emission: Rao(r.get::<_, i64>(14)? as u64),
        });
    }
    let n = neurons.len();
    let mut weights = vec![Vec::new(); n];
    let mut stmt = tx.prepare("SELECT src, dst, value FROM weights ORDER BY src, dst")?;
    for row in stmt.query_map([], |r| {
        Ok((
            r.get::<_, u16>(0)?,
            r.get::<_, u16>(1)?,
            r.get::<_, u16>(2)?,
        ))
    })? {
        let (src, dst, v) = row?;
        weights
            .get_mut(src as usize)
            .ok_or_else(|| storage(format!("weights row for unknown uid {src}")))?
            .push((dst, v));
    }
    let mut bonds = vec![Vec::new(); n];
    let mut stmt = tx.prepare("SELECT src, dst, value FROM bonds ORDER BY src, dst")?;
    for row in stmt.query_map([], |r| {
        Ok((
            r.get::<_, u16>(0)?,
            r.get::<_, u16>(1)?,
            r.get::<_, f64>(2)?,
        ))
    })? {
        let (src, dst, v) = row?;
        bonds
            .get_mut(src as usize)
            .ok_or_else(|| storage(format!("bonds row for unknown uid {src}")))?
            .push((dst, v));
    }
    // Chains created before the schedule existed have no row: nothing scheduled.
    let schedule = match tx
        .query_row(
            "SELECT value FROM meta WHERE key = 'model_schedule'",
            [],
            |r| r.get::<_, String>(0),
        )
        .optional()?
    {
        Some(json) => {
            let s: ModelSchedule = serde_json::from_str(&json).map_err(storage)?;
            s.validate().map_err(storage)?;
            s
        }
        None => ModelSchedule::default(),
    };
    Ok(State {
        block,
        params,
        owner,
        balances,
        neurons,
        weights,
        bonds,
        schedule,
    })
}

fn run_epoch(s: &mut State, tx: &Transaction) -> Result<(), ChainError> {
    let n = s.neurons.len();
    if n == 0 {
        return Ok(());
    }
    let mut dense_bonds = vec![vec![0.0; n]; n];
    for (i, row) in s.bonds.iter().enumerate() {
        for &(j, v) in row {
            if (j as usize) < n {
                dense_bonds[i][j as usize] = v;
            }
        }
    }
    let input = EpochInput {
        block: s.block,
        stake: s.neurons.iter().map(|x| x.stake.0 as f64).collect(),
        last_update: s.neurons.iter().map(|x| x.last_update).collect(),
        registered_at: s.neurons.iter().map(|x| x.registered_at).collect(),
        validator_permit: s.neurons.iter().map(|x| x.validator_permit).collect(),
        weights: s.weights.clone(),
        bonds: dense_bonds,
        kappa: s.params.kappa,
        bonds_moving_average: s.params.bonds_moving_average,
        activity_cutoff: s.params.activity_cutoff,
        max_validators: s.params.max_validators,
    };
    let out = yuma::epoch(&input);
    let emission = s.params.block_emission.0.saturating_mul(s.params.tempo);
    let pay = yuma::payout(emission, s.params.owner_cut, &out);

    for (i, neuron) in s.neurons.iter_mut().enumerate() {
        neuron.rank = out.rank[i];
        neuron.trust = out.trust[i];
        neuron.consensus = out.consensus[i];
        neuron.incentive = out.incentive[i];
        neuron.dividends = out.dividends[i];
        neuron.validator_trust = out.validator_trust[i];
        neuron.validator_permit = out.validator_permit[i];
        neuron.emission = Rao(pay.neurons[i]);
        // Emission is staked to the hotkey that earned it, as on Bittensor.
        neuron.stake = Rao(neuron.stake.0.saturating_add(pay.neurons[i]));
        write_neuron(tx, neuron)?;
    }
    let owner = s.owner;
    let owner_balance = balance_of(s, tx, &owner)?.saturating_add(pay.owner);
    set_balance(s, tx, &owner, owner_balance)?;

    tx.execute("DELETE FROM bonds", [])?;
    let mut insert = tx.prepare("INSERT INTO bonds (src, dst, value) VALUES (?1, ?2, ?3)")?;
    for (i, row) in out.bonds.iter().enumerate() {
        s.bonds[i] = row
            .iter()
            .enumerate()
            .filter(|(_, v)| **v > 0.0)
            .map(|(j, v)| (j as Uid, *v))
            .collect();
        for &(j, v) in &s.bonds[i] {
            insert.execute(params![i as Uid, j, v])?;
        }
    }
    tracing::debug!(block = s.block, neurons = n, "epoch");
    Ok(())
}

#[async_trait]
impl Chain for LocalChain {
    async fn block(&self) -> Result<BlockNumber, ChainError> {
        self.read(|s| s.block)
    }

    async fn wait_for_block_after(
        &self,
        block: BlockNumber,
        timeout: Duration,
    ) -> Result<BlockNumber, ChainError> {
        let mut rx = self.blocks.subscribe();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|b| *b > block)).await;
        let current = *rx.borrow();
        Ok(current)
    }

    async fn hyperparams(&self) -> Result<Hyperparams, ChainError> {
        self.read(|s| s.params.clone())
    }

    async fn metagraph(&self) -> Result<Metagraph, ChainError> {
        self.read(|s| Metagraph {
            block: s.block,
            netuid: s.params.netuid,
            neurons: s.neurons.clone(),
        })
    }

    async fn register(&self, coldkey: &Keypair, hotkey: &Hotkey) -> Result<Uid, ChainError> {
        self.register_signed_by(&coldkey.hotkey(), hotkey)
    }

    async fn serve_axon(&self, hotkey: &Keypair, axon: AxonInfo) -> Result<(), ChainError> {
        self.serve_axon_signed_by(&hotkey.hotkey(), axon)
    }

    async fn set_weights(
        &self,
        hotkey: &Keypair,
        weights: &[(Uid, u16)],
        version_key: u64,
    ) -> Result<(), ChainError> {
        self.set_weights_signed_by(&hotkey.hotkey(), weights, version_key)
    }

    async fn add_stake(
        &self,
        coldkey: &Keypair,
        hotkey: &Hotkey,
        amount: Rao,
    ) -> Result<(), ChainError> {
        self.add_stake_signed_by(&coldkey.hotkey(), hotkey, amount)
    }

    async fn model_schedule(&self) -> Result<ModelSchedule, ChainError> {
        Ok(self.model_schedule_now()?.1)
    }

    async fn manifest(&self, id: &ManifestId) -> Result<Option<ModelManifest>, ChainError> {
        self.manifest_by_id(id)
    }

    async fn publish_manifest(
        &self,
        owner: &Keypair,
        manifest: &ModelManifest,
    ) -> Result<ManifestId, ChainError> {
        self.publish_manifest_signed_by(&owner.hotkey(), manifest)
    }

    async fn schedule_upgrade(
        &self,
        owner: &Keypair,
        up: Upgrade,
    ) -> Result<ModelSchedule, ChainError> {
        self.schedule_upgrade_signed_by(&owner.hotkey(), up)
    }

    async fn balance(&self, coldkey: &Hotkey) -> Result<Rao, ChainError> {
        self.read(|s| {
            Rao(s
                .balances
                .get(coldkey)
                .copied()
                .unwrap_or(s.params.dev_faucet.0))
        })
    }
}
