//! The Hugging Face folder loader (`load_model` on config.json, model.safetensors,
//! tokenizer.json, tokenizer_config.json): a tiny valid folder with one file replaced by the
//! input. Loading may fail with an error, never panic or allocate without bound; a folder that
//! loads must also tokenize, render its template and generate two tokens.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::OnceLock;

const FILES: [&str; 4] = [
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
];

/// The valid folder's files, and a scratch folder of this process.
fn base() -> &'static (Vec<Vec<u8>>, PathBuf) {
    static BASE: OnceLock<(Vec<Vec<u8>>, PathBuf)> = OnceLock::new();
    BASE.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("safegeo-fuzz-hf-{}", std::process::id()));
        safegeo_runtime::testing::write_tiny_hf(safegeo_runtime::Arch::Llama, 1, &dir).unwrap();
        let files = FILES
            .iter()
            .map(|f| std::fs::read(dir.join(f)).unwrap())
            .collect();
        (files, dir)
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, input)) = data.split_first() else {
        return;
    };
    let (files, dir) = base();
    let which = which as usize % FILES.len();
    for (i, f) in FILES.iter().enumerate() {
        let bytes = if i == which { input } else { &files[i][..] };
        std::fs::write(dir.join(f), bytes).unwrap();
    }
    let Ok(model) = safegeo_runtime::load_model(dir, &candle_core::Device::Cpu) else {
        return;
    };
    let msgs = [safegeo_runtime::Message::new("user", "w1 w2")];
    let Ok(ids) = model.tok.encode_chat(&msgs, false) else {
        return;
    };
    let cfg = safegeo_runtime::GenerateConfig {
        max_new_tokens: 2,
        ..Default::default()
    };
    let _ = safegeo_runtime::generate(&model, &[ids], &cfg, &mut safegeo_runtime::NoHooks);
});
