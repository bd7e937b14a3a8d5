//! `disagg-validate`: the simulator's predictions beside real runs of the same workload.

use clap::{Parser, Subcommand};
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use validation::overall::Overall;
use validation::reprice::reprice_case;
use validation::run::{
    Machine, RunError, RunSettings, format_load, hw_bin_beside, prepare, run_case,
};

#[derive(Parser)]
#[command(
    name = "disagg-validate",
    version,
    about = "Runs a workload on the real system and in the simulator and prints the error"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run validation cases: each on a fresh `disagg-hw serve` cluster and in the simulator.
    /// Prints each case's table, then the errors over all cases against the goal.
    Run {
        /// Case files (TOML).
        #[arg(required = true)]
        cases: Vec<PathBuf>,
        /// Results root: each case writes into OUT/CASE/; default validation/results/TAG.
        #[arg(long)]
        out: Option<PathBuf>,
        /// The disagg-hw binary; default: the one beside disagg-validate.
        #[arg(long)]
        hw_bin: Option<PathBuf>,
        /// A calibration profile to price every case's steps with, instead of the one each
        /// case names: one calibrated on this machine (`disagg-hw calibrate`).
        #[arg(long)]
        profile: Option<PathBuf>,
        /// Names this machine in the default results path; default cpu-<cores>core.
        #[arg(long)]
        machine: Option<String>,
        /// Exit with status 1 when the median errors miss the goal.
        #[arg(long)]
        require_goal: bool,
        /// Times each case's workload is measured, each on a fresh cluster; the repeats'
        /// requests are pooled. Near saturation one run's percentiles move by more than the
        /// goal between runs of the same trace.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
        repeats: u32,
    },
    /// Price committed measurements again with the current model, without running anything
    /// real: each case is derived as `run` derives it, simulated with the serving path its
    /// run measured, and laid beside that run's measured metrics, TTFT parts and steps.
    Reprice {
        /// Case files (TOML).
        #[arg(required = true)]
        cases: Vec<PathBuf>,
        /// The results root of the measured run: each case's measurement is MEASURED/CASE/.
        #[arg(long)]
        measured: PathBuf,
        /// Where the new predictions go (OUT/CASE/); default target/reprice/<measured's name>.
        #[arg(long)]
        out: Option<PathBuf>,
        /// The profile to price with, instead of the one each case names.
        #[arg(long)]
        profile: Option<PathBuf>,
        /// Cores of the machine that measured (CPU workers share them); default this one's.
        #[arg(long)]
        cores: Option<u32>,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Run {
            cases,
            out,
            hw_bin,
            profile,
            machine,
            require_goal,
            repeats,
        } => run(cases, out, hw_bin, profile, machine, require_goal, repeats),
        Command::Reprice {
            cases,
            measured,
            out,
            profile,
            cores,
        } => reprice(cases, measured, out, profile, cores),
    }
}

