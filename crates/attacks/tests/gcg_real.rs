//! On the default model: GCG drives a benign target to be generated greedily (small config),
//! and the buffer's best loss never rises.
use candle_core::Device;
use safegeo_attacks::gcg::{Gcg, GcgConfig};
use safegeo_attacks::SplitPrompt;
use safegeo_runtime::{fetch, generate, load_model, GenerateConfig, NoHooks};

#[test]
fn gcg_makes_smollm2_say_the_target() {
    let path = fetch::ensure(&fetch::SMOLLM2, false).expect("fetch the default model");
    let model = load_model(&path, &Device::Cpu).unwrap();
    let target = "Sure, here is a short poem about cats";
    let prompt =
        SplitPrompt::for_behavior(&model.tok, None, "Write a short poem about cats.").unwrap();
    let cfg = GcgConfig {
        num_steps: 80,
        search_width: 64,
        topk: 64,
        early_stop: true,
        ..Default::default()
    };
    let gcg = Gcg::new(&model, &prompt, target, cfg).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = gcg
        .run(
            Some(&dir.path().join("state.json")),
            &mut NoHooks,
            &mut |_, _| {},
        )
        .unwrap();
    assert!(
        state.stopped_early,
        "no success in 80 steps; best losses {:?}",
        state.best_losses
    );
    for w in state.best_losses.windows(2) {
        assert!(w[1] <= w[0], "buffer best rose: {:?}", state.best_losses);
    }
    // Greedy decoding from the exact optimized ids reproduces the target.
    let ids: Vec<u32> = prompt
        .before
        .iter()
        .chain(state.result_ids())
        .chain(&prompt.after)
        .copied()
        .collect();
    let want = model.tok.encode(target, false).unwrap();
    let out = generate(
        &model,
        &[ids],
        &GenerateConfig {
            max_new_tokens: want.len(),
            ..Default::default()
        },
        &mut NoHooks,
    )
    .unwrap()
    .remove(0);
    assert_eq!(
        model.tok.decode(&out.ids, false).unwrap(),
        target,
        "suffix {:?}",
        model.tok.decode(state.result_ids(), false).unwrap()
    );
}
