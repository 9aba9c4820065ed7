//! The frozen byte-level BPE tokenizer: trained once on the real train split with the `tokenizers`
//! crate, saved as a Hugging Face `tokenizer.json` (loadable from Python's `tokenizers`), and used
//! unchanged by every generation.
//!
//! Conventions: a line of wikitext-2 is encoded as its trimmed text with a prefix space (GPT-2 style,
//! so a word looks the same at the start of a line as inside it); `<unk>` is one token; every line is
//! followed by [`EOT`], the boundary that blocks cross and that free sampling starts from.

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::path::Path;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer as HfTokenizer, TokenizerBuilder};

/// The end-of-text token that separates lines (and articles).
pub const EOT: &str = "<|endoftext|>";
/// wikitext-2's out-of-vocabulary marker, kept as a single token.
pub const UNK: &str = "<unk>";

/// A loaded tokenizer with the ids the lab needs.
pub struct Tokenizer {
    inner: HfTokenizer,
    json: String,
    pub eot: u32,
}

impl Tokenizer {
    /// Trains a byte-level BPE of `vocab_size` tokens (including the byte alphabet and the two special
    /// tokens) on `lines`. Deterministic: the same lines give the same bytes.
    pub fn train<S: AsRef<str> + Sync>(lines: &[S], vocab_size: usize) -> Result<Self> {
        let min = 256 + 2 + 1;
        if vocab_size < min {
            bail!("--vocab-size must be at least {min} (256 bytes, {EOT}, {UNK} and one merge), got {vocab_size}");
        }
        let specials = vec![AddedToken::from(EOT, true), AddedToken::from(UNK, true)];
        let mut trainer = BpeTrainerBuilder::new()
            .show_progress(false)
            .vocab_size(vocab_size)
            .min_frequency(2)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .special_tokens(specials.clone())
            .build();
        let mut tok = TokenizerBuilder::new()
            .with_model(BPE::default())
            .with_normalizer(None::<tokenizers::NormalizerWrapper>)
            .with_pre_tokenizer(Some(ByteLevel::new(true, true, true)))
            .with_post_processor(None::<tokenizers::PostProcessorWrapper>)
            .with_decoder(Some(ByteLevelDecoder::default()))
            .build()
            .map_err(|e| anyhow::anyhow!("building the tokenizer: {e}"))?;
        // Registered before training so that `<unk>` in the text is never split into bytes.
        tok.add_special_tokens(specials).map_err(|e| anyhow::anyhow!("registering special tokens: {e}"))?;
        tok.train(&mut trainer, lines.iter().map(|l| l.as_ref()))
            .map_err(|e| anyhow::anyhow!("training the tokenizer: {e}"))?;
        let json = tok.to_string(false).map_err(|e| anyhow::anyhow!("serialising the tokenizer: {e}"))?;
        Self::from_json(&json).context("reloading the trained tokenizer")
    }

    /// Parses a `tokenizer.json` text. It must have [`EOT`]; [`UNK`] is optional (the lab's own
    /// tokenizers have it, GPT-2's has none).
    pub fn from_json(json: &str) -> Result<Self> {
        let inner = HfTokenizer::from_bytes(json.as_bytes()).map_err(|e| anyhow::anyhow!("{e}"))?;
        let eot = inner.token_to_id(EOT).with_context(|| format!("the tokenizer has no {EOT} token"))?;
        Ok(Self { inner, json: json.to_string(), eot })
    }

    /// The id of [`UNK`], if the tokenizer has that token.
    pub fn unk(&self) -> Option<u32> {
        self.inner.token_to_id(UNK)
    }

    /// Loads `path` (a `tokenizer.json`), naming the file in every error.
    pub fn load(path: &Path) -> Result<Self> {
        let json = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read tokenizer {}", path.display()))?;
        Self::from_json(&json).with_context(|| format!("{} is not a valid tokenizer.json", path.display()))
    }

    /// The exact `tokenizer.json` text (what is saved and hashed).
    pub fn json(&self) -> &str {
        &self.json
    }

