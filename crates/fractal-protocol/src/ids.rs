//! Small named types that cross node boundaries.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest as _, Sha256};

/// Error parsing one of the identifiers in this module.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdError {
    #[error("expected {expected} hex characters, got {got}")]
    Length { expected: usize, got: usize },
    #[error("not hexadecimal: {0}")]
    Hex(String),
}

fn parse_hex<const N: usize>(s: &str) -> Result<[u8; N], IdError> {
    let s = s.strip_prefix("0x").unwrap_or(s);
    if s.len() != 2 * N {
        return Err(IdError::Length {
            expected: 2 * N,
            got: s.len(),
        });
    }
    let mut out = [0u8; N];
    hex::decode_to_slice(s, &mut out).map_err(|e| IdError::Hex(e.to_string()))?;
    Ok(out)
}

/// A SHA-256 digest. Serialised as 64 lowercase hex characters.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Digest32(pub [u8; 32]);

impl Digest32 {
    pub fn sha256(bytes: &[u8]) -> Self {
        Digest32(Sha256::digest(bytes).into())
    }
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for Digest32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}
impl fmt::Debug for Digest32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest32({self})")
    }
}
impl FromStr for Digest32 {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        parse_hex::<32>(s).map(Digest32)
    }
}
impl Serialize for Digest32 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}
impl<'de> Deserialize<'de> for Digest32 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Content address of a [`crate::ModelManifest`]: SHA-256 of its canonical encoding.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Debug)]
#[serde(transparent)]
pub struct ManifestId(pub Digest32);

impl fmt::Display for ManifestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}
impl FromStr for ManifestId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        s.parse().map(ManifestId)
    }
}

/// The generation seed. Everything random on the generation path derives from it.
#[derive(
    Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Debug, Default,
)]
#[serde(transparent)]
pub struct Seed(pub u64);

impl fmt::Display for Seed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Identifies one generation job across the grid: 16 random bytes, shown as 32 hex characters.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct JobId(pub [u8; 16]);

impl JobId {
    /// A fresh id from the operating system's randomness (never used on the
    /// generation path itself, only to name jobs).
    pub fn random() -> Self {
        use rand::RngCore;
        let mut b = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut b);
        JobId(b)
    }
}
impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}
impl fmt::Debug for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JobId({self})")
    }
}
impl FromStr for JobId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        parse_hex::<16>(s).map(JobId)
    }
}
impl Serialize for JobId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}
impl<'de> Deserialize<'de> for JobId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_text() {
        let id = JobId([7; 16]);
        assert_eq!(id.to_string().parse::<JobId>().unwrap(), id);
        let d = Digest32::sha256(b"abc");
        assert_eq!(
            d.to_string(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(d.to_string().parse::<Digest32>().unwrap(), d);
        assert!(matches!(
            "abc".parse::<JobId>(),
            Err(IdError::Length { .. })
        ));
        assert!(matches!(
            "zz".repeat(16).parse::<JobId>(),
            Err(IdError::Hex(_))
        ));
    }
}
