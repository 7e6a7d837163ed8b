use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use fractal_protocol::Keypair;
use fractal_wallet::{list_wallets, Wallet};
use zeroize::Zeroizing;

#[derive(Args, Clone)]
pub struct Location {
    /// Folder holding the wallets.
    #[arg(long, env = "BT_WALLET_PATH", default_value_os_t = fractal_wallet::default_root())]
    pub wallet_path: PathBuf,
    /// Wallet (coldkey) name.
    #[arg(long, short = 'w', default_value = "default")]
    pub wallet_name: String,
}

#[derive(Args, Clone)]
pub struct Password {
    /// Store the coldkey unencrypted (not recommended outside tests).
    #[arg(long, conflicts_with = "password_env")]
    no_password: bool,
    /// Read the coldkey password from this environment variable instead of prompting.
    #[arg(long, value_name = "VAR")]
    password_env: Option<String>,
}

#[derive(Args, Clone)]
#[group(required = true, multiple = false)]
pub struct Source {
    /// BIP39 phrase (12-24 words) to restore from.
    #[arg(long)]
    mnemonic: Option<String>,
    /// 32-byte hex seed (`0x...`) to restore from.
    #[arg(long)]
    seed: Option<String>,
    /// substrate secret URI, e.g. `//Alice` or `<phrase>//hard/soft`.
    #[arg(long)]
    uri: Option<String>,
}

#[derive(Subcommand)]
pub enum WalletCmd {
    /// Create a new coldkey (encrypted) and a hotkey in one go.
    Create {
        #[command(flatten)]
        at: Location,
        /// Hotkey name.
        #[arg(long, default_value = "default")]
        hotkey: String,
        #[arg(long, default_value_t = 12)]
        words: usize,
        #[command(flatten)]
        password: Password,
        /// Print the new mnemonics (write them down: they are the only backup).
        #[arg(long)]
        show_mnemonic: bool,
        #[arg(long)]
        overwrite: bool,
    },
    /// Create a new coldkey only.
    NewColdkey {
        #[command(flatten)]
        at: Location,
        #[arg(long, default_value_t = 12)]
        words: usize,
        #[command(flatten)]
        password: Password,
        #[arg(long)]
        show_mnemonic: bool,
        #[arg(long)]
        overwrite: bool,
    },
    /// Create a new hotkey in an existing wallet.
    NewHotkey {
        #[command(flatten)]
        at: Location,
        #[arg(long, default_value = "default")]
        hotkey: String,
        #[arg(long, default_value_t = 12)]
        words: usize,
        #[arg(long)]
        show_mnemonic: bool,
        #[arg(long)]
        overwrite: bool,
    },
    /// Restore a coldkey from a mnemonic, seed or secret URI.
    RegenColdkey {
        #[command(flatten)]
        at: Location,
        #[command(flatten)]
        source: Source,
        #[command(flatten)]
        password: Password,
        #[arg(long)]
        overwrite: bool,
    },
    /// Restore a hotkey from a mnemonic, seed or secret URI.
    RegenHotkey {
        #[command(flatten)]
        at: Location,
        #[arg(long, default_value = "default")]
        hotkey: String,
        #[command(flatten)]
        source: Source,
        #[arg(long)]
        overwrite: bool,
    },
    /// List wallets with their coldkey and hotkey addresses.
    List {
        #[arg(long, env = "BT_WALLET_PATH", default_value_os_t = fractal_wallet::default_root())]
        wallet_path: PathBuf,
    },
    /// Show a wallet's addresses; with --secrets also its mnemonics and seeds.
    Show {
        #[command(flatten)]
        at: Location,
        /// Only this hotkey.
        #[arg(long)]
        hotkey: Option<String>,
        /// Print secret material (asks for the coldkey password if encrypted).
        #[arg(long)]
        secrets: bool,
        #[arg(long, value_name = "VAR")]
        password_env: Option<String>,
    },
}

pub fn wallet(at: &Location) -> anyhow::Result<Wallet> {
    Ok(Wallet::new(&at.wallet_path, &at.wallet_name)?)
}

