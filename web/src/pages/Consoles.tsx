// The instance page's terminals (exec shell, VM serial console) and the VM's graphical console;
// their libraries load when first opened.
import { useEffect, useRef, useState } from 'preact/hooks';
import { enc, errorMessage, wsUrl } from '../api';
import type { TermHandle, TermStatus } from '../lazy/terminal';
import type { VncHandle } from '../lazy/vnc';

declare global {
  interface HTMLElement {
    /** The terminal's text: set on a terminal's element for the end-to-end test. */
    gvText?: () => string;
  }
}

const STATUS: Record<TermStatus, string> = {
  connecting: 'Connecting…',
  open: 'Connected',
  exited: 'Ended',
  closed: 'Disconnected',
  error: 'Connection failed',
};

export function TerminalPanel(props: { id: string; kind: 'exec' | 'console'; title: string; intro: string }) {
  const { id, kind } = props;
  const [open, setOpen] = useState(false);
  const [status, setStatus] = useState<{ s: TermStatus; detail?: string } | null>(null);
  const [error, setError] = useState<string | null>(null);
  const box = useRef<HTMLDivElement>(null);
  const handle = useRef<TermHandle | null>(null);

  useEffect(() => {
    if (!open) return;
    let gone = false;
    import('../lazy/terminal')
      .then(({ openTerminal }) => {
        if (gone || !box.current) return;
        const el = box.current;
        const h = openTerminal(el, {
          label: kind === 'exec' ? 'Terminal input' : 'Serial console input',
          url: (size) =>
            kind === 'exec'
              ? wsUrl(
                  `/v1/instances/${enc(id)}/exec/ws?request=${enc(JSON.stringify({ command: ['/bin/sh'], tty: true, stdin: true, size }))}`,
                )
              : wsUrl(`/v1/instances/${enc(id)}/console/ws`),
          onStatus: (s, detail) => setStatus({ s, detail }),
        });
        handle.current = h;
        el.gvText = h.text;
        h.focus();
      })
      .catch((e) => setError(errorMessage(e)));
    return () => {
      gone = true;
      handle.current?.dispose();
      handle.current = null;
    };
  }, [open, id, kind]);

  const reconnect = () => {
    setOpen(false);
    setTimeout(() => setOpen(true), 0);
  };

  return (
    <section class="card" aria-labelledby={`${kind}-title`}>
      <div class="section-head">
        <h2 id={`${kind}-title`}>{props.title}</h2>
        <div class="buttons">
          {!open ? (
            <button type="button" onClick={() => setOpen(true)} data-testid={`${kind}-open`}>
              Open {props.title.toLowerCase()}
            </button>
          ) : (
            <>
              {status && (status.s === 'closed' || status.s === 'exited' || status.s === 'error') && (
                <button type="button" onClick={reconnect}>
                  Reconnect
                </button>
              )}
              <button type="button" class="secondary" onClick={() => setOpen(false)} data-testid={`${kind}-close`}>
                Close
              </button>
            </>
          )}
        </div>
      </div>
      {!open && <p class="muted">{props.intro}</p>}
      {error && <p class="error">{error}</p>}
      {open && (
        <>
          <p class="muted" role="status" data-testid={`${kind}-status`} data-state={status?.s ?? 'loading'}>
            {status ? STATUS[status.s] : 'Loading…'}
            {status?.detail ? `: ${status.detail}` : ''}
          </p>
          <div class="terminal" ref={box} data-testid={`${kind}-terminal`} />
        </>
      )}
    </section>
  );
}

export function VncPanel(props: { id: string }) {
  const [open, setOpen] = useState(false);
  const [status, setStatus] = useState<{ s: string; detail?: string } | null>(null);
  const box = useRef<HTMLDivElement>(null);

  useEffect(() => {
    if (!open) return;
    let gone = false;
    let h: VncHandle | null = null;
    import('../lazy/vnc')
      .then(({ openVnc }) => {
        if (gone || !box.current) return;
        h = openVnc(box.current, wsUrl(`/v1/instances/${enc(props.id)}/vnc/ws`), (s, detail) => setStatus({ s, detail }));
      })
      .catch((e) => setStatus({ s: 'error', detail: errorMessage(e) }));
    return () => {
      gone = true;
      h?.dispose();
    };
  }, [open, props.id]);

  return (
    <section class="card" aria-labelledby="vnc-title">
      <div class="section-head">
        <h2 id="vnc-title">Graphical console</h2>
        <div class="buttons">
          {!open ? (
            <button type="button" onClick={() => setOpen(true)} data-testid="vnc-open">
              Open graphical console
            </button>
          ) : (
            <button type="button" class="secondary" onClick={() => setOpen(false)} data-testid="vnc-close">
              Close
            </button>
          )}
        </div>
      </div>
      {!open && <p class="muted">The VM's screen over VNC, in the page.</p>}
      {open && (
        <>
          <p class="muted" role="status" data-testid="vnc-status" data-state={status?.s ?? 'loading'}>
            {status?.s ?? 'Loading…'}
            {status?.detail ? `: ${status.detail}` : ''}
          </p>
          <div class="vnc" ref={box} data-testid="vnc-screen" />
        </>
      )}
    </section>
  );
}
