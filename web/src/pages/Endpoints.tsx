import { useRef, useState } from 'preact/hooks';
import { errorMessage, get } from '../api';
import { fmtAge } from '../format';
import type { Endpoint } from '../types';
import { ErrorText, Loading, usePoll } from '../ui';

/** Completed and failed jobs per minute, from the counters of two polls. */
interface Rate {
  at: number;
  completed: number;
  failed: number;
  perMin?: { completed: number; failed: number };
}

export function Endpoints() {
  const [eps, setEps] = useState<Endpoint[] | null>(null);
  const [error, setError] = useState<string | null>(null);
  const rates = useRef(new Map<string, Rate>());

  usePoll(
    async (signal) => {
      try {
        const l = await get<Endpoint[]>('/v1/endpoints', signal);
        const now = Date.now();
        for (const e of l) {
          const j = e.health.jobs;
          const r = rates.current.get(e.id);
          const next: Rate = { at: now, completed: j.completed, failed: j.failed, perMin: r?.perMin };
          if (r && now - r.at >= 1000) {
            const min = (now - r.at) / 60000;
            next.perMin = { completed: Math.max(0, j.completed - r.completed) / min, failed: Math.max(0, j.failed - r.failed) / min };
          }
          if (!r || now - r.at >= 1000) rates.current.set(e.id, next);
        }
        setEps(l.sort((a, b) => a.name.localeCompare(b.name)));
        setError(null);
      } catch (e) {
        if ((e as Error).name !== 'AbortError') setError(errorMessage(e));
      }
    },
    5000,
    [],
  );

  return (
    <section aria-labelledby="endpoints-title">
      <h1 id="endpoints-title">Endpoints</h1>
      <p class="muted">Serverless endpoints: a queue of jobs served by workers made from a template.</p>
      <ErrorText error={error} />
      {!eps ? (
        <Loading what="endpoints" />
      ) : eps.length === 0 ? (
        <p class="muted" data-testid="no-endpoints">
          No endpoints.
        </p>
      ) : (
        <div class="table-wrap">
          <table class="grid" data-testid="endpoints-table">
            <caption class="visually-hidden">Endpoints, refreshed every 5 seconds</caption>
            <thead>
              <tr>
                <th scope="col">Endpoint</th>
                <th scope="col">Template</th>
                <th scope="col">Queue</th>
                <th scope="col">In progress</th>
                <th scope="col">Workers</th>
                <th scope="col">Completed</th>
                <th scope="col">Failed</th>
                <th scope="col">Jobs/min</th>
                <th scope="col">Age</th>
              </tr>
            </thead>
            <tbody>
              {eps.map((e) => {
                const w = e.health.workers;
                const j = e.health.jobs;
                const r = rates.current.get(e.id)?.perMin;
                const live = w.running + w.idle + w.ready + w.initializing;
                return (
                  <tr key={e.id} data-testid="endpoint-row">
                    <td>
                      <strong>{e.name}</strong>
                      <div class="sub mono">{e.path}</div>
                    </td>
                    <td>{e.template}</td>
                    <td class="num">{j.inQueue}</td>
                    <td class="num">{j.inProgress}</td>
                    <td>
                      {live} of {e.workers_min ?? 0}–{e.workers_max ?? '?'}
                      <div class="sub">
                        {w.running} running, {w.idle} idle, {w.initializing} starting
                        {w.parked ? `, ${w.parked} parked` : ''}
                        {w.throttled ? `, ${w.throttled} throttled` : ''}
                        {w.unhealthy ? `, ${w.unhealthy} unhealthy` : ''}
                      </div>
                    </td>
                    <td class="num">{j.completed}</td>
                    <td class="num">
                      {j.failed}
                      {j.retried ? ` (${j.retried} retried)` : ''}
                    </td>
                    <td class="num">{r ? `${r.completed.toFixed(1)} ok, ${r.failed.toFixed(1)} failed` : '—'}</td>
                    <td class="num">{fmtAge(e.created_at)}</td>
                  </tr>
                );
              })}
            </tbody>
          </table>
        </div>
      )}
    </section>
  );
}
