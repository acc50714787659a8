//! Bounds check of an untrusted GGUF header before anything is allocated from it. candle's
//! reader trusts the lengths and counts it reads (a string declared 2^60 bytes long is a
//! `vec![0; 2^60]`), so every length, count and tensor size is first checked against the bytes
//! the file actually has and against fixed limits.
use std::io::Read;

/// Largest tensor accepted, in elements (2^34: 16x the largest tensor of a 70B model).
pub const MAX_TENSOR_ELEMENTS: u64 = 1 << 34;
/// Most dimensions a GGUF tensor has.
pub const MAX_DIMS: u32 = 4;
/// Deepest nesting of metadata arrays.
const MAX_ARRAY_DEPTH: usize = 4;

struct Bounded<R: Read> {
    inner: R,
    left: u64,
}

impl<R: Read> Bounded<R> {
    fn bytes(&mut self, n: u64, what: &str) -> Result<(), String> {
        if n > self.left {
            return Err(format!(
                "{what} declares {n} bytes but only {} remain in the file",
                self.left
            ));
        }
        std::io::copy(&mut (&mut self.inner).take(n), &mut std::io::sink())
            .map_err(|e| format!("{what}: {e}"))?;
        self.left -= n;
        Ok(())
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        let mut b = [0u8; 4];
        self.fill(&mut b, what)?;
        Ok(u32::from_le_bytes(b))
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        let mut b = [0u8; 8];
        self.fill(&mut b, what)?;
        Ok(u64::from_le_bytes(b))
    }

    fn fill(&mut self, b: &mut [u8], what: &str) -> Result<(), String> {
        if (b.len() as u64) > self.left {
            return Err(format!("the file ends inside {what}"));
        }
        self.inner
            .read_exact(b)
            .map_err(|_| format!("the file ends inside {what}"))?;
        self.left -= b.len() as u64;
        Ok(())
    }

    fn string(&mut self, what: &str) -> Result<(), String> {
        let n = self.u64(what)?;
        self.bytes(n, what)
    }

    fn value(&mut self, ty: u32, depth: usize, what: &str) -> Result<(), String> {
        match ty {
            0 | 1 | 7 => self.bytes(1, what),
            2 | 3 => self.bytes(2, what),
            4..=6 => self.bytes(4, what),
            10..=12 => self.bytes(8, what),
            8 => self.string(what),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(format!(
                        "{what}: arrays nested deeper than {MAX_ARRAY_DEPTH}"
                    ));
                }
                let item = self.u32(what)?;
                let count = self.u64(what)?;
                // Every item takes at least one byte: a count beyond the file is a lie.
                if count > self.left {
                    return Err(format!(
                        "{what}: array of {count} items but only {} bytes remain",
                        self.left
                    ));
                }
                for _ in 0..count {
                    self.value(item, depth + 1, what)?;
                }
                Ok(())
            }
            other => Err(format!("{what}: unknown metadata value type {other}")),
        }
    }
}

/// Check a GGUF v2/v3 header read from `reader` (positioned at the start of a file of
/// `file_len` bytes). v1 files (32-bit lengths) are left to candle.
pub fn check_header(reader: impl Read, file_len: u64) -> Result<(), String> {
    let mut r = Bounded {
        inner: reader,
        left: file_len,
    };
    let magic = r.u32("the magic number")?;
    if magic.to_le_bytes() != *b"GGUF" {
        return Err("bad magic (expected \"GGUF\")".into());
    }
    let version = r.u32("the version")?;
    if version == 1 {
        return Ok(());
    }
    if !(2..=3).contains(&version) {
        return Err(format!(
            "unsupported GGUF version {version} (2 and 3 are read)"
        ));
    }
    let tensors = r.u64("the tensor count")?;
    let kvs = r.u64("the metadata count")?;
    // A metadata entry takes at least 8 + 4 + 1 bytes and a tensor info 8 + 4 + 8 + 4 + 8.
    if kvs > r.left / 13 {
        return Err(format!(
            "{kvs} metadata entries cannot fit in a {file_len}-byte file"
        ));
    }
    if tensors > r.left / 32 {
        return Err(format!(
            "{tensors} tensors cannot fit in a {file_len}-byte file"
        ));
    }
    for i in 0..kvs {
        let what = format!("metadata entry {i}");
        r.string(&what)?;
        let ty = r.u32(&what)?;
        r.value(ty, 0, &what)?;
    }
    for i in 0..tensors {
        let what = format!("tensor info {i}");
        r.string(&what)?;
        let dims = r.u32(&what)?;
        if dims == 0 || dims > MAX_DIMS {
            return Err(format!(
                "{what}: {dims} dimensions (1 to {MAX_DIMS} allowed)"
            ));
        }
        let mut elems: u64 = 1;
        for _ in 0..dims {
            let d = r.u64(&what)?;
            elems = elems
                .checked_mul(d)
                .filter(|&e| e <= MAX_TENSOR_ELEMENTS)
                .ok_or_else(|| {
                    format!("{what}: more than {MAX_TENSOR_ELEMENTS} elements (2^34); refusing to allocate")
                })?;
        }
        r.u32(&what)?; // dtype: candle checks it
        r.u64(&what)?; // offset: checked against the file size after parsing
    }
    Ok(())
}

