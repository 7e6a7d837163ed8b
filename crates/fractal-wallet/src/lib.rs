//! Bittensor wallets on disk, byte-compatible with the bittensor 11 SDK and btcli.
//!
//! Layout under the wallets root (default `~/.bittensor/wallets`):
//! ```text
//! <wallet>/coldkey            keyfile JSON, usually $NACL-encrypted
//! <wallet>/coldkeypub.txt     public keyfile JSON
//! <wallet>/hotkeys/<name>     keyfile JSON (plaintext, as bittensor writes it)
//! <wallet>/hotkeys/<name>pub.txt
//! ```
//! Files are written atomically (temp file + rename) with mode 0600, folders 0700.

mod keyfile;
mod nacl;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use fractal_protocol::{Hotkey, Keypair};
use zeroize::Zeroizing;

pub use keyfile::{
    parse_keyfile, parse_pubfile, private_keyfile_json, public_keyfile_json, LoadedKey,
};
pub use nacl::{decrypt_nacl, encrypt_nacl, is_nacl};

#[derive(Debug, thiserror::Error)]
pub enum WalletError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} already exists (pass --overwrite to replace it)")]
    Exists(PathBuf),
    #[error("{0} does not exist")]
    Missing(PathBuf),
    #[error("invalid name {0:?}: use letters, digits, '-', '_' or '.', not starting with '.'")]
    BadName(String),
    #[error("invalid keyfile: {0}")]
    Keyfile(String),
    #[error("wrong password (or the keyfile is corrupt)")]
    WrongPassword,
    #[error(
        "{0} is encrypted with a legacy bittensor scheme; re-encrypt it with a current btcli first"
    )]
    LegacyEncryption(PathBuf),
    #[error("the coldkey is encrypted; a password is required")]
    PasswordRequired,
    #[error(transparent)]
    Key(#[from] fractal_protocol::keys::KeyError),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> WalletError + '_ {
    move |source| WalletError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The default wallets root: `$HOME/.bittensor/wallets`.
pub fn default_root() -> PathBuf {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".bittensor").join("wallets")
}

fn check_name(name: &str) -> Result<(), WalletError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(WalletError::BadName(name.to_string()))
    }
}

/// One named wallet (a coldkey and its hotkeys).
#[derive(Clone, Debug)]
pub struct Wallet {
    root: PathBuf,
    name: String,
}

/// What `list` reports about a wallet; unreadable keys show as `None`.
#[derive(Clone, Debug)]
pub struct WalletSummary {
    pub name: String,
    pub coldkey: Option<Hotkey>,
    pub hotkeys: Vec<(String, Option<Hotkey>)>,
}

