//! The T5 / umT5 tokenizer a Wan folder ships (`tokenizer/tokenizer.json`,
//! SentencePiece unigram with `</s>` appended), through the `tokenizers`
//! crate: token ids padded with `<pad>` or truncated to the text length the
//! model runs with, as transformers' `T5TokenizerFast` makes them
//! (`padding="max_length"`, `truncation=True`).

use std::path::Path;

use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use crate::EngineError;

pub struct T5Tokenizer {
    inner: Tokenizer,
}

/// A prompt's ids, `length` long, of which the first `valid` are the prompt
/// (with its `</s>`) and the rest padding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenIds {
    pub ids: Vec<u32>,
    pub valid: usize,
}

impl T5Tokenizer {
    pub fn from_file(path: &Path) -> Result<Self, EngineError> {
        let bytes = std::fs::read(path).map_err(|source| EngineError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&bytes, path)
    }

    /// A `tokenizer.json`'s bytes; `origin` names them in errors.
    pub fn from_json(bytes: &[u8], origin: &Path) -> Result<Self, EngineError> {
        let bad = |message: String| EngineError::Config {
            path: origin.to_path_buf(),
            message,
        };
        let inner = Tokenizer::from_bytes(bytes).map_err(|e| bad(e.to_string()))?;
        if inner.token_to_id("<pad>").is_none() {
            return Err(bad("no <pad> token".into()));
        }
        Ok(Self { inner })
    }

    /// Tokens in the vocabulary, added ones included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// `text` as `length` ids.
    pub fn encode(&self, text: &str, length: usize) -> Result<TokenIds, EngineError> {
        let pad_id = self.inner.token_to_id("<pad>").expect("checked at load");
        let mut t = self.inner.clone();
        t.with_truncation(Some(TruncationParams {
            max_length: length,
            ..Default::default()
        }))
        .map_err(|e| EngineError::BadInput(e.to_string()))?;
        t.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(length),
            pad_id,
            pad_token: "<pad>".into(),
            ..Default::default()
        }));
        let enc = t
            .encode(text, true)
            .map_err(|e| EngineError::BadInput(format!("tokenizing the prompt: {e}")))?;
        let valid = enc.get_attention_mask().iter().filter(|&&m| m == 1).count();
        Ok(TokenIds {
            ids: enc.get_ids().to_vec(),
            valid,
        })
    }
}
