import { memo } from 'preact/compat';
import { useLayoutEffect, useMemo, useRef, useState } from 'preact/hooks';
import { ApiError, enc, errorMessage, get, post, del } from '../api';
import { fmtAge, fmtBytes, fmtPercent, parseSize } from '../format';
import { href } from '../router';
import { canOperate } from '../session';
import type { GpuStats, Instance, Session } from '../types';
import { Dialog, ErrorText, Loading, StateBadge, usePoll } from '../ui';
import { CreateForm } from './CreateForm';

declare global {
  interface Window {
    /** When the instance table last rendered a new list: for the render-time test. */
    __gvInstancesRendered?: { rows: number; dataAt: number; renderedAt: number };
  }
}

/** What the list shows of a GPU-using instance: its GPUs' utilisation and VRAM. */
interface GpuView {
  gpus: string;
  util: string;
  vram: string;
}

export function gpuView(inst: Instance, stats: Map<string, GpuStats>): GpuView {
  if (!inst.gpus.length) return { gpus: '—', util: '—', vram: '—' };
  const whole = inst.gpus.every((g) => g.milli >= 1000);
  const model = inst.gpus[0].model;
  const gpus = whole ? `${inst.gpus.length}× ${model}` : `${(inst.gpus[0].milli / 1000).toFixed(3).replace(/0+$/, '')} × ${model}`;
  let utilSum = 0;
  let utilN = 0;
  let used = 0;
  let usedKnown = true;
  let reserved = 0;
  for (const g of inst.gpus) {
    reserved += g.vram;
    const s = stats.get(g.uuid);
    if (s?.util_percent != null) {
      utilSum += s.util_percent;
      utilN++;
    }
    if (s?.memory_used != null) used += s.memory_used;
    else usedKnown = false;
  }
  const running = inst.state === 'running';
  const util = running && utilN ? fmtPercent(utilSum / utilN) : '—';
  // A whole GPU's memory is the instance's own; a fraction shows its quota.
  const vram = whole && usedKnown && running ? `${fmtBytes(used)} / ${fmtBytes(reserved)}` : `${fmtBytes(reserved)} quota`;
  return { gpus, util: whole ? util : running && utilN ? `${util} (GPU)` : '—', vram };
}

const Row = memo(
  function Row(props: { inst: Instance; gv: GpuView; now: number; operate: boolean }) {
    const { inst, gv } = props;
    const runtime = inst.runtime ?? 'container';
    const stopped = inst.state === 'stopped' || inst.state === 'failed' || inst.state === 'interrupted';
    return (
      <tr data-testid="instance-row" data-id={inst.id} data-name={inst.name} data-state={inst.state}>
        <td>
          <a href={href.instance(inst.id)}>{inst.name || inst.id}</a>
          <div class="sub mono">{inst.id}</div>
        </td>
        <td>
          <StateBadge state={inst.state} />
        </td>
        <td>{runtime}</td>
        <td>{gv.gpus}</td>
        <td class="num">{gv.util}</td>
        <td class="num">{gv.vram}</td>
        <td class="num">{fmtAge(inst.created_at, props.now)}</td>
        <td class="actions">
          {props.operate && (
            <>
              {stopped ? (
                <button type="button" class="small" data-action="start" aria-label={`Start ${inst.name}`}>
                  Start
                </button>
              ) : (
                <button type="button" class="small" data-action="stop" aria-label={`Stop ${inst.name}`} disabled={inst.state !== 'running'}>
                  Stop
                </button>
              )}
              <button type="button" class="small" data-action="resize" aria-label={`Resize ${inst.name}`}>
                Resize
              </button>
              <button type="button" class="small danger" data-action="terminate" aria-label={`Terminate ${inst.name}`}>
                Terminate
              </button>
            </>
          )}
        </td>
      </tr>
    );
  },
  (a, b) =>
    a.inst === b.inst &&
    a.gv.util === b.gv.util &&
    a.gv.vram === b.gv.vram &&
    a.operate === b.operate &&
    Math.floor(a.now / 1000) === Math.floor(b.now / 1000),
);

