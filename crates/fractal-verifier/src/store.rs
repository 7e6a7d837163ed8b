//! Scores and audit history, in SQLite so they survive restarts.
//!
//! Scoring (ours to define, stable):
//! * every challenged job yields a quality `q`: 0 when the prover failed a
//!   check, was late or unavailable; otherwise `0.5 + 0.5 · fastest / own`,
//!   where both are EMAs of the prover's service time, so the fastest
//!   honest node gets 1 and a node half as fast 0.75;
//! * `score ← (1 - α)·score + α·q` with α = [`SCORE_ALPHA`];
//! * a failed correctness check (anything but `unavailable`) resets the
//!   score to 0 and zeroes the node's weight for the epoch it happened in
//!   and the next one, whatever its EMA says afterwards.
//!
//! Scores are kept per prover *and model* (manifest): a node's speed under
//! one model says nothing of another, so "fastest" compares nodes running
//! the same model. The weight a prover earns combines them
//! ([`Store::combined_weight`]): its best score among the models the
//! schedule serves now, zero while any of its scores failed a check (a
//! cheat under one model is a cheat). A model the schedule retired earns
//! nothing, so a prover left on it alone drops to zero once the grace ends.

use std::collections::BTreeMap;
use std::path::Path;

use fractal_protocol::{Hotkey, ManifestId};
use rusqlite::{params, Connection, OptionalExtension};

use crate::audit::Check;

pub const SCORE_ALPHA: f64 = 0.2;
/// Weight given to a new latency sample in the service-time EMA.
const LATENCY_ALPHA: f64 = 0.3;

#[derive(Debug, thiserror::Error)]
#[error("verifier store: {0}")]
pub struct StoreError(#[from] rusqlite::Error);

#[derive(Clone, Debug, PartialEq)]
pub struct ProverScore {
    pub hotkey: Hotkey,
    /// The model these audits were run under.
    pub manifest_id: ManifestId,
    pub score: f64,
    pub service_ema_ms: Option<f64>,
    pub jobs: u64,
    pub passed: u64,
    pub failed: u64,
    pub unavailable: u64,
    /// The last epoch in which the node failed a correctness check.
    pub failed_epoch: Option<u64>,
}

/// One audited job.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub hotkey: Hotkey,
    pub manifest_id: ManifestId,
    pub job_id: String,
    pub epoch: u64,
    pub at_ms: u64,
    /// `None` when every check passed.
    pub failed: Option<(Check, String)>,
    pub service_ms: Option<u64>,
    pub verify_ms: Option<u64>,
}

pub struct Store {
    conn: Connection,
}

