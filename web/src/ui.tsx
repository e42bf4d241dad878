// Small shared pieces: polling, dialogs, status messages.
import type { ComponentChildren } from 'preact';
import { useEffect, useLayoutEffect, useRef, useState } from 'preact/hooks';

/** Runs `fn` now and then every `ms` (the next run starts after the previous one ended);
 * stops when the component unmounts or `deps` change. The first run starts as the component
 * is put in the page (a layout effect), not a frame later. */
export function usePoll(fn: (signal: AbortSignal) => Promise<void> | void, ms: number, deps: unknown[]) {
  const ref = useRef(fn);
  ref.current = fn;
  useLayoutEffect(() => {
    const ctl = new AbortController();
    let timer: number | undefined;
    const tick = async () => {
      try {
        await ref.current(ctl.signal);
      } catch {
        /* the callee shows its own errors */
      }
      if (!ctl.signal.aborted && ms > 0) timer = window.setTimeout(tick, ms);
    };
    tick();
    return () => {
      ctl.abort();
      if (timer !== undefined) clearTimeout(timer);
    };
  }, deps);
}

/** A modal dialog (the native <dialog>: focus is kept inside, Escape closes it). */
export function Dialog(props: { title: string; onClose: () => void; children: ComponentChildren; testid?: string }) {
  const ref = useRef<HTMLDialogElement>(null);
  useEffect(() => {
    const d = ref.current!;
    if (!d.open) d.showModal();
    const onCancel = (e: Event) => {
      e.preventDefault();
      props.onClose();
    };
    d.addEventListener('cancel', onCancel);
    return () => {
      d.removeEventListener('cancel', onCancel);
      if (d.open) d.close();
    };
  }, []);
  const titleId = `dlg-${props.testid ?? 'x'}-title`;
  return (
    <dialog ref={ref} class="dialog" aria-labelledby={titleId} data-testid={props.testid}>
      <h2 id={titleId}>{props.title}</h2>
      {props.children}
    </dialog>
  );
}

export function ErrorText(props: { error: string | null | undefined; testid?: string }) {
  if (!props.error) return null;
  return (
    <p class="error" role="alert" data-testid={props.testid ?? 'error'}>
      {props.error}
    </p>
  );
}

export function StateBadge(props: { state: string }) {
  return <span class={`badge state-${props.state}`}>{props.state}</span>;
}

/** A value that re-renders its component every `ms` (for ages and clocks). */
export function useNow(ms: number): number {
  const [now, setNow] = useState(Date.now());
  useEffect(() => {
    const t = setInterval(() => setNow(Date.now()), ms);
    return () => clearInterval(t);
  }, [ms]);
  return now;
}

export function Loading(props: { what?: string }) {
  return (
    <p class="muted" role="status">
      Loading{props.what ? ` ${props.what}` : ''}…
    </p>
  );
}
