//! Who signs the credentials: an X.509 certificate chain and its private
//! key, either the operator's own or a development chain made here.

use std::path::{Path, PathBuf};

use c2pa::crypto::raw_signature::SigningAlg;
use fractal_protocol::Hotkey;
use x509_parser::prelude::{FromDer, X509Certificate};
use zeroize::Zeroizing;

use crate::CredentialError;

/// Where a signing identity came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// `--c2pa-cert/--c2pa-key`: the operator's certificate, which may chain
    /// to a root on a C2PA trust list.
    Operator,
    /// A chain made on this machine: valid credentials that no trust list
    /// knows. `created` says whether this start made it.
    Development { created: bool },
}

/// A certificate chain (leaf first) and the leaf's private key, checked to
/// be usable for C2PA signing.
pub struct SigningIdentity {
    chain_pem: String,
    key_pem: Zeroizing<String>,
    alg: SigningAlg,
    /// The leaf's SubjectPublicKeyInfo, DER: what the hotkey binding signs.
    leaf_spki: Vec<u8>,
    subject: String,
    origin: Origin,
}

const DEV_CHAIN: &str = "c2pa-dev-chain.pem";
const DEV_KEY: &str = "c2pa-dev-key.pem";

/// The X.509 parts of a certificate chain this crate needs.
pub(crate) struct Leaf {
    pub spki: Vec<u8>,
    pub subject: String,
    pub alg: Option<SigningAlg>,
}

/// The first certificate of a PEM chain: its public key, subject and the
/// C2PA algorithm that key signs with (`None`: one we do not sign with).
pub(crate) fn leaf_of(chain_pem: &str) -> Result<Leaf, CredentialError> {
    let bad = |why: String| CredentialError::Certificate(why);
    let pem = x509_parser::pem::Pem::iter_from_buffer(chain_pem.as_bytes())
        .next()
        .ok_or_else(|| bad("no PEM certificate in the chain".into()))?
        .map_err(|e| bad(format!("the chain is not PEM: {e}")))?;
    if pem.label != "CERTIFICATE" {
        return Err(bad(format!(
            "the chain starts with a {:?} block, not a CERTIFICATE",
            pem.label
        )));
    }
    let (_, cert) = X509Certificate::from_der(&pem.contents)
        .map_err(|e| bad(format!("the leaf certificate does not parse: {e}")))?;
    let spki = cert.public_key();
    let oid = spki.algorithm.algorithm.to_id_string();
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok())
        .map(|o| o.to_id_string());
    let alg = match (oid.as_str(), curve.as_deref()) {
        ("1.3.101.112", _) => Some(SigningAlg::Ed25519),
        ("1.2.840.10045.2.1", Some("1.2.840.10045.3.1.7")) => Some(SigningAlg::Es256),
        ("1.2.840.10045.2.1", Some("1.3.132.0.34")) => Some(SigningAlg::Es384),
        _ => None,
    };
    Ok(Leaf {
        spki: spki.raw.to_vec(),
        subject: cert.subject().to_string(),
        alg,
    })
}

impl SigningIdentity {
    /// A chain (leaf first, PEM) and the leaf's PKCS#8 private key (PEM).
    pub fn from_pem(
        chain_pem: String,
        key_pem: Zeroizing<String>,
        origin: Origin,
    ) -> Result<Self, CredentialError> {
        let leaf = leaf_of(&chain_pem)?;
        let alg = leaf.alg.ok_or_else(|| {
            CredentialError::Certificate(
                "the leaf certificate's key is neither Ed25519 nor ECDSA P-256/P-384, the algorithms this gateway signs C2PA manifests with".into(),
            )
        })?;
        // Parses the key now, so a bad file fails the start, not a download.
        c2pa::create_signer::from_keys(chain_pem.as_bytes(), key_pem.as_bytes(), alg, None)
            .map_err(|e| CredentialError::Certificate(format!("the private key: {e}")))?;
        Ok(SigningIdentity {
            chain_pem,
            key_pem,
            alg,
            leaf_spki: leaf.spki,
            subject: leaf.subject,
            origin,
        })
    }

