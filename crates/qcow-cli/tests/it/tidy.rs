//! Tidy checks over the repository's sources, after rust-analyzer's
//! `xtask/src/tidy.rs`: every Rust file of the crates, xtask and the fuzz
//! targets opens with a `//!` module doc saying what it is for, so that a
//! newcomer finds the room for a change from the files' first lines.

use std::path::{Path, PathBuf};

/// The repository's root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Every `.rs` file under `dir`, skipping build output and hidden folders.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("directory entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if path.is_dir() {
            if name != "target" && !name.starts_with('.') {
                rust_files(&path, out);
            }
        } else if name.ends_with(".rs") {
            out.push(path);
        }
    }
}

/// Whether the first line of `text` that is not blank is a `//!` comment.
fn opens_with_module_doc(text: &str) -> bool {
    text.lines()
        .find(|line| !line.trim().is_empty())
        .is_some_and(|line| line.trim_start().starts_with("//!"))
}

#[test]
fn module_doc_is_recognised() {
    assert!(opens_with_module_doc("//! Reading.\n\nuse std::io;\n"));
    assert!(opens_with_module_doc("\n\n//! After blank lines.\n"));
    assert!(!opens_with_module_doc("/// An item doc.\nfn f() {}\n"));
    assert!(!opens_with_module_doc(
        "// A plain comment.\n//! Too late.\n"
    ));
    assert!(!opens_with_module_doc("use std::io;\n"));
    assert!(!opens_with_module_doc(""));
}

#[test]
fn every_source_file_opens_with_a_module_doc() {
    let root = root();
    let mut files = Vec::new();
    for dir in ["crates", "xtask", "fuzz"] {
        rust_files(&root.join(dir), &mut files);
    }
    // The walk found the sources (a wrong root would pass vacuously).
    for expected in [
        "crates/qcow/src/lib.rs",
        "crates/qcow-cli/src/main.rs",
        "xtask/src/main.rs",
        "fuzz/src/harness.rs",
    ] {
        assert!(
            files.contains(&root.join(expected)),
            "{expected} was not found under {}",
            root.display()
        );
    }
    let mut undocumented: Vec<String> = files
        .iter()
        .filter(|path| {
            let text =
                std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            !opens_with_module_doc(&text)
        })
        .map(|path| {
            path.strip_prefix(&root)
                .unwrap_or(path)
                .display()
                .to_string()
        })
        .collect();
    undocumented.sort();
    assert!(
        undocumented.is_empty(),
        "files without a `//!` module doc as their first line: {}",
        undocumented.join(", ")
    );
}
