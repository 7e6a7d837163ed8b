//! The keyfile JSON format of the bittensor SDK.

use fractal_protocol::{Hotkey, Keypair};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::WalletError;

/// `cryptoType` value for sr25519 in bittensor_core.
const CRYPTO_SR25519: u8 = 1;

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct KeyfileJson {
    account_id: Option<String>,
    public_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    private_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    secret_phrase: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    secret_seed: Option<String>,
    ss58_address: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    crypto_type: Option<u8>,
}

impl Drop for KeyfileJson {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.private_key.zeroize();
        self.secret_phrase.zeroize();
        self.secret_seed.zeroize();
    }
}

/// A key read from a keyfile, with its phrase when the file stores one.
pub struct LoadedKey {
    pub keypair: Keypair,
    pub phrase: Option<Zeroizing<String>>,
}

fn hex32(s: &str, what: &str) -> Result<Vec<u8>, WalletError> {
    hex::decode(s.strip_prefix("0x").unwrap_or(s))
        .map_err(|_| WalletError::Keyfile(format!("{what} is not hex")))
}

/// The full (secret) keyfile, as bittensor writes `coldkey` and `hotkeys/<name>`.
pub fn private_keyfile_json(key: &Keypair, phrase: Option<&str>) -> Zeroizing<String> {
    let public = format!("0x{}", hex::encode(key.hotkey().0));
    let json = KeyfileJson {
        account_id: Some(public.clone()),
        public_key: Some(public),
        private_key: Some(format!("0x{}", hex::encode(*key.secret_bytes()))),
        secret_phrase: phrase.map(str::to_string),
        secret_seed: key.seed().map(|s| format!("0x{}", hex::encode(s))),
        ss58_address: Some(key.hotkey().to_ss58()),
        crypto_type: Some(CRYPTO_SR25519),
    };
    Zeroizing::new(serde_json::to_string(&json).expect("keyfile serialises"))
}

/// `coldkeypub.txt` / `hotkeys/<name>pub.txt`.
pub fn public_keyfile_json(key: &Hotkey) -> String {
    let public = format!("0x{}", hex::encode(key.0));
    let json = KeyfileJson {
        account_id: Some(public.clone()),
        public_key: Some(public),
        private_key: None,
        secret_phrase: None,
        secret_seed: None,
        ss58_address: Some(key.to_ss58()),
        crypto_type: Some(CRYPTO_SR25519),
    };
    serde_json::to_string(&json).expect("keyfile serialises")
}

fn parse_json(data: &[u8]) -> Result<KeyfileJson, WalletError> {
    let json: KeyfileJson = serde_json::from_slice(data)
        .map_err(|e| WalletError::Keyfile(format!("not keyfile JSON ({})", e.classify_name())))?;
    if json.crypto_type.is_some_and(|t| t != CRYPTO_SR25519) {
        return Err(WalletError::Keyfile(
            "only sr25519 keys are supported".into(),
        ));
    }
    Ok(json)
}

trait ClassifyName {
    fn classify_name(&self) -> &'static str;
}
impl ClassifyName for serde_json::Error {
    // Never echo the content: a keyfile error message may end up in logs.
    fn classify_name(&self) -> &'static str {
        match self.classify() {
            serde_json::error::Category::Io => "io",
            serde_json::error::Category::Syntax => "syntax error",
            serde_json::error::Category::Data => "unexpected fields or types",
            serde_json::error::Category::Eof => "truncated",
        }
    }
}

/// Loads a secret keyfile: from `privateKey`, else `secretSeed`, else
/// `secretPhrase`, and checks that it matches the stated public key.
pub fn parse_keyfile(data: &[u8]) -> Result<LoadedKey, WalletError> {
    let json = parse_json(data)?;
    let keypair = if let Some(pk) = &json.private_key {
        Keypair::from_secret_bytes(&Zeroizing::new(hex32(pk, "privateKey")?))?
    } else if let Some(seed) = &json.secret_seed {
        Keypair::from_secret_bytes(&Zeroizing::new(hex32(seed, "secretSeed")?))?
    } else if let Some(phrase) = &json.secret_phrase {
        Keypair::from_phrase(phrase, None)?
    } else {
        return Err(WalletError::Keyfile(
            "no secret in keyfile (is this a pub file?)".into(),
        ));
    };
    let stated = stated_public(&json)?;
    if stated.is_some_and(|s| s != keypair.hotkey()) {
        return Err(WalletError::Keyfile(
            "secret does not match the stated public key".into(),
        ));
    }
    Ok(LoadedKey {
        keypair,
        phrase: json.secret_phrase.clone().map(Zeroizing::new),
    })
}

/// Reads a public keyfile (or the public part of a secret one).
pub fn parse_pubfile(data: &[u8]) -> Result<Hotkey, WalletError> {
    let json = parse_json(data)?;
    stated_public(&json)?.ok_or_else(|| WalletError::Keyfile("no public key in keyfile".into()))
}

fn stated_public(json: &KeyfileJson) -> Result<Option<Hotkey>, WalletError> {
    let from_hex = json
        .public_key
        .as_deref()
        .or(json.account_id.as_deref())
        .map(|h| -> Result<Hotkey, WalletError> {
            let b = hex32(h, "publicKey")?;
            Ok(Hotkey(b.try_into().map_err(|_| {
                WalletError::Keyfile("publicKey is not 32 bytes".into())
            })?))
        })
        .transpose()?;
    let from_ss58 = json
        .ss58_address
        .as_deref()
        .map(Hotkey::from_ss58)
        .transpose()?;
    match (from_hex, from_ss58) {
        (Some(a), Some(b)) if a != b => Err(WalletError::Keyfile(
            "publicKey and ss58Address disagree".into(),
        )),
        (a, b) => Ok(a.or(b)),
    }
}
