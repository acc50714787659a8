//! The vendored candle-core's backward pass (vendor/README.md) stores a tensor's first gradient
//! as it is instead of adding it to zeros. These cases cover what that touches: a tensor used
//! twice (fan-out), `sub`'s negated gradient, broadcasts, gradients that arrive as strided
//! views (transpose), and one gradient shared by two inputs; each against values worked out by
//! hand, and every gradient handed out must be contiguous.
use candle_core::{DType, Device, Tensor, Var};

fn var(values: &[f64], shape: (usize, usize)) -> Var {
    Var::from_tensor(&Tensor::from_slice(values, shape, &Device::Cpu).unwrap()).unwrap()
}

fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_vec1::<f64>().unwrap()
}

fn grad_of(grads: &candle_core::backprop::GradStore, v: &Var) -> Tensor {
    let g = grads
        .get(v.as_tensor())
        .expect("a gradient for every input");
    assert!(g.is_contiguous(), "gradients are handed out contiguous");
    assert_eq!(g.dims(), v.as_tensor().dims());
    assert_eq!(g.dtype(), DType::F64);
    g.clone()
}

#[test]
fn a_tensor_used_twice_sums_both_gradients() {
    // d/dx sum(x * x + x) = 2x + 1.
    let x = var(&[1.0, -2.0, 0.5, 3.0], (2, 2));
    let t = x.as_tensor();
    let loss = (t.mul(t).unwrap() + t).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    assert_eq!(values(&grad_of(&grads, &x)), vec![3.0, -3.0, 2.0, 7.0]);
}

#[test]
fn sub_negates_the_first_gradient_of_its_right_side() {
    // d/da sum(3a - b) = 3, d/db = -1; and b - b has gradient 0 for b.
    let a = var(&[1.0, 2.0], (1, 2));
    let b = var(&[5.0, 7.0], (1, 2));
    let loss = ((a.as_tensor() * 3.0).unwrap() - b.as_tensor())
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    assert_eq!(values(&grad_of(&grads, &a)), vec![3.0, 3.0]);
    assert_eq!(values(&grad_of(&grads, &b)), vec![-1.0, -1.0]);

    let loss = (b.as_tensor() - b.as_tensor()).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    assert_eq!(values(&grad_of(&grads, &b)), vec![0.0, 0.0]);
}

#[test]
fn broadcast_inputs_receive_the_sum_over_broadcast_rows() {
    // sum((a + b) * w) with b: (1, 2) broadcast over a's 3 rows: d/db = column sums of w.
    let a = var(&[0.0; 6], (3, 2));
    let b = var(&[1.0, 2.0], (1, 2));
    let w = Tensor::from_slice(&[1.0f64, 2.0, 3.0, 4.0, 5.0, 6.0], (3, 2), &Device::Cpu).unwrap();
    let loss = a
        .as_tensor()
        .broadcast_add(b.as_tensor())
        .unwrap()
        .mul(&w)
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    assert_eq!(values(&grad_of(&grads, &b)), vec![9.0, 12.0]);
    assert_eq!(values(&grad_of(&grads, &a)), values(&w));
    // A mean over a broadcast: each element gets 1/n of the upstream gradient.
    let loss = b.as_tensor().mean_all().unwrap();
    let grads = loss.backward().unwrap();
    assert_eq!(values(&grad_of(&grads, &b)), vec![0.5, 0.5]);
}

#[test]
fn gradients_arriving_as_strided_views_are_stored_contiguous_and_in_order() {
    // loss = sum(x^T * w), x: (2, 3), w: (3, 2): d/dx[i][j] = w[j][i], which reaches x
    // through the transpose as a strided view of the upstream gradient.
    let x = var(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], (2, 3));
    let w = Tensor::from_slice(&[1.0f64, 2.0, 3.0, 4.0, 5.0, 6.0], (3, 2), &Device::Cpu).unwrap();
    let loss = x
        .as_tensor()
        .t()
        .unwrap()
        .mul(&w)
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    assert_eq!(
        values(&grad_of(&grads, &x)),
        vec![1.0, 3.0, 5.0, 2.0, 4.0, 6.0]
    );
}

#[test]
fn one_gradient_shared_by_two_inputs_stays_correct_for_each() {
    // sum((a + b) * c): a and b receive the same upstream gradient, c; a also feeds a second
    // branch, so its entry is added to afterwards while b's must stay c.
    let a = var(&[1.0, 2.0], (1, 2));
    let b = var(&[3.0, 4.0], (1, 2));
    let c = Tensor::from_slice(&[10.0f64, 20.0], (1, 2), &Device::Cpu).unwrap();
    let sum = (a.as_tensor() + b.as_tensor()).unwrap();
    let loss = (sum.mul(&c).unwrap() + (a.as_tensor() * 2.0).unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    assert_eq!(values(&grad_of(&grads, &a)), vec![12.0, 22.0]);
    assert_eq!(values(&grad_of(&grads, &b)), vec![10.0, 20.0]);
}
