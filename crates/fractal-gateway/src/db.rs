//! The gateway's SQLite store: API keys (hashed) and jobs.
//!
//! A job is written here before the client hears "accepted", and every
//! state change is a single-row transaction, so a crash at any point
//! leaves each job queued, in progress (re-queued at start-up), completed
//! or failed — never lost, never half-written.

use std::path::Path;
use std::sync::Mutex;

use rand::RngCore;
use rusqlite::{params, Connection, OptionalExtension, Row};
use serde::Serialize;
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
#[error("gateway database: {0}")]
pub struct DbError(#[from] rusqlite::Error);

/// Per-key limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct KeyLimits {
    /// Requests of any kind per minute (status polls included).
    pub requests_per_min: u32,
    /// Video creations per minute.
    pub creates_per_min: u32,
    /// Jobs queued or in progress at once.
    pub max_active: u32,
    /// Videos per rolling 24 hours.
    pub daily_quota: u32,
}

impl Default for KeyLimits {
    fn default() -> Self {
        KeyLimits {
            requests_per_min: 6_000,
            creates_per_min: 30,
            max_active: 16,
            daily_quota: 1_000,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct ApiKey {
    /// Public id (`key_…`), safe to log and show.
    pub id: String,
    pub name: String,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
    pub limits: KeyLimits,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Queued,
    InProgress,
    Completed,
    Failed,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::InProgress => "in_progress",
            Status::Completed => "completed",
            Status::Failed => "failed",
        }
    }
    fn parse(s: &str) -> Status {
        match s {
            "queued" => Status::Queued,
            "in_progress" => Status::InProgress,
            "completed" => Status::Completed,
            _ => Status::Failed,
        }
    }
    pub fn is_terminal(self) -> bool {
        matches!(self, Status::Completed | Status::Failed)
    }
}

/// What an app asked for, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct JobSpec {
    pub prompt: String,
    pub negative_prompt: String,
    pub seed: u64,
    pub width: u32,
    pub height: u32,
    pub frames: u32,
    pub steps: u32,
    /// As the app will see it back ("1", "2.5").
    pub seconds: String,
    pub model: String,
    /// The manifest the job was accepted for: it is made by that model or
    /// not at all. Empty for jobs accepted before gateways recorded it
    /// (they are the gateway's own model's).
    pub manifest_id: String,
}

#[derive(Clone, Debug)]
pub struct Job {
    pub id: String,
    pub key_id: String,
    pub spec: JobSpec,
    pub status: Status,
    pub progress: u32,
    pub created_at: i64,
    pub completed_at: Option<i64>,
    pub expires_at: Option<i64>,
    pub error: Option<(String, String)>,
    pub prover: Option<String>,
    pub attempts: u32,
    /// Its files are gone (retention).
    pub expired: bool,
}

pub struct Db {
    conn: Mutex<Connection>,
}

/// What the winning prover's answer says about a completed video.
#[derive(Clone, Debug, PartialEq)]
pub struct Provenance {
    /// The job id of the request that produced it (each attempt has its
    /// own): what the verifier's audit records are keyed by.
    pub request_id: String,
    pub manifest_id: String,
    /// Hex.
    pub trace_root: String,
    pub guidance_scale: f64,
}

pub fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

const JOB_COLUMNS: &str = "id, key_id, prompt, negative_prompt, seed, width, height, frames, steps, seconds, model, status, progress, created_at, completed_at, expires_at, error_code, error_message, prover, attempts, expired, manifest_id";

fn job_from_row(r: &Row<'_>) -> rusqlite::Result<Job> {
    let code: Option<String> = r.get(16)?;
    let message: Option<String> = r.get(17)?;
    Ok(Job {
        id: r.get(0)?,
        key_id: r.get(1)?,
        spec: JobSpec {
            prompt: r.get(2)?,
            negative_prompt: r.get(3)?,
            seed: r.get::<_, i64>(4)? as u64,
            width: r.get(5)?,
            height: r.get(6)?,
            frames: r.get(7)?,
            steps: r.get(8)?,
            seconds: r.get(9)?,
            model: r.get(10)?,
            manifest_id: r.get(21)?,
        },
        status: Status::parse(&r.get::<_, String>(11)?),
        progress: r.get(12)?,
        created_at: r.get(13)?,
        completed_at: r.get(14)?,
        expires_at: r.get(15)?,
        error: code.map(|c| (c, message.unwrap_or_default())),
        prover: r.get(18)?,
        attempts: r.get(19)?,
        expired: r.get::<_, i64>(20)? != 0,
    })
}

