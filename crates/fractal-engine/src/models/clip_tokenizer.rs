//! The CLIP BPE tokenizer, built with the `tokenizers` crate the way
//! transformers' `CLIPTokenizerFast` is: NFC, collapse whitespace, lowercase,
//! split on CLIP's pattern, byte-level BPE with the `</w>` word suffix.
//!
//! The vocabulary comes from a model folder (`tokenizer/vocab.json` +
//! `merges.txt`), or for the built-in model from the real CLIP merges shipped
//! in `assets/` (vocabulary derived from the merges, as open_clip does).

use std::io::Read;
use std::path::Path;

use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormSeq, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSeq;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{SplitDelimiterBehavior, Tokenizer};

use crate::EngineError;

pub const BOS: &str = "<|startoftext|>";
pub const EOS: &str = "<|endoftext|>";
/// CLIP's context length; prompts are truncated and padded to it.
pub const MAX_TOKENS: usize = 77;
const PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
const BUILTIN_MERGES_GZ: &[u8] = include_bytes!("../../assets/clip-merges.txt.gz");

pub struct ClipTokenizer {
    inner: Tokenizer,
    bos: u32,
    eos: u32,
    pad: u32,
}

/// GPT-2/CLIP's reversible byte → printable char map, in its canonical order.
fn bytes_to_unicode() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    cs.into_iter()
        .map(|c| char::from_u32(c).expect("valid code point"))
        .collect()
}

fn parse_merges(text: &str) -> Result<Vec<(String, String)>, EngineError> {
    text.lines()
        .filter(|l| !l.starts_with("#version") && !l.is_empty())
        .map(|l| {
            let mut it = l.split(' ');
            match (it.next(), it.next(), it.next()) {
                (Some(a), Some(b), None) => Ok((a.to_string(), b.to_string())),
                _ => Err(EngineError::BadInput(format!("bad merges line {l:?}"))),
            }
        })
        .collect()
}

impl ClipTokenizer {
    /// The real CLIP vocabulary, built in.
    pub fn builtin() -> Result<Self, EngineError> {
        let mut text = String::new();
        flate2::read::GzDecoder::new(BUILTIN_MERGES_GZ)
            .read_to_string(&mut text)
            .map_err(|e| EngineError::BadInput(format!("built-in merges: {e}")))?;
        let merges = parse_merges(&text)?;
        let units = bytes_to_unicode();
        let mut tokens: Vec<String> = units.iter().map(|c| c.to_string()).collect();
        tokens.extend(units.iter().map(|c| format!("{c}</w>")));
        tokens.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
        tokens.push(BOS.into());
        tokens.push(EOS.into());
        let vocab = tokens
            .into_iter()
            .enumerate()
            .map(|(i, t)| (t, i as u32))
            .collect();
        Self::build(vocab, merges, EOS)
    }

    /// `tokenizer/vocab.json` + `merges.txt` of a diffusers folder; the pad
    /// token comes from `special_tokens_map.json` when present (SD2-style
    /// OpenCLIP tokenizers pad with `!`).
    pub fn from_folder(dir: &Path) -> Result<Self, EngineError> {
        let read = |name: &str| {
            std::fs::read_to_string(dir.join(name)).map_err(|e| EngineError::Io {
                path: dir.join(name),
                source: e,
            })
        };
        let vocab: std::collections::HashMap<String, u32> =
            serde_json::from_str(&read("vocab.json")?).map_err(|e| EngineError::Config {
                path: dir.join("vocab.json"),
                message: e.to_string(),
            })?;
        let merges = parse_merges(&read("merges.txt")?)?;
        let pad = match read("special_tokens_map.json") {
            Ok(text) => {
                let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
                let p = &v["pad_token"];
                p.as_str()
                    .or(p["content"].as_str())
                    .unwrap_or(EOS)
                    .to_string()
            }
            Err(_) => EOS.to_string(),
        };
        Self::build(vocab.into_iter().collect(), merges, &pad)
    }

