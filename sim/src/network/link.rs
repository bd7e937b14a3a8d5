//! Link specifications: what one kind of cable (and the software path around it) costs a transfer.

use serde::{Deserialize, Serialize};

use crate::time::{Nanos, secs_to_ns};

/// The technology of a link; it decides nothing by itself, the figures of its spec do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkKind {
    Tcp,
    Rdma,
    Nvlink,
    Pcie,
}

/// One link technology as a transfer sees it: the shared wire (rate, latency) and the costs paid
/// outside it at the endpoints (setup, host staging copies, (de)serialization).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkSpec {
    pub name: String,
    pub kind: LinkKind,
    /// Line rate per direction.
    pub bandwidth_gbit_per_s: f64,
    /// Achievable share of the line rate for bulk transfers, in (0, 1].
    pub efficiency: f64,
    /// One way, end to end.
    pub latency_ns: u64,
    /// Setup of one transfer (handshake, registration, RPC).
    pub per_transfer_overhead_ns: u64,
    /// Staging copies between device and host memory, paid once on each side (on the sender
    /// only, where `import_bytes_per_s` is set).
    #[serde(default)]
    pub host_copy_bytes_per_s: Option<f64>,
    /// Serialization on the sender and deserialization on the receiver.
    #[serde(default)]
    pub serialize_bytes_per_s: Option<f64>,
    /// The receiving engine's copy of landed KV into its cache, which it makes between two of
    /// its steps, holding up the next: where set, it replaces the receiving side's host copy,
    /// and the decode worker, not the transfer, pays it (as `disagg-hw`'s engine does).
    #[serde(default)]
    pub import_bytes_per_s: Option<f64>,
    /// The measured spread of a transfer's time about these figures, as factors (each
    /// probe's transfer over the probes' median): each transfer draws one of them with equal
    /// odds, which scales its endpoint time and the bytes it puts on the shared wire (a lone
    /// transfer's time outside the import). Empty: every transfer takes the figures' time.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub time_spread: Vec<f64>,
}

const PRESET_TOML: [(&str, &str); 5] = [
    (
        "tcp-10g",
        include_str!("../../../configs/links/tcp-10g.toml"),
    ),
    (
        "tcp-100g",
        include_str!("../../../configs/links/tcp-100g.toml"),
    ),
    (
        "rdma-100g",
        include_str!("../../../configs/links/rdma-100g.toml"),
    ),
    (
        "rdma-200g",
        include_str!("../../../configs/links/rdma-200g.toml"),
    ),
    ("nvlink", include_str!("../../../configs/links/nvlink.toml")),
];

fn positive_finite(field: &str, value: f64) -> Result<(), String> {
    if value > 0.0 && value.is_finite() {
        Ok(())
    } else {
        Err(format!("{field} must be positive and finite, got {value}"))
    }
}

