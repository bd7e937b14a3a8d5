//! The committed calibration profile and the scenario that runs on it.

use sim::calibration::Profile;
use sim::config::{Scenario, StepTimes};
use sim::engine::{self, RunOptions};
use sim::metrics::{Outcome, write_requests_csv};
use std::path::PathBuf;

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

#[test]
fn the_committed_profile_reads_and_reproduces_its_grids() {
    let profile = Profile::load(&repo("configs/calibration/smollm2-135m-f32-cpu.toml"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(profile.meta.model, "smollm2-135m");
    let rows = profile.accuracy().unwrap();
    for row in rows
        .iter()
        .filter(|r| !r.what.contains("mixed") && !r.what.contains("transfers"))
    {
        assert_eq!(row.max_rel_error, 0.0, "{}", row.what);
    }
    assert!(profile.link("tcp-loopback").is_some());
}

#[test]
fn the_calibrated_scenario_runs_on_measured_step_times_deterministically() {
    let scenario = Scenario::load(&repo("configs/scenarios/smollm2-cpu-calibrated.toml"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(scenario.setups.len(), 2);
    for setup in &scenario.setups {
        assert!(matches!(setup.step_times, StepTimes::Measured(_)));
        assert_eq!(setup.kv_blocks, 256);
        assert_eq!(setup.link.name, "tcp-loopback");
        let csv = |_| {
            let out = engine::run(&scenario, setup, RunOptions::default()).unwrap();
            assert!(out.records.iter().all(|r| r.outcome == Outcome::Completed));
            let mut bytes = Vec::new();
            write_requests_csv(&mut bytes, &out.records).unwrap();
            bytes
        };
        assert_eq!(csv(0), csv(1), "setup {}", setup.name);
    }
}
