//! A weight matrix in the storage format chosen at load ([`DType`]), packed for its kernels: the
//! one type the model's layers hold, whatever the format.

use half::{bf16, f16};

use super::huge_buf::HugeBuf;
use super::kernels::Isa;
use super::packed;
use super::q8::Q8;
use crate::dtype::DType;

enum Data {
    F32(HugeBuf<f32>),
    F16(HugeBuf<f16>),
    Bf16(HugeBuf<bf16>),
    Q8(Q8),
}

/// `n` outputs × `k` inputs.
pub struct Matrix {
    data: Data,
    pub n: usize,
    pub k: usize,
}

impl Matrix {
    /// From a row-major `(n, k)` matrix (one output per row), converted to `dtype`.
    pub fn pack(rows: &[f32], n: usize, k: usize, dtype: DType) -> Matrix {
        let data = match dtype {
            DType::F32 => Data::F32(packed::pack(rows, n, k)),
            DType::F16 => Data::F16(packed::pack(rows, n, k)),
            DType::Bf16 => Data::Bf16(packed::pack(rows, n, k)),
            DType::Q8 => Data::Q8(Q8::pack(rows, n, k)),
        };
        Matrix { data, n, k }
    }

    pub fn dtype(&self) -> DType {
        match self.data {
            Data::F32(_) => DType::F32,
            Data::F16(_) => DType::F16,
            Data::Bf16(_) => DType::Bf16,
            Data::Q8(_) => DType::Q8,
        }
    }

    /// Bytes held (what one product streams).
    pub fn bytes(&self) -> usize {
        match &self.data {
            Data::F32(w) => 4 * w.len(),
            Data::F16(w) => 2 * w.len(),
            Data::Bf16(w) => 2 * w.len(),
            Data::Q8(w) => w.bytes(),
        }
    }

    /// Output `j`'s weights as f32 (an embedding lookup of a tied matrix).
    pub fn row(&self, j: usize, out: &mut [f32]) {
        match &self.data {
            Data::F32(w) => packed::row(w, self.k, j, out),
            Data::F16(w) => packed::row(w, self.k, j, out),
            Data::Bf16(w) => packed::row(w, self.k, j, out),
            Data::Q8(w) => w.row(j, out),
        }
    }

    /// The row-major `(n, k)` matrix as f32 (dequantized).
    pub fn to_rows(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.n * self.k];
        for (j, r) in out.chunks_exact_mut(self.k).enumerate() {
            self.row(j, r);
        }
        out
    }

    /// `out (m, n) = x (m, k) · Wᵀ + bias`.
    pub fn matmul(&self, x: &[f32], bias: Option<&[f32]>, out: &mut [f32]) {
        self.matmul_with(Isa::detect(), x, bias, out)
    }

    pub fn matmul_with(&self, isa: Isa, x: &[f32], bias: Option<&[f32]>, out: &mut [f32]) {
        let (k, n) = (self.k, self.n);
        match &self.data {
            Data::F32(w) => packed::matmul_with(isa, x, w, bias, k, n, out),
            Data::F16(w) => packed::matmul_with(isa, x, w, bias, k, n, out),
            Data::Bf16(w) => packed::matmul_with(isa, x, w, bias, k, n, out),
            Data::Q8(w) => w.matmul_with(isa, x, bias, out),
        }
    }
}
