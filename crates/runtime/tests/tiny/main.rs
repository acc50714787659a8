//! Runtime invariants on tiny random models (no checkpoint needed, seconds to run), in themed
//! modules sharing the helpers below.
use candle_core::{DType, Device, Tensor, Var, D};
use safegeo_runtime::testing::tiny_model;
use safegeo_runtime::{
    generate, Arch, GenerateConfig, Hooks, Intervention, KvCache, Layout, LogitsAt, Model, NoHooks,
    Phase, Positions, Scope, Site,
};

const ARCHS: [Arch; 3] = [Arch::Llama, Arch::Qwen2, Arch::Gemma3];

mod gradients;
mod hooks;
mod inference;

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

fn last_logits(m: &Model, prompts: &[Vec<u32>]) -> Tensor {
    let (ids, layout) = m.pad_batch(prompts).unwrap();
    m.forward_ids(
        &ids,
        &layout,
        None,
        LogitsAt::Last,
        Phase::Prompt,
        &mut NoHooks,
    )
    .unwrap()
    .unwrap()
}

fn prompts() -> Vec<Vec<u32>> {
    vec![
        vec![5, 9, 13, 2, 7, 30, 11],
        vec![3, 4],
        vec![20, 21, 22, 23, 24, 25, 26, 27, 28, 40],
    ]
}