/// One audit as stored: the failed check (`None` = passed) and its detail.
pub type HistoryEntry = (Option<String>, Option<String>);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS scores (
    hotkey TEXT NOT NULL,
    manifest_id TEXT NOT NULL,
    score REAL NOT NULL,
    service_ema_ms REAL,
    jobs INTEGER NOT NULL,
    passed INTEGER NOT NULL,
    failed INTEGER NOT NULL,
    unavailable INTEGER NOT NULL,
    failed_epoch INTEGER,
    PRIMARY KEY (hotkey, manifest_id)
);
CREATE TABLE IF NOT EXISTS audits (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    hotkey TEXT NOT NULL,
    job_id TEXT NOT NULL,
    passed INTEGER NOT NULL,
    check_name TEXT,
    detail TEXT,
    service_ms INTEGER,
    verify_ms INTEGER,
    manifest_id TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS audits_by_hotkey ON audits (hotkey, id);
CREATE INDEX IF NOT EXISTS audits_by_epoch ON audits (epoch);
CREATE INDEX IF NOT EXISTS audits_by_job ON audits (job_id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
";

impl Store {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::init(Connection::open(path)?)
    }

    pub fn in_memory() -> Result<Self, StoreError> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(conn: Connection) -> Result<Self, StoreError> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.execute_batch(SCHEMA)?;
        let mut store = Store { conn };
        store.migrate_single_model()?;
        Ok(store)
    }

    /// Stores written before scores were kept per model hold one score per
    /// prover (table `provers`) and audits without a model: they move to
    /// `scores` under the empty model id, which [`Store::adopt_unscoped`]
    /// then gives the model the verifier ran back then.
    fn migrate_single_model(&mut self) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        let old: i64 = tx.query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'provers'",
            [],
            |r| r.get(0),
        )?;
        if old > 0 {
            tx.execute_batch(
                "INSERT OR IGNORE INTO scores (hotkey, manifest_id, score, service_ema_ms, jobs, passed, failed, unavailable, failed_epoch)
                 SELECT hotkey, '', score, service_ema_ms, jobs, passed, failed, unavailable, failed_epoch FROM provers;
                 DROP TABLE provers;",
            )?;
        }
        let audits_have_model: i64 = tx.query_row(
            "SELECT COUNT(*) FROM pragma_table_info('audits') WHERE name = 'manifest_id'",
            [],
            |r| r.get(0),
        )?;
        if audits_have_model == 0 {
            tx.execute_batch("ALTER TABLE audits ADD COLUMN manifest_id TEXT NOT NULL DEFAULT ''")?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Gives scores and audits recorded before models were told apart to
    /// `manifest` (the verifier's first model: the only one it had then).
    pub fn adopt_unscoped(&mut self, manifest: &ManifestId) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        let id = manifest.to_string();
        tx.execute(
            "UPDATE OR IGNORE scores SET manifest_id = ?1 WHERE manifest_id = ''",
            params![id],
        )?;
        tx.execute("DELETE FROM scores WHERE manifest_id = ''", [])?;
        tx.execute(
            "UPDATE audits SET manifest_id = ?1 WHERE manifest_id = ''",
            params![id],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// A prover's score under one model.
    pub fn score(
        &self,
        hotkey: &Hotkey,
        manifest: &ManifestId,
    ) -> Result<Option<ProverScore>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT score, service_ema_ms, jobs, passed, failed, unavailable, failed_epoch
                 FROM scores WHERE hotkey = ?1 AND manifest_id = ?2",
                params![hotkey.to_ss58(), manifest.to_string()],
                |r| {
                    Ok(ProverScore {
                        hotkey: *hotkey,
                        manifest_id: *manifest,
                        score: r.get(0)?,
                        service_ema_ms: r.get(1)?,
                        jobs: r.get::<_, i64>(2)? as u64,
                        passed: r.get::<_, i64>(3)? as u64,
                        failed: r.get::<_, i64>(4)? as u64,
                        unavailable: r.get::<_, i64>(5)? as u64,
                        failed_epoch: r.get::<_, Option<i64>>(6)?.map(|e| e as u64),
                    })
                },
            )
            .optional()?)
    }

    /// Every score, by prover then model.
    pub fn scores(&self) -> Result<Vec<ProverScore>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT hotkey, manifest_id FROM scores ORDER BY hotkey, manifest_id")?;
        let keys: Vec<(String, String)> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        let mut out = Vec::new();
        for (k, m) in keys {
            // Rows of an unparsable key or model (none are written) are
            // skipped rather than failing every read.
            if let (Ok(h), Ok(m)) = (Hotkey::from_ss58(&k), m.parse::<ManifestId>()) {
                if let Some(s) = self.score(&h, &m)? {
                    out.push(s);
                }
            }
        }
        Ok(out)
    }

    /// A prover's scores under every model it was audited with.
    pub fn scores_of(&self, hotkey: &Hotkey) -> Result<Vec<ProverScore>, StoreError> {
        Ok(self
            .scores()?
            .into_iter()
            .filter(|s| &s.hotkey == hotkey)
            .collect())
    }

    /// Records one outcome and updates the prover's score in one transaction.
    pub fn record(&mut self, o: &Outcome) -> Result<ProverScore, StoreError> {
        let fastest: Option<f64> = self
            .conn
            .query_row(
                "SELECT MIN(service_ema_ms) FROM scores
                 WHERE manifest_id = ?1 AND score > 0 AND service_ema_ms IS NOT NULL",
                params![o.manifest_id.to_string()],
                |r| r.get(0),
            )
            .optional()?
            .flatten();
        let mut s = self
            .score(&o.hotkey, &o.manifest_id)?
            .unwrap_or(ProverScore {
                hotkey: o.hotkey,
                manifest_id: o.manifest_id,
                score: 0.0,
                service_ema_ms: None,
                jobs: 0,
                passed: 0,
                failed: 0,
                unavailable: 0,
                failed_epoch: None,
            });
        s.jobs += 1;
        match &o.failed {
            None => {
                s.passed += 1;
                if let Some(ms) = o.service_ms {
                    let ms = (ms as f64).max(1.0);
                    s.service_ema_ms = Some(match s.service_ema_ms {
                        Some(e) => (1.0 - LATENCY_ALPHA) * e + LATENCY_ALPHA * ms,
                        None => ms,
                    });
                }
                let own = s.service_ema_ms.unwrap_or(1.0);
                let best = fastest.map_or(own, |f| f.min(own));
                let q = 0.5 + 0.5 * best / own;
                s.score = (1.0 - SCORE_ALPHA) * s.score + SCORE_ALPHA * q;
            }
            Some((Check::Unavailable, _)) => {
                s.unavailable += 1;
                s.score *= 1.0 - SCORE_ALPHA;
            }
            Some(_) => {
                s.failed += 1;
                s.score = 0.0;
                s.failed_epoch = Some(o.epoch);
            }
        }
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT INTO scores (hotkey, manifest_id, score, service_ema_ms, jobs, passed, failed, unavailable, failed_epoch)
             VALUES (?1, ?9, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT(hotkey, manifest_id) DO UPDATE SET score = excluded.score, service_ema_ms = excluded.service_ema_ms,
               jobs = excluded.jobs, passed = excluded.passed, failed = excluded.failed,
               unavailable = excluded.unavailable, failed_epoch = excluded.failed_epoch",
            params![
                o.hotkey.to_ss58(),
                s.score,
                s.service_ema_ms,
                s.jobs as i64,
                s.passed as i64,
                s.failed as i64,
                s.unavailable as i64,
                s.failed_epoch.map(|e| e as i64),
                o.manifest_id.to_string()
            ],
        )?;
        tx.execute(
            "INSERT INTO audits (at_ms, epoch, hotkey, job_id, passed, check_name, detail, service_ms, verify_ms, manifest_id)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                o.at_ms as i64,
                o.epoch as i64,
                o.hotkey.to_ss58(),
                o.job_id,
                o.failed.is_none(),
                o.failed.as_ref().map(|f| f.0.as_str()),
                o.failed.as_ref().map(|f| f.1.as_str()),
                o.service_ms.map(|v| v as i64),
                o.verify_ms.map(|v| v as i64),
                o.manifest_id.to_string()
            ],
        )?;
        tx.commit()?;
        Ok(s)
    }

    /// The audit recorded for `job_id`: `None` if there is none, else the
    /// failed check's name (`None`: passed).
    pub fn audit_of_job(&self, job_id: &str) -> Result<Option<Option<String>>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT check_name FROM audits WHERE job_id = ?1 ORDER BY id DESC LIMIT 1",
                params![job_id],
                |r| r.get::<_, Option<String>>(0),
            )
            .optional()?)
    }

    /// Audits each prover had in `epoch`: answered jobs that were checked,
    /// passed or failed (a job the prover never answered is not an audit).
    pub fn audits_in_epoch(&self, epoch: u64) -> Result<BTreeMap<String, u64>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT hotkey, COUNT(*) FROM audits WHERE epoch = ?1
             AND (check_name IS NULL OR check_name NOT IN ('unavailable', 'late'))
             GROUP BY hotkey",
        )?;
        let rows = stmt.query_map(params![epoch as i64], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The weight one score earns in `epoch` (before normalisation).
    pub fn weight(s: &ProverScore, epoch: u64) -> f64 {
        match s.failed_epoch {
            Some(e) if epoch <= e + 1 => 0.0,
            _ => s.score,
        }
    }

    /// The weight a prover earns in `epoch` from its scores (`of`, all of
    /// one prover) while the schedule serves `served`: its best score
    /// under a served model, zero while a check under any model failed
    /// this epoch or the last (or when it has no score under a served one).
    pub fn combined_weight(of: &[ProverScore], served: &[ManifestId], epoch: u64) -> f64 {
        Self::served_score(of, served, epoch).unwrap_or(0.0)
    }

    /// [`Store::combined_weight`], but `None` when the prover has no score
    /// under a served model (not audited under it yet: unknown, not bad).
    pub fn served_score(of: &[ProverScore], served: &[ManifestId], epoch: u64) -> Option<f64> {
        if of
            .iter()
            .any(|s| s.failed_epoch.is_some_and(|e| epoch <= e + 1))
        {
            return Some(0.0);
        }
        of.iter()
            .filter(|s| served.contains(&s.manifest_id))
            .map(|s| Self::weight(s, epoch))
            .reduce(f64::max)
    }

    /// Audit history of one prover, newest first.
    pub fn history(&self, hotkey: &Hotkey, limit: usize) -> Result<Vec<HistoryEntry>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT check_name, detail FROM audits WHERE hotkey = ?1 ORDER BY id DESC LIMIT ?2",
        )?;
        let rows = stmt
            .query_map(params![hotkey.to_ss58(), limit as i64], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    pub fn get_meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT value FROM meta WHERE key = ?1", params![key], |r| {
                r.get(0)
            })
            .optional()?)
    }

    pub fn set_meta(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            params![key, value],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fractal_protocol::Keypair;

    const A: ManifestId = ManifestId(fractal_protocol::Digest32([0xa; 32]));
    const B: ManifestId = ManifestId(fractal_protocol::Digest32([0xb; 32]));

    fn outcome(h: Hotkey, epoch: u64, failed: Option<Check>, ms: u64) -> Outcome {
        outcome_under(A, h, epoch, failed, ms)
    }

    fn outcome_under(
        manifest_id: ManifestId,
        h: Hotkey,
        epoch: u64,
        failed: Option<Check>,
        ms: u64,
    ) -> Outcome {
        Outcome {
            hotkey: h,
            manifest_id,
            job_id: "j".into(),
            epoch,
            at_ms: 0,
            failed: failed.map(|c| (c, "x".into())),
            service_ms: Some(ms),
            verify_ms: Some(1),
        }
    }

    #[test]
    fn faster_honest_nodes_score_higher_and_cheaters_are_zeroed_for_the_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sqlite");
        let fast = Keypair::from_seed(&[1; 32]).hotkey();
        let slow = Keypair::from_seed(&[2; 32]).hotkey();
        let cheat = Keypair::from_seed(&[3; 32]).hotkey();
        {
            let mut s = Store::open(&path).unwrap();
            for _ in 0..30 {
                s.record(&outcome(fast, 1, None, 100)).unwrap();
                s.record(&outcome(slow, 1, None, 200)).unwrap();
                s.record(&outcome(cheat, 1, None, 50)).unwrap();
            }
            let c = s.record(&outcome(cheat, 1, Some(Check::Step), 50)).unwrap();
            assert_eq!(c.score, 0.0);
            assert_eq!(Store::weight(&c, 1), 0.0);
            assert_eq!(Store::weight(&c, 2), 0.0);
        }
        // Reopened: nothing lost.
        let mut s = Store::open(&path).unwrap();
        let f = s.score(&fast, &A).unwrap().unwrap();
        let sl = s.score(&slow, &A).unwrap().unwrap();
        assert!(
            f.score > sl.score && sl.score > 0.5,
            "{} {}",
            f.score,
            sl.score
        );
        assert_eq!(f.jobs, 30);
        assert_eq!(s.history(&cheat, 1).unwrap()[0].0.as_deref(), Some("step"));
        // Unavailability decays the score without the epoch ban.
        let u = s
            .record(&outcome(fast, 2, Some(Check::Unavailable), 0))
            .unwrap();
        assert!(u.score < f.score && Store::weight(&u, 2) > 0.0);
        // A cheater that behaves two epochs later earns again.
        let c = s.record(&outcome(cheat, 3, None, 50)).unwrap();
        assert!(Store::weight(&c, 3) > 0.0);
    }

    #[test]
    fn scores_are_per_model_and_the_weight_is_the_best_served_one_unless_any_cheated() {
        let mut s = Store::in_memory().unwrap();
        let rolled = Keypair::from_seed(&[1; 32]).hotkey();
        let left_on_a = Keypair::from_seed(&[2; 32]).hotkey();
        for _ in 0..10 {
            s.record(&outcome_under(A, rolled, 1, None, 100)).unwrap();
            s.record(&outcome_under(A, left_on_a, 1, None, 100))
                .unwrap();
        }
        // Under B the rolled prover is the only (so the fastest) one, even
        // though B is slower than A: speed is compared within a model.
        s.record(&outcome_under(B, rolled, 2, None, 400)).unwrap();
        let b = s.score(&rolled, &B).unwrap().unwrap();
        assert!((b.score - SCORE_ALPHA).abs() < 1e-9, "{}", b.score);
        fn of(s: &Store, h: &Hotkey) -> Vec<ProverScore> {
            s.scores_of(h).unwrap()
        }
        // During the grace both models are served: the best counts.
        let a_score = s.score(&rolled, &A).unwrap().unwrap().score;
        assert_eq!(
            Store::combined_weight(&of(&s, &rolled), &[B, A], 2),
            a_score
        );
        // After it only B: the prover left on A earns nothing.
        assert_eq!(Store::combined_weight(&of(&s, &rolled), &[B], 3), b.score);
        assert_eq!(Store::combined_weight(&of(&s, &left_on_a), &[B], 3), 0.0);
        // For routing that is "not audited under B yet", not "bad".
        assert_eq!(Store::served_score(&of(&s, &left_on_a), &[B], 3), None);
        // A failed check under the retiring model zeroes the prover under
        // the new one too, for that epoch and the next.
        s.record(&outcome_under(A, rolled, 3, Some(Check::Step), 100))
            .unwrap();
        assert_eq!(Store::combined_weight(&of(&s, &rolled), &[B, A], 3), 0.0);
        assert_eq!(Store::combined_weight(&of(&s, &rolled), &[B], 4), 0.0);
        assert!(Store::combined_weight(&of(&s, &rolled), &[B], 5) > 0.0);
    }

    #[test]
    fn a_store_from_before_models_were_told_apart_keeps_its_scores_and_bans() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sqlite");
        let h = Keypair::from_seed(&[1; 32]).hotkey();
        {
            // The single-model schema, as earlier releases wrote it.
            let c = Connection::open(&path).unwrap();
            c.execute_batch(
                "CREATE TABLE provers (hotkey TEXT PRIMARY KEY, score REAL NOT NULL, service_ema_ms REAL,
                   jobs INTEGER NOT NULL, passed INTEGER NOT NULL, failed INTEGER NOT NULL,
                   unavailable INTEGER NOT NULL, failed_epoch INTEGER);
                 CREATE TABLE audits (id INTEGER PRIMARY KEY AUTOINCREMENT, at_ms INTEGER NOT NULL,
                   epoch INTEGER NOT NULL, hotkey TEXT NOT NULL, job_id TEXT NOT NULL, passed INTEGER NOT NULL,
                   check_name TEXT, detail TEXT, service_ms INTEGER, verify_ms INTEGER);",
            )
            .unwrap();
            c.execute(
                "INSERT INTO provers VALUES (?1, 0.0, 100.0, 5, 4, 1, 0, 7)",
                params![h.to_ss58()],
            )
            .unwrap();
            c.execute(
                "INSERT INTO audits (at_ms, epoch, hotkey, job_id, passed, check_name) VALUES (0, 7, ?1, 'j', 0, 'step')",
                params![h.to_ss58()],
            )
            .unwrap();
        }
        let mut s = Store::open(&path).unwrap();
        s.adopt_unscoped(&A).unwrap();
        let score = s.score(&h, &A).unwrap().unwrap();
        assert_eq!((score.jobs, score.failed_epoch), (5, Some(7)));
        assert_eq!(Store::combined_weight(&[score], &[A], 8), 0.0);
        assert_eq!(s.audits_in_epoch(7).unwrap().get(&h.to_ss58()), Some(&1));
        // New outcomes land next to it.
        s.record(&outcome(h, 9, None, 100)).unwrap();
        assert_eq!(s.score(&h, &A).unwrap().unwrap().jobs, 6);
        assert_eq!(s.scores().unwrap().len(), 1);
    }
}
