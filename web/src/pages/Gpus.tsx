import { useState } from 'preact/hooks';
import { ApiError, del, enc, errorMessage, get, post } from '../api';
import { fmtAge, fmtBytes, fmtPercent, fmtTime } from '../format';
import { href } from '../router';
import { isAdmin } from '../session';
import type { Gpu, GpuEvent, GpuStats, HostCheck, MigState, Session } from '../types';
import { Dialog, ErrorText, Loading, usePoll } from '../ui';

export function Gpus(props: { session: Session }) {
  const [gpus, setGpus] = useState<Gpu[] | null>(null);
  const [stats, setStats] = useState<Map<string, GpuStats>>(new Map());
  const [mig, setMig] = useState<Map<string, MigState>>(new Map());
  const [error, setError] = useState<string | null>(null);
  const [notice, setNotice] = useState<string | null>(null);
  const [cordoning, setCordoning] = useState<Gpu | null>(null);
  /** Counts the cordons set and lifted here: the events are read again at once. */
  const [changes, setChanges] = useState(0);
  const admin = isAdmin(props.session);

  const refresh = async (signal?: AbortSignal) => {
    try {
      const [g, s] = await Promise.all([
        get<Gpu[]>('/v1/gpus', signal),
        get<GpuStats[]>('/v1/gpus/stats', signal).catch(() => [] as GpuStats[]),
      ]);
      setGpus(g);
      setStats(new Map(s.map((x) => [x.uuid, x])));
      setError(null);
      // MIG layouts of the GPUs in MIG mode.
      const migOn = g.filter((x) => x.mig_enabled && !x.mig);
      if (migOn.length) {
        const states = await Promise.all(
          migOn.map((x) => get<MigState>(`/v1/gpus/${enc(x.uuid)}/mig`, signal).catch(() => null)),
        );
        setMig(new Map(states.filter((x): x is MigState => !!x).map((m, i) => [migOn[i].uuid, m])));
      }
    } catch (e) {
      if ((e as Error).name !== 'AbortError') setError(errorMessage(e));
    }
  };
  usePoll(refresh, 3000, []);

  const uncordon = async (g: Gpu) => {
    try {
      await del(`/v1/gpus/${enc(g.uuid)}/cordon`);
      setNotice(`GPU ${g.index} uncordoned.`);
      setChanges((n) => n + 1);
      refresh();
    } catch (e) {
      setError(errorMessage(e));
    }
  };

  const physical = (gpus ?? []).filter((g) => !g.mig);
  const slicesOf = (uuid: string) => (gpus ?? []).filter((g) => g.mig?.parent_uuid === uuid);

  return (
    <section aria-labelledby="gpus-title">
      <h1 id="gpus-title">GPUs</h1>
      <div role="status" class="notice">
        {notice}
      </div>
      <ErrorText error={error} />
      {!gpus ? (
        <Loading what="GPUs" />
      ) : physical.length === 0 ? (
        <p class="muted">No GPUs on this host.</p>
      ) : (
        <div class="table-wrap">
          <table class="grid" data-testid="gpus-table">
            <caption class="visually-hidden">GPU inventory, allocation and health</caption>
            <thead>
              <tr>
                <th scope="col">GPU</th>
                <th scope="col">Util</th>
                <th scope="col">VRAM used</th>
                <th scope="col">Allocated</th>
                <th scope="col">Instances</th>
                <th scope="col">Temp / power</th>
                <th scope="col">XID / alarms</th>
                <th scope="col">Cordon</th>
              </tr>
            </thead>
            <tbody>
              {physical.map((g) => {
                const s = stats.get(g.uuid);
                const slices = slicesOf(g.uuid);
                const alloc = g.allocated_milli / 10;
                return (
                  <tr key={g.uuid} data-testid="gpu-row" data-uuid={g.uuid}>
                    <td>
                      <strong>
                        #{g.index} {g.model}
                      </strong>
                      <div class="sub mono">{g.uuid}</div>
                      <div class="sub">
                        {g.pci_address} · {g.backend}
                        {g.driver ? ` · ${g.driver}` : ''}
                        {g.numa_node != null ? ` · NUMA ${g.numa_node}` : ''}
                        {g.passthrough_ready ? ' · passthrough ready' : ''}
                        {g.mig_enabled ? ' · MIG' : ''}
                      </div>
                    </td>
                    <td class="num">{fmtPercent(s?.util_percent)}</td>
                    <td class="num">
                      {fmtBytes(s?.memory_used)} / {fmtBytes(g.vram)}
                    </td>
                    <td>
                      <meter min={0} max={100} value={alloc} aria-label={`GPU ${g.index} compute allocated`} />{' '}
                      {alloc.toFixed(1)}% · {fmtBytes(g.allocated_vram)}
                      {slices.length > 0 && (
                        <ul class="plain sub">
                          {slices.map((sl) => (
                            <li key={sl.uuid}>
                              {sl.mig!.profile} (GI {sl.mig!.gi}, CI {sl.mig!.ci}): {(sl.allocated_milli / 10).toFixed(0)}% allocated
                              {sl.instances.length ? ` → ${sl.instances.join(', ')}` : ''}
                              {sl.cordoned ? ` · cordoned: ${sl.cordoned}` : ''}
                            </li>
                          ))}
                        </ul>
                      )}
                    </td>
                    <td>
                      {g.instances.length === 0
                        ? '—'
                        : g.instances.map((id, n) => (
                            <span key={id}>
                              {n > 0 && ', '}
                              <a href={href.instance(id)}>{id}</a>
                            </span>
                          ))}
                    </td>
                    <td class="num">
                      {s?.temperature_c != null ? `${s.temperature_c.toFixed(0)} °C` : '—'}
                      {s?.power_w != null ? ` · ${s.power_w.toFixed(0)} W` : ''}
                    </td>
                    <td>
                      {s ? `${s.xid_errors} XID${s.last_xid != null ? ` (last ${s.last_xid})` : ''}` : '—'}
                      {s && s.alarms.length > 0 && <div class="error">alarms: {s.alarms.join(', ')}</div>}
                      {s?.ecc_uncorrected ? <div class="error">ECC uncorrected: {s.ecc_uncorrected}</div> : null}
                      {s && s.at > 0 && <div class="sub">sampled {fmtTime(s.at)}</div>}
                    </td>
                    <td>
                      {g.cordoned ? (
                        <>
                          <span class="badge state-failed">cordoned</span> <span data-testid="cordon-reason">{g.cordoned}</span>
                          {admin && (
                            <div>
                              <button type="button" class="small" onClick={() => uncordon(g)} aria-label={`Uncordon GPU ${g.index}`}>
                                Uncordon
                              </button>
                            </div>
                          )}
                        </>
                      ) : admin ? (
                        <button type="button" class="small" onClick={() => setCordoning(g)} aria-label={`Cordon GPU ${g.index}`}>
                          Cordon
                        </button>
                      ) : (
                        '—'
                      )}
                    </td>
                  </tr>
                );
              })}
            </tbody>
          </table>
        </div>
      )}
      {[...mig].map(([uuid, m]) => (
        <MigLayout key={uuid} gpu={(gpus ?? []).find((g) => g.uuid === uuid)} state={m} />
      ))}
      {admin && <GpuEvents changed={changes} />}
      {admin && <HostChecks />}
      {cordoning && (
        <CordonDialog
          gpu={cordoning}
          onClose={() => setCordoning(null)}
          onDone={() => {
            setNotice(`GPU ${cordoning.index} cordoned.`);
            setCordoning(null);
            setChanges((n) => n + 1);
            refresh();
          }}
        />
      )}
    </section>
  );
}

