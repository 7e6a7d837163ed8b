//! Commitments over a generation trace (trace format v2): a Merkle tree
//! whose leaves are the SHA-256 digests of every value the denoising loop
//! produced, as the exact f32 numbers the prover computed.
//!
//! Leaves (normative): for a job of `N` steps there are `2N + 1` leaves,
//! * leaf `2i` is the latent `x_i` (`i = 0..=N`; `x_0` is the seeded noise,
//!   `x_N` the final latent),
//! * leaf `2i + 1` is the model output step `i` fed to the scheduler (the
//!   guided noise prediction, after classifier-free guidance; `i < N`).
//!
//! Committing the model output as well as the latent lets a verifier check
//! each half of a step on its own: the UNet's output against its own
//! recomputation, and the scheduler's update from the committed output, at
//! any step and for multistep schedulers without replaying earlier steps.
//! Committing exact f32 values (v1 rounded latents to f16) makes an honest
//! recomputation on the same build and platform bit-identical, so the
//! tolerances only have to cover cross-platform arithmetic.
//!
//! Hashing (normative, domain-separated against second-preimage tricks):
//! * leaf digest = SHA-256(f32 values, little-endian)
//! * leaf = SHA-256(0x00 || leaf digest)
//! * node = SHA-256(0x01 || left || right)
//! * a level with an odd count promotes its last node unchanged (never duplicated,
//!   so two different traces cannot share a root);
//! * root = SHA-256(0x02 || leaf count as u64 LE || top node), so the trace
//!   length is committed too and a proof cannot claim another shape.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::Digest32;

/// A tensor as committed: its f32 values, little-endian.
pub fn f32_le_bytes(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * 4);
    for &x in values {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

/// Decodes little-endian f32 bytes (as produced by [`f32_le_bytes`]).
pub fn f32_from_le_bytes(bytes: &[u8]) -> Option<Vec<f32>> {
    if !bytes.len().is_multiple_of(4) {
        return None;
    }
    Some(
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    )
}

/// SHA-256 of a leaf's committed encoding.
pub fn values_digest(values: &[f32]) -> Digest32 {
    Digest32::sha256(&f32_le_bytes(values))
}

/// What one leaf of a trace holds (see the module docs for the layout).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TraceLeaf {
    /// The latent after this many steps (0: the seeded noise).
    Latent(u32),
    /// The model output of this step (0-based), as the scheduler used it.
    Output(u32),
}

impl TraceLeaf {
    /// Leaves in a trace of `steps` steps.
    pub const fn count(steps: u32) -> u32 {
        2 * steps + 1
    }

    pub const fn index(self) -> u32 {
        match self {
            TraceLeaf::Latent(i) => 2 * i,
            TraceLeaf::Output(i) => 2 * i + 1,
        }
    }

    pub const fn at(index: u32) -> TraceLeaf {
        if index.is_multiple_of(2) {
            TraceLeaf::Latent(index / 2)
        } else {
            TraceLeaf::Output(index / 2)
        }
    }
}

impl std::fmt::Display for TraceLeaf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TraceLeaf::Latent(i) => write!(f, "latent {i}"),
            TraceLeaf::Output(i) => write!(f, "model output {i}"),
        }
    }
}

/// Builds a trace's leaf digests in order as the denoising loop runs.
#[derive(Clone, Debug, Default)]
pub struct TraceDigests {
    digests: Vec<Digest32>,
}

impl TraceDigests {
    pub fn new() -> Self {
        Self::default()
    }

    /// The next leaf: `x_0`, then per step its model output and the latent after it.
    pub fn push(&mut self, values: &[f32]) {
        self.digests.push(values_digest(values));
    }

    pub fn digests(&self) -> &[Digest32] {
        &self.digests
    }

    pub fn tree(&self) -> Result<MerkleTree, MerkleError> {
        MerkleTree::new(&self.digests)
    }
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
    /// Builds the tree over leaf digests (see [`values_digest`]).
    pub fn new(leaf_digests: &[Digest32]) -> Result<Self, MerkleError> {
        if leaf_digests.is_empty() {
            return Err(MerkleError::Empty);
        }
        let mut levels = vec![leaf_digests.iter().map(leaf_hash).collect::<Vec<_>>()];
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
    /// True when `leaf_digest` is leaf `self.index` of the tree with `root`.
    pub fn verify(&self, root: &Digest32, leaf_digest: &Digest32) -> bool {
        if self.index >= self.leaf_count {
            return false;
        }
        let mut acc = leaf_hash(leaf_digest);
        let mut i = self.index as usize;
        let mut width = self.leaf_count as usize;
        let mut sibs = self.siblings.iter();
        while width > 1 {
            let sib = i ^ 1;
            if sib < width {
                let Some(s) = sibs.next() else { return false };
                acc = if i.is_multiple_of(2) {
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
            .map(|i| values_digest(&[i as f32, 0.5, -1.25]))
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
        // Checked against an independent Python computation of the same definition
        // (hashlib + struct.pack('<f'), leaves of f32 values).
        assert_eq!(
            t.root().to_string(),
            "a35b274d2d3b64920be1d60c0eec2c29a2c6e29077c2308af810c4e367572d28"
        );
    }

    #[test]
    fn f32_encoding_round_trips_every_value() {
        let v = [0.0f32, -0.0, 1.0, -2.5, 1e-40, f32::MAX, 0.1];
        let back = f32_from_le_bytes(&f32_le_bytes(&v)).unwrap();
        assert_eq!(
            back.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            v.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        assert!(f32_from_le_bytes(&[1, 2, 3]).is_none());
    }

    #[test]
    fn trace_leaves_interleave_latents_and_outputs() {
        assert_eq!(TraceLeaf::count(3), 7);
        assert_eq!(TraceLeaf::Latent(0).index(), 0);
        assert_eq!(TraceLeaf::Output(0).index(), 1);
        assert_eq!(TraceLeaf::Latent(3).index(), 6);
        for i in 0..20 {
            assert_eq!(TraceLeaf::at(i).index(), i);
        }
    }
}
