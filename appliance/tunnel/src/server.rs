//! The standard UAPI socket of the interface, served by kakehashid so that
//! `wg show` reads corrected state (see [`crate::uapi`]). `set` is refused.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::{uapi, Tunnel, UAPI_DIR};

/// The socket path `wg` uses for `interface`.
pub fn uapi_path(interface: &str) -> PathBuf {
    Path::new(UAPI_DIR).join(format!("{interface}.sock"))
}

fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves `wg show` until cancelled; a socket that cannot be created is
/// logged (the tunnel works without it).
pub async fn serve_uapi(tunnel: Arc<Tunnel>, token: CancellationToken) {
    let path = uapi_path(tunnel.interface());
    let listener = match bind(&path) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(
                "cannot create the WireGuard control socket {}: {e}; `wg show {}` will not work on this box",
                path.display(),
                tunnel.interface()
            );
            return;
        }
    };
    loop {
        let conn = tokio::select! {
            _ = token.cancelled() => break,
            c = listener.accept() => c,
        };
        match conn {
            Ok((stream, _)) => {
                let tunnel = Arc::clone(&tunnel);
                tokio::spawn(async move {
                    if let Err(e) = answer(tunnel, stream).await {
                        tracing::debug!("wg control connection: {e}");
                    }
                });
            }
            Err(e) => tracing::warn!("wg control socket accept: {e}"),
        }
    }
    let _ = std::fs::remove_file(&path);
}

async fn answer(tunnel: Arc<Tunnel>, stream: UnixStream) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read);
    let mut command = String::new();
    lines.read_line(&mut command).await?;
    // Both operations end with an empty line; read the rest of the request.
    loop {
        let mut line = String::new();
        if lines.read_line(&mut line).await? == 0 || line == "\n" {
            break;
        }
    }
    let reply = match command.trim_end() {
        "get=1" => {
            let t = Arc::clone(&tunnel);
            match tokio::task::spawn_blocking(move || t.dump()).await {
                Ok(Ok(dump)) => uapi::format_get(&dump, &tunnel.key.to_hex(), SystemTime::now()),
                Ok(Err(e)) => {
                    tracing::warn!("wg show: {e}");
                    zeroize::Zeroizing::new("errno=5\n\n".to_string())
                }
                Err(e) => {
                    tracing::warn!("wg show: {e}");
                    zeroize::Zeroizing::new("errno=5\n\n".to_string())
                }
            }
        }
        "set=1" => {
            tracing::warn!(
                interface = tunnel.interface(),
                "refused a `wg set` on the tunnel: its settings come from the [tunnel] section of kakehashi.toml"
            );
            zeroize::Zeroizing::new("errno=1\n\n".to_string())
        }
        _ => zeroize::Zeroizing::new("errno=22\n\n".to_string()),
    };
    write.write_all(reply.as_bytes()).await?;
    write.shutdown().await
}
