//! The pipeline flows one way: no module of the library uses one that comes later in
//! data → tokenizer → model → train → sample → metrics → recursion → report → cli
//! (with config, files and fault below everything). The levels are those of `src/lib.rs`'s doc.

use std::path::Path;

/// Top-level module → level; a module may use only modules of its level or below.
const LEVELS: [(&str, u8); 20] = [
    ("config", 0),
    ("files", 0),
    ("fault", 0),
    ("data", 1),
    ("tokenizer", 2),
    ("model", 3),
    ("kernels", 3),
    ("hf", 3),
    ("train", 4),
    ("checkpoint", 4),
    ("sampler", 5),
    ("sample", 5),
    ("metrics", 6),
    ("recursion", 7),
    ("report", 8),
    ("compare", 8),
    ("toy", 8),
    ("cli", 9),
    ("bench", 9),
    ("base", 7),
];

fn level(module: &str) -> Option<u8> {
    LEVELS.iter().find(|(m, _)| *m == module).map(|(_, l)| *l)
}

/// The crate modules a source text refers to (`crate::name`, including `use crate::{a, b}`),
/// comments skipped.
fn references(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim_start().starts_with("//")) {
        let mut rest = line;
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                let inner = group.split('}').next().unwrap_or("");
                out.extend(inner.split(',').filter_map(|p| p.trim().split("::").next()).map(String::from));
            } else {
                let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                out.push(name);
            }
        }
    }
    out.retain(|n| !n.is_empty());
    out
}

fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn no_module_uses_a_later_stage() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut all = Vec::new();
    files(&src, &mut all);
    let mut violations = Vec::new();
    for path in all {
        let rel = path.strip_prefix(&src).unwrap();
        let top = rel.iter().next().unwrap().to_string_lossy().trim_end_matches(".rs").to_string();
        if top == "main" || top == "lib" {
            continue;
        }
        let own = level(&top)
            .unwrap_or_else(|| panic!("src/{}: module {top} has no level in LEVELS", rel.display()));
        for used in references(&std::fs::read_to_string(&path).unwrap()) {
            let Some(l) = level(&used) else { continue }; // a function of lib.rs, e.g. tune_allocator
            if l > own {
                violations
                    .push(format!("src/{} ({top}, level {own}) uses {used} (level {l})", rel.display()));
            }
        }
    }
    assert!(violations.is_empty(), "modules that use a later stage:\n{}", violations.join("\n"));
}

#[test]
fn the_reference_parser_finds_grouped_and_plain_uses() {
    let text = "use crate::{data, model::Gpt};\n// crate::cli in a comment\nlet x = crate::train::lr_at(0);";
    assert_eq!(references(text), ["data", "model", "train"]);
}
