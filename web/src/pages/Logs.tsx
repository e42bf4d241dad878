import { useEffect, useRef, useState } from 'preact/hooks';
import { enc, errorMessage, get } from '../api';
import type { Logs as LogsT } from '../types';
import { ErrorText } from '../ui';

/** What the page keeps of a log: its end. */
const KEEP = 256 * 1024;
// Terminal control sequences in a VM's serial output (colours, cursor moves) and bare CRs.
// eslint-disable-next-line no-control-regex
const CONTROL = /\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\x1b[=>78]|\r(?!\n)/g;

export function Logs(props: { id: string }) {
  const [text, setText] = useState('');
  const [follow, setFollow] = useState(true);
  const [error, setError] = useState<string | null>(null);
  const next = useRef(0);
  const pre = useRef<HTMLPreElement>(null);
  const buf = useRef('');

  useEffect(() => {
    let stop = false;
    let timer: number | undefined;
    const tick = async () => {
      try {
        const l = await get<LogsT>(`/v1/instances/${enc(props.id)}/logs?offset=${next.current}`);
        if (stop) return;
        if (l.data) {
          const gap = next.current > 0 && l.offset > next.current ? `\n[… ${l.offset - next.current} bytes rotated away …]\n` : '';
          buf.current = (buf.current + gap + l.data.replace(CONTROL, '')).slice(-KEEP);
          setText(buf.current);
        }
        next.current = l.next;
        setError(null);
      } catch (e) {
        if (!stop) setError(errorMessage(e));
      }
      if (!stop && follow) timer = window.setTimeout(tick, 1000);
    };
    tick();
    return () => {
      stop = true;
      if (timer !== undefined) clearTimeout(timer);
    };
  }, [props.id, follow]);

  useEffect(() => {
    if (follow && pre.current) pre.current.scrollTop = pre.current.scrollHeight;
  }, [text, follow]);

  return (
    <section class="card" aria-labelledby="logs-title">
      <div class="section-head">
        <h2 id="logs-title">Logs</h2>
        <div class="field check inline">
          <input id="logs-follow" type="checkbox" checked={follow} onChange={(e) => setFollow((e.target as HTMLInputElement).checked)} data-testid="logs-follow" />
          <label for="logs-follow">Follow</label>
        </div>
      </div>
      <ErrorText error={error} testid="logs-error" />
      <pre class="logs" ref={pre} tabIndex={0} aria-label="Log output" data-testid="logs">
        {text || 'No output yet.'}
      </pre>
    </section>
  );
}
