//! Corpora on disk: the train/valid/test splits as lines, checked on the way in and recorded with
//! their sha256 ([`DataSource`], kept in `run.json` so that `resume` uses the same text), and the
//! ways token streams are cut (evaluation blocks).
//!
//! `--data` takes wikitext-2's directory (`wiki.{train,valid,test}.tokens`, the default, shipped in
//! `data/wikitext-2/`), any directory of `train`/`valid`/`test` files (`.txt`, `.tokens`, or
//! `.jsonl` with a `text` field; gzip read transparently), or a single such file, split by
//! documents into train/valid/test by a hash of each document's text at `data.split_ratio`.
//!
//! A line is a unit of text: each non-empty trimmed line is encoded and followed by the end-of-text
//! token. A document is a wikitext article (it starts at a ` = Title = ` heading), a blank-line
//! separated block of a text file without such headings, or one `.jsonl` record.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::path::{Path, PathBuf};

/// One of the three splits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Valid,
    Test,
}

impl Split {
    pub const ALL: [Split; 3] = [Split::Train, Split::Valid, Split::Test];

    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Valid => "valid",
            Split::Test => "test",
        }
    }
}

/// `$COLLAPSE_LAB_DATA`, else the copy of wikitext-2 committed with the crate.
pub fn default_data_dir() -> PathBuf {
    match std::env::var_os("COLLAPSE_LAB_DATA") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("data").join("wikitext-2"),
    }
}

/// A file a corpus was read from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    /// Its name in the corpus directory (or the file itself).
    pub name: String,
    pub bytes: u64,
    pub sha256: String,
}

/// How the splits were cut.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Layout {
    /// One file per split (wikitext-2's `wiki.*.tokens`, or `train`/`valid`/`test` files).
    Splits { train: String, valid: String, test: String },
    /// One file, split by documents: a document goes to train, valid or test by the first 8 bytes
    /// of the sha256 of its text, read as a fraction in [0, 1), against the cumulative `ratio`.
    Documents { file: String, ratio: [f64; 3], documents: [usize; 3] },
}

/// Where a run's text came from: recorded in `run.json`, checked by `resume`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataSource {
    /// A short name for reports: the directory's or file's name.
    pub name: String,
    /// The absolute path that was read.
    pub path: PathBuf,
    pub layout: Layout,
    /// Every file read, with its size and sha256.
    pub files: Vec<FileRecord>,
}

impl DataSource {
    /// Checks that `other` (a corpus opened now) holds the same bytes as this record; the error
    /// names the first file that differs.
    pub fn check_same(&self, other: &DataSource) -> Result<()> {
        for (a, b) in self.files.iter().zip(&other.files) {
            if a != b {
                bail!(
                    "the corpus changed: {} in {} has sha256 {} ({} bytes), the run recorded {} ({} bytes) \
                     (restore it, or pass --data with the run's corpus)",
                    b.name,
                    other.path.display(),
                    &b.sha256[..12],
                    b.bytes,
                    &a.sha256[..12],
                    a.bytes
                );
            }
        }
        if self.files.len() != other.files.len() || self.layout != other.layout {
            bail!(
                "the corpus changed: {} is not laid out as the run recorded ({:?}) \
                 (pass --data with the run's corpus)",
                other.path.display(),
                self.layout
            );
        }
        Ok(())
    }

    /// sha256 of the whole record's files (what a cache key uses).
    pub fn sha256(&self) -> String {
        let all: Vec<&str> = self.files.iter().map(|f| f.sha256.as_str()).collect();
        crate::files::sha256_hex(format!("{:?}|{}", self.layout, all.join("|")).as_bytes())
    }
}

/// A corpus in memory: the non-empty trimmed lines of each split, and where the train split's
/// documents start.
#[derive(Debug, Clone)]
pub struct Corpus {
    pub source: DataSource,
    splits: [Vec<String>; 3],
    /// Indices into the train lines of the lines that begin a document.
    train_docs: Vec<usize>,
}

/// The lines of one file, grouped in documents.
struct Documents {
    lines: Vec<String>,
    starts: Vec<usize>,
}

