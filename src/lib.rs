//! Tollgate: a sidecar reverse proxy that meters AI API traffic per tenant.
//!
//! Module map:
//! - [`config`]: the TOML file -> validated, typed [`config::Policy`] (swapped whole on reload)
//! - [`proxy`]: the proxy listener and the request phases, header hygiene, provider-shaped errors
//! - [`meter`]: request inspection, the `MeteredBody`, usage extraction (JSON, SSE), estimation, pricing
//! - [`event`]: the v1 usage event (CloudEvents envelope)
//! - [`spool`]: the durable append-only event log with a cursor per sink
//! - [`sinks`]: one `Sink` trait and the loop that feeds each sink from the spool
//! - [`admin`]: health, readiness, metrics
//! - [`metrics`]: every metric, in one place
//! - [`mock`]: the fake OpenAI + Anthropic upstream behind `tollgate mock`
//! - [`server`]: the shared accept loop (HTTP/1.1 + h2c, graceful shutdown)
//!
//! How a request flows: the proxy listener hands it to [`proxy::handle`], which
//! routes it by path prefix, authenticates the tenant, reads and inspects the
//! body, admits it, and forwards it upstream with the client's credential
//! replaced by the upstream key. The response body is wrapped in a
//! [`meter::MeteredBody`] that passes each frame on untouched while a bounded
//! parser extracts usage. When the body ends (or breaks, or the client leaves)
//! the [`meter::Call`] prices the usage and appends exactly one event to the
//! [`spool::Spool`], before the last byte reaches the client. Sinks read the
//! spool on their own tasks and commit their cursors after delivery.

#![forbid(unsafe_code)]

pub mod admin;
pub mod config;
pub mod demo;
pub mod event;
pub mod limits;
pub mod meter;
pub mod metrics;
pub mod mock;
pub mod proxy;
pub mod report;
pub mod server;
pub mod sinks;
pub mod spool;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// A map looked up on every call by keys from the config (tenants, models,
/// key digests): foldhash, seeded per process, instead of SipHash (about a
/// fifth of the instructions a lookup). Maps whose keys clients choose
/// (outcome idempotency keys) keep the standard hasher.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

use config::Policy;
use metrics::Metrics;
use spool::Spool;

/// State shared by every request and task.
pub struct App {
    pub policy: ArcSwap<Policy>,
    pub spool: Arc<Spool>,
    pub metrics: Arc<Metrics>,
    pub clients: proxy::client::Clients,
    pub limits: limits::Limits,
    pub draining: AtomicBool,
    /// Calls whose event is not yet in the spool.
    pub inflight: Inflight,
    /// The main runtime: calls cut on a worker finish here, so their events
    /// are written even while that worker shuts down.
    pub rt: tokio::runtime::Handle,
}

/// Calls whose event is not yet in the spool: a counter the drain waits on.
/// Counting costs two atomic operations a call; waking happens only once
/// somebody waits.
#[derive(Default)]
pub struct Inflight {
    n: std::sync::atomic::AtomicUsize,
    watching: AtomicBool,
    zero: tokio::sync::Notify,
}

impl Inflight {
    pub fn enter(&self) {
        self.n.fetch_add(1, Ordering::SeqCst);
    }

    pub fn exit(&self) {
        if self.n.fetch_sub(1, Ordering::SeqCst) == 1 && self.watching.load(Ordering::SeqCst) {
            self.zero.notify_waiters();
        }
    }

    /// Calls in flight now.
    pub fn count(&self) -> usize {
        self.n.load(Ordering::SeqCst)
    }

