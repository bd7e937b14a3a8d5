//! A case's workload measured several times, each on a fresh cluster: near saturation one
//! run's percentiles move by more than the goal between runs of the same trace on the same
//! machine (a queue turns a few percent of step time into tens of percent of latency), so the
//! measured side pools the repeats' requests and shows each repeat's figures beside the pool.

use hw::engine::steps::{self as step_trace, StepRow};
use hw::loadgen::BenchOutput;
use sim::config::{Scenario, Setup};
use sim::engine::{RunOptions, SimError, StepRecord};
use sim::metrics::{RequestRecord, Slo, Summary, TokenGaps};
use std::path::{Path, PathBuf};

/// The repeats' requests as one measurement: ids renumbered after the repeat before's (each
/// repeat's times stay from its own start), percentiles over every request and token gap,
/// rates over the repeats' summed durations.
pub fn pool(runs: &[BenchOutput], slo: &Slo, block_size_tokens: u32) -> BenchOutput {
    if let [run] = runs {
        return run.clone();
    }
    let mut records = Vec::new();
    let mut token_times = Vec::new();
    let mut gaps = TokenGaps::default();
    let (mut request_base, mut conversation_base) = (0, 0);
    for run in runs {
        records.extend(run.records.iter().map(|r| RequestRecord {
            request_id: r.request_id + request_base,
            conversation_id: r.conversation_id + conversation_base,
            ..r.clone()
        }));
        let mut times = run.token_times.clone();
        times.sort_by_key(|t| (t.request_id, t.token_index));
        for pair in times.windows(2) {
            if pair[0].request_id == pair[1].request_id {
                gaps.add(pair[1].time_ns.saturating_sub(pair[0].time_ns), 1);
            }
        }
        token_times.extend(times.into_iter().map(|mut t| {
            t.request_id += request_base;
            t
        }));
        let past = |id: fn(&RequestRecord) -> u64| {
            run.records.iter().map(|r| id(r) + 1).max().unwrap_or(0)
        };
        request_base += past(|r| r.request_id);
        conversation_base += past(|r| r.conversation_id);
    }
    let mut summary = sim::metrics::summarize(&records, &gaps, &[], slo, block_size_tokens);
    // Each repeat's times start at its own zero: the pool's duration is the repeats' sum.
    let duration_s: f64 = runs.iter().map(|r| r.summary.duration_s).sum();
    let total = |rate: fn(&Summary) -> f64| -> f64 {
        let count: f64 = runs
            .iter()
            .map(|r| rate(&r.summary) * r.summary.duration_s)
            .sum();
        if duration_s > 0.0 {
            count / duration_s
        } else {
            0.0
        }
    };
    summary.throughput_req_per_s = total(|s| s.throughput_req_per_s);
    summary.output_tokens_per_s = total(|s| s.output_tokens_per_s);
    summary.goodput_req_per_s = total(|s| s.goodput_req_per_s);
    summary.duration_s = duration_s;
    BenchOutput {
        model: runs.first().map_or_else(String::new, |r| r.model.clone()),
        records,
        token_times,
        summary,
        delayed_sends: runs.iter().map(|r| r.delayed_sends).sum(),
    }
}

/// Samples of the simulator's noise pooled into one prediction: each draws its step and
/// transfer times from the spreads the probes measured, over the same workload.
pub const PREDICTED_SAMPLES: u64 = 16;

/// The simulator's prediction of `setup`, pooled over [`PREDICTED_SAMPLES`] noise seeds as
/// the measured repeats are pooled (a near-saturated queue makes one sample's percentiles
/// move by as much as the goal), and the steps of the first sample. The samples take the
/// measured repeats' speeds in turn (`[prefill, decode]` factors on the setup's step scales;
/// none: all at its own).
pub fn predict(
    scenario: &Scenario,
    setup: &Setup,
    repeat_speeds: &[[f64; 2]],
) -> Result<(BenchOutput, Vec<StepRecord>), SimError> {
    let mut samples = Vec::new();
    let mut steps = Vec::new();
    for noise_seed in 0..PREDICTED_SAMPLES {
        let [prefill, decode] = repeat_speeds
            .get((noise_seed as usize) % repeat_speeds.len().max(1))
            .copied()
            .unwrap_or([1.0; 2]);
        let setup = Setup {
            prefill_step_scale: setup.prefill_step_scale * prefill,
            decode_step_scale: setup.decode_step_scale * decode,
            ..setup.clone()
        };
        let options = RunOptions {
            token_times: true,
            steps: noise_seed == 0,
            noise_seed,
            ..RunOptions::default()
        };
        let run = sim::engine::run(scenario, &setup, options)?;
        if noise_seed == 0 {
            steps = run.steps;
        }
        samples.push(BenchOutput {
            model: scenario.model.name.clone(),
            records: run.records,
            token_times: run.token_times,
            summary: run.summary,
            delayed_sends: 0,
        });
    }
    let block_size = hw::loadgen::block_size_tokens(scenario);
    Ok((pool(&samples, &scenario.slo, block_size), steps))
}

