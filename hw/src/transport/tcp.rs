//! KV over TCP: one connection per transfer on the sending side; a listener (loopback by
//! default) that reads frames within [`WireLimits`], delivers them and acknowledges each.
//!
//! A frame the listener cannot accept (garbage, over the limits, inconsistent, failed
//! checksum, another model's fingerprint) gets a refusing ack when it can be written, and the
//! connection is dropped; the listener goes on serving others. A sender whose frame failed the
//! checksum sends it once more on a new connection, then gives up with an error.

use super::wire::{self, Ack, AckStatus};
use super::{
    Endpoint, KvTransfer, KvTransport, Landing, TransferReceipt, TransportError, WireLimits,
};
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep};

/// Attempts per transfer when the receiver reports a checksum mismatch.
const MAX_ATTEMPTS: u32 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpConfig {
    pub connect_timeout: Duration,
    /// A connection that makes no progress (no byte read or written) for this long fails.
    pub idle_timeout: Duration,
    pub limits: WireLimits,
}

impl Default for TcpConfig {
    fn default() -> TcpConfig {
        TcpConfig {
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            limits: WireLimits::default(),
        }
    }
}

/// A stream whose reads and writes fail with `TimedOut` after `timeout` without progress, so
/// that a large transfer may take as long as it needs but a stalled peer cannot hang anyone.
struct IdleTimeout<S> {
    inner: S,
    timeout: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl<S> IdleTimeout<S> {
    fn new(inner: S, timeout: Duration) -> IdleTimeout<S> {
        IdleTimeout {
            inner,
            timeout,
            deadline: Box::pin(tokio::time::sleep(timeout)),
        }
    }

    /// Maps the inner poll's result: progress pushes the deadline back, waiting past it fails.
    fn watch<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match polled {
            Poll::Ready(result) => {
                self.deadline.as_mut().reset(Instant::now() + self.timeout);
                Poll::Ready(result)
            }
            Poll::Pending => {
                ready!(self.deadline.as_mut().poll(cx));
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no progress for {} ms", self.timeout.as_millis()),
                )))
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for IdleTimeout<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        this.watch(cx, polled)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for IdleTimeout<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.watch(cx, polled)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        this.watch(cx, polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.watch(cx, polled)
    }
}

/// Sends transfers over TCP, one connection each.
#[derive(Clone, Debug, Default)]
pub struct TcpTransport {
    pub config: TcpConfig,
}

impl TcpTransport {
    pub fn new(config: TcpConfig) -> TcpTransport {
        TcpTransport { config }
    }

    fn io_error(
        &self,
        to: &Endpoint,
        request_id: u64,
        during: &'static str,
        e: io::Error,
    ) -> TransportError {
        if e.kind() == io::ErrorKind::TimedOut {
            TransportError::Timeout {
                endpoint: to.clone(),
                during,
                timeout_ms: self.config.idle_timeout.as_millis(),
            }
        } else {
            TransportError::Dropped {
                endpoint: to.clone(),
                request_id,
                reason: format!("{during}: {e}"),
            }
        }
    }

    /// A connection to `addr` within the connect timeout, failing when idle too long.
    async fn connect(
        &self,
        to: &Endpoint,
        addr: SocketAddr,
    ) -> Result<IdleTimeout<TcpStream>, TransportError> {
        let stream = tokio::time::timeout(self.config.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| TransportError::Timeout {
                endpoint: to.clone(),
                during: "connecting",
                timeout_ms: self.config.connect_timeout.as_millis(),
            })?
            .map_err(|source| TransportError::Connect {
                endpoint: to.clone(),
                source,
            })?;
        stream.set_nodelay(true).ok();
        Ok(IdleTimeout::new(stream, self.config.idle_timeout))
    }

