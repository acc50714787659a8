//! Planted-direction tests on a tiny random model: harmful prompts' tokens carry a known direction
//! `u` in their embeddings, and an untied LM head reads `u` out as a "refusal" token. The carrier
//! method must recover `u`, and selection must pick a candidate along `u` whose ablation removes
//! the planted refusal.
use candle_core::{DType, Device, Tensor};
use safegeo_data::jsonl::Journal;
use safegeo_geometry::carriers::{capture, difference_of_means};
use safegeo_geometry::linalg::cosine;
use safegeo_geometry::select::{select, Candidate, SelectConfig};
use safegeo_runtime::testing::tiny_model;
use safegeo_runtime::{Arch, Linear, Model};

const REFUSAL_TOKEN: u32 = 1;

fn planted_model(u: &[f32], strength: f32) -> Model {
    let mut m = tiny_model(Arch::Llama, 12, DType::F32).unwrap();
    let d = m.cfg.hidden;
    let mut emb: Vec<Vec<f32>> = m.embed.to_vec2().unwrap();
    let mut head = emb.clone();
    for row in emb.iter_mut().take(12).skip(2) {
        for k in 0..d {
            row[k] += strength * u[k]; // "harmful" tokens w0..w9
        }
    }
    head[REFUSAL_TOKEN as usize] = u.iter().map(|x| 40.0 * x).collect();
    let flat =
        |v: &Vec<Vec<f32>>| Tensor::from_vec(v.concat(), (v.len(), d), &Device::Cpu).unwrap();
    m.embed = flat(&emb);
    m.lm_head = Linear::new(flat(&head), None);
    m
}

fn unit_u(d: usize) -> Vec<f32> {
    let v: Vec<f32> = (0..d).map(|i| ((i * 7 + 3) % 11) as f32 - 5.0).collect();
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter().map(|x| x / n).collect()
}

fn prompts(lo: u32, hi: u32, n: usize) -> Vec<Vec<u32>> {
    (0..n)
        .map(|i| {
            (0..4)
                .map(|j| lo + ((i * 5 + j * 3) as u32 % (hi - lo)))
                .collect()
        })
        .collect()
}

/// The planted model (strength 30) and its refusal carriers from 16 + 16 prompts.
fn planted_carriers() -> (Model, Vec<Vec<Vec<f64>>>) {
    let m = planted_model(&unit_u(16), 30.0);
    let h = capture(&m, &prompts(2, 12, 16), 0, 8, &mut |_| {}).unwrap();
    let l = capture(&m, &prompts(20, 44, 16), 0, 8, &mut |_| {}).unwrap();
    let carriers = difference_of_means(&h, &l, None, None).refusal;
    (m, carriers)
}

/// A selection that any plant passes (KL up to 50), screening every candidate on 4 prompts and
/// re-measuring 2.
fn loose_select() -> SelectConfig {
    SelectConfig {
        kl_max: 50.0,
        finalists: 2,
        screen_prompts: 4,
        prescreen_prompts: 0,
        random_directions: 0,
        positions: None,
        // The planted carriers hold one position, t_inst.
        t_inst: true,
        ..Default::default()
    }
}

/// `select` on 4 + 4 validation prompts with a journal: candidates, the selected one, and the
/// journal's text.
fn journaled_select(
    m: &Model,
    carriers: &[Vec<Vec<f64>>],
    cfg: &SelectConfig,
) -> (Vec<Candidate>, Option<usize>, String) {
    let (val_h, val_l) = (prompts(2, 12, 4), prompts(20, 44, 4));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j.jsonl");
    let mut journal = Journal::open(&path, &"planted").unwrap();
    let (cands, best, _) = select(
        m,
        carriers,
        &val_h,
        &val_l,
        &[REFUSAL_TOKEN],
        cfg,
        Some(&mut journal),
        &mut |_, _| {},
    )
    .unwrap();
    (cands, best, std::fs::read_to_string(&path).unwrap())
}

#[test]
fn difference_of_means_recovers_the_planted_direction() {
    let u = unit_u(16);
    let m = planted_model(&u, 30.0);
    let harmful = prompts(2, 12, 40);
    let harmless = prompts(20, 44, 40);
    let h = capture(&m, &harmful, 0, 8, &mut |_| {}).unwrap();
    let l = capture(&m, &harmless, 0, 8, &mut |_| {}).unwrap();
    let c = difference_of_means(&h, &l, None, None);
    let u64: Vec<f64> = u.iter().map(|&x| x as f64).collect();
    let cos0 = cosine(&c.refusal[0][0], &u64);
    assert!(cos0 > 0.99, "layer 0 carrier: cos {cos0}");
    // Without the plant the same method finds no such direction.
    let plain = planted_model(&u, 0.0);
    let h = capture(&plain, &harmful, 0, 8, &mut |_| {}).unwrap();
    let l = capture(&plain, &harmless, 0, 8, &mut |_| {}).unwrap();
    let c0 = difference_of_means(&h, &l, None, None);
    assert!(cosine(&c0.refusal[0][0], &u64).abs() < 0.9);
}