fn from_source(s: &Source) -> anyhow::Result<(Keypair, Option<Zeroizing<String>>)> {
    if let Some(m) = &s.mnemonic {
        let phrase = Zeroizing::new(m.split_whitespace().collect::<Vec<_>>().join(" "));
        return Ok((Keypair::from_phrase(&phrase, None)?, Some(phrase)));
    }
    if let Some(seed) = &s.seed {
        let bytes = Zeroizing::new(
            hex::decode(seed.trim().trim_start_matches("0x")).context("--seed is not hex")?,
        );
        if bytes.len() != 32 {
            bail!("--seed must be 32 bytes of hex");
        }
        return Ok((Keypair::from_secret_bytes(&bytes)?, None));
    }
    let uri = s.uri.as_deref().expect("clap requires one source");
    // Stored like the bittensor SDK stores derived keys: without a seed.
    Ok((Keypair::from_suri(uri)?.without_seed(), None))
}

/// The password for a new coldkey: from the environment, or asked twice on a terminal.
fn new_password(p: &Password) -> anyhow::Result<Option<Zeroizing<String>>> {
    if p.no_password {
        return Ok(None);
    }
    if let Some(var) = &p.password_env {
        let pw =
            std::env::var(var).with_context(|| format!("environment variable {var} is not set"))?;
        if pw.is_empty() {
            bail!("password in {var} is empty");
        }
        return Ok(Some(Zeroizing::new(pw)));
    }
    let first = Zeroizing::new(
        rpassword::prompt_password("New coldkey password: ").context(
            "no terminal to ask for a password (use --password-env VAR or --no-password)",
        )?,
    );
    if first.is_empty() {
        bail!("password cannot be empty (use --no-password for an unencrypted coldkey)");
    }
    let again = Zeroizing::new(rpassword::prompt_password("Retype password: ")?);
    if first != again {
        bail!("passwords do not match");
    }
    Ok(Some(first))
}

pub fn existing_password(var: &Option<String>) -> Option<String> {
    match var {
        Some(v) => std::env::var(v).ok(),
        None => rpassword::prompt_password("Coldkey password: ").ok(),
    }
}

fn new_coldkey(
    w: &Wallet,
    words: usize,
    password: &Password,
    show: bool,
    overwrite: bool,
) -> anyhow::Result<()> {
    let pw = new_password(password)?;
    let (phrase, key) = Keypair::generate(words)?;
    let phrase = Zeroizing::new(phrase);
    w.write_coldkey(
        &key,
        Some(&phrase),
        pw.as_deref().map(|s| s.as_str()),
        overwrite,
    )?;
    println!(
        "coldkey  {}  ({})",
        key.hotkey(),
        if pw.is_some() {
            "encrypted"
        } else {
            "NOT encrypted"
        }
    );
    if show {
        println!("coldkey mnemonic: {}", &*phrase);
    }
    Ok(())
}

fn new_hotkey(
    w: &Wallet,
    name: &str,
    words: usize,
    show: bool,
    overwrite: bool,
) -> anyhow::Result<()> {
    let (phrase, key) = Keypair::generate(words)?;
    let phrase = Zeroizing::new(phrase);
    w.write_hotkey(name, &key, Some(&phrase), overwrite)?;
    println!("hotkey   {}  ({name})", key.hotkey());
    if show {
        println!("hotkey mnemonic:  {}", &*phrase);
    }
    Ok(())
}