impl Wallet {
    pub fn new(root: impl Into<PathBuf>, name: &str) -> Result<Self, WalletError> {
        check_name(name)?;
        Ok(Wallet {
            root: root.into(),
            name: name.to_string(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn dir(&self) -> PathBuf {
        self.root.join(&self.name)
    }
    pub fn coldkey_path(&self) -> PathBuf {
        self.dir().join("coldkey")
    }
    pub fn coldkeypub_path(&self) -> PathBuf {
        self.dir().join("coldkeypub.txt")
    }
    pub fn hotkey_path(&self, hotkey: &str) -> Result<PathBuf, WalletError> {
        check_name(hotkey)?;
        Ok(self.dir().join("hotkeys").join(hotkey))
    }
    pub fn hotkeypub_path(&self, hotkey: &str) -> Result<PathBuf, WalletError> {
        check_name(hotkey)?;
        Ok(self.dir().join("hotkeys").join(format!("{hotkey}pub.txt")))
    }

    /// Writes the coldkey (encrypted when `password` is given) and coldkeypub.txt.
    pub fn write_coldkey(
        &self,
        key: &Keypair,
        phrase: Option<&str>,
        password: Option<&str>,
        overwrite: bool,
    ) -> Result<(), WalletError> {
        let (secret, public) = (self.coldkey_path(), self.coldkeypub_path());
        if !overwrite {
            refuse_existing(&[&secret, &public])?;
        }
        let json = private_keyfile_json(key, phrase);
        let data = match password {
            Some(pw) => Zeroizing::new(encrypt_nacl(json.as_bytes(), pw)),
            None => Zeroizing::new(json.as_bytes().to_vec()),
        };
        write_private(&secret, &data)?;
        write_private(&public, public_keyfile_json(&key.hotkey()).as_bytes())
    }

    /// Writes hotkeys/<name> (plaintext, as bittensor does) and its pub file.
    pub fn write_hotkey(
        &self,
        hotkey: &str,
        key: &Keypair,
        phrase: Option<&str>,
        overwrite: bool,
    ) -> Result<(), WalletError> {
        let (secret, public) = (self.hotkey_path(hotkey)?, self.hotkeypub_path(hotkey)?);
        if !overwrite {
            refuse_existing(&[&secret, &public])?;
        }
        write_private(&secret, private_keyfile_json(key, phrase).as_bytes())?;
        write_private(&public, public_keyfile_json(&key.hotkey()).as_bytes())
    }

    pub fn coldkeypub(&self) -> Result<Hotkey, WalletError> {
        parse_pubfile(&read(&self.coldkeypub_path())?)
    }

    pub fn coldkey_is_encrypted(&self) -> Result<bool, WalletError> {
        Ok(is_nacl(&read(&self.coldkey_path())?))
    }

    /// Loads the coldkey; `password` is asked for only if the file is encrypted.
    pub fn coldkey(
        &self,
        password: impl FnOnce() -> Option<String>,
    ) -> Result<LoadedKey, WalletError> {
        let path = self.coldkey_path();
        load_keyfile(&path, password)
    }

    pub fn hotkey(&self, hotkey: &str) -> Result<LoadedKey, WalletError> {
        load_keyfile(&self.hotkey_path(hotkey)?, || None)
    }

    pub fn hotkeypub(&self, hotkey: &str) -> Result<Hotkey, WalletError> {
        parse_pubfile(&read(&self.hotkeypub_path(hotkey)?)?)
    }

    /// Hotkey names in this wallet, sorted.
    pub fn hotkey_names(&self) -> Result<Vec<String>, WalletError> {
        let dir = self.dir().join("hotkeys");
        if !dir.exists() {
            return Ok(Vec::new());
        }
        let mut names: Vec<String> = fs::read_dir(&dir)
            .map_err(io_err(&dir))?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_file())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| !n.ends_with("pub.txt") && !n.starts_with('.'))
            .collect();
        names.sort();
        Ok(names)
    }
}

/// Every wallet under `root`, sorted by name.
pub fn list_wallets(root: &Path) -> Result<Vec<WalletSummary>, WalletError> {
    if !root.exists() {
        return Ok(Vec::new());
    }
    let mut names: Vec<String> = fs::read_dir(root)
        .map_err(io_err(root))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| check_name(n).is_ok())
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|name| {
            let w = Wallet::new(root, &name)?;
            let hotkeys = w.hotkey_names()?.into_iter().map(|h| {
                let key = w
                    .hotkeypub(&h)
                    .ok()
                    .or_else(|| w.hotkey(&h).ok().map(|k| k.keypair.hotkey()));
                (h, key)
            });
            Ok(WalletSummary {
                coldkey: w.coldkeypub().ok(),
                hotkeys: hotkeys.collect(),
                name,
            })
        })
        .collect()
}

fn load_keyfile(
    path: &Path,
    password: impl FnOnce() -> Option<String>,
) -> Result<LoadedKey, WalletError> {
    let data = Zeroizing::new(read(path)?);
    if is_nacl(&data) {
        let pw = Zeroizing::new(password().ok_or(WalletError::PasswordRequired)?);
        let plain = decrypt_nacl(&data, &pw)?;
        return parse_keyfile(&plain);
    }
    if data.starts_with(b"$ANSIBLE_VAULT") || data.starts_with(b"gAAAAA") {
        return Err(WalletError::LegacyEncryption(path.to_owned()));
    }
    parse_keyfile(&data)
}

fn read(path: &Path) -> Result<Vec<u8>, WalletError> {
    match fs::read(path) {
        Ok(d) => Ok(d),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(WalletError::Missing(path.to_owned()))
        }
        Err(e) => Err(WalletError::Io {
            path: path.to_owned(),
            source: e,
        }),
    }
}

fn refuse_existing(paths: &[&Path]) -> Result<(), WalletError> {
    match paths.iter().find(|p| p.exists()) {
        Some(p) => Err(WalletError::Exists(p.to_path_buf())),
        None => Ok(()),
    }
}

