//! Values and gradients of every fused op against the composite candle ops.
use super::*;
use candle_core::{DType, Var, D};

fn rand(shape: &[usize], seed: u64) -> Tensor {
    crate::testing::random_tensor(shape, seed, 2.0)
}

fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
    use crate::testing::max_abs;
    (max_abs(&(a - b).unwrap()) / max_abs(b).max(1e-6)) as f32
}

/// Values and gradients of `fused` equal those of `composite` (candle ops, candle backward)
/// for a random weighting of the outputs, so every output element's gradient is exercised.
fn same_values_and_grads(
    inputs: &[Tensor],
    fused: impl Fn(&[Tensor]) -> Result<Tensor>,
    composite: impl Fn(&[Tensor]) -> Result<Tensor>,
    grad_inputs: usize,
) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let (yf, yc) = (fused(&ts).unwrap(), composite(&ts).unwrap());
    assert!(
        max_rel(&yf, &yc) < 1e-5,
        "values differ: {}",
        max_rel(&yf, &yc)
    );
    let weights = rand(yf.dims(), 99);
    let gf = (&yf * &weights)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let gc = (&yc * &weights)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for (i, t) in ts.iter().enumerate().take(grad_inputs) {
        let (a, b) = (gf.get(t).unwrap(), gc.get(t).unwrap());
        assert!(
            max_rel(a, b) < 1e-4,
            "gradient {i} differs: {}",
            max_rel(a, b)
        );
    }
}

#[test]
fn rms_norm_matches_composite() {
    let inputs = [rand(&[3, 5, 16], 1), rand(&[16], 2)];
    same_values_and_grads(
        &inputs,
        |t| rms_norm(&t[0], &t[1], 1e-5),
        |t| candle_nn::ops::rms_norm_slow(&t[0], &t[1], 1e-5),
        2,
    );
}

#[test]
fn softmaxes_match_composites() {
    let inputs = [rand(&[4, 3, 37], 3)];
    same_values_and_grads(
        &inputs,
        |t| softmax_last(&t[0]),
        |t| candle_nn::ops::softmax(&t[0], D::Minus1),
        1,
    );
    same_values_and_grads(
        &inputs,
        |t| log_softmax_last(&t[0]),
        |t| crate::ops::log_softmax_composite(&t[0]),
        1,
    );
}

#[test]
fn rope_matches_composite_both_layouts() {
    let (cos, sin) = (rand(&[2, 5, 4], 4), rand(&[2, 5, 4], 5));
    for interleaved in [true, false] {
        let inputs = [rand(&[2, 3, 5, 8], 6), cos.clone(), sin.clone()];
        same_values_and_grads(
            &inputs,
            |t| rope(&t[0], &t[1], &t[2], interleaved),
            |t| crate::ops::rope_composite(&t[0], &t[1], &t[2], interleaved),
            1,
        );
    }
}

#[test]
fn swiglu_matches_composite() {
    let inputs = [rand(&[3, 7, 11], 7), rand(&[3, 7, 11], 8)];
    same_values_and_grads(
        &inputs,
        |t| swiglu(&t[0], &t[1]),
        |t| t[0].silu()? * &t[1],
        2,
    );
}

