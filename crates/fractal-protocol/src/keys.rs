//! sr25519 keys as substrate and Bittensor use them.
//!
//! Compatibility points, each pinned by tests against published substrate
//! vectors and the bittensor 11 SDK:
//! * mnemonic → mini secret: BIP39 entropy through `substrate_bip39::mini_secret_from_entropy`
//!   (not the BIP39 seed), expanded in Ed25519 mode;
//! * secret URIs `phrase//hard/soft///password` with substrate's junction chain codes;
//! * SS58 addresses with the generic prefix 42;
//! * signatures under the signing context `substrate`.

use std::fmt;
use std::str::FromStr;

use blake2::digest::{consts::U32, Digest as _};
use blake2::{Blake2b, Blake2b512};
use schnorrkel::derive::{ChainCode, Derivation};
use schnorrkel::{ExpansionMode, MiniSecretKey, PublicKey, SecretKey, Signature};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The SS58 address prefix of Bittensor (and substrate's generic one).
pub const SS58_PREFIX: u8 = 42;
/// substrate's well-known development phrase; `//Alice` is derived from it.
pub const DEV_PHRASE: &str =
    "bottom drive obey lake curtain smoke basket hold race lonely fit walk";
const SIGNING_CONTEXT: &[u8] = b"substrate";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("invalid mnemonic: {0}")]
    Mnemonic(String),
    #[error("invalid secret key bytes: expected a 32-byte seed or 64-byte secret key")]
    SecretBytes,
    #[error("invalid public key")]
    PublicKey,
    #[error("invalid SS58 address: {0}")]
    Ss58(&'static str),
    #[error("invalid secret URI: {0}")]
    Uri(&'static str),
    #[error("invalid signature encoding")]
    SignatureEncoding,
}

/// A hotkey's public identity: an sr25519 public key, shown as an SS58 address.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hotkey(pub [u8; 32]);

impl Hotkey {
    pub fn from_ss58(s: &str) -> Result<Self, KeyError> {
        ss58_decode(s).map(Hotkey)
    }
    pub fn to_ss58(&self) -> String {
        ss58_encode(&self.0)
    }
    /// Verifies an sr25519 signature made with the `substrate` context.
    pub fn verify(&self, message: &[u8], signature: &[u8; 64]) -> bool {
        let Ok(pk) = PublicKey::from_bytes(&self.0) else {
            return false;
        };
        let Ok(sig) = Signature::from_bytes(signature) else {
            return false;
        };
        pk.verify_simple(SIGNING_CONTEXT, message, &sig).is_ok()
    }
}

impl fmt::Display for Hotkey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_ss58())
    }
}
impl fmt::Debug for Hotkey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hotkey({})", self.to_ss58())
    }
}
impl FromStr for Hotkey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        Hotkey::from_ss58(s)
    }
}
impl Serialize for Hotkey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_ss58())
    }
}
impl<'de> Deserialize<'de> for Hotkey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Hotkey::from_ss58(&s).map_err(serde::de::Error::custom)
    }
}

/// An sr25519 key pair, with the 32-byte seed it was expanded from when known
/// (wallet files store it as `secretSeed`).
#[derive(Clone)]
pub struct Keypair {
    pair: schnorrkel::Keypair,
    seed: Option<[u8; 32]>,
}

impl fmt::Debug for Keypair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print secrets, even in debug output.
        write!(f, "Keypair({})", self.hotkey())
    }
}

