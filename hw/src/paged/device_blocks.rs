//! A transfer's KV blocks left where they were computed (GPU memory, usually), so that a GPU
//! transport can move them without a round trip through pageable host memory.

use super::PagedError;
use models::runtime::{Device, Tensor, TensorDType, tensor_le_bytes};

/// Blocks in device memory: a contiguous `(n_blocks, elems_per_block)` tensor in the KV dtype
/// whose row `i` is block `i` in the cache's export layout, so its bytes are exactly those of
/// the host payload (`KvExport::blocks`) and the wire carries them unchanged.
#[derive(Clone, Debug)]
pub struct DeviceBlocks {
    rows: Tensor,
}

impl DeviceBlocks {
    /// Wraps rows made by `KvCache::export_blocks_tensor` or received by a transport, once
    /// the work that wrote them (on this thread's stream) has completed: any thread or stream
    /// may then read them, as a transport does on its own streams.
    pub fn new(rows: Tensor) -> Result<DeviceBlocks, PagedError> {
        let shape_ok = rows.rank() == 2 && rows.dim(0).is_ok_and(|n| n > 0);
        if !shape_ok || !rows.is_contiguous() {
            return Err(PagedError::Invalid(format!(
                "device blocks: expected contiguous (n_blocks > 0, elems) rows, got shape {:?}",
                rows.dims()
            )));
        }
        if !matches!(
            rows.dtype(),
            TensorDType::F32 | TensorDType::F16 | TensorDType::BF16
        ) {
            return Err(PagedError::Invalid(format!(
                "device blocks: dtype {:?} is not a KV dtype (f32, f16 or bf16)",
                rows.dtype()
            )));
        }
        rows.device()
            .synchronize()
            .map_err(models::runtime::RuntimeError::from)?;
        Ok(DeviceBlocks { rows })
    }

    /// Host blocks of `dtype` elements (each the same length, a whole number of elements)
    /// copied onto `device`.
    pub fn from_host_blocks(
        blocks: &[Vec<u8>],
        dtype: TensorDType,
        device: &Device,
    ) -> Result<DeviceBlocks, PagedError> {
        let bytes_per_block = blocks.first().map_or(0, Vec::len);
        let elem = dtype.size_in_bytes();
        if bytes_per_block == 0
            || !bytes_per_block.is_multiple_of(elem)
            || blocks.iter().any(|b| b.len() != bytes_per_block)
        {
            return Err(PagedError::Invalid(format!(
                "device blocks: {} host blocks of {bytes_per_block} bytes (all equal, a multiple \
                 of {elem}, non-empty) expected",
                blocks.len()
            )));
        }
        let dims = [blocks.len(), bytes_per_block / elem];
        let rows = Tensor::from_raw_buffer(&blocks.concat(), dtype, &dims, &Device::Cpu)
            .and_then(|t| t.to_device(device))
            .map_err(models::runtime::RuntimeError::from)?;
        DeviceBlocks::new(rows)
    }

    pub fn rows(&self) -> &Tensor {
        &self.rows
    }

    pub fn device(&self) -> &Device {
        self.rows.device()
    }

    pub fn dtype(&self) -> TensorDType {
        self.rows.dtype()
    }

    pub fn n_blocks(&self) -> usize {
        self.rows.dims()[0]
    }

    pub fn bytes_per_block(&self) -> usize {
        self.rows.dims()[1] * self.rows.dtype().size_in_bytes()
    }

    pub fn payload_bytes(&self) -> usize {
        self.n_blocks() * self.bytes_per_block()
    }

    /// Blocks `first..first + n` (a view, no copy).
    pub fn narrow(&self, first: usize, n: usize) -> Result<DeviceBlocks, PagedError> {
        let rows = self
            .rows
            .narrow(0, first, n)
            .map_err(models::runtime::RuntimeError::from)?;
        DeviceBlocks::new(rows)
    }

    /// The blocks copied to host memory, one `Vec` per block.
    pub fn to_host_blocks(&self) -> Result<Vec<Vec<u8>>, PagedError> {
        let bytes = tensor_le_bytes(&self.rows)?;
        Ok(bytes
            .chunks_exact(self.bytes_per_block())
            .map(<[u8]>::to_vec)
            .collect())
    }
}

/// Equal contents: the same dtype, shape and bytes, wherever each lives (this copies both to
/// the host, so it is for tests and checks, not for a hot path).
impl PartialEq for DeviceBlocks {
    fn eq(&self, other: &DeviceBlocks) -> bool {
        self.dtype() == other.dtype()
            && self.rows.dims() == other.rows.dims()
            && match (self.to_host_blocks(), other.to_host_blocks()) {
                (Ok(a), Ok(b)) => a == b,
                _ => false,
            }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_blocks_round_trip_and_bad_shapes_are_refused() {
        let blocks: Vec<Vec<u8>> = (0..3u8).map(|b| vec![b; 8]).collect();
        let d = DeviceBlocks::from_host_blocks(&blocks, TensorDType::F16, &Device::Cpu).unwrap();
        assert_eq!((d.n_blocks(), d.bytes_per_block()), (3, 8));
        assert_eq!(d.payload_bytes(), 24);
        assert_eq!(d.to_host_blocks().unwrap(), blocks);
        assert_eq!(
            d.narrow(1, 2).unwrap().to_host_blocks().unwrap(),
            blocks[1..]
        );
        assert_eq!(
            d,
            DeviceBlocks::from_host_blocks(&blocks, TensorDType::F16, &Device::Cpu).unwrap()
        );

        let odd = vec![vec![0u8; 6]];
        assert!(DeviceBlocks::from_host_blocks(&odd, TensorDType::F32, &Device::Cpu).is_err());
        let uneven = vec![vec![0u8; 8], vec![0u8; 4]];
        assert!(DeviceBlocks::from_host_blocks(&uneven, TensorDType::F32, &Device::Cpu).is_err());
        assert!(DeviceBlocks::from_host_blocks(&[], TensorDType::F32, &Device::Cpu).is_err());
        let bytes = Tensor::zeros((2, 4), TensorDType::U8, &Device::Cpu).unwrap();
        assert!(DeviceBlocks::new(bytes).is_err());
        let column = Tensor::zeros((4, 2), TensorDType::F32, &Device::Cpu)
            .unwrap()
            .t()
            .unwrap();
        assert!(DeviceBlocks::new(column).is_err(), "not contiguous");
    }
}
