//! `fractal verify-credentials FILE`: reads a video's C2PA manifest, checks
//! its signature, the hotkey binding and, with `--chain`, that the hotkey
//! is a validator of the subnet.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use fractal_credentials::{Audit, Credential, MediaFormat};
use fractal_protocol::Hotkey;

use crate::chain_cmd::{runtime, ChainUrl};

#[derive(Args)]
pub struct VerifyCredentialsArgs {
    /// An MP4, GIF or PNG from a Fractal gateway.
    file: PathBuf,
    /// Also check on this chain that the binding's hotkey holds a validator
    /// permit on the subnet (`http://` local chain, `ws(s)://` subtensor).
    #[arg(long)]
    chain: Option<String>,
    #[arg(long, default_value_t = 1)]
    netuid: u16,
    /// Root certificates to trust (PEM); without it no signer is trusted
    /// and a sound file is reported "valid", not "trusted".
    #[arg(long)]
    trust_anchors: Option<PathBuf>,
    /// Print the report as JSON (with the whole manifest store).
    #[arg(long)]
    json: bool,
}

/// Whether the binding's hotkey is a validator of the subnet.
#[derive(serde::Serialize)]
struct OnChain {
    chain: String,
    netuid: u16,
    registered: bool,
    validator_permit: bool,
}

pub fn run(a: VerifyCredentialsArgs) -> anyhow::Result<()> {
    let bytes = std::fs::read(&a.file).with_context(|| format!("reading {}", a.file.display()))?;
    let format = MediaFormat::sniff(&bytes).with_context(|| a.file.display().to_string())?;
    let anchors = a
        .trust_anchors
        .as_ref()
        .map(|p| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display())))
        .transpose()?;
    let c = fractal_credentials::read(&bytes, format, anchors.as_deref())
        .with_context(|| a.file.display().to_string())?;
    let on_chain = match (&a.chain, &c.binding) {
        (Some(url), Ok(hotkey)) => Some(check_chain(url, a.netuid, hotkey)?),
        _ => None,
    };
    if a.json {
        let mut v = serde_json::to_value(&c)?;
        v["on_chain"] = serde_json::to_value(&on_chain)?;
        emit(&(serde_json::to_string_pretty(&v)? + "\n"))?;
    } else {
        emit(&report(&c, on_chain.as_ref()))?;
    }
    let chain_ok = on_chain.as_ref().is_none_or(|o| o.validator_permit);
    anyhow::ensure!(
        c.signature_valid() && c.binding.is_ok() && chain_ok,
        "the content credentials do not verify"
    );
    Ok(())
}

fn check_chain(url: &str, netuid: u16, hotkey: &str) -> anyhow::Result<OnChain> {
    let hotkey = Hotkey::from_ss58(hotkey)?;
    let chain = ChainUrl {
        url: url.to_string(),
        netuid,
    };
    let mg = runtime()?.block_on(async {
        chain
            .connect()
            .await?
            .metagraph()
            .await
            .map_err(anyhow::Error::from)
    })?;
    let n = mg.neuron(&hotkey);
    Ok(OnChain {
        chain: url.to_string(),
        netuid,
        registered: n.is_some(),
        validator_permit: n.is_some_and(|n| n.validator_permit),
    })
}

/// Writes `text` to stdout; a reader that stopped reading (`| head`) is
/// not an error.
fn emit(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// The human-readable report.
fn report(c: &Credential, on_chain: Option<&OnChain>) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    // Writing to a String cannot fail.
    macro_rules! say {
        ($($arg:tt)*) => {{
            let _ = writeln!(out, $($arg)*);
        }};
    }
    let yes_no = |ok: bool| if ok { "ok" } else { "FAILED" };
    say!("C2PA manifest: {}", c.state);
    for (code, why) in &c.failures {
        say!("  {code}: {why}");
    }
    if c.valid_apart_from_trust() && c.state == fractal_credentials::State::Valid {
        say!("  (signature and hashes verify; the signer is not on a trust list given)");
    }
    say!(
        "signed by: {} (issuer {}, {}){}",
        c.signer.common_name.as_deref().unwrap_or("?"),
        c.signer.issuer.as_deref().unwrap_or("?"),
        c.signer.alg.as_deref().unwrap_or("?"),
        c.signer
            .time
            .as_deref()
            .map(|t| format!(" at {t}"))
            .unwrap_or_default()
    );
    say!("generator: {}", c.claim_generator.join(", "));
    say!(
        "digital source type: {}",
        c.digital_source_type.as_deref().unwrap_or("none")
    );
    match &c.fractal {
        None => say!("no Fractal assertion"),
        Some(f) => {
            let g = &f.generation;
            say!(
                "video: {} ({}x{}, {} frames, {} steps, guidance {})",
                g.video_id,
                g.width,
                g.height,
                g.frames,
                g.steps,
                g.guidance_scale
            );
            say!("model: {} (manifest {})", g.model, g.manifest_id);
            say!("seed: {}  prompt sha256: {}", g.seed, g.prompt_sha256);
            say!("prover: {}  trace root: {}", g.prover, g.trace_root);
            let audit = match &g.audit {
                Audit::NotSampled => "not sampled".to_string(),
                Audit::Pending => "pending when signed".to_string(),
                Audit::Passed => "passed".to_string(),
                Audit::Failed { check } => format!("FAILED ({check})"),
            };
            say!("audit: {audit}");
            say!("validator: {}", f.validator);
        }
    }
    match &c.binding {
        Ok(hotkey) => say!(
            "hotkey binding: {} ({hotkey} vouches for the signing certificate)",
            yes_no(true)
        ),
        Err(why) => say!("hotkey binding: {} ({why})", yes_no(false)),
    }
    if let Some(o) = on_chain {
        say!(
            "on {} subnet {}: {}",
            o.chain,
            o.netuid,
            match (o.registered, o.validator_permit) {
                (true, true) => "a validator (permit held)",
                (true, false) => "registered, WITHOUT a validator permit",
                (false, _) => "NOT registered",
            }
        );
    }
    out
}
