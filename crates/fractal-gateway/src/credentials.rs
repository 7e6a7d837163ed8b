//! Content credentials on the way out.
//!
//! The files the provers made stay as they are (`{id}.mp4` is the MP4 the
//! trace and the audits are checked against; the GIF and thumbnail are
//! derived from it). A download gets a copy with a C2PA manifest
//! ([`fractal_credentials`]) signed when first asked for and cached beside
//! them, one per audit state (`{id}.{state}.c2pa.{ext}`): the audit of a
//! sampled job finishes after the job does, and the next download after it
//! carries the outcome. Signing hashes the file and makes one signature: a
//! cache miss costs milliseconds.

use std::path::{Path, PathBuf};

use fractal_credentials::{Audit, Generation, Issuer, MediaFormat, Origin, SigningIdentity};
use fractal_verifier::{AuditState, Verifier};

use crate::db::Job;
use crate::openai::OaiError;
use crate::Gateway;

/// Which certificate signs the credentials.
#[derive(Clone, Debug, Default)]
pub enum CertificateSource {
    /// A development chain made in the data folder on first start: valid,
    /// on no C2PA trust list.
    #[default]
    Development,
    /// The operator's chain (leaf first) and the leaf's PKCS#8 key, PEM.
    Operator { chain: PathBuf, key: PathBuf },
}

/// The gateway's issuer: its certificate, bound to the verifier's hotkey.
pub(crate) fn open_issuer(
    source: &CertificateSource,
    data_dir: &Path,
    verifier: &Verifier,
) -> Result<Issuer, fractal_credentials::CredentialError> {
    let identity = match source {
        CertificateSource::Development => {
            SigningIdentity::development(data_dir, &verifier.hotkey())?
        }
        CertificateSource::Operator { chain, key } => SigningIdentity::from_files(chain, key)?,
    };
    match identity.origin() {
        Origin::Development { created } => {
            let (chain, _) = SigningIdentity::development_files(data_dir);
            tracing::warn!(
                certificate = %chain.display(),
                created,
                "content credentials are signed with a development certificate: they validate, but no C2PA trust list knows it; pass --c2pa-cert/--c2pa-key to sign with your own"
            );
        }
        Origin::Operator => {
            tracing::info!(
                subject = identity.subject(),
                "content credentials signed with the operator's certificate"
            );
        }
    }
    Issuer::new(identity, verifier.hotkey(), |m| verifier.sign(m))
}

const STATES: [&str; 4] = ["not_sampled", "pending", "passed", "failed"];

fn state_name(a: &Audit) -> &'static str {
    match a {
        Audit::NotSampled => STATES[0],
        Audit::Pending => STATES[1],
        Audit::Passed => STATES[2],
        Audit::Failed { .. } => STATES[3],
    }
}

/// Every file video `id` may have under `dir`, bare and signed.
pub(crate) fn files_of(dir: &Path, id: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for ext in ["mp4", "gif", "png"] {
        out.push(dir.join(format!("{id}.{ext}")));
        for state in STATES {
            out.push(dir.join(format!("{id}.{state}.c2pa.{ext}")));
        }
    }
    out
}

impl Gateway {
    /// What the credentials say about `job` now.
    fn generation(&self, job: &Job) -> Result<Generation, OaiError> {
        let made = self.db.provenance(&job.id)?;
        let audit = match &made {
            None => Audit::NotSampled,
            Some(p) => match self
                .verifier
                .audit_state(&p.request_id)
                .map_err(OaiError::internal)?
            {
                AuditState::NotSampled => Audit::NotSampled,
                AuditState::Pending => Audit::Pending,
                AuditState::Passed => Audit::Passed,
                AuditState::Failed { check } => Audit::Failed { check },
            },
        };
        let s = &job.spec;
        // Videos completed before provenance was recorded: the model the
        // job was accepted for (the gateway's own for the oldest).
        let accepted = self
            .catalog
            .lock()
            .expect("catalog lock")
            .job_manifest(&s.manifest_id)
            .map_err(OaiError::internal)?;
        let default_guidance = self
            .manifest_of(&accepted)
            .map_or(self.model.manifest.defaults.guidance_scale, |m| {
                m.defaults.guidance_scale
            });
        Ok(Generation {
            video_id: job.id.clone(),
            manifest_id: made
                .as_ref()
                .map_or_else(|| accepted.to_string(), |p| p.manifest_id.clone()),
            model: s.model.clone(),
            seed: s.seed,
            prompt_sha256: Generation::sha256_hex(&s.prompt),
            negative_prompt_sha256: Generation::sha256_hex(&s.negative_prompt),
            frames: s.frames,
            width: s.width,
            height: s.height,
            steps: s.steps,
            guidance_scale: made.as_ref().map_or(default_guidance, |p| p.guidance_scale),
            prover: job.prover.clone().unwrap_or_default(),
            // Empty for a video completed before the gateway recorded it.
            trace_root: made.map(|p| p.trace_root).unwrap_or_default(),
            audit,
        })
    }

    /// The file `{id}.{ext}` with its content credentials.
    pub(crate) async fn credentialed(
        &self,
        job: &Job,
        ext: &'static str,
        format: MediaFormat,
    ) -> Result<Vec<u8>, OaiError> {
        let generation = self.generation(job)?;
        let dir = self.config.videos_dir();
        let bare = dir.join(format!("{}.{ext}", job.id));
        let signed = dir.join(format!(
            "{}.{}.c2pa.{ext}",
            job.id,
            state_name(&generation.audit)
        ));
        let issuer = self.issuer.clone();
        let stale: Vec<PathBuf> = STATES
            .iter()
            .map(|s| dir.join(format!("{}.{s}.c2pa.{ext}", job.id)))
            .filter(|p| *p != signed)
            .collect();
        tokio::task::spawn_blocking(move || -> Result<Vec<u8>, OaiError> {
            if let Ok(bytes) = std::fs::read(&signed) {
                return Ok(bytes);
            }
            let media = std::fs::read(&bare)
                .map_err(|e| OaiError::internal(format!("{}: {e}", bare.display())))?;
            let bytes = issuer
                .sign(&media, format, &generation)
                .map_err(|e| OaiError::internal(format!("signing content credentials: {e}")))?;
            let tmp = signed.with_extension(format!("tmp{}", rand::random::<u32>()));
            std::fs::write(&tmp, &bytes)
                .and_then(|_| std::fs::rename(&tmp, &signed))
                .map_err(|e| OaiError::internal(format!("{}: {e}", signed.display())))?;
            for p in stale {
                let _ = std::fs::remove_file(p);
            }
            Ok(bytes)
        })
        .await
        .map_err(OaiError::internal)?
    }
}
