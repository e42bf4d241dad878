import { useState } from 'preact/hooks';
import { ApiError, enc, errorMessage, get, post } from '../api';
import { fmtAge, fmtBytes, fmtDuration, fmtMoney, fmtTime } from '../format';
import { href, navigate } from '../router';
import { canOperate } from '../session';
import type { Instance, InstanceEvent, Session, UsageReport } from '../types';
import { ErrorText, Loading, StateBadge, usePoll } from '../ui';
import { ResizeDialog, TerminateDialog } from './Instances';
import { Metrics } from './Metrics';
import { Logs } from './Logs';
import { TerminalPanel, VncPanel } from './Consoles';

export function InstancePage(props: { id: string; session: Session }) {
  const { id } = props;
  const [inst, setInst] = useState<Instance | null>(null);
  const [error, setError] = useState<string | null>(null);
  const [gone, setGone] = useState(false);
  const [notice, setNotice] = useState<string | null>(null);
  const [dialog, setDialog] = useState<'resize' | 'terminate' | null>(null);
  const operate = canOperate(props.session);

  const refresh = async (signal?: AbortSignal) => {
    try {
      const i = await get<Instance>(`/v1/instances/${enc(id)}`, signal);
      setInst(i);
      setError(null);
    } catch (e) {
      if ((e as Error).name === 'AbortError') return;
      if (e instanceof ApiError && e.status === 404) setGone(true);
      else setError(errorMessage(e));
    }
  };
  usePoll(refresh, 2000, [id]);

  if (gone) {
    return (
      <section aria-labelledby="inst-title">
        <h1 id="inst-title">Instance {id}</h1>
        <p data-testid="instance-gone">This instance does not exist (any more).</p>
        <a href={href.instances}>Back to the instances</a>
      </section>
    );
  }
  if (!inst) {
    return (
      <section aria-labelledby="inst-title">
        <h1 id="inst-title">Instance {id}</h1>
        <ErrorText error={error} />
        {!error && <Loading what="the instance" />}
      </section>
    );
  }

  const vm = inst.runtime === 'vm';
  const running = inst.state === 'running';
  const stopped = inst.state === 'stopped' || inst.state === 'failed' || inst.state === 'interrupted';
  const act = async (action: 'stop' | 'start') => {
    setNotice(null);
    try {
      const i = await post<Instance>(`/v1/instances/${enc(id)}/${action}`);
      setInst(i);
      setNotice(action === 'stop' ? 'Stopping.' : 'Starting.');
    } catch (e) {
      setError(errorMessage(e));
    }
  };

  return (
    <section aria-labelledby="inst-title" data-testid="instance-page" data-state={inst.state} data-runtime={inst.runtime ?? 'container'}>
      <p class="crumbs">
        <a href={href.instances}>Instances</a> /
      </p>
      <div class="page-head">
        <h1 id="inst-title">
          {inst.name} <StateBadge state={inst.state} />
        </h1>
        {operate && (
          <div class="buttons">
            {stopped ? (
              <button type="button" onClick={() => act('start')} data-testid="start">
                Start
              </button>
            ) : (
              <button type="button" onClick={() => act('stop')} disabled={!running} data-testid="stop">
                Stop
              </button>
            )}
            <button type="button" class="secondary" onClick={() => setDialog('resize')}>
              Resize
            </button>
            <button type="button" class="danger" onClick={() => setDialog('terminate')} data-testid="terminate">
              Terminate
            </button>
          </div>
        )}
      </div>
      <div role="status" class="notice">
        {notice}
      </div>
      <ErrorText error={error} />
      <div class="two-col">
        <Details inst={inst} />
        <Cost inst={inst} />
      </div>
      <Metrics id={id} gpus={inst.gpus} from={inst.created_at} />
      {running && operate && (
        <TerminalPanel
          id={id}
          kind="exec"
          title="Terminal"
          intro={`${vm ? 'A shell in the VM through its guest agent.' : 'A shell (/bin/sh) in the container.'} Escape then Tab leaves the terminal.`}
        />
      )}
      {vm && running && operate && (
        <TerminalPanel id={id} kind="console" title="Serial console" intro="The VM's serial console (ttyS0). Escape then Tab leaves it." />
      )}
      {vm && running && operate && <VncPanel id={id} />}
      <Logs id={id} />
      <Events id={id} />
      {dialog === 'resize' && (
        <ResizeDialog
          inst={inst}
          onClose={() => setDialog(null)}
          onDone={(m) => {
            setDialog(null);
            setNotice(m);
            refresh();
          }}
        />
      )}
      {dialog === 'terminate' && (
        <TerminateDialog
          inst={inst}
          onClose={() => setDialog(null)}
          onDone={() => {
            setDialog(null);
            navigate(href.instances);
          }}
        />
      )}
    </section>
  );
}

