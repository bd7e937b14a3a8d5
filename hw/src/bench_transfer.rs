//! `disagg-hw bench-transfer`: KV transfer bandwidth from one GPU to another by message size,
//! through a transport (`cuda-p2p`, or `tcp` from GPU memory on loopback) and, in the same
//! run and on the same bytes, without one: a plain `cuMemcpyPeerAsync` between preallocated
//! buffers and copies to and from pinned host memory. Every time is the median of repeats,
//! taken on the host from the start of the send (or copy) to its completion.

use models::ModelSpec;
use std::fmt::Write as _;

/// A message size: what was asked for and how it reads in the report.
#[derive(Clone, Debug, PartialEq)]
pub struct Size {
    pub label: String,
    pub bytes: usize,
}

/// Parses `--sizes` items: a byte count with an optional unit (`k`, `M`, `G` powers of 1000;
/// `Ki`, `Mi`, `Gi` powers of 1024; a trailing `B` allowed), or `PRESET:TOKENS`, the bf16 KV
/// of that many tokens of a model preset.
pub fn parse_size(item: &str) -> Result<Size, String> {
    let bad = |why: &str| format!("--sizes: `{item}`: {why}");
    if let Some((model, tokens)) = item.split_once(':') {
        let spec = ModelSpec::preset(model).ok_or_else(|| {
            bad(&format!(
                "unknown model preset (one of {})",
                ModelSpec::PRESETS.join(", ")
            ))
        })?;
        let tokens: u64 = tokens
            .parse()
            .map_err(|_| bad("expected PRESET:TOKENS with a whole number of tokens"))?;
        let bytes = tokens * spec.kv_bytes_per_token(models::DType::Bf16);
        return Ok(Size {
            label: format!("{model} KV, {tokens} tokens"),
            bytes: bytes as usize,
        });
    }
    let trimmed = item.strip_suffix('B').unwrap_or(item);
    let (number, scale) = [
        ("Ki", 1u64 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("k", 1_000),
        ("K", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
    ]
    .into_iter()
    .find_map(|(unit, scale)| trimmed.strip_suffix(unit).map(|n| (n, scale)))
    .unwrap_or((trimmed, 1));
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| bad("expected a size such as 4M, 11.5MB, 256Mi or tinyllama-1.1b:512"))?;
    let bytes = value * scale as f64;
    if !(bytes.is_finite() && bytes >= 1.0 && bytes <= (1u64 << 40) as f64) {
        return Err(bad("must be between 1 byte and 1 TiB"));
    }
    Ok(Size {
        label: item.to_string(),
        bytes: bytes.round() as usize,
    })
}

/// One message size measured.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub transport: String,
    /// How the bytes went (`peer`, `staged`, `same-gpu`, `pinned+socket`).
    pub route: String,
    pub size: String,
    /// The message: whole blocks, so at least the size asked for.
    pub bytes: usize,
    pub blocks: usize,
    pub repeats: usize,
    pub transport_ns: u64,
    pub peer_copy_ns: u64,
    pub to_host_ns: u64,
    pub from_host_ns: u64,
}

impl Row {
    /// GB/s (10^9 bytes) of `bytes` in `ns`.
    fn gb_per_s(&self, ns: u64) -> f64 {
        self.bytes as f64 / ns.max(1) as f64
    }

    pub fn transport_gb_per_s(&self) -> f64 {
        self.gb_per_s(self.transport_ns)
    }

    pub fn peer_copy_gb_per_s(&self) -> f64 {
        self.gb_per_s(self.peer_copy_ns)
    }

    /// The transport's bandwidth over the plain peer copy's.
    pub fn ratio(&self) -> f64 {
        self.peer_copy_ns as f64 / self.transport_ns.max(1) as f64
    }
}

/// The rows as a markdown table.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| transport | route | message | bytes | blocks | repeats | transport GB/s | plain peer copy GB/s | ratio | pinned D2H GB/s | pinned H2D GB/s |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {:.1} | {:.1} | {:.2} | {:.1} | {:.1} |",
            r.transport,
            r.route,
            r.size,
            r.bytes,
            r.blocks,
            r.repeats,
            r.transport_gb_per_s(),
            r.peer_copy_gb_per_s(),
            r.ratio(),
            r.gb_per_s(r.to_host_ns),
            r.gb_per_s(r.from_host_ns),
        );
    }
    out
}

