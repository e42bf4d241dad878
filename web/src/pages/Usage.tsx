import { useEffect, useState } from 'preact/hooks';
import { errorMessage, get } from '../api';
import { fmtDuration, fmtMoney, fmtTime } from '../format';
import { href } from '../router';
import { isAdmin } from '../session';
import type { Session, UsageLine, UsageReport } from '../types';
import { ErrorText, Loading } from '../ui';

const PERIODS: Record<string, string> = { '24h': 'Last 24 hours', '7d': 'Last 7 days', '30d': 'Last 30 days', custom: 'Custom' };
const RESOURCES = ['gpu', 'vcpu', 'memory', 'disk', 'volume'];
const COLORS: Record<string, string> = { gpu: '#2f6fde', vcpu: '#1f8a5b', memory: '#c26a00', disk: '#8a4fd6', volume: '#0f7c8c', other: '#7a8494' };

const CSV_COLUMNS: (keyof UsageLine)[] = ['tenant', 'subject', 'id', 'name', 'resource', 'model', 'milli', 'interruptible', 'seconds', 'unit_seconds', 'unit_price', 'cost'];

export function toCsv(r: UsageReport): string {
  const cell = (v: unknown) => {
    const s = v == null ? '' : String(v);
    return /[",\n\r]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
  };
  const rows = [CSV_COLUMNS.join(',') + ',currency'];
  for (const l of r.lines) rows.push(CSV_COLUMNS.map((c) => cell(l[c])).join(',') + ',' + cell(r.currency));
  return rows.join('\r\n') + '\r\n';
}

interface TenantRow {
  tenant: string;
  byRes: Record<string, number>;
  total: number;
}

export function Usage(props: { session: Session }) {
  const admin = isAdmin(props.session);
  const [period, setPeriod] = useState('30d');
  const [from, setFrom] = useState('');
  const [to, setTo] = useState('');
  const [tenant, setTenant] = useState('');
  const [query, setQuery] = useState({ period: '30d', from: '', to: '', tenant: '' });
  const [report, setReport] = useState<UsageReport | null>(null);
  const [error, setError] = useState<string | null>(null);
  const [loading, setLoading] = useState(false);

  useEffect(() => {
    const ctl = new AbortController();
    const q = new URLSearchParams();
    if (query.period === 'custom') {
      if (query.from) q.set('from', new Date(query.from).toISOString());
      if (query.to) q.set('to', new Date(query.to).toISOString());
    } else q.set('from', query.period);
    if (query.tenant) q.set('tenant', query.tenant);
    setLoading(true);
    get<UsageReport>(`/v1/usage?${q}`, ctl.signal)
      .then((r) => {
        setReport(r);
        setError(null);
      })
      .catch((e) => {
        if ((e as Error).name !== 'AbortError') setError(errorMessage(e));
      })
      .finally(() => setLoading(false));
    return () => ctl.abort();
  }, [query]);

  const tenants: TenantRow[] = [];
  if (report) {
    const m = new Map<string, TenantRow>();
    for (const l of report.lines) {
      const t = m.get(l.tenant) ?? { tenant: l.tenant, byRes: {}, total: 0 };
      const res = RESOURCES.includes(l.resource) ? l.resource : 'other';
      t.byRes[res] = (t.byRes[res] ?? 0) + l.cost;
      t.total += l.cost;
      m.set(l.tenant, t);
    }
    tenants.push(...[...m.values()].sort((a, b) => b.total - a.total));
  }
  const resources = [...RESOURCES, 'other'].filter((r) => tenants.some((t) => t.byRes[r]));

  const download = () => {
    if (!report) return;
    const blob = new Blob([toCsv(report)], { type: 'text/csv' });
    const url = URL.createObjectURL(blob);
    const a = document.createElement('a');
    const d = (ms: number) => new Date(ms).toISOString().slice(0, 10);
    a.href = url;
    a.download = `gpuvisor-usage-${d(report.from)}-${d(report.to)}.csv`;
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  };

  const submit = (e: Event) => {
    e.preventDefault();
    setQuery({ period, from, to, tenant: tenant.trim() });
  };

  return (
    <section aria-labelledby="usage-title">
      <h1 id="usage-title">Usage</h1>
      <form class="card filters" onSubmit={submit} data-testid="usage-form">
        <div class="field">
          <label for="usage-period">Period</label>
          <select id="usage-period" value={period} onChange={(e) => setPeriod((e.target as HTMLSelectElement).value)}>
            {Object.entries(PERIODS).map(([k, v]) => (
              <option key={k} value={k}>
                {v}
              </option>
            ))}
          </select>
        </div>
        {period === 'custom' && (
          <>
            <div class="field">
              <label for="usage-from">From</label>
              <input id="usage-from" type="datetime-local" value={from} onInput={(e) => setFrom((e.target as HTMLInputElement).value)} />
            </div>
            <div class="field">
              <label for="usage-to">To</label>
              <input id="usage-to" type="datetime-local" value={to} onInput={(e) => setTo((e.target as HTMLInputElement).value)} />
            </div>
          </>
        )}
        {admin && (
          <div class="field">
            <label for="usage-tenant">Tenant</label>
            <input id="usage-tenant" placeholder="all" value={tenant} onInput={(e) => setTenant((e.target as HTMLInputElement).value)} />
          </div>
        )}
        <div class="buttons end">
          <button type="submit">Show</button>
          <button type="button" class="secondary" onClick={download} disabled={!report} data-testid="usage-csv">
            Download CSV
          </button>
        </div>
      </form>
      <ErrorText error={error} />
      {!report ? (
        loading && <Loading what="usage" />
      ) : (
        <>
          <p data-testid="usage-total">
            {fmtTime(report.from)} – {fmtTime(report.to)}: <strong>{fmtMoney(report.total_cost, report.currency)}</strong> in{' '}
            {report.lines.length} metered lines.
          </p>
          {tenants.length > 0 && <UsageChart tenants={tenants} resources={resources} currency={report.currency} />}
          {tenants.length > 0 && (
            <div class="table-wrap">
              <table class="grid" data-testid="usage-tenants">
                <caption>Cost per tenant and resource ({report.currency})</caption>
                <thead>
                  <tr>
                    <th scope="col">Tenant</th>
                    {resources.map((r) => (
                      <th scope="col" key={r}>
                        {r}
                      </th>
                    ))}
                    <th scope="col">Total</th>
                  </tr>
                </thead>
                <tbody>
                  {tenants.map((t) => (
                    <tr key={t.tenant}>
                      <th scope="row">{t.tenant}</th>
                      {resources.map((r) => (
                        <td class="num" key={r}>
                          {fmtMoney(t.byRes[r] ?? 0)}
                        </td>
                      ))}
                      <td class="num">
                        <strong>{fmtMoney(t.total)}</strong>
                      </td>
                    </tr>
                  ))}
                </tbody>
              </table>
            </div>
          )}
          <Lines report={report} />
        </>
      )}
    </section>
  );
}

/** Stacked bars, one per tenant, of its cost by resource (SVG: no library needed). */
function UsageChart(props: { tenants: TenantRow[]; resources: string[]; currency: string }) {
  const { tenants, resources } = props;
  const max = Math.max(...tenants.map((t) => t.total), 1e-9);
  const rowH = 26;
  const labelW = 140;
  const width = 720;
  const barW = width - labelW - 110;
  const h = tenants.length * rowH + 30;
  return (
    <figure class="card usage-chart" data-testid="usage-chart">
      <figcaption>Cost per tenant, by resource</figcaption>
      <svg viewBox={`0 0 ${width} ${h}`} role="img" aria-label={tenants.map((t) => `${t.tenant}: ${fmtMoney(t.total, props.currency)}`).join('; ')}>
        {tenants.map((t, i) => {
          let x = labelW;
          const y = i * rowH + 4;
          return (
            <g key={t.tenant}>
              <text x={labelW - 8} y={y + 15} text-anchor="end" class="svg-label">
                {t.tenant}
              </text>
              {resources.map((r) => {
                const w = ((t.byRes[r] ?? 0) / max) * barW;
                const rect = <rect key={r} x={x} y={y} width={Math.max(0, w)} height={rowH - 8} fill={COLORS[r]} />;
                x += w;
                return rect;
              })}
              <text x={x + 6} y={y + 15} class="svg-label">
                {fmtMoney(t.total)}
              </text>
            </g>
          );
        })}
        {resources.map((r, i) => (
          <g key={r}>
            <rect x={labelW + i * 90} y={h - 18} width={12} height={12} fill={COLORS[r]} />
            <text x={labelW + i * 90 + 16} y={h - 8} class="svg-label">
              {r}
            </text>
          </g>
        ))}
      </svg>
    </figure>
  );
}

function Lines(props: { report: UsageReport }) {
  const [all, setAll] = useState(false);
  const lines = [...props.report.lines].sort((a, b) => b.cost - a.cost);
  const shown = all ? lines : lines.slice(0, 100);
  if (!lines.length) return <p class="muted">Nothing metered in this period.</p>;
  return (
    <div class="table-wrap">
      <table class="grid compact" data-testid="usage-lines">
        <caption>Metered lines{lines.length > shown.length ? ` (the ${shown.length} largest of ${lines.length})` : ''}</caption>
        <thead>
          <tr>
            <th scope="col">Tenant</th>
            <th scope="col">Subject</th>
            <th scope="col">Resource</th>
            <th scope="col">Metered</th>
            <th scope="col">Unit price / h</th>
            <th scope="col">Cost</th>
          </tr>
        </thead>
        <tbody>
          {shown.map((l, i) => (
            <tr key={i}>
              <td>{l.tenant}</td>
              <td>
                {l.subject === 'instance' ? <a href={href.instance(l.id)}>{l.name || l.id}</a> : `${l.subject} ${l.name || l.id}`}
              </td>
              <td>
                {l.resource}
                {l.model ? ` (${l.model}${l.milli != null && l.milli < 1000 ? ` × ${l.milli / 1000}` : ''}${l.interruptible ? ', interruptible' : ''})` : ''}
              </td>
              <td class="num">{fmtDuration(l.seconds)}</td>
              <td class="num">{fmtMoney(l.unit_price)}</td>
              <td class="num">{fmtMoney(l.cost)}</td>
            </tr>
          ))}
        </tbody>
      </table>
      {lines.length > shown.length && (
        <button type="button" class="secondary" onClick={() => setAll(true)}>
          Show all {lines.length} lines
        </button>
      )}
    </div>
  );
}

