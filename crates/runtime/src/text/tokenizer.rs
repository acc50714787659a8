//! Tokenizers built from GGUF metadata (`gpt2` byte-level BPE and `llama` SentencePiece-BPE) or
//! loaded from `tokenizer.json`, plus chat-template rendering with minijinja.
//!
//! candle's `TokenizerFromGguf` is not used: for SmolLM2 it adds a prefix space after every special
//! token and corrupts the chat template (see shared/reference/rust-prototype/FINDINGS.md).
use crate::{Error, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use serde::Serialize;
use std::path::Path;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::replace::Replace;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// A chat message (`role` is `system`, `user` or `assistant`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Message {
    /// Speaker.
    pub role: String,
    /// Text.
    pub content: String,
}

impl Message {
    /// A message with the given role.
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A tokenizer with the model's special tokens and chat template.
#[derive(Clone)]
pub struct Tok {
    inner: Tokenizer,
    /// Beginning-of-sequence id.
    pub bos_id: Option<u32>,
    /// End-of-sequence id.
    pub eos_id: Option<u32>,
    /// Prepend BOS when encoding raw text.
    pub add_bos: bool,
    /// Jinja chat template, if the model has one.
    pub chat_template: Option<String>,
    /// Ids that end a reply (EOS plus end-of-turn tokens such as `<|im_end|>`).
    pub stop_ids: Vec<u32>,
    /// Padding id used for left padding (never attended to).
    pub pad_id: u32,
}

fn md<'a>(ct: &'a Content, path: &Path, key: &str) -> Result<&'a Value> {
    ct.metadata.get(key).ok_or_else(|| Error::Tokenizer {
        path: path.to_path_buf(),
        reason: format!("GGUF metadata has no `{key}`"),
    })
}

fn strings(ct: &Content, path: &Path, key: &str) -> Result<Vec<String>> {
    md(ct, path, key)?
        .to_vec()?
        .iter()
        .map(|v| Ok(v.to_string()?.clone()))
        .collect()
}

fn opt_u32(ct: &Content, key: &str) -> Option<u32> {
    ct.metadata.get(key).and_then(|v| v.to_u32().ok())
}

/// Regex of llama.cpp's BPE pre-tokenizers, by `tokenizer.ggml.pre` name.
fn pre_tokenizer_regex(pre: &str) -> Option<&'static str> {
    match pre {
        "llama-bpe" | "llama3" | "llama-v3" | "smaug-bpe" => Some(
            r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ),
        "qwen2" | "deepseek-r1-qwen" => Some(
            r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ),
        _ => None,
    }
}

fn add_specials(tk: &mut Tokenizer, tokens: &[String], types: &[i32], path: &Path) -> Result<()> {
    // Token type 3 = control, 4 = user-defined: both are matched whole, never split.
    let specials: Vec<AddedToken> = types
        .iter()
        .enumerate()
        .filter(|(_, t)| **t == 3 || **t == 4)
        .map(|(i, _)| AddedToken::from(tokens[i].clone(), true))
        .collect();
    tk.add_special_tokens(specials).map_err(tk_err(path))?;
    Ok(())
}

fn token_types(ct: &Content, path: &Path, n: usize) -> Result<Vec<i32>> {
    match ct.metadata.get("tokenizer.ggml.token_type") {
        Some(v) => {
            let types: Vec<i32> = v
                .to_vec()?
                .iter()
                .map(|x| Ok(x.to_i32()?))
                .collect::<Result<_>>()?;
            // Found by fuzzing: a shorter list indexed past its end.
            if types.len() != n {
                return Err(Error::Tokenizer {
                    path: path.to_path_buf(),
                    reason: format!(
                        "tokenizer.ggml.token_type has {} entries for {n} tokens",
                        types.len()
                    ),
                });
            }
            Ok(types)
        }
        None => {
            tracing::warn!(
                "{}: no token types; treating all tokens as normal",
                path.display()
            );
            Ok(vec![1; n])
        }
    }
}

