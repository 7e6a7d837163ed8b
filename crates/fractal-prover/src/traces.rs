//! Committed traces kept for the audit window, bounded in bytes.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use fractal_protocol::merkle::MerkleTree;
use fractal_protocol::wire::{
    AuditAnswer, AuditChallenge, Base64Bytes, LeafOpening, RequestError, PROTOCOL_VERSION,
};
use fractal_protocol::JobId;

/// Every leaf of one job's trace as committed (f32 LE bytes: latents and
/// model outputs, see `fractal_protocol::merkle`), and its tree.
pub struct Trace {
    /// The shape every leaf has (the latent's).
    pub shape: Vec<u32>,
    pub leaves: Vec<Vec<u8>>,
    pub tree: MerkleTree,
}

impl Trace {
    /// Opens the challenged leaves with their Merkle paths.
    pub fn open(&self, challenge: &AuditChallenge) -> Result<AuditAnswer, RequestError> {
        challenge.validate(self.tree.leaf_count())?;
        let openings = challenge
            .leaves
            .iter()
            .map(|&leaf| LeafOpening {
                leaf,
                shape: self.shape.clone(),
                values_f32: Base64Bytes(self.leaves[leaf as usize].clone()),
                proof: self
                    .tree
                    .proof(leaf)
                    .expect("leaf validated against the leaf count"),
            })
            .collect();
        Ok(AuditAnswer {
            version: PROTOCOL_VERSION,
            job_id: challenge.job_id,
            openings,
        })
    }

    /// What keeping it costs in memory.
    pub fn bytes(&self) -> usize {
        self.leaves.iter().map(Vec::len).sum()
    }
}

/// Oldest-first eviction: by age past `window`, and by size past `budget`.
pub struct TraceStore {
    window: Duration,
    budget: usize,
    used: usize,
    traces: BTreeMap<JobId, (Instant, Trace)>,
    order: VecDeque<JobId>,
}

impl TraceStore {
    pub fn new(window: Duration, budget_bytes: usize) -> Self {
        TraceStore {
            window,
            budget: budget_bytes,
            used: 0,
            traces: BTreeMap::new(),
            order: VecDeque::new(),
        }
    }

    fn evict_oldest(&mut self) {
        if let Some(id) = self.order.pop_front() {
            if let Some((_, t)) = self.traces.remove(&id) {
                self.used -= t.bytes();
            }
        }
    }

    fn expire(&mut self, now: Instant) {
        while let Some(id) = self.order.front() {
            match self.traces.get(id) {
                Some((at, _)) if now.duration_since(*at) <= self.window => break,
                _ => self.evict_oldest(),
            }
        }
    }

    /// Keeps `trace`; returns false when one trace alone exceeds the budget.
    pub fn insert(&mut self, job: JobId, trace: Trace, now: Instant) -> bool {
        let size = trace.bytes();
        if size > self.budget {
            return false;
        }
        self.expire(now);
        while self.used + size > self.budget {
            self.evict_oldest();
        }
        self.used += size;
        if let Some((_, old)) = self.traces.insert(job, (now, trace)) {
            self.used -= old.bytes();
            self.order.retain(|j| *j != job);
        }
        self.order.push_back(job);
        true
    }

    pub fn get(&mut self, job: &JobId, now: Instant) -> Option<&Trace> {
        self.expire(now);
        self.traces.get(job).map(|(_, t)| t)
    }

    pub fn contains(&mut self, job: &JobId, now: Instant) -> bool {
        self.get(job, now).is_some()
    }

    pub fn len(&self) -> usize {
        self.traces.len()
    }

    pub fn is_empty(&self) -> bool {
        self.traces.is_empty()
    }

    pub fn bytes_used(&self) -> usize {
        self.used
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fractal_protocol::Digest32;

    fn trace(bytes: usize) -> Trace {
        Trace {
            shape: vec![bytes as u32 / 4],
            leaves: vec![vec![0; bytes]],
            tree: MerkleTree::new(&[Digest32::sha256(b"x")]).unwrap(),
        }
    }

    #[test]
    fn evicts_by_age_and_by_budget() {
        let t0 = Instant::now();
        let mut s = TraceStore::new(Duration::from_secs(10), 100);
        assert!(s.insert(JobId([1; 16]), trace(40), t0));
        assert!(s.insert(JobId([2; 16]), trace(40), t0 + Duration::from_secs(5)));
        // Budget: a third 40-byte trace pushes out the oldest.
        assert!(s.insert(JobId([3; 16]), trace(40), t0 + Duration::from_secs(6)));
        assert!(!s.contains(&JobId([1; 16]), t0 + Duration::from_secs(6)));
        assert_eq!(s.bytes_used(), 80);
        // Age: job 2 expires 10 s after it was stored.
        assert!(s.contains(&JobId([2; 16]), t0 + Duration::from_secs(15)));
        assert!(!s.contains(&JobId([2; 16]), t0 + Duration::from_secs(16)));
        assert!(s.contains(&JobId([3; 16]), t0 + Duration::from_secs(16)));
        assert_eq!(s.bytes_used(), 40);
        // Too big to ever fit.
        assert!(!s.insert(JobId([4; 16]), trace(101), t0));
        assert_eq!(s.len(), 1);
    }
}
