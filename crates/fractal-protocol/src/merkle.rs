//! Commitments over a generation trace: a Merkle tree whose leaves are the
//! SHA-256 digests of each denoising step's latent (f16 little-endian bytes).
//!
//! Hashing (normative, domain-separated against second-preimage tricks):
//! * leaf = SHA-256(0x00 || latent_digest)
//! * node = SHA-256(0x01 || left || right)
//! * a level with an odd count promotes its last node unchanged (never duplicated,
//!   so two different traces cannot share a root);
//! * root = SHA-256(0x02 || leaf count as u64 LE || top node), so the trace
//!   length is committed too and a proof cannot claim another shape.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::Digest32;

/// A latent as committed: its f32 values rounded to IEEE f16, little-endian.
pub fn latent_f16_bytes(latent: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(latent.len() * 2);
    for &x in latent {
        out.extend_from_slice(&half::f16::from_f32(x).to_le_bytes());
    }
    out
}

/// Decodes f16 little-endian bytes (as produced by [`latent_f16_bytes`]) to f32.
pub fn latent_from_f16_bytes(bytes: &[u8]) -> Option<Vec<f32>> {
    if bytes.len() % 2 != 0 {
        return None;
    }
    Some(
        bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
    )
}

/// SHA-256 of a latent's committed (f16) encoding.
pub fn latent_digest(latent: &[f32]) -> Digest32 {
    Digest32::sha256(&latent_f16_bytes(latent))
}

fn leaf_hash(d: &Digest32) -> Digest32 {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(d.0);
    Digest32(h.finalize().into())
}

fn node_hash(l: &Digest32, r: &Digest32) -> Digest32 {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(l.0);
    h.update(r.0);
    Digest32(h.finalize().into())
}

fn bind_count(leaf_count: u32, top: &Digest32) -> Digest32 {
    let mut h = Sha256::new();
    h.update([2u8]);
    h.update(u64::from(leaf_count).to_le_bytes());
    h.update(top.0);
    Digest32(h.finalize().into())
}

/// All levels of the tree, leaves first.
#[derive(Clone, Debug)]
pub struct MerkleTree {
    levels: Vec<Vec<Digest32>>,
}

/// The path from one leaf to the root.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MerkleProof {
    pub index: u32,
    pub leaf_count: u32,
    /// Sibling hashes from the leaf level upwards; levels where the node was
    /// promoted have no sibling and no entry.
    pub siblings: Vec<Digest32>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MerkleError {
    #[error("a commitment needs at least one leaf")]
    Empty,
    #[error("leaf {index} out of range for {count} leaves")]
    OutOfRange { index: u32, count: u32 },
}

impl MerkleTree {
    /// Builds the tree over per-step latent digests (see [`latent_digest`]).
    pub fn new(latent_digests: &[Digest32]) -> Result<Self, MerkleError> {
        if latent_digests.is_empty() {
            return Err(MerkleError::Empty);
        }
        let mut levels = vec![latent_digests.iter().map(leaf_hash).collect::<Vec<_>>()];
        while levels.last().expect("non-empty").len() > 1 {
            let prev = levels.last().expect("non-empty");
            let next = prev
                .chunks(2)
                .map(|p| {
                    if p.len() == 2 {
                        node_hash(&p[0], &p[1])
                    } else {
                        p[0]
                    }
                })
                .collect();
            levels.push(next);
        }
        Ok(MerkleTree { levels })
    }

    pub fn root(&self) -> Digest32 {
        bind_count(
            self.leaf_count(),
            &self.levels.last().expect("non-empty")[0],
        )
    }

    pub fn leaf_count(&self) -> u32 {
        self.levels[0].len() as u32
    }

    pub fn proof(&self, index: u32) -> Result<MerkleProof, MerkleError> {
        let count = self.leaf_count();
        if index >= count {
            return Err(MerkleError::OutOfRange { index, count });
        }
        let mut siblings = Vec::new();
        let mut i = index as usize;
        for level in &self.levels[..self.levels.len() - 1] {
            let sib = i ^ 1;
            if sib < level.len() {
                siblings.push(level[sib]);
            }
            i /= 2;
        }
        Ok(MerkleProof {
            index,
            leaf_count: count,
            siblings,
        })
    }
}