function Details(props: { inst: Instance }) {
  const i = props.inst;
  const row = (k: string, v: preact.ComponentChildren) => (
    <>
      <dt>{k}</dt>
      <dd>{v}</dd>
    </>
  );
  const links = (i.urls ?? []).filter((u) => /^https?:\/\//.test(u));
  const other = (i.urls ?? []).filter((u) => !/^https?:\/\//.test(u));
  return (
    <section class="card" aria-labelledby="details-title">
      <h2 id="details-title">Details</h2>
      <dl class="kv">
        {row('ID', <span class="mono">{i.id}</span>)}
        {row('Tenant', i.tenant)}
        {row('Runtime', `${i.runtime ?? 'container'}${i.accel ? ` (${i.accel})` : ''}`)}
        {row('Image', i.image)}
        {row('Desired', i.desired)}
        {i.reason && row('Reason', i.reason)}
        {i.exit_code != null && row('Exit code', String(i.exit_code))}
        {row('vCPUs', `${i.vcpus}${i.cpus.length ? ` (host CPUs ${i.cpus.join(',')})` : ''}`)}
        {row('Memory', fmtBytes(i.memory))}
        {i.guest_memory && row('Guest memory', `${fmtBytes(i.guest_memory.used ?? null)} used of ${fmtBytes(i.guest_memory.actual)}`)}
        {row('Disk', fmtBytes(i.container_disk))}
        {row(
          'GPUs',
          i.gpus.length
            ? i.gpus.map((g) => `#${g.index} ${g.model}${g.milli < 1000 ? ` × ${g.milli / 1000}` : ''} (${fmtBytes(g.vram)})`).join(', ')
            : 'none',
        )}
        {i.gpu_fraction && row('Fraction', i.gpu_fraction.summary)}
        {(i.gpu_usage ?? []).map((u) =>
          row(
            'GPU usage',
            `${(u.util_milli / 10).toFixed(1)}% of the GPU (share ${(u.share_milli / 10).toFixed(1)}%), VRAM ${fmtBytes(u.vram_used)} of ${fmtBytes(u.vram_quota)}`,
          ),
        )}
        {i.volumes.length > 0 && row('Volumes', i.volumes.map((v) => `${v.name}:${v.path}`).join(', '))}
        {i.env.length > 0 && row('Environment', <span class="mono">{i.env.join(' ')}</span>)}
        {i.command.length > 0 && row('Command', <span class="mono">{i.command.join(' ')}</span>)}
        {i.ip && row('IP', i.ip)}
        {i.node && row('Node', i.node)}
        {row('Created', `${fmtTime(i.created_at)} (${fmtAge(i.created_at)} ago)`)}
        {i.ports.length > 0 &&
          row(
            'Ports',
            i.ports.map((p) => `${p.port}/${p.protocol}${p.public ? ':public' : ''}${p.host_port ? ` → host ${p.host_port}` : ''}`).join(', '),
          )}
        {(links.length > 0 || other.length > 0) &&
          row(
            'Published',
            <ul class="plain" data-testid="port-links">
              {links.map((u) => (
                <li key={u}>
                  <a href={u} target="_blank" rel="noopener noreferrer">
                    {u}
                  </a>
                </li>
              ))}
              {other.map((u) => (
                <li key={u} class="mono">
                  {u}
                </li>
              ))}
            </ul>,
          )}
      </dl>
    </section>
  );
}

function Cost(props: { inst: Instance }) {
  const { inst } = props;
  const [report, setReport] = useState<UsageReport | null>(null);
  const [error, setError] = useState<string | null>(null);
  usePoll(
    async (signal) => {
      try {
        setReport(await get<UsageReport>(`/v1/usage?subject=${enc(inst.id)}&from=${inst.created_at}`, signal));
        setError(null);
      } catch (e) {
        if ((e as Error).name !== 'AbortError') setError(errorMessage(e));
      }
    },
    30000,
    [inst.id],
  );
  const byRes = new Map<string, { seconds: number; unit_seconds: number; cost: number }>();
  for (const l of report?.lines ?? []) {
    const r = byRes.get(l.resource) ?? { seconds: 0, unit_seconds: 0, cost: 0 };
    r.seconds += l.seconds;
    r.unit_seconds += l.unit_seconds;
    r.cost += l.cost;
    byRes.set(l.resource, r);
  }
  const cur = inst.cost?.currency ?? report?.currency ?? '';
  return (
    <section class="card" aria-labelledby="cost-title" data-testid="cost">
      <h2 id="cost-title">Usage and cost</h2>
      {inst.cost && (
        <dl class="kv">
          <dt>So far</dt>
          <dd data-testid="cost-total">{fmtMoney(inst.cost.total, cur)}</dd>
          <dt>Now, per hour</dt>
          <dd>{fmtMoney(inst.cost.per_hour, cur)}</dd>
        </dl>
      )}
      <ErrorText error={error} />
      {report && report.lines.length > 0 && (
        <table class="grid compact">
          <caption class="visually-hidden">Metered usage by resource since creation</caption>
          <thead>
            <tr>
              <th scope="col">Resource</th>
              <th scope="col">Metered</th>
              <th scope="col">Unit·hours</th>
              <th scope="col">Cost</th>
            </tr>
          </thead>
          <tbody>
            {[...byRes].map(([res, r]) => (
              <tr key={res}>
                <td>{res}</td>
                <td class="num">{fmtDuration(r.seconds)}</td>
                <td class="num">{(r.unit_seconds / 3600).toFixed(3)}</td>
                <td class="num">{fmtMoney(r.cost, report.currency)}</td>
              </tr>
            ))}
          </tbody>
        </table>
      )}
      {report && report.lines.length === 0 && <p class="muted">Nothing metered yet.</p>}
    </section>
  );
}

function Events(props: { id: string }) {
  const [events, setEvents] = useState<InstanceEvent[] | null>(null);
  const [error, setError] = useState<string | null>(null);
  usePoll(
    async (signal) => {
      try {
        setEvents(await get<InstanceEvent[]>(`/v1/instances/${enc(props.id)}/events`, signal));
        setError(null);
      } catch (e) {
        if ((e as Error).name !== 'AbortError') setError(errorMessage(e));
      }
    },
    5000,
    [props.id],
  );
  return (
    <section class="card" aria-labelledby="events-title">
      <h2 id="events-title">Events</h2>
      <ErrorText error={error} />
      {events && events.length === 0 && <p class="muted">No events.</p>}
      {events && events.length > 0 && (
        <table class="grid compact" data-testid="events">
          <caption class="visually-hidden">Events of the instance, newest first</caption>
          <thead>
            <tr>
              <th scope="col">When</th>
              <th scope="col">Kind</th>
              <th scope="col">Message</th>
            </tr>
          </thead>
          <tbody>
            {[...events]
              .sort((a, b) => b.at - a.at)
              .slice(0, 100)
              .map((e, n) => (
                <tr key={`${e.at}-${n}`}>
                  <td class="nowrap">{fmtTime(e.at)}</td>
                  <td>{e.kind}</td>
                  <td>{e.message}</td>
                </tr>
              ))}
          </tbody>
        </table>
      )}
    </section>
  );
}
