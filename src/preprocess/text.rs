//! Tokenization: `tokenizer.json` through the `tokenizers` crate.
//!
//! Owns the model's token limit and what happens past it: truncation that keeps
//! the special tokens the post-processor adds (for CLIP the final EOS), or a
//! [`PreprocessError::TextTooLong`] when the caller asked not to truncate.
//! A text is tokenised once, and a long text that will be truncated is cut
//! first to a prefix that yields the same kept tokens (see
//! [`TextTokenizer::encode`]), so the work does not grow with what is thrown
//! away. The HTTP layer bounds a text's length in characters before this.

use std::path::Path;

use tokenizers::{Encoding, PostProcessor, Tokenizer, TruncationDirection};

use super::{PreprocessError, SetupError};

/// The first prefix of a long text tried for truncation, in bytes per kept
/// token (CLIP tokens average 4-6 bytes of English; 77 tokens need ~1.2 KB).
const CUT_BYTES_PER_TOKEN: usize = 16;
/// The smallest prefix tried, in bytes.
const MIN_CUT_BYTES: usize = 1024;

/// Why a tokenizer cannot be used with a length limit.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerSetupError {
    #[error("cannot configure the tokenizer: {0}")]
    Configure(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("a maximum text length of {max_len} tokens leaves no room beside the {added} special tokens")]
    NoRoom { max_len: usize, added: usize },
}

/// A tokenizer with a fixed maximum sequence length.
#[derive(Clone)]
pub struct TextTokenizer {
    /// Encodes without any truncation or padding.
    plain: Tokenizer,
    max_len: usize,
    /// Special tokens the post-processor adds to one sequence.
    added: usize,
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
    pub fn from_file(path: &Path, max_len: usize) -> Result<Self, SetupError> {
        let tok = Tokenizer::from_file(path).map_err(|source| SetupError::Tokenizer {
            path: path.to_path_buf(),
            source,
        })?;
        Self::new(tok, max_len).map_err(|source| SetupError::Tokenizer {
            path: path.to_path_buf(),
            source: Box::new(source),
        })
    }

    /// Wraps an already loaded tokenizer; any padding or truncation stored in
    /// the file is replaced by ours.
    pub fn new(mut tok: Tokenizer, max_len: usize) -> Result<Self, TokenizerSetupError> {
        if max_len == 0 {
            return Err(TokenizerSetupError::NoRoom { max_len, added: 0 });
        }
        tok.with_padding(None);
        tok.with_truncation(None)
            .map_err(TokenizerSetupError::Configure)?;
        let added = tok
            .get_post_processor()
            .map_or(0, |p| p.added_tokens(false));
        if added >= max_len {
            return Err(TokenizerSetupError::NoRoom { max_len, added });
        }
        Ok(TextTokenizer {
            plain: tok,
            max_len,
            added,
        })
    }

    /// The longest sequence the model accepts, special tokens included.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Token ids of `text` with the special tokens added.
    ///
    /// Past the limit: clipped when `truncate` (exactly as the `tokenizers`
    /// truncation would: the first `max_len` minus the special tokens are
    /// kept), else [`PreprocessError::TextTooLong`] with the full count.
    ///
    /// A text that is truncated is first cut to a prefix (a few KB, grown
    /// when needed) and only the prefix is tokenised, when the prefix shows
    /// that the kept tokens cannot depend on the rest: whitespace separates
    /// the last kept token from the cut, and the normaliser and pre-tokeniser
    /// of CLIP never join text across whitespace. Otherwise the whole text is
    /// tokenised, as before.
    pub fn encode(&self, text: &str, truncate: bool) -> Result<Vec<u32>, PreprocessError> {
        let keep = self.max_len - self.added;
        if truncate {
            if let Some(enc) = self.encode_prefix(text, keep)? {
                return self.finish(enc);
            }
        }
        let mut enc = self.encode_raw(text)?;
        let total = enc.len() + self.added;
        if total <= self.max_len {
            return self.finish(enc);
        }
        if !truncate {
            return Err(PreprocessError::TextTooLong {
                tokens: total,
                limit: self.max_len,
            });
        }
        enc.truncate(keep, 0, TruncationDirection::Right);
        self.finish(enc)
    }