impl Keypair {
    /// Expands a 32-byte mini secret key (substrate's "seed").
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        let mini = MiniSecretKey::from_bytes(seed).expect("32 bytes is a valid mini secret key");
        Keypair {
            pair: mini.expand_to_keypair(ExpansionMode::Ed25519),
            seed: Some(*seed),
        }
    }

    /// A 32-byte seed or a 64-byte expanded secret key (`privateKey` in wallet files).
    pub fn from_secret_bytes(bytes: &[u8]) -> Result<Self, KeyError> {
        match bytes.len() {
            32 => Ok(Self::from_seed(bytes.try_into().expect("length checked"))),
            64 => {
                let secret = SecretKey::from_bytes(bytes).map_err(|_| KeyError::SecretBytes)?;
                Ok(Keypair {
                    pair: secret.to_keypair(),
                    seed: None,
                })
            }
            _ => Err(KeyError::SecretBytes),
        }
    }

    /// The key substrate derives from a BIP39 phrase (and optional BIP39 password).
    pub fn from_phrase(phrase: &str, password: Option<&str>) -> Result<Self, KeyError> {
        let mnemonic = bip39::Mnemonic::parse_in_normalized(bip39::Language::English, phrase)
            .map_err(|e| KeyError::Mnemonic(e.to_string()))?;
        let mini = substrate_bip39::mini_secret_from_entropy(
            &mnemonic.to_entropy(),
            password.unwrap_or(""),
        )
        .map_err(|e| KeyError::Mnemonic(format!("{e:?}")))?;
        Ok(Self::from_seed(&mini.to_bytes()))
    }

    /// A fresh random phrase of `words` words (12, 15, 18, 21 or 24) and its key.
    pub fn generate(words: usize) -> Result<(String, Self), KeyError> {
        use rand::RngCore;
        let bytes = match words {
            12 => 16,
            15 => 20,
            18 => 24,
            21 => 28,
            24 => 32,
            _ => {
                return Err(KeyError::Mnemonic(format!(
                    "unsupported word count {words}"
                )))
            }
        };
        let mut entropy = zeroize::Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(&mut entropy[..bytes]);
        let mnemonic = bip39::Mnemonic::from_entropy(&entropy[..bytes])
            .map_err(|e| KeyError::Mnemonic(e.to_string()))?;
        let phrase = mnemonic.to_string();
        let pair = Self::from_phrase(&phrase, None)?;
        Ok((phrase, pair))
    }

    /// substrate secret URI: `[phrase | 0xSEED][//hard | /soft]*[///password]`.
    /// An empty phrase means the dev phrase, so `//Alice` works as in substrate.
    pub fn from_suri(suri: &str) -> Result<Self, KeyError> {
        let (rest, password) = match suri.find("///") {
            Some(i) => (&suri[..i], Some(&suri[i + 3..])),
            None => (suri, None),
        };
        let (root, path) = match rest.find('/') {
            Some(i) => (rest[..i].trim(), &rest[i..]),
            None => (rest.trim(), ""),
        };
        let mut pair = if let Some(hex_seed) = root.strip_prefix("0x") {
            if password.is_some() {
                return Err(KeyError::Uri(
                    "a password applies to phrases, not hex seeds",
                ));
            }
            let bytes = hex::decode(hex_seed).map_err(|_| KeyError::Uri("seed is not hex"))?;
            Self::from_secret_bytes(&bytes)?
        } else {
            let phrase = if root.is_empty() { DEV_PHRASE } else { root };
            Self::from_phrase(phrase, password)?
        };
        for junction in parse_junctions(path)? {
            pair = pair.derive(&junction);
        }
        Ok(pair)
    }

    fn derive(&self, junction: &Junction) -> Self {
        let cc = ChainCode(junction.chain_code);
        if junction.hard {
            let (mini, _) = self.pair.secret.hard_derive_mini_secret_key(Some(cc), b"");
            Self::from_seed(&mini.to_bytes())
        } else {
            let (pair, _) = self.pair.derived_key_simple(cc, []);
            Keypair { pair, seed: None }
        }
    }

    /// Drops the remembered seed, e.g. so a key from a derivation path is
    /// stored the way the bittensor SDK stores it (without `secretSeed`).
    pub fn without_seed(mut self) -> Self {
        self.seed = None;
        self
    }

    pub fn hotkey(&self) -> Hotkey {
        Hotkey(self.pair.public.to_bytes())
    }
    pub fn seed(&self) -> Option<&[u8; 32]> {
        self.seed.as_ref()
    }
    /// The 64-byte expanded secret key (`privateKey` in wallet files).
    pub fn secret_bytes(&self) -> zeroize::Zeroizing<[u8; 64]> {
        zeroize::Zeroizing::new(self.pair.secret.to_bytes())
    }
    /// sr25519 signature under the `substrate` signing context (randomised, as in substrate).
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.pair.sign_simple(SIGNING_CONTEXT, message).to_bytes()
    }
}

struct Junction {
    hard: bool,
    chain_code: [u8; 32],
}

