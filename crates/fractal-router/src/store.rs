//! Persistence of the map: one SQLite row per prover (its JSON state), so
//! a restarted gateway routes on what it had measured instead of starting
//! blind.

use std::path::Path;

use rusqlite::{params, Connection};

use crate::map::{GridMap, NodeState, RouterConfig};

#[derive(Debug, thiserror::Error)]
pub enum MapStoreError {
    #[error("map database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("map database holds a corrupt row: {0}")]
    Corrupt(#[from] serde_json::Error),
}

pub struct MapStore {
    conn: Connection,
}

impl MapStore {
    pub fn open(path: &Path) -> Result<Self, MapStoreError> {
        let conn = Connection::open(path)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             CREATE TABLE IF NOT EXISTS map_nodes (
                 hotkey TEXT PRIMARY KEY,
                 state TEXT NOT NULL,
                 updated_ms INTEGER NOT NULL
             );
             CREATE TABLE IF NOT EXISTS map_meta (
                 key TEXT PRIMARY KEY,
                 value TEXT NOT NULL
             );",
        )?;
        Ok(MapStore { conn })
    }

    /// Writes the whole map in one transaction (nodes that left are removed).
    pub fn save(&mut self, map: &GridMap, now_ms: u64) -> Result<(), MapStoreError> {
        let tx = self.conn.transaction()?;
        tx.execute("DELETE FROM map_nodes", [])?;
        for (hk, n) in &map.nodes {
            tx.execute(
                "INSERT INTO map_nodes (hotkey, state, updated_ms) VALUES (?1, ?2, ?3)",
                params![hk.to_string(), serde_json::to_string(n)?, now_ms as i64],
            )?;
        }
        tx.execute(
            "INSERT INTO map_meta (key, value) VALUES ('me', ?1)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            params![serde_json::to_string(&map.me)?],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// The saved map, or a fresh one when nothing was saved.
    pub fn load(&self, cfg: RouterConfig, seed: u64) -> Result<GridMap, MapStoreError> {
        let mut map = GridMap::new(cfg.clone(), seed);
        let me: Option<String> = self
            .conn
            .query_row("SELECT value FROM map_meta WHERE key = 'me'", [], |r| {
                r.get(0)
            })
            .map(Some)
            .or_else(|e| match e {
                rusqlite::Error::QueryReturnedNoRows => Ok(None),
                e => Err(e),
            })?;
        if let Some(me) = me {
            map.me = serde_json::from_str(&me)?;
        }
        let mut stmt = self.conn.prepare("SELECT state FROM map_nodes")?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        for row in rows {
            let n: NodeState = serde_json::from_str(&row?)?;
            map.nodes.insert(n.hotkey, n);
        }
        Ok(map.with_config(cfg, seed))
    }

    pub fn integrity_check(&self) -> Result<bool, MapStoreError> {
        let r: String = self
            .conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
        Ok(r == "ok")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::map::Work;
    use fractal_protocol::Hotkey;

    #[test]
    fn a_saved_map_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("map.sqlite");
        let mut m = GridMap::new(RouterConfig::default(), 1);
        m.sync([(Hotkey([1; 32]), Some("http://127.0.0.1:1".into()))]);
        for _ in 0..20 {
            m.observe_rtt(
                &Hotkey([1; 32]),
                42.0,
                Some(crate::Load {
                    jobs: 1,
                    slots: 2,
                    capacity: 4,
                    backlog_ms: None,
                    ms_per_frame_step: None,
                }),
                0.0,
            );
        }
        let work = Work {
            width: 64,
            height: 64,
            frames: 4,
            steps: 4,
        };
        let t = m.choose(&work, 0.0, &[]).unwrap();
        m.completed(&t, &work, 160.0, 250.0, 0.0);
        m.choose(&work, 0.0, &[]).unwrap();
        let mut s = MapStore::open(&path).unwrap();
        s.save(&m, 1).unwrap();
        drop(s);
        let s = MapStore::open(&path).unwrap();
        assert!(s.integrity_check().unwrap());
        let back = s.load(RouterConfig::default(), 2).unwrap();
        let n = back.node(&Hotkey([1; 32])).unwrap();
        assert_eq!(n.completed, 1);
        assert_eq!(n.inflight, 0, "in-flight requests do not survive a restart");
        assert_eq!(n.ms_per_frame_step.get("64x64"), Some(&10.0));
        assert_eq!(back.me, m.me);
        let (a, b) = (
            back.predict(&Hotkey([1; 32]), &work, 0.0).unwrap().rtt_ms,
            m.predict(&Hotkey([1; 32]), &work, 0.0).unwrap().rtt_ms,
        );
        assert_eq!(a, b);
    }
}