impl Corpus {
    /// Opens `path` (a directory of splits or one file), reading and checking everything; a single
    /// file is split by documents at `ratio` (train, valid, test).
    pub fn open(path: &Path, ratio: [f64; 3]) -> Result<Corpus> {
        let abs = path.canonicalize().map_err(|e| {
            anyhow::anyhow!(
                "data {} cannot be read ({e}); expected wikitext-2's directory, a directory of \
                 train/valid/test files, or one text file (see --data)",
                path.display()
            )
        })?;
        let name = abs.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "data".into());
        if abs.is_dir() {
            let mut names = Vec::new();
            for split in Split::ALL {
                names.push(find_split_file(&abs, split)?);
            }
            let mut files = Vec::new();
            let mut splits: [Vec<String>; 3] = Default::default();
            let mut train_docs = Vec::new();
            for (i, file) in names.iter().enumerate() {
                let (record, docs) = read_documents(&abs.join(file))?;
                files.push(record);
                if i == 0 {
                    train_docs = docs.starts;
                }
                splits[i] = docs.lines;
            }
            let layout =
                Layout::Splits { train: names[0].clone(), valid: names[1].clone(), test: names[2].clone() };
            Ok(Corpus { source: DataSource { name, path: abs, layout, files }, splits, train_docs })
        } else {
            check_ratio(&ratio)?;
            let (record, docs) = read_documents(&abs)?;
            let mut splits: [Vec<String>; 3] = Default::default();
            let mut counts = [0usize; 3];
            let mut train_docs = Vec::new();
            let ends: Vec<usize> = docs.starts.iter().skip(1).copied().chain([docs.lines.len()]).collect();
            for (&start, &end) in docs.starts.iter().zip(&ends) {
                let doc = &docs.lines[start..end];
                let digest = crate::files::sha256_hex(doc.join("\n").as_bytes());
                let u = u64::from_str_radix(&digest[..16], 16).unwrap_or(0) as f64 / 2f64.powi(64);
                let s = if u < ratio[0] {
                    0
                } else if u < ratio[0] + ratio[1] {
                    1
                } else {
                    2
                };
                if s == 0 {
                    train_docs.push(splits[0].len());
                }
                counts[s] += 1;
                splits[s].extend_from_slice(doc);
            }
            for (s, split) in Split::ALL.iter().enumerate() {
                if splits[s].is_empty() {
                    bail!(
                        "{}: splitting its {} documents at data.split_ratio {ratio:?} left the {} split empty \
                         (use a longer file, or give train/valid/test files in a directory)",
                        abs.display(),
                        docs.starts.len(),
                        split.name()
                    );
                }
            }
            let layout = Layout::Documents { file: record.name.clone(), ratio, documents: counts };
            Ok(Corpus {
                source: DataSource { name, path: abs, layout, files: vec![record] },
                splits,
                train_docs,
            })
        }
    }

    /// Opens the corpus a run recorded (at its recorded path, or at `path` when given) and checks
    /// that it holds the recorded bytes.
    pub fn reopen(recorded: &DataSource, path: Option<&Path>) -> Result<Corpus> {
        let ratio = match &recorded.layout {
            Layout::Documents { ratio, .. } => *ratio,
            Layout::Splits { .. } => [0.9, 0.05, 0.05],
        };
        let corpus = Corpus::open(path.unwrap_or(&recorded.path), ratio)?;
        recorded.check_same(&corpus.source)?;
        Ok(corpus)
    }

    /// Every line of a split.
    pub fn lines(&self, split: Split) -> &[String] {
        &self.splits[split as usize]
    }

    /// The first `limit` lines of a split (0 = all).
    pub fn head(&self, split: Split, limit: usize) -> &[String] {
        let lines = self.lines(split);
        if limit > 0 {
            &lines[..limit.min(lines.len())]
        } else {
            lines
        }
    }

    /// The train lines after the first `limit` (a run's real data), starting at the first document
    /// boundary at or after line `limit`: text disjoint from the real data, cut where a document
    /// begins (what a base model pretrains on). Empty when `limit` is 0 (the real data is all of
    /// it) or no document starts after it.
    pub fn rest_of_train(&self, limit: usize) -> &[String] {
        let lines = self.lines(Split::Train);
        if limit == 0 {
            return &[];
        }
        match self.train_docs.iter().find(|&&s| s >= limit) {
            Some(&start) => &lines[start..],
            None => &[],
        }
    }
}

fn check_ratio(ratio: &[f64; 3]) -> Result<()> {
    if ratio.iter().any(|r| !(r.is_finite() && *r > 0.0)) || (ratio.iter().sum::<f64>() - 1.0).abs() > 1e-9 {
        return crate::config::usage(format!(
            "data.split_ratio must be three positive shares of train, valid and test that add up to 1, got {ratio:?}"
        ));
    }
    Ok(())
}