#[test]
fn split_and_merge_heads_match_reshape_transpose() {
    let inputs = [rand(&[2, 5, 12], 12)];
    same_values_and_grads(
        &inputs,
        |t| split_heads(&t[0], 3, None),
        |t| t[0].reshape((2, 5, 3, 4))?.transpose(1, 2)?.contiguous(),
        1,
    );
    let inputs = [rand(&[2, 3, 5, 4], 13)];
    same_values_and_grads(
        &inputs,
        |t| merge_heads(&t[0], false),
        |t| t[0].transpose(1, 2)?.reshape((2, 5, 12)),
        1,
    );
    // Large enough for the parallel copies.
    let inputs = [rand(&[2, 64, 512], 17)];
    assert!(inputs[0].elem_count() >= SEQUENTIAL_BELOW);
    same_values_and_grads(
        &inputs,
        |t| split_heads(&t[0], 8, None),
        |t| t[0].reshape((2, 64, 8, 64))?.transpose(1, 2)?.contiguous(),
        1,
    );
    let x = rand(&[2, 5, 12], 14);
    let back = merge_heads(&split_heads(&x, 3, None).unwrap(), false).unwrap();
    assert_eq!(max_rel(&back, &x), 0.0);
    assert!(split_heads(&x, 5, None).is_err());
    // The flat forms: (b*t, n*hd) in, (b*t, n*hd) out.
    let inputs = [rand(&[10, 12], 19)];
    same_values_and_grads(
        &inputs,
        |t| merge_heads(&split_heads(&t[0], 3, Some(2))?.affine(2.0, 0.0)?, true),
        |t| t[0].affine(2.0, 0.0),
        1,
    );
    same_values_and_grads(
        &inputs,
        |t| split_heads(&t[0], 3, Some(2)),
        |t| t[0].reshape((2, 5, 3, 4))?.transpose(1, 2)?.contiguous(),
        1,
    );
    assert!(split_heads(&inputs[0], 3, Some(3)).is_err());
}

#[test]
fn scaled_masked_softmax_matches_composite_with_grouped_heads() {
    // (b, kv heads, n_rep * t, T) scores against a (b, t, T) causal mask with one fully
    // masked row (a left pad), as `attend` lays them out.
    let (b, kvh, n_rep, t, total) = (2, 2, 3, 4, 6);
    let mut m = vec![0f32; b * t * total];
    for bi in 0..b {
        for q in 0..t {
            for k in 0..total {
                if k > q + (total - t) || (bi == 1 && q == 0) {
                    m[(bi * t + q) * total + k] = f32::NEG_INFINITY;
                }
            }
        }
    }
    let mask = Tensor::from_vec(m, (b, t, total), &candle_core::Device::Cpu).unwrap();
    let inputs = [rand(&[b, kvh, n_rep * t, total], 15)];
    let composite = |t: &[Tensor]| -> Result<Tensor> {
        let s = (&t[0] * 0.37)?
            .reshape((b, kvh, n_rep, 4, total))?
            .broadcast_add(&mask.reshape((b, 1, 1, 4, total))?)?
            .reshape((b, kvh, n_rep * 4, total))?;
        softmax_last(&s)
    };
    same_values_and_grads(
        &inputs,
        |t| scaled_masked_softmax(&t[0], Some(&mask), 0.37),
        composite,
        1,
    );
    same_values_and_grads(
        &inputs,
        |t| scaled_masked_softmax(&t[0], None, 0.37),
        |t| softmax_last(&(&t[0] * 0.37)?),
        1,
    );
    // Large enough for the parallel rows.
    let inputs = [rand(&[1, 3, 3 * 40, 300], 18)];
    assert!(inputs[0].elem_count() >= SEQUENTIAL_BELOW);
    same_values_and_grads(
        &inputs,
        |t| scaled_masked_softmax(&t[0], None, 0.5),
        |t| softmax_last(&(&t[0] * 0.5)?),
        1,
    );
    let wrong = rand(&[b, kvh, n_rep * t + 1, total], 16);
    assert!(scaled_masked_softmax(&wrong, Some(&mask), 1.0).is_err());
}

#[test]
fn batched_products_match_candle_matmul_with_b_as_is_or_transposed() {
    use crate::ops::{batched_matmul, batched_matmul_bt};
    // One and many batch elements (the few-element path runs each gemm on every thread).
    for batch in [1, 6] {
        let inputs = [rand(&[batch, 2, 5, 8], 20), rand(&[batch, 2, 8, 3], 21)];
        same_values_and_grads(
            &inputs,
            |t| batched_matmul(&t[0], &t[1], true),
            |t| t[0].matmul(&t[1]),
            2,
        );
        let inputs = [rand(&[batch, 2, 5, 8], 22), rand(&[batch, 2, 7, 8], 23)];
        same_values_and_grads(
            &inputs,
            |t| batched_matmul_bt(&t[0], &t[1], true),
            |t| t[0].matmul(&t[1].t()?),
            2,
        );
    }
    // A strided left operand (a transposed view) is read in place.
    let inputs = [rand(&[2, 3, 8, 5], 24), rand(&[2, 3, 7, 8], 25)];
    same_values_and_grads(
        &inputs,
        |t| batched_matmul_bt(&t[0].t()?, &t[1], true),
        |t| t[0].t()?.matmul(&t[1].t()?),
        2,
    );
}

