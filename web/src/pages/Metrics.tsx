// Live graphs of an instance: the history API for the past, then the instance's metrics stream
// (a WebSocket, one update a sample) for the newest points.
// The instance's own GPU series come from the driver's per-process accounting (NVML); the GPUs
// it is bound to are graphed beside them from their own history (`/v1/gpus/{id}/metrics`),
// which is all there is where per-process figures are not (simulated GPUs, MIG, no NVML).
import { useEffect, useRef, useState } from 'preact/hooks';
import { ApiError, enc, errorMessage, get } from '../api';
import { fmtBytes, fmtPercent } from '../format';
import type { GpuBinding, MetricPoint, MetricsHistory } from '../types';
import { ErrorText } from '../ui';
import type { Chart, Unit } from '../lazy/charts';
import type { MetricsStream, StreamState } from '../lazy/metricsStream';

type RangeKey = '5m' | '1h' | '7d';
const RANGES: Record<RangeKey, { label: string; since: string; step: string; spanMs: number }> = {
  '5m': { label: '5 min', since: '5m', step: '1s', spanMs: 5 * 60e3 },
  '1h': { label: '1 h', since: '1h', step: '1s', spanMs: 3600e3 },
  '7d': { label: '7 d', since: '7d', step: '1m', spanMs: 7 * 86400e3 },
};

interface Series {
  /** `SOURCE/metric`: SOURCE is `i` for the instance, the GPU's UUID for a GPU. */
  key: string;
  label: string;
  color: string;
}

interface Panel {
  key: string;
  title: string;
  unit: Unit;
  series: Series[];
}

const DEVICE_COLORS = ['#7aa2e8', '#a98ad8', '#6fb7c4', '#d08fb0'];

function panels(gpus: GpuBinding[]): Panel[] {
  // One series per physical GPU the instance uses.
  const devices = [...new Map(gpus.map((g) => [g.uuid, g])).values()].slice(0, 4);
  const dev = (metric: string) =>
    devices.map((g, n) => ({ key: `${g.uuid}/${metric}`, label: `GPU ${g.index} (whole device)`, color: DEVICE_COLORS[n] }));
  return [
    {
      key: 'gpu-util',
      title: 'GPU utilisation',
      unit: 'percent',
      series: [{ key: 'i/gpu_util_percent', label: 'This instance', color: '#2f6fde' }, ...dev('util_percent')],
    },
    {
      key: 'vram',
      title: 'VRAM',
      unit: 'bytes',
      series: [{ key: 'i/gpu_memory_bytes', label: 'This instance', color: '#8a4fd6' }, ...dev('memory_used_bytes')],
    },
    { key: 'cpu', title: 'CPU', unit: 'percent', series: [{ key: 'i/cpu_percent', label: 'CPU', color: '#1f8a5b' }] },
    { key: 'memory', title: 'Memory', unit: 'bytes', series: [{ key: 'i/memory_bytes', label: 'Memory', color: '#c26a00' }] },
    {
      key: 'network',
      title: 'Network',
      unit: 'rate',
      series: [
        { key: 'i/net_rx_bytes_per_s', label: 'Received', color: '#0f7c8c' },
        { key: 'i/net_tx_bytes_per_s', label: 'Sent', color: '#c2185b' },
      ],
    },
  ];
}

function fmtValue(unit: Unit, v: number): string {
  return unit === 'percent' ? fmtPercent(v) : unit === 'rate' ? `${fmtBytes(v)}/s` : fmtBytes(v);
}

