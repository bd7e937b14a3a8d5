//! In-process transport: workers in one process hand transfers over channels, no copies and
//! no framing. The same fingerprint check as over the network keeps mismatched models apart.

use super::{Endpoint, KvTransfer, KvTransport, TransferReceipt, TransportError};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

struct Inbox {
    model_fingerprint: u64,
    deliver: mpsc::Sender<KvTransfer>,
}

/// A registry of named inboxes; clones share it.
#[derive(Clone, Default)]
pub struct LocalTransport {
    inboxes: Arc<Mutex<BTreeMap<String, Inbox>>>,
}

impl LocalTransport {
    pub fn new() -> LocalTransport {
        LocalTransport::default()
    }

    /// Makes `Endpoint::Local(name)` deliver into `deliver` the transfers made for
    /// `model_fingerprint`; replaces an earlier registration of the name.
    pub fn register(&self, name: &str, model_fingerprint: u64, deliver: mpsc::Sender<KvTransfer>) {
        self.inboxes
            .lock()
            .expect("inbox registry poisoned")
            .insert(
                name.to_string(),
                Inbox {
                    model_fingerprint,
                    deliver,
                },
            );
    }
}

impl KvTransport for LocalTransport {
    async fn send(
        &self,
        to: &Endpoint,
        transfer: KvTransfer,
    ) -> Result<TransferReceipt, TransportError> {
        let Endpoint::Local(name) = to else {
            return Err(TransportError::UnsupportedEndpoint {
                transport: "local",
                endpoint: to.clone(),
            });
        };
        let (model_fingerprint, deliver) = {
            let inboxes = self.inboxes.lock().expect("inbox registry poisoned");
            let inbox = inboxes
                .get(name)
                .ok_or_else(|| TransportError::UnknownEndpoint(to.clone()))?;
            (inbox.model_fingerprint, inbox.deliver.clone())
        };
        super::check_fingerprint(to, &transfer, model_fingerprint)?;
        let payload_bytes = transfer.kv.payload_bytes() as u64;
        let started = std::time::Instant::now();
        super::hand_over(to, &deliver, transfer, payload_bytes, started).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paged::KvExport;
    use models::DType;

    fn transfer(request_id: u64, model_fingerprint: u64) -> KvTransfer {
        KvTransfer {
            request_id,
            model_fingerprint,
            dtype: DType::F32,
            n_layers: 1,
            block_size_tokens: 4,
            kv: KvExport {
                tokens: vec![1, 2, 3],
                kv_len: 3,
                block_hashes: vec![],
                first_block: 0,
                blocks: vec![vec![7; 32]],
                device: None,
            },
        }
    }

    #[tokio::test]
    async fn delivers_to_the_named_inbox_and_refuses_the_rest() {
        let transport = LocalTransport::new();
        let (tx, mut rx) = mpsc::channel(4);
        transport.register("decode-0", 11, tx);
        let to = Endpoint::Local("decode-0".into());

        let receipt = transport.send(&to, transfer(1, 11)).await.unwrap();
        assert_eq!(receipt.payload_bytes, 32);
        assert_eq!(rx.recv().await.unwrap(), transfer(1, 11));

        assert!(matches!(
            transport.send(&to, transfer(2, 12)).await,
            Err(TransportError::FingerprintMismatch {
                sent: 12,
                receiver: 11,
                ..
            })
        ));
        assert!(matches!(
            transport
                .send(&Endpoint::Local("nobody".into()), transfer(3, 11))
                .await,
            Err(TransportError::UnknownEndpoint(_))
        ));
        drop(rx);
        assert!(matches!(
            transport.send(&to, transfer(4, 11)).await,
            Err(TransportError::Refused { .. })
        ));
    }
}
