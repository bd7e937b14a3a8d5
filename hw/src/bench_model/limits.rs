//! The ceilings a step of the model cannot beat on a device, measured in the same process:
//! memory bandwidth from a device-to-device copy, compute rate from a square matmul in the
//! model's dtype. A step's limit is its roofline: the larger of the time to move the bytes it
//! must move and the time to do the FLOPs it must do, at those measured rates.

use super::{BenchError, BenchRow, Phase, synchronize};
use models::runtime::{Device, Tensor, TensorDType};
use models::{DType, ModelSpec};
use std::time::Instant;

/// How the ceilings are measured.
#[derive(Clone, Debug, PartialEq)]
pub struct LimitPlan {
    /// Bytes of the copied buffer: large enough that launch and synchronization vanish.
    pub copy_bytes: usize,
    /// m = n = k of the matmul.
    pub matmul_dim: usize,
    /// Timed regions; the fastest counts.
    pub repeats: usize,
    /// Copies (or matmuls) queued back to back in one timed region.
    pub ops_per_repeat: usize,
}

impl LimitPlan {
    /// 1 GiB and 8192^3 on a GPU; 256 MiB and 1024^3 on the CPU, where larger takes seconds.
    pub fn for_device(device: &Device) -> LimitPlan {
        match device {
            Device::Cpu => LimitPlan {
                copy_bytes: 256 << 20,
                matmul_dim: 1024,
                repeats: 5,
                ops_per_repeat: 1,
            },
            _ => LimitPlan {
                copy_bytes: 1 << 30,
                matmul_dim: 8192,
                repeats: 10,
                ops_per_repeat: 4,
            },
        }
    }

    fn validate(&self) -> Result<(), BenchError> {
        let fields = [
            ("copy bytes", self.copy_bytes),
            ("matmul dim", self.matmul_dim),
            ("limit repeats", self.repeats),
            ("limit ops per repeat", self.ops_per_repeat),
        ];
        match fields.iter().find(|(_, v)| *v == 0) {
            Some((name, _)) => Err(BenchError::Invalid(format!("{name}: must be at least 1"))),
            None => Ok(()),
        }
    }
}

/// A device's measured ceilings.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceRates {
    /// Bytes read plus bytes written per second by a device-to-device copy (a copy of N bytes
    /// counts 2N), the usual measured memory bandwidth: the rate at which memory moves bytes
    /// either way, so a step that only reads W bytes of weights needs at least W / this. That is
    /// the usual memory roofline (bytes read over read bandwidth) with the bandwidth measured
    /// rather than taken from a datasheet. GPU memory reads about as fast as it copies; a
    /// CPU's may read faster than it copies, so there a fraction above 1 can be seen.
    pub copy_bytes_per_s: f64,
    /// 2 m n k / t of the square matmul.
    pub matmul_flop_per_s: f64,
    pub plan: LimitPlan,
    pub matmul_dtype: DType,
}

impl DeviceRates {
    /// Two lines saying what was measured and how.
    pub fn describe(&self) -> String {
        let p = &self.plan;
        format!(
            "copy: {} MiB buffer to buffer, best of {} x {}: {:.1} GB/s read+written\n\
             matmul: {d}x{d}x{d} {}, best of {} x {}: {:.3} TFLOP/s\n",
            p.copy_bytes >> 20,
            p.repeats,
            p.ops_per_repeat,
            self.copy_bytes_per_s / 1e9,
            self.matmul_dtype.name(),
            p.repeats,
            p.ops_per_repeat,
            self.matmul_flop_per_s / 1e12,
            d = p.matmul_dim,
        )
    }
}

