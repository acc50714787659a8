//! Target log-probabilities (the loss over the vocabulary), fused: forward and backward written out
//! from the formula.
use super::*;

// Log-probability of each row's label: y_r = x_r[l_r] - lse(x_r) for logits x: (n, V).
// dx_r = g_r (onehot(l_r) - softmax(x_r)). As log-softmax + gather this is two vocabulary-sized
// nodes whose backward writes four vocabulary-sized buffers (two of them zeroed first); here
// the backward writes one.

struct TargetLogProbs {
    labels: Vec<u32>,
    /// Each row's log-sum-exp, kept from the forward for the backward.
    lse: std::sync::OnceLock<Vec<f32>>,
}

impl CustomOp1 for TargetLogProbs {
    fn name(&self) -> &'static str {
        "fused-target-log-probs"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, "fused-target-log-probs")?;
        let (n, v) = l.shape().dims2()?;
        if self.labels.len() != n {
            candle_core::bail!(
                "target_log_probs: {} labels for {n} rows",
                self.labels.len()
            );
        }
        if let Some(&bad) = self.labels.iter().find(|&&t| t as usize >= v) {
            candle_core::bail!("target_log_probs: label {bad} outside the vocabulary of {v}");
        }
        let lse: Vec<f32> = x
            .par_chunks(v.max(1))
            .map(|row| {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                max + row.iter().map(|&a| exp(a - max)).sum::<f32>().ln()
            })
            .collect();
        let y: Vec<f32> = (0..n)
            .map(|r| x[r * v + self.labels[r] as usize] - lse[r])
            .collect();
        let _ = self.lse.set(lse);
        Ok((CpuStorage::F32(y), Shape::from(n)))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let (n, v) = x.dims2()?;
        let lse = self
            .lse
            .get()
            .ok_or_else(|| candle_core::Error::Msg("target_log_probs: no forward".into()))?;
        let dx = with_data(x, |x| {
            with_data(g, |g| {
                let mut dx = Vec::<f32>::with_capacity(n * v);
                // SAFETY: every element of each row is written below before it is read.
                #[allow(clippy::uninit_vec)]
                unsafe {
                    dx.set_len(n * v)
                };
                dx.par_chunks_mut(v.max(1))
                    .zip(x.par_chunks(v.max(1)))
                    .enumerate()
                    .for_each(|(r, (dr, xr))| {
                        let (gr, m) = (g[r], lse[r]);
                        for (d, &a) in dr.iter_mut().zip(xr) {
                            *d = -gr * exp(a - m);
                        }
                        dr[self.labels[r] as usize] += gr;
                    });
                Ok(dx)
            })
        })?;
        Ok(Some(tensor(dx, &[n, v])?))
    }
}

/// Fused, differentiable `log_softmax(logits)[r, labels[r]]` for `logits: (n, V)`: `(n,)`.
pub fn target_log_probs(logits: &Tensor, labels: &[u32]) -> Result<Tensor> {
    logits.contiguous()?.apply_op1(TargetLogProbs {
        labels: labels.to_vec(),
        lse: std::sync::OnceLock::new(),
    })
}
