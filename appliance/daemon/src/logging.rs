//! journald under systemd (it sets JOURNAL_STREAM), readable text otherwise.

use kakehashi_config::{LogConfig, LogFormat};
use tracing_subscriber::{fmt, prelude::*, EnvFilter};

pub fn init(cfg: &LogConfig) {
    // RUST_LOG, when set, overrides log.level (for a field engineer's debugging).
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&cfg.level));
    let format = match cfg.format {
        LogFormat::Auto if std::env::var_os("JOURNAL_STREAM").is_some() => LogFormat::Journald,
        LogFormat::Auto => LogFormat::Text,
        other => other,
    };
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Journald => match tracing_journald::layer() {
            Ok(layer) => registry
                .with(layer.with_syslog_identifier("kakehashid".into()))
                .init(),
            Err(e) => {
                registry
                    .with(fmt::layer().with_writer(std::io::stderr))
                    .init();
                tracing::warn!("journald is not reachable ({e}); logging to stderr");
            }
        },
        LogFormat::Json => registry
            .with(fmt::layer().json().with_writer(std::io::stderr))
            .init(),
        LogFormat::Text | LogFormat::Auto => registry
            .with(fmt::layer().with_writer(std::io::stderr))
            .init(),
    }
}
