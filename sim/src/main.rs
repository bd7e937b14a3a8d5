//! `disagg-sim`: capacity planning for disaggregated LLM serving.

use clap::{Parser, Subcommand};
use sim::config::Scenario;
use sim::engine::{self, RunOptions, RunOutput};
use sim::{metrics, report, workload};
use std::fs::File;
use std::io::{BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

/// The benchmark scenario: a multi-turn workload on 32 prefill + 32 decode workers.
const BENCH_SCENARIO: &str = include_str!("../../configs/scenarios/bench-32p32d.toml");

#[derive(Parser)]
#[command(
    name = "disagg-sim",
    version,
    about = "Deterministic discrete-event simulator of disaggregated LLM serving",
    long_about = "Deterministic discrete-event simulator of disaggregated LLM serving.\n\
                  With no command it runs the compiled-in default scenario \
                  (configs/scenarios/seed-table.toml) and prints its table."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Simulate every setup of a scenario and print the comparison table.
    Run {
        /// Scenario TOML; the compiled-in default scenario when left out.
        scenario: Option<PathBuf>,
        /// Write per-request, summary and worker CSV (and the table) into this directory.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Override the scenario's seed.
        #[arg(long)]
        seed: Option<u64>,
        /// Also write every output token's time (tokens-SETUP.csv; large).
        #[arg(long, requires = "out")]
        token_times: bool,
        /// Also write the realised workload as a replayable trace (trace-SETUP.csv).
        #[arg(long, requires = "out")]
        trace_out: bool,
    },
    /// Measure the simulator's own speed: simulated requests and events per wall-second.
    Bench {
        /// Requests to simulate (conversations are started until this many turns exist).
        #[arg(long, default_value_t = 1_000_000)]
        requests: u64,
        /// Scenario to time instead of the compiled-in 32 prefill + 32 decode benchmark.
        #[arg(long)]
        scenario: Option<PathBuf>,
    },
    /// List the compiled-in models, hardware and links.
    Presets,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        None => run(None, None, None, false, false),
        Some(Command::Run {
            scenario,
            out,
            seed,
            token_times,
            trace_out,
        }) => run(
            scenario.as_deref(),
            out.as_deref(),
            seed,
            token_times,
            trace_out,
        ),
        Some(Command::Bench { requests, scenario }) => bench(requests, scenario.as_deref()),
        Some(Command::Presets) => {
            presets();
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
    }
}

fn load(path: Option<&Path>) -> Result<Scenario, String> {
    match path {
        Some(path) => Scenario::load(path).map_err(|e| e.to_string()),
        None => Ok(Scenario::default_scenario()),
    }
}

fn progress_bar(setup: &str) -> Option<indicatif::ProgressBar> {
    if !std::io::stdout().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new_spinner().with_message(setup.to_string());
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {msg}: {human_pos} requests [{elapsed}]",
        )
        .expect("valid progress template"),
    );
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    Some(bar)
}

fn run(
    path: Option<&Path>,
    out: Option<&Path>,
    seed: Option<u64>,
    token_times: bool,
    trace_out: bool,
) -> Result<(), String> {
    let mut scenario = load(path)?;
    if let Some(seed) = seed {
        scenario.seed = seed;
    }
    let mut outputs: Vec<RunOutput> = Vec::with_capacity(scenario.setups.len());
    for setup in &scenario.setups {
        let progress = progress_bar(&setup.name);
        let options = RunOptions {
            token_times,
            keep_requests: trace_out,
            progress: progress.clone(),
            ..RunOptions::default()
        };
        let output = engine::run(&scenario, setup, options).map_err(|e| e.to_string())?;
        if let Some(bar) = progress {
            bar.finish_and_clear();
        }
        outputs.push(output);
    }
    let runs: Vec<(&str, &metrics::Summary)> = outputs
        .iter()
        .map(|o| (o.setup.as_str(), &o.summary))
        .collect();
    let table = report::table(&runs);
    let source = path.map_or(sim::config::DEFAULT_SCENARIO_NAME.to_string(), |p| {
        p.display().to_string()
    });
    println!(
        "{} ({source}): {} on {}, seed {}",
        scenario.name,
        scenario.model.name,
        scenario.dtype.name(),
        scenario.seed
    );
    if !scenario.description.is_empty() {
        println!("{}", scenario.description);
    }
    println!();
    print!("{table}");
    if let Some(dir) = out {
        write_outputs(dir, &outputs, &table, token_times, trace_out)
            .map_err(|e| format!("{}: {e}", dir.display()))?;
        println!("\nwrote {}", dir.display());
    }
    Ok(())
}

