//! Tiny cases through the whole harness: a real prefill + decode cluster on loopback
//! (`disagg-hw serve`, which `cargo test --workspace` builds beside this test) serving the
//! fetched SmolLM2-135M GGUF or a preset's seeded random weights, and the simulator on the same
//! workload.

use std::path::Path;
use validation::reprice::reprice_case;
use validation::run::{Machine, RunSettings, hw_bin_beside, prepare, run_case};
use validation::sim;

const CASE: &str = r#"name = "tiny"
description = "three short requests through one prefill and one decode worker"
seed = 5
model = "smollm2-135m"
transport = "tcp"
profile = "no-profile-yet.toml"
link = "tcp-10g"
hardware = "dgx-spark"

[cluster]
mode = "disaggregated"
prefill_workers = 1
decode_workers = 1
router = { policy = "round_robin" }
kv_blocks = 64
max_num_seqs = 4
max_batched_tokens = 256

[workload]
arrival = { process = "poisson", rate_per_s = 4.0 }
sessions = 3
system_prompt_tokens = 16
user_tokens = { dist = "uniform", min = 8, max = 24 }
output_tokens = { dist = "uniform", min = 3, max = 6 }

[slo]
ttft_ms = 1000.0
tpot_ms = 200.0
"#;

#[test]
fn a_case_runs_on_both_sides_and_writes_its_outputs() {
    runs_on_both_sides(CASE, 2);
}

/// The GPU cases' form on the CPU: a preset's random weights (served with the token-id
/// tokenizer), each role's device named.
#[test]
fn a_random_weights_case_runs_on_both_sides() {
    let case = CASE
        .replace("seed = 5\n", "seed = 5\nrandom_seed = 3\n")
        .replace(
            "max_batched_tokens = 256\n",
            "max_batched_tokens = 256\ndevice = { prefill = \"cpu\", decode = \"cpu\" }\n",
        );
    assert_ne!(case, CASE);
    let dir = runs_on_both_sides(&case, 1);
    let cluster = std::fs::read_to_string(dir.path().join("results/tiny/cluster.toml")).unwrap();
    assert!(
        cluster.contains("preset = \"smollm2-135m\"") && cluster.contains("random_seed = 3"),
        "{cluster}"
    );
}

