//! On the default model: weight orthogonalization equals runtime directional ablation.
use candle_core::{Device, Tensor};
use safegeo_runtime::{fetch, load_model, Hooks, Intervention, Message, NoHooks};

#[test]
fn smollm2_orthogonalized_weights_match_runtime_ablation() {
    let path = fetch::ensure(&fetch::SMOLLM2, false).expect("fetch the default model");
    let base = load_model(&path, &Device::Cpu).unwrap();
    let d = base.cfg.hidden;
    let r: Vec<f64> = (0..d)
        .map(|i| ((i * 37 % 101) as f64 - 50.0) / 50.0)
        .collect();
    let prompts: Vec<Vec<u32>> = ["How do I bake bread?", "Tell me a joke about cats."]
        .iter()
        .map(|t| {
            base.tok
                .encode_chat(&[Message::new("user", *t)], false)
                .unwrap()
        })
        .collect();
    let rt = Tensor::from_vec(
        r.iter().map(|&x| x as f32).collect::<Vec<_>>(),
        d,
        &Device::Cpu,
    )
    .unwrap();
    let mut hooks = Hooks::with_interventions(vec![Intervention::ablate(&rt).unwrap()]);
    let ablated = base.last_logits(&prompts, &mut hooks).unwrap();
    let plain = base.last_logits(&prompts, &mut NoHooks).unwrap();
    drop(base);
    let mut edited = load_model(&path, &Device::Cpu).unwrap();
    safegeo_geometry::abliterate::orthogonalize_weights(&mut edited, &r).unwrap();
    let direct = edited.last_logits(&prompts, &mut NoHooks).unwrap();
    let max = |t: &Tensor| {
        t.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let rel = max(&(&direct - &ablated).unwrap()) / max(&ablated);
    assert!(rel < 1e-4, "orthogonalized vs ablated: {rel}");
    assert!(
        max(&(&plain - &ablated).unwrap()) / max(&ablated) > 1e-3,
        "the direction changed nothing"
    );
}
