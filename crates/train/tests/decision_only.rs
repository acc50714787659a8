//! Decision negatives (`ExampleRecipe::with_decision_only`) on a tiny model: harmful examples
//! teach the model to open with the refusal token everywhere; a stream of harmless prompts
//! trained on the decision alone keeps the refusal mass on those prompts lower than the same
//! run without them.
use candle_core::DType;
use safegeo_runtime::testing::tiny_model;
use safegeo_runtime::Arch;
use safegeo_train::data::Example;
use safegeo_train::recipes::ExampleRecipe;
use safegeo_train::trainer::{target_rows, train, TrainConfig};

const REFUSAL: u32 = 5;

fn examples() -> Vec<Example> {
    let harmful =
        (0..6u32).map(|i| Example::reply(vec![2, 3 + i, 7], vec![REFUSAL, 6, 1], "harmful"));
    let harmless =
        (0..6u32).map(|i| Example::reply(vec![2, 11 + i, 8], vec![20 + i, 21, 1], "harmless"));
    harmful.chain(harmless).collect()
}

fn negatives() -> Vec<Example> {
    (0..8u32)
        .map(|i| Example::reply(vec![2, 30 + i, 8, 9], vec![1], "harmless"))
        .collect()
}

/// Full fine-tuning of the tiny model for `steps` steps of 4 examples at lr 1e-2.
fn full_training(steps: usize) -> TrainConfig {
    TrainConfig {
        steps,
        batch_size: 4,
        lr: 1e-2,
        warmup_steps: 1,
        lora: None,
        save_at: vec![],
        ..Default::default()
    }
}

/// Mean refusal probability at the reply position of the decision negatives after training.
fn refusal_mass_after(with_negatives: bool, dir: &std::path::Path) -> (f64, Vec<String>) {
    let mut model = tiny_model(Arch::Llama, 3, DType::F32).unwrap();
    let mut recipe = ExampleRecipe::new("sft", examples(), 4, 1, 1)
        .unwrap()
        .with_decision(1.0, vec![REFUSAL])
        .unwrap();
    if with_negatives {
        recipe = recipe
            .with_decision_only(vec![], negatives(), 4, 0.5)
            .unwrap();
    }
    let cfg = full_training(12);
    let lines = train(&mut model, &mut recipe, &cfg, dir, &mut |_, _, _| {}).unwrap();
    let parts = lines[0].parts.keys().cloned().collect();
    let negs = negatives();
    let batch: Vec<&Example> = negs.iter().collect();
    let rows = target_rows(&model, &batch).unwrap();
    let at: Vec<u32> = rows.first.iter().map(|&r| r as u32).collect();
    let q: Vec<f32> = rows
        .log_probs_at(&at)
        .unwrap()
        .narrow(1, REFUSAL as usize, 1)
        .unwrap()
        .exp()
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    (
        q.iter().map(|&x| x as f64).sum::<f64>() / q.len() as f64,
        parts,
    )
}

#[test]
fn decision_negatives_lower_refusal_mass_on_harmless_prompts() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (plain, plain_parts) = refusal_mass_after(false, a.path());
    let (with, with_parts) = refusal_mass_after(true, b.path());
    assert!(!plain_parts.contains(&"decision_only".to_string()));
    assert!(
        with_parts.contains(&"decision_only".to_string()),
        "{with_parts:?}"
    );
    // Refusing everywhere is what the harmful examples alone teach.
    assert!(plain > 0.1, "refusal mass without negatives {plain}");
    assert!(
        with < 0.5 * plain,
        "with negatives {with} vs without {plain}"
    );
    eprintln!("refusal mass on the negatives: {with:.4} with them, {plain:.4} without");
}

#[test]
fn decision_negatives_need_a_decision_weight_and_draw_reproducibly() {
    let plain = ExampleRecipe::new("sft", examples(), 4, 1, 1).unwrap();
    assert!(plain
        .with_decision_only(vec![], negatives(), 4, 0.5)
        .is_err());
    let make = || {
        ExampleRecipe::new("sft", examples(), 4, 2, 1)
            .unwrap()
            .with_decision(1.0, vec![REFUSAL])
            .unwrap()
            .with_decision_only(examples()[..6].to_vec(), negatives(), 6, 0.5)
            .unwrap()
    };
    let mut r = make();
    // Steps 0-3 with 2 micro-batches of 3 + 3 draw 24 = 3 epochs of the 8 negatives and
    // 4 epochs of the 6 harmful prompts.
    let (mut pos, mut neg): (Vec<usize>, Vec<usize>) = (Vec::new(), Vec::new());
    for s in 0..4 {
        for m in 0..2 {
            let (p, n) = r.decision_indices(s, m);
            assert_eq!((p.len(), n.len()), (3, 3));
            pos.extend(p);
            neg.extend(n);
        }
    }
    pos.sort_unstable();
    neg.sort_unstable();
    assert_eq!(pos, (0..6).flat_map(|i| [i; 4]).collect::<Vec<_>>());
    assert_eq!(neg, (0..8).flat_map(|i| [i; 3]).collect::<Vec<_>>());
    // Harmful decision prompts need harmless ones beside them.
    let lone = ExampleRecipe::new("sft", examples(), 4, 1, 1)
        .unwrap()
        .with_decision(1.0, vec![REFUSAL])
        .unwrap()
        .with_decision_only(examples()[..6].to_vec(), vec![], 4, 0.5);
    assert!(lone.is_err());
    // A quarter of a batch of 8 is harmful; shares outside (0, 1) are refused.
    let quarter = ExampleRecipe::new("sft", examples(), 4, 1, 1)
        .unwrap()
        .with_decision(1.0, vec![REFUSAL])
        .unwrap();
    let mut q = quarter
        .with_decision_only(examples()[..6].to_vec(), negatives(), 8, 0.25)
        .unwrap();
    let (p, n) = q.decision_indices(0, 0);
    assert_eq!((p.len(), n.len()), (2, 6));
    for bad in [0.0, 1.0, f64::NAN] {
        let r = ExampleRecipe::new("sft", examples(), 4, 1, 1)
            .unwrap()
            .with_decision(1.0, vec![REFUSAL])
            .unwrap()
            .with_decision_only(examples()[..6].to_vec(), negatives(), 8, bad);
        assert!(r.is_err(), "share {bad}");
    }
    // A resumed run draws the same negatives for any step.
    assert_eq!(make().decision_indices(9, 1), r.decision_indices(9, 1));
}