export function Instances(props: { session: Session }) {
  const [list, setList] = useState<Instance[] | null>(null);
  const [stats, setStats] = useState<Map<string, GpuStats>>(new Map());
  const [error, setError] = useState<string | null>(null);
  const [notice, setNotice] = useState<string | null>(null);
  const [creating, setCreating] = useState(false);
  const [resizing, setResizing] = useState<Instance | null>(null);
  const [terminating, setTerminating] = useState<Instance | null>(null);
  const [now, setNow] = useState(Date.now());
  const dataAt = useRef(0);
  const operate = canOperate(props.session);
  const prev = useRef(new Map<string, Instance>());

  const refresh = async (signal?: AbortSignal) => {
    // The list is shown as soon as it is here; the GPUs' figures fill in when they are.
    const stat = get<GpuStats[]>('/v1/gpus/stats', signal)
      .then((s) => {
        if (!signal?.aborted) setStats(new Map(s.map((x) => [x.uuid, x])));
      })
      .catch(() => {});
    const l = await get<Instance[]>('/v1/instances', signal).catch((e) => {
      if ((e as Error).name !== 'AbortError') setError(errorMessage(e));
      return null;
    });
    if (signal?.aborted) return;
    if (l) {
      // Keep the objects of unchanged rows, so that their rows are not rendered again.
      const old = prev.current;
      const next = new Map<string, Instance>();
      const merged = l
        .filter((i) => i.state !== 'terminated')
        .sort((a, b) => b.created_at - a.created_at || a.id.localeCompare(b.id))
        .map((i) => {
          const o = old.get(i.id);
          const keep = o && o.updated_at === i.updated_at && o.state === i.state ? o : i;
          next.set(i.id, keep);
          return keep;
        });
      prev.current = next;
      dataAt.current = performance.now();
      setError(null);
      setList(merged);
      setNow(Date.now());
    }
    await stat;
  };
  usePoll(refresh, 2000, []);

  useLayoutEffect(() => {
    if (list) window.__gvInstancesRendered = { rows: list.length, dataAt: dataAt.current, renderedAt: performance.now() };
  }, [list]);

  const byId = useMemo(() => new Map((list ?? []).map((i) => [i.id, i])), [list]);

  const act = async (action: string, inst: Instance) => {
    setNotice(null);
    try {
      if (action === 'stop' || action === 'start') {
        await post(`/v1/instances/${enc(inst.id)}/${action}`);
        setNotice(`${action === 'stop' ? 'Stopping' : 'Starting'} ${inst.name}.`);
      }
      await refresh();
    } catch (e) {
      setError(errorMessage(e));
    }
  };

  const onTableClick = (e: MouseEvent) => {
    const b = (e.target as HTMLElement).closest('button[data-action]') as HTMLButtonElement | null;
    if (!b) return;
    const id = b.closest('tr')?.getAttribute('data-id');
    const inst = id ? byId.get(id) : undefined;
    if (!inst) return;
    const action = b.dataset.action!;
    if (action === 'resize') setResizing(inst);
    else if (action === 'terminate') setTerminating(inst);
    else act(action, inst);
  };

  return (
    <section aria-labelledby="instances-title">
      <div class="page-head">
        <h1 id="instances-title">Instances</h1>
        {operate && (
          <button type="button" onClick={() => setCreating(!creating)} aria-expanded={creating} data-testid="create-toggle">
            {creating ? 'Close form' : 'Create instance'}
          </button>
        )}
      </div>
      {creating && (
        <CreateForm
          onCreated={(inst) => {
            setCreating(false);
            setNotice(`Created ${inst.name} (${inst.id}).`);
            refresh();
          }}
          onCancel={() => setCreating(false)}
        />
      )}
      <div role="status" class="notice" data-testid="notice">
        {notice}
      </div>
      <ErrorText error={error} testid="list-error" />
      {!list ? (
        <Loading what="instances" />
      ) : list.length === 0 ? (
        <p class="muted" data-testid="no-instances">
          No instances yet.
        </p>
      ) : (
        <div class="table-wrap">
          <table class="grid" data-testid="instances-table">
            <caption class="visually-hidden">Instances, refreshed every 2 seconds</caption>
            <thead>
              <tr>
                <th scope="col">Name / ID</th>
                <th scope="col">State</th>
                <th scope="col">Runtime</th>
                <th scope="col">GPUs</th>
                <th scope="col">GPU util</th>
                <th scope="col">VRAM</th>
                <th scope="col">Age</th>
                <th scope="col">
                  <span class="visually-hidden">Actions</span>
                </th>
              </tr>
            </thead>
            <tbody onClick={onTableClick}>
              {list.map((inst) => (
                <Row key={inst.id} inst={inst} gv={gpuView(inst, stats)} now={now} operate={operate} />
              ))}
            </tbody>
          </table>
        </div>
      )}
      {resizing && (
        <ResizeDialog
          inst={resizing}
          onClose={() => setResizing(null)}
          onDone={(msg) => {
            setResizing(null);
            setNotice(msg);
            refresh();
          }}
        />
      )}
      {terminating && (
        <TerminateDialog
          inst={terminating}
          onClose={() => setTerminating(null)}
          onDone={(msg) => {
            setTerminating(null);
            setNotice(msg);
            refresh();
          }}
        />
      )}
    </section>
  );
}

