//! The differentiable path against finite differences and the f64 composites: inputs, full weights, LoRA.
use super::*;

/// Mean of `log_softmax(logits) * weights` over all positions: a scalar touching every path.
fn objective(m: &Model, x: Tensor, weights: &Tensor) -> Tensor {
    let layout = Layout::dense(x.dim(0).unwrap());
    let logits = differentiable_logits(m, x, &layout);
    let lp = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
    (lp * weights).unwrap().sum_all().unwrap()
}

/// Logits at every position, on the differentiable path.
fn differentiable_logits(m: &Model, x: Tensor, layout: &Layout) -> Tensor {
    m.forward_embeds(
        x,
        layout,
        None,
        LogitsAt::All,
        Phase::Prompt,
        true,
        &mut NoHooks,
    )
    .unwrap()
    .unwrap()
}

/// LoRA's B starts at zero; give it values so that A's gradient is not trivially zero.
fn give_lora_b_values(vars: &[Var], dtype: DType) {
    for (i, v) in vars.iter().enumerate().skip(1).step_by(2) {
        let t = Tensor::ones(v.as_tensor().shape(), dtype, &Device::Cpu)
            .unwrap()
            .affine(0.1 * i as f64, 0.0)
            .unwrap();
        v.set(&t).unwrap();
    }
}

fn scalar(t: &Tensor) -> f64 {
    t.to_scalar::<f64>().unwrap()
}

fn fd_check(name: &str, var: &Var, analytic: &Tensor, f: &dyn Fn() -> f64) {
    let flat = analytic.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let orig = var
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let shape = var.as_tensor().shape().clone();
    let eps = 1e-5;
    for i in (0..orig.len()).step_by((orig.len() / 7).max(1)) {
        let mut v = orig.clone();
        v[i] += eps;
        var.set(&Tensor::from_vec(v.clone(), &shape, &Device::Cpu).unwrap())
            .unwrap();
        let up = f();
        v[i] -= 2.0 * eps;
        var.set(&Tensor::from_vec(v, &shape, &Device::Cpu).unwrap())
            .unwrap();
        let down = f();
        var.set(&Tensor::from_vec(orig.clone(), &shape, &Device::Cpu).unwrap())
            .unwrap();
        let numeric = (up - down) / (2.0 * eps);
        let err = (numeric - flat[i]).abs();
        assert!(
            err <= 1e-6 + 1e-4 * numeric.abs(),
            "{name}[{i}]: analytic {} vs numeric {numeric}",
            flat[i]
        );
    }
}

fn weights_for(m: &Model, t: usize) -> Tensor {
    Tensor::arange(0f64, (t * m.cfg.vocab) as f64, &Device::Cpu)
        .unwrap()
        .affine(0.37, 0.0)
        .unwrap()
        .sin()
        .unwrap()
        .reshape((1, t, m.cfg.vocab))
        .unwrap()
}

#[test]
fn onehot_input_gradient_matches_finite_differences() {
    for arch in ARCHS {
        let m = tiny_model(arch, 21, DType::F64).unwrap();
        let ids = [3u32, 8, 15, 4, 42];
        let mut oh = vec![0f64; ids.len() * m.cfg.vocab];
        for (i, &t) in ids.iter().enumerate() {
            oh[i * m.cfg.vocab + t as usize] = 1.0;
        }
        let onehot = Var::from_vec(oh, (ids.len(), m.cfg.vocab), &Device::Cpu).unwrap();
        let w = weights_for(&m, ids.len());
        let f = || {
            let x = m
                .scale_embeddings(
                    onehot
                        .as_tensor()
                        .matmul(&m.embed)
                        .unwrap()
                        .unsqueeze(0)
                        .unwrap(),
                )
                .unwrap();
            objective(&m, x, &w)
        };
        let grads = f().backward().unwrap();
        let g = grads.get(onehot.as_tensor()).unwrap().clone();
        fd_check(&format!("{arch:?} onehot"), &onehot, &g, &|| scalar(&f()));
    }
}

#[test]
fn full_weight_gradients_match_finite_differences() {
    for arch in ARCHS {
        let mut m = tiny_model(arch, 31, DType::F64).unwrap();
        let vars = m.make_trainable().unwrap();
        let ids = Tensor::new(&[[3u32, 9, 27, 4]], &Device::Cpu).unwrap();
        let w = weights_for(&m, 4);
        let f = |m: &Model| objective(m, m.embed_ids(&ids).unwrap(), &w);
        let grads = f(&m).backward().unwrap();
        // Embedding (also the tied head), a norm, and a few block weights.
        for (k, v) in vars
            .iter()
            .enumerate()
            .filter(|(k, _)| [0, 1, 2, 4, 7, 10].contains(k))
        {
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{arch:?} var {k} has no gradient"))
                .clone();
            fd_check(&format!("{arch:?} var {k}"), v, &g, &|| scalar(&f(&m)));
        }
    }
}

