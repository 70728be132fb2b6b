//! Replays every fuzz seed (`fuzz/corpus/<target>/*`) and every saved crash
//! (`fuzz/regressions/<target>/*`) through the fuzz targets' checks, on stable Rust.
//!
//! The `fuzz/` crate needs nightly and libFuzzer; this test needs neither, so `cargo test
//! --workspace` keeps every input the fuzzers were seeded with, and every crash they found,
//! passing. A crash file is named after the target whose directory it is in.

use std::fs;
use std::panic;
use std::path::{Path, PathBuf};

use rollgate_proxy_core::fuzzing::TARGETS;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("core/ has a parent")
        .to_path_buf()
}

/// The files of `dir`, sorted; none when it does not exist.
fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|entry| entry.expect("readable directory entry").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    files
}

/// Runs every input of `kind` (`corpus` or `regressions`); returns how many ran.
fn replay(kind: &str) -> usize {
    let mut failures = Vec::new();
    let mut ran = 0;
    for (name, check) in TARGETS {
        for path in inputs(&repo_root().join("fuzz").join(kind).join(name)) {
            let data = fs::read(&path).expect("readable input");
            ran += 1;
            if panic::catch_unwind(|| check(&data)).is_err() {
                failures.push(path.display().to_string());
            }
        }
    }
    assert!(
        failures.is_empty(),
        "inputs that fail their checks: {failures:#?}"
    );
    ran
}

#[test]
fn every_seed_passes_its_target() {
    // Every target has seeds; an empty or missing corpus would make this test vacuous.
    for (name, _) in TARGETS {
        let dir = repo_root().join("fuzz/corpus").join(name);
        assert!(!inputs(&dir).is_empty(), "no seeds in {}", dir.display());
    }
    let ran = replay("corpus");
    eprintln!("replayed {ran} seeds");
    assert!(ran >= TARGETS.len());
}

#[test]
fn every_saved_crash_stays_fixed() {
    replay("regressions");
}