    /// Resolves once no call is in flight.
    pub async fn zero(&self) {
        self.watching.store(true, Ordering::SeqCst);
        loop {
            let notified = self.zero.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.n.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl App {
    /// Reloads the config file: validates it and swaps the whole policy
    /// atomically. In-flight calls finish on the policy they started with;
    /// spend and counters live outside the policy and are kept. A bad file
    /// keeps the old policy. Listen addresses, `data_dir`, `[spool]` and
    /// `[[sinks]]` are bound at start: a change to them is logged as needing
    /// a restart and keeps running with the old values.
    pub fn reload(
        &self,
        source: Result<config::Source, config::ConfigError>,
    ) -> Result<(), config::ConfigError> {
        let m = &self.metrics;
        let file = source.as_ref().map(|s| s.file.clone()).unwrap_or_default();
        let mut new = match source.and_then(|s| s.parse()) {
            Ok(p) => p,
            Err(e) => {
                m.config_reloads
                    .get_or_create(&metrics::ResultLabels { result: "error" })
                    .inc();
                m.config_last_reload_ok.set(0);
                tracing::error!(error = %e, "config reload rejected; the running config stays");
                return Err(e);
            }
        };
        let old = self.policy.load();
        let s = (&old.server, &new.server);
        let mut restart = Vec::new();
        if s.0.listen != s.1.listen || s.0.admin_listen != s.1.admin_listen {
            restart.push("server.listen / server.admin_listen");
        }
        if s.0.shutdown_grace != s.1.shutdown_grace {
            restart.push("server.shutdown_grace");
        }
        if s.0.max_connections != s.1.max_connections {
            restart.push("server.max_connections");
        }
        if s.0.header_read_timeout != s.1.header_read_timeout {
            restart.push("server.header_read_timeout");
        }
        if s.0.write_timeout != s.1.write_timeout {
            restart.push("server.write_timeout");
        }
        if s.0.data_dir != s.1.data_dir {
            restart.push("server.data_dir");
        }
        if old.spool != new.spool {
            restart.push("[spool]");
        }
        if old.sinks != new.sinks {
            restart.push("[[sinks]]");
        }
        if !restart.is_empty() {
            tracing::warn!(changed = ?restart, "these settings change only on restart; running with the old values");
            // The policy says what runs: the stored one keeps the running
            // values, so every later reload compares against them and warns
            // again while the file still differs.
            new.server.listen = old.server.listen;
            new.server.admin_listen = old.server.admin_listen;
            new.server.shutdown_grace = old.server.shutdown_grace;
            new.server.max_connections = old.server.max_connections;
            new.server.header_read_timeout = old.server.header_read_timeout;
            new.server.write_timeout = old.server.write_timeout;
            new.server.data_dir = old.server.data_dir.clone();
            new.spool = old.spool.clone();
            new.sinks = old.sinks.clone();
        }
        m.config_restart_pending.set(i64::from(!restart.is_empty()));
        self.policy.store(Arc::new(new));
        m.config_reloads
            .get_or_create(&metrics::ResultLabels { result: "ok" })
            .inc();
        m.config_last_reload_ok.set(1);
        m.config_last_load.set(unix_seconds());
        tracing::info!(path = %file, "config reloaded");
        Ok(())
    }
}

/// The live ledger forgets what the snapshots forget (outcome keys after
/// `KEEP_KEYS_DAYS`, days after `KEEP_DAYS`): without this, every outcome
/// key stayed in memory until a restart. Hourly, one pass under the budget
/// lock.
async fn prune_live_ledger(app: Arc<App>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(3600));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = server::stopped(&mut stop) => return,
        }
        let now = time::OffsetDateTime::now_utc();
        app.limits.budgets.with(|l| l.prune(now));
    }
}

