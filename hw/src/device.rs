//! Where a model runs, as cluster files, cases and `--device` write it: `cpu` or `cuda:N`.
//! A name parses in every build, so a CPU-only tool can read and write a GPU cluster's file;
//! only opening a GPU needs a build with feature `cuda`.

use models::runtime::Device;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceName {
    #[default]
    Cpu,
    /// A GPU by its CUDA ordinal.
    Cuda(usize),
}

impl DeviceName {
    /// Whether this build can run a model there: a GPU needs feature `cuda`.
    pub fn check_supported(self) -> Result<(), String> {
        match self {
            DeviceName::Cuda(_) if !cfg!(feature = "cuda") => Err(format!(
                "`{self}` needs a disagg-hw built with feature `cuda` (hw/gpu/build-cuda.sh); \
                 this one runs models on the CPU only"
            )),
            _ => Ok(()),
        }
    }

    /// The candle device; for a GPU, its context on this process.
    pub fn open(self) -> Result<Device, String> {
        self.check_supported()?;
        match self {
            DeviceName::Cpu => Ok(Device::Cpu),
            DeviceName::Cuda(ordinal) => {
                let device = Device::new_cuda(ordinal).map_err(|e| format!("`{self}`: {e}"))?;
                #[cfg(feature = "cuda")]
                gpu::configure(&device).map_err(|e| format!("`{self}`: {e}"))?;
                Ok(device)
            }
        }
    }
}

/// How every GPU this process opens is set up, before anything is allocated on it.
#[cfg(feature = "cuda")]
mod gpu {
    use candle_core::cuda_backend::cudarc::driver::{DriverError, sys};
    use models::runtime::Device;

    /// Two settings, so that a step costs the same in every process that runs one:
    ///
    /// - cudarc's event tracking off. Once a second stream exists (a KV transport's), it
    ///   records and waits on two events per kernel argument, and every allocation creates
    ///   two: a millisecond or more per step on the host, and no CUDA graphs. This crate
    ///   orders its streams itself instead: device KV rows are complete when wrapped
    ///   (`DeviceBlocks::new`), an import from them completes before it returns, and the
    ///   transports complete their copies before handing memory on.
    /// - The default memory pool keeps what is freed instead of handing it back to the
    ///   driver at every synchronisation (its default), which re-maps a step's activations
    ///   at every step.
    pub(super) fn configure(device: &Device) -> Result<(), DriverError> {
        let Device::Cuda(cuda) = device else {
            return Ok(());
        };
        let ctx = cuda.cuda_stream().context().clone();
        // SAFETY: from here on this crate orders the context's streams, as said above.
        unsafe { ctx.disable_event_tracking() };
        if !ctx.has_async_alloc() {
            return Ok(());
        }
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        let mut threshold = u64::MAX;
        // SAFETY: a valid device handle; the attribute takes a u64 by pointer.
        unsafe {
            sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()).result()?;
            sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut threshold as *mut u64).cast(),
            )
            .result()
        }
    }
}

impl FromStr for DeviceName {
    type Err = String;

    fn from_str(s: &str) -> Result<DeviceName, String> {
        match s.strip_prefix("cuda:") {
            None if s == "cpu" => Ok(DeviceName::Cpu),
            Some(n) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => n
                .parse()
                .map(DeviceName::Cuda)
                .map_err(|_| format!("bad GPU ordinal in `{s}`")),
            _ => Err(format!("expected cpu or cuda:N, got `{s}`")),
        }
    }
}

impl TryFrom<String> for DeviceName {
    type Error = String;

    fn try_from(s: String) -> Result<DeviceName, String> {
        s.parse()
    }
}

impl From<DeviceName> for String {
    fn from(d: DeviceName) -> String {
        d.to_string()
    }
}

impl fmt::Display for DeviceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceName::Cpu => f.write_str("cpu"),
            DeviceName::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_print_back() {
        for (text, device) in [
            ("cpu", DeviceName::Cpu),
            ("cuda:0", DeviceName::Cuda(0)),
            ("cuda:7", DeviceName::Cuda(7)),
        ] {
            assert_eq!(text.parse::<DeviceName>(), Ok(device));
            assert_eq!(device.to_string(), text);
        }
        for bad in [
            "gpu", "cuda", "cuda:", "cuda:-1", "cuda:x", "CPU", "cuda:0 ",
        ] {
            let e = bad.parse::<DeviceName>().unwrap_err();
            assert!(e.contains(&format!("`{bad}`")), "{bad}: {e}");
        }
    }

    #[test]
    fn the_cpu_opens_everywhere_and_a_gpu_only_with_the_feature() {
        assert!(matches!(DeviceName::Cpu.open(), Ok(Device::Cpu)));
        let supported = DeviceName::Cuda(0).check_supported();
        if cfg!(feature = "cuda") {
            assert_eq!(supported, Ok(()));
        } else {
            let e = supported.unwrap_err();
            assert!(e.starts_with("`cuda:0` needs a disagg-hw built with feature `cuda`"));
            assert!(DeviceName::Cuda(0).open().is_err());
        }
    }
}