pub fn run(cmd: WalletCmd) -> anyhow::Result<()> {
    match cmd {
        WalletCmd::Create {
            at,
            hotkey,
            words,
            password,
            show_mnemonic,
            overwrite,
        } => {
            let w = wallet(&at)?;
            w.hotkey_path(&hotkey)?;
            new_coldkey(&w, words, &password, show_mnemonic, overwrite)?;
            new_hotkey(&w, &hotkey, words, show_mnemonic, overwrite)?;
            println!("wallet {} written to {}", w.name(), w.dir().display());
            if !show_mnemonic {
                println!("mnemonics not shown; `fractal wallet show --secrets` prints them");
            }
        }
        WalletCmd::NewColdkey {
            at,
            words,
            password,
            show_mnemonic,
            overwrite,
        } => {
            new_coldkey(&wallet(&at)?, words, &password, show_mnemonic, overwrite)?;
        }
        WalletCmd::NewHotkey {
            at,
            hotkey,
            words,
            show_mnemonic,
            overwrite,
        } => {
            new_hotkey(&wallet(&at)?, &hotkey, words, show_mnemonic, overwrite)?;
        }
        WalletCmd::RegenColdkey {
            at,
            source,
            password,
            overwrite,
        } => {
            let w = wallet(&at)?;
            let (key, phrase) = from_source(&source)?;
            let pw = new_password(&password)?;
            w.write_coldkey(
                &key,
                phrase.as_deref().map(|s| s.as_str()),
                pw.as_deref().map(|s| s.as_str()),
                overwrite,
            )?;
            println!(
                "coldkey  {}  restored into {}",
                key.hotkey(),
                w.dir().display()
            );
        }
        WalletCmd::RegenHotkey {
            at,
            hotkey,
            source,
            overwrite,
        } => {
            let w = wallet(&at)?;
            let (key, phrase) = from_source(&source)?;
            w.write_hotkey(
                &hotkey,
                &key,
                phrase.as_deref().map(|s| s.as_str()),
                overwrite,
            )?;
            println!(
                "hotkey   {}  ({hotkey}) restored into {}",
                key.hotkey(),
                w.dir().display()
            );
        }
        WalletCmd::List { wallet_path } => {
            let wallets = list_wallets(&wallet_path)?;
            if wallets.is_empty() {
                println!("no wallets under {}", wallet_path.display());
            }
            for w in wallets {
                let cold = w.coldkey.map(|k| k.to_ss58()).unwrap_or_else(|| "?".into());
                println!("{}  coldkey {}", w.name, cold);
                for (name, key) in w.hotkeys {
                    println!(
                        "  └─ {}  {}",
                        name,
                        key.map(|k| k.to_ss58()).unwrap_or_else(|| "?".into())
                    );
                }
            }
        }
        WalletCmd::Show {
            at,
            hotkey,
            secrets,
            password_env,
        } => {
            let w = wallet(&at)?;
            if let Some(var) = password_env
                .as_ref()
                .filter(|v| std::env::var_os(v).is_none())
            {
                bail!("environment variable {var} is not set");
            }
            if !w.dir().is_dir() {
                bail!(
                    "no wallet {:?} under {}",
                    w.name(),
                    at.wallet_path.display()
                );
            }
            match w.coldkeypub() {
                Ok(k) => println!(
                    "coldkey  {}  {}",
                    k,
                    if w.coldkey_is_encrypted().unwrap_or(false) {
                        "(encrypted)"
                    } else {
                        ""
                    }
                ),
                Err(e) => println!("coldkey  unavailable: {e}"),
            }
            if secrets && w.coldkey_path().exists() {
                let loaded = w.coldkey(|| existing_password(&password_env))?;
                print_secrets("coldkey", &loaded);
            }
            let names = match hotkey {
                Some(h) => vec![h],
                None => w.hotkey_names()?,
            };
            for name in names {
                let key = w
                    .hotkeypub(&name)
                    .or_else(|_| w.hotkey(&name).map(|k| k.keypair.hotkey()))?;
                println!("hotkey   {key}  ({name})");
                if secrets {
                    print_secrets(&name, &w.hotkey(&name)?);
                }
            }
        }
    }
    Ok(())
}

fn print_secrets(label: &str, key: &fractal_wallet::LoadedKey) {
    if let Some(p) = &key.phrase {
        println!("  {label} mnemonic: {}", p.as_str());
    }
    if let Some(s) = key.keypair.seed() {
        println!("  {label} seed:     0x{}", hex::encode(s));
    }
}