    /// One connection: write the frame, read the ack. A refusal may arrive while the frame is
    /// still being written (the receiver stops reading), so the ack is read even then.
    async fn attempt(
        &self,
        to: &Endpoint,
        addr: SocketAddr,
        transfer: &KvTransfer,
    ) -> Result<(Ack, u64), TransportError> {
        let request_id = transfer.request_id;
        let mut stream = self.connect(to, addr).await?;
        let written = match wire::write_frame(&mut stream, transfer).await {
            Err(wire::WireError::Device(source)) => {
                return Err(TransportError::Device {
                    endpoint: to.clone(),
                    request_id,
                    source: Box::new(source),
                });
            }
            written => written,
        };
        match (wire::read_ack(&mut stream).await, written) {
            (Ok(ack), Ok(bytes)) => Ok((ack, bytes)),
            (Ok(ack), Err(_)) if ack.status != AckStatus::Ok => Ok((ack, 0)),
            (_, Err(wire::WireError::Io(e))) => Err(self.io_error(to, request_id, "sending", e)),
            (Err(wire::WireError::Io(e)), _) => {
                Err(self.io_error(to, request_id, "waiting for the ack", e))
            }
            (Err(e), _) | (_, Err(e)) => Err(TransportError::Dropped {
                endpoint: to.clone(),
                request_id,
                reason: e.to_string(),
            }),
        }
    }
}

/// What a streamed send keeps across its attempt: the closing frame still to come, the layers
/// sent (to resend whole), when the first left.
struct Streamed {
    last: Option<tokio::sync::oneshot::Receiver<KvTransfer>>,
    sent: Vec<super::LayerParts>,
    started: Option<std::time::Instant>,
}

impl TcpTransport {
    /// One connection carrying each layer as it comes, then the closing frame; the ack of the
    /// closing frame answers for the whole. Returns what was sent, to retry whole on failure.
    async fn attempt_streamed(
        &self,
        to: &Endpoint,
        addr: SocketAddr,
        request_id: u64,
        layers: &mut mpsc::UnboundedReceiver<super::LayerParts>,
        state: &mut Streamed,
    ) -> Result<(Ack, u64, KvTransfer), TransportError> {
        // Connect when the first layer is ready, not before: a request may wait in the prefill
        // worker's queue for longer than the receiver lets a connection idle.
        let mut next = layers.recv().await;
        state.started = Some(std::time::Instant::now());
        let mut stream = self.connect(to, addr).await?;
        let mut wire_bytes = 0;
        let mut write_error = None;
        while let Some((layer, parts)) = next {
            let frame = wire::LayerFrame {
                request_id,
                layer,
                parts,
            };
            if write_error.is_none() {
                match wire::write_layer_frame(&mut stream, &frame).await {
                    Ok(n) => wire_bytes += n,
                    Err(e) => write_error = Some(e),
                }
            }
            state.sent.push((frame.layer, frame.parts));
            next = layers.recv().await;
        }
        let closing = match state.last.take() {
            Some(rx) => rx.await.map_err(|_| TransportError::Refused {
                endpoint: to.clone(),
                request_id,
                reason: "the sender gave up before the transfer was complete",
            })?,
            None => unreachable!("a streamed transfer is attempted once"),
        };
        let mut closing_frame = closing.clone();
        closing_frame.kv.blocks = vec![Vec::new(); closing.kv.blocks.len()];
        if write_error.is_none() {
            match wire::write_frame(&mut stream, &closing_frame).await {
                Ok(n) => wire_bytes += n,
                Err(e) => write_error = Some(e),
            }
        }
        let ack = wire::read_ack(&mut stream).await;
        match (ack, write_error) {
            (Ok(ack), None) => Ok((ack, wire_bytes, closing)),
            (Ok(ack), Some(_)) if ack.status != AckStatus::Ok => Ok((ack, 0, closing)),
            (_, Some(wire::WireError::Io(e))) => Err(self.io_error(to, request_id, "sending", e)),
            (Err(wire::WireError::Io(e)), _) => {
                Err(self.io_error(to, request_id, "waiting for the ack", e))
            }
            (Err(e), _) | (_, Some(e)) => Err(TransportError::Dropped {
                endpoint: to.clone(),
                request_id,
                reason: e.to_string(),
            }),
        }
    }
}