/** How an event's kind is shown: its badge's colour. */
const EVENT_SEVERITY: Record<string, 'fail' | 'warn' | 'pass'> = {
  xid: 'fail',
  gpu_lost: 'fail',
  thermal: 'warn',
  cordoned: 'warn',
  thermal_cleared: 'pass',
  uncordoned: 'pass',
};

/** XID errors, thermal alarms, lost GPUs and cordons of the last 7 days, newest first. For
 * operators (shown to admins; a 403 all the same hides it). */
function GpuEvents(props: { changed: number }) {
  const [events, setEvents] = useState<GpuEvent[] | null>(null);
  const [error, setError] = useState<string | null>(null);
  const [forbidden, setForbidden] = useState(false);
  usePoll(
    async (signal) => {
      if (forbidden) return;
      try {
        setEvents(await get<GpuEvent[]>('/v1/gpus/events?since=7d&limit=200', signal));
        setError(null);
      } catch (e) {
        if (e instanceof ApiError && e.status === 403) setForbidden(true);
        else if ((e as Error).name !== 'AbortError') setError(errorMessage(e));
      }
    },
    forbidden ? 0 : 5000,
    [forbidden, props.changed],
  );
  if (forbidden) return null;
  const now = Date.now();
  return (
    <section class="card" aria-labelledby="gpu-events-title" data-testid="gpu-events-section">
      <h2 id="gpu-events-title">XID and thermal events</h2>
      <ErrorText error={error} />
      {!events ? (
        <Loading what="GPU events" />
      ) : events.length === 0 ? (
        <p class="muted" data-testid="no-gpu-events">
          No GPU events in the last 7 days.
        </p>
      ) : (
        <div class="table-wrap">
          <table class="grid" data-testid="gpu-events">
            <caption class="visually-hidden">GPU events of the last 7 days, newest first, refreshed every 5 seconds</caption>
            <thead>
              <tr>
                <th scope="col">Time</th>
                <th scope="col">GPU</th>
                <th scope="col">Kind</th>
                <th scope="col">Message</th>
              </tr>
            </thead>
            <tbody>
              {events.map((ev, n) => (
                <tr key={`${ev.at}-${ev.gpu}-${ev.kind}-${n}`} data-kind={ev.kind} data-gpu={ev.gpu}>
                  <td>
                    <time dateTime={new Date(ev.at).toISOString()}>{fmtTime(ev.at)}</time>
                    <div class="sub">{fmtAge(ev.at, now)} ago</div>
                  </td>
                  <td class="num" title={ev.gpu}>
                    #{ev.index}
                  </td>
                  <td>
                    <span class={`badge${EVENT_SEVERITY[ev.kind] ? ` check-${EVENT_SEVERITY[ev.kind]}` : ''}`}>{ev.kind.replace(/_/g, ' ')}</span>
                  </td>
                  <td>{ev.message}</td>
                </tr>
              ))}
            </tbody>
          </table>
        </div>
      )}
    </section>
  );
}

