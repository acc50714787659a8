//! The dataset parsers on arbitrary bytes: every built-in benchmark format (CSV and JSON), user
//! prompt files (JSONL and CSV), attack test cases (JSONL) and deception scenarios (TOML).
//! Parsing may fail with an error, never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use safegeo_data::{DatasetName, DATASET_NAMES};
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    let n = DATASET_NAMES.len();
    match which as usize % (n + 4) {
        i if i < n => {
            let dn = DatasetName::parse(DATASET_NAMES[i]).unwrap();
            let _ = safegeo_data::parse_named(dn, Path::new(dn.file()), bytes);
        }
        i if i == n => {
            let _ = safegeo_data::parse_user_file(Path::new("user.jsonl"), bytes, None);
        }
        i if i == n + 1 => {
            let _ = safegeo_data::parse_user_file(Path::new("user.csv"), bytes, Some("prompt"));
        }
        i if i == n + 2 => {
            // Test cases are read from a file: one per process, rewritten per input.
            let p = std::env::temp_dir().join(format!("safegeo-fuzz-tc-{}.jsonl", std::process::id()));
            std::fs::write(&p, bytes).unwrap();
            let _ = safegeo_data::test_cases::read_test_cases(&p);
        }
        _ => {
            if let Ok(text) = std::str::from_utf8(bytes) {
                let _ = safegeo_data::deception::Scenario::parse(text, "fuzz.toml");
            }
        }
    }
});