impl KvTransport for TcpTransport {
    async fn send_streamed(
        &self,
        to: &Endpoint,
        request_id: u64,
        mut layers: mpsc::UnboundedReceiver<super::LayerParts>,
        last: tokio::sync::oneshot::Receiver<KvTransfer>,
    ) -> Result<TransferReceipt, TransportError> {
        let &Endpoint::Tcp(addr) = to else {
            return Err(TransportError::UnsupportedEndpoint {
                transport: "tcp",
                endpoint: to.clone(),
            });
        };
        // The transfer starts with its first layer.
        let mut state = Streamed {
            last: Some(last),
            sent: Vec::new(),
            started: None,
        };
        let (ack, wire_bytes, closing) = self
            .attempt_streamed(to, addr, request_id, &mut layers, &mut state)
            .await?;
        let Streamed { sent, started, .. } = state;
        let started = started.unwrap_or_else(std::time::Instant::now);
        if ack.status == AckStatus::Ok && ack.request_id == request_id {
            return Ok(TransferReceipt {
                request_id,
                payload_bytes: sent
                    .iter()
                    .flat_map(|(_, p)| p)
                    .map(|p| p.len() as u64)
                    .sum(),
                wire_bytes,
                attempts: 1,
                started,
            });
        }
        if ack.status != AckStatus::ChecksumMismatch {
            return self.refusal(to, request_id, &closing, ack);
        }
        // A corrupted layer: send the whole transfer again, in one frame.
        let mut whole = closing;
        whole.kv.blocks = super::assemble_layers(sent, whole.kv.blocks.len());
        let mut receipt = self.send(to, whole).await?;
        receipt.attempts += 1;
        receipt.started = started;
        Ok(receipt)
    }

    async fn send(
        &self,
        to: &Endpoint,
        transfer: KvTransfer,
    ) -> Result<TransferReceipt, TransportError> {
        let &Endpoint::Tcp(addr) = to else {
            return Err(TransportError::UnsupportedEndpoint {
                transport: "tcp",
                endpoint: to.clone(),
            });
        };
        let request_id = transfer.request_id;
        wire::frame_len(&transfer)
            .map_err(|source| TransportError::Encode { request_id, source })?;
        let started = std::time::Instant::now();
        for attempt in 1..=MAX_ATTEMPTS {
            let (ack, wire_bytes) = self.attempt(to, addr, &transfer).await?;
            if ack.status == AckStatus::ChecksumMismatch {
                continue;
            }
            let mut receipt = self.refusal(to, request_id, &transfer, ack)?;
            receipt.wire_bytes = wire_bytes;
            receipt.attempts = attempt;
            receipt.started = started;
            return Ok(receipt);
        }
        Err(TransportError::Checksum {
            endpoint: to.clone(),
            request_id,
            attempts: MAX_ATTEMPTS,
        })
    }
}

impl TcpTransport {
    /// The receipt of an accepted transfer, or the error an ack's refusal means (a checksum
    /// mismatch is the caller's to retry).
    fn refusal(
        &self,
        to: &Endpoint,
        request_id: u64,
        transfer: &KvTransfer,
        ack: Ack,
    ) -> Result<TransferReceipt, TransportError> {
        let refused = |reason| TransportError::Refused {
            endpoint: to.clone(),
            request_id,
            reason,
        };
        match ack.status {
            AckStatus::Ok if ack.request_id == request_id => Ok(TransferReceipt {
                request_id,
                payload_bytes: transfer.kv.payload_bytes() as u64,
                wire_bytes: 0,
                attempts: 1,
                started: std::time::Instant::now(),
            }),
            AckStatus::Ok => Err(refused("acknowledged another request id")),
            AckStatus::ChecksumMismatch => Err(TransportError::Checksum {
                endpoint: to.clone(),
                request_id,
                attempts: 1,
            }),
            AckStatus::FingerprintMismatch => Err(TransportError::FingerprintMismatch {
                endpoint: to.clone(),
                request_id,
                sent: transfer.model_fingerprint,
                receiver: ack.receiver_fingerprint,
            }),
            AckStatus::InvalidFrame => {
                Err(refused("invalid frame (over its limits or inconsistent)"))
            }
            AckStatus::Unavailable => Err(refused(
                "the receiver cannot take it (its worker is gone or its device failed)",
            )),
        }
    }
}

