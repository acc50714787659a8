//! The small linear algebra geometry needs, in f64: effective rank (Roy and Vetterli 2007) and
//! principal angles between subspaces (Bjorck and Golub 1973), on nalgebra's SVD.
use nalgebra::DMatrix;

/// Singular values of a row matrix (`rows` vectors of equal length), descending.
pub fn singular_values(rows: &[Vec<f64>]) -> Vec<f64> {
    if rows.is_empty() {
        return Vec::new();
    }
    let m = DMatrix::from_fn(rows.len(), rows[0].len(), |i, j| rows[i][j]);
    let mut s: Vec<f64> = m.singular_values().iter().copied().collect();
    s.sort_by(|a, b| b.total_cmp(a));
    s
}

/// `erank(M) = exp(-sum p_k log p_k)`, `p_k = sigma_k / sum sigma` (zero singular values skipped).
pub fn effective_rank(rows: &[Vec<f64>]) -> f64 {
    let s = singular_values(rows);
    let total: f64 = s.iter().sum();
    if total <= 0.0 {
        return 0.0;
    }
    let h: f64 = s
        .iter()
        .filter(|&&x| x > 0.0)
        .map(|&x| x / total)
        .map(|p| -p * p.ln())
        .sum();
    h.exp()
}

/// Orthonormal basis (columns) of the span of `rows`, by SVD (rank-revealing).
fn basis(rows: &[Vec<f64>]) -> DMatrix<f64> {
    let m = DMatrix::from_fn(rows[0].len(), rows.len(), |i, j| rows[j][i]); // columns = vectors
    let svd = m.svd(true, false);
    let u = svd.u.expect("u requested");
    let tol = svd.singular_values.max() * 1e-10;
    let keep: Vec<usize> = (0..svd.singular_values.len())
        .filter(|&i| svd.singular_values[i] > tol)
        .collect();
    DMatrix::from_fn(u.nrows(), keep.len(), |i, j| u[(i, keep[j])])
}

/// The top-`k` right singular vectors of a row matrix (the dominant `k`-dimensional subspace).
pub fn top_right_singular_vectors(rows: &[Vec<f64>], k: usize) -> Vec<Vec<f64>> {
    if rows.is_empty() {
        return Vec::new();
    }
    let m = DMatrix::from_fn(rows.len(), rows[0].len(), |i, j| rows[i][j]);
    let svd = m.svd(false, true);
    let vt = svd.v_t.expect("v_t requested");
    let mut order: Vec<usize> = (0..svd.singular_values.len()).collect();
    order.sort_by(|&a, &b| svd.singular_values[b].total_cmp(&svd.singular_values[a]));
    order
        .iter()
        .take(k)
        .filter(|&&i| svd.singular_values[i] > 0.0)
        .map(|&i| vt.row(i).iter().copied().collect())
        .collect()
}

/// Principal angles (radians, ascending) between the spans of two sets of vectors.
pub fn principal_angles(a: &[Vec<f64>], b: &[Vec<f64>]) -> Vec<f64> {
    if a.is_empty() || b.is_empty() {
        return Vec::new();
    }
    let (qa, qb) = (basis(a), basis(b));
    let c = qa.transpose() * qb;
    let mut cos: Vec<f64> = c
        .singular_values()
        .iter()
        .map(|s| s.clamp(-1.0, 1.0))
        .collect();
    cos.sort_by(|x, y| y.total_cmp(x));
    cos.into_iter().map(f64::acos).collect()
}

/// Cosine similarity.
pub fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    let nb = b.iter().map(|x| x * x).sum::<f64>().sqrt();
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        dot / (na * nb)
    }
}

/// Euclidean norm.
pub fn norm(a: &[f64]) -> f64 {
    a.iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// `v / |v|`.
pub fn normalize(v: &[f64]) -> Vec<f64> {
    let n = norm(v);
    if n == 0.0 {
        v.to_vec()
    } else {
        v.iter().map(|x| x / n).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effective_rank_of_known_spectra() {
        // Diagonal singular values (1, 1, 1, 0): erank = 3.
        let m = vec![
            vec![1., 0., 0., 0.],
            vec![0., 1., 0., 0.],
            vec![0., 0., 1., 0.],
            vec![0.; 4],
        ];
        assert!((effective_rank(&m) - 3.0).abs() < 1e-9);
        // Rank one: erank = 1.
        let m = vec![vec![1., 2., 3.], vec![2., 4., 6.], vec![-1., -2., -3.]];
        assert!((effective_rank(&m) - 1.0).abs() < 1e-6);
        // Singular values (3, 1): p = (0.75, 0.25), erank = exp(0.5623) = 1.7548.
        let m = vec![vec![3., 0.], vec![0., 1.]];
        assert!((effective_rank(&m) - 1.754765).abs() < 1e-5);
    }

    #[test]
    fn principal_angles_by_hand() {
        // span{e1, e2} vs span{e1, (e2 + e3)/sqrt 2}: angles 0 and 45 degrees.
        let a = vec![vec![1., 0., 0.], vec![0., 1., 0.]];
        let b = vec![vec![1., 0., 0.], vec![0., 1., 1.]];
        let ang = principal_angles(&a, &b);
        assert!(
            ang[0].abs() < 1e-7 && (ang[1] - std::f64::consts::FRAC_PI_4).abs() < 1e-7,
            "{ang:?}"
        );
        // Orthogonal lines: 90 degrees; identical spans with other bases: 0.
        assert!(
            (principal_angles(&[vec![1., 0.]], &[vec![0., 3.]])[0] - std::f64::consts::FRAC_PI_2)
                .abs()
                < 1e-9
        );
        let c = vec![vec![1., 1., 0.], vec![1., -1., 0.]];
        assert!(principal_angles(&a, &c).iter().all(|x| x.abs() < 1e-6));
    }

    #[test]
    fn cosine_basics() {
        assert!((cosine(&[1., 0.], &[1., 1.]) - 0.5f64.sqrt()).abs() < 1e-12);
        assert_eq!(cosine(&[0., 0.], &[1., 1.]), 0.0);
    }
}

#[cfg(test)]
mod subspace_tests {
    use super::*;

    #[test]
    fn top_singular_vectors_span_the_dominant_plane() {
        // Rows mostly in span{e1, e2}, a little e3.
        let rows = vec![
            vec![5.0, 0.0, 0.01],
            vec![0.0, 3.0, 0.0],
            vec![4.0, 4.0, 0.02],
        ];
        let top = top_right_singular_vectors(&rows, 2);
        let ang = principal_angles(&top, &[vec![1., 0., 0.], vec![0., 1., 0.]]);
        assert!(ang.iter().all(|a| a.abs() < 1e-2), "{ang:?}");
        assert_eq!(top_right_singular_vectors(&rows, 1).len(), 1);
    }
}
