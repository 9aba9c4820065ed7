//! wikitext-2 on disk: the three splits as lines, checked on the way in, and the ways token streams
//! are cut (evaluation blocks, random training windows).
//!
//! The dataset ships in `data/wikitext-2/` (see its README); `--data DIR` or `COLLAPSE_LAB_DATA`
//! point elsewhere.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// One of wikitext-2's splits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Valid,
    Test,
}

impl Split {
    pub fn file_name(self) -> &'static str {
        match self {
            Split::Train => "wiki.train.tokens",
            Split::Valid => "wiki.valid.tokens",
            Split::Test => "wiki.test.tokens",
        }
    }
}

/// `$COLLAPSE_LAB_DATA`, else the copy committed with the crate.
pub fn default_data_dir() -> PathBuf {
    match std::env::var_os("COLLAPSE_LAB_DATA") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("data").join("wikitext-2"),
    }
}

/// The non-empty lines of a split, trimmed; `limit` > 0 keeps only the first `limit` of them.
pub fn load_split(dir: &Path, split: Split, limit: usize) -> Result<Vec<String>> {
    if !dir.is_dir() {
        bail!(
            "data directory {} does not exist (expected wikitext-2's wiki.*.tokens files; set --data)",
            dir.display()
        );
    }
    let lines = read_text_lines(&dir.join(split.file_name()))?;
    Ok(if limit > 0 { lines.into_iter().take(limit).collect() } else { lines })
}

/// The non-empty trimmed lines of a UTF-8 text file; an empty, binary or non-UTF-8 file is an error
/// that names it.
pub fn read_text_lines(path: &Path) -> Result<Vec<String>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    if bytes.contains(&0) {
        bail!("{} looks binary (it contains NUL bytes); expected UTF-8 text", path.display());
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{} is not valid UTF-8 (first bad byte at offset {}); expected UTF-8 text",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })?;
    let lines: Vec<String> =
        text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
    if lines.is_empty() {
        bail!("{} holds no text (expected one or more non-empty lines)", path.display());
    }
    Ok(lines)
}

/// Words as word perplexity counts them: whitespace-separated words plus one end-of-line
/// per non-empty line (the token that ends each line in both the GPT's stream and the KN bigram).
pub fn words_with_eol<S: AsRef<str>>(lines: &[S]) -> usize {
    lines.iter().map(|l| l.as_ref().split_whitespace().count()).filter(|&n| n > 0).map(|n| n + 1).sum()
}

/// Cuts a token stream into non-overlapping evaluation blocks of `block` predicted tokens: block i
/// is `stream[i·block ..= (i+1)·block]` (input = all but the last, targets = all but the first), so
/// every token after the first is predicted exactly once and each block is scored on its own. The
/// last block may be shorter.
pub fn eval_blocks(stream: &[u32], block: usize) -> Vec<&[u32]> {
    assert!(block > 0, "block size must be positive");
    (0..stream.len().saturating_sub(1))
        .step_by(block)
        .map(|s| &stream[s..(s + block + 1).min(stream.len())])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eval_blocks_predict_every_token_once() {
        let stream: Vec<u32> = (0..10).collect();
        let blocks = eval_blocks(&stream, 4);
        assert_eq!(blocks, vec![&[0, 1, 2, 3, 4][..], &[4, 5, 6, 7, 8][..], &[8, 9][..]]);
        let predicted: usize = blocks.iter().map(|b| b.len() - 1).sum();
        assert_eq!(predicted, 9);
    }

    #[test]
    fn word_count_adds_one_eol_per_line() {
        assert_eq!(words_with_eol(&["a b c", "", "d"]), 3 + 1 + 1 + 1);
    }

    #[test]
    fn bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.tokens");
        std::fs::write(&p, "  \n \n").unwrap();
        let e = read_text_lines(&p).unwrap_err().to_string();
        assert!(e.contains("x.tokens") && e.contains("no text"), "{e}");
        std::fs::write(&p, [b'a', 0xff, b'b']).unwrap();
        let e = read_text_lines(&p).unwrap_err().to_string();
        assert!(e.contains("not valid UTF-8"), "{e}");
        let e = load_split(&dir.path().join("nope"), Split::Train, 0).unwrap_err().to_string();
        assert!(e.contains("nope") && e.contains("does not exist"), "{e}");
    }
}
