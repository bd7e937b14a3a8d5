//! Whole-simulation properties: determinism, request accounting, causality of timestamps, and
//! the effects a capacity planner relies on (KV-aware routing, faster links).

use proptest::prelude::*;
use sim::config::Scenario;
use sim::engine::{self, RunOptions, RunOutput};
use sim::metrics::{Outcome, write_requests_csv};
use std::collections::BTreeMap;
use std::path::PathBuf;

fn parse(text: &str) -> Scenario {
    Scenario::parse(text, "test.toml", PathBuf::from(".")).unwrap_or_else(|e| panic!("{e}"))
}

fn run_all(scenario: &Scenario, options: RunOptions) -> Vec<RunOutput> {
    scenario
        .setups
        .iter()
        .map(|setup| engine::run(scenario, setup, options.clone()).unwrap())
        .collect()
}

fn requests_csv(output: &RunOutput) -> Vec<u8> {
    let mut bytes = Vec::new();
    write_requests_csv(&mut bytes, &output.records).unwrap();
    bytes
}

fn small_default() -> Scenario {
    let mut scenario = Scenario::default_scenario();
    scenario.workload.sessions = Some(60);
    scenario
}

#[test]
fn same_scenario_and_seed_give_byte_identical_csv() {
    let scenario = small_default();
    let a = run_all(&scenario, RunOptions::default());
    let b = run_all(&scenario, RunOptions::default());
    for (x, y) in a.iter().zip(&b) {
        assert!(!x.records.is_empty());
        assert_eq!(requests_csv(x), requests_csv(y), "setup {}", x.setup);
        assert_eq!(x.events, y.events);
    }
    let mut other = scenario.clone();
    other.seed += 1;
    let c = run_all(&other, RunOptions::default());
    assert_ne!(requests_csv(&a[0]), requests_csv(&c[0]), "the seed matters");
}