fn unix_seconds() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Watches `path` for changes (by content, so a ConfigMap's symlink swap
/// counts) and reloads; also reloads on SIGHUP. `loaded` is the digest of the
/// text the running config was parsed from, so a change made after that read
/// and before this task first runs is still seen. Runs until the task is
/// dropped.
pub async fn watch_config(
    app: Arc<App>,
    path: std::path::PathBuf,
    loaded: [u8; 32],
    every: std::time::Duration,
) {
    let mut seen = Some(loaded);
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .expect("SIGHUP handler");
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        #[cfg(unix)]
        let forced = tokio::select! {
            _ = tick.tick() => false,
            _ = hup.recv() => true,
        };
        #[cfg(not(unix))]
        let forced = {
            tick.tick().await;
            false
        };
        let p = path.clone();
        let Ok(source) = tokio::task::spawn_blocking(move || config::read(&p)).await else {
            continue;
        };
        let now = source.as_ref().ok().map(|s| s.sha256);
        if forced || now != seen {
            seen = now;
            let app = app.clone();
            let _ = tokio::task::spawn_blocking(move || app.reload(source)).await;
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Spool(#[from] spool::SpoolError),
    #[error("{}: {source}", dir.display())]
    Data {
        dir: std::path::PathBuf,
        source: spool::SpoolError,
    },
}

impl RunError {
    /// An error opening the spool or the state under `dir`, naming it
    /// (a mount that is missing or read-only says where).
    fn at(dir: &std::path::Path, e: spool::SpoolError) -> RunError {
        match e {
            spool::SpoolError::InUse(_) => RunError::Spool(e),
            source => RunError::Data {
                dir: dir.to_path_buf(),
                source,
            },
        }
    }
}

/// A running instance: its addresses, and the handle to stop it.
pub struct Running {
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub app: Arc<App>,
    shutdown: watch::Sender<bool>,
    force: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Stops accepting, lets in-flight calls finish within the grace period,
    /// flushes the spool and gives sinks a last chance, then returns.
    pub async fn shutdown(self) {
        self.begin_shutdown();
        let _ = self.task.await;
    }

    /// Starts the drain: `/readyz` turns 503 at once, listeners close.
    pub fn begin_shutdown(&self) {
        self.app.draining.store(true, Ordering::Relaxed);
        let _ = self.shutdown.send(true);
    }

    /// Cuts what is still open now (a second signal); events still land.
    pub fn force(&self) {
        let _ = self.force.send(true);
    }

    /// Resolves when the drain begun by `begin_shutdown` has finished.
    pub async fn finished(&mut self) {
        let _ = (&mut self.task).await;
    }
}

/// Binds the listeners and starts the proxy, admin server and sinks.
pub async fn start(policy: Policy) -> Result<Running, RunError> {
    let listen = |addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| RunError::Listen { addr, source })
    };
    let proxy_listener = listen(policy.server.listen).await?;
    let admin_listener = listen(policy.server.admin_listen).await?;
    run(policy, proxy_listener, admin_listener).await
}

/// Runs on listeners the caller bound (tests bind port 0).
pub async fn run(
    policy: Policy,
    proxy_listener: TcpListener,
    admin_listener: TcpListener,
) -> Result<Running, RunError> {
    let proxy_addr = proxy_listener
        .local_addr()
        .map_err(|source| RunError::Listen {
            addr: policy.server.listen,
            source,
        })?;
    let admin_addr = admin_listener
        .local_addr()
        .map_err(|source| RunError::Listen {
            addr: policy.server.admin_listen,
            source,
        })?;
    let mut sink_names: Vec<String> = policy.sinks.iter().map(|s| s.name.clone()).collect();
    sink_names.push(limits::state::CURSOR.to_string());
    let spool_dir = policy.server.data_dir.join("spool");
    let spool = Spool::open(&spool_dir, policy.spool.clone(), &sink_names)
        .map_err(|e| RunError::at(&spool_dir, e))?;
    let (ledger, state_position) = limits::state::recover(&policy.server.data_dir, &spool)
        .await
        .map_err(|e| RunError::at(&policy.server.data_dir.join("state"), e))?;
    // The state keeper follows the spool from here, before anything is
    // appended.
    spool.follow(limits::state::CURSOR, limits::state::STALE_AFTER);
    let data_dir = policy.server.data_dir.clone();
    let grace = policy.server.shutdown_grace;
    let conn_limits = server::ConnLimits {
        max: policy.server.max_connections,
        header_read_timeout: policy.server.header_read_timeout,
        write_timeout: policy.server.write_timeout,
    };
    let sinks = policy.sinks.clone();
    let metrics = Arc::new(Metrics::with_events_lost(spool.stats.lost_events.clone()));
    let app = Arc::new(App {
        policy: ArcSwap::from_pointee(policy),
        spool: spool.clone(),
        metrics: metrics.clone(),
        clients: Default::default(),
        limits: limits::Limits::new(limits::budget::MemoryStore::with_ledger(ledger.clone())),
        draining: AtomicBool::new(false),
        inflight: Inflight::default(),
        rt: tokio::runtime::Handle::current(),
    });
    metrics.config_last_load.set(unix_seconds());
    metrics.config_last_reload_ok.set(1);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (force_tx, force_rx) = watch::channel(false);
    // The admin listener stays up through the drain (`/readyz` answers 503,
    // `/metrics` stays scrapeable) and closes last.
    let (admin_stop_tx, admin_stop_rx) = watch::channel(false);

    let mut sink_tasks = Vec::new();
    let (sink_stop_tx, sink_stop_rx) = watch::channel(false);
    for s in &sinks {
        sink_tasks.push(tokio::spawn(sinks::drive(
            s.name.clone(),
            s.batch,
            sinks::build(s, &data_dir, &app.clients),
            spool.clone(),
            metrics.clone(),
            sink_stop_rx.clone(),
        )));
    }

    sink_tasks.push(tokio::spawn(limits::state::keep(
        data_dir,
        spool.clone(),
        ledger,
        state_position,
        sink_stop_rx.clone(),
    )));
    tokio::spawn(prune_live_ledger(app.clone(), sink_stop_rx.clone()));

    let a = app.clone();
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let proxy = tokio::spawn(server::serve(
        proxy_listener,
        move |req| proxy::handle(a.clone(), req),
        server::Stop {
            shutdown: shutdown_rx.clone(),
            force: force_rx.clone(),
            grace,
        },
        workers,
        conn_limits,
    ));
    let a = app.clone();
    let admin = tokio::spawn(server::serve(
        admin_listener,
        move |req| admin::handle(a.clone(), req),
        server::Stop {
            shutdown: admin_stop_rx,
            force: force_rx,
            grace: Duration::from_secs(1),
        },
        0,
        // The admin listener takes every connection: a limit there would
        // let idle connections hang the health probes.
        server::ConnLimits {
            max: usize::MAX,
            ..conn_limits
        },
    ));
    let mut stop = shutdown_rx;
    let drained = app.clone();
    let task = tokio::spawn(async move {
        let _ = stop.wait_for(|s| *s).await;
        let started = tokio::time::Instant::now();
        let _ = proxy.await;
        // Calls cut at the end of the grace finish on their own tasks: wait
        // (briefly) until every one has its event in the spool.
        let settle = drained.inflight.zero();
        if tokio::time::timeout(std::time::Duration::from_secs(5), settle)
            .await
            .is_err()
        {
            // Whatever of theirs is not written when the spool closes below
            // is counted lost by the spool, if the task gets to try; the
            // process may end first, so the count is logged here.
            let calls = drained.inflight.count();
            tracing::error!(
                calls,
                "calls still unfinished at exit; their events may be lost"
            );
        }
        // In-flight calls have finished (or the grace ran out): their events
        // are in the spool. Sinks get what is left of the grace to deliver.
        let _ = sink_stop_tx.send(true);
        let left = grace.saturating_sub(started.elapsed());
        let all = futures_util::future::join_all(sink_tasks);
        if tokio::time::timeout(left, all).await.is_err() {
            tracing::warn!("sinks did not finish within the grace period; undelivered events stay in the spool");
        }
        spool.close().await;
        let _ = admin_stop_tx.send(true);
        let _ = admin.await;
    });
    Ok(Running {
        proxy_addr,
        admin_addr,
        app,
        shutdown: shutdown_tx,
        force: force_tx,
        task,
    })
}
