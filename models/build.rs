//! With feature `cuda`, compiles `src/runtime/kernels.cu` to PTX with `nvcc` (found through
//! `CUDA_ROOT`, `CUDA_PATH` or `PATH`), for compute capability `CUDA_COMPUTE_CAP` (default 80;
//! PTX of a lower capability runs on newer GPUs). Without the feature it does nothing.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let source = "src/runtime/kernels.cu";
    println!("cargo::rerun-if-changed={source}");
    for var in ["CUDA_ROOT", "CUDA_PATH", "CUDA_COMPUTE_CAP"] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    let nvcc = ["CUDA_ROOT", "CUDA_PATH"]
        .iter()
        .filter_map(env::var_os)
        .map(|root| PathBuf::from(root).join("bin").join("nvcc"))
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let cap = env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let out =
        PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("kernels.ptx");
    let status = Command::new(&nvcc)
        .args([
            "--ptx",
            "-O3",
            "-std=c++17",
            &format!("-arch=compute_{cap}"),
            "-o",
        ])
        .arg(&out)
        .arg(source)
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} (feature cuda needs nvcc): {e}",
                nvcc.display()
            )
        });
    assert!(status.success(), "{} failed on {source}", nvcc.display());
}