fn parse_junctions(path: &str) -> Result<Vec<Junction>, KeyError> {
    let mut out = Vec::new();
    let mut rest = path;
    while !rest.is_empty() {
        let hard = rest.starts_with("//");
        rest = rest
            .strip_prefix(if hard { "//" } else { "/" })
            .ok_or(KeyError::Uri("junction must start with /"))?;
        let end = rest.find('/').unwrap_or(rest.len());
        let name = &rest[..end];
        if name.is_empty() {
            return Err(KeyError::Uri("empty junction"));
        }
        out.push(Junction {
            hard,
            chain_code: junction_chain_code(name),
        });
        rest = &rest[end..];
    }
    Ok(out)
}

/// substrate's rule: numbers are SCALE `u64`, anything else a SCALE string;
/// encodings longer than 32 bytes are hashed with BLAKE2b-256.
fn junction_chain_code(name: &str) -> [u8; 32] {
    let encoded = match name.parse::<u64>() {
        Ok(n) => n.to_le_bytes().to_vec(),
        Err(_) => {
            let mut v = scale_compact_len(name.len());
            v.extend_from_slice(name.as_bytes());
            v
        }
    };
    let mut cc = [0u8; 32];
    if encoded.len() > 32 {
        cc.copy_from_slice(&Blake2b::<U32>::digest(&encoded));
    } else {
        cc[..encoded.len()].copy_from_slice(&encoded);
    }
    cc
}

fn scale_compact_len(n: usize) -> Vec<u8> {
    match n {
        0..=0x3f => vec![(n as u8) << 2],
        0x40..=0x3fff => (((n as u16) << 2) | 1).to_le_bytes().to_vec(),
        0x4000..=0x3fff_ffff => (((n as u32) << 2) | 2).to_le_bytes().to_vec(),
        _ => {
            let bytes = (n as u64).to_le_bytes();
            let len = 8 - (n as u64).leading_zeros() as usize / 8;
            let mut v = vec![(((len - 4) as u8) << 2) | 3];
            v.extend_from_slice(&bytes[..len]);
            v
        }
    }
}

fn ss58_checksum(data: &[u8]) -> [u8; 2] {
    let mut h = Blake2b512::new();
    h.update(b"SS58PRE");
    h.update(data);
    let out = h.finalize();
    [out[0], out[1]]
}

/// SS58 with prefix 42: base58(prefix || key || blake2b512("SS58PRE" || prefix || key)[..2]).
pub fn ss58_encode(public: &[u8; 32]) -> String {
    let mut data = Vec::with_capacity(35);
    data.push(SS58_PREFIX);
    data.extend_from_slice(public);
    let checksum = ss58_checksum(&data);
    data.extend_from_slice(&checksum);
    bs58::encode(data).into_string()
}

pub fn ss58_decode(address: &str) -> Result<[u8; 32], KeyError> {
    let data = bs58::decode(address)
        .into_vec()
        .map_err(|_| KeyError::Ss58("not base58"))?;
    if data.len() != 35 {
        return Err(KeyError::Ss58("wrong length for a 32-byte account"));
    }
    if data[0] != SS58_PREFIX {
        return Err(KeyError::Ss58("network prefix is not 42"));
    }
    if ss58_checksum(&data[..33]) != data[33..35] {
        return Err(KeyError::Ss58("bad checksum"));
    }
    Ok(data[1..33].try_into().expect("length checked"))
}

