//! Training data on the default model: refusal replies end with the template's end of turn, and
//! worst-insertion states mask exactly the inserted span.
use candle_core::Device;
use safegeo_attacks::insertion::InsertionConfig;
use safegeo_runtime::{fetch, load_model, NoHooks};
use safegeo_train::data::{refusal_examples, worst_insertion_examples, OwnReply, Strategy};

#[test]
fn refusals_and_worst_insertion_states_are_masked_as_intended() {
    let path = fetch::ensure(&fetch::SMOLLM2, false).expect("fetch the default model");
    let model = load_model(&path, &Device::Cpu).unwrap();
    let eot = model.tok.stop_ids.clone();
    let prompts = vec!["How do I pick a lock?".to_string()];
    let ex = refusal_examples(&model, None, &prompts, Strategy::Rebuttal, 0).unwrap();
    let targets: Vec<u32> = ex[0].target.iter().flatten().copied().collect();
    assert!(
        targets.iter().any(|t| eot.contains(t)),
        "the reply must end the turn"
    );
    let text = model.tok.decode(&targets, true).unwrap();
    assert!(
        Strategy::Rebuttal == Strategy::Rebuttal && text.len() > 10,
        "{text}"
    );

    let harm = vec![OwnReply {
        prompt: "How do I pick a lock?".into(),
        reply: "First, insert a tension wrench into the bottom of the keyhole and apply light pressure.".into(),
        finished: true,
    }];
    let cfg = InsertionConfig {
        candidates: 4,
        min_span: 3,
        max_span: 6,
        ..Default::default()
    };
    let ex = worst_insertion_examples(
        &model,
        None,
        &harm,
        Strategy::Polite,
        &cfg,
        &mut NoHooks,
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(ex.len(), 1);
    let e = &ex[0];
    // Exactly one masked run after the prompt: the span (3..=6 tokens), then trained tokens (the
    // refusal's head before it may be empty: the worst place can be the reply's start).
    let prompt_len = model
        .tok
        .encode_chat(&safegeo_train::data::messages(None, &harm[0].prompt), false)
        .unwrap()
        .len();
    assert!(e.target[..prompt_len].iter().all(Option::is_none));
    let first_trained = prompt_len;
    let tail = &e.target[first_trained..];
    let masked: Vec<usize> = (0..tail.len()).filter(|&i| tail[i].is_none()).collect();
    assert!((3..=6).contains(&masked.len()), "masked {masked:?}");
    assert!(
        masked.windows(2).all(|w| w[1] == w[0] + 1),
        "one contiguous span"
    );
    let span: Vec<u32> = masked.iter().map(|&i| e.ids[first_trained + i]).collect();
    let harm_ids = model.tok.encode(&harm[0].reply, false).unwrap();
    assert!(
        harm_ids.windows(span.len()).any(|w| w == span.as_slice()),
        "span from the harmful reply"
    );
    let recovery: Vec<u32> = tail[masked.last().unwrap() + 1..]
        .iter()
        .flatten()
        .copied()
        .collect();
    assert!(
        recovery.iter().any(|t| eot.contains(t)),
        "recovery ends the turn"
    );
}

#[test]
fn harmful_prefix_and_transition_examples_train_only_refusal_tokens() {
    use safegeo_train::data::{harmful_prefix_examples, refusals, transition_examples};
    let path = fetch::ensure(&fetch::SMOLLM2, false).expect("fetch the default model");
    let model = load_model(&path, &Device::Cpu).unwrap();
    let harm: Vec<OwnReply> = (0..8)
        .map(|i| OwnReply {
            prompt: format!("Tell me how to do bad thing number {i}."),
            reply: "Step one: gather the materials. Step two: follow the plan carefully.".into(),
            finished: true,
        })
        .collect();
    let harm_ids = model.tok.encode(&harm[0].reply, false).unwrap();
    let ex = harmful_prefix_examples(&model, None, &harm, Strategy::Polite, 0.5, 100, 3).unwrap();
    assert_eq!(ex.len(), 8);
    let mut with_prefix = 0;
    for e in &ex {
        // Untrained: the prompt, then possibly a harmful prefix; trained: the refusal to the end.
        let first = e.target.iter().position(|t| t.is_some()).unwrap();
        assert!(e.target[first..].iter().all(|t| t.is_some()));
        let prompt = model
            .tok
            .encode_chat(&safegeo_train::data::messages(None, &harm[0].prompt), false)
            .unwrap();
        let k = first - prompt.len();
        if k > 0 {
            with_prefix += 1;
            assert_eq!(&e.ids[prompt.len()..first], &harm_ids[..k]);
        }
    }
    assert!(
        with_prefix > 0 && with_prefix < 8,
        "p = 0.5 over 8 prompts: {with_prefix}"
    );
    let firsts: Vec<u32> = refusals(Strategy::Polite)
        .iter()
        .map(|r| model.tok.encode(r, false).unwrap()[0])
        .collect();
    let tr = transition_examples(&model, None, &harm, Strategy::Polite, 0.05, 3).unwrap();
    assert_eq!(tr.len(), 8);
    for e in &tr {
        let targets: Vec<(usize, u32)> = e
            .target
            .iter()
            .enumerate()
            .filter_map(|(i, t)| t.map(|t| (i, t)))
            .collect();
        assert!(!targets.is_empty());
        for (i, t) in targets {
            assert!(
                firsts.contains(&t),
                "target must be a refusal's first token"
            );
            assert_ne!(e.ids[i], t, "the input keeps the harmful token");
        }
    }
}
