// An interactive terminal (xterm.js) over the daemon's exec/console WebSocket.
//
// CSP: xterm's default DOM renderer writes <style> elements and style="" attributes, which
// `style-src 'self'` refuses. The canvas renderer addon, loaded before `open()`, replaces it
// before the DOM renderer is ever made: the terminal then draws on canvases and sets styles
// only through CSSOM (element.style), which the CSP allows. xterm.css is a static file.
import { Terminal } from '@xterm/xterm';
import { CanvasAddon } from '@xterm/addon-canvas';
import { FitAddon } from '@xterm/addon-fit';
import '@xterm/xterm/css/xterm.css';

export type TermStatus = 'connecting' | 'open' | 'exited' | 'closed' | 'error';

export interface TermHandle {
  dispose(): void;
  focus(): void;
  /** The terminal's text (scrollback and screen), for people and tests. */
  text(): string;
}

const STDIN = 0;
const STDOUT = 1;
const STDERR = 2;

export function openTerminal(
  el: HTMLElement,
  opts: {
    /** The WebSocket URL, given the terminal's size once it is fitted. */
    url: (size: { rows: number; cols: number }) => string;
    label: string;
    onStatus: (s: TermStatus, detail?: string) => void;
  },
): TermHandle {
  const term = new Terminal({
    cursorBlink: true,
    convertEol: false,
    fontFamily: 'ui-monospace, SFMono-Regular, Menlo, Consolas, "DejaVu Sans Mono", monospace',
    fontSize: 14,
    scrollback: 5000,
    theme: { background: '#101418', foreground: '#e6e6e6' },
  });
  // Keyboard users leave the terminal with Escape then Tab (or Shift+Tab): a lone Tab is the
  // shell's (completion), so the terminal would otherwise trap the focus.
  let escAt = 0;
  term.attachCustomKeyEventHandler((e) => {
    if (e.type !== 'keydown') return true;
    if (e.key === 'Escape') {
      escAt = e.timeStamp;
      return true;
    }
    if (e.key === 'Tab' && e.timeStamp - escAt < 2000) {
      escAt = 0;
      return false;
    }
    escAt = 0;
    return true;
  });
  const fit = new FitAddon();
  term.loadAddon(fit);
  // Before open(): the canvas renderer is set up on the terminal's open, and the DOM renderer
  // (inline styles) is never made.
  term.loadAddon(new CanvasAddon());
  term.open(el);
  term.textarea?.setAttribute('aria-label', opts.label);
  try {
    fit.fit();
  } catch {
    /* not laid out yet */
  }

  const encoder = new TextEncoder();
  let ws: WebSocket | null = null;
  let closed = false;
  const sendControl = (c: object) => {
    if (ws?.readyState === WebSocket.OPEN) ws.send(JSON.stringify(c));
  };
  const connect = () => {
    opts.onStatus('connecting');
    ws = new WebSocket(opts.url({ rows: term.rows, cols: term.cols }));
    ws.binaryType = 'arraybuffer';
    ws.onopen = () => {
      opts.onStatus('open');
      sendControl({ type: 'resize', rows: term.rows, cols: term.cols });
    };
    ws.onmessage = (ev) => {
      if (typeof ev.data === 'string') {
        let c: { type?: string; exit_code?: number; message?: string };
        try {
          c = JSON.parse(ev.data);
        } catch {
          return;
        }
        if (c.type === 'exit') {
          const detail = `exit code ${c.exit_code}${c.message ? `: ${c.message}` : ''}`;
          term.write(`\r\n\x1b[2m[${detail}]\x1b[0m\r\n`);
          opts.onStatus('exited', detail);
          closed = true;
        }
        return;
      }
      const b = new Uint8Array(ev.data as ArrayBuffer);
      if (b.length < 1) return;
      if (b[0] === STDOUT || b[0] === STDERR) term.write(b.subarray(1));
    };
    ws.onerror = () => {
      if (!closed) opts.onStatus('error', 'the connection failed');
    };
    ws.onclose = (ev) => {
      if (!closed) opts.onStatus('closed', ev.reason || `closed (${ev.code})`);
      closed = true;
    };
  };

  const input = term.onData((d) => {
    if (ws?.readyState !== WebSocket.OPEN) return;
    const bytes = encoder.encode(d);
    const msg = new Uint8Array(bytes.length + 1);
    msg[0] = STDIN;
    msg.set(bytes, 1);
    ws.send(msg);
  });
  // xterm sends binary input (some mouse reports) through onBinary, one char per byte.
  const binary = term.onBinary((d) => {
    if (ws?.readyState !== WebSocket.OPEN) return;
    const msg = new Uint8Array(d.length + 1);
    msg[0] = STDIN;
    for (let i = 0; i < d.length; i++) msg[i + 1] = d.charCodeAt(i) & 0xff;
    ws.send(msg);
  });
  const resized = term.onResize(({ rows, cols }) => sendControl({ type: 'resize', rows, cols }));
  const ro = new ResizeObserver(() => {
    try {
      fit.fit();
    } catch {
      /* hidden */
    }
  });
  ro.observe(el);
  connect();

  return {
    dispose() {
      closed = true;
      ro.disconnect();
      input.dispose();
      binary.dispose();
      resized.dispose();
      if (ws && ws.readyState <= WebSocket.OPEN) ws.close(1000);
      term.dispose();
    },
    focus() {
      term.focus();
    },
    text() {
      const buf = term.buffer.active;
      const lines: string[] = [];
      for (let i = 0; i < buf.length; i++) lines.push(buf.getLine(i)?.translateToString(true) ?? '');
      return lines.join('\n');
    },
  };
}
