//! Starting a cluster: the frontend process (the embedded registry, the router and the HTTP
//! API) and, for `disagg-hw serve`, every worker of the cluster file as a child process.

use super::backend::{ClusterBackend, ClusterOptions};
use super::config::{Cluster, WorkerConfig};
use super::registry::{EmbeddedRegistry, Registry, registry_api};
use crate::frontend::{Metrics, ServerConfig, serve_listener};
use sim::routing::Role;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};

/// How long `serve` waits for every worker to load its model and join.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(600);

/// What the frontend process starts with.
pub struct FrontendOptions {
    /// Overrides `frontend.addr`.
    pub addr: Option<SocketAddr>,
    /// Start every worker of the file as a child process (`serve`), or wait for workers
    /// started elsewhere (`frontend`).
    pub spawn_workers: bool,
    /// The cluster file the children read; None: they use the compiled-in default too.
    pub config_path: Option<PathBuf>,
}

/// Runs the frontend until SIGINT or SIGTERM. With `spawn_workers`, prints
/// `ready http://ADDR` on stdout once every worker has joined (children die with it).
pub async fn run_frontend(cluster: &Cluster, options: FrontendOptions) -> Result<(), String> {
    if options.spawn_workers {
        // A worker this build cannot run fails here, before anything starts.
        for i in 0..cluster.config.workers.len() {
            cluster.check_device(i).map_err(|e| e.to_string())?;
        }
    }
    let fc = &cluster.config.frontend;
    let registry_listener = TcpListener::bind(fc.registry_addr)
        .await
        .map_err(|e| format!("frontend.registry_addr {}: {e}", fc.registry_addr))?;
    let registry_addr = registry_listener.local_addr().map_err(|e| e.to_string())?;
    let names = cluster
        .config
        .workers
        .iter()
        .map(|w| w.name.clone())
        .collect();
    let registry: Arc<dyn Registry> = Arc::new(EmbeddedRegistry::new(names));
    let api = registry_api(Arc::clone(&registry));
    tokio::spawn(async move { axum::serve(crate::no_delay(registry_listener), api).await });

    let (spec, tokenizer) = super::model::spec_and_tokenizer(cluster)?;
    let block_size_tokens = models::runtime::DEFAULT_BLOCK_SIZE_TOKENS as u32;
    // Every generating worker must be able to hold a whole request.
    let context_tokens = cluster
        .config
        .workers
        .iter()
        .filter(|w| w.role != Role::Prefill)
        .map(|w| w.kv_blocks as usize * block_size_tokens as usize)
        .chain(std::iter::once(spec.max_position_embeddings as usize))
        .min()
        .expect("the position limit is always there");
    let metrics = Arc::new(Metrics::new());
    let backend = Arc::new(ClusterBackend::new(
        ClusterOptions {
            model_id: cluster.config.model.id.clone(),
            tokenizer,
            context_tokens,
            block_size_tokens,
            policy: cluster.config.router.clone(),
            seed: cluster.config.seed,
            max_attempts: fc.max_attempts,
        },
        Arc::clone(&registry),
        Arc::clone(&metrics),
    ));
    let addr = options.addr.unwrap_or(fc.addr);
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| format!("frontend.addr {addr}: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    eprintln!("registry http://{registry_addr}; frontend http://{addr}");

    let mut children = Vec::new();
    if options.spawn_workers {
        for w in &cluster.config.workers {
            let child = spawn_worker(&options, w, registry_addr)?;
            eprintln!(
                "started worker {} ({}), pid {}",
                w.name,
                w.role.name(),
                child.id().unwrap_or(0)
            );
            children.push((w.name.clone(), child));
        }
        wait_until_joined(cluster, &backend, &mut children).await?;
        // Tests and scripts read this line to learn the address.
        println!("ready http://{addr}");
        for (name, child) in &children {
            println!("worker {name} pid {}", child.id().unwrap_or(0));
        }
        println!("registry http://{registry_addr}");
    }
    serve_listener(
        listener,
        backend,
        metrics,
        ServerConfig::default(),
        shutdown_signal(),
    )
    .await
    .map_err(|e| format!("frontend {addr}: {e}"))?;
    drop(children);
    Ok(())
}

fn spawn_worker(
    options: &FrontendOptions,
    worker: &WorkerConfig,
    registry: SocketAddr,
) -> Result<Child, String> {
    let name = &worker.name;
    let exe = std::env::current_exe().map_err(|e| format!("cannot find disagg-hw: {e}"))?;
    let mut command = Command::new(exe);
    command.arg(worker.role.name());
    if let Some(threads) = worker.threads {
        command.env("RAYON_NUM_THREADS", threads.to_string());
    }
    if let Some(path) = &options.config_path {
        command.arg("--config").arg(path);
    }
    command
        .args(["--name", name, "--registry", &registry.to_string()])
        .arg("--exit-with-parent")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
        .spawn()
        .map_err(|e| format!("starting worker {name}: {e}"))
}

/// Waits until every worker of the file streams its KV events to the router; fails if one
/// exits first.
async fn wait_until_joined(
    cluster: &Cluster,
    backend: &ClusterBackend,
    children: &mut [(String, Child)],
) -> Result<(), String> {
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        let live = backend.live_workers();
        if cluster
            .config
            .workers
            .iter()
            .all(|w| live.contains_key(&w.name))
        {
            return Ok(());
        }
        for (name, child) in children.iter_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("worker {name} exited during startup ({status})"));
            }
        }
        if Instant::now() > deadline {
            return Err(format!(
                "workers did not join within {} s",
                STARTUP_TIMEOUT.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Ends this process when its parent does (Linux), so that a `serve` killed by any means
/// leaves no workers behind.
pub fn exit_with_parent() {
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes plain integers and touches no memory of ours.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
        // The parent may have gone before the call: then we were handed to init.
        if libc::getppid() == 1 {
            std::process::exit(1);
        }
    }
}