#[test]
fn exp_is_within_two_ulps_and_its_edges_hold() {
    let mut worst = 0f64;
    let mut x = -87.0f32;
    while x < 88.0 {
        let want = (x as f64).exp();
        worst = worst.max(((exp(x) as f64 - want) / want).abs());
        x += 0.000_37;
    }
    assert!(worst < 2.5e-7, "worst relative error {worst}");
    assert_eq!(exp(0.0), 1.0);
    assert_eq!(exp(f32::NEG_INFINITY), 0.0);
    assert_eq!(exp(-1e30), 0.0);
    assert!(exp(f32::NAN).is_nan());
    assert!(exp(f32::INFINITY).is_finite() && exp(f32::INFINITY) > 1e38);
}

#[test]
fn lora_linear_matches_its_composite() {
    let w = rand(&[6, 5], 30);
    let inputs = [rand(&[7, 5], 31), rand(&[3, 5], 32), rand(&[6, 3], 33)];
    same_values_and_grads(
        &inputs,
        |t| lora_linear(&t[0], &w, &t[1], &t[2], 0.7),
        |t| t[0].matmul(&w.t()?)? + (t[0].matmul(&t[1].t()?)?.matmul(&t[2].t()?)? * 0.7)?,
        3,
    );
    assert!(lora_linear(&inputs[0], &w, &inputs[2], &inputs[1], 1.0).is_err());
    // The inference form: same values, and trainable factors leave no graph behind.
    let a = Var::from_tensor(&inputs[1]).unwrap();
    let b = Var::from_tensor(&inputs[2]).unwrap();
    let y = lora_linear_no_grad(&inputs[0], &w, a.as_tensor(), b.as_tensor(), 0.7).unwrap();
    let want = lora_linear(&inputs[0], &w, &inputs[1], &inputs[2], 0.7).unwrap();
    assert_eq!(max_rel(&y, &want), 0.0);
    assert!(!y.track_op());
}

#[test]
fn target_log_probs_match_log_softmax_and_gather() {
    let labels = [3u32, 0, 36, 7];
    let idx = Tensor::new(&labels, &candle_core::Device::Cpu)
        .unwrap()
        .reshape((4, 1))
        .unwrap();
    let inputs = [rand(&[4, 37], 40)];
    same_values_and_grads(
        &inputs,
        |t| target_log_probs(&t[0], &labels),
        |t| {
            crate::ops::log_softmax_composite(&t[0])?
                .gather(&idx, 1)?
                .squeeze(1)
        },
        1,
    );
    assert!(target_log_probs(&inputs[0], &[1, 2]).is_err());
    assert!(target_log_probs(&inputs[0], &[1, 2, 3, 37]).is_err());
}

#[test]
fn trainable_linear_matches_matmul() {
    let inputs = [rand(&[7, 5], 10), rand(&[3, 5], 11)];
    same_values_and_grads(
        &inputs,
        |t| trainable_linear(&t[0], &t[1]),
        |t| t[0].matmul(&t[1].t()?),
        2,
    );
}

#[test]
fn strided_inputs_are_made_contiguous() {
    let x = rand(&[6, 4], 9).t().unwrap();
    let a = softmax_last(&x).unwrap();
    let b = candle_nn::ops::softmax(&x.contiguous().unwrap(), D::Minus1).unwrap();
    assert!(max_rel(&a, &b) < 1e-6);
    assert!(!serves(&x.to_dtype(DType::F64).unwrap()));
}