/// How late each repeat sent its trace's first turns against the times the simulator took
/// (follow-up turns leave after their own side's answer): the median and the largest, in ns.
pub fn send_lateness(runs: &[BenchOutput], predicted: &[RequestRecord]) -> Option<(u64, u64)> {
    let planned: std::collections::HashMap<u64, u64> = predicted
        .iter()
        .filter(|r| r.turn == 0)
        .map(|r| (r.request_id, r.arrival_ns))
        .collect();
    let mut late: Vec<u64> = runs
        .iter()
        .flat_map(|run| &run.records)
        .filter(|r| r.turn == 0)
        .filter_map(|r| Some(r.arrival_ns.saturating_sub(*planned.get(&r.request_id)?)))
        .collect();
    late.sort_unstable();
    Some((*late.get(late.len().checked_sub(1)? / 2)?, *late.last()?))
}

/// One line on the repeats' own figures, the spread the pool evens out, their speeds (see
/// `Measurement::repeat_speeds`) and how late their sends left ([`send_lateness`]).
pub fn describe(runs: &[BenchOutput], speeds: &[[f64; 2]], predicted: &[RequestRecord]) -> String {
    let list = |f: fn(&Summary) -> f64, digits: usize| -> String {
        runs.iter()
            .map(|r| format!("{:.digits$}", f(&r.summary)))
            .collect::<Vec<_>>()
            .join(" / ")
    };
    let late = send_lateness(runs, predicted).map_or(String::new(), |(median, max)| {
        format!(
            "; first turns sent {:.3} ms after their planned times at the median, {:.3} ms at \
             most",
            median as f64 / 1e6,
            max as f64 / 1e6
        )
    });
    let speed = |k: usize| -> String {
        speeds
            .iter()
            .map(|s| format!("{:.3}", s[k]))
            .collect::<Vec<_>>()
            .join(" / ")
    };
    let speeds = if speeds.len() > 1 {
        format!(
            "; each repeat's step times against the first's (its warm-up's steps alone on their \
             device), which the predicted samples take in turn: prefill {}, decode {}",
            speed(0),
            speed(1)
        )
    } else {
        String::new()
    };
    format!(
        "measured {} repeat(s) of the workload, each on a fresh cluster warmed by four requests, \
         their requests pooled; each repeat's TTFT p50 {} ms, ITL p50 {} ms, E2E p50 {} ms, \
         throughput {} req/s{speeds}{late}",
        runs.len(),
        list(|s| s.ttft_ms.p50, 1),
        list(|s| s.itl_ms.p50, 1),
        list(|s| s.e2e_ms.p50, 1),
        list(|s| s.throughput_req_per_s, 3),
    )
}

/// The step traces of the runs so far, moved aside while the next cluster writes its own
/// (`steps-W.csv` becomes `steps-W.csv.earlier`; nothing is lost if that cluster fails).
pub struct EarlierSteps {
    moved: Vec<(PathBuf, PathBuf)>,
}

impl EarlierSteps {
    pub fn move_aside(dir: &Path) -> Result<EarlierSteps, String> {
        let mut moved = Vec::new();
        for path in crate::steps::trace_paths(dir)? {
            let aside = path.with_extension("csv.earlier");
            std::fs::rename(&path, &aside)
                .map_err(|e| format!("{} -> {}: {e}", path.display(), aside.display()))?;
            moved.push((path, aside));
        }
        Ok(EarlierSteps { moved })
    }

    /// Puts each trace back with the new cluster's steps from `since_ns` (its workload's
    /// start: its warm-up is left out) after the earlier ones.
    pub fn join(self, since_ns: u64) -> Result<(), String> {
        for (path, aside) in self.moved {
            let mut rows = step_trace::read(&aside)?;
            if path.exists() {
                rows.extend(
                    step_trace::read(&path)?
                        .into_iter()
                        .filter(|r| r.start_ns >= since_ns),
                );
            }
            write_rows(&path, &rows)?;
            std::fs::remove_file(&aside).map_err(|e| format!("{}: {e}", aside.display()))?;
        }
        Ok(())
    }
}

