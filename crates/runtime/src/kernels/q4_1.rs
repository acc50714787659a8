//! Q4_1 weights times a few f32 rows, as llama.cpp decodes: each activation row is quantized to
//! Q8_1 blocks and every output is a sum of block dot products
//!
//! `y[r][o] = sum_b  d_w(o,b) d_a(r,b) sum_i q_w[i] q_a[i]  +  m_w(o,b) s_a(r,b)`
//!
//! where a Q4_1 block of 32 weights is `w_i = d_w q_w[i] + m_w` (`q_w` in 0..16) and a Q8_1 block
//! of 32 activations is `a_i ~ d_a q_a[i]` (`q_a` in -127..=127) with `s_a = d_a sum_i q_a[i]`.
//!
//! candle 0.11 has only scalar code for Q4_1 (4x slower than f32 decoding), so the loader used to
//! requantize such weights to Q8_0. Batch-1 decoding is bound by reading the weights, and Q8_0
//! reads 34 bytes per 32 weights where Q4_1 reads 20: this kernel keeps the file's own blocks.
use candle_core::{DType, Device, Result, Tensor};

/// Weights per block (both Q4_1 and Q8_1).
pub const BLOCK: usize = 32;

/// One Q4_1 block exactly as GGUF stores it: f16 scale, f16 minimum, 32 nibbles
/// (byte `j` holds weight `j` in its low nibble and weight `j + 16` in its high one).
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C)]
pub struct BlockQ4_1 {
    d: u16,
    m: u16,
    qs: [u8; 16],
}

impl BlockQ4_1 {
    /// The block's scale `d` and minimum `m` as f32 (exact).
    pub fn scale_and_min(&self) -> (f32, f32) {
        (f16_to_f32(self.d), f16_to_f32(self.m))
    }

    /// The 16 packed bytes: weight `j` in byte `j`'s low nibble, weight `j + 16` in its high one.
    pub fn packed(&self) -> &[u8; 16] {
        &self.qs
    }
}

/// One row's activations as Q8_1 blocks.
struct RowQ8_1 {
    d: Vec<f32>,
    s: Vec<f32>,
    qs: Vec<i8>,
}

/// A `(out, in)` Q4_1 weight matrix kept in the file's block layout.
#[derive(Clone, Debug)]
pub struct Q41Matrix {
    blocks: Vec<BlockQ4_1>,
    out_dim: usize,
    in_dim: usize,
}

impl Q41Matrix {
    /// From the raw GGUF bytes of a `(out, in)` Q4_1 tensor; `in` must be a multiple of 32.
    pub fn from_gguf_bytes(bytes: &[u8], out_dim: usize, in_dim: usize) -> Result<Self> {
        let per_row = in_dim / BLOCK;
        if !in_dim.is_multiple_of(BLOCK) || bytes.len() != out_dim * per_row * 20 {
            candle_core::bail!(
                "Q4_1 tensor ({out_dim}, {in_dim}) needs {} bytes, has {}",
                out_dim * per_row * 20,
                bytes.len()
            );
        }
        let blocks = bytes
            .chunks_exact(20)
            .map(|c| BlockQ4_1 {
                d: u16::from_le_bytes([c[0], c[1]]),
                m: u16::from_le_bytes([c[2], c[3]]),
                qs: c[4..20].try_into().expect("16 bytes"),
            })
            .collect();
        Ok(Self {
            blocks,
            out_dim,
            in_dim,
        })
    }

    /// The blocks, `in / 32` per output row, rows in order.
    pub fn blocks(&self) -> &[BlockQ4_1] {
        &self.blocks
    }

    /// `(out, in)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.out_dim, self.in_dim)
    }

    /// The weights as f32 `(out, in)`, for tests and for checking a load.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut w = Vec::with_capacity(self.out_dim * self.in_dim);
        for b in &self.blocks {
            let (d, m) = (f16_to_f32(b.d), f16_to_f32(b.m));
            let q = nibbles(b);
            w.extend(q.iter().map(|&q| d * q as f32 + m));
        }
        w
    }

    /// `x (rows, in) -> (rows, out)`, `x` f32 on the CPU.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (rows, in_dim) = x.dims2()?;
        if in_dim != self.in_dim {
            candle_core::bail!(
                "Q4_1 matmul: input has {in_dim} features, weight {}",
                self.in_dim
            );
        }
        let xs: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let acts: Vec<RowQ8_1> = xs.chunks_exact(in_dim).map(quantize_row_q8_1).collect();
        let per_row = self.in_dim / BLOCK;
        // Output features in parallel on candle's barrier pool, whose caller works too (a rayon
        // call from a non-pool thread sleeps on a futex until the pool is done: 211 times a token
        // at batch 1). Within one output, every row reuses the weight blocks while in cache.
        let mut y = vec![0f32; rows * self.out_dim];
        let out = SharedOut(y.as_mut_ptr());
        candle_core::utils::barrier_pool().execute_chunked(self.out_dim, |range| {
            for o in range {
                let w = &self.blocks[o * per_row..(o + 1) * per_row];
                for (r, a) in acts.iter().enumerate() {
                    // SAFETY: each output index `o` is handed to exactly one call, so the
                    // writes are disjoint, and `y` outlives the pool call.
                    unsafe { out.write(r * self.out_dim + o, dot(w, a)) };
                }
            }
        });
        Tensor::from_vec(y, (rows, self.out_dim), &Device::Cpu)
    }
}

