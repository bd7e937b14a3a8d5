//! The KV wire format: one frame per transfer, one frame per acknowledgement; a transfer
//! whose layers are sent as the prefill computes them is a layer frame per layer, then the
//! transfer frame with empty blocks, which closes it.
//!
//! Every integer is little-endian. A frame is:
//!
//! ```text
//! offset    size  field
//! 0         4     magic, b"DKVT"
//! 4         1     version, 1
//! 5         1     frame kind: 1 = transfer, 2 = ack, 3 = layer
//! 6         4     header length H (u32)
//! 10        H     header (below, by kind)
//! 10+H      8     payload length P (u64)
//! 18+H      P     payload
//! 18+H+P    4     CRC32 (IEEE) of bytes 0..18+H+P: preamble, header, payload length, payload
//! ```
//!
//! Transfer header (H = 49 + 4 * n_tokens + 8 * n_hashes):
//!
//! ```text
//! 0     8   request id (u64)
//! 8     8   model fingerprint (u64), see `model_fingerprint`
//! 16    1   KV dtype: 0 f32, 1 f16, 2 bf16, 3 fp8
//! 17    4   n_layers (u32)
//! 21    4   block_size_tokens (u32, > 0)
//! 25    4   kv_len (u32): tokens whose KV the blocks hold, <= n_tokens
//! 29    4   first_block (u32): blocks before it are not carried (the receiver holds them)
//! 33    4   n_tokens (u32), then n_tokens token ids (u32 each)
//! ..    4   n_hashes (u32) = kv_len / block_size_tokens, then n_hashes block hashes (u64 each)
//! ..    4   n_blocks (u32) = ceil(kv_len / block_size_tokens) - first_block
//! ..    4   bytes_per_block (u32)
//! ```
//!
//! The transfer payload is the `n_blocks` blocks back to back, so P = n_blocks * bytes_per_block.
//! `bytes_per_block` 0 with `n_blocks` > 0 closes a streamed transfer: the blocks came before,
//! on the same connection, as one layer frame per layer.
//!
//! Layer header (H = 20); the payload is `n_blocks` parts of `part_bytes` each, part `b` being
//! block `b`'s bytes of that layer (K then V), which sit at byte `layer * part_bytes` of the
//! block:
//!
//! ```text
//! 0     8   request id (u64)
//! 8     4   layer (u32)
//! 12    4   n_blocks (u32)
//! 16    4   part_bytes (u32)
//! ```
//!
//! Ack header (H = 17), payload length 0:
//!
//! ```text
//! 0     8   request id (u64); 0 when the receiver could not read it
//! 8     1   status: 0 ok, 1 checksum mismatch, 2 fingerprint mismatch, 3 invalid frame,
//!           4 receiver unavailable
//! 9     8   the receiver's model fingerprint (u64)
//! ```
//!
//! A reader checks every count and length against [`WireLimits`] and against the other fields
//! before it allocates anything for them, so a hostile or corrupt frame costs at most the limits.

use super::Landing;
use crate::paged::KvExport;
use models::runtime::TensorDType;
use models::{DType, ModelSpec};
use sim::kv::{BlockHash, token_block_hashes};
use std::io;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub const MAGIC: [u8; 4] = *b"DKVT";
pub const VERSION: u8 = 1;
const KIND_TRANSFER: u8 = 1;
const KIND_ACK: u8 = 2;
const KIND_LAYER: u8 = 3;
const LAYER_HEADER_BYTES: u32 = 20;
const PREAMBLE_BYTES: usize = 10;
/// Header bytes of a transfer that carries no tokens and no hashes.
const TRANSFER_FIXED_HEADER_BYTES: u64 = 49;
const ACK_HEADER_BYTES: u32 = 17;

/// What a reader accepts; anything larger is refused before it is allocated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WireLimits {
    pub max_tokens: u32,
    pub max_blocks: u32,
    pub max_bytes_per_block: u32,
    pub max_payload_bytes: u64,
}

impl Default for WireLimits {
    /// Room for a 256k-token context in 16-token blocks of up to 64 MiB, 16 GiB in all.
    fn default() -> WireLimits {
        WireLimits {
            max_tokens: 1 << 18,
            max_blocks: 1 << 14,
            max_bytes_per_block: 64 << 20,
            max_payload_bytes: 16 << 30,
        }
    }
}

impl WireLimits {
    /// The largest transfer header these limits admit.
    fn max_header_bytes(&self) -> u64 {
        TRANSFER_FIXED_HEADER_BYTES + 4 * self.max_tokens as u64 + 8 * self.max_blocks as u64
    }
}

/// One sequence's KV on its way from one worker to another.
#[derive(Clone, Debug, PartialEq)]
pub struct KvTransfer {
    pub request_id: u64,
    pub model_fingerprint: u64,
    pub dtype: DType,
    pub n_layers: u32,
    pub block_size_tokens: u32,
    pub kv: KvExport,
}

/// Why an ack refuses a transfer, or that it accepts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckStatus {
    Ok,
    ChecksumMismatch,
    FingerprintMismatch,
    InvalidFrame,
    Unavailable,
}

