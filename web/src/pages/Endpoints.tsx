import { useState } from 'preact/hooks';
import { errorMessage, get } from '../api';
import { fmtAge, fmtMs } from '../format';
import type { Endpoint, EndpointStats, Percentiles } from '../types';
import { ErrorText, Loading, usePoll } from '../ui';

const pcts = (what: string, p: Percentiles | undefined) => (p ? `${what} p50 ${fmtMs(p.p50)} / p95 ${fmtMs(p.p95)}` : `${what} —`);

/** Jobs that ended in the stats' window: the rate, and the count of each outcome. */
function Rate(props: { stats?: EndpointStats }) {
  const st = props.stats;
  if (!st) return <>—</>;
  return (
    <>
      {st.per_minute.toFixed(1)}
      <div class="sub">
        {st.completed} completed, {st.failed + st.timed_out} failed{st.timed_out ? ` (${st.timed_out} timed out)` : ''}, {st.cancelled} cancelled
      </div>
    </>
  );
}

/** The time queued and the time run of the jobs that ended in the stats' window. */
function Latency(props: { stats?: EndpointStats }) {
  const st = props.stats;
  if (!st || (!st.delay_ms && !st.execution_ms)) return <>—</>;
  return (
    <>
      <div>{pcts('queue', st.delay_ms)}</div>
      <div>{pcts('run', st.execution_ms)}</div>
    </>
  );
}

export function Endpoints() {
  const [eps, setEps] = useState<Endpoint[] | null>(null);
  const [error, setError] = useState<string | null>(null);

  usePoll(
    async (signal) => {
      try {
        const l = await get<Endpoint[]>('/v1/endpoints', signal);
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
                <th scope="col">Jobs/min (5 min)</th>
                <th scope="col">Latency (5 min)</th>
                <th scope="col">Age</th>
              </tr>
            </thead>
            <tbody>
              {eps.map((e) => {
                const w = e.health.workers;
                const j = e.health.jobs;
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
                    <td class="num" data-testid="endpoint-rate">
                      <Rate stats={e.stats} />
                    </td>
                    <td class="num" data-testid="endpoint-latency">
                      <Latency stats={e.stats} />
                    </td>
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