    /// The first `keep` tokens of `text` from a prefix, when a prefix is
    /// enough to know them (see [`TextTokenizer::encode`]).
    fn encode_prefix(&self, text: &str, keep: usize) -> Result<Option<Encoding>, PreprocessError> {
        let mut cut = keep.saturating_mul(CUT_BYTES_PER_TOKEN).max(MIN_CUT_BYTES);
        while cut < text.len() {
            let prefix = &text[..text.floor_char_boundary(cut)];
            let mut enc = self.encode_raw(prefix)?;
            if enc.len() >= keep && keep > 0 {
                let end = enc.get_offsets()[keep - 1].1;
                if whitespace_after(prefix, end) {
                    enc.truncate(keep, 0, TruncationDirection::Right);
                    return Ok(Some(enc));
                }
            }
            cut = cut.saturating_mul(4);
        }
        Ok(None)
    }

    /// The tokens of `text` alone: no special tokens, no truncation.
    fn encode_raw(&self, text: &str) -> Result<Encoding, PreprocessError> {
        self.plain
            .encode(text, false)
            .map_err(PreprocessError::Tokenizer)
    }

    /// Adds the special tokens.
    fn finish(&self, enc: Encoding) -> Result<Vec<u32>, PreprocessError> {
        let enc = self
            .plain
            .post_process(enc, None, true)
            .map_err(PreprocessError::Tokenizer)?;
        Ok(enc.get_ids().to_vec())
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

    /// The whole encoding of a prompt (special tokens added, nothing cut),
    /// with the offsets a prompt builder cuts texts by.
    pub fn encode_prompt(&self, prompt: &str) -> Result<tokenizers::Encoding, PreprocessError> {
        self.plain
            .encode(prompt, true)
            .map_err(PreprocessError::Tokenizer)
    }
}

/// The error for a prompt that still does not fit after its text was cut
/// as often as a prompt builder tries (a template can tokenise differently
/// around each cut): reported as one token over `limit`.
pub fn still_too_long(limit: usize) -> PreprocessError {
    PreprocessError::TextTooLong {
        tokens: limit + 1,
        limit,
    }
}

/// The text of a prompt cut so that the prompt loses `excess` tokens: the
/// text `t` stands at bytes `start..start + t.len()` of the prompt whose
/// token offsets are `offsets`; it is cut (on a character boundary) before
/// the first of its last `excess` tokens. `None` when the text has no more
/// than `excess` tokens or only whitespace would remain: it cannot be
/// shortened to fit. The prompt builders retry with the cut text, since a
/// cut can change how the template around it tokenises.
pub fn cut_prompt_text(
    t: &str,
    offsets: &[(usize, usize)],
    start: usize,
    excess: usize,
) -> Option<String> {
    let end = start + t.len();
    let text_tokens: Vec<usize> = offsets
        .iter()
        .filter(|(s, e)| *s >= start && *e <= end && e > s)
        .map(|(s, _)| s - start)
        .collect();
    if text_tokens.len() <= excess {
        return None;
    }
    let mut cut = text_tokens[text_tokens.len() - excess].min(t.len());
    while !t.is_char_boundary(cut) {
        cut -= 1;
    }
    let kept = &t[..cut];
    (!kept.trim().is_empty()).then(|| kept.to_string())
}

/// Whether `text` has whitespace at or after byte `from` (which may fall
/// inside a character: the search starts at the next character).
fn whitespace_after(text: &str, from: usize) -> bool {
    let Some(start) = (from..=text.len()).find(|&i| text.is_char_boundary(i)) else {
        return false;
    };
    text[start..].chars().any(char::is_whitespace)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;
    use tokenizers::{TruncationParams, TruncationStrategy};

    fn clip_tokenizer() -> Tokenizer {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/clip-tiny/tokenizer.json");
        Tokenizer::from_file(path).unwrap()
    }

    /// The previous implementation: the whole text through a tokenizer that
    /// truncates (and counted in full for `truncate = false`).
    fn reference(tok: &Tokenizer, text: &str, max_len: usize) -> (Vec<u32>, usize) {
        let mut plain = tok.clone();
        plain.with_truncation(None).unwrap();
        plain.with_padding(None);
        let full = plain.encode(text, true).unwrap().get_ids().len();
        let mut t = plain.clone();
        t.with_truncation(Some(TruncationParams {
            max_length: max_len,
            strategy: TruncationStrategy::LongestFirst,
            stride: 0,
            direction: TruncationDirection::Right,
        }))
        .unwrap();
        (t.encode(text, true).unwrap().get_ids().to_vec(), full)
    }

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    const PIECES: &[&str] = &[
        "a",
        "photo",
        "of",
        "the",
        "cat",
        "Dog's",
        "it'll",
        "we've",
        "running",
        "ÉCOLE",
        "naïve",
        "e\u{301}",
        "İstanbul",
        "東京",
        "猫が好きです",
        "🐱",
        "👍🏽",
        "12345",
        "3.14",
        "!!!",
        "...",
        "--",
        "<|endoftext|>",
        "<|startoftext|>",
        "x",
        "supercalifragilistic",
        "\u{0}",
        "\u{200b}",
        "ﬁ",
        "Ⅻ",
    ];
    const SPACES: &[&str] = &[
        " ", "  ", "\t", "\n", "\r\n", "\u{a0}", "\u{3000}", "\u{2003}",
    ];

    fn random_text(rng: &mut Rng, target: usize) -> String {
        let mut s = String::new();
        while s.len() < target {
            match rng.below(10) {
                0 => {
                    // A long word of letters (one pre-token split by BPE).
                    let n = 1 + rng.below(400);
                    for _ in 0..n {
                        s.push(char::from(b'a' + rng.below(26) as u8));
                    }
                }
                1 => s.push_str(&" ".repeat(1 + rng.below(3000))),
                2 => s.push_str(SPACES[rng.below(SPACES.len())]),
                _ => s.push_str(PIECES[rng.below(PIECES.len())]),
            }
            if rng.below(3) > 0 {
                s.push_str(SPACES[rng.below(SPACES.len())]);
            }
        }
        s
    }

    #[test]
    fn encoding_is_unchanged_for_every_length_and_shape() {
        let tok = clip_tokenizer();
        let t = TextTokenizer::new(tok.clone(), 77).unwrap();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut cases: Vec<String> = vec![
            String::new(),
            "a photo of a cat".into(),
            "word ".repeat(100),
            "word ".repeat(1000),
            "a".repeat(5000),
            "猫".repeat(3000),
            format!("{}{}", " ".repeat(20_000), "word ".repeat(200)),
            format!("{} tail", "word ".repeat(75)),
            format!(
                "{}supercalifragilistic{}",
                "w ".repeat(74),
                " x".repeat(2000)
            ),
        ];
        // The 75th kept token in a word that the first cut (1216 bytes)
        // splits: only the whitespace check tells the prefix is not enough.
        for pad in 0..48 {
            cases.push(format!(
                "{}{}photograph supercalifragilistic {}",
                "w               ".repeat(74),
                " ".repeat(pad),
                "more words ".repeat(300)
            ));
        }
        for i in 0..160 {
            let target = [10, 300, 1100, 1300, 2000, 5000, 12_000][i % 7];
            cases.push(random_text(&mut rng, target));
        }
        for text in &cases {
            let (want, full) = reference(&tok, text, 77);
            let got = t.encode(text, true).unwrap();
            assert_eq!(
                got,
                want,
                "truncate=true differs for {:?}",
                &text[..text.len().min(200)]
            );
            match t.encode(text, false) {
                Ok(ids) => {
                    assert!(full <= 77);
                    assert_eq!(ids, want);
                }
                Err(PreprocessError::TextTooLong { tokens, limit }) => {
                    assert_eq!((tokens, limit), (full, 77));
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    #[test]
    fn a_huge_text_is_cut_before_tokenising() {
        let t = TextTokenizer::new(clip_tokenizer(), 77).unwrap();
        let text = "word ".repeat(3_000_000);
        let start = Instant::now();
        let ids = t.encode(&text, true).unwrap();
        // Tokenising all 15 MB takes seconds; the prefix takes microseconds.
        assert!(start.elapsed().as_millis() < 1000, "{:?}", start.elapsed());
        assert_eq!(ids.len(), 77);
        let short = t.encode(&"word ".repeat(80), true).unwrap();
        assert_eq!(ids, short);
    }
}
