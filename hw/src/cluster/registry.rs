//! Which workers are in the cluster and where they listen. Embedded in the frontend's process
//! by default, behind the [`Registry`] trait so that an external store (etcd, with leased keys)
//! can take its place when a cluster spans machines.

use super::protocol::{Registered, WorkerInfo};
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// The cluster's membership.
pub trait Registry: Send + Sync + 'static {
    /// Adds a worker, or replaces the entry of the same name; returns its cluster index,
    /// stable per name.
    fn register(&self, info: WorkerInfo) -> u32;
    /// Removes worker `id` if it still listens at `addr` (a worker that re-registered
    /// elsewhere is not removed for its old address's failure).
    fn deregister(&self, id: u32, addr: SocketAddr);
    /// The registered workers, by index.
    fn workers(&self) -> BTreeMap<u32, WorkerInfo>;
    /// Changes whenever the membership does.
    fn watch(&self) -> watch::Receiver<u64>;
}

/// A registry in the frontend's memory. Workers named in the cluster file keep their index
/// in it; others get the next free ones.
pub struct EmbeddedRegistry {
    names: Mutex<Vec<String>>,
    workers: Mutex<BTreeMap<u32, WorkerInfo>>,
    changes: watch::Sender<u64>,
}

impl EmbeddedRegistry {
    pub fn new(known_names: Vec<String>) -> EmbeddedRegistry {
        EmbeddedRegistry {
            names: Mutex::new(known_names),
            workers: Mutex::default(),
            changes: watch::Sender::new(0),
        }
    }

    fn changed(&self) {
        self.changes.send_modify(|generation| *generation += 1);
    }
}

impl Registry for EmbeddedRegistry {
    fn register(&self, info: WorkerInfo) -> u32 {
        let id = {
            let mut names = self.names.lock().expect("registry lock");
            match names.iter().position(|n| *n == info.name) {
                Some(i) => i as u32,
                None => {
                    names.push(info.name.clone());
                    names.len() as u32 - 1
                }
            }
        };
        self.workers.lock().expect("registry lock").insert(id, info);
        self.changed();
        id
    }

    fn deregister(&self, id: u32, addr: SocketAddr) {
        let removed = {
            let mut workers = self.workers.lock().expect("registry lock");
            if workers.get(&id).is_some_and(|w| w.addr == addr) {
                workers.remove(&id);
                true
            } else {
                false
            }
        };
        if removed {
            self.changed();
        }
    }

    fn workers(&self) -> BTreeMap<u32, WorkerInfo> {
        self.workers.lock().expect("registry lock").clone()
    }

    fn watch(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

/// The registry's HTTP API: `POST /register` (a [`WorkerInfo`]) and `GET /workers`.
pub fn registry_api(registry: Arc<dyn Registry>) -> Router {
    Router::new()
        .route("/register", post(register))
        .route("/workers", get(workers))
        .with_state(registry)
}

async fn register(State(registry): State<Arc<dyn Registry>>, body: Bytes) -> Response {
    match serde_json::from_slice::<WorkerInfo>(&body) {
        Ok(info) => {
            let worker = registry.register(info);
            axum::Json(Registered { worker }).into_response()
        }
        Err(e) => (StatusCode::BAD_REQUEST, format!("bad registration: {e}")).into_response(),
    }
}

async fn workers(State(registry): State<Arc<dyn Registry>>) -> Response {
    let list: Vec<(u32, WorkerInfo)> = registry.workers().into_iter().collect();
    axum::Json(list).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use sim::routing::Role;

    fn info(name: &str, port: u16) -> WorkerInfo {
        WorkerInfo {
            name: name.into(),
            role: Role::Decode,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            kv_addr: None,
        }
    }

    #[test]
    fn known_names_keep_their_index_and_strangers_get_the_next() {
        let r = EmbeddedRegistry::new(vec!["a".into(), "b".into()]);
        let mut watch = r.watch();
        assert_eq!(r.register(info("b", 1)), 1);
        assert_eq!(r.register(info("x", 2)), 2);
        assert_eq!(r.register(info("a", 3)), 0);
        assert!(watch.has_changed().unwrap());
        watch.mark_unchanged();
        // Re-registering moves the worker; the old address's failure does not remove it.
        assert_eq!(r.register(info("b", 4)), 1);
        r.deregister(1, SocketAddr::from(([127, 0, 0, 1], 1)));
        assert!(r.workers().contains_key(&1));
        r.deregister(1, SocketAddr::from(([127, 0, 0, 1], 4)));
        assert_eq!(r.workers().keys().copied().collect::<Vec<_>>(), vec![0, 2]);
        assert!(watch.has_changed().unwrap());
    }
}
