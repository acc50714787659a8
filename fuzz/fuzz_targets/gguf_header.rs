//! The GGUF header bounds check (`crates/runtime/src/io/gguf_check.rs`) on arbitrary bytes: it must
//! return Ok or Err, never panic, and never read or allocate past the declared file size.
#![no_main]
use libfuzzer_sys::fuzz_target;

use safegeo_runtime::gguf_check;

fuzz_target!(|data: &[u8]| {
    let _ = gguf_check::check_header(data, data.len() as u64);
});