/// Counters of a listener, for metrics and tests.
#[derive(Debug, Default)]
pub struct ListenerStats {
    pub delivered: AtomicU64,
    pub rejected: AtomicU64,
}

/// Accepts KV transfers on a TCP port and delivers them into a channel. Dropping it stops the
/// listener and its connections.
pub struct TcpKvListener {
    local_addr: SocketAddr,
    stats: Arc<ListenerStats>,
    accept_task: tokio::task::JoinHandle<()>,
}

impl TcpKvListener {
    /// Listens on 127.0.0.1 on a free port.
    pub async fn bind_loopback(
        model_fingerprint: u64,
        config: TcpConfig,
        deliver: mpsc::Sender<KvTransfer>,
    ) -> io::Result<TcpKvListener> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        TcpKvListener::bind(addr, model_fingerprint, config, deliver).await
    }

    /// Listens on `addr`, accepting transfers made for `model_fingerprint`. Must run inside a
    /// tokio runtime, which serves the connections.
    pub async fn bind(
        addr: SocketAddr,
        model_fingerprint: u64,
        config: TcpConfig,
        deliver: mpsc::Sender<KvTransfer>,
    ) -> io::Result<TcpKvListener> {
        TcpKvListener::bind_landing(addr, model_fingerprint, config, deliver, Landing::Host).await
    }

    /// [`TcpKvListener::bind`], putting each whole transfer's payload where `landing` says (a
    /// GPU's memory, read from the socket through pinned host buffers).
    pub async fn bind_landing(
        addr: SocketAddr,
        model_fingerprint: u64,
        config: TcpConfig,
        deliver: mpsc::Sender<KvTransfer>,
        landing: Landing,
    ) -> io::Result<TcpKvListener> {
        let listener = TcpListener::bind(addr).await?;
        let local_addr = listener.local_addr()?;
        let stats = Arc::new(ListenerStats::default());
        let accept_task = tokio::spawn(accept_loop(
            listener,
            Connection {
                model_fingerprint,
                config,
                deliver,
                stats: stats.clone(),
                landing,
            },
        ));
        Ok(TcpKvListener {
            local_addr,
            stats,
            accept_task,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn endpoint(&self) -> Endpoint {
        Endpoint::Tcp(self.local_addr)
    }

    pub fn stats(&self) -> &ListenerStats {
        &self.stats
    }
}

impl Drop for TcpKvListener {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

/// What every connection of a listener needs.
#[derive(Clone)]
struct Connection {
    model_fingerprint: u64,
    config: TcpConfig,
    deliver: mpsc::Sender<KvTransfer>,
    stats: Arc<ListenerStats>,
    landing: Landing,
}

async fn accept_loop(listener: TcpListener, conn: Connection) {
    // Owning the connection tasks here means aborting this task ends them too.
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        match listener.accept().await {
            Ok((stream, _peer)) => {
                stream.set_nodelay(true).ok();
                connections.spawn(conn.clone().serve(stream));
            }
            // Out of descriptors and the like: wait a little rather than spin.
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

impl Connection {
    /// Serves frames until the peer closes, stalls, or sends one that is refused. Layer frames
    /// gather until the transfer frame that closes them; each transfer is acknowledged.
    async fn serve(self, stream: TcpStream) {
        let mut stream = IdleTimeout::new(stream, self.config.idle_timeout);
        let limits = &self.config.limits;
        let mut layers = wire::LayerAssembly::default();
        loop {
            let frame = match wire::read_message_to(&mut stream, limits, &self.landing).await {
                Ok(wire::Frame::Layer(layer)) => match layers.add(layer, limits) {
                    Ok(()) => continue,
                    Err(e) => Err(e),
                },
                Ok(wire::Frame::Transfer(t)) => {
                    let closes = !layers.is_empty()
                        || (t.kv.device.is_none()
                            && !t.kv.blocks.is_empty()
                            && t.kv.blocks.iter().all(Vec::is_empty));
                    if closes {
                        std::mem::take(&mut layers).complete(t, limits)
                    } else {
                        Ok(t)
                    }
                }
                Err(e) => Err(e),
            };
            let (request_id, status) = match frame {
                Err(wire::WireError::Closed) => return,
                Err(wire::WireError::ChecksumMismatch { .. }) => (0, AckStatus::ChecksumMismatch),
                // The receiver's device failed, not the frame.
                Err(wire::WireError::Device(_)) => (0, AckStatus::Unavailable),
                Err(_) => (0, AckStatus::InvalidFrame),
                Ok(t) if t.model_fingerprint != self.model_fingerprint => {
                    (t.request_id, AckStatus::FingerprintMismatch)
                }
                Ok(t) => {
                    let request_id = t.request_id;
                    match self.deliver.send(t).await {
                        Ok(()) => (request_id, AckStatus::Ok),
                        Err(_) => (request_id, AckStatus::Unavailable),
                    }
                }
            };
            let counter = match status {
                AckStatus::Ok => &self.stats.delivered,
                _ => &self.stats.rejected,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            let ack = Ack {
                request_id,
                status,
                receiver_fingerprint: self.model_fingerprint,
            };
            if wire::write_ack(&mut stream, &ack).await.is_err() || status != AckStatus::Ok {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paged::{DeviceBlocks, KvExport};
    use models::DType;
    use models::runtime::{Device, TensorDType};
    use sim::kv::token_block_hashes;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const FINGERPRINT: u64 = 0xfeed;

    fn quick() -> TcpConfig {
        TcpConfig {
            connect_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(5),
            limits: WireLimits::default(),
        }
    }

    /// `n_blocks` full blocks of 16 tokens, `bytes_per_block` each, seeded content.
    fn transfer(request_id: u64, n_blocks: usize, bytes_per_block: usize) -> KvTransfer {
        let tokens: Vec<u32> = (0..16 * n_blocks as u32)
            .map(|i| i.wrapping_mul(7919) ^ request_id as u32)
            .collect();
        KvTransfer {
            request_id,
            model_fingerprint: FINGERPRINT,
            dtype: DType::F16,
            n_layers: 30,
            block_size_tokens: 16,
            kv: KvExport {
                block_hashes: token_block_hashes(&tokens, 16),
                kv_len: tokens.len(),
                tokens,
                first_block: 0,
                blocks: (0..n_blocks)
                    .map(|b| {
                        (0..bytes_per_block)
                            .map(|i| (i as u64 * 131 + b as u64 * 7 + request_id) as u8)
                            .collect()
                    })
                    .collect(),
                device: None,
            },
        }
    }

    async fn listener(capacity: usize) -> (TcpKvListener, mpsc::Receiver<KvTransfer>) {
        let (tx, rx) = mpsc::channel(capacity);
        let l = TcpKvListener::bind_loopback(FINGERPRINT, quick(), tx)
            .await
            .unwrap();
        (l, rx)
    }

    /// `t`'s blocks cut into `n_layers` layer parts, as a prefill streams them.
    fn layer_parts(t: &KvTransfer, n_layers: usize) -> Vec<crate::transport::LayerParts> {
        let part = t.kv.blocks[0].len() / n_layers;
        (0..n_layers)
            .map(|l| {
                let parts =
                    t.kv.blocks
                        .iter()
                        .map(|b| b[l * part..(l + 1) * part].to_vec());
                (l as u32, parts.collect())
            })
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_streamed_transfer_arrives_as_the_whole_one_would() {
        let (l, mut rx) = listener(4).await;
        let t = transfer(11, 9, 30 * 64);
        let (layers_tx, layers_rx) = mpsc::unbounded_channel();
        let (last_tx, last_rx) = tokio::sync::oneshot::channel();
        let endpoint = l.endpoint();
        let sending = tokio::spawn(async move {
            TcpTransport::new(quick())
                .send_streamed(&endpoint, 11, layers_rx, last_rx)
                .await
        });
        // Out of order, as nothing promises otherwise.
        let mut parts = layer_parts(&t, 30);
        parts.reverse();
        for p in parts {
            layers_tx.send(p).unwrap();
        }
        drop(layers_tx);
        let mut closing = t.clone();
        closing.kv.blocks = vec![Vec::new(); t.kv.blocks.len()];
        last_tx.send(closing).unwrap();
        let receipt = sending.await.unwrap().unwrap();
        assert_eq!(receipt.payload_bytes, t.kv.payload_bytes() as u64);
        assert_eq!(receipt.attempts, 1);
        assert_eq!(rx.recv().await.unwrap(), t);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn incomplete_or_repeated_layers_are_refused_and_the_listener_serves_on() {
        let (l, mut rx) = listener(4).await;
        let t = transfer(12, 3, 30 * 8);
        let mut closing = t.clone();
        closing.kv.blocks = vec![Vec::new(); 3];
        for layers in [
            // A layer missing.
            layer_parts(&t, 30).into_iter().skip(1).collect::<Vec<_>>(),
            // A layer twice.
            layer_parts(&t, 30)
                .into_iter()
                .chain(layer_parts(&t, 30).into_iter().take(1))
                .collect(),
            // None at all: a closing frame alone.
            Vec::new(),
        ] {
            let mut stream = TcpStream::connect(l.local_addr()).await.unwrap();
            for (layer, parts) in layers {
                let frame = wire::LayerFrame {
                    request_id: 12,
                    layer,
                    parts,
                };
                wire::write_layer_frame(&mut stream, &frame).await.unwrap();
            }
            // The listener may refuse before the closing frame is written.
            let _ = wire::write_frame(&mut stream, &closing).await;
            let ack = wire::read_ack(&mut stream).await.unwrap();
            assert_eq!(ack.status, AckStatus::InvalidFrame);
        }
        TcpTransport::new(quick())
            .send(&l.endpoint(), t.clone())
            .await
            .unwrap();
        assert_eq!(rx.recv().await.unwrap(), t);
    }

    /// `t` with its blocks held as device rows (on the CPU device here).
    fn on_device(t: &KvTransfer) -> KvTransfer {
        let mut d = t.clone();
        d.kv.device = Some(
            DeviceBlocks::from_host_blocks(&t.kv.blocks, TensorDType::F16, &Device::Cpu).unwrap(),
        );
        d.kv.blocks = vec![Vec::new(); t.kv.blocks.len()];
        d
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn device_rows_cross_in_the_same_frame_and_land_where_told() {
        let (tx, mut rx) = mpsc::channel(4);
        let landing = Landing::Device(Device::Cpu);
        let to_device = TcpKvListener::bind_landing(
            SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            FINGERPRINT,
            quick(),
            tx,
            landing,
        )
        .await
        .unwrap();
        let (to_host, mut host_rx) = listener(4).await;
        let host = transfer(21, 5, 4096);
        let rows = on_device(&host);
        let transport = TcpTransport::new(quick());

        let receipt = transport
            .send(&to_device.endpoint(), rows.clone())
            .await
            .unwrap();
        assert_eq!(receipt.payload_bytes, 5 * 4096);
        assert_eq!(receipt.wire_bytes, wire::frame_len(&host).unwrap());
        let got = rx.recv().await.unwrap();
        assert!(got.kv.device.is_some(), "landed in device memory");
        assert_eq!(got, rows);

        // Host bytes to a device listener, device rows to a host listener.
        transport
            .send(&to_device.endpoint(), host.clone())
            .await
            .unwrap();
        assert_eq!(rx.recv().await.unwrap(), rows);
        transport
            .send(&to_host.endpoint(), rows.clone())
            .await
            .unwrap();
        assert_eq!(host_rx.recv().await.unwrap(), host);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_few_megabytes_arrive_intact() {
        let (l, mut rx) = listener(4).await;
        // 40 blocks of 96 KiB: 3.75 MiB.
        let t = transfer(1, 40, 96 << 10);
        let receipt = TcpTransport::new(quick())
            .send(&l.endpoint(), t.clone())
            .await
            .unwrap();
        assert_eq!(receipt.payload_bytes, 40 * (96 << 10));
        assert_eq!(receipt.wire_bytes, wire::frame_len(&t).unwrap());
        assert_eq!(receipt.attempts, 1);
        assert_eq!(rx.recv().await.unwrap(), t);
        assert_eq!(l.stats().delivered.load(Ordering::Relaxed), 1);
    }

    /// The seam end to end: a real paged KV export crosses the socket, is imported on
    /// another instance, and the next step there gives the same logits as on the sender.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_paged_export_crosses_and_continues_identically() {
        use crate::paged::PagedModel;
        use models::runtime::{Device, Model, TensorDType, Weights};
        let spec = models::ModelSpec {
            name: "tiny".into(),
            n_layers: 2,
            hidden_size: 64,
            intermediate_size: 128,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 16,
            vocab_size: 97,
            max_position_embeddings: 512,
            rope_theta: 10_000.0,
            rms_norm_eps: 1e-5,
            tie_word_embeddings: false,
        };
        let fingerprint = wire::model_fingerprint(&spec, DType::F32);
        let weights = Weights::random(&spec, TensorDType::F32, &Device::Cpu, 3).unwrap();
        let model = Model::new(weights).unwrap();
        let mut prefill = PagedModel::new(model.clone(), 16, 16, true).unwrap();
        let mut decode = PagedModel::new(model, 16, 16, true).unwrap();
        let prompt: Vec<u32> = (0..37).map(|i| i * 5 % 97).collect();
        let (p, _) = prefill.admit(&prompt).unwrap();
        prefill.step(&[(p, prompt.len())]).unwrap();
        prefill.push_token(p, 11).unwrap();

        let (tx, mut rx) = mpsc::channel(1);
        let l = TcpKvListener::bind_loopback(fingerprint, quick(), tx)
            .await
            .unwrap();
        let t = KvTransfer {
            request_id: 9,
            model_fingerprint: fingerprint,
            dtype: DType::F32,
            n_layers: spec.n_layers,
            block_size_tokens: 16,
            kv: prefill.export(p, 0).unwrap(),
        };
        TcpTransport::new(quick())
            .send(&l.endpoint(), t)
            .await
            .unwrap();
        let d = decode.import(&rx.recv().await.unwrap().kv).unwrap();

        let on_sender: Vec<f32> = prefill
            .step(&[(p, 1)])
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let on_receiver: Vec<f32> = decode
            .step(&[(d, 1)])
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(on_sender, on_receiver);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn garbage_drops_its_connection_and_the_listener_keeps_serving() {
        let (l, mut rx) = listener(4).await;
        // Exactly a preamble's worth: the listener reads it all, refuses it and closes.
        let mut short = TcpStream::connect(l.local_addr()).await.unwrap();
        short.write_all(b"GET / HTTP").await.unwrap();
        let mut rest = Vec::new();
        short.read_to_end(&mut rest).await.unwrap();
        let ack = wire::read_ack(&mut &rest[..]).await.unwrap();
        assert_eq!(ack.status, AckStatus::InvalidFrame);

        // More than it reads: the connection ends, by a close or a reset.
        let mut long = TcpStream::connect(l.local_addr()).await.unwrap();
        let noise: Vec<u8> = (0..100_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        long.write_all(&noise).await.ok();
        let mut rest = Vec::new();
        if let Err(e) = long.read_to_end(&mut rest).await {
            assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}");
        }
        assert_eq!(l.stats().rejected.load(Ordering::Relaxed), 2);

        let t = transfer(2, 3, 1000);
        TcpTransport::new(quick())
            .send(&l.endpoint(), t.clone())
            .await
            .unwrap();
        assert_eq!(rx.recv().await.unwrap(), t);
        assert_eq!(l.stats().delivered.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_corrupted_frame_gets_a_checksum_nack_each_time() {
        let (l, _rx) = listener(4).await;
        let t = transfer(3, 2, 64);
        let mut bytes = wire::encode(&t).unwrap();
        let last = bytes.len() - 5;
        bytes[last] ^= 0x10;
        for _ in 0..2 {
            let mut s = TcpStream::connect(l.local_addr()).await.unwrap();
            s.write_all(&bytes).await.unwrap();
            let ack = wire::read_ack(&mut s).await.unwrap();
            assert_eq!(ack.status, AckStatus::ChecksumMismatch);
        }
        assert_eq!(l.stats().rejected.load(Ordering::Relaxed), 2);
    }

    /// Acks every frame with a checksum mismatch, counting the connections.
    async fn always_checksum_nack() -> (SocketAddr, Arc<AtomicU64>) {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicU64::new(0));
        let counted = connections.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                counted.fetch_add(1, Ordering::Relaxed);
                wire::read_frame(&mut s, &WireLimits::default())
                    .await
                    .unwrap();
                let ack = Ack {
                    request_id: 0,
                    status: AckStatus::ChecksumMismatch,
                    receiver_fingerprint: FINGERPRINT,
                };
                wire::write_ack(&mut s, &ack).await.unwrap();
            }
        });
        (addr, connections)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_sender_retries_a_checksum_nack_once_then_fails() {
        let (addr, connections) = always_checksum_nack().await;
        let err = TcpTransport::new(quick())
            .send(&Endpoint::Tcp(addr), transfer(4, 2, 64))
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                TransportError::Checksum {
                    attempts: 2,
                    request_id: 4,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(connections.load(Ordering::Relaxed), 2);
        assert!(err.to_string().contains("checksum mismatch"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_closed_port_fails_clearly_within_the_timeout() {
        // Bind then drop: nothing listens there any more.
        let addr = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let err = TcpTransport::new(quick())
            .send(&Endpoint::Tcp(addr), transfer(5, 1, 8))
            .await
            .unwrap_err();
        assert!(matches!(err, TransportError::Connect { .. }), "{err}");
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_silent_receiver_times_out_instead_of_hanging() {
        // Accepts, then never reads nor answers.
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let held = tokio::spawn(async move { listener.accept().await.unwrap() });
        let config = TcpConfig {
            idle_timeout: Duration::from_millis(200),
            ..quick()
        };
        let err = TcpTransport::new(config)
            .send(&Endpoint::Tcp(addr), transfer(6, 1, 8))
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                TransportError::Timeout {
                    during: "waiting for the ack",
                    ..
                }
            ),
            "{err}"
        );
        drop(held);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn another_models_kv_is_refused() {
        let (l, mut rx) = listener(4).await;
        let mut t = transfer(7, 2, 512);
        t.model_fingerprint = 0xbad;
        let err = TcpTransport::new(quick())
            .send(&l.endpoint(), t)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                TransportError::FingerprintMismatch {
                    sent: 0xbad,
                    receiver: FINGERPRINT,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("fingerprint mismatch"));
        assert!(rx.try_recv().is_err(), "nothing was delivered");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_frame_over_the_limits_is_refused() {
        let (tx, _rx) = mpsc::channel(4);
        let config = TcpConfig {
            limits: WireLimits {
                max_bytes_per_block: 1024,
                ..WireLimits::default()
            },
            ..quick()
        };
        let l = TcpKvListener::bind_loopback(FINGERPRINT, config, tx)
            .await
            .unwrap();
        let err = TcpTransport::new(quick())
            .send(&l.endpoint(), transfer(8, 2, 4096))
            .await
            .unwrap_err();
        // The listener stops reading mid-frame: the sender sees the refusal or the drop.
        assert!(
            matches!(
                err,
                TransportError::Refused { .. } | TransportError::Dropped { .. }
            ),
            "{err}"
        );
        assert_eq!(l.stats().rejected.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_senders_all_arrive() {
        let (l, mut rx) = listener(2).await;
        let transport = TcpTransport::new(quick());
        let mut sends = JoinSet::new();
        for id in 0..8u64 {
            let (transport, to) = (transport.clone(), l.endpoint());
            sends.spawn(async move {
                transport
                    .send(&to, transfer(100 + id, 1 + id as usize, 20_000))
                    .await
            });
        }
        let mut received = Vec::new();
        for _ in 0..8 {
            received.push(rx.recv().await.unwrap());
        }
        while let Some(result) = sends.join_next().await {
            result.unwrap().unwrap();
        }
        received.sort_by_key(|t| t.request_id);
        for (id, t) in (0..8u64).zip(&received) {
            assert_eq!(*t, transfer(100 + id, 1 + id as usize, 20_000));
        }
    }
}
