//! A committed measurement priced again: the simulator runs on a case as the current model
//! derives it, and its prediction is laid beside what the case's real run measured (that run's
//! `comparison.csv`, `requests-measured.csv` and step traces), with no cluster and no GPU. So
//! a change to the model can be judged on every machine's measurements without rerunning them.

use crate::case::{BLOCK_SIZE_TOKENS, LinkProbe, ServingPaths};
use crate::compare::{Comparison, Row, Unit};
use crate::parts::{self, Part};
use crate::run::{Prepared, RunError, cdf};
use crate::steps::{self, StepKind};
use sim::metrics::RequestRecord;
use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

/// What a real run leaves beside its reports for pricing it again (`measurement.toml`).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Measurement {
    /// When the workload started, ns since the UNIX epoch (the step traces' clock): the
    /// serving-path probes' steps come before.
    pub workload_start_ns: u64,
    /// The serving path the back-to-back probes measured.
    pub serving_path_ns: u64,
    /// The serving path the idle probes measured (runs before them have none).
    #[serde(default)]
    pub serving_path_idle_ns: Option<u64>,
    /// The back-to-back probes' way in: the server's acceptance to the prefill's first step
    /// (runs before it was probed have none).
    #[serde(default)]
    pub serving_path_front_ns: Option<u64>,
    /// The serving path taken apart (runs before the probes did have none): the idle probes'
    /// way in, the way back of probes sent while another was in flight, and on a cluster that
    /// moves KV the back-to-back probes' hand-off of landed KV to the decode worker's import.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving_path_idle_front_ns: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving_path_loaded_back_ns: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_handoff_ns: Option<u64>,
    /// The KV transfers of the probes, on a cluster that moves KV (runs before the long probes
    /// have none).
    #[serde(default)]
    pub link: Option<LinkProbe>,
    /// When the probes ended and the first repeat's warm-up began (runs before that warm-up
    /// have none: their probes end at `workload_start_ns`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probes_end_ns: Option<u64>,
    /// Each repeat's machine speed, `[prefill, decode]`: its warm-up's steps against the
    /// first repeat's warm-up's, as times (1.1: ran a tenth slower). Empty in runs before it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub repeat_speeds: Vec<[f64; 2]>,
}

pub const MEASUREMENT_FILE: &str = "measurement.toml";

