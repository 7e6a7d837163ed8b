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

use std::collections::BTreeMap;
use std::path::Path;

use fractal_protocol::Hotkey;
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
CREATE TABLE IF NOT EXISTS provers (
    hotkey TEXT PRIMARY KEY,
    score REAL NOT NULL,
    service_ema_ms REAL,
    jobs INTEGER NOT NULL,
    passed INTEGER NOT NULL,
    failed INTEGER NOT NULL,
    unavailable INTEGER NOT NULL,
    failed_epoch INTEGER
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
    verify_ms INTEGER
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
        Ok(Store { conn })
    }

    pub fn score(&self, hotkey: &Hotkey) -> Result<Option<ProverScore>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT score, service_ema_ms, jobs, passed, failed, unavailable, failed_epoch
                 FROM provers WHERE hotkey = ?1",
                params![hotkey.to_ss58()],
                |r| {
                    Ok(ProverScore {
                        hotkey: *hotkey,
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

    pub fn scores(&self) -> Result<Vec<ProverScore>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT hotkey FROM provers ORDER BY hotkey")?;
        let keys: Vec<String> = stmt
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        let mut out = Vec::new();
        for k in keys {
            if let Ok(h) = Hotkey::from_ss58(&k) {
                if let Some(s) = self.score(&h)? {
                    out.push(s);
                }
            }
        }
        Ok(out)
    }

    /// Records one outcome and updates the prover's score in one transaction.
    pub fn record(&mut self, o: &Outcome) -> Result<ProverScore, StoreError> {
        let fastest: Option<f64> = self
            .conn
            .query_row(
                "SELECT MIN(service_ema_ms) FROM provers WHERE score > 0 AND service_ema_ms IS NOT NULL",
                [],
                |r| r.get(0),
            )
            .optional()?
            .flatten();
        let mut s = self.score(&o.hotkey)?.unwrap_or(ProverScore {
            hotkey: o.hotkey,
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
            "INSERT INTO provers (hotkey, score, service_ema_ms, jobs, passed, failed, unavailable, failed_epoch)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT(hotkey) DO UPDATE SET score = excluded.score, service_ema_ms = excluded.service_ema_ms,
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
                s.failed_epoch.map(|e| e as i64)
            ],
        )?;
        tx.execute(
            "INSERT INTO audits (at_ms, epoch, hotkey, job_id, passed, check_name, detail, service_ms, verify_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                o.at_ms as i64,
                o.epoch as i64,
                o.hotkey.to_ss58(),
                o.job_id,
                o.failed.is_none(),
                o.failed.as_ref().map(|f| f.0.as_str()),
                o.failed.as_ref().map(|f| f.1.as_str()),
                o.service_ms.map(|v| v as i64),
                o.verify_ms.map(|v| v as i64)
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

    /// The weight a prover earns in `epoch` (before normalisation).
    pub fn weight(s: &ProverScore, epoch: u64) -> f64 {
        match s.failed_epoch {
            Some(e) if epoch <= e + 1 => 0.0,
            _ => s.score,
        }
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

    fn outcome(h: Hotkey, epoch: u64, failed: Option<Check>, ms: u64) -> Outcome {
        Outcome {
            hotkey: h,
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
        let f = s.score(&fast).unwrap().unwrap();
        let sl = s.score(&slow).unwrap().unwrap();
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
}
