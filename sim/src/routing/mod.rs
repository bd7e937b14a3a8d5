//! Where a request goes: the block index (which worker holds which KV block, as their events
//! say) and the routing policies that consult it.

pub mod index;
pub mod policy;

pub use index::BlockIndex;
pub use policy::{Policy, PolicyError, RouteDecision, RouteRequest, Router, WorkerLoad};

/// A worker's id: a small integer, dense in `0..workers`, since per-worker tables are indexed
/// by it.
pub type WorkerId = u32;

/// What a worker does with a request.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Computes the prompt's KV and hands it to a decode worker.
    Prefill,
    /// Generates tokens from KV received from a prefill worker.
    Decode,
    /// Does both, as an engine without disaggregation does.
    Aggregated,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Prefill, Role::Decode, Role::Aggregated];

    pub fn name(self) -> &'static str {
        match self {
            Role::Prefill => "prefill",
            Role::Decode => "decode",
            Role::Aggregated => "aggregated",
        }
    }

    /// Position in per-role tables.
    fn slot(self) -> usize {
        self as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_serialize_by_name() {
        #[derive(serde::Serialize, serde::Deserialize)]
        struct W {
            role: Role,
        }
        for role in Role::ALL {
            let text = toml::to_string(&W { role }).unwrap();
            assert_eq!(text.trim(), format!("role = \"{}\"", role.name()));
            assert_eq!(toml::from_str::<W>(&text).unwrap().role, role);
        }
        assert!(toml::from_str::<W>("role = \"Prefill\"").is_err());
    }
}
