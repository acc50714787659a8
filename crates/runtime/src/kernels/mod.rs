//! CPU kernels below the ops: fused ops with written-out backward, streaming kernels for
//! decode-sized products, the Q4_1 block kernel, the optional system OpenBLAS, and the
//! large-block cache under the allocator.
pub mod blas;
pub mod block_cache;
pub(crate) mod few_rows;
pub(crate) mod fused;
pub(crate) mod gemm;
pub mod q4_1;