    /// The operator's certificate chain and key files.
    pub fn from_files(chain: &Path, key: &Path) -> Result<Self, CredentialError> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|e| CredentialError::Io(p.display().to_string(), e))
        };
        Self::from_pem(read(chain)?, Zeroizing::new(read(key)?), Origin::Operator)
    }

    /// The development chain kept in `dir`, made on first use: a root
    /// ("Fractal development CA") and a leaf for the gateway of `hotkey`,
    /// Ed25519 both. C2PA forbids signing with a self-signed certificate,
    /// hence two.
    pub fn development(dir: &Path, hotkey: &Hotkey) -> Result<Self, CredentialError> {
        let (chain_path, key_path) = Self::development_files(dir);
        if chain_path.exists() && key_path.exists() {
            let mut id = Self::from_files(&chain_path, &key_path)?;
            id.origin = Origin::Development { created: false };
            return Ok(id);
        }
        let (chain, key) = make_development_chain(hotkey)?;
        std::fs::create_dir_all(dir)
            .map_err(|e| CredentialError::Io(dir.display().to_string(), e))?;
        // Key first: a chain file on disk means its key is there too.
        fractal_wallet::write_private(&key_path, key.as_bytes())?;
        fractal_wallet::write_private(&chain_path, chain.as_bytes())?;
        Self::from_pem(chain, key, Origin::Development { created: true })
    }

    pub fn alg(&self) -> SigningAlg {
        self.alg
    }
    pub fn origin(&self) -> &Origin {
        &self.origin
    }
    /// The leaf certificate's subject, e.g. `CN=Fractal gateway 5F…`.
    pub fn subject(&self) -> &str {
        &self.subject
    }
    pub fn leaf_spki(&self) -> &[u8] {
        &self.leaf_spki
    }
    pub fn chain_pem(&self) -> &str {
        &self.chain_pem
    }
    pub(crate) fn signer(&self) -> Result<c2pa::BoxedSigner, CredentialError> {
        c2pa::create_signer::from_keys(
            self.chain_pem.as_bytes(),
            self.key_pem.as_bytes(),
            self.alg,
            None,
        )
        .map_err(CredentialError::C2pa)
    }
    /// Where [`SigningIdentity::development`] keeps its files in `dir`.
    pub fn development_files(dir: &Path) -> (PathBuf, PathBuf) {
        (dir.join(DEV_CHAIN), dir.join(DEV_KEY))
    }
}

/// Root and leaf, PEM (leaf first), and the leaf's key.
fn make_development_chain(hotkey: &Hotkey) -> Result<(String, Zeroizing<String>), CredentialError> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose, PKCS_ED25519,
    };
    let err = |e: rcgen::Error| {
        CredentialError::Certificate(format!("making the development certificate: {e}"))
    };
    let now = time::OffsetDateTime::now_utc();
    let validity = |p: &mut CertificateParams| {
        p.not_before = now - time::Duration::days(1);
        p.not_after = now + time::Duration::days(3650);
    };

    let ca_key = KeyPair::generate_for(&PKCS_ED25519).map_err(err)?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name = rcgen::DistinguishedName::new();
    ca.distinguished_name.push(
        DnType::CommonName,
        "Fractal development CA (not on any C2PA trust list)",
    );
    ca.distinguished_name
        .push(DnType::OrganizationName, "Fractal gateway");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut ca);
    let ca_cert = ca.self_signed(&ca_key).map_err(err)?;
    let issuer = Issuer::new(ca, ca_key);

    let leaf_key = KeyPair::generate_for(&PKCS_ED25519).map_err(err)?;
    let mut leaf = CertificateParams::default();
    leaf.distinguished_name = rcgen::DistinguishedName::new();
    leaf.distinguished_name
        .push(DnType::CommonName, format!("Fractal gateway {hotkey}"));
    leaf.distinguished_name
        .push(DnType::OrganizationName, "Fractal gateway");
    leaf.is_ca = IsCa::ExplicitNoCa;
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // id-kp-documentSigning and id-kp-emailProtection, both on C2PA's list
    // of claim-signing EKUs. Readers differ in which they accept by default:
    // c2pa-python 0.38 (c2pa-rs 0.91) takes only emailProtection and called
    // a documentSigning-only certificate invalid.
    leaf.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::Other(vec![1, 3, 6, 1, 5, 5, 7, 3, 36]),
        ExtendedKeyUsagePurpose::EmailProtection,
    ];
    leaf.use_authority_key_identifier_extension = true;
    validity(&mut leaf);
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer).map_err(err)?;

    Ok((
        format!("{}{}", leaf_cert.pem(), ca_cert.pem()),
        Zeroizing::new(leaf_key.serialize_pem()),
    ))
}