/// A file-name-safe form of a setup name.
fn slug(name: &str) -> String {
    let mut slug = String::new();
    for c in name.chars() {
        if c.is_ascii_alphanumeric() {
            slug.push(c.to_ascii_lowercase());
        } else if !slug.ends_with('-') {
            slug.push('-');
        }
    }
    slug.trim_matches('-').to_string()
}

fn write_outputs(
    dir: &Path,
    outputs: &[RunOutput],
    table: &str,
    token_times: bool,
    trace_out: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(dir)?;
    let create = |name: String| -> std::io::Result<BufWriter<File>> {
        Ok(BufWriter::new(File::create(dir.join(name))?))
    };
    std::fs::write(dir.join("summary.txt"), table)?;
    let summaries: Vec<(String, metrics::Summary)> = outputs
        .iter()
        .map(|o| (o.setup.clone(), o.summary.clone()))
        .collect();
    metrics::write_summary_csv(create("summary.csv".into())?, &summaries)?;
    let workers: Vec<(String, Vec<metrics::WorkerStats>)> = outputs
        .iter()
        .map(|o| (o.setup.clone(), o.workers.clone()))
        .collect();
    metrics::write_workers_csv(create("workers.csv".into())?, &workers)?;
    for output in outputs {
        let name = slug(&output.setup);
        metrics::write_requests_csv(create(format!("requests-{name}.csv"))?, &output.records)?;
        if token_times {
            engine::write_token_times_csv(
                create(format!("tokens-{name}.csv"))?,
                &output.token_times,
            )?;
        }
        if trace_out {
            let mut file = create(format!("trace-{name}.csv"))?;
            workload::write_trace(&mut file, &output.requests)?;
            file.flush()?;
        }
    }
    Ok(())
}

/// Peak resident memory of this process, from /proc (Linux).
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn bench(requests: u64, path: Option<&Path>) -> Result<(), String> {
    let mut scenario = match path {
        Some(path) => Scenario::load(path).map_err(|e| e.to_string())?,
        None => Scenario::parse(
            BENCH_SCENARIO,
            "configs/scenarios/bench-32p32d.toml",
            PathBuf::from("."),
        )
        .map_err(|e| e.to_string())?,
    };
    // Start enough conversations for `requests` turns on average.
    let mean_turns = scenario.workload.turns.mean().max(1.0);
    scenario.workload.sessions = Some(((requests as f64 / mean_turns).ceil() as u64).max(1));
    scenario.workload.duration_s = None;
    let setup = scenario.setups[0].clone();
    println!(
        "bench: {} ({} workers, {}), {} conversations",
        setup.name,
        setup.workers.len(),
        scenario.model.name,
        scenario.workload.sessions.unwrap_or(0)
    );
    let start = Instant::now();
    let output =
        engine::run(&scenario, &setup, RunOptions::default()).map_err(|e| e.to_string())?;
    let wall_s = start.elapsed().as_secs_f64();
    let simulated = output.records.len() as f64;
    println!("simulated requests   {}", output.records.len());
    println!("events               {}", output.events);
    println!(
        "simulated time       {:.1} s",
        sim::time::ns_to_secs(output.end_ns)
    );
    println!("wall time            {wall_s:.2} s");
    println!("requests per second  {:.0}", simulated / wall_s);
    println!("events per second    {:.0}", output.events as f64 / wall_s);
    if let Some(peak) = peak_rss_bytes() {
        println!(
            "peak memory          {:.0} MiB",
            peak as f64 / (1u64 << 20) as f64
        );
    }
    let s = &output.summary;
    println!(
        "(simulated: {:.0} req/s, TTFT p50 {:.1} ms, ITL p50 {:.1} ms, {} rejected)",
        s.throughput_req_per_s, s.ttft_ms.p50, s.itl_ms.p50, s.rejected
    );
    Ok(())
}

fn presets() {
    println!("models:   {}", models::ModelSpec::PRESETS.join(", "));
    println!(
        "hardware: {}",
        sim::hardware::HardwareSpec::PRESETS.join(", ")
    );
    println!("links:    {}", sim::network::LinkSpec::PRESETS.join(", "));
}