/// The file of `split` in a corpus directory: wikitext-2's `wiki.SPLIT.tokens`, or
/// `SPLIT.{txt,tokens,jsonl}[.gz]` (`validation`/`dev` for valid), exactly one of them.
fn find_split_file(dir: &Path, split: Split) -> Result<String> {
    let wikitext = format!("wiki.{}.tokens", split.name());
    if dir.join(&wikitext).is_file() {
        return Ok(wikitext);
    }
    let stems: &[&str] = match split {
        Split::Valid => &["valid", "validation", "dev"],
        s => &[s.name()],
    };
    let mut found = Vec::new();
    for stem in stems {
        for ext in ["txt", "tokens", "jsonl"] {
            for gz in ["", ".gz"] {
                let name = format!("{stem}.{ext}{gz}");
                if dir.join(&name).is_file() {
                    found.push(name);
                }
            }
        }
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => bail!(
            "data directory {} has no {} split (expected wiki.{}.tokens, or {}.txt, .tokens or .jsonl, \
             optionally .gz)",
            dir.display(),
            split.name(),
            split.name(),
            stems[0]
        ),
        _ => bail!(
            "data directory {} has several {} files ({}); keep one",
            dir.display(),
            split.name(),
            found.join(", ")
        ),
    }
}

/// Reads one corpus file: its record (size, sha256 of the bytes on disk) and its lines grouped in
/// documents. Empty, binary and non-UTF-8 files, and `.jsonl` lines without a `text` string, are
/// errors that name the file (and the line).
fn read_documents(path: &Path) -> Result<(FileRecord, Documents)> {
    let raw = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let record =
        FileRecord { name: name.clone(), bytes: raw.len() as u64, sha256: crate::files::sha256_hex(&raw) };
    let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .with_context(|| format!("{} is not a valid gzip file", path.display()))?;
        out
    } else {
        raw
    };
    let text = decode_text(path, bytes)?;
    let jsonl = name.trim_end_matches(".gz").ends_with(".jsonl");
    let docs = if jsonl { jsonl_documents(path, &text)? } else { text_documents(&text) };
    if docs.lines.is_empty() {
        bail!("{} holds no text (expected one or more non-empty lines)", path.display());
    }
    Ok((record, docs))
}

/// UTF-8 text without NUL bytes, or an error naming the file.
fn decode_text(path: &Path, bytes: Vec<u8>) -> Result<String> {
    if bytes.contains(&0) {
        bail!("{} looks binary (it contains NUL bytes); expected UTF-8 text", path.display());
    }
    String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{} is not valid UTF-8 (first bad byte at offset {}); expected UTF-8 text",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })
}

/// A wikitext article heading, ` = Title = ` (one `=` on each side; sections have two or more).
fn is_article_heading(line: &str) -> bool {
    line.len() > 4 && line.starts_with("= ") && line.ends_with(" =") && !line.starts_with("= =")
}

/// Lines and documents of plain text: articles when the text has wikitext headings, else blocks
/// separated by blank lines.
fn text_documents(text: &str) -> Documents {
    let headings = text.lines().any(|l| is_article_heading(l.trim()));
    let (mut lines, mut starts) = (Vec::new(), Vec::new());
    let mut after_blank = true;
    for raw in text.lines() {
        let line = raw.trim();
        if line.is_empty() {
            after_blank = true;
            continue;
        }
        let starts_doc = if headings { is_article_heading(line) || lines.is_empty() } else { after_blank };
        if starts_doc {
            starts.push(lines.len());
        }
        lines.push(line.to_string());
        after_blank = false;
    }
    Documents { lines, starts }
}

/// One document per `.jsonl` record, its `text` field's non-empty lines.
fn jsonl_documents(path: &Path, text: &str) -> Result<Documents> {
    let (mut lines, mut starts) = (Vec::new(), Vec::new());
    for (i, raw) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(raw)
            .map_err(|e| anyhow::anyhow!("{} line {}: not JSON ({e})", path.display(), i + 1))?;
        let body = v.get("text").and_then(|t| t.as_str()).ok_or_else(|| {
            anyhow::anyhow!("{} line {}: expected an object with a \"text\" string", path.display(), i + 1)
        })?;
        let doc: Vec<String> =
            body.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
        if !doc.is_empty() {
            starts.push(lines.len());
            lines.extend(doc);
        }
    }
    Ok(Documents { lines, starts })
}

