//! The `$NACL` keyfile encryption of the bittensor SDK:
//! `"$NACL" || nonce (24) || secretbox(key, nonce, plaintext)` where the key is
//! libsodium's `crypto_pwhash` Argon2i (v1.3) at the SENSITIVE limits
//! (8 passes, 512 MiB) over the password with bittensor's fixed salt.

use argon2::{Algorithm, Argon2, Params, Version};
use xsalsa20poly1305::aead::{Aead, KeyInit};
use xsalsa20poly1305::{XSalsa20Poly1305, NONCE_SIZE};
use zeroize::Zeroizing;

use crate::WalletError;

const MAGIC: &[u8] = b"$NACL";
/// bittensor's `NACL_SALT` (a constant, so the same password gives the same key).
const NACL_SALT: [u8; 16] = *b"\x13q\x83\xdf\xf1Z\t\xbc\x9c\x90\xb5Q\x879\xe9\xb1";
/// libsodium `crypto_pwhash_argon2i_OPSLIMIT_SENSITIVE` / `MEMLIMIT_SENSITIVE` (in KiB).
const OPSLIMIT: u32 = 8;
const MEMLIMIT_KIB: u32 = 512 * 1024;

pub fn is_nacl(data: &[u8]) -> bool {
    data.starts_with(MAGIC)
}

fn derive_key(password: &str) -> Zeroizing<[u8; 32]> {
    let params =
        Params::new(MEMLIMIT_KIB, OPSLIMIT, 1, Some(32)).expect("constant parameters are valid");
    let mut key = Zeroizing::new([0u8; 32]);
    Argon2::new(Algorithm::Argon2i, Version::V0x13, params)
        .hash_password_into(password.as_bytes(), &NACL_SALT, &mut *key)
        .expect("32-byte output and 16-byte salt are valid");
    key
}

pub fn encrypt_nacl(plaintext: &[u8], password: &str) -> Vec<u8> {
    use rand::RngCore;
    let key = derive_key(password);
    let mut nonce = [0u8; NONCE_SIZE];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let cipher = XSalsa20Poly1305::new((&*key).into());
    let sealed = cipher
        .encrypt((&nonce).into(), plaintext)
        .expect("secretbox encryption cannot fail");
    [MAGIC, &nonce, &sealed].concat()
}

pub fn decrypt_nacl(data: &[u8], password: &str) -> Result<Zeroizing<Vec<u8>>, WalletError> {
    let body = data
        .strip_prefix(MAGIC)
        .ok_or_else(|| WalletError::Keyfile("not $NACL-encrypted".into()))?;
    if body.len() < NONCE_SIZE + 16 {
        return Err(WalletError::Keyfile("$NACL data is truncated".into()));
    }
    let (nonce, sealed) = body.split_at(NONCE_SIZE);
    let key = derive_key(password);
    let cipher = XSalsa20Poly1305::new((&*key).into());
    cipher
        .decrypt(nonce.into(), sealed)
        .map(Zeroizing::new)
        .map_err(|_| WalletError::WrongPassword)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    fn python_vector() -> (String, String, Vec<u8>) {
        let doc: serde_json::Value =
            serde_json::from_str(include_str!("../../../fixtures/interop/bittensor11.json"))
                .unwrap();
        let n = &doc["nacl"];
        let blob = base64::engine::general_purpose::STANDARD
            .decode(n["blob_b64"].as_str().unwrap())
            .unwrap();
        (
            n["password"].as_str().unwrap().into(),
            n["plaintext"].as_str().unwrap().into(),
            blob,
        )
    }

    /// A coldkey encrypted by the bittensor 11 SDK opens with the right password
    /// and fails cleanly with a wrong one.
    #[test]
    fn python_encrypted_coldkey_decrypts() {
        let (password, plaintext, blob) = python_vector();
        let plain = decrypt_nacl(&blob, &password).unwrap();
        assert_eq!(std::str::from_utf8(&plain).unwrap(), plaintext);
        assert!(matches!(
            decrypt_nacl(&blob, "wrong password"),
            Err(WalletError::WrongPassword)
        ));
    }

    #[test]
    fn round_trip_and_corruption() {
        let blob = encrypt_nacl(b"secret keyfile", "pw");
        assert!(is_nacl(&blob));
        assert_eq!(&*decrypt_nacl(&blob, "pw").unwrap(), b"secret keyfile");
        let mut bad = blob.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(matches!(
            decrypt_nacl(&bad, "pw"),
            Err(WalletError::WrongPassword)
        ));
        assert!(matches!(
            decrypt_nacl(b"$NACLshort", "pw"),
            Err(WalletError::Keyfile(_))
        ));
    }
}
