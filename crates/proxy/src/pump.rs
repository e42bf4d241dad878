//! Bytes both ways between two streams until both ends close or nothing moves for a while:
//! WebSocket tunnels and TCP maps. Two 16 KiB buffers per connection, whatever the traffic.

use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const BUF: usize = 16 * 1024;

/// Copies `a` ⇄ `b`. A side's EOF shuts the other's write half and the other direction goes
/// on; `idle` without a byte either way ends it. Returns the bytes moved (a→b, b→a).
pub async fn pump<A, B>(a: A, b: B, idle: Duration) -> (u64, u64)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    let (mut ab_buf, mut ba_buf) = (vec![0u8; BUF], vec![0u8; BUF]);
    let (mut ab, mut ba) = (0u64, 0u64);
    let (mut a_open, mut b_open) = (true, true);
    while a_open || b_open {
        tokio::select! {
            r = ar.read(&mut ab_buf), if a_open => match r {
                Ok(0) | Err(_) => {
                    a_open = false;
                    let _ = bw.shutdown().await;
                }
                Ok(n) => {
                    if bw.write_all(&ab_buf[..n]).await.is_err() {
                        break;
                    }
                    ab += n as u64;
                }
            },
            r = br.read(&mut ba_buf), if b_open => match r {
                Ok(0) | Err(_) => {
                    b_open = false;
                    let _ = aw.shutdown().await;
                }
                Ok(n) => {
                    if aw.write_all(&ba_buf[..n]).await.is_err() {
                        break;
                    }
                    ba += n as u64;
                }
            },
            _ = tokio::time::sleep(idle) => break,
        }
    }
    (ab, ba)
}