fn tk_err(path: &Path) -> impl Fn(tokenizers::Error) -> Error + '_ {
    move |e| Error::Tokenizer {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// Byte-level BPE (`tokenizer.ggml.model = gpt2`): SmolLM2, Llama 3, Qwen2.
fn gpt2_from_gguf(ct: &Content, path: &Path) -> Result<Tokenizer> {
    let tokens = strings(ct, path, "tokenizer.ggml.tokens")?;
    let merges = strings(ct, path, "tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| Error::Tokenizer {
                    path: path.to_path_buf(),
                    reason: format!("malformed merge `{m}`"),
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(tk_err(path))?;
    let mut tk = Tokenizer::new(bpe);
    let pre = ct
        .metadata
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok().cloned())
        .unwrap_or_else(|| "default".into());
    let pre_tok = match pre.as_str() {
        // HF SmolLM2: Sequence[Digits(individual), ByteLevel(add_prefix_space=false)].
        "smollm" | "starcoder" | "refact" => PreSequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ]),
        other => match pre_tokenizer_regex(other) {
            Some(re) => PreSequence::new(vec![
                Split::new(
                    SplitPattern::Regex(re.into()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .map_err(tk_err(path))?
                .into(),
                ByteLevel::new(false, true, false).into(),
            ]),
            None => {
                if other != "default" && other != "gpt-2" {
                    tracing::warn!("unknown BPE pre-tokenizer `{other}`: using GPT-2's");
                }
                PreSequence::new(vec![ByteLevel::new(false, true, true).into()])
            }
        },
    };
    tk.with_pre_tokenizer(Some(pre_tok));
    tk.with_decoder(Some(ByteLevelDecoder::default()));
    let types = token_types(ct, path, tokens.len())?;
    add_specials(&mut tk, &tokens, &types, path)?;
    Ok(tk)
}

/// SentencePiece-BPE (`tokenizer.ggml.model = llama`): Gemma, Llama 2, Mistral.
/// GGUF stores pieces and scores but no merges; they are derived from the vocabulary and ranked by
/// the merged piece's score, as transformers' SentencePiece extractor does.
fn spm_from_gguf(ct: &Content, path: &Path) -> Result<Tokenizer> {
    let tokens = strings(ct, path, "tokenizer.ggml.tokens")?;
    let scores: Vec<f32> = md(ct, path, "tokenizer.ggml.scores")?
        .to_vec()?
        .iter()
        .map(|v| Ok(v.to_f32()?))
        .collect::<Result<_>>()?;
    let types = token_types(ct, path, tokens.len())?;
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let mut ranked: Vec<(f32, u32, u32, u32)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        if types.get(id) != Some(&1) {
            continue; // only normal pieces are merge results
        }
        for (i, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(i);
            if let (Some(&a), Some(&b)) = (vocab.get(l), vocab.get(r)) {
                ranked.push((scores.get(id).copied().unwrap_or(0.0), id as u32, a, b));
            }
        }
    }
    ranked.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)).then(x.2.cmp(&y.2)));
    let merges: Vec<(String, String)> = ranked
        .iter()
        .map(|m| (tokens[m.2 as usize].clone(), tokens[m.3 as usize].clone()))
        .collect();
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(unk) = opt_u32(ct, "tokenizer.ggml.unknown_token_id") {
        if let Some(t) = tokens.get(unk as usize) {
            builder = builder.unk_token(t.clone());
        }
    }
    let mut tk = Tokenizer::new(builder.build().map_err(tk_err(path))?);
    let add_space_prefix = ct
        .metadata
        .get("tokenizer.ggml.add_space_prefix")
        .and_then(|v| v.to_bool().ok())
        .unwrap_or(true);
    let space = Replace::new(" ", "\u{2581}").map_err(tk_err(path))?;
    if add_space_prefix {
        use tokenizers::normalizers::{prepend::Prepend, Sequence};
        tk.with_normalizer(Some(Sequence::new(vec![
            Prepend::new("\u{2581}".into()).into(),
            space.into(),
        ])))
        .map_err(tk_err(path))?;
    } else {
        tk.with_normalizer(Some(space)).map_err(tk_err(path))?;
    }
    let mut dec = vec![
        Replace::new("\u{2581}", " ").map_err(tk_err(path))?.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if add_space_prefix {
        dec.push(tokenizers::decoders::strip::Strip::new(' ', 1, 0).into());
    }
    tk.with_decoder(Some(DecoderSequence::new(dec)));
    add_specials(&mut tk, &tokens, &types, path)?;
    Ok(tk)
}