/// The output buffer shared by the pool's threads, each writing its own indices.
struct SharedOut(*mut f32);
// SAFETY: used only for disjoint writes within one pool call (see `forward`).
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// # Safety
    /// `i` is in bounds and no other thread touches it during the call.
    unsafe fn write(&self, i: usize, v: f32) {
        unsafe { *self.0.add(i) = v };
    }
}

/// The 32 4-bit values of a block, in weight order.
fn nibbles(b: &BlockQ4_1) -> [u8; BLOCK] {
    let mut q = [0u8; BLOCK];
    for j in 0..16 {
        q[j] = b.qs[j] & 0x0F;
        q[j + 16] = b.qs[j] >> 4;
    }
    q
}

/// llama.cpp's `quantize_row_q8_1`: per block `d = amax / 127`, `q = round(a / d)`, `s = d sum q`.
fn quantize_row_q8_1(x: &[f32]) -> RowQ8_1 {
    let n = x.len() / BLOCK;
    let mut row = RowQ8_1 {
        d: Vec::with_capacity(n),
        s: Vec::with_capacity(n),
        qs: Vec::with_capacity(x.len()),
    };
    for block in x.chunks_exact(BLOCK) {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for v in block {
            let q = (v * inv).round() as i8;
            sum += q as i32;
            row.qs.push(q);
        }
        row.d.push(d);
        row.s.push(d * sum as f32);
    }
    row
}

/// One output's dot product with one quantized activation row.
fn dot(w: &[BlockQ4_1], a: &RowQ8_1) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if avx2_fma_f16c() {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { dot_avx2(w, a) };
        }
    }
    dot_scalar(w, a)
}

fn dot_scalar(w: &[BlockQ4_1], a: &RowQ8_1) -> f32 {
    let mut total = 0f32;
    for (b, blk) in w.iter().enumerate() {
        let q = nibbles(blk);
        let qa = &a.qs[b * BLOCK..(b + 1) * BLOCK];
        let sum: i32 = q.iter().zip(qa).map(|(&w, &a)| w as i32 * a as i32).sum();
        total += f16_to_f32(blk.d) * a.d[b] * sum as f32 + f16_to_f32(blk.m) * a.s[b];
    }
    total
}

#[cfg(target_arch = "x86_64")]
fn avx2_fma_f16c() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    })
}

/// llama.cpp's AVX2 `ggml_vec_dot_q4_1_q8_1`: unpack 32 nibbles to bytes, multiply-add them with
/// the signed activations into 8 i32 lanes, scale by `d_w d_a` into an f32 accumulator.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_avx2(w: &[BlockQ4_1], a: &RowQ8_1) -> f32 {
    use std::arch::x86_64::*;
    let low_nibbles = _mm_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let mut acc = _mm256_setzero_ps();
    let mut min_terms = 0f32;
    for (b, blk) in w.iter().enumerate() {
        let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(
            (blk.d as u32 | (blk.m as u32) << 16) as i32,
        ));
        let d_w = _mm_cvtss_f32(dm);
        let m_w = _mm_cvtss_f32(_mm_shuffle_ps::<1>(dm, dm));
        let raw = _mm_loadu_si128(blk.qs.as_ptr() as *const __m128i);
        let lo = _mm_and_si128(raw, low_nibbles);
        let hi = _mm_and_si128(_mm_srli_epi16::<4>(raw), low_nibbles);
        let qw = _mm256_set_m128i(hi, lo);
        let qa = _mm256_loadu_si256(a.qs.as_ptr().add(b * BLOCK) as *const __m256i);
        let pairs = _mm256_maddubs_epi16(qw, qa);
        let quads = _mm256_madd_epi16(pairs, ones);
        let scale = _mm256_set1_ps(d_w * a.d[b]);
        acc = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(quads), acc);
        min_terms += m_w * a.s[b];
    }
    let half = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc));
    let half = _mm_add_ps(half, _mm_movehl_ps(half, half));
    let half = _mm_add_ss(half, _mm_shuffle_ps::<1>(half, half));
    _mm_cvtss_f32(half) + min_terms
}