/// The non-empty trimmed lines of a UTF-8 text file; an empty, binary or non-UTF-8 file is an error
/// that names it.
pub fn read_text_lines(path: &Path) -> Result<Vec<String>> {
    Ok(read_documents(path)?.1.lines)
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
        let e = Corpus::open(&dir.path().join("nope"), [0.9, 0.05, 0.05]).unwrap_err().to_string();
        assert!(e.contains("nope") && e.contains("cannot be read"), "{e}");
        let e = Corpus::open(dir.path(), [0.9, 0.05, 0.05]).unwrap_err().to_string();
        assert!(e.contains("has no train split"), "{e}");
    }

    #[test]
    fn the_shipped_wikitext_opens_with_its_articles() {
        let c = Corpus::open(&default_data_dir(), [0.9, 0.05, 0.05]).unwrap();
        assert_eq!(c.source.name, "wikitext-2");
        assert_eq!(
            c.source.files[0].sha256,
            "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f"
        );
        assert_eq!(c.lines(Split::Train)[0], "= Valkyria Chronicles III =");
        // The rest after the first 4,000 lines starts at an article heading past line 4,000.
        let rest = c.rest_of_train(4000);
        assert!(is_article_heading(&rest[0]), "{}", rest[0]);
        let skipped = c.lines(Split::Train).len() - rest.len();
        assert!((4000..4300).contains(&skipped), "{skipped}");
        assert!(c.rest_of_train(0).is_empty());
    }

    #[test]
    fn text_jsonl_and_gzip_read_the_same_documents() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let text = "a b c\nd e\n\nf g\n";
        std::fs::write(dir.path().join("train.txt"), text).unwrap();
        let jsonl = "{\"text\": \"a b c\\nd e\"}\n{\"text\": \"f g\"}\n";
        std::fs::write(dir.path().join("valid.jsonl"), jsonl).unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(text.as_bytes()).unwrap();
        std::fs::write(dir.path().join("test.txt.gz"), gz.finish().unwrap()).unwrap();
        let c = Corpus::open(dir.path(), [0.9, 0.05, 0.05]).unwrap();
        for s in Split::ALL {
            assert_eq!(c.lines(s), ["a b c", "d e", "f g"], "{s:?}");
        }
        assert_eq!(c.train_docs, [0, 2], "two blank-line separated documents");
        assert!(matches!(c.source.layout, Layout::Splits { ref test, .. } if test == "test.txt.gz"));
        std::fs::write(dir.path().join("valid.jsonl"), "{\"txt\": 1}\n").unwrap();
        let e = Corpus::open(dir.path(), [0.9, 0.05, 0.05]).unwrap_err().to_string();
        assert!(e.contains("valid.jsonl line 1") && e.contains("\"text\""), "{e}");
    }

    #[test]
    fn one_file_is_split_by_documents_deterministically() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("book.txt");
        let text: String = (0..200).map(|i| format!("paragraph {i} has words\n\n")).collect();
        std::fs::write(&p, &text).unwrap();
        let a = Corpus::open(&p, [0.8, 0.1, 0.1]).unwrap();
        let b = Corpus::open(&p, [0.8, 0.1, 0.1]).unwrap();
        let counts = match a.source.layout {
            Layout::Documents { documents, .. } => documents,
            _ => panic!("a single file is split by documents"),
        };
        assert_eq!(counts.iter().sum::<usize>(), 200);
        assert!(counts[0] > 140 && counts[1] > 8 && counts[2] > 8, "{counts:?}");
        assert_eq!(a.lines(Split::Test), b.lines(Split::Test));
        // Every paragraph lands in exactly one split.
        let total: usize = Split::ALL.iter().map(|&s| a.lines(s).len()).sum();
        assert_eq!(total, 200);
        assert!(Corpus::open(&p, [0.8, 0.3, 0.1]).is_err(), "shares must add up to 1");
        std::fs::write(&p, "one paragraph only\n").unwrap();
        let e = Corpus::open(&p, [0.8, 0.1, 0.1]).unwrap_err().to_string();
        assert!(e.contains("left the") && e.contains("split empty"), "{e}");
    }

    #[test]
    fn a_changed_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        for s in ["train", "valid", "test"] {
            std::fs::write(dir.path().join(format!("{s}.txt")), "some words here\n").unwrap();
        }
        let before = Corpus::open(dir.path(), [0.9, 0.05, 0.05]).unwrap().source;
        std::fs::write(dir.path().join("valid.txt"), "other words\n").unwrap();
        let e = Corpus::reopen(&before, None).unwrap_err().to_string();
        assert!(e.contains("the corpus changed") && e.contains("valid.txt"), "{e}");
    }
}