/// Parse a `tokenizer.json`. The tokenizers crate panics instead of failing on some malformed
/// files (found by fuzzing: a decoder that is not an object), so the JSON is checked first and
/// a panic inside the library becomes an error naming the file.
fn tokenizer_json(path: &Path) -> Result<Tokenizer> {
    let bad = |reason: String| Error::Tokenizer {
        path: path.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str::<serde_json::Value>(&text)
        .map_err(|e| bad(format!("not valid JSON ({e})")))?;
    std::panic::catch_unwind(|| text.parse::<Tokenizer>())
        .map_err(|_| bad("malformed tokenizer (the tokenizers library could not read it)".into()))?
        .map_err(|e| bad(e.to_string()))
}

/// Token ids that end an assistant turn, found by their text in the vocabulary.
fn find_stop_ids(tk: &Tokenizer, eos: Option<u32>) -> Vec<u32> {
    let mut ids: Vec<u32> = eos.into_iter().collect();
    for t in [
        "<|im_end|>",
        "<end_of_turn>",
        "<|eot_id|>",
        "<|end|>",
        "</s>",
        "<|endoftext|>",
    ] {
        if let Some(id) = tk.token_to_id(t) {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
    }
    ids
}

impl Tok {
    /// Build from GGUF metadata.
    pub fn from_gguf(ct: &Content, path: &Path) -> Result<Self> {
        let model = md(ct, path, "tokenizer.ggml.model")?.to_string()?.clone();
        let inner = match model.as_str() {
            "gpt2" => gpt2_from_gguf(ct, path)?,
            "llama" => spm_from_gguf(ct, path)?,
            other => {
                return Err(Error::Tokenizer {
                    path: path.to_path_buf(),
                    reason: format!("tokenizer kind `{other}` is not supported (gpt2, llama are)"),
                })
            }
        };
        let bos_id = opt_u32(ct, "tokenizer.ggml.bos_token_id");
        let eos_id = opt_u32(ct, "tokenizer.ggml.eos_token_id");
        let add_bos = ct
            .metadata
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(model == "llama");
        let chat_template = ct
            .metadata
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok().cloned());
        let pad_id = opt_u32(ct, "tokenizer.ggml.padding_token_id")
            .or(eos_id)
            .unwrap_or(0);
        let n_vocab = inner.get_vocab_size(true);
        for (key, id) in [("bos", bos_id), ("eos", eos_id), ("padding", Some(pad_id))] {
            if let Some(id) = id.filter(|&i| i as usize >= n_vocab) {
                return Err(Error::Tokenizer {
                    path: path.to_path_buf(),
                    reason: format!(
                        "tokenizer.ggml.{key}_token_id {id} is outside the vocabulary ({n_vocab} tokens)"
                    ),
                });
            }
        }
        let stop_ids = find_stop_ids(&inner, eos_id);
        Ok(Self {
            inner,
            bos_id,
            eos_id,
            add_bos,
            chat_template,
            stop_ids,
            pad_id,
        })
    }

    /// Load `tokenizer.json` (+ `tokenizer_config.json` for the chat template and specials).
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let tj = dir.join("tokenizer.json");
        if !tj.exists() {
            return Err(Error::Tokenizer {
                path: dir.to_path_buf(),
                reason: "tokenizer.json is missing".into(),
            });
        }
        let inner = tokenizer_json(&tj)?;
        let cfg: serde_json::Value = read_json_opt(&dir.join("tokenizer_config.json"))?;
        let token_of = |key: &str| -> Option<u32> {
            let v = cfg.get(key)?;
            let s = v
                .as_str()
                .or_else(|| v.get("content").and_then(|c| c.as_str()))?;
            inner.token_to_id(s)
        };
        let bos_id = token_of("bos_token");
        let eos_id = token_of("eos_token");
        let add_bos = cfg
            .get("add_bos_token")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        let chat_template = match cfg.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(String::from)),
            _ => std::fs::read_to_string(dir.join("chat_template.jinja")).ok(),
        };
        let pad_id = token_of("pad_token").or(eos_id).unwrap_or(0);
        let stop_ids = find_stop_ids(&inner, eos_id);
        Ok(Self {
            inner,
            bos_id,
            eos_id,
            add_bos,
            chat_template,
            stop_ids,
            pad_id,
        })
    }

    /// Wrap a `tokenizers` tokenizer; stop ids are EOS plus known end-of-turn tokens.
    pub fn from_tokenizer(
        inner: Tokenizer,
        bos_id: Option<u32>,
        eos_id: Option<u32>,
        chat_template: Option<String>,
    ) -> Self {
        let stop_ids = find_stop_ids(&inner, eos_id);
        let pad_id = eos_id.unwrap_or(0);
        Self {
            inner,
            bos_id,
            eos_id,
            add_bos: bos_id.is_some(),
            chat_template,
            stop_ids,
            pad_id,
        }
    }

    /// The wrapped `tokenizers` object.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Encode text; special-token strings in it are recognised. `bos` prepends BOS when the model
    /// wants one.
    pub fn encode(&self, text: &str, bos: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Invalid(format!("tokenizer failed: {e}")))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if bos && self.add_bos {
            if let Some(b) = self.bos_id {
                ids.push(b);
            }
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Decode ids; `skip_special` drops special tokens.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| Error::Invalid(format!("decode failed: {e}")))
    }

    /// The text of one token id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Render messages with the model's chat template (generation prompt appended).
    pub fn render_chat(&self, messages: &[Message]) -> Result<String> {
        let template = self.chat_template.as_deref().ok_or_else(|| {
            Error::Template("the model has no chat template (a base model?)".into())
        })?;
        let tok_text = |id: Option<u32>| id.and_then(|i| self.id_to_token(i)).unwrap_or_default();
        render_template(
            template,
            messages,
            &tok_text(self.bos_id),
            &tok_text(self.eos_id),
        )
    }

    /// A prompt and a reply as the template renders a finished exchange: `(prompt ids, reply
    /// ids)` where the reply ids include the template's end-of-turn tokens, so training on them
    /// teaches the model to stop. (A conversation ending with an assistant message is rendered
    /// without a generation prompt.)
    pub fn encode_exchange(
        &self,
        messages: &[Message],
        reply: &str,
    ) -> Result<(Vec<u32>, Vec<u32>)> {
        let prompt = self.encode_chat(messages, false)?;
        let mut all = messages.to_vec();
        all.push(Message::new("assistant", reply));
        let mut ids = self.encode_rendered(&self.render_chat(&all)?)?;
        if !ids.starts_with(&prompt) || ids.len() <= prompt.len() {
            return Err(Error::Template(
                "the template renders the reply so that the prompt tokens change; cannot \
                 separate prompt and reply"
                    .into(),
            ));
        }
        let reply_ids = ids.split_off(prompt.len());
        Ok((prompt, reply_ids))
    }

    /// Token ids for a chat prompt (template rendered, no extra BOS: templates carry their own),
    /// or the raw text of the user turns when `raw` is set.
    pub fn encode_chat(&self, messages: &[Message], raw: bool) -> Result<Vec<u32>> {
        if messages.iter().all(|m| m.content.trim().is_empty()) {
            return Err(Error::EmptyPrompt);
        }
        let ids = if raw {
            let text: Vec<&str> = messages.iter().map(|m| m.content.as_str()).collect();
            self.encode(&text.join("\n"), true)?
        } else {
            self.encode_rendered(&self.render_chat(messages)?)?
        };
        // A template can render a message to nothing; a prompt of no tokens has no last position.
        if ids.is_empty() {
            return Err(Error::EmptyPrompt);
        }
        Ok(ids)
    }

    /// Ids of text rendered by the chat template (or a piece of it that starts the prompt):
    /// special-token strings recognised, and BOS prepended when the tokenizer wants one and the
    /// template did not write it (Llama 2 style).
    pub fn encode_rendered(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.encode(text, false)?;
        if let (true, Some(b)) = (self.add_bos, self.bos_id) {
            if ids.first() != Some(&b) {
                ids.insert(0, b);
            }
        }
        Ok(ids)
    }
}