#[test]
fn selection_picks_a_carrier_along_the_plant_whose_ablation_removes_refusal() {
    let u = unit_u(16);
    let m = planted_model(&u, 30.0);
    let (train_h, train_l) = (prompts(2, 12, 40), prompts(20, 44, 40));
    let h = capture(&m, &train_h, 0, 8, &mut |_| {}).unwrap();
    let l = capture(&m, &train_l, 0, 8, &mut |_| {}).unwrap();
    let c = difference_of_means(&h, &l, None, None);
    let (val_h, val_l) = (prompts(2, 12, 12), prompts(20, 44, 12));
    // The tiny random model's logits are far from a real model's, so the KL bound is loosened.
    let cfg = SelectConfig {
        kl_max: 50.0,
        finalists: 4,
        screen_prompts: 6,
        // Two candidates (one per layer): the prescreen sends the better one on.
        prescreen_prompts: 4,
        screen_keep: 1,
        t_inst: true,
        ..Default::default()
    };
    let run = |journal: Option<&mut Journal<[f64; 3]>>| {
        select(
            &m,
            &c.refusal,
            &val_h,
            &val_l,
            &[REFUSAL_TOKEN],
            &cfg,
            journal,
            &mut |_, _| {},
        )
        .unwrap()
    };
    let (cands, best, base) = run(None);
    // The random-direction reference: one KL per direction, finite and non-negative.
    assert_eq!(base.random_direction_kl.len(), cfg.random_directions);
    assert!(base
        .random_direction_kl
        .iter()
        .all(|k| k.is_finite() && *k >= -1e-12));
    // A journaled selection cut short (a kill after the first few measurements, the last record
    // torn) resumes to exactly the uninterrupted result.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("select.journal.jsonl");
    let run = |journal: &mut Journal<[f64; 3]>| {
        let (k, b, _) = run(Some(journal));
        (serde_json::to_string(&k).unwrap(), b)
    };
    run(&mut Journal::open(&path, &"planted").unwrap());
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    // The header, a prescreen per candidate, the random directions, and at the screen and the
    // full stage two records (tests, then bypass) for the one kept candidate, which passes.
    assert_eq!(
        lines.len(),
        1 + cands.len()
            + 2 * cfg.screen_keep
            + cfg.random_directions
            + 2 * cfg.screen_keep.min(cfg.finalists)
    );
    let dropped: Vec<_> = cands.iter().filter(|k| k.stage == "prescreen").collect();
    assert_eq!(dropped.len(), cands.len() - cfg.screen_keep);
    let kept = cands.iter().find(|k| k.stage == "full").unwrap();
    for d in dropped {
        assert!(
            d.bypass >= kept.bypass && d.induce.is_nan() && d.kl.is_finite(),
            "{d:?}"
        );
    }
    let torn = format!("{}\n{}", lines[..4].join("\n"), &lines[4][..10]);
    std::fs::write(&path, torn).unwrap();
    let mut journal = Journal::open(&path, &"planted").unwrap();
    assert_eq!(journal.len(), 3);
    assert_eq!(
        run(&mut journal),
        (serde_json::to_string(&cands).unwrap(), best)
    );
    let best = &cands[best.expect("an admissible carrier")];
    let u64: Vec<f64> = u.iter().map(|&x| x as f64).collect();
    assert!(
        cosine(&c.refusal[best.layer][best.pos], &u64) > 0.95,
        "selected {best:?}"
    );
    assert!(
        base.harmful_score > 0.0,
        "the plant makes the model refuse harmful prompts: {}",
        base.harmful_score
    );
    assert!(
        best.bypass < base.harmful_score - 5.0,
        "ablation must remove the refusal: {} vs {}",
        best.bypass,
        base.harmful_score
    );
    assert!(
        best.induce > base.harmless_score,
        "addition must induce refusal"
    );
    assert_eq!(cands.len(), m.cfg.n_layer);
}