impl Db {
    pub fn open(path: &Path) -> Result<Self, DbError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = FULL;
             CREATE TABLE IF NOT EXISTS api_keys (
                 id TEXT PRIMARY KEY,
                 name TEXT NOT NULL,
                 hash TEXT NOT NULL UNIQUE,
                 created_at INTEGER NOT NULL,
                 revoked_at INTEGER,
                 requests_per_min INTEGER NOT NULL,
                 creates_per_min INTEGER NOT NULL,
                 max_active INTEGER NOT NULL,
                 daily_quota INTEGER NOT NULL
             );
             CREATE TABLE IF NOT EXISTS jobs (
                 id TEXT PRIMARY KEY,
                 key_id TEXT NOT NULL,
                 prompt TEXT NOT NULL,
                 negative_prompt TEXT NOT NULL,
                 seed INTEGER NOT NULL,
                 width INTEGER NOT NULL,
                 height INTEGER NOT NULL,
                 frames INTEGER NOT NULL,
                 steps INTEGER NOT NULL,
                 seconds TEXT NOT NULL,
                 model TEXT NOT NULL,
                 status TEXT NOT NULL,
                 progress INTEGER NOT NULL DEFAULT 0,
                 created_at INTEGER NOT NULL,
                 completed_at INTEGER,
                 expires_at INTEGER,
                 error_code TEXT,
                 error_message TEXT,
                 prover TEXT,
                 attempts INTEGER NOT NULL DEFAULT 0,
                 expired INTEGER NOT NULL DEFAULT 0,
                 seq INTEGER NOT NULL,
                 manifest_id TEXT NOT NULL DEFAULT ''
             );
             CREATE INDEX IF NOT EXISTS jobs_by_key ON jobs (key_id, seq);
             CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, seq);
             -- A client that did not hear the answer to a create (its
             -- connection or the gateway died) retries with the same
             -- Idempotency-Key and gets the first job back, not a second.
             -- How a completed video was made, for its content credentials.
             CREATE TABLE IF NOT EXISTS provenance (
                 job_id TEXT PRIMARY KEY,
                 request_id TEXT NOT NULL,
                 manifest_id TEXT NOT NULL,
                 trace_root TEXT NOT NULL,
                 guidance_scale REAL NOT NULL
             );
             CREATE TABLE IF NOT EXISTS idempotency (
                 key_id TEXT NOT NULL,
                 idem TEXT NOT NULL,
                 job_id TEXT NOT NULL,
                 PRIMARY KEY (key_id, idem)
             );",
        )?;
        // Databases from before jobs recorded their model.
        let has_manifest: i64 = conn.query_row(
            "SELECT COUNT(*) FROM pragma_table_info('jobs') WHERE name = 'manifest_id'",
            [],
            |r| r.get(0),
        )?;
        if has_manifest == 0 {
            conn.execute_batch("ALTER TABLE jobs ADD COLUMN manifest_id TEXT NOT NULL DEFAULT ''")?;
        }
        Ok(Db {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().expect("db lock")
    }

    /// Creates a key and returns it with its secret (shown once; only its
    /// SHA-256 is stored).
    pub fn create_key(&self, name: &str, limits: KeyLimits) -> Result<(ApiKey, String), DbError> {
        let mut raw = [0u8; 24];
        rand::rngs::OsRng.fill_bytes(&mut raw);
        let secret = format!("fk-{}", hex::encode(raw));
        let hash = hash_secret(&secret);
        let key = ApiKey {
            id: format!("key_{}", &hash[..12]),
            name: name.to_string(),
            created_at: now_s(),
            revoked_at: None,
            limits,
        };
        self.conn().execute(
            "INSERT INTO api_keys (id, name, hash, created_at, requests_per_min, creates_per_min, max_active, daily_quota)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                key.id,
                key.name,
                hash,
                key.created_at,
                limits.requests_per_min,
                limits.creates_per_min,
                limits.max_active,
                limits.daily_quota
            ],
        )?;
        Ok((key, secret))
    }

    fn key_from_row(r: &Row<'_>) -> rusqlite::Result<ApiKey> {
        Ok(ApiKey {
            id: r.get(0)?,
            name: r.get(1)?,
            created_at: r.get(2)?,
            revoked_at: r.get(3)?,
            limits: KeyLimits {
                requests_per_min: r.get(4)?,
                creates_per_min: r.get(5)?,
                max_active: r.get(6)?,
                daily_quota: r.get(7)?,
            },
        })
    }

    /// The live (not revoked) key with this secret.
    pub fn key_by_secret(&self, secret: &str) -> Result<Option<ApiKey>, DbError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT id, name, created_at, revoked_at, requests_per_min, creates_per_min, max_active, daily_quota
                 FROM api_keys WHERE hash = ?1 AND revoked_at IS NULL",
                params![hash_secret(secret)],
                Self::key_from_row,
            )
            .optional()?)
    }

    pub fn keys(&self) -> Result<Vec<ApiKey>, DbError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, name, created_at, revoked_at, requests_per_min, creates_per_min, max_active, daily_quota
             FROM api_keys ORDER BY created_at, id",
        )?;
        let rows = stmt.query_map([], Self::key_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Revokes by public id; false if no such live key.
    pub fn revoke_key(&self, id: &str) -> Result<bool, DbError> {
        Ok(self.conn().execute(
            "UPDATE api_keys SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
            params![id, now_s()],
        )? == 1)
    }

    /// Jobs of `key_id` queued or in progress, and created in the last 24 h.
    pub fn usage(&self, key_id: &str) -> Result<(u32, u32), DbError> {
        let conn = self.conn();
        let active = conn.query_row(
            "SELECT COUNT(*) FROM jobs WHERE key_id = ?1 AND status IN ('queued', 'in_progress')",
            params![key_id],
            |r| r.get(0),
        )?;
        let day = conn.query_row(
            "SELECT COUNT(*) FROM jobs WHERE key_id = ?1 AND created_at > ?2",
            params![key_id, now_s() - 86_400],
            |r| r.get(0),
        )?;
        Ok((active, day))
    }

    /// The job an earlier create with this Idempotency-Key made, if it
    /// still exists.
    pub fn job_by_idempotency_key(&self, key_id: &str, idem: &str) -> Result<Option<Job>, DbError> {
        Self::idempotent_job(&self.conn(), key_id, idem)
    }

    fn idempotent_job(conn: &Connection, key_id: &str, idem: &str) -> Result<Option<Job>, DbError> {
        Ok(conn
            .query_row(
                &format!(
                    "SELECT {JOB_COLUMNS} FROM jobs WHERE id =
                     (SELECT job_id FROM idempotency WHERE key_id = ?1 AND idem = ?2)"
                ),
                params![key_id, idem],
                job_from_row,
            )
            .optional()?)
    }

    /// Stores a new queued job. With `idem`, a job already made under the
    /// same key and Idempotency-Key is returned instead (`false`: not new);
    /// the check and the insert are one transaction.
    pub fn insert_job(
        &self,
        id: &str,
        key_id: &str,
        spec: &JobSpec,
        idem: Option<&str>,
    ) -> Result<(Job, bool), DbError> {
        let created_at = now_s();
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        if let Some(idem) = idem {
            if let Some(earlier) = Self::idempotent_job(&tx, key_id, idem)? {
                return Ok((earlier, false));
            }
            // A key whose job was deleted starts over with the new one.
            tx.execute(
                "INSERT OR REPLACE INTO idempotency (key_id, idem, job_id) VALUES (?1, ?2, ?3)",
                params![key_id, idem, id],
            )?;
        }
        tx.execute(
            "INSERT INTO jobs (id, key_id, prompt, negative_prompt, seed, width, height, frames, steps, seconds, model, status, created_at, seq, manifest_id)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, 'queued', ?12,
                     (SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs), ?13)",
            params![
                id,
                key_id,
                spec.prompt,
                spec.negative_prompt,
                spec.seed as i64,
                spec.width,
                spec.height,
                spec.frames,
                spec.steps,
                spec.seconds,
                spec.model,
                created_at,
                spec.manifest_id
            ],
        )?;
        let job = tx.query_row(
            &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"),
            params![id],
            job_from_row,
        )?;
        tx.commit()?;
        Ok((job, true))
    }

    pub fn job(&self, id: &str) -> Result<Option<Job>, DbError> {
        Ok(self
            .conn()
            .query_row(
                &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"),
                params![id],
                job_from_row,
            )
            .optional()?)
    }

    /// A key's jobs, newest first (or oldest first), after the job `after`.
    pub fn list_jobs(
        &self,
        key_id: &str,
        after: Option<&str>,
        limit: u32,
        ascending: bool,
    ) -> Result<Vec<Job>, DbError> {
        let conn = self.conn();
        let cursor: Option<i64> = match after {
            Some(a) => conn
                .query_row(
                    "SELECT seq FROM jobs WHERE id = ?1 AND key_id = ?2",
                    params![a, key_id],
                    |r| r.get(0),
                )
                .optional()?,
            None => None,
        };
        let (cmp, order) = if ascending {
            (">", "ASC")
        } else {
            ("<", "DESC")
        };
        let cursor = cursor.unwrap_or(if ascending { 0 } else { i64::MAX });
        let mut stmt = conn.prepare(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE key_id = ?1 AND seq {cmp} ?2 ORDER BY seq {order} LIMIT ?3"
        ))?;
        let rows = stmt.query_map(params![key_id, cursor, limit], job_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Oldest queued jobs first.
    pub fn queued(&self, limit: u32) -> Result<Vec<Job>, DbError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE status = 'queued' ORDER BY seq LIMIT ?1"
        ))?;
        let rows = stmt.query_map(params![limit], job_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Claims a queued job for running; false if it is no longer queued.
    pub fn start(&self, id: &str) -> Result<bool, DbError> {
        Ok(self.conn().execute(
            "UPDATE jobs SET status = 'in_progress', attempts = attempts + 1 WHERE id = ?1 AND status = 'queued'",
            params![id],
        )? == 1)
    }

    /// Puts a running job back in the queue (no prover available).
    pub fn requeue(&self, id: &str) -> Result<(), DbError> {
        self.conn().execute(
            "UPDATE jobs SET status = 'queued', progress = 0 WHERE id = ?1 AND status = 'in_progress'",
            params![id],
        )?;
        Ok(())
    }

    /// At start-up: jobs that were running when the gateway stopped go
    /// back to the queue. Returns how many.
    pub fn requeue_unfinished(&self) -> Result<usize, DbError> {
        Ok(self.conn().execute(
            "UPDATE jobs SET status = 'queued', progress = 0 WHERE status = 'in_progress'",
            [],
        )?)
    }

    pub fn set_progress(&self, id: &str, progress: u32, prover: &str) -> Result<(), DbError> {
        self.conn().execute(
            "UPDATE jobs SET progress = MAX(progress, ?2), prover = ?3 WHERE id = ?1 AND status = 'in_progress'",
            params![id, progress.min(99), prover],
        )?;
        Ok(())
    }

    /// Marks the job completed by `prover`, with how it was made, in one
    /// transaction; false if it was not in progress (deleted meanwhile).
    pub fn complete(
        &self,
        id: &str,
        prover: &str,
        expires_at: i64,
        provenance: &Provenance,
    ) -> Result<bool, DbError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let done = tx.execute(
            "UPDATE jobs SET status = 'completed', progress = 100, prover = ?2, completed_at = ?3, expires_at = ?4
             WHERE id = ?1 AND status = 'in_progress'",
            params![id, prover, now_s(), expires_at],
        )? == 1;
        if done {
            tx.execute(
                "INSERT OR REPLACE INTO provenance (job_id, request_id, manifest_id, trace_root, guidance_scale)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    id,
                    provenance.request_id,
                    provenance.manifest_id,
                    provenance.trace_root,
                    provenance.guidance_scale
                ],
            )?;
        }
        tx.commit()?;
        Ok(done)
    }

    /// How a completed video was made; `None` for videos completed before
    /// the gateway recorded it.
    pub fn provenance(&self, id: &str) -> Result<Option<Provenance>, DbError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT request_id, manifest_id, trace_root, guidance_scale FROM provenance WHERE job_id = ?1",
                params![id],
                |r| {
                    Ok(Provenance {
                        request_id: r.get(0)?,
                        manifest_id: r.get(1)?,
                        trace_root: r.get(2)?,
                        guidance_scale: r.get(3)?,
                    })
                },
            )
            .optional()?)
    }

    pub fn fail(&self, id: &str, code: &str, message: &str) -> Result<(), DbError> {
        self.conn().execute(
            "UPDATE jobs SET status = 'failed', error_code = ?2, error_message = ?3, completed_at = ?4
             WHERE id = ?1 AND status IN ('queued', 'in_progress')",
            params![id, code, message, now_s()],
        )?;
        Ok(())
    }

    pub fn delete(&self, id: &str) -> Result<bool, DbError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let deleted = tx.execute("DELETE FROM jobs WHERE id = ?1", params![id])? == 1;
        tx.execute("DELETE FROM idempotency WHERE job_id = ?1", params![id])?;
        tx.execute("DELETE FROM provenance WHERE job_id = ?1", params![id])?;
        tx.commit()?;
        Ok(deleted)
    }

    /// Completed jobs whose retention ran out and still have files.
    pub fn expiring(&self, now: i64) -> Result<Vec<String>, DbError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id FROM jobs WHERE status = 'completed' AND expired = 0 AND expires_at <= ?1",
        )?;
        let rows = stmt.query_map(params![now], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn mark_expired(&self, id: &str) -> Result<(), DbError> {
        self.conn()
            .execute("UPDATE jobs SET expired = 1 WHERE id = ?1", params![id])?;
        Ok(())
    }

    /// Jobs waiting for a prover (the gateway's queue).
    pub fn queued_count(&self) -> Result<u64, DbError> {
        let n: i64 = self.conn().query_row(
            "SELECT COUNT(*) FROM jobs WHERE status = 'queued'",
            [],
            |r| r.get(0),
        )?;
        Ok(n as u64)
    }

    /// Counts per status, for /metrics and the chaos report.
    pub fn counts(&self) -> Result<Vec<(String, u64)>, DbError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT status, COUNT(*) FROM jobs GROUP BY status ORDER BY status")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn integrity_check(&self) -> Result<bool, DbError> {
        let r: String = self
            .conn()
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
        Ok(r == "ok")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> JobSpec {
        JobSpec {
            prompt: "a fox".into(),
            negative_prompt: String::new(),
            seed: u64::MAX - 3,
            width: 32,
            height: 32,
            frames: 4,
            steps: 4,
            seconds: "0.5".into(),
            model: "fractal-tiny-v1".into(),
            manifest_id: String::new(),
        }
    }

    #[test]
    fn jobs_keep_their_model_and_older_databases_gain_the_column() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.sqlite");
        {
            // A jobs table as gateways wrote it before jobs named their model.
            let c = Connection::open(&path).unwrap();
            c.execute_batch(
                "CREATE TABLE jobs (id TEXT PRIMARY KEY, key_id TEXT NOT NULL, prompt TEXT NOT NULL,
                   negative_prompt TEXT NOT NULL, seed INTEGER NOT NULL, width INTEGER NOT NULL,
                   height INTEGER NOT NULL, frames INTEGER NOT NULL, steps INTEGER NOT NULL,
                   seconds TEXT NOT NULL, model TEXT NOT NULL, status TEXT NOT NULL,
                   progress INTEGER NOT NULL DEFAULT 0, created_at INTEGER NOT NULL, completed_at INTEGER,
                   expires_at INTEGER, error_code TEXT, error_message TEXT, prover TEXT,
                   attempts INTEGER NOT NULL DEFAULT 0, expired INTEGER NOT NULL DEFAULT 0, seq INTEGER NOT NULL);
                 INSERT INTO jobs (id, key_id, prompt, negative_prompt, seed, width, height, frames, steps,
                   seconds, model, status, created_at, seq)
                   VALUES ('video_old', 'k', 'p', '', 1, 32, 32, 4, 4, '0.5', 'fractal-tiny-v1', 'queued', 0, 1);",
            )
            .unwrap();
        }
        let db = Db::open(&path).unwrap();
        assert_eq!(db.job("video_old").unwrap().unwrap().spec.manifest_id, "");
        let with_model = JobSpec {
            manifest_id: "ab".repeat(32),
            ..spec()
        };
        let (job, _) = db.insert_job("video_new", "k", &with_model, None).unwrap();
        assert_eq!(job.spec.manifest_id, "ab".repeat(32));
        drop(db);
        let db = Db::open(&path).unwrap();
        assert_eq!(db.job("video_new").unwrap().unwrap().spec, with_model);
    }

    #[test]
    fn keys_are_hashed_and_revocable() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("g.sqlite")).unwrap();
        let (key, secret) = db.create_key("app", KeyLimits::default()).unwrap();
        assert!(secret.starts_with("fk-"));
        assert_eq!(db.key_by_secret(&secret).unwrap().unwrap().id, key.id);
        assert!(db.key_by_secret("fk-wrong").unwrap().is_none());
        let raw = std::fs::read(dir.path().join("g.sqlite")).unwrap();
        assert!(
            !raw.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "secret stored in clear"
        );
        assert!(db.revoke_key(&key.id).unwrap());
        assert!(!db.revoke_key(&key.id).unwrap());
        assert!(db.key_by_secret(&secret).unwrap().is_none());
    }

    #[test]
    fn job_lifecycle_and_listing() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("g.sqlite")).unwrap();
        for i in 0..5 {
            db.insert_job(&format!("video_{i}"), "key_a", &spec(), None)
                .unwrap();
        }
        db.insert_job("video_other", "key_b", &spec(), None)
            .unwrap();
        let j = db.job("video_0").unwrap().unwrap();
        assert_eq!(j.spec, spec(), "seed round-trips through i64");
        assert_eq!(db.usage("key_a").unwrap(), (5, 5));
        let page: Vec<String> = db
            .list_jobs("key_a", None, 2, false)
            .unwrap()
            .into_iter()
            .map(|j| j.id)
            .collect();
        assert_eq!(page, ["video_4", "video_3"]);
        let next: Vec<String> = db
            .list_jobs("key_a", Some("video_3"), 10, false)
            .unwrap()
            .into_iter()
            .map(|j| j.id)
            .collect();
        assert_eq!(next, ["video_2", "video_1", "video_0"]);
        assert!(db.start("video_0").unwrap());
        assert!(!db.start("video_0").unwrap(), "claimed once");
        db.set_progress("video_0", 40, "prover").unwrap();
        // A restart puts it back in the queue with nothing lost.
        assert_eq!(db.requeue_unfinished().unwrap(), 1);
        assert_eq!(db.job("video_0").unwrap().unwrap().status, Status::Queued);
        assert!(db.start("video_0").unwrap());
        let made = Provenance {
            request_id: "job-1".into(),
            manifest_id: "ab".repeat(32),
            trace_root: "cd".repeat(32),
            guidance_scale: 7.5,
        };
        assert!(db.complete("video_0", "prover", 10, &made).unwrap());
        assert_eq!(db.provenance("video_0").unwrap(), Some(made.clone()));
        assert!(
            !db.complete("video_1", "prover", 10, &made).unwrap(),
            "not in progress"
        );
        assert_eq!(db.provenance("video_1").unwrap(), None);
        let j = db.job("video_0").unwrap().unwrap();
        assert_eq!(
            (j.status, j.progress, j.attempts),
            (Status::Completed, 100, 2)
        );
        assert_eq!(db.expiring(9).unwrap().len(), 0);
        assert_eq!(db.expiring(10).unwrap(), ["video_0"]);
        db.fail("video_1", "no_capacity", "none").unwrap();
        assert_eq!(
            db.job("video_1").unwrap().unwrap().error.unwrap().0,
            "no_capacity"
        );
        assert!(db.integrity_check().unwrap());
    }

    #[test]
    fn an_idempotency_key_makes_one_job_per_api_key() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("g.sqlite")).unwrap();
        let (first, new) = db
            .insert_job("video_a", "key_a", &spec(), Some("req-1"))
            .unwrap();
        assert!(new);
        let (again, new) = db
            .insert_job("video_b", "key_a", &spec(), Some("req-1"))
            .unwrap();
        assert_eq!((again.id.as_str(), new), (first.id.as_str(), false));
        assert!(
            db.job("video_b").unwrap().is_none(),
            "the retry stored nothing"
        );
        // Keys are per API key: another key's "req-1" is its own job.
        let (other, new) = db
            .insert_job("video_c", "key_b", &spec(), Some("req-1"))
            .unwrap();
        assert_eq!((other.id.as_str(), new), ("video_c", true));
        assert_eq!(
            db.job_by_idempotency_key("key_a", "req-1")
                .unwrap()
                .unwrap()
                .id,
            "video_a"
        );
        assert!(db
            .job_by_idempotency_key("key_a", "req-2")
            .unwrap()
            .is_none());
        // Once its job is deleted, the key makes a new one.
        assert!(db.delete("video_a").unwrap());
        assert!(db
            .job_by_idempotency_key("key_a", "req-1")
            .unwrap()
            .is_none());
        let (fresh, new) = db
            .insert_job("video_d", "key_a", &spec(), Some("req-1"))
            .unwrap();
        assert_eq!((fresh.id.as_str(), new), ("video_d", true));
    }
}
