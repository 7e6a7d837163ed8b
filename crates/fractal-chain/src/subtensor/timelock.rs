//! Timelocked weight commits (commit-reveal version 4, "CRv4").
//!
//! The validator encrypts its weights to a future round of drand's quicknet
//! beacon (Boneh-Franklin identity-based encryption on BLS12-381, identity =
//! SHA-256 of the round number; the round's beacon signature is the
//! decryption key) and sends the ciphertext with
//! `commit_timelocked_mechanism_weights`. When that round's pulse reaches
//! the chain, the chain decrypts and applies the weights itself: nothing is
//! kept on the validator's side and nothing is lost if it is down then.
//!
//! The wire format is the one the chain and the reference SDK use: the
//! plaintext is the SCALE encoding of `(hotkey, uids, values, version_key)`,
//! the ciphertext is `TLECiphertext<TinyBLS381>` with AES-GCM, serialised
//! compressed by `ark-serialize`.

use ark_ec::Group;
use ark_serialize::{CanonicalDeserialize, CanonicalSerialize};
use sha2::{Digest, Sha256};
use subxt::ext::codec::Encode;
use timelock::curves::drand::TinyBLS381;
use timelock::ibe::fullident::Identity;
use timelock::stream_ciphers::AESGCMStreamCipherProvider;
use timelock::tlock::{tld, tle, TLECiphertext};
use w3f_bls::EngineBLS;

/// The commit-reveal version whose payload this module writes (the hotkey
/// inside the encrypted payload came with version 4).
pub const COMMIT_REVEAL_VERSION: u16 = 4;

/// drand quicknet: its group public key (G2, compressed), chain hash, genesis
/// (Unix seconds) and period; round `n` is published at genesis + n·period.
pub mod quicknet {
    pub const PUBLIC_KEY: &str = "83cf0f2896adee7eb8b5f01fcad3912212c437e0073e911fb90022d3e760183c8c4b450b6a0a6c3ac6a5776a2d1064510d1fec758c921cc22b0e17e63aaf4bcb5ed66304de9cf809bd274ca73bab4af5a6e9c76a4bc09e76eae8991ef5ece45a";
    pub const CHAIN_HASH: &str = "52db9ba70e0cc0f6eaf7803dd07447a1f5477735fd3f661792ba94600c84e971";
    pub const GENESIS_TIME: u64 = 1_692_803_367;
    pub const PERIOD_SECS: u64 = 3;
}

/// The chain ingests drand pulses a little after they are published; aiming
/// this many blocks past the reveal block means the round is on chain when
/// the reveal runs.
pub const SECURITY_BLOCK_OFFSET: u64 = 3;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TimelockError {
    #[error("not a timelock ciphertext")]
    Ciphertext,
    #[error("not a drand signature (compressed G1 point)")]
    Signature,
    #[error("the signature does not open this ciphertext (wrong round?)")]
    WrongKey,
}

/// The weights the chain reveals: SCALE `(hotkey, uids, values, version_key)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightsPayload {
    pub hotkey: Vec<u8>,
    pub uids: Vec<u16>,
    pub values: Vec<u16>,
    pub version_key: u64,
}

impl WeightsPayload {
    pub fn encode(&self) -> Vec<u8> {
        (&self.hotkey, &self.uids, &self.values, self.version_key).encode()
    }

    pub fn decode(bytes: &[u8]) -> Option<Self> {
        use subxt::ext::codec::Decode;
        let (hotkey, uids, values, version_key) =
            <(Vec<u8>, Vec<u16>, Vec<u16>, u64)>::decode(&mut &bytes[..]).ok()?;
        Some(Self {
            hotkey,
            uids,
            values,
            version_key,
        })
    }
}

/// The drand round to encrypt to so that the chain holds its pulse when it
/// reaches `reveal_block`: `SECURITY_BLOCK_OFFSET` blocks later, timed from
/// `now` (Unix seconds) at `block_time` seconds a block, rounded down so the
/// round is never one the chain has not ingested yet.
pub fn reveal_round(reveal_block: u64, head_block: u64, block_time: f64, now: f64) -> u64 {
    let blocks = (reveal_block + SECURITY_BLOCK_OFFSET).saturating_sub(head_block);
    let at = now + blocks as f64 * block_time;
    let round = ((at - quicknet::GENESIS_TIME as f64) / quicknet::PERIOD_SECS as f64).floor();
    (round as u64).max(1)
}