fn failed(path: &Path, e: impl std::fmt::Display) -> RunError {
    RunError::Write {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

impl Measurement {
    pub fn write(&self, dir: &Path) -> Result<(), RunError> {
        let path = dir.join(MEASUREMENT_FILE);
        let text = toml::to_string(self).map_err(|e| failed(&path, e))?;
        std::fs::write(&path, text).map_err(|e| failed(&path, e))
    }

    /// The measurement of a run's directory. Runs written before `measurement.toml` existed
    /// hold the path in their `scenario.toml`, and their workload starts at the first step
    /// that is not a probe's (a one-sequence prefill shorter than a KV block).
    pub fn read(dir: &Path, block_size_tokens: u32) -> Result<Measurement, RunError> {
        let path = dir.join(MEASUREMENT_FILE);
        if path.exists() {
            let text = std::fs::read_to_string(&path).map_err(|e| failed(&path, e))?;
            return toml::from_str(&text).map_err(|e| failed(&path, e.message()));
        }
        let path = dir.join("scenario.toml");
        let text = std::fs::read_to_string(&path).map_err(|e| failed(&path, e))?;
        let doc: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| failed(&path, e))?;
        let ms = doc
            .get("setup")
            .and_then(|s| s.as_array()?.first()?.get("serving_path_ms")?.as_float())
            .ok_or_else(|| failed(&path, "setup[0].serving_path_ms: missing"))?;
        Ok(Measurement {
            workload_start_ns: first_workload_step_ns(dir, block_size_tokens)?,
            serving_path_ns: (ms * 1e6).round() as u64,
            serving_path_idle_ns: None,
            serving_path_front_ns: None,
            serving_path_idle_front_ns: None,
            serving_path_loaded_back_ns: None,
            kv_handoff_ns: None,
            link: None,
            probes_end_ns: None,
            repeat_speeds: Vec::new(),
        })
    }

    /// Where the probes' steps end.
    pub fn probes_end_ns(&self) -> u64 {
        self.probes_end_ns.unwrap_or(self.workload_start_ns)
    }

    /// The serving paths the probes measured, with their ways in.
    pub fn serving_paths(&self) -> ServingPaths {
        ServingPaths {
            busy_ns: self.serving_path_ns,
            idle_ns: self.serving_path_idle_ns,
            front_ns: self.serving_path_front_ns,
            idle_front_ns: self.serving_path_idle_front_ns,
        }
    }
}

/// The start of the earliest step, over the run's step traces, that is not a probe's.
fn first_workload_step_ns(dir: &Path, block_size_tokens: u32) -> Result<u64, RunError> {
    let mut first = u64::MAX;
    for path in steps::trace_paths(dir).map_err(RunError::Steps)? {
        let rows = hw::engine::steps::read(&path).map_err(RunError::Steps)?;
        let probe = |r: &hw::engine::steps::StepRow| {
            r.decode_seqs == 0
                && r.prefill_seqs == 1
                && r.prefill_kv_read_tokens < u64::from(block_size_tokens)
        };
        if let Some(r) = rows.iter().find(|r| !probe(r)) {
            first = first.min(r.start_ns);
        }
    }
    Ok(if first == u64::MAX { 0 } else { first })
}

/// Reads a run's `comparison.csv`.
pub fn read_comparison(path: &Path) -> Result<Comparison, RunError> {
    let mut reader = csv::Reader::from_path(path).map_err(|e| failed(path, e))?;
    let mut rows = Vec::new();
    for (i, record) in reader.records().enumerate() {
        let record = record.map_err(|e| failed(path, e))?;
        let field = |k: usize, name: &str| {
            record
                .get(k)
                .ok_or_else(|| failed(path, format!("row {}: no {name}", i + 1)))
        };
        let number = |k: usize, name: &str| {
            field(k, name)?
                .parse::<f64>()
                .map_err(|e| failed(path, format!("row {}: {name}: {e}", i + 1)))
        };
        let unit = match field(1, "unit")? {
            "ms" => Unit::Ms,
            "req/s" => Unit::ReqPerS,
            "share" => Unit::Share,
            other => return Err(failed(path, format!("row {}: unit `{other}`", i + 1))),
        };
        rows.push(Row {
            metric: field(0, "metric")?.to_string(),
            unit,
            predicted: number(2, "predicted")?,
            measured: number(3, "measured")?,
        });
    }
    Ok(Comparison { rows })
}

/// A case's measurement and its new prediction.
pub struct Repriced {
    pub name: String,
    /// Where the measurement was read.
    pub measured_dir: PathBuf,
    /// Where the prediction was written.
    pub dir: PathBuf,
    pub measurement: Measurement,
    pub comparison: Comparison,
    pub parts: Vec<Part>,
    pub steps: Vec<StepKind>,
    /// The link the prediction moved KV on (a disaggregated case's).
    pub link: Option<sim::network::LinkSpec>,
    /// How the prediction priced steps (see `run::CaseRun`).
    pub step_prices: crate::run::StepPrices,
}

/// Prices the run measured in `measured_dir` with the prepared case's model, writing the
/// prediction (`scenario.toml`, `requests-predicted.csv`, `comparison.csv`, `cdf.svg`) into
/// the prepared directory.
pub fn reprice_case(p: &Prepared, measured_dir: &Path) -> Result<Repriced, RunError> {
    let measurement = Measurement::read(measured_dir, BLOCK_SIZE_TOKENS)?;
    let (_, scenario) = p
        .case
        .derive_scenario(&p.dir, Some((&measurement, measured_dir)))?;
    let setup = &scenario.setups[0];
    let (predicted, predicted_steps) =
        crate::repeats::predict(&scenario, setup, &measurement.repeat_speeds)?;
    steps::write_predicted(&p.dir, &predicted_steps, &setup.workers).map_err(RunError::Steps)?;
    let then = read_comparison(&measured_dir.join("comparison.csv"))?;
    let mut comparison = Comparison::new(&predicted.summary, &predicted.summary);
    for row in &mut comparison.rows {
        row.measured = then
            .row(&row.metric)
            .ok_or_else(|| {
                failed(
                    &measured_dir.join("comparison.csv"),
                    format!("no `{}` row", row.metric),
                )
            })?
            .measured;
    }
    let path = measured_dir.join("requests-measured.csv");
    let file = File::open(&path).map_err(|e| failed(&path, e))?;
    let measured: Vec<RequestRecord> =
        sim::metrics::read_requests_csv(file).map_err(|e| failed(&path, e))?;
    let steps = steps::compare(
        measured_dir,
        setup.cost_model(&scenario).as_ref(),
        measurement.workload_start_ns,
        setup.workers_per_device,
    )
    .map_err(RunError::Steps)?;
    let parts = parts::compare(&predicted.records, &measured);
    let write = |name: &str, f: &dyn Fn(BufWriter<File>) -> Result<(), String>| {
        let path = p.dir.join(name);
        let file = File::create(&path).map_err(|e| failed(&path, e))?;
        f(BufWriter::new(file)).map_err(|e| failed(&path, e))
    };
    write("requests-predicted.csv", &|w| {
        sim::metrics::write_requests_csv(w, &predicted.records).map_err(|e| e.to_string())
    })?;
    write("comparison.csv", &|w| {
        comparison.write_csv(w).map_err(|e| e.to_string())
    })?;
    let svg = cdf(&p.case.name, &predicted.records, &measured);
    let path = p.dir.join("cdf.svg");
    std::fs::write(&path, svg).map_err(|e| failed(&path, e))?;
    Ok(Repriced {
        name: p.case.name.clone(),
        measured_dir: measured_dir.to_path_buf(),
        dir: p.dir.clone(),
        link: (p.case.cluster.mode == crate::case::Mode::Disaggregated).then(|| setup.link.clone()),
        step_prices: crate::run::StepPrices::of(setup),
        measurement,
        comparison,
        parts,
        steps,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = "start_ns,forward_ns,end_ns,decode_seqs,decode_context_tokens,prefill_seqs,prefill_tokens,prefill_attention_pairs,prefill_kv_read_tokens\n";

    #[test]
    fn a_measurement_reads_back_and_older_runs_fall_back_to_their_scenario() {
        let dir = tempfile::tempdir().unwrap();
        let m = Measurement {
            workload_start_ns: 1_700_000_000_000_000_000,
            serving_path_ns: 412_000,
            serving_path_idle_ns: Some(1_034_000),
            serving_path_front_ns: Some(250_000),
            serving_path_idle_front_ns: Some(300_000),
            serving_path_loaded_back_ns: Some(600_000),
            kv_handoff_ns: Some(380_000),
            link: Some(LinkProbe {
                short_bytes: 180_224,
                short_transfer_ns: 310_000,
                long_bytes: 5_767_168,
                long_transfer_ns: 2_900_000,
                long_serving_path_ns: 2_500_000,
                long_transfer_samples_ns: vec![2_900_000, 3_100_000, 7_400_000],
                short_import_ns: Some(80_000),
                long_import_ns: Some(2_300_000),
            }),
            probes_end_ns: Some(1_699_999_999_000_000_000),
            repeat_speeds: vec![[1.0, 1.0], [1.02, 1.1]],
        };
        m.write(dir.path()).unwrap();
        assert_eq!(Measurement::read(dir.path(), 16).unwrap(), m);
        assert_eq!(
            m.serving_paths(),
            ServingPaths {
                busy_ns: 412_000,
                idle_ns: Some(1_034_000),
                front_ns: Some(250_000),
                idle_front_ns: Some(300_000),
            }
        );
        // Written before the idle probes.
        std::fs::write(
            dir.path().join(MEASUREMENT_FILE),
            "workload_start_ns = 5\nserving_path_ns = 412000\n",
        )
        .unwrap();
        let before = Measurement::read(dir.path(), 16).unwrap();
        assert_eq!((before.serving_path_idle_ns, &before.link), (None, &None));
        assert_eq!((before.probes_end_ns(), before.repeat_speeds.len()), (5, 0));
        assert_eq!(before.serving_paths().idle_ms(), None);
        assert_eq!(before.serving_paths().front_ms(), None);

        // No measurement.toml: the path from scenario.toml, the start at the first step that
        // is not a probe's (two 8-token probes, then a 200-token prefill).
        let old = tempfile::tempdir().unwrap();
        std::fs::write(
            old.path().join("scenario.toml"),
            "[[setup]]\nname = \"x\"\nserving_path_ms = 0.291\n",
        )
        .unwrap();
        let steps = format!(
            "{HEADER}100,1,200,0,0,1,8,36,8\n300,1,400,0,0,1,8,36,8\n900,1,990,0,0,1,200,20100,200\n1000,1,1100,1,201,0,0,0,0\n"
        );
        std::fs::write(old.path().join("steps-aggregated-0.csv"), steps).unwrap();
        let read = Measurement::read(old.path(), 16).unwrap();
        assert_eq!(
            read,
            Measurement {
                workload_start_ns: 900,
                serving_path_ns: 291_000,
                serving_path_idle_ns: None,
                serving_path_front_ns: None,
                serving_path_idle_front_ns: None,
                serving_path_loaded_back_ns: None,
                kv_handoff_ns: None,
                link: None,
                probes_end_ns: None,
                repeat_speeds: Vec::new(),
            }
        );
        std::fs::write(
            old.path().join("scenario.toml"),
            "[[setup]]\nname = \"x\"\n",
        )
        .unwrap();
        let e = Measurement::read(old.path(), 16).unwrap_err().to_string();
        assert!(e.contains("setup[0].serving_path_ms: missing"), "{e}");
    }

    #[test]
    fn a_comparison_reads_back_and_a_bad_row_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("comparison.csv");
        let c = Comparison {
            rows: vec![
                Row {
                    metric: "TTFT p50".into(),
                    unit: Unit::Ms,
                    predicted: 2.5,
                    measured: 3.25,
                },
                Row {
                    metric: "Prefix hit rate".into(),
                    unit: Unit::Share,
                    predicted: 0.5,
                    measured: 0.5,
                },
            ],
        };
        c.write_csv(File::create(&path).unwrap()).unwrap();
        assert_eq!(read_comparison(&path).unwrap(), c);
        std::fs::write(
            &path,
            "metric,unit,predicted,measured,error_pct\nTTFT p50,us,1,2,\n",
        )
        .unwrap();
        let e = read_comparison(&path).unwrap_err().to_string();
        assert!(e.contains("row 1: unit `us`"), "{e}");
        std::fs::write(
            &path,
            "metric,unit,predicted,measured,error_pct\nTTFT p50,ms,1,x,\n",
        )
        .unwrap();
        let e = read_comparison(&path).unwrap_err().to_string();
        assert!(e.contains("row 1: measured"), "{e}");
    }
}
