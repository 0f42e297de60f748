//! Replays every input of `fuzz/corpus/<target>/` (and the crash inputs kept in
//! `fuzz/regressions/<target>/`) through the same entry function as the cargo-fuzz target
//! (`transport::fuzzing`), on stable: the fuzz findings stay fixed. `scripts/fuzz` grows
//! and minimizes the corpora; docs/reliability.md, "Fuzzing".

use std::path::Path;
use std::time::Instant;

use transport::fuzzing::TARGETS;

fn replay(dir: &str) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz")
        .join(dir);
    let mut total = 0;
    for &(name, run) in TARGETS {
        let Ok(entries) = std::fs::read_dir(root.join(name)) else {
            continue;
        };
        let mut files: Vec<_> = entries.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        files.sort();
        let t0 = Instant::now();
        for f in &files {
            let data = std::fs::read(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            eprintln!("{name}: {}", f.display());
            run(&data);
        }
        eprintln!("{dir}/{name}: {} inputs in {:?}", files.len(), t0.elapsed());
        total += files.len();
    }
    total
}

#[test]
fn fuzz_corpora_replay() {
    let n = replay("corpus");
    assert!(
        n >= TARGETS.len(),
        "the corpora under fuzz/corpus/ hold only {n} inputs"
    );
    for &(name, _) in TARGETS {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/corpus")
            .join(name);
        assert!(
            dir.is_dir(),
            "no corpus for fuzz target {name}: {}",
            dir.display()
        );
    }
}

#[test]
fn fuzz_regressions_replay() {
    replay("regressions");
}

#[test]
fn every_fuzz_target_has_a_cargo_fuzz_binary() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/fuzz_targets");
    for &(name, _) in TARGETS {
        let f = root.join(format!("{name}.rs"));
        let text = std::fs::read_to_string(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        assert!(
            text.contains(&format!("transport::fuzzing::{name}(")),
            "{} does not call transport::fuzzing::{name}",
            f.display()
        );
    }
}