impl MerkleProof {
    /// True when `latent_digest` is leaf `self.index` of the tree with `root`.
    pub fn verify(&self, root: &Digest32, latent_digest: &Digest32) -> bool {
        if self.index >= self.leaf_count {
            return false;
        }
        let mut acc = leaf_hash(latent_digest);
        let mut i = self.index as usize;
        let mut width = self.leaf_count as usize;
        let mut sibs = self.siblings.iter();
        while width > 1 {
            let sib = i ^ 1;
            if sib < width {
                let Some(s) = sibs.next() else { return false };
                acc = if i % 2 == 0 {
                    node_hash(&acc, s)
                } else {
                    node_hash(s, &acc)
                };
            }
            i /= 2;
            width = width.div_ceil(2);
        }
        sibs.next().is_none() && bind_count(self.leaf_count, &acc) == *root
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digests(n: usize) -> Vec<Digest32> {
        (0..n)
            .map(|i| latent_digest(&[i as f32, 0.5, -1.25]))
            .collect()
    }

    #[test]
    fn every_leaf_proves_for_many_sizes() {
        for n in 1..=33 {
            let d = digests(n);
            let t = MerkleTree::new(&d).unwrap();
            for (i, leaf) in d.iter().enumerate() {
                let p = t.proof(i as u32).unwrap();
                assert!(p.verify(&t.root(), leaf), "n={n} i={i}");
            }
        }
    }

    #[test]
    fn tampering_is_detected() {
        let d = digests(11);
        let t = MerkleTree::new(&d).unwrap();
        let p = t.proof(6).unwrap();
        // Wrong leaf content.
        assert!(!p.verify(&t.root(), &d[5]));
        // Wrong index claims.
        assert!(!MerkleProof {
            index: 7,
            ..p.clone()
        }
        .verify(&t.root(), &d[6]));
        assert!(!MerkleProof {
            index: 11,
            ..p.clone()
        }
        .verify(&t.root(), &d[6]));
        // Wrong leaf count changes the shape.
        assert!(!MerkleProof {
            leaf_count: 12,
            ..p.clone()
        }
        .verify(&t.root(), &d[6]));
        // A flipped sibling bit, a missing sibling, an extra sibling.
        let mut q = p.clone();
        q.siblings[1].0[0] ^= 1;
        assert!(!q.verify(&t.root(), &d[6]));
        let mut q = p.clone();
        q.siblings.pop();
        assert!(!q.verify(&t.root(), &d[6]));
        let mut q = p.clone();
        q.siblings.push(d[0]);
        assert!(!q.verify(&t.root(), &d[6]));
        // Another tree's root.
        let other = MerkleTree::new(&digests(12)).unwrap();
        assert!(!p.verify(&other.root(), &d[6]));
    }

    #[test]
    fn root_depends_on_order_and_count() {
        let d = digests(4);
        let mut swapped = d.clone();
        swapped.swap(1, 2);
        assert_ne!(
            MerkleTree::new(&d).unwrap().root(),
            MerkleTree::new(&swapped).unwrap().root()
        );
        // Promotion, not duplication: [a,b,c] differs from [a,b,c,c].
        let three = MerkleTree::new(&d[..3]).unwrap().root();
        let dup = MerkleTree::new(&[d[0], d[1], d[2], d[2]]).unwrap().root();
        assert_ne!(three, dup);
        assert_eq!(MerkleTree::new(&[]).unwrap_err(), MerkleError::Empty);
    }

    #[test]
    fn root_golden() {
        let t = MerkleTree::new(&digests(5)).unwrap();
        // Checked against an independent Python computation of the same definition.
        assert_eq!(
            t.root().to_string(),
            "c0e36e4605f285904cae1b39091126d0985ac5d7ded0ad59710cb8f2663dcafc"
        );
    }

    #[test]
    fn f16_encoding_round_trips_representable_values() {
        let v = [0.0f32, 1.0, -2.5, 0.333_251_95, 65504.0];
        assert_eq!(latent_from_f16_bytes(&latent_f16_bytes(&v)).unwrap(), v);
        assert!(latent_from_f16_bytes(&[1, 2, 3]).is_none());
    }
}