#[test]
fn the_cli_writes_identical_files_twice() {
    let bin = env!("CARGO_BIN_EXE_disagg-sim");
    let dir = std::env::temp_dir().join(format!("disagg-sim-det-{}", std::process::id()));
    let scenario = dir.join("scenario.toml");
    std::fs::create_dir_all(&dir).unwrap();
    let text = sim::config::DEFAULT_SCENARIO.replace("sessions = 600", "sessions = 40");
    std::fs::write(&scenario, text).unwrap();
    let mut outputs = Vec::new();
    for run in ["a", "b"] {
        let out = dir.join(run);
        let status = std::process::Command::new(bin)
            .args([
                "run",
                scenario.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ])
            .args(["--token-times", "--trace-out"])
            .output()
            .unwrap();
        assert!(
            status.status.success(),
            "{}",
            String::from_utf8_lossy(&status.stderr)
        );
        let mut files = BTreeMap::new();
        for entry in std::fs::read_dir(&out).unwrap() {
            let path = entry.unwrap().path();
            files.insert(
                path.file_name().unwrap().to_string_lossy().to_string(),
                std::fs::read(&path).unwrap(),
            );
        }
        // The last line names the output directory, which differs.
        let stdout = String::from_utf8(status.stdout).unwrap();
        let table = stdout
            .lines()
            .filter(|l| !l.starts_with("wrote "))
            .collect::<Vec<_>>()
            .join("\n");
        outputs.push((table, files));
    }
    assert!(outputs[0].0 == outputs[1].0, "stdout differs");
    let names: Vec<&String> = outputs[0].1.keys().collect();
    for name in [
        "requests-full.csv",
        "summary.csv",
        "workers.csv",
        "tokens-baseline.csv",
        "trace-full.csv",
    ] {
        assert!(
            outputs[0].1.contains_key(name),
            "{name} missing from {names:?}"
        );
    }
    for (name, bytes) in &outputs[0].1 {
        assert!(outputs[1].1.get(name) == Some(bytes), "{name} differs");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_config_is_one_line_with_field_and_line_and_exit_code_2() {
    let bin = env!("CARGO_BIN_EXE_disagg-sim");
    let dir = std::env::temp_dir().join(format!("disagg-sim-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.toml");
    let text = sim::config::DEFAULT_SCENARIO.replacen("rate_per_s", "rate_per_sec", 1);
    let line = text
        .lines()
        .position(|l| l.contains("rate_per_sec"))
        .unwrap()
        + 1;
    std::fs::write(&path, text).unwrap();
    let out = std::process::Command::new(bin)
        .args(["run", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains(&format!("bad.toml:{line}:")), "{stderr}");
    assert!(stderr.contains("rate_per_sec"), "{stderr}");
    let missing = std::process::Command::new(bin)
        .args(["run", dir.join("absent.toml").to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A scenario for property tests: small models and small KV pools, so queues fill, blocks are
/// evicted and sequences preempted.
struct Knobs {
    seed: u64,
    mode: usize,
    workers: (u32, u32),
    policy: usize,
    rate: f64,
    memory_gib: f64,
    delay_ms: f64,
    chunked: bool,
    /// (workers per device, device parallelism)
    sharing: (u32, u32),
}

fn random_scenario(k: &Knobs) -> String {
    let Knobs {
        seed,
        mode,
        workers,
        policy,
        rate,
        memory_gib,
        delay_ms,
        chunked,
        sharing,
    } = *k;
    let policies = [
        "{ policy = \"round_robin\" }",
        "{ policy = \"least_loaded\" }",
        "{ policy = \"session_affinity\" }",
        "{ policy = \"kv_aware\" }",
        "{ policy = \"kv_aware\", temperature = 0.5 }",
    ];
    let policy = policies[policy % policies.len()];
    // Workers sharing a GPU share its memory.
    let memory_gib = memory_gib * sharing.0 as f64;
    let pools = match mode % 3 {
        0 => format!(
            "mode = \"aggregated\"\naggregated_workers = {}",
            workers.0 + workers.1
        ),
        1 => format!(
            "mode = \"disaggregated\"\nprefill_workers = {}\ndecode_workers = {}",
            workers.0, workers.1
        ),
        _ => format!(
            "mode = \"conditional\"\nprefill_workers = {}\ndecode_workers = {}\nconditional_threshold_tokens = 96",
            workers.0, workers.1
        ),
    };
    format!(
        r#"
name = "prop"
seed = {seed}
[model]
preset = "smollm2-135m"
[workload]
arrival = {{ process = "gamma", rate_per_s = {rate}, cv = 2.0 }}
sessions = 25
turns = {{ dist = "uniform", min = 1, max = 4 }}
system_prompt_tokens = 40
system_prompts = 2
user_tokens = {{ dist = "log_normal", mean = 120.0, cv = 1.0, min = 1, max = 700 }}
output_tokens = {{ dist = "uniform", min = 1, max = 60 }}
think_time = {{ dist = "exponential", mean_secs = 0.2 }}
max_prompt_tokens = 1500
[[hardware]]
name = "small"
bf16_dense_tflop_per_s = 20.0
memory_gib = {memory_gib}
memory_bandwidth_gb_per_s = 200.0
flops_efficiency = 0.5
bandwidth_efficiency = 0.8
step_overhead_us = 200
[[setup]]
name = "prop"
hardware = "small"
link = "tcp-10g"
{pools}
router = {policy}
registry_delay_ms = {delay_ms}
workers_per_device = {}
device_parallelism = {}
[setup.engine]
max_num_seqs = 8
max_batched_tokens = 256
chunked_prefill = {chunked}
gpu_memory_utilization = 1.0
max_queue = 12
"#,
        sharing.0, sharing.1
    )
}

/// Every request ends completed or rejected, exactly once; no timestamp goes backwards; a
/// completed request produced all its tokens, in order.
fn check_invariants(out: &RunOutput) {
    let ids: Vec<u64> = out.requests.iter().map(|r| r.id).collect();
    let recorded: Vec<u64> = out.records.iter().map(|r| r.request_id).collect();
    assert_eq!(
        ids, recorded,
        "every arrived request has exactly one record"
    );
    let mut tokens: BTreeMap<u64, Vec<(u32, u64)>> = BTreeMap::new();
    for t in &out.token_times {
        tokens
            .entry(t.request_id)
            .or_default()
            .push((t.token_index, t.time_ns));
    }
    for r in &out.records {
        match r.outcome {
            Outcome::Rejected => {
                assert!(r.reject_reason.is_some());
                assert!(!tokens.contains_key(&r.request_id));
            }
            Outcome::Completed => {
                let mut stages = vec![
                    r.arrival_ns,
                    r.routed_ns,
                    r.prefill_start_ns,
                    r.prefill_end_ns,
                ];
                if r.transfer_end_ns > 0 {
                    stages.extend([r.transfer_start_ns, r.transfer_end_ns]);
                }
                stages.extend([r.first_token_ns, r.end_ns]);
                assert!(
                    stages.windows(2).all(|w| w[0] <= w[1]),
                    "timestamps go backwards: {r:?}"
                );
                let times = &tokens[&r.request_id];
                assert_eq!(times.len(), r.output_tokens as usize, "{r:?}");
                assert!(
                    times
                        .iter()
                        .enumerate()
                        .all(|(i, &(index, _))| index == i as u32)
                );
                assert!(times.windows(2).all(|w| w[0].1 <= w[1].1));
                assert_eq!(times[0].1, r.first_token_ns);
                assert_eq!(times.last().unwrap().1, r.end_ns);
                assert!(r.cached_tokens < r.prompt_tokens);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn no_request_is_lost_and_time_never_runs_backwards(
        seed in 0u64..1000,
        mode in 0usize..3,
        workers in (1u32..4, 1u32..4),
        policy in 0usize..5,
        rate in 0.5f64..40.0,
        memory_gib in 0.27f64..0.6,
        delay_ms in prop_oneof![Just(0.0), 0.0f64..20.0],
        chunked in any::<bool>(),
        sharing in (1u32..4).prop_flat_map(|n| (Just(n), 1..=n)),
    ) {
        let knobs = Knobs { seed, mode, workers, policy, rate, memory_gib, delay_ms, chunked, sharing };
        let text = random_scenario(&knobs);
        let scenario = parse(&text);
        let options = RunOptions { token_times: true, keep_requests: true, ..RunOptions::default() };
        let out = engine::run(&scenario, &scenario.setups[0], options.clone()).unwrap();
        check_invariants(&out);
        // Every worker's KV pool stayed within its capacity.
        for w in &out.workers {
            prop_assert!(w.peak_used_blocks <= w.capacity_blocks);
        }
        let again = engine::run(&scenario, &scenario.setups[0], options).unwrap();
        prop_assert_eq!(requests_csv(&out), requests_csv(&again));
    }
}

#[test]
fn small_kv_pools_preempt_and_still_complete_everything() {
    let text = random_scenario(&Knobs {
        seed: 3,
        mode: 0,
        workers: (1, 0),
        policy: 0,
        rate: 40.0,
        memory_gib: 0.27,
        delay_ms: 0.0,
        chunked: true,
        sharing: (1, 1),
    });
    let scenario = parse(&text);
    let options = RunOptions {
        token_times: true,
        keep_requests: true,
        ..RunOptions::default()
    };
    let out = engine::run(&scenario, &scenario.setups[0], options).unwrap();
    check_invariants(&out);
    assert!(
        out.summary.preemptions > 0,
        "the pool is small enough to preempt"
    );
    assert!(out.summary.completed > 0);
}

fn multi_turn_on(decode_workers: u32, router: &str) -> String {
    format!(
        r#"
name = "routing"
seed = 11
[model]
preset = "llama-3.1-8b"
[workload]
arrival = {{ process = "poisson", rate_per_s = 4.0 }}
sessions = 200
turns = {{ dist = "constant", value = 5 }}
system_prompt_tokens = 200
user_tokens = {{ dist = "constant", value = 300 }}
output_tokens = {{ dist = "constant", value = 64 }}
think_time = {{ dist = "exponential", mean_secs = 3.0 }}
[[setup]]
name = "{router}"
hardware = "h100-sxm"
link = "rdma-100g"
mode = "conditional"
prefill_workers = 2
decode_workers = {decode_workers}
router = {{ policy = "{router}" }}
registry_delay_ms = 1.0
"#
    )
}

#[test]
fn kv_aware_routing_reuses_more_history_than_round_robin() {
    let summary = |router: &str| {
        let scenario = parse(&multi_turn_on(4, router));
        engine::run(&scenario, &scenario.setups[0], RunOptions::default())
            .unwrap()
            .summary
    };
    let (rr, kv) = (summary("round_robin"), summary("kv_aware"));
    assert!(
        kv.history_hit_rate > 1.5 * rr.history_hit_rate,
        "kv-aware {} vs round-robin {}",
        kv.history_hit_rate,
        rr.history_hit_rate
    );
    assert!(kv.prefix_hit_rate > rr.prefix_hit_rate);
    assert!(kv.mean_transfer_ms < rr.mean_transfer_ms);
}

#[test]
fn the_seed_table_orders_its_setups_as_the_physics_says() {
    let out = run_all(&small_default(), RunOptions::default());
    let by_name = |name: &str| &out.iter().find(|o| o.setup == name).unwrap().summary;
    let (base, tcp, rdma, full) = (
        by_name("Baseline"),
        by_name("Disagg + TCP"),
        by_name("Disagg + RDMA"),
        by_name("Full"),
    );
    assert_eq!(base.transfer_overhead_share, 0.0);
    assert!(tcp.mean_transfer_ms > 5.0 * rdma.mean_transfer_ms);
    assert!(tcp.transfer_overhead_share > rdma.transfer_overhead_share);
    assert!(
        full.request_hit_rate > 0.5,
        "conversations reuse their history"
    );
    assert!(full.latency_hit_ms.unwrap() < full.latency_miss_ms.unwrap());
    assert!(full.transfer_overhead_share < rdma.transfer_overhead_share);
}

/// The error of the default scenario with `line` added to its first aggregated setup.
fn setup_error(line: &str) -> String {
    let text = sim::config::DEFAULT_SCENARIO.replacen(
        "mode = \"aggregated\"",
        &format!("{line}\nmode = \"aggregated\""),
        1,
    );
    Scenario::parse(&text, "s.toml", PathBuf::from("."))
        .unwrap_err()
        .to_string()
}

fn two_workers(rate_per_s: f64, workers_per_device: u32, device_parallelism: u32) -> Scenario {
    two_workers_contending(rate_per_s, workers_per_device, device_parallelism, 1.0)
}

fn two_workers_contending(
    rate_per_s: f64,
    workers_per_device: u32,
    device_parallelism: u32,
    device_contention: f64,
) -> Scenario {
    two_workers_interfering(
        rate_per_s,
        (workers_per_device, device_parallelism),
        device_contention,
        "",
    )
}

/// `interference`: the body of the setup's `device_interference` table.
fn two_workers_interfering(
    rate_per_s: f64,
    (workers_per_device, device_parallelism): (u32, u32),
    device_contention: f64,
    interference: &str,
) -> Scenario {
    parse(&format!(
        r#"
name = "sharing"
seed = 5
[model]
preset = "smollm2-135m"
[workload]
arrival = {{ process = "constant", rate_per_s = {rate_per_s} }}
sessions = 2
turns = {{ dist = "constant", value = 1 }}
user_tokens = {{ dist = "constant", value = 300 }}
output_tokens = {{ dist = "constant", value = 40 }}
[[setup]]
name = "shared"
hardware = "h100-sxm"
link = "tcp-10g"
mode = "aggregated"
aggregated_workers = 2
workers_per_device = {workers_per_device}
device_parallelism = {device_parallelism}
device_contention = {device_contention:?}
device_interference = {{ {interference} }}
"#
    ))
}

#[test]
fn workers_sharing_a_device_slow_each_other_only_when_they_oversubscribe_it() {
    let e2e = |scenario: &Scenario| -> Vec<u64> {
        let out = engine::run(scenario, &scenario.setups[0], RunOptions::default()).unwrap();
        assert_eq!(out.summary.completed, 2);
        out.records
            .iter()
            .map(|r| r.end_ns - r.arrival_ns)
            .collect()
    };
    // Arrivals 1 us apart: both workers compute at the same time.
    let apart = e2e(&two_workers(1e6, 1, 1));
    assert_eq!(
        apart,
        e2e(&two_workers(1e6, 2, 2)),
        "room for both: no slowdown"
    );
    let shared = e2e(&two_workers(1e6, 2, 1));
    for (s, a) in shared.iter().zip(&apart) {
        let ratio = *s as f64 / *a as f64;
        assert!(
            (1.9..=2.01).contains(&ratio),
            "one device, two busy workers: {ratio}"
        );
    }
    // Contention below 1: each slows the other by that share of its own time.
    for (c, want) in [(0.5, 1.5), (0.0, 1.0), (2.0, 3.0)] {
        let contended = e2e(&two_workers_contending(1e6, 2, 1, c));
        for (s, a) in contended.iter().zip(&apart) {
            let ratio = *s as f64 / *a as f64;
            assert!(
                (want - 0.05..=want + 0.01).contains(&ratio),
                "contention {c}: {ratio}, not {want}"
            );
        }
    }
    // Arrivals 1000 s apart: never busy together, so sharing costs nothing.
    assert_eq!(e2e(&two_workers(1e-3, 1, 1)), e2e(&two_workers(1e-3, 2, 1)));
    assert_eq!(
        e2e(&two_workers(1e-3, 1, 1)),
        e2e(&two_workers_contending(1e-3, 2, 1, 3.0))
    );
    let bad = setup_error("workers_per_device = 2\ndevice_parallelism = 3");
    assert!(
        bad.contains("device_parallelism: must be in 1..=2"),
        "{bad}"
    );
    let bad = setup_error("device_contention = -0.5");
    assert!(
        bad.contains("device_contention: must be in 0..=4, got -0.5"),
        "{bad}"
    );
}

#[test]
fn steps_in_flight_together_slow_each_other_by_their_kinds_interference() {
    // (TTFT, E2E - TTFT) of each request.
    let times = |interference: &str| -> Vec<(u64, u64)> {
        let scenario = two_workers_interfering(1e6, (2, 2), 1.0, interference);
        let out = engine::run(&scenario, &scenario.setups[0], RunOptions::default()).unwrap();
        assert_eq!(out.summary.completed, 2);
        out.records
            .iter()
            .map(|r| (r.first_token_ns - r.arrival_ns, r.end_ns - r.first_token_ns))
            .collect()
    };
    let none = times("");
    let ratio = |a: u64, b: u64| a as f64 / b as f64;
    // Both prefill at once, then both decode at once: unlike kinds meet for the 1 us between
    // the arrivals.
    let unlike = times("prefill_by_decode = 1.0, decode_by_prefill = 1.0");
    for ((ttft, rest), (ttft0, rest0)) in unlike.into_iter().zip(&none) {
        assert!(ttft.abs_diff(*ttft0) <= 2_000, "{ttft} {ttft0}");
        assert!(rest.abs_diff(*rest0) <= 2_000, "{rest} {rest0}");
    }
    for ((ttft, rest), (ttft0, rest0)) in times("prefill_by_prefill = 0.5").into_iter().zip(&none) {
        let r = ratio(ttft, *ttft0);
        assert!((1.45..=1.5).contains(&r), "prefills: {r}");
        assert!((0.95..=1.05).contains(&ratio(rest, *rest0)));
    }
    for ((ttft, rest), (ttft0, rest0)) in times("decode_by_decode = 0.25").into_iter().zip(&none) {
        assert_eq!(ttft, *ttft0);
        let r = ratio(rest, *rest0);
        assert!((1.2..=1.25).contains(&r), "decodes: {r}");
    }
    // A device that runs one step at a time: the contention's share (half speed), and no
    // interference, since no step runs beside another (see `sim::sharing`).
    let shared = two_workers_interfering(1e6, (2, 1), 1.0, "prefill_by_prefill = 0.5");
    let out = engine::run(&shared, &shared.setups[0], RunOptions::default()).unwrap();
    for (r, (ttft0, _)) in out.records.iter().zip(&none) {
        let ttft = r.first_token_ns - r.arrival_ns;
        let r = ratio(ttft, *ttft0);
        assert!((1.95..=2.0).contains(&r), "shared, one at a time: {r}");
    }
    let bad = setup_error("device_interference = { decode_by_decode = 5.0 }");
    assert!(
        bad.contains("device_interference.decode_by_decode: must be in 0..=4, got 5"),
        "{bad}"
    );
}

#[test]
fn a_decode_worker_takes_landed_kv_between_its_steps() {
    let scenario = small_default();
    let setup = scenario
        .setups
        .iter()
        .find(|s| s.name == "Disagg + TCP")
        .unwrap();
    let options = RunOptions {
        token_times: true,
        ..RunOptions::default()
    };
    let out = engine::run(&scenario, setup, options).unwrap();
    // Times at which each decode worker emitted tokens of other requests: its step ends.
    let mut step_ends: BTreeMap<u32, std::collections::BTreeSet<u64>> = BTreeMap::new();
    let worker_of: BTreeMap<u64, u32> = out
        .records
        .iter()
        .filter_map(|r| Some((r.request_id, r.decode_worker?)))
        .collect();
    for t in out.token_times.iter().filter(|t| t.token_index > 0) {
        step_ends
            .entry(worker_of[&t.request_id])
            .or_default()
            .insert(t.time_ns);
    }
    let (mut waited, mut at_once) = (0, 0);
    for r in out.records.iter().filter(|r| r.transfer_bytes > 0) {
        assert!(r.first_token_ns >= r.transfer_end_ns);
        if r.first_token_ns == r.transfer_end_ns {
            at_once += 1;
        } else {
            let ends = &step_ends[&r.decode_worker.unwrap()];
            assert!(ends.contains(&r.first_token_ns), "request {}", r.request_id);
            waited += 1;
        }
    }
    assert!(
        waited > 0 && at_once > 0,
        "{waited} waited, {at_once} at once"
    );
}

#[test]
fn the_serving_path_delays_what_the_client_sees_and_the_next_turn() {
    let options = RunOptions {
        token_times: true,
        ..RunOptions::default()
    };
    let run = |text: &str, path_ms: &str| {
        let text = text.replacen(
            "[setup.engine]",
            &format!("serving_path_ms = {path_ms}\n[setup.engine]"),
            1,
        );
        let scenario = parse(&text);
        engine::run(&scenario, &scenario.setups[0], options.clone()).unwrap()
    };
    // Open loop, one turn: the engines see the same requests at the same times, and the client
    // sees every token exactly 2.5 ms later.
    let single = two_workers(20.0, 1, 1).setups[0].clone();
    assert_eq!(single.serving_path_ns, 0);
    let text = format!(
        "{}\n[setup.engine]\nmax_num_seqs = 8\n",
        r#"
name = "path"
seed = 5
[model]
preset = "smollm2-135m"
[workload]
arrival = { process = "poisson", rate_per_s = 40.0 }
sessions = 40
turns = { dist = "constant", value = 1 }
user_tokens = { dist = "uniform", min = 50, max = 400 }
output_tokens = { dist = "uniform", min = 1, max = 30 }
[[setup]]
name = "shared"
hardware = "h100-sxm"
link = "tcp-10g"
mode = "disaggregated"
prefill_workers = 1
decode_workers = 1
"#
    );
    let (a, b) = (run(&text, "0.0"), run(&text, "2.5"));
    assert_eq!(a.records.len(), b.records.len());
    for (x, y) in a.records.iter().zip(&b.records) {
        assert_eq!(x.arrival_ns, y.arrival_ns);
        assert_eq!(x.prefill_end_ns, y.prefill_end_ns);
        assert_eq!(x.transfer_end_ns, y.transfer_end_ns);
        assert_eq!(x.first_token_ns + 2_500_000, y.first_token_ns);
        assert_eq!(x.end_ns + 2_500_000, y.end_ns);
    }
    for (x, y) in a.token_times.iter().zip(&b.token_times) {
        assert_eq!(x.time_ns + 2_500_000, y.time_ns);
    }
    assert_eq!(a.summary.itl_ms, b.summary.itl_ms, "gaps are the engines'");
    // Closed loop: a conversation's next turn starts from when the client saw the answer.
    let multi = text.replace(
        "turns = { dist = \"constant\", value = 1 }",
        "turns = { dist = \"constant\", value = 3 }\nthink_time = { dist = \"constant\", secs = 0.0 }",
    );
    let out = run(&multi, "4.0");
    let mut last_end: BTreeMap<u64, u64> = BTreeMap::new();
    let mut follow_ups = 0;
    for r in &out.records {
        if r.turn > 0 {
            assert!(r.arrival_ns >= last_end[&r.conversation_id]);
            follow_ups += 1;
        }
        last_end.insert(r.conversation_id, r.end_ns);
    }
    assert!(follow_ups > 0);
    let bad = Scenario::parse(
        &text.replacen(
            "[setup.engine]",
            "serving_path_ms = -1.0\n[setup.engine]",
            1,
        ),
        "s.toml",
        PathBuf::from("."),
    )
    .unwrap_err()
    .to_string();
    assert!(bad.contains("serving_path_ms: must be >= 0"), "{bad}");
}

#[test]
fn a_request_reaching_an_idle_cluster_takes_the_idle_serving_path() {
    let text = r#"
name = "idle"
seed = 9
[model]
preset = "smollm2-135m"
[workload]
arrival = { process = "poisson", rate_per_s = 30.0 }
sessions = 60
turns = { dist = "constant", value = 1 }
user_tokens = { dist = "uniform", min = 50, max = 400 }
output_tokens = { dist = "uniform", min = 1, max = 30 }
[[setup]]
name = "one"
hardware = "h100-sxm"
link = "tcp-10g"
mode = "aggregated"
aggregated_workers = 1
"#;
    let run = |paths: &str| {
        let scenario = parse(&format!("{text}{paths}"));
        engine::run(&scenario, &scenario.setups[0], RunOptions::default()).unwrap()
    };
    let base = run("");
    let paths = run("serving_path_ms = 1.0\nserving_path_idle_ms = 3.0\n");
    let (mut idle, mut busy) = (0, 0);
    for (x, y) in base.records.iter().zip(&paths.records) {
        assert_eq!(
            x.prefill_end_ns, y.prefill_end_ns,
            "the engines see the same work"
        );
        let in_flight = base
            .records
            .iter()
            .any(|o| o.arrival_ns < x.arrival_ns && o.end_ns > x.arrival_ns);
        let shift = if in_flight {
            busy += 1;
            1_000_000
        } else {
            idle += 1;
            3_000_000
        };
        assert_eq!(y.first_token_ns, x.first_token_ns + shift);
        assert_eq!(y.end_ns, x.end_ns + shift);
    }
    assert!(idle > 0 && busy > 0, "{idle} idle, {busy} busy");
    let bad = Scenario::parse(
        &format!("{text}serving_path_idle_ms = -2.0\n"),
        "s.toml",
        PathBuf::from("."),
    )
    .unwrap_err()
    .to_string();
    assert!(bad.contains("serving_path_idle_ms: must be >= 0"), "{bad}");
}

#[test]
fn the_ways_in_and_the_handoff_move_a_lone_request_as_measured() {
    let text = r#"
name = "way-in"
seed = 4
[model]
preset = "smollm2-135m"
[workload]
arrival = { process = "constant", rate_per_s = 2.0 }
sessions = 10
turns = { dist = "constant", value = 1 }
user_tokens = { dist = "uniform", min = 50, max = 400 }
output_tokens = { dist = "uniform", min = 2, max = 30 }
[[setup]]
name = "pair"
hardware = "h100-sxm"
link = "tcp-10g"
mode = "disaggregated"
prefill_workers = 1
decode_workers = 1
serving_path_ms = 1.0
serving_path_idle_ms = 3.0
"#;
    let run = |extra: &str| {
        let scenario = parse(&format!("{text}{extra}"));
        engine::run(&scenario, &scenario.setups[0], RunOptions::default()).unwrap()
    };
    let base = run("");
    assert_eq!(base.records.len(), 10);
    // Requests 500 ms apart: each finds the cluster idle and takes the idle way in, which
    // moves its engine's work and not what the client sees.
    for pair in base.records.windows(2) {
        assert!(pair[0].end_ns + 100_000_000 < pair[1].arrival_ns);
    }
    for front in [
        "serving_path_front_ms = 0.4\n",
        "serving_path_idle_front_ms = 0.4\n",
    ] {
        for (x, y) in base.records.iter().zip(&run(front).records) {
            assert_eq!(y.prefill_start_ns, x.prefill_start_ns + 400_000);
            assert_eq!(y.import_end_ns, x.import_end_ns + 400_000);
            assert_eq!((y.first_token_ns, y.end_ns), (x.first_token_ns, x.end_ns));
        }
    }
    // The busy way in alone is another path's.
    let busy = run("serving_path_front_ms = 0.4\nserving_path_idle_front_ms = 0.0\n");
    for (x, y) in base.records.iter().zip(&busy.records) {
        assert_eq!(y.prefill_start_ns, x.prefill_start_ns);
    }
    // The hand-off comes between the KV landing and its import, before the first token.
    let handoff = run("kv_handoff_ms = 0.3\n");
    for (x, y) in base.records.iter().zip(&handoff.records) {
        assert_eq!(y.transfer_end_ns, x.transfer_end_ns);
        assert_eq!(x.import_start_ns, x.transfer_end_ns);
        assert_eq!(y.import_start_ns, y.transfer_end_ns + 300_000);
        assert_eq!(y.first_token_ns, x.first_token_ns + 300_000);
    }
    let error = |extra: &str| {
        Scenario::parse(&format!("{text}{extra}"), "s.toml", PathBuf::from("."))
            .unwrap_err()
            .to_string()
    };
    let bad = error("serving_path_front_ms = 1.5\nserving_path_idle_front_ms = 0.0\n");
    assert!(
        bad.contains("serving_path_front_ms: must be in 0..=1 (serving_path_ms)"),
        "{bad}"
    );
    let bad = error("serving_path_idle_front_ms = 3.5\n");
    assert!(
        bad.contains("serving_path_idle_front_ms: must be in 0..=3 (the idle serving path)"),
        "{bad}"
    );
    let bad = error("kv_handoff_ms = -0.1\n");
    assert!(bad.contains("kv_handoff_ms: must be >= 0"), "{bad}");
}

/// 30 single-turn requests at `rate` per second, seeded by `seed`, on one prefill and one
/// decode worker of an H100 joined by a 10 Gbit/s TCP link whose remaining fields are `link`.
fn over_tcp(seed: u64, rate: f64, link: &str) -> String {
    format!(
        r#"
name = "tcp"
seed = {seed}
[model]
preset = "smollm2-135m"
[workload]
arrival = {{ process = "poisson", rate_per_s = {rate} }}
sessions = 30
turns = {{ dist = "constant", value = 1 }}
user_tokens = {{ dist = "uniform", min = 100, max = 600 }}
output_tokens = {{ dist = "uniform", min = 5, max = 40 }}
[[link]]
name = "tcp"
kind = "tcp"
bandwidth_gbit_per_s = 10.0
efficiency = 1.0
latency_ns = 0
{link}
[[setup]]
name = "d"
hardware = "h100-sxm"
link = "tcp"
mode = "disaggregated"
prefill_workers = 1
decode_workers = 1
"#
    )
}

/// The first setup of the scenario `text`, run.
fn run_text(text: &str) -> RunOutput {
    let scenario = parse(text);
    engine::run(&scenario, &scenario.setups[0], RunOptions::default()).unwrap()
}

#[test]
fn a_decode_worker_imports_landed_kv_before_its_first_token() {
    let run = |import: &str, rate: f64| {
        let link = format!("per_transfer_overhead_ns = 0\nhost_copy_bytes_per_s = 0.5e9\n{import}");
        run_text(&over_tcp(3, rate, &link))
    };
    // The receiver's copy at the host copy's rate: in the transfer, or left to the engine.
    let (inside, engine) = (run("", 0.2), run("import_bytes_per_s = 0.5e9", 0.2));
    for (a, b) in inside.records.iter().zip(&engine.records) {
        let import_ns = b.transfer_bytes * 2; // 0.5 GB/s
        assert!(b.first_token_ns >= b.transfer_end_ns + import_ns);
        assert_eq!(
            a.transfer_end_ns - b.transfer_end_ns,
            import_ns,
            "one copy less"
        );
        // An idle decode worker: the first token comes when it would have.
        assert!(
            a.first_token_ns.abs_diff(b.first_token_ns) <= 1,
            "{a:?} {b:?}"
        );
    }
    // Busy: the imports hold up the decode worker's steps, so tokens come later.
    let (inside, engine) = (run("", 40.0), run("import_bytes_per_s = 0.5e9", 40.0));
    assert!(engine.summary.itl_ms.p99 > inside.summary.itl_ms.p99);
    assert_eq!(engine.summary.completed, 30);
}

#[test]
fn a_link_spread_scales_each_transfer_by_one_of_its_factors() {
    let text = |spread: &str| {
        let link =
            format!("per_transfer_overhead_ns = 200_000\nhost_copy_bytes_per_s = 5e9\n{spread}");
        over_tcp(5, 0.2, &link)
    };
    let run = |spread: &str| run_text(&text(spread));
    let plain = run("");
    assert_eq!(
        requests_csv(&run("time_spread = [1.0]")),
        requests_csv(&plain),
        "a factor of 1 changes nothing"
    );
    let spread = "time_spread = [0.5, 2.0, 4.0]";
    let (a, b) = (run(spread), run(spread));
    assert_eq!(requests_csv(&a), requests_csv(&b), "the draws are seeded");
    let mut seen = [false; 3];
    for (p, s) in plain.records.iter().zip(&a.records) {
        // Lone transfers on an idle link: each takes a factor of its plain time.
        assert_eq!(p.arrival_ns, s.arrival_ns);
        let ratio = (s.transfer_end_ns - s.transfer_start_ns) as f64
            / (p.transfer_end_ns - p.transfer_start_ns) as f64;
        let i = [0.5, 2.0, 4.0]
            .iter()
            .position(|f| (ratio - f).abs() < 1e-4)
            .unwrap_or_else(|| panic!("a transfer took {ratio} times its plain time"));
        seen[i] = true;
    }
    assert_eq!(seen, [true; 3], "every factor is drawn");
    assert!(a.summary.ttft_ms.p90 > plain.summary.ttft_ms.p90);

    let bad = Scenario::parse(
        &text("time_spread = [1.0, -2.0]"),
        "test.toml",
        PathBuf::from("."),
    )
    .unwrap_err();
    assert!(bad.to_string().contains("time_spread[1]"), "{bad}");
}

/// A small disaggregated setup whose steps draw from `spread` (the body of both step-spread
/// arrays), under open-loop arrivals busy enough to queue.
fn spread_steps(spread: &str) -> Scenario {
    parse(&format!(
        r#"
name = "spread"
seed = 9
[model]
preset = "smollm2-135m"
[workload]
arrival = {{ process = "poisson", rate_per_s = 40.0 }}
sessions = 60
turns = {{ dist = "constant", value = 1 }}
user_tokens = {{ dist = "uniform", min = 100, max = 800 }}
output_tokens = {{ dist = "uniform", min = 10, max = 60 }}
[[setup]]
name = "spread"
hardware = "h100-sxm"
link = "tcp-10g"
mode = "disaggregated"
prefill_workers = 1
decode_workers = 1
prefill_step_spread = [{spread}]
decode_step_spread = [{spread}]
"#
    ))
}

#[test]
fn steps_draw_their_time_from_the_spread_and_noise_seeds_sample_it_over_one_workload() {
    let run = |scenario: &Scenario, noise_seed: u64| {
        let options = RunOptions {
            steps: true,
            noise_seed,
            ..RunOptions::default()
        };
        engine::run(scenario, &scenario.setups[0], options).unwrap()
    };
    let flat = spread_steps("");
    let priced = run(&flat, 0);
    // Every step a real worker ran, with its work: the steps hold every token.
    let decoded: u64 = priced
        .steps
        .iter()
        .map(|s| u64::from(s.work.decode_seqs))
        .sum();
    let prefilled: u64 = priced.steps.iter().map(|s| s.work.prefill_tokens).sum();
    let records = &priced.records;
    assert_eq!(
        prefilled,
        records
            .iter()
            .map(|r| u64::from(r.prompt_tokens - r.cached_tokens))
            .sum::<u64>()
    );
    assert_eq!(
        decoded,
        records
            .iter()
            .map(|r| u64::from(r.output_tokens - 1))
            .sum::<u64>()
    );
    assert!(priced.steps.iter().all(|s| s.end_ns > s.start_ns));
    // A spread: each noise seed draws its own step times over the same requests; a seed's
    // run repeats byte for byte, and seed 0 keeps the scenario seed's own draws.
    let spread = spread_steps("0.8, 1.0, 1.4");
    let csv = |out: &RunOutput| {
        let mut bytes = Vec::new();
        write_requests_csv(&mut bytes, &out.records).unwrap();
        bytes
    };
    let plan = |out: &RunOutput| -> Vec<(u64, u64, u32, u32)> {
        out.records
            .iter()
            .map(|r| (r.request_id, r.arrival_ns, r.prompt_tokens, r.output_tokens))
            .collect()
    };
    let (zero, one, two) = (run(&spread, 0), run(&spread, 1), run(&spread, 2));
    assert_eq!(csv(&run(&spread, 1)), csv(&one));
    assert_eq!(csv(&run(&spread, 0)), csv(&zero));
    assert_eq!(plan(&one), plan(&zero));
    assert_eq!(plan(&two), plan(&zero));
    assert_ne!(csv(&one), csv(&zero));
    assert_ne!(csv(&two), csv(&one));
    // Each worker has a device of its own: every step took its price times a factor of the
    // spread (one factor of 2: twice its price), and every factor came up.
    let cost = spread.setups[0].cost_model(&spread);
    for s in &run(&spread_steps("2.0"), 0).steps {
        assert!((s.end_ns - s.start_ns).abs_diff(2 * cost.step_ns(&s.work)) <= 1);
    }
    let mut drawn = [0; 3];
    for s in &zero.steps {
        let ratio = (s.end_ns - s.start_ns) as f64 / cost.step_ns(&s.work) as f64;
        let i = [0.8, 1.0, 1.4]
            .iter()
            .position(|f| (ratio - f).abs() < 1e-6)
            .unwrap_or_else(|| panic!("{ratio} is no factor of the spread"));
        drawn[i] += 1;
    }
    assert!(drawn.iter().all(|&n| n > 0), "{drawn:?}");
    let bad = setup_error("decode_step_spread = [1.0, 0.0]");
    assert!(
        bad.contains("decode_step_spread[1]: must be in (0, 10]"),
        "{bad}"
    );
}