/// Token positions named by the protocol (docs/protocol.md notation), for a prompt of `len` tokens whose
/// last `post_len` tokens are the template's post-instruction tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct PromptPositions {
    /// Prompt length in tokens.
    pub len: usize,
    /// Number of post-instruction template tokens.
    pub post_len: usize,
}

impl PromptPositions {
    /// `t_inst`: the last token of the user's instruction.
    pub fn t_inst(&self) -> usize {
        self.len - self.post_len - 1
    }

    /// `t_post`: the last prompt token.
    pub fn t_post(&self) -> usize {
        self.len - 1
    }

    /// The post-instruction span `t_inst+1 ..= t_post`.
    pub fn post_instruction(&self) -> std::ops::Range<usize> {
        self.len - self.post_len..self.len
    }
}

impl Tok {
    /// Where `t_inst`, the post-instruction span and `t_post` fall in the prompt that
    /// [`Tok::encode_chat`] builds for `messages` (the last message must be the user's).
    pub fn prompt_positions(&self, messages: &[Message], raw: bool) -> Result<PromptPositions> {
        let ids = self.encode_chat(messages, raw)?;
        if raw {
            return Ok(PromptPositions {
                len: ids.len(),
                post_len: 0,
            });
        }
        let last = messages.last().ok_or(Error::EmptyPrompt)?;
        let text = self.render_chat(messages)?;
        let end = text
            .rfind(last.content.as_str())
            .map(|i| i + last.content.len())
            .ok_or_else(|| {
                Error::Template("the rendered template does not contain the last message".into())
            })?;
        let suffix = self.encode(&text[end..], false)?;
        if suffix.len() >= ids.len() || !ids.ends_with(&suffix) {
            return Err(Error::Template(
                "post-instruction tokens do not tokenize separately from the instruction".into(),
            ));
        }
        Ok(PromptPositions {
            len: ids.len(),
            post_len: suffix.len(),
        })
    }
}