/// IEEE half to f32 (exact; subnormals included).
fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1F) as u32;
    let frac = (h & 0x3FF) as u32;
    let bits = match (exp, frac) {
        (0, 0) => sign,
        (0, f) => {
            // Subnormal: value = f * 2^-24.
            let v = f as f32 * (1.0 / 16_777_216.0);
            return if sign != 0 { -v } else { v };
        }
        (0x1F, f) => sign | 0x7F80_0000 | (f << 13),
        (e, f) => sign | ((e + 112) << 23) | (f << 13),
    };
    f32::from_bits(bits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// A random Q4_1 matrix as GGUF bytes.
    fn random_bytes(out_dim: usize, in_dim: usize, seed: u64) -> Vec<u8> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut bytes = Vec::new();
        for _ in 0..out_dim * in_dim / BLOCK {
            let d = half_bits(rng.gen_range(0.001f32..0.05));
            let m = half_bits(rng.gen_range(-0.4f32..0.0));
            bytes.extend_from_slice(&d.to_le_bytes());
            bytes.extend_from_slice(&m.to_le_bytes());
            bytes.extend((0..16).map(|_| rng.gen::<u8>()));
        }
        bytes
    }

    /// f32 to half bits for normal values in the tests' range (truncating the mantissa).
    fn half_bits(v: f32) -> u16 {
        let b = v.to_bits();
        let sign = ((b >> 16) & 0x8000) as u16;
        let exp = ((b >> 23) & 0xFF) as i32 - 127 + 15;
        assert!((1..31).contains(&exp));
        sign | ((exp as u16) << 10) | ((b >> 13) & 0x3FF) as u16
    }

    #[test]
    fn half_conversion_matches_known_values() {
        assert_eq!(f16_to_f32(0x3C00), 1.0);
        assert_eq!(f16_to_f32(0xC000), -2.0);
        assert_eq!(f16_to_f32(0x3555), 0.333_251_95);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x7BFF), 65504.0);
        assert!(f16_to_f32(0x7C00).is_infinite());
        // The test helper `half_bits` round-trips values a half holds exactly, and truncates
        // the rest toward zero (0.0375 -> 0x28CC, Python's struct 'e' rounds it to 0x28CD).
        for v in [1.0f32, -1.5, 0.09375, 2f32.powi(-14), 65504.0] {
            assert_eq!(f16_to_f32(half_bits(v)), v);
        }
        assert_eq!(half_bits(0.0375), 0x28CC);
        assert_eq!(f16_to_f32(0x28CC), 0.037_475_586);
    }

    #[test]
    fn a_hand_block_dequantizes_and_dots_as_written() {
        // d = 0.5, m = -1: weights 0.5 q - 1 with q = j % 16 for j < 16 and 15 - (j - 16) after.
        let mut qs = [0u8; 16];
        for (j, q) in qs.iter_mut().enumerate() {
            *q = (j as u8) | ((15 - j as u8) << 4);
        }
        let blk = BlockQ4_1 {
            d: 0x3800,
            m: 0xBC00,
            qs,
        };
        let m = Q41Matrix {
            blocks: vec![blk],
            out_dim: 1,
            in_dim: 32,
        };
        let w = m.dequantize();
        assert_eq!(w[0], -1.0);
        assert_eq!(w[15], 6.5);
        assert_eq!(w[16], 6.5);
        assert_eq!(w[31], -1.0);
        // Activations that Q8_1 represents exactly: integers with amax 127, so d = 1.
        let mut x: Vec<f32> = (0..32).map(|i| i as f32 - 16.0).collect();
        x[0] = -127.0;
        let want: f32 = w.iter().zip(&x).map(|(w, x)| w * x).sum();
        let y = m
            .forward(&Tensor::from_vec(x, (1, 32), &Device::Cpu).unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(y[0], want);
    }

    #[test]
    fn simd_and_scalar_dots_agree_and_track_the_f32_product() {
        let (out_dim, in_dim, rows) = (67, 256, 3);
        let m =
            Q41Matrix::from_gguf_bytes(&random_bytes(out_dim, in_dim, 7), out_dim, in_dim).unwrap();
        let x = crate::testing::random_tensor(&[rows, in_dim], 3, 2.0);
        let y = m.forward(&x).unwrap().to_vec2::<f32>().unwrap();
        let w = Tensor::from_vec(m.dequantize(), (out_dim, in_dim), &Device::Cpu).unwrap();
        let exact = x.matmul(&w.t().unwrap()).unwrap().to_vec2::<f32>().unwrap();
        let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        for r in 0..rows {
            let a = quantize_row_q8_1(&xs[r * in_dim..(r + 1) * in_dim]);
            let scale = exact[r].iter().fold(0f32, |s, v| s.max(v.abs()));
            for o in 0..out_dim {
                let blocks = &m.blocks[o * in_dim / BLOCK..(o + 1) * in_dim / BLOCK];
                let scalar = dot_scalar(blocks, &a);
                assert!(
                    (y[r][o] - scalar).abs() <= 1e-5 * scale,
                    "row {r} out {o}: {} vs scalar {scalar}",
                    y[r][o]
                );
                // 8-bit activations: within a percent of the output scale.
                assert!(
                    (y[r][o] - exact[r][o]).abs() <= 0.01 * scale,
                    "row {r} out {o}: {} vs f32 {}",
                    y[r][o],
                    exact[r][o]
                );
            }
        }
    }

    #[test]
    fn a_wrong_size_is_an_error() {
        assert!(Q41Matrix::from_gguf_bytes(&[0u8; 39], 2, 32).is_err());
        assert!(Q41Matrix::from_gguf_bytes(&[0u8; 40], 2, 33).is_err());
        assert!(Q41Matrix::from_gguf_bytes(&[0u8; 40], 2, 32).is_ok());
    }
}