/// Runs `case` (named `tiny`), its workload measured `repeats` times, and checks its outputs;
/// returns the directory they are under.
fn runs_on_both_sides(case: &str, repeats: u32) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let case_path = dir.path().join("tiny.toml");
    std::fs::write(&case_path, case).unwrap();
    let exe = std::env::current_exe().unwrap();
    let settings = RunSettings {
        hw_bin: hw_bin_beside(&exe).unwrap_or_else(|e| panic!("{e}")),
        machine: Machine::this(Some("test".into())),
        command: "end-to-end test".into(),
        repeats,
    };
    let out = dir.path().join("results");
    let prepared = prepare(&case_path, &out, None, None).unwrap_or_else(|e| panic!("{e}"));
    let run = run_case(&prepared, &settings).unwrap_or_else(|e| panic!("{e}"));

    let case_dir = out.join("tiny");
    assert_eq!(run.dir, case_dir);
    for file in [
        "cluster.toml",
        "scenario.toml",
        "serve.log",
        "requests-measured.csv",
        "requests-predicted.csv",
        "comparison.csv",
        "report.md",
        "cdf.svg",
        "measurement.toml",
    ] {
        assert!(case_dir.join(file).is_file(), "{file} was not written");
    }
    let n = u64::from(repeats);
    let samples = validation::repeats::PREDICTED_SAMPLES;
    for (s, requests) in [(&run.measured, 3 * n), (&run.predicted, 3 * samples)] {
        assert_eq!((s.completed, s.rejected), (requests, 0), "{s:?}");
        assert!(
            s.transfer_overhead_share > 0.0,
            "a disaggregated run ships KV"
        );
    }
    // One workload on both sides: the same requests, each generating exactly its planned
    // tokens (end-of-sequence ignored); each repeat's ids follow the one before's.
    let read = |name: &str| {
        let file = std::fs::File::open(case_dir.join(name)).unwrap();
        sim::metrics::read_requests_csv(file).unwrap()
    };
    let (measured, predicted) = (
        read("requests-measured.csv"),
        read("requests-predicted.csv"),
    );
    let plan = |records: &[sim::metrics::RequestRecord]| -> Vec<(u64, u32, u32)> {
        records
            .iter()
            .map(|r| (r.request_id, r.prompt_tokens, r.output_tokens))
            .collect()
    };
    // The predicted side pools samples of its noise over the same workload, renumbered alike.
    let planned = |repeats: u64| -> Vec<(u64, u32, u32)> {
        (0..repeats)
            .flat_map(|k| {
                plan(&predicted[..3])
                    .into_iter()
                    .map(move |(id, prompt, output)| (id + 3 * k, prompt, output))
            })
            .collect()
    };
    assert_eq!(plan(&predicted), planned(samples));
    assert_eq!(plan(&measured), planned(n));
    assert!(
        run.repeats
            .contains(&format!("measured {repeats} repeat(s)")),
        "{}",
        run.repeats
    );
    // The step traces gathered every repeat's steps; none is left aside.
    let files: Vec<String> = std::fs::read_dir(&case_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!files.iter().any(|f| f.ends_with(".earlier")), "{files:?}");
    // Every repeat was warmed, the first after the probes; each warm-up timed its machine's
    // speed against the first's.
    let m = validation::reprice::Measurement::read(&case_dir, 16).unwrap();
    assert!(m.probes_end_ns() < m.workload_start_ns);
    assert_eq!(m.repeat_speeds.len(), repeats as usize);
    assert_eq!(m.repeat_speeds[0], [1.0, 1.0]);
    for speed in m.repeat_speeds.iter().flatten() {
        assert!((0.2..5.0).contains(speed), "{:?}", m.repeat_speeds);
    }

    // The serving paths, probed back to back and after pauses, are what the prediction took.
    let path = &run.serving_path;
    assert_eq!(
        path.samples_ns.len(),
        validation::hw::loadgen::probe::PROBES - 1
    );
    assert_eq!(
        path.idle_samples_ns.len(),
        validation::hw::loadgen::probe::IDLE_PROBES
    );
    assert!(path.median_ns > 0 && path.samples_ns.contains(&path.median_ns));
    assert!(path.idle_median_ns > 0 && path.idle_samples_ns.contains(&path.idle_median_ns));
    // The long probes timed bigger transfers, and the prediction moved KV on the case's link
    // refitted to them; its import of the short probes' KV leaves their serving paths.
    let long = &path.long;
    assert_eq!(
        long.transfer_samples_ns.len(),
        validation::hw::loadgen::probe::LONG_PROBES
    );
    assert_eq!(
        long.idle_transfer_samples_ns.len(),
        validation::hw::loadgen::probe::IDLE_LONG_PROBES
    );
    assert!(long.transfer_bytes > path.transfer_bytes && path.transfer_bytes > 0);
    let link = run.link.as_ref().unwrap();
    assert_eq!(link.name, "tcp-10g-probed");
    // Every long probe's transfer over their median spreads the simulated transfers.
    assert_eq!(
        link.time_spread.len(),
        long.transfer_samples_ns.len() + long.idle_transfer_samples_ns.len()
    );
    assert!(link.time_spread.is_sorted() && link.time_spread.contains(&1.0));
    let scenario = std::fs::read_to_string(case_dir.join("scenario.toml")).unwrap();
    assert!(scenario.contains("link = \"tcp-10g-probed\""), "{scenario}");
    // Their steps set the scales of the step prices: both kinds ran.
    let (prefill, decode) = run.step_prices.scales;
    assert!(prefill > 0.0 && decode > 0.0 && prefill != 1.0 && decode != 1.0);
    assert!(
        scenario.contains(&format!(
            "prefill_step_scale = {}",
            (prefill * 1e4).round() / 1e4
        )),
        "{scenario}"
    );
    // The two workers share the CPU one step at a time (each has every core): pairs of long
    // probes overlapped their steps, and the contention those steps measured is the
    // prediction's.
    assert_eq!(long.pairs, validation::hw::loadgen::probe::PROBE_PAIRS);
    let contention = run
        .step_prices
        .device_contention
        .expect("the probe pairs measured a contention");
    let doc: toml::Table = scenario.parse().unwrap();
    let written = doc["setup"][0]["device_contention"].as_float().unwrap();
    assert_eq!(contention, written, "{scenario}");
    assert!((0.0..=sim::config::MAX_DEVICE_CONTENTION).contains(&contention));
    // The serving path taken apart: each path's way in, the decode worker's hand-off, and its
    // import (at the rate the long probes' longer paths give) are the simulator's own parts; a
    // request that finds others in flight comes back as the pairs' second probes did.
    let ms = |ns: u64| (ns as f64 / 1e3).round() / 1e3;
    let handoff = path
        .handoff_median_ns
        .expect("the decode worker recorded its imports");
    assert!(path.import_median_ns.is_some() && long.import_median_ns.is_some());
    let own_ns = link.import_ns(path.transfer_bytes) + handoff;
    let busy_ns = path.front_median_ns + long.loaded_back_median_ns;
    let idle_ns = path.idle_median_ns - own_ns;
    for line in [
        format!("serving_path_ms = {}", ms(busy_ns)),
        format!("serving_path_idle_ms = {}", ms(idle_ns)),
        format!(
            "serving_path_front_ms = {}",
            ms(path.front_median_ns.min(busy_ns))
        ),
        format!(
            "serving_path_idle_front_ms = {}",
            ms(path.idle_front_median_ns.min(idle_ns))
        ),
        format!("kv_handoff_ms = {}", ms(handoff)),
    ] {
        assert!(scenario.contains(&line), "{line} in {scenario}");
    }
    // Each first token comes a way back after its import, and the import a hand-off after the
    // KV landed.
    let back_ns = (busy_ns - path.front_median_ns).min(idle_ns - path.idle_front_median_ns);
    for r in predicted.iter().filter(|r| r.is_completed()) {
        assert!(r.import_start_ns + 1_000 >= r.transfer_end_ns + handoff);
        assert!(r.first_token_ns + 2_000 >= r.import_end_ns + back_ns);
    }
    let parts: Vec<&str> = run.parts.iter().map(|p| p.part).collect();
    assert_eq!(
        parts,
        [
            "wait",
            "prefill",
            "transfer",
            "to import",
            "import",
            "delivery",
            "TTFT"
        ]
    );

    let report = std::fs::read_to_string(case_dir.join("report.md")).unwrap();
    assert!(report.contains("| delivery |"), "{report}");
    assert!(
        report.contains("| metric | predicted | measured | error % |"),
        "{report}"
    );
    assert!(report.contains("Worst error: **"), "{report}");
    assert!(report.contains("end-to-end test"), "{report}");
    let svg = std::fs::read_to_string(case_dir.join("cdf.svg")).unwrap();
    assert_eq!(svg.matches("<path").count(), 4, "two sides in two panels");
    let comparison = std::fs::read_to_string(case_dir.join("comparison.csv")).unwrap();
    assert_eq!(comparison.lines().count(), 1 + run.comparison.rows.len());
    assert!(Path::new(&settings.hw_bin).is_file());

    // Priced again from what it left, the same model gives the same prediction and the same
    // measured side, parts and steps.
    let again = dir.path().join("again");
    let prepared = prepare(&case_path, &again, None, None).unwrap_or_else(|e| panic!("{e}"));
    let repriced = reprice_case(&prepared, &case_dir).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(repriced.comparison, run.comparison);
    assert_eq!(repriced.parts, run.parts);
    assert_eq!(repriced.steps, run.steps);
    assert_eq!(repriced.measurement.serving_path_ns, path.median_ns);
    assert_eq!(repriced.link.as_ref(), Some(link));
    assert_eq!(repriced.step_prices, run.step_prices);
    assert_eq!(
        repriced.measurement.serving_path_idle_ns,
        Some(path.idle_median_ns)
    );
    assert_eq!(
        std::fs::read(again.join("tiny/requests-predicted.csv")).unwrap(),
        std::fs::read(case_dir.join("requests-predicted.csv")).unwrap()
    );
    dir
}
