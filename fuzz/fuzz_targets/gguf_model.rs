//! A whole model from a GGUF file (`load_model`: the header and metadata checks, the
//! configuration, the tokenizer, every tensor's shape and finiteness against the configuration),
//! then two generated tokens on the model that loads, in f32 and with the quantized weights
//! kept. Errors are fine; panics (the few-row kernels' shape assertions) are not.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("safegeo-fuzz-model-{}.gguf", std::process::id()));
    std::fs::write(&path, data).unwrap();
    for keep_quantized in [false, true] {
        let opts = safegeo_runtime::LoadOptions { keep_quantized };
        let Ok(model) = safegeo_runtime::load_model_with(&path, &candle_core::Device::Cpu, opts)
        else {
            return;
        };
        let Ok(ids) = model.tok.encode("w1 w2", false) else {
            return;
        };
        if ids.is_empty() {
            return;
        }
        let cfg = safegeo_runtime::GenerateConfig {
            max_new_tokens: 2,
            ..Default::default()
        };
        let _ = safegeo_runtime::generate(&model, &[ids], &cfg, &mut safegeo_runtime::NoHooks);
    }
});