/// Parses `0x`-prefixed (or bare) hex of a 64-byte signature.
pub fn parse_signature_hex(s: &str) -> Result<[u8; 64], KeyError> {
    let s = s.strip_prefix("0x").unwrap_or(s);
    let mut out = [0u8; 64];
    hex::decode_to_slice(s, &mut out).map_err(|_| KeyError::SignatureEncoding)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Published substrate vectors (`subkey inspect`), also reproduced with the bittensor 11 SDK.
    const DEV_PUBLIC: &str = "46ebddef8cd9bb167dc30878d7113b7e168e6f0646beffd77d69d39bad76b47a";
    const DEV_SS58: &str = "5DfhGyQdFobKM8NsWvEeAKk5EQQgYe9AydgJ7rMB6E1EqRzV";
    const ALICE_PUBLIC: &str = "d43593c715fdd31c61141abd04a99fd6822c8558854ccde39a5684e7a56da27d";
    const ALICE_SS58: &str = "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY";
    const ALICE_SEED: &str = "e5be9a5092b81bca64be81d212e7f2f9eba183bb7a90954f7b76361f6edb5c0a";
    const BOB_SS58: &str = "5FHneW46xGXgs5mUiveU4sbTyGBzmstUspZC92UhjJM694ty";

    #[test]
    fn dev_phrase_matches_substrate() {
        let k = Keypair::from_phrase(DEV_PHRASE, None).unwrap();
        assert_eq!(hex::encode(k.hotkey().0), DEV_PUBLIC);
        assert_eq!(k.hotkey().to_ss58(), DEV_SS58);
        assert_eq!(
            hex::encode(k.seed().unwrap()),
            "fac7959dbfe72f052e5a0c3c8d6530f202b02fd8f9f5ca3580ec8deb7797479e"
        );
    }

    #[test]
    fn hard_derivation_matches_substrate_alice_and_bob() {
        let alice = Keypair::from_suri("//Alice").unwrap();
        assert_eq!(hex::encode(alice.hotkey().0), ALICE_PUBLIC);
        assert_eq!(alice.hotkey().to_ss58(), ALICE_SS58);
        assert_eq!(hex::encode(alice.seed().unwrap()), ALICE_SEED);
        let explicit = Keypair::from_suri(&format!("{DEV_PHRASE}//Alice")).unwrap();
        assert_eq!(explicit.hotkey(), alice.hotkey());
        assert_eq!(
            Keypair::from_suri("//Bob").unwrap().hotkey().to_ss58(),
            BOB_SS58
        );
        assert_eq!(
            Keypair::from_suri(&format!("0x{ALICE_SEED}"))
                .unwrap()
                .hotkey(),
            alice.hotkey()
        );
    }

    #[test]
    fn soft_derivation_is_deterministic_and_public() {
        let a = Keypair::from_suri("//Alice/soft").unwrap();
        let b = Keypair::from_suri("//Alice/soft").unwrap();
        assert_eq!(a.hotkey(), b.hotkey());
        assert_ne!(a.hotkey(), Keypair::from_suri("//Alice").unwrap().hotkey());
        assert!(a.seed().is_none());
    }

    #[test]
    fn sign_verify_and_secret_bytes_round_trip() {
        let k = Keypair::from_suri("//Alice").unwrap();
        let sig = k.sign(b"hello");
        assert!(k.hotkey().verify(b"hello", &sig));
        assert!(!k.hotkey().verify(b"hellO", &sig));
        let again = Keypair::from_secret_bytes(&*k.secret_bytes()).unwrap();
        assert_eq!(again.hotkey(), k.hotkey());
        assert!(again.hotkey().verify(b"x", &again.sign(b"x")));
    }

    #[test]
    fn ss58_rejects_bad_input() {
        assert_eq!(Hotkey::from_ss58(ALICE_SS58).unwrap().to_ss58(), ALICE_SS58);
        let mut bad = ALICE_SS58.to_string();
        bad.replace_range(10..11, if &bad[10..11] == "a" { "b" } else { "a" });
        assert!(Hotkey::from_ss58(&bad).is_err());
        assert!(Hotkey::from_ss58("0OIl").is_err());
        assert!(Hotkey::from_ss58("").is_err());
        // Polkadot (prefix 0) address of Alice.
        assert_eq!(
            Hotkey::from_ss58("15oF4uVJwmo4TdGW7VfQxNLavjCXviqxT9S1MgbjMNHr6Sp5"),
            Err(KeyError::Ss58("network prefix is not 42"))
        );
    }

    #[test]
    fn generated_phrases_reload_to_the_same_key() {
        let (phrase, k) = Keypair::generate(12).unwrap();
        assert_eq!(phrase.split_whitespace().count(), 12);
        assert_eq!(
            Keypair::from_phrase(&phrase, None).unwrap().hotkey(),
            k.hotkey()
        );
        assert!(Keypair::generate(13).is_err());
        assert!(Keypair::from_phrase("not a valid phrase at all", None).is_err());
    }
}