/** The daemon's host preflight (`gpuvisor host check`), run when the page opens or on Recheck. */
function HostChecks() {
  const [checks, setChecks] = useState<HostCheck[] | null>(null);
  const [error, setError] = useState<string | null>(null);
  const run = async (signal?: AbortSignal) => {
    try {
      setChecks(await get<HostCheck[]>('/v1/host/checks', signal));
      setError(null);
    } catch (e) {
      if ((e as Error).name !== 'AbortError') setError(errorMessage(e));
    }
  };
  usePoll(run, 0, []);
  const count = (s: string) => (checks ?? []).filter((c) => c.status === s).length;
  return (
    <section class="card" aria-labelledby="host-checks-title" data-testid="host-checks">
      <h2 id="host-checks-title">Host checks</h2>
      <ErrorText error={error} />
      {!checks ? (
        <Loading what="host checks" />
      ) : (
        <>
          <p class="muted">
            {count('pass')} passed, {count('warn')} warnings, {count('fail')} failed, {count('skip')} not applicable{' '}
            <button type="button" class="secondary" onClick={() => run()}>
              Recheck
            </button>
          </p>
          <div class="table-wrap">
            <table class="grid">
              <caption class="visually-hidden">Host preflight checks</caption>
              <thead>
                <tr>
                  <th scope="col">Result</th>
                  <th scope="col">Check</th>
                  <th scope="col">Found</th>
                  <th scope="col">What to do</th>
                </tr>
              </thead>
              <tbody>
                {checks.map((c) => (
                  <tr key={c.id} data-check={c.id}>
                    <td>
                      <span class={`badge check-${c.status}`}>{c.status}</span>
                    </td>
                    <td>{c.title}</td>
                    <td>{c.detail}</td>
                    <td>{c.status === 'pass' ? '' : c.remedy ?? ''}</td>
                  </tr>
                ))}
              </tbody>
            </table>
          </div>
        </>
      )}
    </section>
  );
}