export function TerminateDialog(props: { inst: Instance; onClose: () => void; onDone: (msg: string) => void }) {
  const [error, setError] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);
  const go = async () => {
    setBusy(true);
    try {
      await del(`/v1/instances/${enc(props.inst.id)}`);
      props.onDone(`Terminating ${props.inst.name}.`);
    } catch (e) {
      setError(errorMessage(e));
      setBusy(false);
    }
  };
  return (
    <Dialog title={`Terminate ${props.inst.name}?`} onClose={props.onClose} testid="terminate-dialog">
      <p>
        The instance <span class="mono">{props.inst.id}</span> is stopped and its container disk deleted. Its volumes are kept.
      </p>
      <ErrorText error={error} />
      <div class="buttons">
        <button type="button" class="danger" onClick={go} disabled={busy} data-testid="confirm-terminate">
          Terminate
        </button>
        <button type="button" class="secondary" onClick={props.onClose} autoFocus>
          Cancel
        </button>
      </div>
    </Dialog>
  );
}

export function ResizeDialog(props: { inst: Instance; onClose: () => void; onDone: (msg: string) => void }) {
  const { inst } = props;
  const [vcpus, setVcpus] = useState('');
  const [memory, setMemory] = useState('');
  const [gpus, setGpus] = useState('');
  const [restart, setRestart] = useState(false);
  const [error, setError] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);
  const submit = async (e: Event) => {
    e.preventDefault();
    const body: Record<string, unknown> = { restart };
    if (vcpus.trim()) body.vcpus = /^\d+$/.test(vcpus.trim()) ? Number(vcpus) : vcpus.trim();
    if (memory.trim()) body.memory = parseSize(memory) ?? memory.trim();
    if (gpus.trim()) body.gpus = /^\d+$/.test(gpus.trim()) ? Number(gpus) : gpus.trim();
    setBusy(true);
    setError(null);
    try {
      await post(`/v1/instances/${enc(inst.id)}/scale`, body);
      props.onDone(`Resized ${inst.name}.`);
    } catch (err) {
      setError(err instanceof ApiError ? err.message : errorMessage(err));
      setBusy(false);
    }
  };
  const gpuCount = inst.gpus.length && inst.gpus.every((g) => g.milli >= 1000) ? inst.gpus.length : 0;
  return (
    <Dialog title={`Resize ${inst.name}`} onClose={props.onClose} testid="resize-dialog">
      <form onSubmit={submit}>
        <p class="muted">Leave a field empty to keep its value. A running container changes vCPUs and memory in place.</p>
        <div class="field">
          <label for="rs-vcpus">vCPUs</label>
          <input id="rs-vcpus" inputMode="numeric" placeholder={String(inst.vcpus)} value={vcpus} onInput={(e) => setVcpus((e.target as HTMLInputElement).value)} />
        </div>
        <div class="field">
          <label for="rs-memory">Memory</label>
          <input id="rs-memory" placeholder={fmtBytes(inst.memory).replace(' ', '')} value={memory} onInput={(e) => setMemory((e.target as HTMLInputElement).value)} />
        </div>
        <div class="field">
          <label for="rs-gpus">Whole GPUs</label>
          <input id="rs-gpus" inputMode="numeric" placeholder={String(gpuCount)} value={gpus} onInput={(e) => setGpus((e.target as HTMLInputElement).value)} />
        </div>
        <div class="field check">
          <input id="rs-restart" type="checkbox" checked={restart} onChange={(e) => setRestart((e.target as HTMLInputElement).checked)} />
          <label for="rs-restart">Restart if the change cannot be made live</label>
        </div>
        <ErrorText error={error} testid="resize-error" />
        <div class="buttons">
          <button type="submit" disabled={busy}>
            Resize
          </button>
          <button type="button" class="secondary" onClick={props.onClose}>
            Cancel
          </button>
        </div>
      </form>
    </Dialog>
  );
}