    fn build(
        vocab: tokenizers::models::bpe::Vocab,
        merges: Vec<(String, String)>,
        pad: &str,
    ) -> Result<Self, EngineError> {
        let id = |t: &str| {
            vocab
                .get(t)
                .copied()
                .ok_or_else(|| EngineError::BadInput(format!("vocabulary lacks {t:?}")))
        };
        let (bos, eos, pad) = (id(BOS)?, id(EOS)?, id(pad)?);
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .end_of_word_suffix("</w>".into())
            .unk_token(EOS.into())
            .build()
            .map_err(|e| EngineError::BadInput(format!("BPE: {e}")))?;
        let mut inner = Tokenizer::new(bpe);
        let space = Replace::new(
            tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
            " ",
        )
        .map_err(|e| EngineError::BadInput(e.to_string()))?;
        inner
            .with_normalizer(Some(NormSeq::new(vec![
                NFC.into(),
                space.into(),
                Lowercase.into(),
            ])))
            .map_err(|e| EngineError::BadInput(e.to_string()))?;
        let split = Split::new(
            SplitPattern::Regex(PATTERN.into()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(|e| EngineError::BadInput(e.to_string()))?;
        inner.with_pre_tokenizer(Some(PreSeq::new(vec![
            split.into(),
            ByteLevel::new(false, true, false).into(),
        ])));
        Ok(ClipTokenizer {
            inner,
            bos,
            eos,
            pad,
        })
    }

    /// Writes `vocab.json`, `merges.txt` and `special_tokens_map.json`, the
    /// files transformers' `CLIPTokenizer` reads.
    pub fn write_folder(&self, dir: &Path) -> Result<(), EngineError> {
        let io = |p: std::path::PathBuf| move |e| EngineError::Io { path: p, source: e };
        std::fs::create_dir_all(dir).map_err(io(dir.to_path_buf()))?;
        let vocab: std::collections::BTreeMap<String, u32> =
            self.inner.get_vocab(false).into_iter().collect();
        let mut by_id: Vec<(&String, &u32)> = vocab.iter().collect();
        by_id.sort_by_key(|(_, id)| **id);
        let ordered: serde_json::Map<String, serde_json::Value> = by_id
            .into_iter()
            .map(|(t, id)| (t.clone(), (*id).into()))
            .collect();
        let write = |name: &str, data: String| {
            std::fs::write(dir.join(name), data).map_err(io(dir.join(name)))
        };
        write("vocab.json", serde_json::to_string(&ordered).expect("json"))?;
        let mut text = String::new();
        flate2::read::GzDecoder::new(BUILTIN_MERGES_GZ)
            .read_to_string(&mut text)
            .map_err(|e| EngineError::BadInput(format!("built-in merges: {e}")))?;
        write(
            "merges.txt",
            text.replacen(text.lines().next().unwrap_or(""), "#version: 0.2", 1),
        )?;
        let pad = self
            .inner
            .id_to_token(self.pad)
            .unwrap_or_else(|| EOS.into());
        write("special_tokens_map.json", serde_json::json!({"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad}).to_string())?;
        write("tokenizer_config.json", serde_json::json!({"model_max_length": MAX_TOKENS, "tokenizer_class": "CLIPTokenizer", "do_lower_case": true}).to_string())
    }

    /// `[BOS] tokens.. [EOS] [PAD]..`: exactly 77 ids, truncated like the
    /// pipelines do (the last slot before padding is always EOS).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        let enc = self
            .inner
            .encode(text.trim(), false)
            .map_err(|e| EngineError::BadInput(format!("tokenizer: {e}")))?;
        let mut ids = Vec::with_capacity(MAX_TOKENS);
        ids.push(self.bos);
        ids.extend(enc.get_ids().iter().take(MAX_TOKENS - 2));
        ids.push(self.eos);
        ids.resize(MAX_TOKENS, self.pad);
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_vocabulary_has_clip_ids() {
        let t = ClipTokenizer::builtin().unwrap();
        let ids = t.encode("a red fox running in the snow").unwrap();
        // Same ids as transformers' CLIPTokenizer on the real CLIP vocabulary.
        assert_eq!(
            &ids[..9],
            &[49406, 320, 736, 3240, 2761, 530, 518, 2583, 49407]
        );
        assert_eq!(ids.len(), 77);
        assert_eq!(t.encode("").unwrap()[..3], [49406, 49407, 49407]);
        let long = t.encode(&"fox ".repeat(200)).unwrap();
        assert_eq!((long.len(), long[76]), (77, 49407));
    }
}