/// The rows as CSV, one line each, with a header.
pub fn write_csv(mut w: impl std::io::Write, rows: &[Row]) -> std::io::Result<()> {
    writeln!(
        w,
        "transport,route,size,bytes,blocks,repeats,transport_ns,transport_gb_per_s,\
         peer_copy_ns,peer_copy_gb_per_s,ratio,to_host_ns,to_host_gb_per_s,from_host_ns,\
         from_host_gb_per_s"
    )?;
    for r in rows {
        writeln!(
            w,
            "{},{},\"{}\",{},{},{},{},{:.3},{},{:.3},{:.4},{},{:.3},{},{:.3}",
            r.transport,
            r.route,
            r.size.replace('"', "'"),
            r.bytes,
            r.blocks,
            r.repeats,
            r.transport_ns,
            r.transport_gb_per_s(),
            r.peer_copy_ns,
            r.peer_copy_gb_per_s(),
            r.ratio(),
            r.to_host_ns,
            r.gb_per_s(r.to_host_ns),
            r.from_host_ns,
            r.gb_per_s(r.from_host_ns),
        )?;
    }
    Ok(())
}

/// Timed repeats for a message of `bytes`: about a gigabyte's worth, between 5 and 30.
pub fn repeats_for(bytes: usize) -> usize {
    ((1usize << 30) / bytes.max(1)).clamp(5, 30)
}

/// The median of `samples` (the upper one of an even count).
pub fn median(mut samples: Vec<u64>) -> u64 {
    samples.sort_unstable();
    samples.get(samples.len() / 2).copied().unwrap_or(0)
}

#[cfg(feature = "cuda")]
mod gpu;
#[cfg(feature = "cuda")]
pub use gpu::{TransferBenchError, TransferPlan, run};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units_and_model_kv() {
        let bytes = |s: &str| parse_size(s).unwrap().bytes;
        assert_eq!(bytes("4M"), 4_000_000);
        assert_eq!(bytes("11.5MB"), 11_500_000);
        assert_eq!(bytes("256Mi"), 256 << 20);
        assert_eq!(bytes("1GiB"), 1 << 30);
        assert_eq!(bytes("4096"), 4096);
        // TinyLlama: 22 layers x K and V x 4 kv heads x 64 x 2 bytes = 22,528 bytes a token.
        let kv = parse_size("tinyllama-1.1b:512").unwrap();
        assert_eq!(kv.bytes, 512 * 22_528);
        assert!(kv.label.contains("512 tokens"), "{}", kv.label);
        for bad in ["", "4X", "-1M", "gpt-5:10", "tinyllama-1.1b:many", "0"] {
            let err = parse_size(bad).unwrap_err();
            assert!(err.starts_with("--sizes:"), "{err}");
        }
    }

    #[test]
    fn the_table_and_csv_carry_bandwidths_and_the_ratio() {
        let row = Row {
            transport: "cuda-p2p".into(),
            route: "peer".into(),
            size: "4M".into(),
            bytes: 4_000_000,
            blocks: 12,
            repeats: 30,
            transport_ns: 20_000,
            peer_copy_ns: 16_000,
            to_host_ns: 80_000,
            from_host_ns: 100_000,
        };
        assert_eq!(row.transport_gb_per_s(), 200.0);
        assert_eq!(row.peer_copy_gb_per_s(), 250.0);
        assert!((row.ratio() - 0.8).abs() < 1e-12);
        let table = table(std::slice::from_ref(&row));
        assert!(
            table.contains(
                "| cuda-p2p | peer | 4M | 4000000 | 12 | 30 | 200.0 | 250.0 | 0.80 | 50.0 | 40.0 |"
            ),
            "{table}"
        );
        let mut csv = Vec::new();
        write_csv(&mut csv, &[row]).unwrap();
        let csv = String::from_utf8(csv).unwrap();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(
            lines[0].split(',').count(),
            lines[1].split(',').count(),
            "{csv}"
        );
        assert!(lines[1].starts_with("cuda-p2p,peer,\"4M\",4000000,12,30,20000,200.000,"));
    }

    #[test]
    fn medians_and_repeats() {
        assert_eq!(median(vec![5, 1, 9]), 5);
        assert_eq!(median(vec![4, 1, 9, 2]), 4);
        assert_eq!(median(Vec::new()), 0);
        assert_eq!(repeats_for(1 << 20), 30);
        assert_eq!(repeats_for(256 << 20), 5);
    }
}
