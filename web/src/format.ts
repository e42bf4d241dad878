// Formatting and the parsing of what people type into forms (the same syntax as the CLI).
import type { PortSpec, VolumeMount } from './types';

const UNITS = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];

export function fmtBytes(n: number | null | undefined): string {
  if (n == null || !isFinite(n)) return '—';
  let v = n;
  let i = 0;
  while (Math.abs(v) >= 1024 && i < UNITS.length - 1) {
    v /= 1024;
    i++;
  }
  const s = Math.abs(v - Math.round(v)) < 0.005 ? String(Math.round(v)) : v.toFixed(v >= 100 ? 0 : v >= 10 ? 1 : 2);
  return `${s} ${UNITS[i]}`;
}

/** Bytes per second. */
export function fmtRate(n: number | null | undefined): string {
  return n == null ? '—' : `${fmtBytes(n)}/s`;
}

export function fmtPercent(n: number | null | undefined): string {
  return n == null || !isFinite(n) ? '—' : `${n.toFixed(n < 10 ? 1 : 0)}%`;
}

export function fmtMoney(n: number | null | undefined, currency = ''): string {
  if (n == null || !isFinite(n)) return '—';
  const s = Math.abs(n) >= 100 ? n.toFixed(2) : Math.abs(n) >= 1 ? n.toFixed(3) : n.toFixed(4);
  return currency ? `${s} ${currency}` : s;
}

/** `3d 4h`, `5m 12s`: how long ago `ms` was. */
export function fmtAge(ms: number, now = Date.now()): string {
  let s = Math.max(0, Math.floor((now - ms) / 1000));
  if (s < 60) return `${s}s`;
  let m = Math.floor(s / 60);
  s %= 60;
  if (m < 60) return `${m}m ${s}s`;
  let h = Math.floor(m / 60);
  m %= 60;
  if (h < 24) return `${h}h ${m}m`;
  const d = Math.floor(h / 24);
  h %= 24;
  return `${d}d ${h}h`;
}

export function fmtTime(ms: number): string {
  const d = new Date(ms);
  const p = (n: number) => String(n).padStart(2, '0');
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
}

export function fmtDuration(seconds: number): string {
  if (seconds < 60) return `${seconds.toFixed(0)} s`;
  if (seconds < 3600) return `${(seconds / 60).toFixed(1)} min`;
  return `${(seconds / 3600).toFixed(2)} h`;
}

/** A duration in ms: `850 ms`, `1.2 s`, `42 s`, `2 min 5 s`, `1 h 3 min`. */
export function fmtMs(ms: number | null | undefined): string {
  if (ms == null || !isFinite(ms)) return '—';
  const v = Math.max(0, ms);
  if (v < 999.5) return `${Math.round(v)} ms`;
  if (v < 9950) return `${(v / 1000).toFixed(1)} s`;
  const s = Math.round(v / 1000);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min${s % 60 ? ` ${s % 60} s` : ''}`;
  const m = Math.round(s / 60);
  return `${Math.floor(m / 60)} h${m % 60 ? ` ${m % 60} min` : ''}`;
}

/** A human size (`4GiB`, `512M`, `10G`, `1GB`) in bytes, as the daemon's parse_size reads it;
 * null when it is not one (the form then sends the text as typed and shows the API's error). */
export function parseSize(s: string): number | null {
  const t = s.trim();
  if (!t) return null;
  const m = /^([0-9.]+)\s*([A-Za-z]*)$/.exec(t);
  if (!m) return null;
  const value = Number(m[1]);
  if (!isFinite(value) || m[1].split('.').length > 2) return null;
  const mult: Record<string, number> = {
    '': 1, B: 1, b: 1,
    K: 1024, k: 1024, KiB: 1024, Ki: 1024,
    M: 1024 ** 2, m: 1024 ** 2, MiB: 1024 ** 2, Mi: 1024 ** 2,
    G: 1024 ** 3, g: 1024 ** 3, GiB: 1024 ** 3, Gi: 1024 ** 3,
    T: 1024 ** 4, t: 1024 ** 4, TiB: 1024 ** 4, Ti: 1024 ** 4,
    KB: 1e3, kB: 1e3, MB: 1e6, GB: 1e9, TB: 1e12,
  };
  const f = mult[m[2]];
  if (f === undefined) return null;
  return Math.round(value * f);
}

/** `PORT[/PROTOCOL][:public|:private]`, as the CLI's `--port`; null when malformed. */
export function parsePort(s: string): PortSpec | null {
  let spec = s.trim();
  let pub = false;
  const colon = spec.lastIndexOf(':');
  if (colon >= 0) {
    const access = spec.slice(colon + 1).trim().toLowerCase();
    if (access === 'public') pub = true;
    else if (access !== 'private') return null;
    spec = spec.slice(0, colon);
  }
  const [p, proto] = spec.includes('/') ? [spec.slice(0, spec.indexOf('/')), spec.slice(spec.indexOf('/') + 1)] : [spec, 'tcp'];
  if (!/^\s*\d{1,5}\s*$/.test(p) || Number(p) > 65535) return null;
  const protocol = proto.trim().toLowerCase();
  if (!protocol) return null;
  const out: PortSpec = { port: Number(p), protocol };
  if (pub) out.public = true;
  return out;
}

/** `NAME:/path[:SIZE]`, as the CLI's `--volume`; null when malformed. */
export function parseVolume(s: string): VolumeMount | null {
  const parts = s.trim().split(':');
  if (parts.length < 2 || parts.length > 3 || !parts[0] || !parts[1]) return null;
  const v: VolumeMount = { name: parts[0], path: parts[1] };
  if (parts.length === 3) {
    const size = parseSize(parts[2]);
    if (size == null) return null;
    v.size = size;
  }
  return v;
}

/** Splits a command line into words: whitespace separates, '…' and "…" quote, \ escapes. */
export function shellSplit(s: string): string[] {
  const out: string[] = [];
  let cur = '';
  let inWord = false;
  let q: '"' | "'" | null = null;
  for (let i = 0; i < s.length; i++) {
    const c = s[i];
    if (q) {
      if (c === q) q = null;
      else if (c === '\\' && q === '"' && i + 1 < s.length) cur += s[++i];
      else cur += c;
    } else if (c === "'" || c === '"') {
      q = c;
      inWord = true;
    } else if (c === '\\' && i + 1 < s.length) {
      cur += s[++i];
      inWord = true;
    } else if (/\s/.test(c)) {
      if (inWord) out.push(cur);
      cur = '';
      inWord = false;
    } else {
      cur += c;
      inWord = true;
    }
  }
  if (inWord) out.push(cur);
  return out;
}

/** Items of a list typed as lines or commas. */
export function splitList(s: string, commas = true): string[] {
  return s
    .split(commas ? /[\n,]/ : /\n/)
    .map((x) => x.trim())
    .filter(Boolean);
}