fn run(
    cases: Vec<PathBuf>,
    out: Option<PathBuf>,
    hw_bin: Option<PathBuf>,
    profile: Option<PathBuf>,
    machine: Option<String>,
    require_goal: bool,
    repeats: u32,
) -> ExitCode {
    let machine = Machine::this(machine);
    let out_root = out.unwrap_or_else(|| Path::new("validation/results").join(&machine.tag));
    let hw_bin = match hw_bin.map_or_else(hw_bin_beside_this, Ok) {
        Ok(bin) => bin,
        Err(message) => {
            eprintln!("error: {message}");
            return ExitCode::from(2);
        }
    };
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let settings = RunSettings {
        hw_bin,
        machine,
        command,
        repeats,
    };
    // Every case is checked and derived before any runs: a bad one fails in a second, not
    // after the others' minutes.
    let mut prepared = Vec::with_capacity(cases.len());
    for path in &cases {
        match prepare(path, &out_root, profile.as_deref(), None) {
            Ok(p) => prepared.push(p),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        }
    }
    let mut runs = Vec::new();
    let mut failed = 0;
    for p in &prepared {
        println!("== {} ({})", p.case.name, p.case.file);
        match run_case(p, &settings) {
            Ok(run) => {
                let path = &run.serving_path;
                println!(
                    "serving path {:.3} ms busy, {:.3} ms idle (medians of {} and {} probes)",
                    path.median_ns as f64 / 1e6,
                    path.idle_median_ns as f64 / 1e6,
                    path.samples_ns.len(),
                    path.idle_samples_ns.len()
                );
                if let Some(link) = &run.link {
                    println!("{}", validation::run::describe_link(link));
                }
                println!("{}", run.step_prices.describe());
                println!("{}", run.repeats);
                print!("{}", run.comparison.text_table());
                print!("{}", validation::parts::table(&run.parts));
                print!("{}", validation::steps::table(&run.steps));
                println!(
                    "load average {} before, {} after",
                    format_load(run.load_before_after.0),
                    format_load(run.load_before_after.1)
                );
                println!("wrote {}\n", run.dir.display());
                runs.push(run);
            }
            Err(e) => {
                eprintln!("error: {}: {e}\n", p.case.file);
                failed += 1;
            }
        }
    }
    let overall = Overall::new(
        &runs
            .iter()
            .map(|r| (r.name.clone(), &r.comparison))
            .collect::<Vec<_>>(),
    );
    if !summarize(&overall, runs.len(), &out_root) {
        return ExitCode::FAILURE;
    }
    if failed > 0 {
        eprintln!("error: {failed} of {} case(s) failed", prepared.len());
        return ExitCode::FAILURE;
    }
    if require_goal && !overall.goal_met() {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

fn hw_bin_beside_this() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot locate disagg-validate: {e}"))?;
    hw_bin_beside(&exe)
}

/// Prints the errors over the cases and writes them to `OUT/summary.csv`; false if that
/// cannot be written.
fn summarize(overall: &Overall, cases: usize, out_root: &Path) -> bool {
    println!("== errors over {cases} case(s)");
    print!("{}", overall.text());
    if cases == 0 {
        return true;
    }
    let path = out_root.join("summary.csv");
    let written = std::fs::File::create(&path)
        .map_err(|e| e.to_string())
        .and_then(|f| {
            overall
                .write_csv(BufWriter::new(f))
                .map_err(|e| e.to_string())
        });
    if let Err(e) = written {
        eprintln!("error: {}: {e}", path.display());
        return false;
    }
    println!("wrote {}", path.display());
    true
}

fn reprice(
    cases: Vec<PathBuf>,
    measured: PathBuf,
    out: Option<PathBuf>,
    profile: Option<PathBuf>,
    cores: Option<u32>,
) -> ExitCode {
    let out_root = out.unwrap_or_else(|| {
        let name = measured.file_name().unwrap_or_default();
        Path::new("target/reprice").join(name)
    });
    let mut repriced = Vec::new();
    let mut failed = 0;
    for path in &cases {
        let prepared = prepare(path, &out_root, profile.as_deref(), cores);
        let result = prepared.map_err(RunError::from).and_then(|p| {
            let dir = measured.join(&p.case.name);
            println!(
                "== {} ({}, measured in {})",
                p.case.name,
                p.case.file,
                dir.display()
            );
            reprice_case(&p, &dir)
        });
        match result {
            Ok(r) => {
                let paths = r.measurement.serving_paths();
                println!(
                    "serving path {:.3} ms busy, {} idle (measured)",
                    paths.busy_ms(),
                    paths
                        .idle_ms()
                        .map_or("not measured".to_string(), |ms| format!("{ms:.3} ms"))
                );
                if let Some(link) = &r.link {
                    println!("{}", validation::run::describe_link(link));
                }
                println!("{}", r.step_prices.describe());
                print!("{}", r.comparison.text_table());
                print!("{}", validation::parts::table(&r.parts));
                print!("{}", validation::steps::table(&r.steps));
                println!("wrote {}\n", r.dir.display());
                repriced.push(r);
            }
            Err(e) => {
                eprintln!("error: {}: {e}\n", path.display());
                failed += 1;
            }
        }
    }
    let overall = Overall::new(
        &repriced
            .iter()
            .map(|r| (r.name.clone(), &r.comparison))
            .collect::<Vec<_>>(),
    );
    if !summarize(&overall, repriced.len(), &out_root) || failed > 0 {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