/// GGUF bytes by hand, for tests here and in `weights.rs`.
#[cfg(test)]
pub(crate) mod build {
    /// Magic, version 3 and the two counts.
    pub fn header(tensors: u64, kvs: u64) -> Vec<u8> {
        let mut v = b"GGUF".to_vec();
        v.extend(3u32.to_le_bytes());
        v.extend(tensors.to_le_bytes());
        v.extend(kvs.to_le_bytes());
        v
    }

    pub fn string(v: &mut Vec<u8>, s: &str) {
        v.extend((s.len() as u64).to_le_bytes());
        v.extend(s.as_bytes());
    }

    /// A tensor info `t` of `dims`, ggml type `dtype`, at `offset` in the data section.
    pub fn tensor_info(v: &mut Vec<u8>, dims: &[u64], dtype: u32, offset: u64) {
        string(v, "t");
        v.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            v.extend(d.to_le_bytes());
        }
        v.extend(dtype.to_le_bytes());
        v.extend(offset.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::build::{header, string, tensor_info};
    use super::*;

    fn tensor(v: &mut Vec<u8>, dims: &[u64]) {
        tensor_info(v, dims, 0, 0);
    }

    fn check(v: &[u8]) -> Result<(), String> {
        check_header(v, v.len() as u64)
    }

    #[test]
    fn a_sane_header_passes() {
        let mut v = header(1, 2);
        string(&mut v, "general.architecture");
        v.extend(8u32.to_le_bytes());
        string(&mut v, "llama");
        string(&mut v, "tokenizer.ggml.scores");
        v.extend(9u32.to_le_bytes());
        v.extend(6u32.to_le_bytes());
        v.extend(3u64.to_le_bytes());
        v.extend([0u8; 12]);
        tensor(&mut v, &[4, 4]);
        check(&v).unwrap();
    }

    #[test]
    fn absurd_sizes_are_refused_before_allocation() {
        let e = check(&header(0, 1_000_000_000)).unwrap_err();
        assert!(e.contains("metadata entries cannot fit"), "{e}");
        let e = check(&header(1 << 40, 0)).unwrap_err();
        assert!(e.contains("tensors cannot fit"), "{e}");
        let mut v = header(0, 1);
        v.extend((1u64 << 60).to_le_bytes());
        v.extend([0u8; 16]);
        let e = check(&v).unwrap_err();
        assert!(e.contains("declares 1152921504606846976 bytes"), "{e}");
        let mut v = header(1, 0);
        tensor(&mut v, &[1 << 30, 1 << 30]);
        let e = check(&v).unwrap_err();
        assert!(e.contains("refusing to allocate"), "{e}");
        let mut v = header(1, 0);
        tensor(&mut v, &[u64::MAX, 3]);
        assert!(check(&v).unwrap_err().contains("refusing to allocate"));
        let mut v = header(1, 0);
        tensor(&mut v, &[1, 1, 1, 1, 1]);
        assert!(check(&v).unwrap_err().contains("dimensions"));
        let mut v = header(0, 1);
        string(&mut v, "k");
        v.extend(9u32.to_le_bytes());
        v.extend(0u32.to_le_bytes());
        v.extend((1u64 << 50).to_le_bytes());
        assert!(check(&v).unwrap_err().contains("array of"));
        let mut v = header(0, 1);
        string(&mut v, "k");
        v.extend(99u32.to_le_bytes());
        assert!(check(&v)
            .unwrap_err()
            .contains("unknown metadata value type"));
        assert!(check(b"GGUF").unwrap_err().contains("ends inside"));
    }

    #[test]
    fn nested_arrays_are_bounded() {
        let mut v = header(0, 1);
        string(&mut v, "k");
        v.extend(9u32.to_le_bytes());
        for _ in 0..6 {
            v.extend(9u32.to_le_bytes());
            v.extend(1u64.to_le_bytes());
        }
        v.extend([0u8; 64]);
        assert!(check(&v).unwrap_err().contains("nested deeper"));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        for _ in 0..20_000 {
            let mut v = header(rng.gen_range(0..4), rng.gen_range(0..4));
            let n = rng.gen_range(0..200);
            v.extend((0..n).map(|_| rng.gen::<u8>()));
            let _ = check(&v);
        }
    }
}
