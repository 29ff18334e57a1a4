//! The smoke test of the fuzz harnesses, without a fuzzer: every checked-in input
//! (`corpus/<target>/`, the seeds and what fuzzing kept, and `regressions/<target>/`,
//! the inputs of past findings) runs through its target's harness.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

/// Every corpus and regression input passes its harness; a failure names the file.
#[test]
fn every_saved_input_passes_its_harness() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut failures = Vec::new();
    for target in tern_fuzz::TARGETS {
        let mut inputs = 0;
        for folder in ["corpus", "regressions"] {
            let Ok(entries) = std::fs::read_dir(root.join(folder).join(target.name)) else {
                continue;
            };
            for entry in entries {
                let path = entry.expect("a readable folder").path();
                let data = std::fs::read(&path).expect("a readable input");
                inputs += 1;
                if catch_unwind(AssertUnwindSafe(|| (target.run)(&data))).is_err() {
                    failures.push(path.display().to_string());
                }
            }
        }
        assert!(inputs > 0, "no inputs for {}", target.name);
        println!("{}: {inputs} inputs", target.name);
    }
    assert!(failures.is_empty(), "inputs that fail: {failures:#?}");
}