fn write_rows(path: &Path, rows: &[StepRow]) -> Result<(), String> {
    let error = |e: csv::Error| format!("{}: {e}", path.display());
    let mut out = csv::Writer::from_path(path).map_err(error)?;
    for row in rows {
        out.serialize(row).map_err(error)?;
    }
    out.flush().map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sim::engine::TokenTime;
    use sim::metrics::Outcome;

    fn record(id: u64, conversation: u64, arrival_ms: u64, ttft_ms: u64) -> RequestRecord {
        let ms = 1_000_000;
        RequestRecord {
            request_id: id,
            conversation_id: conversation,
            outcome: Outcome::Completed,
            prompt_tokens: 16,
            output_tokens: 3,
            arrival_ns: arrival_ms * ms,
            prefill_start_ns: arrival_ms * ms,
            prefill_end_ns: (arrival_ms + ttft_ms) * ms,
            first_token_ns: (arrival_ms + ttft_ms) * ms,
            end_ns: (arrival_ms + ttft_ms + 20) * ms,
            ..RequestRecord::default()
        }
    }

    fn run(records: Vec<RequestRecord>, gap_ms: u64) -> BenchOutput {
        let slo = Slo {
            ttft_ms: 1000.0,
            tpot_ms: 100.0,
        };
        let mut token_times = Vec::new();
        let mut gaps = TokenGaps::default();
        for r in &records {
            for i in 0..3u32 {
                token_times.push(TokenTime {
                    request_id: r.request_id,
                    token_index: i,
                    time_ns: r.first_token_ns + u64::from(i) * gap_ms * 1_000_000,
                });
            }
            gaps.add(gap_ms * 1_000_000, 2);
        }
        let summary = sim::metrics::summarize(&records, &gaps, &[], &slo, 16);
        BenchOutput {
            model: "m".into(),
            records,
            token_times,
            summary,
            delayed_sends: 1,
        }
    }

    #[test]
    fn the_pool_takes_every_repeat_with_ids_after_the_one_before() {
        let a = run(vec![record(0, 0, 0, 100), record(1, 1, 500, 300)], 10);
        let b = run(vec![record(0, 0, 0, 200), record(1, 1, 500, 400)], 30);
        let slo = Slo {
            ttft_ms: 1000.0,
            tpot_ms: 100.0,
        };
        let pooled = pool(&[a.clone(), b.clone()], &slo, 16);
        let ids: Vec<(u64, u64)> = pooled
            .records
            .iter()
            .map(|r| (r.request_id, r.conversation_id))
            .collect();
        assert_eq!(ids, [(0, 0), (1, 1), (2, 2), (3, 3)]);
        assert_eq!(pooled.summary.completed, 4);
        assert_eq!(pooled.delayed_sends, 2);
        // TTFTs 100, 200, 300, 400 ms: the pool's median lies between the repeats' own.
        assert!(
            (pooled.summary.ttft_ms.p50 - 250.0).abs() < 51.0,
            "{:?}",
            pooled.summary
        );
        assert!(pooled.summary.ttft_ms.p99 > 390.0);
        // Half the gaps are 10 ms, half 30 ms.
        assert!(pooled.summary.itl_ms.p90 > 29.0 && pooled.summary.itl_ms.p50 < 31.0);
        // Rates over the summed durations: 4 requests over both repeats' time, not one's.
        let duration = a.summary.duration_s + b.summary.duration_s;
        assert!((pooled.summary.duration_s - duration).abs() < 1e-9);
        assert!((pooled.summary.throughput_req_per_s - 4.0 / duration).abs() < 1e-9);
        let token_ids: Vec<u64> = pooled.token_times.iter().map(|t| t.request_id).collect();
        assert_eq!(token_ids, [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]);
        // Request 1 planned 0.2 ms after both repeats sent it (a send is never early: that
        // counts as on time), then 0.5 ms before.
        let mut predicted = vec![record(0, 0, 0, 100), record(1, 1, 500, 300)];
        predicted[1].arrival_ns += 200_000;
        assert_eq!(
            send_lateness(&[a.clone(), b.clone()], &predicted),
            Some((0, 0))
        );
        predicted[1].arrival_ns -= 700_000;
        assert_eq!(
            send_lateness(&[a.clone(), b.clone()], &predicted),
            Some((0, 500_000))
        );
        let line = describe(
            &[a.clone(), b.clone()],
            &[[1.0, 1.0], [1.02, 1.125]],
            &predicted,
        );
        assert!(
            line.contains("2 repeat(s)") && line.contains("TTFT p50 ") && line.contains("0.500 ms"),
            "{line}"
        );
        assert!(
            line.contains("prefill 1.000 / 1.020, decode 1.000 / 1.125"),
            "{line}"
        );
        // Without speeds (runs before the warm-ups timed them) the line names none.
        assert!(!describe(&[a, b], &[], &predicted).contains("prefill"));
    }

    /// One request every 10 s on a roofline H100: never a queue, so a step's time is its
    /// latency's.
    fn idle_scenario() -> Scenario {
        let text = r#"
name = "idle"
seed = 3
[model]
preset = "smollm2-135m"
[workload]
arrival = { process = "constant", rate_per_s = 0.1 }
sessions = 4
turns = { dist = "constant", value = 1 }
user_tokens = { dist = "constant", value = 200 }
output_tokens = { dist = "constant", value = 20 }
[[setup]]
name = "one"
hardware = "h100-sxm"
link = "tcp-10g"
mode = "aggregated"
aggregated_workers = 1
"#;
        Scenario::parse(text, "idle.toml", std::path::PathBuf::from(".")).unwrap()
    }

    #[test]
    fn the_prediction_pools_its_samples_and_they_take_the_repeats_speeds_in_turn() {
        let scenario = idle_scenario();
        let setup = &scenario.setups[0];
        let (plain, steps) = predict(&scenario, setup, &[]).unwrap();
        let n = PREDICTED_SAMPLES as usize;
        assert_eq!(plain.records.len(), 4 * n);
        assert!(!steps.is_empty());
        // No spread: every sample is the first, renumbered.
        let e2e = |r: &RequestRecord| r.end_ns - r.arrival_ns;
        let first: Vec<u64> = plain.records[..4].iter().map(e2e).collect();
        for (i, r) in plain.records.iter().enumerate() {
            assert_eq!(r.request_id, i as u64);
            assert_eq!(e2e(r), first[i % 4]);
        }
        // Every other sample at twice the step times: its requests took longer by their steps'.
        let (slow, _) = predict(&scenario, setup, &[[1.0, 1.0], [2.0, 2.0]]).unwrap();
        for (i, r) in slow.records.iter().enumerate() {
            let (was, now) = (first[i % 4], e2e(r));
            if (i / 4) % 2 == 0 {
                assert_eq!(now, was);
            } else {
                assert!(now as f64 > 1.5 * was as f64, "{now} against {was}");
            }
        }
    }

    #[test]
    fn one_repeat_pools_to_itself() {
        let a = run(vec![record(0, 0, 0, 100), record(1, 1, 500, 300)], 10);
        let slo = Slo {
            ttft_ms: 1000.0,
            tpot_ms: 100.0,
        };
        let pooled = pool(std::slice::from_ref(&a), &slo, 16);
        assert_eq!(pooled.records, a.records);
        assert_eq!(pooled.summary, a.summary);
    }

    fn step(start_ns: u64) -> StepRow {
        StepRow {
            start_ns,
            forward_ns: 5,
            end_ns: start_ns + 10,
            decode_seqs: 2,
            decode_context_tokens: 40,
            prefill_seqs: 0,
            prefill_tokens: 0,
            prefill_attention_pairs: 0.0,
            prefill_kv_read_tokens: 0,
        }
    }

    fn write(path: &Path, rows: &[StepRow]) {
        write_rows(path, rows).unwrap();
    }

    #[test]
    fn a_repeats_steps_join_the_earlier_ones_without_its_warm_up() {
        let dir = tempfile::tempdir().unwrap();
        let trace = dir.path().join("steps-decode-1.csv");
        write(&trace, &[step(100), step(200)]);
        let earlier = EarlierSteps::move_aside(dir.path()).unwrap();
        assert!(!trace.exists());
        // The new cluster's trace: a warm-up step, then the workload's from 1000.
        write(&trace, &[step(900), step(1000), step(1100)]);
        earlier.join(1000).unwrap();
        let starts: Vec<u64> = step_trace::read(&trace)
            .unwrap()
            .iter()
            .map(|r| r.start_ns)
            .collect();
        assert_eq!(starts, [100, 200, 1000, 1100]);
        assert_eq!(crate::steps::trace_paths(dir.path()).unwrap(), [trace]);
    }

    #[test]
    fn a_trace_the_new_cluster_never_wrote_keeps_the_earlier_steps() {
        let dir = tempfile::tempdir().unwrap();
        let trace = dir.path().join("steps-prefill-0.csv");
        write(&trace, &[step(100)]);
        let earlier = EarlierSteps::move_aside(dir.path()).unwrap();
        earlier.join(1000).unwrap();
        assert_eq!(step_trace::read(&trace).unwrap(), [step(100)]);
        assert!(!dir.path().join("steps-prefill-0.csv.earlier").exists());
    }
}
