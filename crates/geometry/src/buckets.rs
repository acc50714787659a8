//! Batching prompts of different lengths: left padding makes every row of a forward as long as
//! its longest prompt, so prompts are sorted by length and split where the padding saved is
//! worth one more forward (which recomputes the template's shared prefix).

/// Tokens every prompt starts with.
pub fn common_prefix_len(prompts: &[Vec<u32>]) -> usize {
    let Some(first) = prompts.first() else {
        return 0;
    };
    (0..first.len())
        .take_while(|&i| prompts.iter().all(|p| p.get(i) == Some(&first[i])))
        .count()
}

/// A forward's fixed cost (a few hundred small ops) in tokens of matmul work, roughly, for the
/// CPU models this runs on.
pub const FORWARD_OVERHEAD_TOKENS: usize = 8;

/// Split prompts of ascending lengths `lens` into consecutive buckets of at most `batch` that
/// minimise the tokens computed: each bucket pads to its longest prompt and computes the
/// `shared` prefix once more, plus [`FORWARD_OVERHEAD_TOKENS`] (dynamic programming over the
/// split points).
pub fn length_buckets(lens: &[usize], shared: usize, batch: usize) -> Vec<std::ops::Range<usize>> {
    let n = lens.len();
    // cost[j]: fewest tokens for the first j prompts; from[j]: where the last bucket starts.
    let mut cost = vec![usize::MAX; n + 1];
    let mut from = vec![0; n + 1];
    cost[0] = 0;
    for j in 1..=n {
        for i in j.saturating_sub(batch)..j {
            let padded = (j - i) * (lens[j - 1] - shared.min(lens[j - 1]));
            let c = cost[i] + FORWARD_OVERHEAD_TOKENS + shared + padded;
            if c < cost[j] {
                (cost[j], from[j]) = (c, i);
            }
        }
    }
    let mut out = Vec::new();
    let mut j = n;
    while j > 0 {
        out.push(from[j]..j);
        j = from[j];
    }
    out.reverse();
    out
}

/// Prompt indices sorted by length, and the buckets of that order to run together.
pub fn by_length(prompts: &[Vec<u32>], batch: usize) -> (Vec<usize>, Vec<std::ops::Range<usize>>) {
    let mut order: Vec<usize> = (0..prompts.len()).collect();
    order.sort_by_key(|&i| prompts[i].len());
    let lens: Vec<usize> = order.iter().map(|&i| prompts[i].len()).collect();
    let buckets = length_buckets(&lens, common_prefix_len(prompts), batch.max(1));
    (order, buckets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_buckets_trade_padding_against_recomputing_the_prefix() {
        // No shared prefix, 8 tokens per forward: one bucket costs 8 + 4 * 9 = 44, [2, 2] and
        // [5, 9] 12 + 26 = 38, three buckets 42.
        assert_eq!(length_buckets(&[2, 2, 5, 9], 0, 8), vec![0..2, 2..4]);
        // A 10-token prefix costs more than the padding it would save: one bucket (26 vs 32).
        assert_eq!(length_buckets(&[12, 12, 13, 14], 10, 8), vec![0..4]);
        // Here splitting saves 3 * 33 padded tokens for 18 more tokens of prefix and overhead.
        assert_eq!(length_buckets(&[12, 12, 12, 45], 10, 8), vec![0..3, 3..4]);
        // At most `batch` per bucket, and every prompt in exactly one.
        let lens: Vec<usize> = (0..10).map(|i| 20 + i / 3).collect();
        let b = length_buckets(&lens, 24, 4);
        assert!(b.iter().all(|r| r.len() <= 4 && !r.is_empty()));
        assert_eq!(b.iter().map(|r| r.len()).sum::<usize>(), 10);
        assert!(b.windows(2).all(|w| w[0].end == w[1].start) && b[0].start == 0);
        assert!(length_buckets(&[], 0, 4).is_empty());
    }

    #[test]
    fn common_prefix_is_what_every_prompt_starts_with() {
        assert_eq!(
            common_prefix_len(&[vec![1, 2, 3], vec![1, 2, 4], vec![1, 2]]),
            2
        );
        assert_eq!(common_prefix_len(&[vec![1, 2], vec![3]]), 0);
        assert_eq!(common_prefix_len(&[vec![5, 6]]), 2);
        assert_eq!(common_prefix_len(&[]), 0);
    }
}