/// The f32 training path (fused kernels with written-out backward) gives the same gradients for
/// every weight as the f64 path (exact composites, checked against finite differences above).
#[test]
fn fused_f32_gradients_equal_the_checked_f64_composites() {
    for (arch, lora) in ARCHS.iter().flat_map(|&a| [(a, false), (a, true)]) {
        let grads_of = |dtype: DType| {
            let mut m = tiny_model(arch, 31, dtype).unwrap();
            let vars = if lora {
                let vars = m.attach_lora(2, 4.0, &["q", "o", "up", "down"], 0).unwrap();
                give_lora_b_values(&vars, dtype);
                vars
            } else {
                m.make_trainable().unwrap()
            };
            // Two rows, the second left-padded: masked attention rows take part too.
            let (ids, layout) = m.pad_batch(&[vec![3, 9, 27, 4, 8], vec![5, 6, 7]]).unwrap();
            let logits = differentiable_logits(&m, m.embed_ids(&ids).unwrap(), &layout);
            let w = weights_for(&m, 10)
                .reshape((2, 5, m.cfg.vocab))
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let lp = safegeo_runtime::log_softmax_last(&logits).unwrap();
            let grads = (lp * w).unwrap().sum_all().unwrap().backward().unwrap();
            vars.iter()
                .map(|v| {
                    grads
                        .get(v.as_tensor())
                        .unwrap()
                        .to_dtype(DType::F64)
                        .unwrap()
                })
                .collect::<Vec<_>>()
        };
        let (fused, exact) = (grads_of(DType::F32), grads_of(DType::F64));
        for (k, (a, b)) in fused.iter().zip(&exact).enumerate() {
            let scale = safegeo_runtime::testing::max_abs(b);
            let err = max_abs(a, b);
            assert!(
                err <= 1e-3 * scale.max(1e-6),
                "{arch:?} lora={lora} var {k}: {err} vs scale {scale}"
            );
        }
    }
}

#[test]
fn lora_gradients_match_finite_differences() {
    for arch in ARCHS {
        let mut m = tiny_model(arch, 41, DType::F64).unwrap();
        let vars = m.attach_lora(2, 4.0, &["q", "v", "down"], 0).unwrap();
        give_lora_b_values(&vars, DType::F64);
        let ids = Tensor::new(&[[5u32, 6, 7, 33, 2]], &Device::Cpu).unwrap();
        let w = weights_for(&m, 5);
        let f = |m: &Model| objective(m, m.embed_ids(&ids).unwrap(), &w);
        let grads = f(&m).backward().unwrap();
        for (k, v) in vars.iter().enumerate().take(6) {
            let g = grads.get(v.as_tensor()).unwrap().clone();
            fd_check(&format!("{arch:?} lora {k}"), v, &g, &|| scalar(&f(&m)));
        }
    }
}

#[test]
fn lora_on_chosen_layers_adapts_only_those() {
    let mut m = tiny_model(Arch::Llama, 9, DType::F32).unwrap();
    let vars = m
        .attach_lora_at(4, 8.0, &["q", "down"], Some(&[1]), 1)
        .unwrap();
    assert_eq!(vars.len(), 4, "A and B for q and down of block 1");
    for (i, b) in m.blocks.iter_mut().enumerate() {
        for (name, l) in b.linears_mut() {
            let want = i == 1 && (name == "q" || name == "down");
            assert_eq!(l.lora.is_some(), want, "block {i} {name}");
        }
    }
    let e = m
        .attach_lora_at(4, 8.0, &["q"], Some(&[0, 2]), 1)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("layer 2 does not exist") && e.contains("0-1"),
        "{e}"
    );
}

#[test]
fn lora_with_zero_b_leaves_outputs_unchanged() {
    let base = tiny_model(Arch::Llama, 9, DType::F32).unwrap();
    let mut m = tiny_model(Arch::Llama, 9, DType::F32).unwrap();
    m.attach_lora(4, 8.0, &["q", "k", "v", "o"], 1).unwrap();
    assert_eq!(
        max_abs(
            &last_logits(&base, &prompts()),
            &last_logits(&m, &prompts())
        ),
        0.0
    );
}
