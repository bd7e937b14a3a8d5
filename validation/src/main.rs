//! `disagg-validate`: the simulator's predictions beside real runs of the same workload.

use clap::{Parser, Subcommand};
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use validation::overall::Overall;
use validation::run::{Machine, RunSettings, format_load, hw_bin_beside, prepare, run_case};

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
    },
}

fn main() -> ExitCode {
    let Cli {
        command:
            Command::Run {
                cases,
                out,
                hw_bin,
                profile,
                machine,
                require_goal,
            },
    } = Cli::parse();
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
    };
    // Every case is checked and derived before any runs: a bad one fails in a second, not
    // after the others' minutes.
    let mut prepared = Vec::with_capacity(cases.len());
    for path in &cases {
        match prepare(path, &out_root, profile.as_deref()) {
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
                println!(
                    "serving path {:.3} ms (median of {} probes)",
                    run.serving_path.median_ns as f64 / 1e6,
                    run.serving_path.samples_ns.len()
                );
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
    println!("== errors over {} case(s)", runs.len());
    print!("{}", overall.text());
    if !runs.is_empty() {
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
            return ExitCode::FAILURE;
        }
        println!("wrote {}", path.display());
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