impl LinkSpec {
    /// Names of the presets compiled in from `configs/links/`.
    pub const PRESETS: [&'static str; 5] =
        ["tcp-10g", "tcp-100g", "rdma-100g", "rdma-200g", "nvlink"];

    /// The preset called `name`, parsed from its embedded TOML.
    pub fn preset(name: &str) -> Option<LinkSpec> {
        let (_, text) = PRESET_TOML.iter().find(|(n, _)| *n == name)?;
        toml::from_str(text).ok()
    }

    /// Checks every figure is usable; the message names the offending field.
    pub fn validate(&self) -> Result<(), String> {
        if self.name.trim().is_empty() {
            return Err("name must not be empty".to_owned());
        }
        positive_finite("bandwidth_gbit_per_s", self.bandwidth_gbit_per_s)?;
        if !(self.efficiency > 0.0 && self.efficiency <= 1.0) {
            return Err(format!(
                "efficiency must be in (0, 1], got {}",
                self.efficiency
            ));
        }
        if !self.bytes_per_s().is_finite() {
            return Err(format!(
                "bandwidth_gbit_per_s is too large, got {}",
                self.bandwidth_gbit_per_s
            ));
        }
        if let Some(rate) = self.host_copy_bytes_per_s {
            positive_finite("host_copy_bytes_per_s", rate)?;
        }
        if let Some(rate) = self.serialize_bytes_per_s {
            positive_finite("serialize_bytes_per_s", rate)?;
        }
        if let Some(rate) = self.import_bytes_per_s {
            positive_finite("import_bytes_per_s", rate)?;
        }
        for (i, &factor) in self.time_spread.iter().enumerate() {
            positive_finite(&format!("time_spread[{i}]"), factor)?;
        }
        Ok(())
    }

    /// Achievable bulk rate in bytes per second: line rate times efficiency.
    pub fn bytes_per_s(&self) -> f64 {
        self.bandwidth_gbit_per_s * 1e9 / 8.0 * self.efficiency
    }

    /// Time a transfer of `bytes` spends outside the shared wire: per-transfer overhead plus,
    /// where set, host copies and (de)serialization on both sides (sequential, not pipelined;
    /// the receiver's copy is left to its engine where the link has an import rate).
    pub fn endpoint_ns(&self, bytes: u64) -> Nanos {
        let bytes = bytes as f64;
        let copies = if self.import_bytes_per_s.is_some() {
            1.0
        } else {
            2.0
        };
        let copy_secs = self
            .host_copy_bytes_per_s
            .map_or(0.0, |r| copies * bytes / r);
        let serialize_secs = self.serialize_bytes_per_s.map_or(0.0, |r| 2.0 * bytes / r);
        self.per_transfer_overhead_ns
            .saturating_add(secs_to_ns(copy_secs + serialize_secs))
    }

    /// The receiving engine's import of `bytes` once they landed (0 where the link leaves
    /// the import inside the transfer).
    pub fn import_ns(&self, bytes: u64) -> Nanos {
        self.import_bytes_per_s
            .map_or(0, |r| secs_to_ns(bytes as f64 / r))
    }

    /// Time of a lone transfer of `bytes` on an idle link, the receiver's import included:
    /// endpoint_ns + latency + bytes / rate + import_ns.
    pub fn lone_transfer_ns(&self, bytes: u64) -> Nanos {
        self.endpoint_ns(bytes)
            .saturating_add(self.latency_ns)
            .saturating_add(secs_to_ns(bytes as f64 / self.bytes_per_s()))
            .saturating_add(self.import_ns(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_parses_validates_and_is_named_for_its_file() {
        for name in LinkSpec::PRESETS {
            let spec = LinkSpec::preset(name).unwrap_or_else(|| panic!("preset {name} parses"));
            assert_eq!(spec.name, name);
            assert_eq!(spec.validate(), Ok(()), "{name}");
        }
        assert_eq!(LinkSpec::preset("carrier-pigeon"), None);
    }

    #[test]
    fn kinds_and_host_paths_match_the_technology() {
        for name in LinkSpec::PRESETS {
            let spec = LinkSpec::preset(name).unwrap();
            let staged =
                spec.host_copy_bytes_per_s.is_some() && spec.serialize_bytes_per_s.is_some();
            assert_eq!(staged, spec.kind == LinkKind::Tcp, "{name}");
        }
        assert_eq!(LinkSpec::preset("nvlink").unwrap().kind, LinkKind::Nvlink);
        // NVLink 4: 450 GB/s per direction per GPU.
        let nvlink = LinkSpec::preset("nvlink").unwrap();
        assert_eq!(nvlink.bandwidth_gbit_per_s / 8.0, 450.0);
    }

    #[test]
    fn naive_tcp_is_an_order_of_magnitude_slower_than_rdma() {
        let tcp = LinkSpec::preset("tcp-10g").unwrap();
        let rdma = LinkSpec::preset("rdma-100g").unwrap();
        let bytes = 18_000_000;
        assert!(tcp.lone_transfer_ns(bytes) > 10 * rdma.lone_transfer_ns(bytes));
        let rdma200 = LinkSpec::preset("rdma-200g").unwrap();
        assert!(rdma200.lone_transfer_ns(bytes) < rdma.lone_transfer_ns(bytes));
    }

    #[test]
    fn transfer_times_follow_the_figures() {
        let spec = LinkSpec {
            name: "test".into(),
            kind: LinkKind::Tcp,
            bandwidth_gbit_per_s: 8.0,
            efficiency: 0.5,
            latency_ns: 1_000,
            per_transfer_overhead_ns: 500,
            host_copy_bytes_per_s: Some(1e9),
            serialize_bytes_per_s: Some(2e9),
            import_bytes_per_s: None,
            time_spread: Vec::new(),
        };
        assert_eq!(spec.bytes_per_s(), 0.5e9);
        // 1 MB: 2 x 1 ms of copies + 2 x 0.5 ms of (de)serialization + 500 ns of setup.
        assert_eq!(spec.endpoint_ns(1_000_000), 3_000_500);
        // + 1 us of latency + 2 ms on the wire.
        assert_eq!(spec.lone_transfer_ns(1_000_000), 5_001_500);
        let bare = LinkSpec {
            host_copy_bytes_per_s: None,
            serialize_bytes_per_s: None,
            ..spec
        };
        assert_eq!(bare.endpoint_ns(1_000_000), 500);
        // An engine that imports: the sender's copy stays in the transfer, the receiver's
        // becomes the import (4 ms at 0.25 GB/s), and a lone transfer counts both.
        let importing = LinkSpec {
            import_bytes_per_s: Some(0.25e9),
            ..bare.clone()
        };
        assert_eq!(importing.import_ns(1_000_000), 4_000_000);
        let importing = LinkSpec {
            host_copy_bytes_per_s: Some(1e9),
            ..importing
        };
        assert_eq!(importing.endpoint_ns(1_000_000), 1_000_500);
        assert_eq!(importing.import_ns(1_000_000), 4_000_000);
        assert_eq!(importing.lone_transfer_ns(1_000_000), 7_001_500);
        assert_eq!(bare.import_ns(1_000_000), 0);
    }

    #[test]
    fn validate_names_the_bad_field() {
        let good = LinkSpec::preset("tcp-10g").unwrap();
        let cases: [(LinkSpec, &str); 6] = [
            (
                LinkSpec {
                    name: " ".into(),
                    ..good.clone()
                },
                "name",
            ),
            (
                LinkSpec {
                    bandwidth_gbit_per_s: 0.0,
                    ..good.clone()
                },
                "bandwidth_gbit_per_s",
            ),
            (
                LinkSpec {
                    bandwidth_gbit_per_s: f64::MAX,
                    ..good.clone()
                },
                "bandwidth_gbit_per_s",
            ),
            (
                LinkSpec {
                    efficiency: 1.5,
                    ..good.clone()
                },
                "efficiency",
            ),
            (
                LinkSpec {
                    host_copy_bytes_per_s: Some(-1.0),
                    ..good.clone()
                },
                "host_copy_bytes_per_s",
            ),
            (
                LinkSpec {
                    serialize_bytes_per_s: Some(f64::NAN),
                    ..good.clone()
                },
                "serialize_bytes_per_s",
            ),
        ];
        for (spec, field) in cases {
            let message = spec.validate().unwrap_err();
            assert!(message.starts_with(field), "{message}");
        }
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let text = r#"
            name = "x"
            kind = "rdma"
            bandwidth_gbit_per_s = 1.0
            efficiency = 1.0
            latency_ns = 1
            per_transfer_overhead_ns = 1
            mtu_bytes = 4096
        "#;
        assert!(toml::from_str::<LinkSpec>(text).is_err());
    }
}
