//! The tokenizer builders from GGUF metadata (`Tok::from_gguf`: gpt2 BPE and llama
//! SentencePiece vocabularies, merges, token types, scores, special ids, pre-tokenizer name, chat
//! template) on arbitrary metadata. Building may fail with an error, never panic; a tokenizer that
//! builds must encode, decode and render a chat without panicking.
#![no_main]
use arbitrary::Arbitrary;
use candle_core::quantized::gguf_file::{Content, Value, VersionedMagic};
use libfuzzer_sys::fuzz_target;
use std::collections::HashMap;

#[derive(Arbitrary, Debug)]
struct Meta {
    spm: bool,
    tokens: Vec<String>,
    merges: Option<Vec<String>>,
    types: Option<Vec<i32>>,
    scores: Option<Vec<f32>>,
    bos: Option<u32>,
    eos: Option<u32>,
    unk: Option<u32>,
    pre: Option<String>,
    add_bos: Option<bool>,
    template: Option<String>,
    // A value of the wrong type under a key the builder reads.
    wrong_type_key: Option<u8>,
    text: String,
}

const KEYS: [&str; 8] = [
    "tokenizer.ggml.model",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.scores",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.chat_template",
];

fuzz_target!(|m: Meta| {
    let mut md = HashMap::new();
    let model = if m.spm { "llama" } else { "gpt2" };
    md.insert(KEYS[0].to_string(), Value::String(model.into()));
    md.insert(
        KEYS[1].to_string(),
        Value::Array(m.tokens.iter().cloned().map(Value::String).collect()),
    );
    if let Some(v) = &m.merges {
        md.insert(
            KEYS[2].to_string(),
            Value::Array(v.iter().cloned().map(Value::String).collect()),
        );
    }
    if let Some(v) = &m.types {
        md.insert(
            KEYS[3].to_string(),
            Value::Array(v.iter().map(|&t| Value::I32(t)).collect()),
        );
    }
    if let Some(v) = &m.scores {
        md.insert(
            KEYS[4].to_string(),
            Value::Array(v.iter().map(|&t| Value::F32(t)).collect()),
        );
    }
    for (k, v) in [
        (KEYS[5], m.bos),
        (KEYS[6], m.eos),
        ("tokenizer.ggml.unknown_token_id", m.unk),
    ] {
        if let Some(v) = v {
            md.insert(k.to_string(), Value::U32(v));
        }
    }
    if let Some(p) = &m.pre {
        md.insert("tokenizer.ggml.pre".into(), Value::String(p.clone()));
    }
    if let Some(b) = m.add_bos {
        md.insert("tokenizer.ggml.add_bos_token".into(), Value::Bool(b));
    }
    if let Some(t) = &m.template {
        md.insert(KEYS[7].to_string(), Value::String(t.clone()));
    }
    if let Some(k) = m.wrong_type_key {
        md.insert(KEYS[k as usize % KEYS.len()].to_string(), Value::U8(k));
    }
    let ct = Content {
        magic: VersionedMagic::GgufV3,
        metadata: md,
        tensor_infos: HashMap::new(),
        tensor_data_offset: 0,
    };
    let Ok(tok) = safegeo_runtime::Tok::from_gguf(&ct, std::path::Path::new("fuzz.gguf")) else {
        return;
    };
    if let Ok(ids) = tok.encode(&m.text, true) {
        let _ = tok.decode(&ids, false);
        let _ = tok.decode(&ids, true);
    }
    let _ = tok.id_to_token(m.bos.unwrap_or(0));
    let _ = tok.encode_chat(&[safegeo_runtime::Message::new("user", m.text.clone())], false);
});
