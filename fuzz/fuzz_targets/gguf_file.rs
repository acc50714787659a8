//! The whole GGUF reader (`open_gguf`: magic, the header bounds check, candle's metadata and
//! tensor-info parser, the tensor offset/size/block checks), then every tensor read with its
//! quantization block sizes: errors are fine, panics and unbounded allocations are not.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("safegeo-fuzz-{}.gguf", std::process::id()));
    std::fs::write(&path, data).unwrap();
    let Ok((content, mut reader)) = safegeo_runtime::open_gguf(&path) else {
        return;
    };
    for info in content.tensor_infos.values() {
        let _ = info.read(&mut reader, content.tensor_data_offset, &candle_core::Device::Cpu);
    }
});