#[test]
fn a_zero_carrier_is_listed_but_never_measured() {
    let (m, mut carriers) = planted_carriers();
    let d = carriers[0][0].len();
    carriers[0].push(vec![0.0; d]); // layer 0 gains a zero candidate at a new position
    let zero_pos = carriers[0].len() - 1;
    let cfg = loose_select();
    let (cands, best, text) = journaled_select(&m, &carriers, &cfg);
    let z = cands
        .iter()
        .find(|c| c.layer == 0 && c.pos == zero_pos)
        .expect("the zero candidate is listed");
    assert_eq!((z.stage, z.failed.clone()), ("zero", vec!["zero"]));
    assert!(z.bypass.is_nan() && z.kl.is_nan() && !z.admissible);
    assert!(!text.contains(&format!("/0/{zero_pos}\"")), "{text}");
    // The listing stays in (layer, pos) order, and `best` still points at an admissible one.
    assert!(cands
        .windows(2)
        .all(|w| (w[0].layer, w[0].pos) < (w[1].layer, w[1].pos)));
    assert!(cands[best.expect("the plant is found")].admissible);
}

#[test]
fn candidates_measured_together_equal_candidates_measured_alone() {
    use safegeo_geometry::select::{ablation_kls, baseline, bypass, induce};
    let (m, c) = planted_carriers();
    // Lengths 4 to 8 in mixed order, so the prompts are regrouped by length and put back.
    let ragged = |mut ps: Vec<Vec<u32>>| {
        for (i, p) in ps.iter_mut().enumerate() {
            p.extend((0..(i * 3) % 5).map(|j| 20 + j as u32));
        }
        ps
    };
    let (val_h, val_l) = (ragged(prompts(2, 12, 5)), ragged(prompts(20, 44, 4)));
    let base = baseline(&m, &val_h, &val_l, &[REFUSAL_TOKEN], 32).unwrap();
    let mut noise = unit_u(16);
    noise.rotate_left(5);
    let wobble: Vec<f64> = noise.iter().map(|&x| 3.0 * x as f64).collect();
    let cands: Vec<(&[f64], usize)> = vec![
        (c[1][0].as_slice(), 1),
        (wobble.as_slice(), 0),
        (c[0][0].as_slice(), 0),
    ];
    // 64 rows: all three candidates in one forward per pass; 1 row: one candidate and one
    // prompt per forward.
    let measure = |cands: &[(&[f64], usize)], batch: usize| -> Vec<[f64; 3]> {
        let rs: Vec<&[f64]> = cands.iter().map(|&(r, _)| r).collect();
        let b = bypass(&m, &rs, &val_h, &[REFUSAL_TOKEN], batch).unwrap();
        let i = induce(&m, cands, &val_l, &base, &[REFUSAL_TOKEN], batch).unwrap();
        let k = ablation_kls(&m, &rs, &val_l, &base, batch).unwrap();
        (0..cands.len()).map(|c| [b[c], i[c], k[c]]).collect()
    };
    let together = measure(&cands, 64);
    for (k, cand) in cands.iter().enumerate() {
        let alone = measure(&[*cand], 1);
        for (a, b) in together[k].iter().zip(&alone[0]) {
            assert!(
                (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                "candidate {k}: {together:?} vs {alone:?}"
            );
        }
    }
    // The candidates really differ, so a mix-up of groups would show.
    assert!(
        (together[0][0] - together[1][0]).abs() > 1e-2,
        "{together:?}"
    );
}

#[test]
fn bypass_is_skipped_for_candidates_that_failed_a_test_unless_asked_for() {
    let (m, carriers) = planted_carriers();
    let (val_h, val_l) = (prompts(2, 12, 4), prompts(20, 44, 4));
    let run = |cfg: &SelectConfig| {
        select(
            &m,
            &carriers,
            &val_h,
            &val_l,
            &[REFUSAL_TOKEN],
            cfg,
            None,
            &mut |_, _| {},
        )
        .unwrap()
    };
    // A negative KL bound fails every candidate: none is admissible, no bypass is measured.
    let strict = SelectConfig {
        kl_max: -1.0,
        prescreen_prompts: 0,
        random_directions: 0,
        t_inst: true,
        ..Default::default()
    };
    let (cands, best, _) = run(&strict);
    assert!(best.is_none());
    for c in &cands {
        assert_eq!(c.stage, "full");
        assert!(c.failed.contains(&"kl"), "{c:?}");
        assert!(
            c.bypass.is_nan() && c.induce.is_finite() && c.kl.is_finite(),
            "{c:?}"
        );
    }
    // Asked for, bypass is measured anyway, and the verdicts do not change.
    let (all, best, _) = run(&SelectConfig {
        bypass_all: true,
        ..strict
    });
    assert!(best.is_none());
    for (a, c) in all.iter().zip(&cands) {
        assert!(a.bypass.is_finite(), "{a:?}");
        assert_eq!((a.induce, a.kl, &a.failed), (c.induce, c.kl, &c.failed));
    }
}

#[test]
fn candidates_at_or_above_the_layer_cutoff_are_listed_but_never_measured() {
    let (m, carriers) = planted_carriers();
    let n_layer = carriers.len();
    assert!(n_layer > 1);
    // Only layer 0 lies below the cut-off.
    let cfg = SelectConfig {
        layer_cutoff: 1.0 / n_layer as f64,
        ..loose_select()
    };
    let (cands, best, text) = journaled_select(&m, &carriers, &cfg);
    assert_eq!(cands.len(), carriers.iter().map(Vec::len).sum::<usize>());
    for c in cands.iter().filter(|c| c.layer > 0) {
        assert_eq!((c.stage, c.failed.clone()), ("cutoff", vec!["layer"]));
        assert!(c.bypass.is_nan() && c.kl.is_nan() && !c.admissible);
    }
    assert!(cands.iter().any(|c| c.layer == 0 && c.stage == "full"));
    assert!(!text.contains("/1/"), "{text}");
    if let Some(b) = best {
        assert_eq!(cands[b].layer, 0);
    }
    // A cut-off that leaves nothing is an error that says what to change.
    let none = SelectConfig {
        layer_cutoff: 0.0,
        ..cfg
    };
    let (val_h, val_l) = (prompts(2, 12, 4), prompts(20, 44, 4));
    let Err(err) = select(
        &m,
        &carriers,
        &val_h,
        &val_l,
        &[REFUSAL_TOKEN],
        &none,
        None,
        &mut |_, _| {},
    ) else {
        panic!("a cut-off of 0 leaves no candidate")
    };
    let err = err.to_string();
    assert!(err.contains("raise the cut-off"), "{err}");
}

#[test]
fn t_inst_is_a_refusal_candidate_only_when_asked_for() {
    let (m, carriers) = planted_carriers();
    let (val_h, val_l) = (prompts(2, 12, 4), prompts(20, 44, 4));
    let run = |t_inst: bool| {
        select(
            &m,
            &carriers,
            &val_h,
            &val_l,
            &[REFUSAL_TOKEN],
            &SelectConfig {
                t_inst,
                ..loose_select()
            },
            None,
            &mut |_, _| {},
        )
    };
    // These carriers hold t_inst alone: by default nothing is left, and the error says why.
    let Err(err) = run(false) else {
        panic!("t_inst was a candidate without being asked for")
    };
    let err = err.to_string();
    assert!(err.contains("--t-inst"), "{err}");
    let (cands, _, _) = run(true).unwrap();
    assert!(!cands.is_empty() && cands.iter().all(|c| c.pos == 0));
}

#[test]
fn the_floor_relative_rule_selects_the_plant_where_the_absolute_bound_selects_nothing() {
    // The tiny random model's own floor is far above KL 0.1: ablating any random direction
    // costs more, so the absolute rule admits nothing and the floor-relative rule must decide.
    let (m, carriers) = planted_carriers();
    let (val_h, val_l) = (prompts(2, 12, 8), prompts(20, 44, 8));
    let cfg = SelectConfig {
        kl_max: 0.1,
        finalists: 4,
        screen_prompts: 4,
        prescreen_prompts: 0,
        random_directions: 16,
        t_inst: true,
        ..Default::default()
    };
    let (cands, best, base) = select(
        &m,
        &carriers,
        &val_h,
        &val_l,
        &[REFUSAL_TOKEN],
        &cfg,
        None,
        &mut |_, _| {},
    )
    .unwrap();
    let p95 = base.floor_kl_p95().unwrap();
    assert_eq!(base.random_direction_kl.len(), 16);
    assert!(p95 > 0.1, "the floor {p95} is not above the absolute bound");
    assert!(cands.iter().all(|c| !c.admissible), "{cands:?}");
    let best = &cands[best.expect("a floor-relative carrier")];
    assert_eq!(best.rule(), Some("floor-relative"));
    assert!(best.kl <= p95 && best.induce > 0.0 && best.bypass < base.harmful_score);
    let u: Vec<f64> = unit_u(16).iter().map(|&x| x as f64).collect();
    assert!(
        cosine(&carriers[best.layer][best.pos], &u) > 0.95,
        "selected {best:?}"
    );
}