/// Render a HF-style Jinja chat template (bounded: see [`crate::text::template`]).
pub fn render_template(
    template: &str,
    messages: &[Message],
    bos_token: &str,
    eos_token: &str,
) -> Result<String> {
    crate::text::template::render(template, messages, bos_token, eos_token).map_err(Error::Template)
}

/// A model folder's optional JSON file (Null when absent); unreadable JSON is a model problem.
fn read_json_opt(path: &Path) -> Result<serde_json::Value> {
    match std::fs::read_to_string(path) {
        Ok(s) => serde_json::from_str(&s).map_err(|e| Error::Tokenizer {
            path: path.to_path_buf(),
            reason: format!("not valid JSON: {e}"),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(serde_json::Value::Null),
        Err(e) => Err(Error::io(path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gguf_meta(entries: Vec<(&str, Value)>) -> Content {
        Content {
            magic: candle_core::quantized::gguf_file::VersionedMagic::GgufV3,
            metadata: entries
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            tensor_infos: Default::default(),
            tensor_data_offset: 0,
        }
    }

    #[test]
    fn malformed_tokenizer_json_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tokenizer.json");
        let head = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,"pre_tokenizer":null,"post_processor":null,"#;
        let model = r#""model":{"type":"WordLevel","vocab":{"a":0},"unk_token":"a"}}"#;
        // Broken JSON inside the decoder made the tokenizers crate panic (fuzzer crash); decoders
        // of the wrong shape are its ordinary errors.
        for (decoder, needle) in [
            ("\"decoder\":\u{0}{,", "not valid JSON"),
            (r#""decoder":5,"#, "did not match any variant"),
            (r#""decoder":[],"#, "did not match any variant"),
        ] {
            std::fs::write(&p, format!("{head}{decoder}{model}")).unwrap();
            let e = tokenizer_json(&p)
                .err()
                .unwrap_or_else(|| panic!("{decoder} was accepted"))
                .to_string();
            assert!(e.contains(needle), "{decoder}: {e}");
        }
        std::fs::write(&p, format!(r#"{head}"decoder":null,{model}"#)).unwrap();
        assert!(tokenizer_json(&p).is_ok());
    }

    #[test]
    fn inconsistent_gguf_tokenizer_metadata_is_an_error_not_a_panic() {
        let strs =
            |v: &[&str]| Value::Array(v.iter().map(|s| Value::String(s.to_string())).collect());
        let base = || {
            vec![
                ("tokenizer.ggml.model", Value::String("gpt2".into())),
                ("tokenizer.ggml.tokens", strs(&["a", "b", "ab"])),
                ("tokenizer.ggml.merges", strs(&["a b"])),
            ]
        };
        let p = Path::new("m.gguf");
        assert!(Tok::from_gguf(&gguf_meta(base()), p).is_ok());
        // Regression (fuzzer crash): fewer token types than tokens indexed past the end.
        for spm in [false, true] {
            let mut m = base();
            if spm {
                m[0].1 = Value::String("llama".into());
                m.push((
                    "tokenizer.ggml.scores",
                    Value::Array(vec![Value::F32(0.0); 3]),
                ));
            }
            m.push(("tokenizer.ggml.token_type", Value::Array(vec![])));
            let e = Tok::from_gguf(&gguf_meta(m), p).err().unwrap().to_string();
            assert!(e.contains("token_type has 0 entries for 3 tokens"), "{e}");
        }
        let mut m = base();
        m.push(("tokenizer.ggml.eos_token_id", Value::U32(7)));
        let e = Tok::from_gguf(&gguf_meta(m), p).err().unwrap().to_string();
        assert!(
            e.contains("eos_token_id 7 is outside the vocabulary (3 tokens)"),
            "{e}"
        );
    }

    #[test]
    fn smollm_template_renders_default_system_prompt() {
        let t = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
        let out = render_template(t, &[Message::new("user", "Hi")], "", "").unwrap();
        assert_eq!(out, "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
        let out = render_template(
            t,
            &[Message::new("system", "S"), Message::new("user", "Hi")],
            "",
            "",
        )
        .unwrap();
        assert_eq!(out, "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn runaway_templates_are_stopped() {
        let looping =
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}";
        let e = render_template(looping, &[Message::new("user", "hi")], "", "").unwrap_err();
        assert!(matches!(e, Error::Template(_)), "{e}");
        let recursive = "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}";
        assert!(render_template(recursive, &[Message::new("user", "hi")], "", "").is_err());
    }

    #[test]
    fn template_python_methods_and_exceptions() {
        let t = "{% if messages[0].role == 'system' %}{{ raise_exception('no system') }}{% endif %}{{ bos_token }}{% for m in messages %}{{ m.content.strip() }}{% endfor %}";
        assert_eq!(
            render_template(t, &[Message::new("user", "  x  ")], "<s>", "").unwrap(),
            "<s>x"
        );
        let err = render_template(t, &[Message::new("system", "x")], "", "").unwrap_err();
        assert!(err.to_string().contains("no system"), "{err}");
    }
}