    /// sha256 of the JSON text, recorded in run files to pin the frozen tokenizer.
    pub fn sha256(&self) -> String {
        hex(&Sha256::digest(self.json.as_bytes()))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Tokens of one line of text (no EOT appended).
    pub fn encode(&self, line: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(line.trim(), false)
            .map_err(|e| anyhow::anyhow!("encoding {line:?}: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Tokens of one line and, for each token, the index of the whitespace-separated word it belongs
    /// to (a lone space token, as before `<unk>`, belongs to the word after it).
    pub fn encode_words(&self, line: &str) -> Result<(Vec<u32>, Vec<usize>)> {
        let line = line.trim();
        let enc = self.inner.encode(line, false).map_err(|e| anyhow::anyhow!("encoding {line:?}: {e}"))?;
        let mut starts = Vec::new(); // byte offset where each word starts
        let mut ends = Vec::new();
        let mut in_word = false;
        for (i, c) in line.char_indices() {
            match (c.is_whitespace(), in_word) {
                (false, false) => (starts.push(i), in_word = true).1,
                (true, true) => (ends.push(i), in_word = false).1,
                _ => {}
            }
        }
        if in_word {
            ends.push(line.len());
        }
        let last_word = starts.len().saturating_sub(1);
        let words = enc
            .get_offsets()
            .iter()
            .map(|&(s, e)| {
                let probe = if e > s { e - 1 } else { s };
                let n = starts.partition_point(|&ws| ws <= probe); // words starting at or before probe
                match n.checked_sub(1) {
                    Some(w) if probe < ends[w] => w,
                    Some(w) => (w + 1).min(last_word),
                    None => 0,
                }
            })
            .collect();
        Ok((enc.get_ids().to_vec(), words))
    }

    /// One token stream for many lines: `line₁ EOT line₂ EOT …`, empty lines skipped, preceded by
    /// an EOT so that the first line has the same left context as every other.
    pub fn encode_lines<S: AsRef<str> + Sync>(&self, lines: &[S]) -> Result<Vec<u32>> {
        let mut out = vec![self.eot];
        for line in lines.iter().map(|l| l.as_ref().trim()).filter(|l| !l.is_empty()) {
            out.extend(self.encode(line)?);
            out.push(self.eot);
        }
        Ok(out)
    }

    /// Text of a token sequence; each EOT becomes a newline, and the prefix space of each line
    /// is dropped, so `decode(encode_lines(lines))` gives the lines back.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut out = String::new();
        for (i, seg) in ids.split(|&t| t == self.eot).enumerate() {
            if i > 0 {
                out.push('\n');
            }
            let text = self.inner.decode(seg, false).unwrap_or_default();
            out.push_str(text.strip_prefix(' ').unwrap_or(&text));
        }
        out
    }
}

/// Lower-case hex of a digest.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINES: [&str; 4] = [
        " = Valkyria Chronicles III = ",
        " Senjō no Valkyria 3 : <unk> Chronicles ( Japanese : 戦場のヴァルキュリア3 , lit . Valkyria of the Battlefield 3 ) ",
        " The game 's battle system , the <unk> system , is carried over directly from <unk> Chronicles . ",
        " It was released on 27 @-@ 28 September 2011 , and sold 102 @,@ 000 copies . ",
    ];

    fn corpus() -> Vec<String> {
        (0..30).flat_map(|_| LINES.iter().map(|s| s.to_string())).collect()
    }

    #[test]
    fn round_trips_lines_and_keeps_unk_whole() {
        let tok = Tokenizer::train(&corpus(), 300).unwrap();
        for line in LINES {
            let ids = tok.encode(line).unwrap();
            assert_eq!(tok.decode(&ids), line.trim(), "round trip of {line:?}");
        }
        let unk = tok.inner.token_to_id(UNK).unwrap();
        let ids = tok.encode("a <unk> b").unwrap();
        assert!(ids.contains(&unk), "{ids:?} should hold <unk> as one token");
        let stream = tok.encode_lines(&LINES).unwrap();
        assert_eq!(stream.iter().filter(|&&t| t == tok.eot).count(), 5);
        let text: Vec<&str> = LINES.iter().map(|l| l.trim()).collect();
        assert_eq!(tok.decode(&stream), format!("\n{}\n", text.join("\n")));
    }

    #[test]
    fn tokens_know_their_words() {
        let tok = Tokenizer::train(&corpus(), 300).unwrap();
        let line = "the <unk> system , is carried";
        let (ids, words) = tok.encode_words(line).unwrap();
        assert_eq!(ids, tok.encode(line).unwrap());
        let text: Vec<&str> = line.split_whitespace().collect();
        for (w, word) in text.iter().enumerate() {
            let pieces: Vec<u32> = ids.iter().zip(&words).filter(|(_, &x)| x == w).map(|(&t, _)| t).collect();
            assert_eq!(tok.decode(&pieces).trim(), *word, "word {w}");
        }
    }

    #[test]
    fn round_trips_real_wikitext_lines() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/wikitext-2/wiki.valid.tokens");
        let lines = crate::data::read_text_lines(&path).unwrap();
        let lines = &lines[..400];
        let tok = Tokenizer::train(lines, 1000).unwrap();
        for line in lines {
            assert_eq!(tok.decode(&tok.encode(line).unwrap()), *line);
        }
    }

    #[test]
    fn training_is_deterministic_and_reloadable() {
        let a = Tokenizer::train(&corpus(), 320).unwrap();
        let b = Tokenizer::train(&corpus(), 320).unwrap();
        assert_eq!(a.json(), b.json());
        assert_eq!(a.sha256(), b.sha256());
        let c = Tokenizer::from_json(a.json()).unwrap();
        assert_eq!(c.encode(LINES[2]).unwrap(), a.encode(LINES[2]).unwrap());
    }

    #[test]
    fn rejects_a_tiny_vocabulary_and_bad_json() {
        assert!(Tokenizer::train(&corpus(), 100).is_err());
        assert!(Tokenizer::from_json("{not json").is_err());
    }
}