fn public_key() -> <TinyBLS381 as EngineBLS>::PublicKeyGroup {
    let bytes = hex::decode(quicknet::PUBLIC_KEY).expect("quicknet key is hex");
    <TinyBLS381 as EngineBLS>::PublicKeyGroup::deserialize_compressed(&bytes[..])
        .expect("quicknet key is a G2 point")
}

/// The identity of `round`: drand signs SHA-256 of its big-endian number.
fn identity(round: u64) -> Identity {
    Identity::new(b"", vec![Sha256::digest(round.to_be_bytes()).to_vec()])
}

/// Encrypts `plaintext` so that it opens with the signature of `round`.
pub fn encrypt(plaintext: &[u8], round: u64) -> Vec<u8> {
    use rand::RngCore;
    let mut rng = rand::rngs::OsRng;
    let mut key = [0u8; 32];
    rng.fill_bytes(&mut key);
    let ct = tle::<TinyBLS381, AESGCMStreamCipherProvider, _>(
        public_key(),
        key,
        plaintext,
        identity(round),
        rng,
    )
    .expect("AES-GCM encrypts any message this size");
    let mut out = Vec::new();
    ct.serialize_compressed(&mut out)
        .expect("a ciphertext serialises");
    out
}

fn signature(bytes: &[u8]) -> Result<<TinyBLS381 as EngineBLS>::SignatureGroup, TimelockError> {
    <TinyBLS381 as EngineBLS>::SignatureGroup::deserialize_compressed(bytes)
        .map_err(|_| TimelockError::Signature)
}

/// Opens `ciphertext` with a round's beacon signature (48 bytes).
pub fn decrypt(ciphertext: &[u8], round_signature: &[u8]) -> Result<Vec<u8>, TimelockError> {
    let ct = TLECiphertext::<TinyBLS381>::deserialize_compressed(ciphertext)
        .map_err(|_| TimelockError::Ciphertext)?;
    tld::<TinyBLS381, AESGCMStreamCipherProvider>(ct, signature(round_signature)?)
        .map_err(|_| TimelockError::WrongKey)
}

/// Whether `sig` is quicknet's beacon for `round`: e(sig, g2) = e(H(round), pk).
pub fn is_quicknet_pulse(round: u64, sig: &[u8]) -> bool {
    let Ok(sig) = signature(sig) else {
        return false;
    };
    let g2 = <TinyBLS381 as EngineBLS>::PublicKeyGroup::generator();
    let h = identity(round).public::<TinyBLS381>();
    TinyBLS381::pairing(g2, sig) == TinyBLS381::pairing(public_key(), h)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// quicknet round 1000, as published by drand (public data).
    const ROUND_1000: &str = "b44679b9a59af2ec876b1a6b1ad52ea9b1615fc3982b19576350f93447cb1125e342b73a8dd2bacbe47e4b6b63ed5e39";

    #[test]
    fn round_1000_opens_what_was_encrypted_to_it_and_no_other_round() {
        let sig = hex::decode(ROUND_1000).unwrap();
        assert!(is_quicknet_pulse(1000, &sig));
        assert!(!is_quicknet_pulse(1001, &sig));
        let p = WeightsPayload {
            hotkey: vec![7; 32],
            uids: vec![0, 3],
            values: vec![65535, 12],
            version_key: 9,
        };
        let ct = encrypt(&p.encode(), 1000);
        assert_eq!(
            WeightsPayload::decode(&decrypt(&ct, &sig).unwrap()),
            Some(p.clone())
        );
        let other = encrypt(&p.encode(), 1001);
        assert_eq!(decrypt(&other, &sig), Err(TimelockError::WrongKey));
        assert_eq!(decrypt(&ct[1..], &sig), Err(TimelockError::Ciphertext));
        assert_eq!(decrypt(&ct, &sig[1..]), Err(TimelockError::Signature));
    }

    #[test]
    fn reveal_round_rounds_down_and_never_below_one() {
        let g = quicknet::GENESIS_TIME as f64;
        // 10 blocks ahead (7 + 3) at 12 s from genesis+1: 121 s, round 40.
        assert_eq!(reveal_round(107, 100, 12.0, g + 1.0), 40);
        assert_eq!(reveal_round(107, 100, 12.0, g + 2.0), 40);
        assert_eq!(reveal_round(107, 100, 12.0, g + 5.0), 41);
        assert_eq!(reveal_round(0, 100, 12.0, 0.0), 1);
    }
}
