//! Tokenization: `tokenizer.json` through the `tokenizers` crate.
//!
//! Owns the model's token limit and what happens past it: truncation that keeps
//! the special tokens the post-processor adds (for CLIP the final EOS), or a
//! [`PreprocessError::TextTooLong`] when the caller asked not to truncate.

use std::path::Path;

use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use super::PreprocessError;

/// A tokenizer with a fixed maximum sequence length.
#[derive(Clone)]
pub struct TextTokenizer {
    /// Encodes without any truncation or padding.
    plain: Tokenizer,
    /// Encodes with truncation to `max_len` (special tokens included).
    truncating: Tokenizer,
    max_len: usize,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("max_len", &self.max_len)
            .finish_non_exhaustive()
    }
}

impl TextTokenizer {
    /// Loads `tokenizer.json`; `max_len` counts the special tokens too.
    pub fn from_file(path: &Path, max_len: usize) -> Result<Self, String> {
        let tok = Tokenizer::from_file(path)
            .map_err(|e| format!("cannot load tokenizer {}: {e}", path.display()))?;
        Self::new(tok, max_len)
    }

    /// Wraps an already loaded tokenizer; any padding or truncation stored in
    /// the file is replaced by ours.
    pub fn new(mut tok: Tokenizer, max_len: usize) -> Result<Self, String> {
        if max_len == 0 {
            return Err("maximum text length must be at least 1 token".into());
        }
        tok.with_padding(None);
        tok.with_truncation(None)
            .map_err(|e| format!("cannot configure tokenizer: {e}"))?;
        let plain = tok;
        let mut truncating = plain.clone();
        truncating
            .with_truncation(Some(TruncationParams {
                max_length: max_len,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| format!("cannot configure tokenizer truncation: {e}"))?;
        Ok(TextTokenizer {
            plain,
            truncating,
            max_len,
        })
    }

    /// The longest sequence the model accepts, special tokens included.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Token ids of `text` with the special tokens added.
    ///
    /// Past the limit: clipped when `truncate`, else [`PreprocessError::TextTooLong`].
    pub fn encode(&self, text: &str, truncate: bool) -> Result<Vec<u32>, PreprocessError> {
        let ids = self.encode_with(&self.plain, text)?;
        if ids.len() <= self.max_len {
            return Ok(ids);
        }
        if !truncate {
            return Err(PreprocessError::TextTooLong {
                tokens: ids.len(),
                limit: self.max_len,
            });
        }
        self.encode_with(&self.truncating, text)
    }

    /// The tokenizer without truncation or padding, for callers that need
    /// whole encodings (the MLLM prompt builder cuts texts by offsets).
    pub fn plain(&self) -> &Tokenizer {
        &self.plain
    }

    /// The tokenizer's id for a token string, if it has one.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.plain.token_to_id(token)
    }

    fn encode_with(&self, tok: &Tokenizer, text: &str) -> Result<Vec<u32>, PreprocessError> {
        let enc = tok
            .encode(text, true)
            .map_err(|e| PreprocessError::Internal(format!("tokenizer failed: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }
}