/// Fastest of `repeats` timed regions, each `op` then a device synchronization, after one
/// untimed warm-up (kernel loading, library handles, allocator pools).
fn best_of(
    device: &Device,
    repeats: usize,
    mut op: impl FnMut() -> Result<(), BenchError>,
) -> Result<f64, BenchError> {
    op()?;
    synchronize(device)?;
    let mut best = f64::INFINITY;
    for _ in 0..repeats {
        let start = Instant::now();
        op()?;
        synchronize(device)?;
        best = best.min(start.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// Measures copy bandwidth and matmul rate on `device`, the matmul in `dtype`.
pub fn measure(
    device: &Device,
    dtype: TensorDType,
    plan: &LimitPlan,
) -> Result<DeviceRates, BenchError> {
    plan.validate()?;
    let ops = plan.ops_per_repeat;
    let copy_s = copy_s(device, plan)?;
    let matmul_s = {
        let n = plan.matmul_dim;
        // Random operands: zeros would let the GPU run cooler and clock higher than on weights.
        let a = Tensor::randn(0f32, 1f32, (n, n), device)
            .and_then(|t| t.to_dtype(dtype))
            .map_err(rt)?;
        let b = Tensor::randn(0f32, 1f32, (n, n), device)
            .and_then(|t| t.to_dtype(dtype))
            .map_err(rt)?;
        best_of(device, plan.repeats, || {
            for _ in 0..ops {
                a.matmul(&b).map_err(rt)?;
            }
            Ok(())
        })?
    };
    let n = plan.matmul_dim as f64;
    Ok(DeviceRates {
        copy_bytes_per_s: (2 * plan.copy_bytes * ops) as f64 / copy_s,
        matmul_flop_per_s: 2.0 * n * n * n * ops as f64 / matmul_s,
        plan: plan.clone(),
        matmul_dtype: crate::spec_dtype(dtype),
    })
}

/// Fastest region of `plan.ops_per_repeat` copies of `plan.copy_bytes` between two buffers of
/// `device`: `cuMemcpyDtoDAsync` on a GPU (the driver's own copy, as CUDA's bandwidthTest
/// times it, rather than candle's one-element-per-thread copy kernel); on the CPU a `memcpy` split
/// over every core, since one core alone cannot draw the bandwidth that the model's threads do.
fn copy_s(device: &Device, plan: &LimitPlan) -> Result<f64, BenchError> {
    let ops = plan.ops_per_repeat;
    match device {
        Device::Cpu => {
            let buffer = |fill: u8| {
                let mut v = Vec::new();
                v.try_reserve_exact(plan.copy_bytes).map_err(|_| {
                    BenchError::Invalid(format!(
                        "--copy-mib: cannot allocate {} MiB",
                        plan.copy_bytes >> 20
                    ))
                })?;
                v.resize(plan.copy_bytes, fill);
                Ok::<_, BenchError>(v)
            };
            let (src, mut dst) = (buffer(1)?, buffer(0)?);
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
            let chunk = plan.copy_bytes.div_ceil(threads);
            best_of(device, plan.repeats, || {
                for _ in 0..ops {
                    std::thread::scope(|s| {
                        for (to, from) in dst.chunks_mut(chunk).zip(src.chunks(chunk)) {
                            s.spawn(move || to.copy_from_slice(from));
                        }
                    });
                }
                Ok(())
            })
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => {
            use crate::transport::cuda::CudaError;
            let driver =
                |op: &'static str| move |source| BenchError::from(CudaError::Driver { op, source });
            let stream = cuda.cuda_stream();
            let src = stream
                .alloc_zeros::<u8>(plan.copy_bytes)
                .map_err(driver("cuMemAllocAsync"))?;
            let mut dst = stream
                .alloc_zeros::<u8>(plan.copy_bytes)
                .map_err(driver("cuMemAllocAsync"))?;
            best_of(device, plan.repeats, || {
                for _ in 0..ops {
                    stream
                        .memcpy_dtod(&src, &mut dst)
                        .map_err(driver("cuMemcpyDtoDAsync"))?;
                }
                Ok(())
            })
        }
        other => Err(BenchError::Invalid(format!(
            "--device: no copy bandwidth measure for {:?}",
            other.location()
        ))),
    }
}

fn rt<E: Into<models::runtime::RuntimeError>>(e: E) -> BenchError {
    BenchError::Runtime(e.into())
}

/// The least one step of a bench row must do, from `ModelSpec`'s arithmetic.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepWork {
    /// Weights read once (all but an untied embedding table), plus the KV cache the step
    /// reads (decode: every cached token of every sequence) or writes (its new tokens).
    pub bytes: f64,
    /// Linear layers, attention and the output projection of the last position.
    pub flops: f64,
}

impl StepWork {
    /// One prefill of `prompt_tokens` into an empty cache.
    pub fn prefill(spec: &ModelSpec, dtype: DType, prompt_tokens: usize) -> StepWork {
        let tokens = prompt_tokens as u64;
        StepWork {
            bytes: (spec.step_weight_bytes(dtype) + tokens * spec.kv_bytes_per_token(dtype)) as f64,
            flops: spec.prefill_flops(tokens, 0),
        }
    }

    /// The mean of `steps` decode steps of `batch` sequences whose caches hold
    /// `context_tokens` at the first step and one more at each next.
    pub fn decode(
        spec: &ModelSpec,
        dtype: DType,
        batch: usize,
        context_tokens: usize,
        steps: usize,
    ) -> StepWork {
        let steps = steps.max(1);
        let kv_token = spec.kv_bytes_per_token(dtype) as f64;
        let (mut bytes, mut flops) = (0.0, 0.0);
        for k in 0..steps {
            let cached = (context_tokens + k) as u64;
            bytes += spec.step_weight_bytes(dtype) as f64
                + batch as f64 * (cached + 1) as f64 * kv_token;
            flops += batch as f64 * spec.decode_flops(cached);
        }
        StepWork {
            bytes: bytes / steps as f64,
            flops: flops / steps as f64,
        }
    }

    /// The work of `row`'s timed step.
    pub fn of(spec: &ModelSpec, dtype: DType, row: &BenchRow) -> StepWork {
        match row.phase {
            Phase::Prefill => StepWork::prefill(spec, dtype, row.size),
            Phase::Decode => StepWork::decode(spec, dtype, row.size, row.context_tokens, row.steps),
        }
    }
}

/// A step's roofline at a device's rates.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limit {
    /// Bytes over copy bandwidth.
    pub memory_s: f64,
    /// FLOPs over matmul rate.
    pub compute_s: f64,
}

impl Limit {
    pub fn of(work: &StepWork, rates: &DeviceRates) -> Limit {
        Limit {
            memory_s: work.bytes / rates.copy_bytes_per_s,
            compute_s: work.flops / rates.matmul_flop_per_s,
        }
    }

    /// No step can be faster than this.
    pub fn seconds(&self) -> f64 {
        self.memory_s.max(self.compute_s)
    }

    /// Which ceiling sets the limit.
    pub fn bound(&self) -> &'static str {
        if self.memory_s >= self.compute_s {
            "memory"
        } else {
            "compute"
        }
    }
}

/// A bench row beside its limit.
#[derive(Clone, Debug, PartialEq)]
pub struct LimitRow {
    pub row: BenchRow,
    pub work: StepWork,
    pub limit: Limit,
}

impl LimitRow {
    /// Limit over measured time: 1 is the ceiling reached.
    pub fn fraction(&self) -> f64 {
        self.limit.seconds() / self.row.step_s
    }
}

/// Every row of a run of a `spec` model with weights in `dtype` beside its limit.
pub fn against(
    spec: &ModelSpec,
    dtype: DType,
    rows: &[BenchRow],
    rates: &DeviceRates,
) -> Vec<LimitRow> {
    rows.iter()
        .map(|row| {
            let work = StepWork::of(spec, dtype, row);
            LimitRow {
                row: row.clone(),
                work,
                limit: Limit::of(&work, rates),
            }
        })
        .collect()
}

/// Markdown: each row's step time beside its limit.
pub fn table(rows: &[LimitRow]) -> String {
    let mut out = String::from(
        "| phase | prompt tokens / batch | ours s | limit s | bound | fraction of limit |\n\
         |---|---|---|---|---|---|\n",
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {:.6} | {:.6} | {} | {:.3} |\n",
            r.row.phase.name(),
            r.row.size,
            r.row.step_s,
            r.limit.seconds(),
            r.limit.bound(),
            r.fraction()
        ));
    }
    out
}

