// A stand-in for the daemon's console-facing API, for working on the console without a
// daemon: `npm run build && node e2e/mock-daemon.mjs [PORT]`, then open http://127.0.0.1:PORT/
// and log in with the key `gv_mock`. It serves dist/ with the daemon's Content-Security-Policy,
// keeps a few simulated instances, answers the exec and console WebSockets with a toy shell and
// a login prompt and the metrics WebSocket with an update a second, and refuses what the daemon
// refuses (no CSRF header, no session). It is not the daemon: the end-to-end test proper
// (e2e/console.mjs) runs against a real one. With GV_SCENARIO=container or vm the end-to-end
// script also runs against this.
import { createServer } from 'node:http';
import { createHash, randomBytes } from 'node:crypto';
import { readFileSync, existsSync } from 'node:fs';
import { extname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const PORT = Number(process.argv[2] ?? process.env.PORT ?? 7172);
const DIST = fileURLToPath(new URL('../dist/', import.meta.url));
const KEY = 'gv_mock';
const CSP =
  "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; font-src 'self'; worker-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'";
const MIME = { '.html': 'text/html; charset=utf-8', '.js': 'text/javascript', '.css': 'text/css', '.svg': 'image/svg+xml', '.png': 'image/png', '.woff2': 'font/woff2' };
const GiB = 1024 ** 3;

const sessions = new Map();
const now = () => Date.now();
const gpus = [0, 1, 2].map((i) => ({
  uuid: `GPU-sim-${i}`,
  index: i,
  model: i < 2 ? 'A100-80GB' : 'H100-80GB',
  vram: 80 * GiB,
  pci_address: `0000:0${i + 1}:00.0`,
  backend: 'simulated',
  allocated_milli: 0,
  allocated_vram: 0,
  instances: [],
  cordoned: null,
  mig_enabled: false,
}));
const templates = [
  { name: 'small', image: 'busybox', public: true, created_at: now(), description: 'busybox with a quarter GPU', gpu_fraction: 0.25, vcpus: 1, memory: 512 * 1024 ** 2, command: ['sleep', 'infinity'] },
  { name: 'vm-debian', image: 'debian12', public: true, created_at: now(), runtime: 'vm', vcpus: 1, memory: GiB },
];
const instances = new Map();
let seq = 1;

function mkInstance(body, tenant) {
  const t = templates.find((x) => x.name === body.template);
  const id = `i-${(seq++).toString(16).padStart(8, '0')}`;
  const frac = body.gpu_fraction ?? t?.gpu_fraction ?? null;
  const whole = body.gpus ?? t?.gpus ?? 0;
  const g = gpus[seq % 3];
  const bindings = frac ? [{ uuid: g.uuid, index: g.index, model: g.model, milli: Math.round(frac * 1000), vram: Math.round(frac * g.vram) }] : Array.from({ length: whole }, (_, k) => ({ uuid: gpus[k].uuid, index: k, model: gpus[k].model, milli: 1000, vram: gpus[k].vram }));
  const inst = {
    id,
    name: body.name ?? `inst-${id.slice(2)}`,
    tenant,
    image: body.image || t?.image || 'busybox',
    state: 'provisioning',
    desired: 'running',
    runtime: body.runtime ?? t?.runtime ?? 'container',
    vcpus: body.vcpus || t?.vcpus || 1,
    cpus: [0],
    memory: body.memory || t?.memory || GiB,
    container_disk: body.container_disk || 10 * GiB,
    gpus: bindings,
    volumes: body.volumes ?? [],
    env: body.env ?? [],
    ports: body.ports ?? [],
    urls: (body.ports ?? []).filter((p) => p.protocol === 'http').map((p) => `https://${id}-${p.port}.gpuvisor.localhost:8443/`),
    command: body.command?.length ? body.command : t?.command ?? [],
    created_at: now(),
    updated_at: now(),
  };
  instances.set(id, inst);
  setTimeout(() => setState(inst, 'running'), 800);
  for (const b of bindings) {
    const gg = gpus.find((x) => x.uuid === b.uuid);
    gg.allocated_milli += b.milli;
    gg.allocated_vram += b.vram;
    gg.instances.push(id);
  }
  return inst;
}
function setState(inst, s) {
  inst.state = s;
  inst.updated_at = now();
}
function release(inst) {
  for (const b of inst.gpus) {
    const g = gpus.find((x) => x.uuid === b.uuid);
    g.allocated_milli -= b.milli;
    g.allocated_vram -= b.vram;
    g.instances = g.instances.filter((x) => x !== inst.id);
  }
}

// A VM for the vm scenario.
const vm = mkInstance({ name: 'vm-mock', template: 'vm-debian' }, 'default');

const json = (res, status, body, headers = {}) => {
  res.writeHead(status, { 'content-type': 'application/json', ...headers });
  res.end(body === undefined ? '' : JSON.stringify(body));
};
const err = (res, status, code, message) => json(res, status, { error: { code, message } });
const wave = (t, phase) => 50 + 40 * Math.sin(t / 20000 + phase);

/** Unix ms of a `since` (Unix ms, or a duration back from now like `5m`). */
function sinceMs(since, dflt) {
  if (/^\d+$/.test(since ?? '')) return Number(since);
  const m = /^(\d+)([smhd])$/.exec(since ?? dflt);
  const mult = { s: 1e3, m: 60e3, h: 3600e3, d: 86400e3 };
  return now() - (m ? Number(m[1]) * mult[m[2]] : 300e3);
}

function history(kind, id, from, step, fns) {
  const stepMs = step === '1m' ? 60000 : 1000;
  const start = Math.ceil(from / stepMs) * stepMs;
  const ts = [];
  for (let t = start; t <= now() - 1000 && ts.length < 20000; t += stepMs) ts.push(t);
  const series = Object.entries(fns).map(([metric, f]) => ({ metric, points: ts.map((t) => ({ t, avg: f(t), max: f(t) })) }));
  return { kind, id, step_s: stepMs / 1000, series };
}

function metrics(inst, since, step, dflt = '5m') {
  const fns = { cpu_percent: (t) => wave(t, 1) / 2, memory_bytes: (t) => 2e8 + 1e6 * wave(t, 2), net_rx_bytes_per_s: (t) => 1e4 * wave(t, 3), net_tx_bytes_per_s: (t) => 5e3 * wave(t, 4) };
  if (inst.gpus.length) Object.assign(fns, { gpu_util_percent: (t) => wave(t, 0), gpu_memory_bytes: (t) => 1e9 * wave(t, 5) });
  return history('instance', inst.id, Math.max(sinceMs(since, dflt), inst.created_at), step, fns);
}

function gpuMetrics(g, since, step, dflt = '5m') {
  return history('gpu', g.uuid, sinceMs(since, dflt), step, { util_percent: (t) => wave(t, g.index + 0.5), memory_used_bytes: (t) => 4e8 * wave(t, g.index + 2) });
}

// GPU events, newest first (`/v1/gpus/events`).
const gpuEvents = [
  { at: now() - 2 * 86400e3, gpu: gpus[2].uuid, index: 2, kind: 'xid', message: 'XID 79: GPU has fallen off the bus' },
  { at: now() - 3 * 3600e3, gpu: gpus[1].uuid, index: 1, kind: 'thermal', message: 'temperature 91 °C at or above the slowdown threshold (90 °C)' },
  { at: now() - 3 * 3600e3 + 600e3, gpu: gpus[1].uuid, index: 1, kind: 'thermal_cleared', message: 'temperature 78 °C: back under the slowdown threshold' },
  { at: now() - 20 * 60e3, gpu: gpus[2].uuid, index: 2, kind: 'cordoned', message: 'cordoned by k-mock: XID 79' },
].sort((a, b) => b.at - a.at);

function readBody(req) {
  return new Promise((resolve) => {
    let b = '';
    req.on('data', (c) => (b += c));
    req.on('end', () => resolve(b));
  });
}

function session(req) {
  const m = /(?:^|;\s*)gv_session=([^;]+)/.exec(req.headers.cookie ?? '');
  const s = m && sessions.get(m[1]);
  return s && s.expires_at > now() ? s : null;
}

async function api(req, res, url) {
  const p = url.pathname;
  if (p === '/v1/sessions' && req.method === 'POST') {
    let b;
    try {
      b = JSON.parse(await readBody(req));
    } catch {
      return err(res, 400, 'invalid_argument', 'bad request body');
    }
    if (b.api_key !== KEY) return err(res, 401, 'unauthenticated', 'invalid API key');
    const token = randomBytes(16).toString('hex');
    const s = { tenant: 'default', role: 'admin', key_id: 'k-mock', expires_at: now() + 12 * 3600e3 };
    sessions.set(token, s);
    return json(res, 200, s, { 'set-cookie': `gv_session=${token}; HttpOnly; SameSite=Strict; Path=/` });
  }
  const s = session(req);
  if (!s) return err(res, 401, 'unauthenticated', 'no session: log in');
  if (req.method !== 'GET' && req.headers['x-gpuvisor-csrf'] !== '1') return err(res, 403, 'permission_denied', 'missing x-gpuvisor-csrf header');
  if (p === '/v1/sessions/current') {
    if (req.method === 'DELETE') {
      sessions.delete(/gv_session=([^;]+)/.exec(req.headers.cookie)[1]);
      res.writeHead(204, { 'set-cookie': 'gv_session=; Max-Age=0; Path=/' });
      return res.end();
    }
    return json(res, 200, s);
  }
  if (p === '/v1/templates') return json(res, 200, templates);
  if (p === '/v1/instances' && req.method === 'GET') return json(res, 200, [...instances.values()]);
  if (p === '/v1/instances' && req.method === 'POST') {
    const raw = await readBody(req);
    let b;
    try {
      b = JSON.parse(raw);
    } catch {
      return err(res, 400, 'invalid_argument', 'bad request body: not JSON');
    }
    for (const f of ['memory', 'vcpus', 'container_disk', 'gpus']) {
      if (b[f] !== undefined && typeof b[f] !== 'number') {
        const col = raw.indexOf(`"${f}"`) + f.length + 3 + JSON.stringify(b[f]).length;
        return err(res, 400, 'invalid_argument', `bad request body: Failed to deserialize the JSON body into the target type: ${f}: invalid type: string ${JSON.stringify(b[f])}, expected u${f === 'vcpus' || f === 'gpus' ? 32 : 64} at line 1 column ${col}`);
      }
    }
    if (b.gpus != null && b.gpu_fraction != null) return err(res, 400, 'invalid_argument', 'give either --gpus or --gpu-fraction, not both');
    if (b.template && !templates.find((t) => t.name === b.template)) return err(res, 404, 'not_found', `template ${JSON.stringify(b.template)} not found`);
    if (b.memory != null && b.memory < 64 * 1024 ** 2) return err(res, 400, 'invalid_argument', `--memory ${b.memory}B is too small: at least 64MiB`);
    return json(res, 201, mkInstance(b, s.tenant));
  }
  let m = /^\/v1\/instances\/([^/]+)(?:\/(\w+))?$/.exec(p);
  if (m) {
    const inst = [...instances.values()].find((i) => i.id === m[1] || i.name === m[1]);
    if (!inst) return err(res, 404, 'not_found', `instance ${m[1]} not found`);
    const sub = m[2];
    if (!sub && req.method === 'GET') {
      const age = (now() - inst.created_at) / 3600e3;
      return json(res, 200, { ...inst, cost: { currency: 'USD', per_hour: inst.state === 'running' ? 0.75 : 0.01, total: age * 0.75 } });
    }
    if (!sub && req.method === 'DELETE') {
      setState(inst, 'terminating');
      setTimeout(() => {
        release(inst);
        instances.delete(inst.id);
      }, 700);
      return json(res, 200, inst);
    }
    if (sub === 'stop' && req.method === 'POST') {
      setState(inst, 'stopping');
      setTimeout(() => setState(inst, 'stopped'), 700);
      return json(res, 200, inst);
    }
    if (sub === 'start' && req.method === 'POST') {
      setState(inst, 'provisioning');
      setTimeout(() => setState(inst, 'running'), 700);
      return json(res, 200, inst);
    }
    if (sub === 'scale' && req.method === 'POST') {
      const b = JSON.parse(await readBody(req));
      if (b.vcpus) inst.vcpus = b.vcpus;
      if (b.memory) inst.memory = b.memory;
      inst.updated_at = now();
      return json(res, 200, inst);
    }
    if (sub === 'metrics') return json(res, 200, metrics(inst, url.searchParams.get('since'), url.searchParams.get('step')));
    if (sub === 'events') return json(res, 200, [{ at: inst.created_at, instance: inst.id, kind: 'created', message: 'created' }, { at: inst.updated_at, instance: inst.id, kind: 'state', message: inst.state }]);
    if (sub === 'logs') {
      const all = Array.from({ length: Math.floor((now() - inst.created_at) / 2000) }, (_, k) => `\x1b[32mline ${k}\x1b[0m: the mock instance is alive\n`).join('');
      const off = Number(url.searchParams.get('offset') ?? 0);
      return json(res, 200, { offset: off, next: all.length, data: all.slice(off) });
    }
  }
  if (p === '/v1/gpus') return json(res, 200, gpus);
  if (p === '/v1/host/checks') {
    if (s.role !== 'admin') return err(res, 403, 'permission_denied', 'host checks are for operators');
    return json(res, 200, [
      { id: 'kernel', title: 'Linux kernel', status: 'pass', detail: '6.1.0 (mock)' },
      { id: 'iommu', title: 'IOMMU enabled', status: 'warn', detail: 'no IOMMU groups (mock)', remedy: 'add intel_iommu=on to the kernel command line' },
      { id: 'nvml', title: 'NVIDIA driver (NVML)', status: 'skip', detail: 'simulated GPUs' },
    ]);
  }
  if (p === '/v1/gpus/events') {
    if (s.role !== 'admin') return err(res, 403, 'permission_denied', 'GPU events are for operators');
    const from = sinceMs(url.searchParams.get('since'), '7d');
    const which = url.searchParams.get('gpu');
    const limit = Math.min(Number(url.searchParams.get('limit') ?? 500) || 500, 500);
    return json(res, 200, gpuEvents.filter((e) => e.at >= from && (!which || e.gpu === which || String(e.index) === which)).slice(0, limit));
  }
  if (p === '/v1/gpus/stats')
    return json(res, 200, gpus.map((g) => ({ uuid: g.uuid, index: g.index, model: g.model, at: now(), util_percent: g.instances.length ? wave(now(), g.index) : 0, memory_used: g.allocated_vram / 3, memory_total: g.vram, temperature_c: 45 + g.index, power_w: 120, xid_errors: g.index === 2 ? 1 : 0, last_xid: g.index === 2 ? 79 : null, instances: g.instances.length, cordoned: g.cordoned, alarms: [], simulated: true })));
  m = /^\/v1\/gpus\/([^/]+)\/metrics$/.exec(p);
  if (m) {
    const g = gpus.find((x) => x.uuid === m[1] || String(x.index) === m[1]);
    if (!g) return err(res, 404, 'not_found', 'no such GPU');
    return json(res, 200, gpuMetrics(g, url.searchParams.get('since'), url.searchParams.get('step')));
  }
  m = /^\/v1\/gpus\/([^/]+)\/cordon$/.exec(p);
  if (m) {
    const g = gpus.find((x) => x.uuid === m[1]);
    if (!g) return err(res, 404, 'not_found', 'no such GPU');
    g.cordoned = req.method === 'POST' ? JSON.parse((await readBody(req)) || '{}').reason || 'operator' : null;
    return json(res, 200, g);
  }
  if (p === '/v1/usage') {
    const lines = [...instances.values()].flatMap((i) => [
      { tenant: i.tenant, subject: 'instance', id: i.id, name: i.name, resource: 'gpu', seconds: 3600, unit_seconds: 900, unit_price: 2, cost: 0.5, model: 'A100-80GB', milli: 250 },
      { tenant: i.tenant, subject: 'instance', id: i.id, name: i.name, resource: 'vcpu', seconds: 3600, unit_seconds: 3600, unit_price: 0.02, cost: 0.02 },
    ]);
    lines.push({ tenant: 'research', subject: 'volume', id: 'data', name: 'data', resource: 'volume', seconds: 86400, unit_seconds: 86400 * 10, unit_price: 0.0001, cost: 0.024 });
    return json(res, 200, { from: now() - 30 * 86400e3, to: now(), currency: 'USD', lines, total_cost: lines.reduce((a, l) => a + l.cost, 0) });
  }
  if (p === '/v1/endpoints') {
    const stats = { window_s: 300, completed: 42, failed: 2, timed_out: 1, cancelled: 0, per_minute: 9, delay_ms: { n: 45, p50: 850, p95: 4200, p99: 9100, max: 12500 }, execution_ms: { n: 45, p50: 12300, p95: 125000, p99: 130000, max: 131000 } };
    const idle = { window_s: 300, completed: 0, failed: 0, timed_out: 0, cancelled: 0, per_minute: 0 };
    return json(res, 200, [
      { id: 'ep-1', name: 'sdxl', tenant: 'default', created_at: now() - 3600e3, template: 'small', path: '/v2/ep-1', workers_min: 0, workers_max: 3, health: { jobs: { completed: Math.floor(now() / 10000) % 1000, failed: 2, inProgress: 1, inQueue: 4, retried: 0 }, workers: { idle: 1, running: 1, initializing: 0, ready: 2, parked: 0, throttled: 0, unhealthy: 0 } }, stats },
      { id: 'ep-2', name: 'whisper', tenant: 'default', created_at: now() - 600e3, template: 'small', path: '/v2/ep-2', workers_min: 0, workers_max: 1, health: { jobs: { completed: 0, failed: 0, inProgress: 0, inQueue: 0, retried: 0 }, workers: { idle: 0, running: 0, initializing: 0, ready: 0, parked: 1, throttled: 0, unhealthy: 0 } }, stats: idle },
    ]);
  }
  return err(res, 404, 'not_found', `no route ${req.method} ${p}`);
}

// --- WebSockets (RFC 6455, enough for small messages) ---------------------------------------
function wsAccept(req, socket) {
  const key = req.headers['sec-websocket-key'];
  const accept = createHash('sha1').update(key + '258EAFA5-E914-47DA-95CA-C5AB0DC85B11').digest('base64');
  socket.write(`HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ${accept}\r\n\r\n`);
  const send = (op, payload) => {
    const len = payload.length;
    let head;
    if (len < 126) head = Buffer.from([0x80 | op, len]);
    else if (len < 65536) head = Buffer.from([0x80 | op, 126, len >> 8, len & 255]);
    else {
      head = Buffer.alloc(10);
      head[0] = 0x80 | op;
      head[1] = 127;
      head.writeBigUInt64BE(BigInt(len), 2);
    }
    socket.write(Buffer.concat([head, payload]));
  };
  const handlers = { message: () => {}, close: () => {} };
  let buf = Buffer.alloc(0);
  socket.on('data', (d) => {
    buf = Buffer.concat([buf, d]);
    for (;;) {
      if (buf.length < 2) return;
      const op = buf[0] & 15;
      let len = buf[1] & 127;
      let off = 2;
      if (len === 126) {
        len = buf.readUInt16BE(2);
        off = 4;
      } else if (len === 127) {
        len = Number(buf.readBigUInt64BE(2));
        off = 10;
      }
      const masked = buf[1] & 128;
      const mask = masked ? buf.subarray(off, off + 4) : null;
      if (masked) off += 4;
      if (buf.length < off + len) return;
      const payload = Buffer.from(buf.subarray(off, off + len));
      if (mask) for (let i = 0; i < payload.length; i++) payload[i] ^= mask[i & 3];
      buf = buf.subarray(off + len);
      if (op === 8) {
        send(8, Buffer.alloc(0));
        socket.end();
        handlers.close();
        return;
      }
      if (op === 9) send(10, payload);
      else if (op === 1) handlers.message(payload.toString('utf8'), false);
      else if (op === 2) handlers.message(payload, true);
    }
  });
  socket.on('close', () => handlers.close());
  socket.on('error', () => {});
  return {
    on: (ev, f) => (handlers[ev] = f),
    text: (s) => send(1, Buffer.from(s)),
    binary: (b) => send(2, b),
    close: (code = 1000, reason = '') => {
      const r = Buffer.from(reason);
      send(8, Buffer.concat([Buffer.from([code >> 8, code & 255]), r]));
      socket.end();
    },
  };
}

function upgrade(req, socket) {
  const url = new URL(req.url, 'http://x');
  const m = /^\/v1\/instances\/([^/]+)\/(exec|console|vnc|metrics)\/ws$/.exec(url.pathname);
  const refuse = (code, msg) => {
    socket.end(`HTTP/1.1 ${code} ${msg}\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n`);
  };
  if (!m) return refuse(404, 'Not Found');
  if (!session(req)) return refuse(401, 'Unauthorized');
  if (req.headers.origin && new URL(req.headers.origin).host !== req.headers.host) return refuse(403, 'Forbidden');
  const inst = instances.get(m[1]);
  if (m[2] === 'metrics') return inst ? metricsStream(wsAccept(req, socket), req, inst, url) : refuse(404, 'Not Found');
  if (!inst || inst.state !== 'running') return refuse(409, 'Conflict');
  if (m[2] === 'vnc' && (inst.runtime !== 'vm' || process.env.MOCK_NO_VNC)) return refuse(404, 'Not Found');
  const ws = wsAccept(req, socket);
  if (m[2] === 'vnc') return rfb(ws);
  const out = (s) => ws.binary(Buffer.concat([Buffer.from([1]), Buffer.from(s)]));
  if (m[2] === 'console') {
    if (inst.runtime !== 'vm') return ws.close();
    const prompt = () => out('\r\n\r\nDebian GNU/Linux 12 vm-mock ttyS0\r\n\r\nvm-mock login: ');
    setTimeout(prompt, 300);
    ws.on('message', (d, bin) => {
      if (bin && d[0] === 0 && d.includes(13)) prompt();
    });
    return;
  }
  const req0 = JSON.parse(url.searchParams.get('request') ?? '{}');
  if (!req0.tty || !Array.isArray(req0.command)) return ws.close();
  let line = '';
  out('/ # ');
  ws.on('message', (d, bin) => {
    if (!bin) {
      const c = JSON.parse(d);
      if (c.type === 'resize' && !(c.rows > 0 && c.cols > 0)) ws.close();
      return;
    }
    if (d[0] !== 0) return;
    for (const ch of d.subarray(1).toString('utf8')) {
      if (ch === '\r') {
        out('\r\n');
        const cmd = line.trim();
        line = '';
        if (cmd === 'exit') {
          ws.text(JSON.stringify({ type: 'exit', exit_code: 0 }));
          return ws.close();
        }
        if (cmd.startsWith('echo ')) out(cmd.slice(5) + '\r\n');
        else if (cmd) out(`sh: ${cmd.split(' ')[0]}: not found\r\n`);
        out('/ # ');
      } else if (ch === '\x7f') {
        if (line) {
          line = line.slice(0, -1);
          out('\b \b');
        }
      } else {
        line += ch;
        out(ch);
      }
    }
  });
}

/** An instance's metrics stream: the points since `since` (default 10 s back), then every second
 * each history's points from the newest one sent (that bucket again). Closes 1000 when the
 * instance is gone, 1008 when the session that opened it ended. */
function metricsStream(ws, req, inst, url) {
  const step = url.searchParams.get('step') ?? '1s';
  const since = url.searchParams.get('since') ?? '10s';
  const devs = [...new Set(inst.gpus.map((b) => b.uuid))].map((u) => gpus.find((g) => g.uuid === u));
  const last = new Map();
  const from = (key) => (last.has(key) ? String(last.get(key)) : since);
  const tick = () => {
    if (!instances.has(inst.id)) {
      clearInterval(timer);
      return ws.close(1000, 'the instance was terminated');
    }
    if (!session(req)) {
      clearInterval(timer);
      return ws.close(1008, 'the session that opened the stream ended');
    }
    const histories = [metrics(inst, from('i'), step, '10s'), ...devs.map((g) => gpuMetrics(g, from(g.uuid), step, '10s'))];
    for (const h of histories) {
      const t = Math.max(0, ...h.series.map((x) => x.points.at(-1)?.t ?? 0));
      if (t) last.set(h.kind === 'instance' ? 'i' : h.id, t);
    }
    ws.text(JSON.stringify({ at: now(), histories }));
  };
  const timer = setInterval(tick, 1000);
  ws.on('close', () => clearInterval(timer));
  tick();
}

/** A VNC server of one grey gradient screen: RFB 3.8, no authentication, raw encoding. */
function rfb(ws) {
  const W = 320;
  const H = 200;
  let stage = 'version';
  let buf = Buffer.alloc(0);
  ws.binary(Buffer.from('RFB 003.008\n'));
  const frame = () => {
    const px = Buffer.alloc(W * H * 4);
    for (let y = 0; y < H; y++)
      for (let x = 0; x < W; x++) {
        const v = (x + y + (Date.now() >> 6)) & 255;
        px.fill(v, (y * W + x) * 4, (y * W + x) * 4 + 3);
      }
    const head = Buffer.alloc(16);
    head.writeUInt16BE(1, 2);
    head.writeUInt16BE(W, 8);
    head.writeUInt16BE(H, 10);
    ws.binary(Buffer.concat([head, px]));
  };
  ws.on('message', (d, bin) => {
    if (!bin) return;
    buf = Buffer.concat([buf, d]);
    for (;;) {
      if (stage === 'version') {
        if (buf.length < 12) return;
        buf = buf.subarray(12);
        ws.binary(Buffer.from([1, 1]));
        stage = 'security';
      } else if (stage === 'security') {
        if (buf.length < 1) return;
        buf = buf.subarray(1);
        ws.binary(Buffer.from([0, 0, 0, 0]));
        stage = 'init';
      } else if (stage === 'init') {
        if (buf.length < 1) return;
        buf = buf.subarray(1);
        const name = Buffer.from('vm-mock');
        const si = Buffer.alloc(24);
        si.writeUInt16BE(W, 0);
        si.writeUInt16BE(H, 2);
        Buffer.from([32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0]).copy(si, 4);
        si.writeUInt32BE(name.length, 20);
        ws.binary(Buffer.concat([si, name]));
        stage = 'normal';
      } else {
        if (buf.length < 1) return;
        const t = buf[0];
        let need = { 0: 20, 3: 10, 4: 8, 5: 6 }[t];
        if (t === 2) need = buf.length >= 4 ? 4 + 4 * buf.readUInt16BE(2) : Infinity;
        if (t === 6) need = buf.length >= 8 ? 8 + buf.readUInt32BE(4) : Infinity;
        if (need === undefined) {
          buf = Buffer.alloc(0);
          return;
        }
        if (buf.length < need) return;
        buf = buf.subarray(need);
        if (t === 3) setTimeout(frame, 100);
      }
    }
  });
}

const server = createServer(async (req, res) => {
  const url = new URL(req.url, 'http://x');
  try {
    if (url.pathname.startsWith('/v1/')) return await api(req, res, url);
    const file = url.pathname === '/' ? 'index.html' : url.pathname.startsWith('/assets/') ? url.pathname.slice(1) : null;
    const path = file && join(DIST, file);
    if (!path || !path.startsWith(DIST) || !existsSync(path)) {
      res.writeHead(404, { 'content-type': 'text/plain' });
      return res.end('not found');
    }
    res.writeHead(200, {
      'content-type': MIME[extname(path)] ?? 'application/octet-stream',
      'content-security-policy': CSP,
      'x-content-type-options': 'nosniff',
      'cache-control': file === 'index.html' ? 'no-cache' : 'public, max-age=31536000, immutable',
    });
    res.end(readFileSync(path));
  } catch (e) {
    err(res, 500, 'internal', String(e));
  }
});
server.on('upgrade', upgrade);
server.listen(PORT, '127.0.0.1', () => {
  console.log(`mock daemon on http://127.0.0.1:${PORT}/  (API key ${KEY}; VM ${vm.id})`);
});