function MigLayout(props: { gpu?: Gpu; state: MigState }) {
  const { state } = props;
  // 8 memory slices on A100/H100; placements are in memory slices.
  const total = Math.max(8, ...state.instances.map((i) => i.placement.start + i.placement.size));
  return (
    <section class="card" aria-label={`MIG layout of GPU ${props.gpu?.index ?? state.gpu}`}>
      <h2>
        MIG layout: GPU {props.gpu ? `#${props.gpu.index} ${props.gpu.model}` : state.gpu}
      </h2>
      <div class="mig-bar" role="list">
        {state.instances
          .slice()
          .sort((a, b) => a.placement.start - b.placement.start)
          .map((gi) => (
            <div
              role="listitem"
              key={gi.id}
              class="mig-gi"
              ref={(el) => {
                if (el) {
                  el.style.left = `${(gi.placement.start / total) * 100}%`;
                  el.style.width = `${(gi.placement.size / total) * 100}%`;
                }
              }}
            >
              GI {gi.id}: {gi.profile} ({gi.compute_instances.length} CI)
            </div>
          ))}
      </div>
      <table class="grid compact">
        <caption>Profiles</caption>
        <thead>
          <tr>
            <th scope="col">Profile</th>
            <th scope="col">Slices</th>
            <th scope="col">Memory</th>
            <th scope="col">Free / max</th>
          </tr>
        </thead>
        <tbody>
          {state.profiles.map((p) => (
            <tr key={p.id}>
              <td>{p.name}</td>
              <td class="num">{p.slices}</td>
              <td class="num">{fmtBytes(p.memory_mib * 1024 * 1024)}</td>
              <td class="num">
                {p.free} / {p.max_instances}
              </td>
            </tr>
          ))}
        </tbody>
      </table>
    </section>
  );
}

function CordonDialog(props: { gpu: Gpu; onClose: () => void; onDone: () => void }) {
  const [reason, setReason] = useState('');
  const [error, setError] = useState<string | null>(null);
  const submit = async (e: Event) => {
    e.preventDefault();
    try {
      await post(`/v1/gpus/${enc(props.gpu.uuid)}/cordon`, { reason: reason.trim() || null });
      props.onDone();
    } catch (err) {
      setError(errorMessage(err));
    }
  };
  return (
    <Dialog title={`Cordon GPU ${props.gpu.index}`} onClose={props.onClose} testid="cordon-dialog">
      <form onSubmit={submit}>
        <p class="muted">No new instance is placed on a cordoned GPU; the ones on it keep running.</p>
        <div class="field">
          <label for="cordon-reason">Reason</label>
          <input id="cordon-reason" value={reason} onInput={(e) => setReason((e.target as HTMLInputElement).value)} autoFocus />
        </div>
        <ErrorText error={error} />
        <div class="buttons">
          <button type="submit">Cordon</button>
          <button type="button" class="secondary" onClick={props.onClose}>
            Cancel
          </button>
        </div>
      </form>
    </Dialog>
  );
}
