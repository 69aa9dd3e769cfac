//! A weight matrix in the storage format chosen at load ([`DType`]), packed for its kernels: the
//! one type the model's layers hold, whatever the format.

use half::{bf16, f16};

use super::huge_buf::HugeBuf;
use super::kernels::Isa;
use super::packed::{self, Epilogue, RowVisit, Visit};
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

    /// As [`Matrix::pack`], from a `(k, n)` matrix stored one input per row (transformers'
    /// Conv1D layout), without a transposed copy.
    pub fn pack_cols(cols: &[f32], n: usize, k: usize, dtype: DType) -> Matrix {
        let data = match dtype {
            DType::F32 => Data::F32(packed::pack_cols(cols, n, k)),
            DType::F16 => Data::F16(packed::pack_cols(cols, n, k)),
            DType::Bf16 => Data::Bf16(packed::pack_cols(cols, n, k)),
            DType::Q8 => Data::Q8(Q8::pack_cols(cols, n, k)),
        };
        Matrix { data, n, k }
    }

    /// From ggml q8_0 blocks of a row-major `(n, k)` matrix, without quantizing again.
    pub fn from_q8_0(blocks: &[u8], n: usize, k: usize) -> Matrix {
        Matrix {
            data: Data::Q8(Q8::from_q8_0(blocks, n, k)),
            n,
            k,
        }
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
        self.matmul_with(Isa::detect(), x, Epilogue::bias(bias), out)
    }

    /// `out (m, n) = epi(x (m, k) · Wᵀ)`: bias, then activation, as the outputs are stored.
    pub fn matmul_with(&self, isa: Isa, x: &[f32], epi: Epilogue, out: &mut [f32]) {
        let (k, n) = (self.k, self.n);
        match &self.data {
            Data::F32(w) => packed::matmul_with(isa, x, w, epi, k, n, out),
            Data::F16(w) => packed::matmul_with(isa, x, w, epi, k, n, out),
            Data::Bf16(w) => packed::matmul_with(isa, x, w, epi, k, n, out),
            Data::Q8(w) => w.matmul_with(isa, x, epi, out),
        }
    }
    /// `visit(panel, row, acc)` with each row's 32 outputs of each panel of `x (m, k) · Wᵀ`, no
    /// bias (outputs `32 · panel ..`, the last panel's columns past `n` padding): the values
    /// [`Matrix::matmul_with`] stores for many rows, bit for bit, without storing them.
    pub fn matmul_visit(&self, isa: Isa, x: &[f32], visit: &Visit) {
        let (k, n) = (self.k, self.n);
        match &self.data {
            Data::F32(w) => packed::matmul_visit(isa, x, w, k, n, visit),
            Data::F16(w) => packed::matmul_visit(isa, x, w, k, n, visit),
            Data::Bf16(w) => packed::matmul_visit(isa, x, w, k, n, visit),
            Data::Q8(w) => w.matmul_visit(isa, x, visit),
        }
    }

    /// `visit(row, acc)` with each row's 32 outputs of one panel, `panel(row)` (outputs
    /// `32 · panel(row) ..`), no bias: what [`Matrix::matmul_visit`] hands over for that
    /// (panel, row), bit for bit, at the cost of one panel per row (scoring's ranks need each
    /// target's logit before the whole product runs).
    pub fn visit_row_panels(
        &self,
        isa: Isa,
        x: &[f32],
        panel: &(dyn Fn(usize) -> usize + Sync),
        visit: &RowVisit,
    ) {
        let (k, n) = (self.k, self.n);
        match &self.data {
            Data::F32(w) => packed::visit_row_panels(isa, x, w, k, n, panel, visit),
            Data::F16(w) => packed::visit_row_panels(isa, x, w, k, n, panel, visit),
            Data::Bf16(w) => packed::visit_row_panels(isa, x, w, k, n, panel, visit),
            Data::Q8(w) => w.visit_row_panels(isa, x, panel, visit),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{kernels, test_data as data};
    use super::*;
    use crate::config::Activation;

    /// The fused epilogue gives the bits of the product followed by the activation, in every
    /// format, on every instruction set, decoding one row and a batch.
    #[test]
    fn a_fused_activation_equals_the_activation_after_the_product() {
        let (k, n) = (96, 330);
        let (w, bias) = (data(n * k, 1), data(n, 2));
        for dtype in DType::ALL {
            let mat = Matrix::pack(&w, n, k, dtype);
            for m in [1, 5] {
                let x: Vec<f32> = data(m * k, 3).iter().map(|v| v * 4.0).collect();
                for isa in Isa::available() {
                    for act in [Activation::GeluNew, Activation::Relu] {
                        let mut want = vec![0.0; m * n];
                        mat.matmul_with(isa, &x, Epilogue::bias(Some(&bias)), &mut want);
                        kernels::activation(act, &mut want);
                        let mut got = vec![f32::NAN; m * n];
                        let epi = Epilogue {
                            bias: Some(&bias),
                            act: Some(act),
                        };
                        mat.matmul_with(isa, &x, epi, &mut got);
                        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        assert_eq!(bits(&got), bits(&want), "{dtype:?} {isa:?} m {m} {act:?}");
                    }
                }
            }
        }
    }

    /// A visited product hands over exactly the accumulators a stored one stores (no bias), in
    /// every format, on every instruction set, each (panel, row) once.
    #[test]
    fn a_visited_product_sees_the_stored_outputs() {
        let (k, n) = (70, 100);
        let w = data(n * k, 5);
        for dtype in DType::ALL {
            let mat = Matrix::pack(&w, n, k, dtype);
            for m in [2, 13] {
                let x = data(m * k, 6);
                for isa in Isa::available() {
                    let mut want = vec![0.0; m * n];
                    mat.matmul_with(isa, &x, Epilogue::default(), &mut want);
                    let seen = std::sync::Mutex::new(vec![f32::NAN; m * n]);
                    let count = std::sync::atomic::AtomicUsize::new(0);
                    mat.matmul_visit(isa, &x, &|p, i, acc| {
                        count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let mut s = seen.lock().unwrap();
                        for (c, a) in acc.iter().enumerate().take(n.saturating_sub(32 * p)) {
                            s[i * n + 32 * p + c] = a + 0.0;
                        }
                    });
                    assert_eq!(count.into_inner(), m * n.div_ceil(32), "{dtype:?} {isa:?}");
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    let seen = seen.into_inner().unwrap();
                    assert_eq!(bits(&seen), bits(&want), "{dtype:?} {isa:?} m {m}");
                }
            }
        }
    }

    /// A row's own panel computed alone gives the bits the whole product hands over for that
    /// (panel, row), in every format, on every instruction set, whatever the product's row count
    /// (one row, blocks, widened 16-bit panels), the short last panel included.
    #[test]
    fn a_rows_own_panel_equals_the_whole_products() {
        let (k, n) = (70, 100usize);
        let panels = n.div_ceil(32);
        let w = data(n * k, 7);
        for dtype in DType::ALL {
            let mat = Matrix::pack(&w, n, k, dtype);
            for m in [1, 2, 13, 40] {
                let x: Vec<f32> = data(m * k, 8).iter().map(|v| v * 3.0).collect();
                for isa in Isa::available() {
                    let all = std::sync::Mutex::new(vec![[f32::NAN; 32]; m * panels]);
                    mat.matmul_visit(isa, &x, &|p, i, acc| {
                        all.lock().unwrap()[i * panels + p] = *acc;
                    });
                    let all = all.into_inner().unwrap();
                    let panel = |i: usize| (i * 3 + 1) % panels;
                    let seen = std::sync::Mutex::new(vec![0; m]);
                    mat.visit_row_panels(isa, &x, &panel, &|i, acc| {
                        seen.lock().unwrap()[i] += 1;
                        let want = all[i * panels + panel(i)];
                        assert_eq!(
                            acc.map(f32::to_bits),
                            want.map(f32::to_bits),
                            "{dtype:?} {isa:?} m {m} row {i}"
                        );
                    });
                    assert_eq!(seen.into_inner().unwrap(), vec![1; m]);
                }
            }
        }
    }

    /// Packing a Conv1D `(k, n)` matrix gives the very panels of packing its transpose, in every
    /// format (ragged last panel and last q8 block included).
    #[test]
    fn packing_columns_equals_packing_the_transposed_rows() {
        let (k, n) = (70, 45);
        let cols = data(k * n, 4);
        let mut rows = vec![0.0; n * k];
        for i in 0..k {
            for j in 0..n {
                rows[j * k + i] = cols[i * n + j];
            }
        }
        for dtype in DType::ALL {
            let (a, b) = (
                Matrix::pack(&rows, n, k, dtype),
                Matrix::pack_cols(&cols, n, k, dtype),
            );
            let raw = |m: &Matrix| -> Vec<u8> {
                match &m.data {
                    Data::F32(w) => w.iter().flat_map(|v| v.to_le_bytes()).collect(),
                    Data::F16(w) => w.iter().flat_map(|v| v.to_le_bytes()).collect(),
                    Data::Bf16(w) => w.iter().flat_map(|v| v.to_le_bytes()).collect(),
                    Data::Q8(w) => w.raw().to_vec(),
                }
            };
            assert_eq!(raw(&a), raw(&b), "{dtype:?}");
        }
    }
}
