//! `dits serve`: a trained model behind HTTP. The checkpoint is loaded once; requests from all
//! clients wait in one bounded queue and are drawn in shared batches by one model thread
//! ([`batcher`]); the connections are served by hyper on tokio under axum's router
//! ([`routes`]), with a header-read timeout for slow clients, a bound on open connections, and a
//! graceful shutdown on SIGTERM or Ctrl-C that answers the requests already in flight.

pub mod batcher;
pub mod page;
pub mod query;
pub mod routes;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use burn::prelude::*;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::signal::unix::{SignalKind, signal};

use crate::sample::{WeightsKind, load_model};
use batcher::{Counters, Queue};
use query::Bounds;
use routes::ServerState;

/// A client must send its request's headers within this time (slow clients hold a connection
/// no longer).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub checkpoint: PathBuf,
    pub weights: WeightsKind,
    /// Model preset for weight files that carry no config (PyTorch `.pth`).
    pub preset: String,
    pub host: String,
    /// 0: any free port (printed).
    pub port: u16,
    /// Images in one request.
    pub max_images: usize,
    /// Steps of one request's chain.
    pub max_steps: usize,
    /// Images drawn together in one chain (requests of several clients share it).
    pub max_batch: usize,
    /// Images waiting at most; beyond it requests get a 503.
    pub queue: usize,
    /// A request's longest wait for its images before a 503.
    pub timeout: Duration,
    /// Open connections at most; further clients wait to be accepted.
    pub max_connections: usize,
    pub device: Device,
}

impl ServeOptions {
    /// `dits serve`'s defaults for `checkpoint` on port 8000 of the loopback address.
    pub fn new(checkpoint: PathBuf, device: Device) -> Self {
        Self {
            checkpoint,
            weights: WeightsKind::Ema,
            preset: crate::train::recipe::ModelOverrides::DEFAULT_PRESET.to_string(),
            host: "127.0.0.1".into(),
            port: 8000,
            max_images: 64,
            max_steps: 250,
            max_batch: 256,
            queue: 1024,
            timeout: Duration::from_secs(60),
            max_connections: 256,
            device,
        }
    }

    fn check(&self) -> anyhow::Result<()> {
        ensure!(self.max_images >= 1, "--max-images must be at least 1");
        ensure!(self.max_steps >= 1, "--max-steps must be at least 1");
        ensure!(
            self.max_batch >= self.max_images,
            "--max-batch ({}) must hold one request of --max-images ({})",
            self.max_batch,
            self.max_images
        );
        ensure!(
            self.queue >= self.max_images,
            "--queue ({}) must hold one request of --max-images ({})",
            self.queue,
            self.max_images
        );
        ensure!(self.timeout > Duration::ZERO, "--timeout must be more than 0 seconds");
        ensure!(self.max_connections >= 1, "--max-connections must be at least 1");
        Ok(())
    }
}

/// What a server did before it stopped.
#[derive(Debug, Clone, Copy)]
pub struct ServeSummary {
    pub counters: Counters,
    pub seconds: f64,
}

/// Serve until SIGTERM or SIGINT; `on_listening` is told the address once the port is open.
pub fn run(opts: ServeOptions, on_listening: impl FnOnce(SocketAddr)) -> anyhow::Result<ServeSummary> {
    opts.check()?;
    let started = Instant::now();
    let loaded = load_model(&opts.checkpoint, opts.weights, &opts.preset, &opts.device)?;
    let cfg = &loaded.config;
    let bounds = Bounds {
        class_names: loaded.class_names.clone(),
        guidable: cfg.null_class,
        timesteps: loaded.schedule.timesteps(),
        max_images: opts.max_images,
        max_steps: opts.max_steps,
    };
    let listener = std::net::TcpListener::bind((opts.host.as_str(), opts.port))
        .with_context(|| format!("cannot listen on {}:{}", opts.host, opts.port))?;
    listener.set_nonblocking(true).context("setting the socket non-blocking")?;
    let addr = listener.local_addr().context("reading the bound address")?;

    let queue = Arc::new(Queue::new(opts.queue));
    let state = Arc::new(ServerState {
        queue: queue.clone(),
        page: page::render(&loaded.description, &bounds),
        model: loaded.description.clone(),
        image: (cfg.channels, cfg.image_size),
        bounds,
        timeout: opts.timeout,
        started,
        shutting_down: false.into(),
    });
    let worker = batcher::spawn(queue.clone(), loaded, opts.device.clone(), opts.max_batch);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("dits-serve-io")
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let served = runtime.block_on(async {
        let listener = tokio::net::TcpListener::from_std(listener).context("registering the socket")?;
        // The handlers are in place before anyone is told the address.
        let mut terminate = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
        let mut interrupt = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
        let stop = async move {
            tokio::select! {
                _ = terminate.recv() => {},
                _ = interrupt.recv() => {},
            }
        };
        on_listening(addr);
        accept_until(listener, state.clone(), &opts, stop).await
    });
    // Connections that outlived the graceful wait are dropped with their tasks, so whatever they
    // still have queued has no client: the worker forgets it, finishes, and stops.
    runtime.shutdown_timeout(Duration::from_secs(1));
    queue.close();
    let _ = worker.join();
    served?;
    let (_, counters) = queue.snapshot();
    Ok(ServeSummary { counters, seconds: started.elapsed().as_secs_f64() })
}

/// Accept connections until `stop`, then stop accepting, let the connections finish the
/// requests they are in (idle ones close at once), and return.
async fn accept_until(
    listener: tokio::net::TcpListener,
    state: Arc<ServerState>,
    opts: &ServeOptions,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let mut stop = std::pin::pin!(stop);
    let connections = Arc::new(tokio::sync::Semaphore::new(opts.max_connections));
    let graceful = GracefulShutdown::new();
    let app = routes::router(state.clone());
    loop {
        let accepted = tokio::select! {
            _ = &mut stop => break,
            permit = connections.clone().acquire_owned() => match permit {
                Ok(permit) => tokio::select! {
                    _ = &mut stop => break,
                    accepted = listener.accept() => accepted.map(|(stream, _)| (stream, permit)),
                },
                Err(_) => break,
            },
        };
        let (stream, permit) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors, or a connection reset before it was accepted: the
                // server itself is fine; wait a moment rather than spin.
                tracing::warn!("accepting a connection: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let watched = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = watched.await {
                tracing::debug!("connection ended: {e}");
            }
            drop(permit);
        });
    }
    drop(listener);
    state.shutting_down.store(true, Ordering::Relaxed);
    let open = graceful.count();
    tracing::info!("shutting down: finishing the requests of {open} open connections");
    // The queue's timeout bounds how long any request can still take.
    let limit = opts.timeout + Duration::from_secs(5);
    if tokio::time::timeout(limit, graceful.shutdown()).await.is_err() {
        tracing::warn!("connections still open after {:.0} s; closing them", limit.as_secs_f64());
    }
    Ok(())
}