export function Metrics(props: { id: string; gpus: GpuBinding[]; /** Unix ms: nothing before (a GPU's history is older than the instance). */ from: number }) {
  const [range, setRange] = useState<RangeKey>('5m');
  const [error, setError] = useState<string | null>(null);
  const [latest, setLatest] = useState<Record<string, string>>({});
  const [stream, setStream] = useState<{ state: StreamState; retrying?: boolean }>({ state: 'connecting' });
  const boxes = useRef<Record<string, HTMLDivElement | null>>({});
  const figs = useRef<Record<string, HTMLElement | null>>({});
  const gpuKey = props.gpus.map((g) => g.uuid).join(',');
  const hasGpu = props.gpus.length > 0;
  const shown = panels(props.gpus);

  useEffect(() => {
    const r = RANGES[range];
    const ps = panels(props.gpus);
    let stop = false;
    let live: MetricsStream | null = null;
    const charts: Record<string, Chart> = {};
    const data = new Map<string, MetricPoint[]>();
    /** The newest point held of each history (by prefix). */
    const newest = new Map<string, number>();
    // The past: where each history is read.
    const sources = [
      { prefix: 'i', path: `/v1/instances/${enc(props.id)}/metrics`, required: true },
      ...[...new Set(props.gpus.map((g) => g.uuid))].map((u) => ({ prefix: u, path: `/v1/gpus/${enc(u)}/metrics`, required: false })),
    ];
    setStream({ state: 'connecting' });

    const merge = (prefix: string, h: MetricsHistory) => {
      for (const s of h.series) {
        const key = `${prefix}/${s.metric}`;
        if (!s.points.length) {
          if (!data.has(key)) data.set(key, []);
          continue;
        }
        const old = data.get(key) ?? [];
        const from = s.points[0].t;
        // The newest bucket may have grown since: points from the answer's first one replace ours.
        let cut = old.length;
        while (cut > 0 && old[cut - 1].t >= from) cut--;
        const merged = old.slice(0, cut).concat(s.points);
        const min = Math.max(Date.now() - r.spanMs, props.from);
        let drop = 0;
        while (drop < merged.length && merged[drop].t < min) drop++;
        data.set(key, drop ? merged.slice(drop) : merged);
        newest.set(prefix, Math.max(newest.get(prefix) ?? 0, s.points[s.points.length - 1].t));
      }
    };

    const fetchAll = async () => {
      await Promise.all(
        sources.map(async (src) => {
          try {
            const h = await get<MetricsHistory>(`${src.path}?since=${enc(r.since)}&step=${r.step}`);
            if (!stop) merge(src.prefix, h);
          } catch (e) {
            // A GPU's history is extra (a viewer may not read it): only the instance's counts.
            if (src.required) throw e;
          }
        }),
      );
    };

    /** Where the stream starts: the oldest of the histories' newest points, so that every one
     * overlaps what is held (the bucket again); the whole range when nothing is. */
    const since = () => {
      const held = [...newest.values()].filter((t) => t > 0);
      return held.length ? String(Math.min(...held)) : r.since;
    };

    const draw = () => {
      const lat: Record<string, string> = {};
      const end = Date.now();
      for (const p of ps) {
        const series = p.series.map((s) => data.get(s.key) ?? []);
        const ts = Array.from(new Set(series.flatMap((pts) => pts.map((x) => x.t)))).sort((a, b) => a - b);
        const ys = series.map((pts) => {
          const m = new Map(pts.map((x) => [x.t, x.avg]));
          return ts.map((t) => m.get(t) ?? null);
        });
        charts[p.key]?.set(
          ts.map((t) => t / 1000),
          ys,
          [(end - r.spanMs) / 1000, end / 1000],
        );
        const fig = figs.current[p.key];
        if (fig) {
          fig.dataset.points = String(ts.length);
          fig.dataset.last = String(ts[ts.length - 1] ?? 0);
        }
        lat[p.key] =
          p.series
            .map((s, i) => {
              const pt = series[i][series[i].length - 1];
              return pt ? `${p.series.length > 1 ? `${s.label} ` : ''}${fmtValue(p.unit, pt.avg)}` : '';
            })
            .filter(Boolean)
            .join(', ') || 'no data';
      }
      setLatest(lat);
    };

    (async () => {
      // The past and the chart code together; the stream once both are in.
      // 'refused': the API said no (the instance is gone, the key may not read it): no stream.
      const past = fetchAll().then(
        () => 'ok' as const,
        (e) => {
          if (!stop) setError(errorMessage(e));
          return e instanceof ApiError && e.status >= 400 && e.status < 500 ? ('refused' as const) : ('failed' as const);
        },
      );
      let openMetricsStream: typeof import('../lazy/metricsStream').openMetricsStream;
      try {
        const [{ makeChart }, ms] = await Promise.all([import('../lazy/charts'), import('../lazy/metricsStream')]);
        openMetricsStream = ms.openMetricsStream;
        if (stop) return;
        for (const p of ps) {
          const el = boxes.current[p.key];
          if (el) charts[p.key] = makeChart(el, { unit: p.unit, series: p.series });
        }
      } catch (e) {
        if (!stop) setError(errorMessage(e));
        return;
      }
      const pastState = await past;
      if (stop) return;
      draw();
      if (pastState === 'refused') return;
      if (pastState === 'ok') setError(null);
      live = openMetricsStream({
        path: (from) => `/v1/instances/${enc(props.id)}/metrics/ws?step=${r.step}&since=${enc(from)}`,
        since,
        onUpdate: (u) => {
          if (stop) return;
          for (const h of u.histories) merge(h.kind === 'instance' ? 'i' : h.id, h);
          draw();
          setError(null);
        },
        onState: (state, retrying) => {
          if (!stop) setStream({ state, retrying });
        },
        onEnd: (reason) => {
          if (!stop && reason) setError(reason);
        },
      });
    })();

    return () => {
      stop = true;
      live?.close();
      for (const c of Object.values(charts)) c.destroy();
    };
  }, [props.id, range, gpuKey, props.from]);

  return (
    <section class="card" aria-labelledby="metrics-title" data-testid="metrics" data-stream={stream.state}>
      <div class="section-head">
        <h2 id="metrics-title">Metrics</h2>
        <fieldset class="segmented" data-testid="range-picker">
          <legend class="visually-hidden">Time range</legend>
          {(Object.keys(RANGES) as RangeKey[]).map((k) => (
            <label key={k} class={range === k ? 'on' : ''}>
              <input type="radio" name="range" value={k} checked={range === k} onChange={() => setRange(k)} />
              {RANGES[k].label}
            </label>
          ))}
        </fieldset>
      </div>
      <ErrorText error={error} testid="metrics-error" />
      {stream.retrying && (
        <p class="sub" role="status" data-testid="metrics-reconnecting">
          Live updates interrupted: reconnecting…
        </p>
      )}
      <div class="charts">
        {shown.map((p) => (
          <figure
            key={`${p.key}-${gpuKey}`}
            class={`chart${!hasGpu && (p.key === 'gpu-util' || p.key === 'vram') ? ' no-gpu' : ''}`}
            data-testid={`chart-${p.key}`}
            data-points="0"
            ref={(e) => {
              if (e) figs.current[p.key] = e;
            }}
          >
            <figcaption>
              {p.title} <span class="muted">{latest[p.key] ?? ''}</span>
            </figcaption>
            <div
              class="plot"
              aria-hidden="true"
              ref={(e) => {
                if (e) boxes.current[p.key] = e;
              }}
            />
          </figure>
        ))}
      </div>
    </section>
  );
}