/// The rows as CSV with a header: the measurement, the step's work, the device's rates and
/// the limit, so that every number can be recomputed from its line.
pub fn write_csv(
    mut w: impl std::io::Write,
    rows: &[LimitRow],
    rates: &DeviceRates,
) -> std::io::Result<()> {
    writeln!(
        w,
        "phase,size,context_tokens,steps,step_s,tokens_per_s,bytes,flops,copy_bytes_per_s,\
         matmul_flop_per_s,memory_s,compute_s,limit_s,bound,fraction_of_limit"
    )?;
    for r in rows {
        writeln!(
            w,
            "{},{},{},{},{:.9},{:.3},{:.0},{:.0},{:.0},{:.0},{:.9},{:.9},{:.9},{},{:.4}",
            r.row.phase.name(),
            r.row.size,
            r.row.context_tokens,
            r.row.steps,
            r.row.step_s,
            r.row.tokens_per_s,
            r.work.bytes,
            r.work.flops,
            rates.copy_bytes_per_s,
            rates.matmul_flop_per_s,
            r.limit.memory_s,
            r.limit.compute_s,
            r.limit.seconds(),
            r.limit.bound(),
            r.fraction()
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tinyllama() -> ModelSpec {
        ModelSpec::preset("tinyllama-1.1b").unwrap()
    }

    fn rates(copy_bytes_per_s: f64, matmul_flop_per_s: f64) -> DeviceRates {
        DeviceRates {
            copy_bytes_per_s,
            matmul_flop_per_s,
            plan: LimitPlan::for_device(&Device::Cpu),
            matmul_dtype: DType::Bf16,
        }
    }

    fn row(phase: Phase, size: usize, context_tokens: usize, steps: usize) -> BenchRow {
        BenchRow {
            phase,
            size,
            context_tokens,
            steps,
            step_s: 0.01,
            tokens_per_s: 100.0,
        }
    }

    #[test]
    fn batch_one_decode_is_bound_by_streaming_the_weights() {
        let spec = tinyllama();
        let work = StepWork::decode(&spec, DType::Bf16, 1, 256, 1);
        let weights = spec.step_weight_bytes(DType::Bf16) as f64;
        let kv = 257.0 * spec.kv_bytes_per_token(DType::Bf16) as f64;
        assert_eq!(work.bytes, weights + kv);
        assert_eq!(work.flops, spec.decode_flops(256));
        // 2 TB/s read+written and 500 TFLOP/s: about 1 ms to read TinyLlama's 2 GB.
        let limit = Limit::of(&work, &rates(2e12, 500e12));
        assert_eq!(limit.memory_s, (weights + kv) / 2e12);
        assert_eq!(limit.bound(), "memory");
        assert_eq!(limit.seconds(), limit.memory_s);
        assert!((limit.seconds() - 1.03e-3).abs() < 0.02e-3, "{limit:?}");
    }

    #[test]
    fn long_prefill_is_bound_by_the_matmul_rate() {
        let spec = tinyllama();
        let work = StepWork::prefill(&spec, DType::Bf16, 2048);
        assert_eq!(work.flops, spec.prefill_flops(2048, 0));
        let limit = Limit::of(&work, &rates(2e12, 500e12));
        assert_eq!(limit.compute_s, spec.prefill_flops(2048, 0) / 500e12);
        assert_eq!(limit.bound(), "compute");
        assert_eq!(limit.seconds(), limit.compute_s);
    }

    #[test]
    fn decode_work_is_the_mean_over_the_timed_steps_and_scales_with_the_batch() {
        let spec = tinyllama();
        let one = StepWork::decode(&spec, DType::Bf16, 1, 100, 4);
        let mean_flops = (100..104).map(|c| spec.decode_flops(c)).sum::<f64>() / 4.0;
        assert!((one.flops - mean_flops).abs() < 1.0);
        let eight = StepWork::decode(&spec, DType::Bf16, 8, 100, 4);
        assert!((eight.flops - 8.0 * mean_flops).abs() < 8.0);
        let kv = spec.kv_bytes_per_token(DType::Bf16) as f64 * 102.5;
        let weights = spec.step_weight_bytes(DType::Bf16) as f64;
        assert!((eight.bytes - (weights + 8.0 * kv)).abs() < 1.0);
    }

    #[test]
    fn the_fraction_is_limit_over_measured_time() {
        let spec = tinyllama();
        let rows = [
            row(Phase::Prefill, 2048, 0, 1),
            row(Phase::Decode, 1, 256, 16),
        ];
        let r = rates(2e12, 500e12);
        let limited = against(&spec, DType::Bf16, &rows, &r);
        assert_eq!(limited.len(), 2);
        for l in &limited {
            assert_eq!(l.fraction(), l.limit.seconds() / 0.01);
            assert_eq!(l.work, StepWork::of(&spec, DType::Bf16, &l.row));
        }
        let text = table(&limited);
        assert_eq!(text.lines().count(), 4);
        assert!(text.contains("| prefill | 2048 |"), "{text}");
        assert!(
            text.contains("| compute |") && text.contains("| memory |"),
            "{text}"
        );
    }

    #[test]
    fn the_csv_has_a_header_and_one_line_per_row_of_equal_width() {
        let spec = tinyllama();
        let r = rates(2e12, 500e12);
        let rows = [
            row(Phase::Prefill, 128, 0, 1),
            row(Phase::Decode, 32, 256, 16),
        ];
        let mut out = Vec::new();
        write_csv(&mut out, &against(&spec, DType::Bf16, &rows, &r), &r).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<Vec<&str>> = text.lines().map(|l| l.split(',').collect()).collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0].len(), 15);
        assert!(lines.iter().all(|l| l.len() == 15), "{text}");
        assert_eq!(&lines[1][..4], ["prefill", "128", "0", "1"]);
        assert_eq!(&lines[2][..4], ["decode", "32", "256", "16"]);
        let limit: f64 = lines[2][12].parse().unwrap();
        let fraction: f64 = lines[2][14].parse().unwrap();
        assert!((fraction - limit / 0.01).abs() < 1e-3, "{text}");
    }

    #[test]
    fn the_speed_report_joins_on_columns_the_csv_writes() {
        let mut out = Vec::new();
        write_csv(&mut out, &[], &rates(1.0, 1.0)).unwrap();
        let header = String::from_utf8(out).unwrap();
        let columns: Vec<&str> = header.trim_end().split(',').collect();
        let script = include_str!("../../gpu/bench-speed.sh");
        for used in [
            "phase",
            "size",
            "step_s",
            "tokens_per_s",
            "memory_s",
            "compute_s",
            "limit_s",
            "bound",
            "fraction_of_limit",
        ] {
            assert!(columns.contains(&used), "{used} not in {header}");
            assert!(
                script.contains(&format!("\"{used}\"")) || script.contains(&format!("'{used}'")),
                "bench-speed.sh does not read {used}"
            );
        }
    }

    #[test]
    fn measured_rates_on_the_cpu_are_positive_and_a_zero_size_is_refused() {
        let plan = LimitPlan {
            copy_bytes: 1 << 20,
            matmul_dim: 64,
            repeats: 2,
            ops_per_repeat: 2,
        };
        let r = measure(&Device::Cpu, TensorDType::F32, &plan).unwrap();
        assert!(r.copy_bytes_per_s > 0.0 && r.copy_bytes_per_s.is_finite());
        assert!(r.matmul_flop_per_s > 0.0 && r.matmul_flop_per_s.is_finite());
        assert_eq!(r.matmul_dtype, DType::F32);
        assert_eq!(r.describe().lines().count(), 2);
        let zero = LimitPlan {
            matmul_dim: 0,
            ..plan
        };
        let err = measure(&Device::Cpu, TensorDType::F32, &zero).unwrap_err();
        assert_eq!(err.to_string(), "matmul dim: must be at least 1");
    }
}
