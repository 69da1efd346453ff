//! The shutdown signal: resolves on the first SIGTERM or SIGINT.
//!
//! The handlers are installed when [`signal`] is called, not when its future
//! is first polled: `main` calls it before binding any port, so a SIGTERM
//! that arrives while the server is still starting (a rollout that changes
//! its mind) is a graceful shutdown, never the default action that kills
//! the process.

/// Installs the SIGTERM and SIGINT handlers now; the future resolves on the
/// first of them.
pub fn signal() -> impl Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let terminate = signal(SignalKind::terminate());
        let interrupt = signal(SignalKind::interrupt());
        async move {
            let (mut terminate, mut interrupt) = match (terminate, interrupt) {
                (Ok(terminate), Ok(interrupt)) => (terminate, interrupt),
                (Err(error), _) | (_, Err(error)) => {
                    tracing::error!(%error, "cannot listen for SIGTERM/SIGINT");
                    return std::future::pending().await;
                }
            };
            tokio::select! {
                _ = terminate.recv() => tracing::info!("SIGTERM received; shutting down"),
                _ = interrupt.recv() => tracing::info!("SIGINT received; shutting down"),
            }
        }
    }
    #[cfg(not(unix))]
    async {
        if tokio::signal::ctrl_c().await.is_ok() {
            tracing::info!("Ctrl-C received; shutting down");
        }
    }
}
