//! `x · wᵀ` for the few rows of a decode step on the CPU.
//!
//! The general CPU matmul packs the weight matrix before multiplying, which for a handful of
//! rows costs two to three times the memory traffic of reading the weights once: a decode step
//! of two sequences took 3.6 times one of a single sequence. Here each weight row is read once
//! and dotted with every input row, so a small batch costs about what one row does. Every batch
//! of up to [`SMALL_ROWS`] rows goes through the same arithmetic, so a sequence's logits do not
//! depend on what it was batched with.

use candle_core::{CpuStorage, DType, Device, Result, Storage, Tensor};
use rayon::prelude::*;

/// Rows up to which the row-streaming kernel is used; above, the packed matmul wins.
pub const SMALL_ROWS: usize = 4;

/// Weight rows per parallel task: large enough to amortise scheduling, small enough to share
/// the work between threads.
const ROWS_PER_TASK: usize = 256;

/// `x` (m, k) times `w` (n, k) transposed: (m, n).
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (m, k) = x.dims2()?;
    let cpu_f32 =
        matches!(x.device(), Device::Cpu) && x.dtype() == DType::F32 && w.dtype() == DType::F32;
    if !cpu_f32 || m > SMALL_ROWS || !w.is_contiguous() {
        return x.matmul(&w.t()?);
    }
    let (n, wk) = w.dims2()?;
    if wk != k {
        return x.matmul(&w.t()?);
    }
    let x = x.contiguous()?;
    let out = {
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let (Storage::Cpu(CpuStorage::F32(xv)), Storage::Cpu(CpuStorage::F32(wv))) = (&*xs, &*ws)
        else {
            unreachable!("checked: both on the CPU in f32");
        };
        let (Some((x0, x1)), Some((w0, w1))) = (xl.contiguous_offsets(), wl.contiguous_offsets())
        else {
            unreachable!("checked: both contiguous");
        };
        rows_times_weights(&xv[x0..x1], &wv[w0..w1], m, k, n)
    };
    // Computed weight row by weight row: (n, m), turned into (m, n).
    Tensor::from_vec(out, (n, m), &Device::Cpu)?
        .t()?
        .contiguous()
}

/// out[j * m + i] = x[i] · w[j].
fn rows_times_weights(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut out = vec![0f32; n * m];
    let task = |(chunk, out): (usize, &mut [f32])| {
        let first = chunk * ROWS_PER_TASK;
        for (r, o) in out.chunks_exact_mut(m).enumerate() {
            let row = &w[(first + r) * k..(first + r + 1) * k];
            for (i, o) in o.iter_mut().enumerate() {
                *o = dot(&x[i * k..(i + 1) * k], row);
            }
        }
    };
    if candle_core::utils::get_num_threads() > 1 {
        out.par_chunks_mut(ROWS_PER_TASK * m)
            .enumerate()
            .for_each(task);
    } else {
        out.chunks_mut(ROWS_PER_TASK * m).enumerate().for_each(task);
    }
    out
}

/// Eight independent partial sums, so that the loop vectorises.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (a8.remainder(), b8.remainder());
    for (x, y) in a8.zip(b8) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_batches_match_the_matmul_and_each_other() {
        let d = Device::Cpu;
        let (k, n) = (100, 700);
        let w = Tensor::randn(0f32, 1.0, (n, k), &d).unwrap();
        let x = Tensor::randn(0f32, 1.0, (SMALL_ROWS + 2, k), &d).unwrap();
        for m in [1, 2, 5, SMALL_ROWS, SMALL_ROWS + 2] {
            let xs = x.narrow(0, 0, m).unwrap();
            let ours = linear(&xs, &w).unwrap();
            assert_eq!(ours.dims(), &[m, n]);
            let reference = xs.matmul(&w.t().unwrap()).unwrap();
            let diff = (ours - &reference)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-3, "m = {m}: {diff}");
        }
        // A row's result does not depend on the rows batched with it.
        let alone = linear(&x.narrow(0, 1, 1).unwrap(), &w).unwrap();
        let batched = linear(&x.narrow(0, 0, 4).unwrap(), &w).unwrap();
        assert_eq!(
            alone.to_vec2::<f32>().unwrap()[0],
            batched.to_vec2::<f32>().unwrap()[1]
        );
    }
}