/// Atomic write with owner-only permissions: a crash leaves the old file or
/// the new one. For any secret a Fractal node keeps on disk.
pub fn write_private(path: &Path, data: &[u8]) -> Result<(), WalletError> {
    let dir = path.parent().expect("keyfile paths have a parent");
    create_private_dir(dir)?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("key"),
        std::process::id()
    ));
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let result = (|| {
        let mut f = opts.open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(io_err(path))
}

fn create_private_dir(dir: &Path) -> Result<(), WalletError> {
    let mut b = fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(dir).map_err(io_err(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_load_sign_verify_round_trip() {
        let root = tempfile::tempdir().unwrap();
        let w = Wallet::new(root.path(), "alice").unwrap();
        let (cold_phrase, cold) = Keypair::generate(12).unwrap();
        let (hot_phrase, hot) = Keypair::generate(12).unwrap();
        w.write_coldkey(&cold, Some(&cold_phrase), None, false)
            .unwrap();
        w.write_hotkey("miner", &hot, Some(&hot_phrase), false)
            .unwrap();

        let loaded = w.hotkey("miner").unwrap();
        assert_eq!(loaded.keypair.hotkey(), hot.hotkey());
        assert_eq!(
            loaded.phrase.as_deref().map(|s| s.as_str()),
            Some(hot_phrase.as_str())
        );
        let sig = loaded.keypair.sign(b"fractal");
        assert!(w.hotkeypub("miner").unwrap().verify(b"fractal", &sig));
        assert_eq!(w.coldkeypub().unwrap(), cold.hotkey());
        assert_eq!(w.coldkey(|| None).unwrap().keypair.hotkey(), cold.hotkey());

        // No silent overwrite.
        assert!(matches!(
            w.write_hotkey("miner", &hot, None, false),
            Err(WalletError::Exists(_))
        ));

        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(w.hotkey_path("miner").unwrap())
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }

        let list = list_wallets(root.path()).unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].coldkey, Some(cold.hotkey()));
        assert_eq!(
            list[0].hotkeys,
            vec![("miner".to_string(), Some(hot.hotkey()))]
        );
    }

    #[test]
    fn names_cannot_escape_the_root() {
        let root = tempfile::tempdir().unwrap();
        for bad in ["", "..", "../x", "a/b", ".hidden", "a\\b"] {
            assert!(
                matches!(Wallet::new(root.path(), bad), Err(WalletError::BadName(_))),
                "{bad}"
            );
        }
        let w = Wallet::new(root.path(), "ok").unwrap();
        assert!(w.hotkey_path("../coldkey").is_err());
    }

    #[test]
    fn missing_and_corrupt_files_are_clear_errors() {
        let root = tempfile::tempdir().unwrap();
        let w = Wallet::new(root.path(), "w").unwrap();
        assert!(matches!(w.hotkey("h"), Err(WalletError::Missing(_))));
        let p = w.hotkey_path("h").unwrap();
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, b"{not json").unwrap();
        assert!(matches!(w.hotkey("h"), Err(WalletError::Keyfile(_))));
        fs::write(&p, b"gAAAAABlegacy").unwrap();
        assert!(matches!(
            w.hotkey("h"),
            Err(WalletError::LegacyEncryption(_))
        ));
    }

    /// The bittensor SDK writes hotkeys/<name> with these exact fields; we read
    /// its files and write files it reads (field set and hex format match).
    #[test]
    fn python_sdk_keyfiles_load_and_match_our_derivation() {
        let doc: serde_json::Value =
            serde_json::from_str(include_str!("../../../fixtures/interop/bittensor11.json"))
                .unwrap();
        for entry in doc["keys"].as_array().unwrap() {
            let kf = &entry["keyfile"];
            let text = serde_json::to_vec(kf).unwrap();
            let loaded = parse_keyfile(&text).unwrap();
            let source = entry["source"].as_str().unwrap();
            let ours = match entry["kind"].as_str().unwrap() {
                "mnemonic" => Keypair::from_phrase(source, None).unwrap(),
                // The SDK stores keys from derivation paths without a seed.
                _ => Keypair::from_suri(source).unwrap().without_seed(),
            };
            assert_eq!(ours.hotkey(), loaded.keypair.hotkey(), "{source}");
            assert_eq!(ours.hotkey().to_ss58(), kf["ss58Address"].as_str().unwrap());
            // Our own keyfile carries the same fields and values.
            let phrase = kf["secretPhrase"].as_str();
            let mine: serde_json::Value =
                serde_json::from_str(&private_keyfile_json(&ours, phrase)).unwrap();
            for field in [
                "accountId",
                "publicKey",
                "secretPhrase",
                "secretSeed",
                "ss58Address",
                "cryptoType",
            ] {
                assert_eq!(mine.get(field), kf.get(field), "{source}: {field}");
            }
            // privateKey is scalar (32 bytes) || nonce (32 bytes). Soft derivation
            // draws a fresh random nonce in schnorrkel (and so in the SDK), so only
            // the scalar is defined for those; elsewhere the whole key must match.
            let (a, b) = (
                mine["privateKey"].as_str().unwrap(),
                kf["privateKey"].as_str().unwrap(),
            );
            let soft = source.replace("//", "").contains('/');
            if soft {
                assert_eq!(a[..66], b[..66], "{source}: privateKey scalar");
            } else {
                assert_eq!(a, b, "{source}: privateKey");
            }
        }
    }
}