impl AckStatus {
    fn code(self) -> u8 {
        match self {
            AckStatus::Ok => 0,
            AckStatus::ChecksumMismatch => 1,
            AckStatus::FingerprintMismatch => 2,
            AckStatus::InvalidFrame => 3,
            AckStatus::Unavailable => 4,
        }
    }

    fn from_code(code: u8) -> Option<AckStatus> {
        Some(match code {
            0 => AckStatus::Ok,
            1 => AckStatus::ChecksumMismatch,
            2 => AckStatus::FingerprintMismatch,
            3 => AckStatus::InvalidFrame,
            4 => AckStatus::Unavailable,
            _ => return None,
        })
    }
}

/// The receiver's answer to one transfer frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ack {
    pub request_id: u64,
    pub status: AckStatus,
    pub receiver_fingerprint: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection closed before a frame began")]
    Closed,
    #[error("frame truncated in {field}")]
    Truncated { field: &'static str },
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    #[error("bad magic {0:02x?}: not a KV frame")]
    BadMagic([u8; 4]),
    #[error("unsupported wire version {0} (this build speaks {VERSION})")]
    UnsupportedVersion(u8),
    #[error("expected a {expected} frame, got frame kind {got}")]
    UnexpectedKind { expected: &'static str, got: u8 },
    #[error("{field} = {value} exceeds the limit of {limit}")]
    TooLarge {
        field: &'static str,
        value: u64,
        limit: u64,
    },
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("checksum mismatch: frame says {expected:#010x}, content gives {computed:#010x}")]
    ChecksumMismatch { expected: u32, computed: u32 },
    #[error("device memory: {0}")]
    Device(#[from] super::DeviceIoError),
}

fn invalid(field: &'static str, reason: impl Into<String>) -> WireError {
    WireError::Invalid {
        field,
        reason: reason.into(),
    }
}

fn dtype_code(dtype: DType) -> u8 {
    match dtype {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::Bf16 => 2,
        DType::Fp8 => 3,
    }
}

fn dtype_from_code(code: u8) -> Option<DType> {
    Some(match code {
        0 => DType::F32,
        1 => DType::F16,
        2 => DType::Bf16,
        3 => DType::Fp8,
        _ => return None,
    })
}

/// A stable 64-bit fingerprint of a model's architecture numbers and KV dtype: two workers
/// whose fingerprints agree lay out KV identically. The name and the weights are not part of
/// it. FNV-1a over a fixed little-endian encoding, so it never changes between builds.
pub fn model_fingerprint(spec: &ModelSpec, dtype: DType) -> u64 {
    let mut bytes = Vec::with_capacity(64);
    for v in [
        spec.n_layers,
        spec.hidden_size,
        spec.intermediate_size,
        spec.n_heads,
        spec.n_kv_heads,
        spec.head_dim,
        spec.vocab_size,
        spec.max_position_embeddings,
    ] {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    bytes.extend_from_slice(&spec.rope_theta.to_bits().to_le_bytes());
    bytes.extend_from_slice(&spec.rms_norm_eps.to_bits().to_le_bytes());
    bytes.push(spec.tie_word_embeddings as u8);
    bytes.push(dtype_code(dtype));
    bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn to_u32(field: &'static str, value: usize) -> Result<u32, WireError> {
    u32::try_from(value).map_err(|_| invalid(field, format!("{value} does not fit in 32 bits")))
}

/// Preamble, header and payload length of a transfer frame; checks that the transfer can be
/// encoded (counts fit, every block has the same size, device rows match the block count).
fn transfer_prefix(t: &KvTransfer) -> Result<Vec<u8>, WireError> {
    let kv = &t.kv;
    let bytes_per_block = kv.bytes_per_block();
    match &kv.device {
        Some(rows) if rows.n_blocks() != kv.blocks.len() => {
            return Err(invalid(
                "blocks",
                format!(
                    "{} blocks named, {} held in device memory",
                    kv.blocks.len(),
                    rows.n_blocks()
                ),
            ));
        }
        Some(_) => {}
        None => {
            if let Some(i) = kv.blocks.iter().position(|b| b.len() != bytes_per_block) {
                return Err(invalid(
                    "blocks",
                    format!(
                        "block {i} has {} bytes, block 0 has {bytes_per_block}",
                        kv.blocks[i].len()
                    ),
                ));
            }
        }
    }
    let header_len =
        TRANSFER_FIXED_HEADER_BYTES as usize + 4 * kv.tokens.len() + 8 * kv.block_hashes.len();
    let mut out = Vec::with_capacity(PREAMBLE_BYTES + header_len + 8);
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(KIND_TRANSFER);
    out.extend_from_slice(&to_u32("header length", header_len)?.to_le_bytes());
    out.extend_from_slice(&t.request_id.to_le_bytes());
    out.extend_from_slice(&t.model_fingerprint.to_le_bytes());
    out.push(dtype_code(t.dtype));
    out.extend_from_slice(&t.n_layers.to_le_bytes());
    out.extend_from_slice(&t.block_size_tokens.to_le_bytes());
    out.extend_from_slice(&to_u32("kv_len", kv.kv_len)?.to_le_bytes());
    out.extend_from_slice(&to_u32("first_block", kv.first_block)?.to_le_bytes());
    out.extend_from_slice(&to_u32("n_tokens", kv.tokens.len())?.to_le_bytes());
    for tok in &kv.tokens {
        out.extend_from_slice(&tok.to_le_bytes());
    }
    out.extend_from_slice(&to_u32("n_hashes", kv.block_hashes.len())?.to_le_bytes());
    for h in &kv.block_hashes {
        out.extend_from_slice(&h.to_le_bytes());
    }
    out.extend_from_slice(&to_u32("n_blocks", kv.blocks.len())?.to_le_bytes());
    out.extend_from_slice(&to_u32("bytes_per_block", bytes_per_block)?.to_le_bytes());
    out.extend_from_slice(&(kv.payload_bytes() as u64).to_le_bytes());
    Ok(out)
}

/// Bytes the transfer occupies on the wire; an error when it cannot be encoded.
pub fn frame_len(t: &KvTransfer) -> Result<u64, WireError> {
    Ok(transfer_prefix(t)?.len() as u64 + t.kv.payload_bytes() as u64 + 4)
}

/// The whole transfer frame in memory (device rows copied to the host).
pub fn encode(t: &KvTransfer) -> Result<Vec<u8>, WireError> {
    let mut out = transfer_prefix(t)?;
    let from_device = match &t.kv.device {
        Some(rows) => Some(rows.to_host_blocks().map_err(super::DeviceIoError::from)?),
        None => None,
    };
    for block in from_device.as_ref().unwrap_or(&t.kv.blocks) {
        out.extend_from_slice(block);
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Writes a transfer frame block by block, without assembling it in memory (device rows go
/// out from device memory through pinned chunks). Returns the bytes written.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    t: &KvTransfer,
) -> Result<u64, WireError> {
    let prefix = transfer_prefix(t)?;
    let mut crc = crc32fast::Hasher::new();
    crc.update(&prefix);
    w.write_all(&prefix).await?;
    match &t.kv.device {
        Some(rows) => super::device_io::write_rows(w, rows, &mut crc).await?,
        None => {
            for block in &t.kv.blocks {
                crc.update(block);
                w.write_all(block).await?;
            }
        }
    }
    w.write_all(&crc.finalize().to_le_bytes()).await?;
    w.flush().await?;
    Ok(prefix.len() as u64 + t.kv.payload_bytes() as u64 + 4)
}

pub async fn write_ack<W: AsyncWrite + Unpin>(w: &mut W, ack: &Ack) -> Result<(), WireError> {
    let mut out = Vec::with_capacity(PREAMBLE_BYTES + ACK_HEADER_BYTES as usize + 12);
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(KIND_ACK);
    out.extend_from_slice(&ACK_HEADER_BYTES.to_le_bytes());
    out.extend_from_slice(&ack.request_id.to_le_bytes());
    out.push(ack.status.code());
    out.extend_from_slice(&ack.receiver_fingerprint.to_le_bytes());
    out.extend_from_slice(&0u64.to_le_bytes());
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    w.write_all(&out).await?;
    w.flush().await?;
    Ok(())
}

/// Reads a frame while keeping the running checksum of everything read.
pub(crate) struct FrameReader<'a, R> {
    r: &'a mut R,
    crc: crc32fast::Hasher,
}

impl<R: AsyncRead + Unpin> FrameReader<'_, R> {
    pub(crate) async fn fill(
        &mut self,
        buf: &mut [u8],
        field: &'static str,
    ) -> Result<(), WireError> {
        match self.r.read_exact(buf).await {
            Ok(_) => {
                self.crc.update(buf);
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                Err(WireError::Truncated { field })
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn u64(&mut self, field: &'static str) -> Result<u64, WireError> {
        let mut b = [0; 8];
        self.fill(&mut b, field).await?;
        Ok(u64::from_le_bytes(b))
    }

    /// Magic, version and kind (one of `kinds`); returns the kind and the header length,
    /// bounded by `max_header_bytes`.
    async fn preamble(
        &mut self,
        kinds: &[u8],
        expected: &'static str,
        max_header_bytes: u64,
    ) -> Result<(u8, usize), WireError> {
        let mut first = [0u8; 1];
        if self.r.read(&mut first).await? == 0 {
            return Err(WireError::Closed);
        }
        self.crc.update(&first);
        let mut rest = [0u8; PREAMBLE_BYTES - 1];
        self.fill(&mut rest, "preamble").await?;
        let magic = [first[0], rest[0], rest[1], rest[2]];
        if magic != MAGIC {
            return Err(WireError::BadMagic(magic));
        }
        if rest[3] != VERSION {
            return Err(WireError::UnsupportedVersion(rest[3]));
        }
        if !kinds.contains(&rest[4]) {
            return Err(WireError::UnexpectedKind {
                expected,
                got: rest[4],
            });
        }
        let header_len = u32::from_le_bytes([rest[5], rest[6], rest[7], rest[8]]) as u64;
        if header_len > max_header_bytes {
            return Err(WireError::TooLarge {
                field: "header length",
                value: header_len,
                limit: max_header_bytes,
            });
        }
        Ok((rest[4], header_len as usize))
    }

    /// The trailing CRC, compared with everything read before it.
    async fn check_crc(mut self) -> Result<(), WireError> {
        let computed = self.crc.clone().finalize();
        let mut b = [0; 4];
        self.fill(&mut b, "checksum").await?;
        let expected = u32::from_le_bytes(b);
        if expected != computed {
            return Err(WireError::ChecksumMismatch { expected, computed });
        }
        Ok(())
    }
}

/// Parses fields out of a header already in memory.
struct Cursor<'a> {
    buf: &'a [u8],
}

impl Cursor<'_> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&[u8], WireError> {
        if self.buf.len() < n {
            return Err(invalid(
                field,
                format!("needs {n} bytes, {} left in the header", self.buf.len()),
            ));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, WireError> {
        Ok(self.take(1, field)?[0])
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, WireError> {
        let b = self.take(4, field)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, WireError> {
        let b = self.take(8, field)?;
        Ok(u64::from_le_bytes(b.try_into().expect("took 8 bytes")))
    }

    /// A count, bounded by `limit` and by the header bytes left for `count * item_bytes`.
    fn count(
        &mut self,
        field: &'static str,
        limit: u32,
        item_bytes: usize,
    ) -> Result<usize, WireError> {
        let n = self.u32(field)?;
        if n > limit {
            return Err(WireError::TooLarge {
                field,
                value: n as u64,
                limit: limit as u64,
            });
        }
        let n = n as usize;
        if n * item_bytes > self.buf.len() {
            return Err(invalid(
                field,
                format!(
                    "{n} items need {} bytes, the header has {} left",
                    n * item_bytes,
                    self.buf.len()
                ),
            ));
        }
        Ok(n)
    }
}

/// A frame a KV listener reads.
#[derive(Clone, Debug, PartialEq)]
pub enum Frame {
    Transfer(KvTransfer),
    Layer(LayerFrame),
}

/// One layer of a streamed transfer's blocks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerFrame {
    pub request_id: u64,
    pub layer: u32,
    /// Per block, that layer's bytes (K then V).
    pub parts: Vec<Vec<u8>>,
}

/// Writes a layer frame; returns the bytes written.
pub async fn write_layer_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    frame: &LayerFrame,
) -> Result<u64, WireError> {
    let part_bytes = frame.parts.first().map_or(0, Vec::len);
    if let Some(i) = frame.parts.iter().position(|p| p.len() != part_bytes) {
        return Err(invalid(
            "parts",
            format!(
                "part {i} has {} bytes, part 0 has {part_bytes}",
                frame.parts[i].len()
            ),
        ));
    }
    let payload: u64 = frame.parts.iter().map(|p| p.len() as u64).sum();
    let mut prefix = Vec::with_capacity(PREAMBLE_BYTES + LAYER_HEADER_BYTES as usize + 8);
    prefix.extend_from_slice(&MAGIC);
    prefix.push(VERSION);
    prefix.push(KIND_LAYER);
    prefix.extend_from_slice(&LAYER_HEADER_BYTES.to_le_bytes());
    prefix.extend_from_slice(&frame.request_id.to_le_bytes());
    prefix.extend_from_slice(&frame.layer.to_le_bytes());
    prefix.extend_from_slice(&to_u32("n_blocks", frame.parts.len())?.to_le_bytes());
    prefix.extend_from_slice(&to_u32("part_bytes", part_bytes)?.to_le_bytes());
    prefix.extend_from_slice(&payload.to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&prefix);
    w.write_all(&prefix).await?;
    for part in &frame.parts {
        crc.update(part);
        w.write_all(part).await?;
    }
    w.write_all(&crc.finalize().to_le_bytes()).await?;
    w.flush().await?;
    Ok(prefix.len() as u64 + payload + 4)
}

/// Reads one transfer frame (see [`read_message`]).
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    limits: &WireLimits,
) -> Result<KvTransfer, WireError> {
    match read_message(r, limits).await? {
        Frame::Transfer(t) => Ok(t),
        Frame::Layer(_) => Err(WireError::UnexpectedKind {
            expected: "transfer",
            got: KIND_LAYER,
        }),
    }
}

/// Reads one transfer or layer frame, checking every length against `limits` and the other
/// fields before allocating for it, and the checksum at the end.
pub async fn read_message<R: AsyncRead + Unpin>(
    r: &mut R,
    limits: &WireLimits,
) -> Result<Frame, WireError> {
    read_message_to(r, limits, &Landing::Host).await
}

/// [`read_message`], putting a transfer frame's payload where `landing` says.
pub async fn read_message_to<R: AsyncRead + Unpin>(
    r: &mut R,
    limits: &WireLimits,
    landing: &Landing,
) -> Result<Frame, WireError> {
    let mut fr = FrameReader {
        r,
        crc: crc32fast::Hasher::new(),
    };
    let (kind, header_len) = fr
        .preamble(
            &[KIND_TRANSFER, KIND_LAYER],
            "transfer or layer",
            limits.max_header_bytes(),
        )
        .await?;
    if kind == KIND_LAYER {
        return read_layer(fr, header_len, limits).await.map(Frame::Layer);
    }
    let mut header = vec![0u8; header_len];
    fr.fill(&mut header, "header").await?;
    let mut c = Cursor { buf: &header };
    let request_id = c.u64("request id")?;
    let model_fingerprint = c.u64("model fingerprint")?;
    let code = c.u8("dtype")?;
    let dtype = dtype_from_code(code).ok_or_else(|| invalid("dtype", format!("code {code}")))?;
    let n_layers = c.u32("n_layers")?;
    let block_size_tokens = c.u32("block_size_tokens")?;
    if block_size_tokens == 0 {
        return Err(invalid("block_size_tokens", "zero"));
    }
    let kv_len = c.u32("kv_len")? as usize;
    let first_block = c.u32("first_block")? as usize;
    let n_tokens = c.count("n_tokens", limits.max_tokens, 4)?;
    let tokens: Vec<u32> = (0..n_tokens)
        .map(|_| c.u32("tokens"))
        .collect::<Result<_, _>>()?;
    let n_hashes = c.count("n_hashes", limits.max_blocks, 8)?;
    let block_hashes: Vec<BlockHash> = (0..n_hashes)
        .map(|_| c.u64("block_hashes"))
        .collect::<Result<_, _>>()?;
    let n_blocks = c.u32("n_blocks")?;
    let bytes_per_block = c.u32("bytes_per_block")?;
    if !c.buf.is_empty() {
        return Err(invalid(
            "header length",
            format!("{} bytes left over after the last field", c.buf.len()),
        ));
    }
    if n_blocks > limits.max_blocks {
        return Err(WireError::TooLarge {
            field: "n_blocks",
            value: n_blocks as u64,
            limit: limits.max_blocks as u64,
        });
    }
    if bytes_per_block > limits.max_bytes_per_block {
        return Err(WireError::TooLarge {
            field: "bytes_per_block",
            value: bytes_per_block as u64,
            limit: limits.max_bytes_per_block as u64,
        });
    }
    if kv_len > n_tokens {
        return Err(invalid(
            "kv_len",
            format!("{kv_len} exceeds the {n_tokens} tokens carried"),
        ));
    }
    let bs = block_size_tokens as usize;
    if n_hashes != kv_len / bs {
        return Err(invalid(
            "n_hashes",
            format!(
                "{n_hashes} hashes, but kv_len {kv_len} in blocks of {bs} has {} full blocks",
                kv_len / bs
            ),
        ));
    }
    if first_block + n_blocks as usize != kv_len.div_ceil(bs) {
        return Err(invalid(
            "n_blocks",
            format!(
                "blocks {first_block}..{} carried, but kv_len {kv_len} in blocks of {bs} uses {}",
                first_block + n_blocks as usize,
                kv_len.div_ceil(bs)
            ),
        ));
    }
    let payload_len = fr.u64("payload length").await?;
    if payload_len > limits.max_payload_bytes {
        return Err(WireError::TooLarge {
            field: "payload length",
            value: payload_len,
            limit: limits.max_payload_bytes,
        });
    }
    let expected_payload = n_blocks as u64 * bytes_per_block as u64;
    if payload_len != expected_payload {
        return Err(invalid(
            "payload length",
            format!(
                "{payload_len}, but {n_blocks} blocks of {bytes_per_block} bytes make {expected_payload}"
            ),
        ));
    }
    let (blocks, device) = match landing {
        Landing::Device(device) if payload_len > 0 => {
            let dtype = kv_tensor_dtype(dtype, bytes_per_block)?;
            let rows = super::device_io::read_rows(
                &mut fr,
                n_blocks as usize,
                bytes_per_block as usize,
                dtype,
                device,
            )
            .await?;
            (vec![Vec::new(); n_blocks as usize], Some(rows))
        }
        _ => {
            let mut blocks = Vec::with_capacity(n_blocks as usize);
            for _ in 0..n_blocks {
                let mut block = vec![0u8; bytes_per_block as usize];
                fr.fill(&mut block, "payload").await?;
                blocks.push(block);
            }
            (blocks, None)
        }
    };
    fr.check_crc().await?;
    // The receiver keys its prefix cache by these hashes: they must be the tokens' own.
    if token_block_hashes(&tokens[..kv_len], block_size_tokens) != block_hashes {
        return Err(invalid(
            "block_hashes",
            "do not match the chained hashes of the tokens",
        ));
    }
    Ok(Frame::Transfer(KvTransfer {
        request_id,
        model_fingerprint,
        dtype,
        n_layers,
        block_size_tokens,
        kv: KvExport {
            tokens,
            kv_len,
            block_hashes,
            first_block,
            blocks,
            device,
        },
    }))
}

/// The element type of KV rows that land in device memory: blocks must hold whole elements.
fn kv_tensor_dtype(dtype: DType, bytes_per_block: u32) -> Result<TensorDType, WireError> {
    let t = match dtype {
        DType::F32 => TensorDType::F32,
        DType::F16 => TensorDType::F16,
        DType::Bf16 => TensorDType::BF16,
        DType::Fp8 => return Err(invalid("dtype", "fp8 KV cannot land in device memory")),
    };
    if !(bytes_per_block as usize).is_multiple_of(t.size_in_bytes()) {
        return Err(invalid(
            "bytes_per_block",
            format!("{bytes_per_block} is not a whole number of {dtype:?} elements"),
        ));
    }
    Ok(t)
}

async fn read_layer<R: AsyncRead + Unpin>(
    mut fr: FrameReader<'_, R>,
    header_len: usize,
    limits: &WireLimits,
) -> Result<LayerFrame, WireError> {
    if header_len != LAYER_HEADER_BYTES as usize {
        return Err(invalid(
            "header length",
            format!("a layer header is {LAYER_HEADER_BYTES} bytes, not {header_len}"),
        ));
    }
    let mut header = [0u8; LAYER_HEADER_BYTES as usize];
    fr.fill(&mut header, "header").await?;
    let mut c = Cursor { buf: &header };
    let request_id = c.u64("request id")?;
    let layer = c.u32("layer")?;
    let n_blocks = c.u32("n_blocks")?;
    let part_bytes = c.u32("part_bytes")?;
    if n_blocks > limits.max_blocks {
        return Err(WireError::TooLarge {
            field: "n_blocks",
            value: n_blocks as u64,
            limit: limits.max_blocks as u64,
        });
    }
    if part_bytes > limits.max_bytes_per_block {
        return Err(WireError::TooLarge {
            field: "part_bytes",
            value: part_bytes as u64,
            limit: limits.max_bytes_per_block as u64,
        });
    }
    let expected = n_blocks as u64 * part_bytes as u64;
    let payload_len = fr.u64("payload length").await?;
    if payload_len != expected {
        return Err(invalid(
            "payload length",
            format!("{payload_len}, but {n_blocks} parts of {part_bytes} bytes make {expected}"),
        ));
    }
    if payload_len > limits.max_payload_bytes {
        return Err(WireError::TooLarge {
            field: "payload length",
            value: payload_len,
            limit: limits.max_payload_bytes,
        });
    }
    let mut parts = Vec::with_capacity(n_blocks as usize);
    for _ in 0..n_blocks {
        let mut part = vec![0u8; part_bytes as usize];
        fr.fill(&mut part, "payload").await?;
        parts.push(part);
    }
    fr.check_crc().await?;
    Ok(LayerFrame {
        request_id,
        layer,
        parts,
    })
}

/// The layer frames of one streamed transfer, as they arrive on a connection, bounded by the
/// limits before anything is kept.
#[derive(Debug, Default)]
pub struct LayerAssembly {
    request_id: Option<u64>,
    /// By layer.
    layers: std::collections::BTreeMap<u32, Vec<Vec<u8>>>,
    bytes: u64,
}

impl LayerAssembly {
    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    pub fn add(&mut self, frame: LayerFrame, limits: &WireLimits) -> Result<(), WireError> {
        if self.request_id.is_some_and(|id| id != frame.request_id) {
            return Err(invalid("request id", "layers of two transfers interleaved"));
        }
        self.request_id = Some(frame.request_id);
        let bytes: u64 = frame.parts.iter().map(|p| p.len() as u64).sum();
        if self.bytes + bytes > limits.max_payload_bytes {
            return Err(WireError::TooLarge {
                field: "streamed payload",
                value: self.bytes + bytes,
                limit: limits.max_payload_bytes,
            });
        }
        if self.layers.insert(frame.layer, frame.parts).is_some() {
            return Err(invalid(
                "layer",
                format!("layer {} sent twice", frame.layer),
            ));
        }
        self.bytes += bytes;
        Ok(())
    }

    /// Puts the layers into the blocks of the transfer frame that closes them (its blocks
    /// empty): every layer once, each with the transfer's blocks, parts of one size.
    pub fn complete(self, mut t: KvTransfer, limits: &WireLimits) -> Result<KvTransfer, WireError> {
        if self.request_id != Some(t.request_id) {
            return Err(invalid(
                "request id",
                "the closing frame names another transfer",
            ));
        }
        let n_blocks = t.kv.blocks.len();
        if t.kv.blocks.iter().any(|b| !b.is_empty()) {
            return Err(invalid("blocks", "a closing frame carries no block bytes"));
        }
        let expected: Vec<u32> = (0..t.n_layers).collect();
        if !self.layers.keys().copied().eq(expected.iter().copied()) {
            return Err(invalid(
                "layer",
                format!(
                    "{} layer frames for a {}-layer model",
                    self.layers.len(),
                    t.n_layers
                ),
            ));
        }
        let part_bytes = self
            .layers
            .values()
            .next()
            .and_then(|p| p.first())
            .map_or(0, Vec::len);
        if self
            .layers
            .values()
            .any(|parts| parts.len() != n_blocks || parts.iter().any(|p| p.len() != part_bytes))
        {
            return Err(invalid(
                "n_blocks",
                format!("every layer must carry {n_blocks} parts of {part_bytes} bytes"),
            ));
        }
        let block_bytes = part_bytes as u64 * t.n_layers as u64;
        if block_bytes > limits.max_bytes_per_block as u64 {
            return Err(WireError::TooLarge {
                field: "bytes_per_block",
                value: block_bytes,
                limit: limits.max_bytes_per_block as u64,
            });
        }
        let mut blocks: Vec<Vec<u8>> = (0..n_blocks)
            .map(|_| Vec::with_capacity(block_bytes as usize))
            .collect();
        for parts in self.layers.into_values() {
            for (block, part) in blocks.iter_mut().zip(parts) {
                block.extend_from_slice(&part);
            }
        }
        t.kv.blocks = blocks;
        Ok(t)
    }
}

pub async fn read_ack<R: AsyncRead + Unpin>(r: &mut R) -> Result<Ack, WireError> {
    let mut fr = FrameReader {
        r,
        crc: crc32fast::Hasher::new(),
    };
    let (_, header_len) = fr
        .preamble(&[KIND_ACK], "ack", ACK_HEADER_BYTES as u64)
        .await?;
    if header_len != ACK_HEADER_BYTES as usize {
        return Err(invalid(
            "header length",
            format!("an ack header is {ACK_HEADER_BYTES} bytes, not {header_len}"),
        ));
    }
    let mut header = [0u8; ACK_HEADER_BYTES as usize];
    fr.fill(&mut header, "header").await?;
    let mut c = Cursor { buf: &header };
    let request_id = c.u64("request id")?;
    let code = c.u8("status")?;
    let receiver_fingerprint = c.u64("receiver fingerprint")?;
    let payload_len = fr.u64("payload length").await?;
    if payload_len != 0 {
        return Err(invalid(
            "payload length",
            format!("{payload_len} in an ack"),
        ));
    }
    fr.check_crc().await?;
    let status =
        AckStatus::from_code(code).ok_or_else(|| invalid("status", format!("code {code}")))?;
    Ok(Ack {
        request_id,
        status,
        receiver_fingerprint,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    fn read(bytes: &[u8]) -> Result<KvTransfer, WireError> {
        let mut r = bytes;
        block_on(read_frame(&mut r, &WireLimits::default()))
    }

    /// A consistent transfer: `n_tokens` tokens, KV for `kv_len` of them, blocks from
    /// `first_block` on.
    fn transfer(
        n_tokens: usize,
        kv_len: usize,
        block_size: u32,
        first_block: usize,
        bytes_per_block: usize,
        seed: u8,
    ) -> KvTransfer {
        let tokens: Vec<u32> = (0..n_tokens as u32)
            .map(|i| i.wrapping_mul(2_654_435_761) ^ seed as u32)
            .collect();
        let used = kv_len.div_ceil(block_size as usize);
        KvTransfer {
            request_id: 0x0123_4567_89ab_cdef ^ seed as u64,
            model_fingerprint: 42,
            dtype: DType::Bf16,
            n_layers: 3,
            block_size_tokens: block_size,
            kv: KvExport {
                block_hashes: token_block_hashes(&tokens[..kv_len], block_size),
                tokens,
                kv_len,
                first_block,
                blocks: (first_block..used)
                    .map(|b| {
                        (0..bytes_per_block)
                            .map(|i| (i as u8).wrapping_mul(31) ^ b as u8 ^ seed)
                            .collect()
                    })
                    .collect(),
                device: None,
            },
        }
    }

    #[test]
    fn a_frame_round_trips_and_streams_the_same_bytes() {
        let t = transfer(37, 36, 16, 1, 96, 7);
        let bytes = encode(&t).unwrap();
        assert_eq!(bytes.len() as u64, frame_len(&t).unwrap());
        let mut streamed = Vec::new();
        assert_eq!(
            block_on(write_frame(&mut streamed, &t)).unwrap(),
            bytes.len() as u64
        );
        assert_eq!(streamed, bytes);
        assert_eq!(read(&bytes).unwrap(), t);
    }

    #[test]
    fn an_ack_round_trips() {
        let ack = Ack {
            request_id: 9,
            status: AckStatus::FingerprintMismatch,
            receiver_fingerprint: 77,
        };
        let mut bytes = Vec::new();
        block_on(write_ack(&mut bytes, &ack)).unwrap();
        let mut r = &bytes[..];
        assert_eq!(block_on(read_ack(&mut r)).unwrap(), ack);
    }

    #[test]
    fn every_single_byte_corruption_is_detected() {
        let t = transfer(21, 20, 4, 2, 24, 3);
        let bytes = encode(&t).unwrap();
        for i in 0..bytes.len() {
            for flip in [0x01, 0x80, 0xff] {
                let mut bad = bytes.clone();
                bad[i] ^= flip;
                assert!(
                    read(&bad).is_err(),
                    "flip {flip:#x} at byte {i} went unnoticed"
                );
            }
        }
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = encode(&transfer(10, 9, 4, 0, 8, 1)).unwrap();
        for len in 0..bytes.len() {
            assert!(read(&bytes[..len]).is_err(), "truncated to {len} bytes");
        }
    }

    #[test]
    fn a_payload_of_2_pow_60_bytes_is_refused_before_allocating() {
        let t = transfer(8, 8, 4, 0, 16, 0);
        let mut bytes = encode(&t).unwrap();
        let at = bytes.len() - 4 - t.kv.payload_bytes() - 8;
        bytes[at..at + 8].copy_from_slice(&(1u64 << 60).to_le_bytes());
        match read(&bytes) {
            Err(WireError::TooLarge { field, .. }) => assert_eq!(field, "payload length"),
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }

    #[test]
    fn huge_counts_and_header_lengths_are_refused() {
        let bytes = encode(&transfer(8, 8, 4, 0, 16, 0)).unwrap();
        let mut huge_header = bytes.clone();
        huge_header[6..10].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            read(&huge_header),
            Err(WireError::TooLarge {
                field: "header length",
                ..
            })
        ));
        let mut huge_tokens = bytes.clone();
        huge_tokens[10 + 33..10 + 37].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            read(&huge_tokens),
            Err(WireError::TooLarge {
                field: "n_tokens",
                ..
            })
        ));
        // Within the limit, but more tokens than the header has room for.
        let mut many_tokens = bytes.clone();
        many_tokens[10 + 33..10 + 37].copy_from_slice(&1000u32.to_le_bytes());
        assert!(matches!(
            read(&many_tokens),
            Err(WireError::Invalid {
                field: "n_tokens",
                ..
            })
        ));
    }

    #[test]
    fn inconsistent_fields_are_named() {
        let mut hashes_short = transfer(20, 20, 4, 0, 8, 0);
        hashes_short.kv.block_hashes.pop();
        assert!(matches!(
            read(&encode(&hashes_short).unwrap()),
            Err(WireError::Invalid {
                field: "n_hashes",
                ..
            })
        ));
        let mut missing_block = transfer(20, 20, 4, 0, 8, 0);
        missing_block.kv.blocks.pop();
        assert!(matches!(
            read(&encode(&missing_block).unwrap()),
            Err(WireError::Invalid {
                field: "n_blocks",
                ..
            })
        ));
        let mut wrong_hash = transfer(20, 20, 4, 0, 8, 0);
        wrong_hash.kv.block_hashes[2] ^= 1;
        assert!(matches!(
            read(&encode(&wrong_hash).unwrap()),
            Err(WireError::Invalid {
                field: "block_hashes",
                ..
            })
        ));
        let mut uneven = transfer(20, 20, 4, 0, 8, 0);
        uneven.kv.blocks[1].push(0);
        assert!(matches!(
            encode(&uneven),
            Err(WireError::Invalid {
                field: "blocks",
                ..
            })
        ));
    }

    #[test]
    fn garbage_is_refused_and_an_empty_stream_is_closed() {
        assert!(matches!(
            read(b"GET / HTTP/1.1\r\n\r\n"),
            Err(WireError::BadMagic(_))
        ));
        assert!(matches!(read(b""), Err(WireError::Closed)));
    }

    #[test]
    fn fingerprints_are_stable_and_tell_architectures_and_dtypes_apart() {
        let spec = ModelSpec::preset("smollm2-135m").unwrap();
        let f = model_fingerprint(&spec, DType::F32);
        assert_eq!(f, model_fingerprint(&spec.clone(), DType::F32));
        assert_ne!(f, model_fingerprint(&spec, DType::Bf16));
        let mut other = spec.clone();
        other.n_kv_heads += 1;
        assert_ne!(f, model_fingerprint(&other, DType::F32));
        let mut renamed = spec;
        renamed.name = "renamed".into();
        assert_eq!(f, model_fingerprint(&renamed, DType::F32));
    }

    fn arb_transfer() -> impl Strategy<Value = KvTransfer> {
        (1usize..6, 0usize..40, 0usize..40, 0usize..33, any::<u8>()).prop_map(
            |(bs, n, kv, bpb, seed)| {
                let kv = kv.min(n);
                let used = kv.div_ceil(bs);
                transfer(n, kv, bs as u32, seed as usize % (used + 1), bpb, seed)
            },
        )
    }

    proptest! {
        #[test]
        fn any_transfer_round_trips(t in arb_transfer()) {
            prop_assert_eq!(read(&encode(&t).unwrap()).unwrap(), t);
        }

        #[test]
        fn any_corruption_or_truncation_is_an_error(
            t in arb_transfer(),
            at in any::<prop::sample::Index>(),
            flip in 1u8..=255,
            cut in any::<prop::sample::Index>(),
        ) {
            let bytes = encode(&t).unwrap();
            let mut bad = bytes.clone();
            bad[at.index(bytes.len())] ^= flip;
            prop_assert!(read(&bad).is_err());
            prop_assert!(read(&bytes[..cut.index(bytes.len())]).is_err());
        }

        #[test]
        fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = read(&bytes);
            let mut prefixed = MAGIC.to_vec();
            prefixed.extend_from_slice(&[VERSION, KIND_TRANSFER]);
            prefixed.extend_from_slice(&bytes);
            let _ = read(&prefixed);
        }
    }
}
