// The live end of an instance's graphs: its metrics WebSocket (`/v1/instances/{id}/metrics/ws`),
// one MetricsUpdate a sample, opened again after an unexpected close. Loaded with the charts.
import { wsUrl } from '../api';
import type { MetricsUpdate } from '../types';

export type StreamState = 'connecting' | 'open' | 'closed';

export interface MetricsStream {
  close(): void;
}

const FIRST_RETRY_MS = 2000;
const MAX_RETRY_MS = 10000;

export function openMetricsStream(opts: {
  /** The path and query of the WebSocket, given where it starts (`since`). */
  path: (since: string) => string;
  /** Where a (re)connection starts: the newest point held (Unix ms), or a duration. */
  since: () => string;
  onUpdate: (u: MetricsUpdate) => void;
  /** `retrying`: closed unexpectedly and not open again yet (opened again after a pause). */
  onState: (s: StreamState, retrying?: boolean) => void;
  /** The stream ended for good: the reason of a policy close (1008: the login or key that
   * opened it ended), null on a normal one (1000: the instance was terminated). */
  onEnd: (error: string | null) => void;
}): MetricsStream {
  let ws: WebSocket | null = null;
  let stopped = false;
  let timer: number | undefined;
  let delay = FIRST_RETRY_MS;
  let failing = false;

  const connect = () => {
    timer = undefined;
    if (stopped) return;
    opts.onState('connecting', failing);
    let sock: WebSocket;
    try {
      sock = new WebSocket(wsUrl(opts.path(opts.since())));
    } catch {
      retry();
      return;
    }
    ws = sock;
    sock.onopen = () => {
      if (ws !== sock) return;
      failing = false;
      opts.onState('open');
    };
    sock.onmessage = (ev) => {
      if (ws !== sock || typeof ev.data !== 'string') return;
      let u: MetricsUpdate;
      try {
        u = JSON.parse(ev.data);
      } catch {
        return;
      }
      if (!u || !Array.isArray(u.histories)) return;
      delay = FIRST_RETRY_MS;
      opts.onUpdate(u);
    };
    // A failed connection (an HTTP error before the upgrade, a reset) closes with 1006 after
    // its error event: all is decided here.
    sock.onclose = (ev) => {
      if (ws !== sock) return;
      ws = null;
      if (stopped) return;
      if (ev.code === 1000 || ev.code === 1008) {
        stopped = true;
        opts.onState('closed');
        opts.onEnd(ev.code === 1008 ? ev.reason || 'the metrics stream was closed: the login that opened it ended' : null);
        return;
      }
      retry();
    };
  };

  const retry = () => {
    failing = true;
    opts.onState('closed', true);
    timer = window.setTimeout(connect, delay);
    delay = Math.min(delay * 2, MAX_RETRY_MS);
  };

  connect();
  return {
    close() {
      stopped = true;
      if (timer !== undefined) clearTimeout(timer);
      const s = ws;
      ws = null;
      if (!s) return;
      // Closing one still connecting makes the browser log an error: close it once open.
      if (s.readyState === WebSocket.CONNECTING) s.onopen = () => s.close(1000);
      else if (s.readyState === WebSocket.OPEN) s.close(1000);
    },
  };
}
