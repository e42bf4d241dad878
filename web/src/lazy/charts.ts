// Time-series charts (uPlot), loaded with the instance page's first graph.
import uPlot from 'uplot';
import 'uplot/dist/uPlot.min.css';
import { fmtBytes, fmtPercent } from '../format';

export type Unit = 'percent' | 'bytes' | 'rate';

export interface ChartSpec {
  unit: Unit;
  series: { label: string; color: string }[];
}

export interface Chart {
  /** `x`: seconds since the epoch; one array of values per series (null: no sample);
   * `window`: the time range shown, seconds since the epoch. */
  set(x: number[], ys: (number | null)[][], window: [number, number]): void;
  destroy(): void;
}

function fmt(unit: Unit, v: number | null | undefined): string {
  if (v == null) return '—';
  if (unit === 'percent') return fmtPercent(v);
  if (unit === 'rate') return `${fmtBytes(v)}/s`;
  return fmtBytes(v);
}

function fmtTick(sec: number, span: number): string {
  const d = new Date(sec * 1000);
  const p = (n: number) => String(n).padStart(2, '0');
  const hm = `${p(d.getHours())}:${p(d.getMinutes())}`;
  if (span > 86400) return `${d.getMonth() + 1}/${d.getDate()} ${hm}`;
  if (span <= 600) return `${hm}:${p(d.getSeconds())}`;
  return hm;
}

export function makeChart(el: HTMLElement, spec: ChartSpec): Chart {
  const width = () => Math.max(240, el.clientWidth || 320);
  let win: [number, number] = [Date.now() / 1000 - 300, Date.now() / 1000];
  const opts: uPlot.Options = {
    width: width(),
    height: 150,
    legend: { show: true, live: true },
    cursor: { drag: { x: false, y: false } },
    scales: {
      x: { time: true, range: () => win },
      y: spec.unit === 'percent' ? { range: [0, 100] } : { range: (_u, _min, max) => [0, max > 0 ? max * 1.1 : 1] },
    },
    axes: [
      {
        stroke: '#5b6472',
        grid: { stroke: '#e6e9ee' },
        // Local clock times; the date too when the window spans days.
        space: 90,
        values: (_u, vals) => vals.map((v) => fmtTick(v, win[1] - win[0])),
      },
      {
        stroke: '#5b6472',
        grid: { stroke: '#e6e9ee' },
        size: 70,
        values: (_u, vals) => vals.map((v) => fmt(spec.unit, v)),
      },
    ],
    series: [
      { label: 'Time', value: (_u: uPlot, v: number | null) => (v == null ? '—' : fmtTick(v, 0)) },
      ...spec.series.map((s) => ({
        label: s.label,
        stroke: s.color,
        width: 1.5,
        fill: s.color + '22',
        // Series of one chart are sampled apart (an instance, its GPU): join across the others' points.
        spanGaps: true,
        points: { show: false },
        value: (_u: uPlot, v: number | null) => fmt(spec.unit, v),
      })),
    ],
  };
  const empty: uPlot.AlignedData = [[], ...spec.series.map(() => [])] as unknown as uPlot.AlignedData;
  const plot = new uPlot(opts, empty, el);
  const ro = new ResizeObserver(() => {
    const w = width();
    if (Math.abs(w - plot.width) > 2) plot.setSize({ width: w, height: 150 });
  });
  ro.observe(el);
  return {
    set(x, ys, window) {
      win = window;
      plot.setData([x, ...ys] as uPlot.AlignedData);
    },
    destroy() {
      ro.disconnect();
      plot.destroy();
    },
  };
}
