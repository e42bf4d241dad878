import { useEffect, useState } from 'preact/hooks';
import { ApiError, errorMessage, get, post } from '../api';
import { fmtBytes, parsePort, parseSize, parseVolume, shellSplit, splitList } from '../format';
import type { Instance, Template } from '../types';

/** The form's fields, by the name of the request field each one sets. */
const FIELDS = [
  'name',
  'template',
  'image',
  'runtime',
  'gpus',
  'gpu_fraction',
  'vcpus',
  'memory',
  'container_disk',
  'volumes',
  'env',
  'ports',
  'command',
] as const;
type Field = (typeof FIELDS)[number];
type Values = Record<Field, string>;

const EMPTY: Values = Object.fromEntries(FIELDS.map((f) => [f, ''])) as Values;

/** How each field is named in the API's messages: its JSON name (`memory: invalid type`),
 * the CLI flag the engine's checks quote (`--memory 1MiB is too small`), or the words. */
const MENTIONS: [Field, RegExp][] = [
  ['gpu_fraction', /gpu_fraction|--gpu-fraction|\bfraction\b/i],
  ['gpus', /\bgpus\b|--gpus\b/i],
  ['vcpus', /\bvcpus\b|--vcpus\b|\bvcpu\b/i],
  ['memory', /(?<![\w-])(--)?memory\b/i],
  ['container_disk', /container_disk|--container-disk|\bdisk\b/i],
  ['volumes', /\bvolumes?\b|--volume\b/i],
  ['env', /\benv\b|--env\b|\benvironment\b/i],
  ['ports', /\bports?\b|--port\b/i],
  ['command', /\bcommand\b/i],
  ['template', /\btemplate\b/i],
  ['runtime', /\bruntime\b|--runtime\b/i],
  ['image', /\bimage\b/i],
  ['name', /\bname\b/i],
];

/** The field an API error message is about: the one it names first; null when it names none. */
export function fieldOf(message: string): Field | null {
  // A body the API could not decode names the JSON path after "target type: ".
  const m = /target type: ([a-z_]+)/.exec(message);
  if (m && (FIELDS as readonly string[]).includes(m[1])) return m[1] as Field;
  let best: Field | null = null;
  let at = Infinity;
  for (const [f, re] of MENTIONS) {
    const r = re.exec(message);
    if (r && r.index < at) {
      at = r.index;
      best = f;
    }
  }
  return best;
}

const int = (s: string) => (/^\s*\d+\s*$/.test(s) ? Number(s) : s.trim());
const num = (s: string) => (s.trim() !== '' && isFinite(Number(s)) ? Number(s) : s.trim());

/** The request body. What does not parse is sent as typed, so that the API's own message
 * says what is wrong with it. */
export function createBody(v: Values): Record<string, unknown> {
  const b: Record<string, unknown> = {};
  if (v.name.trim()) b.name = v.name.trim();
  if (v.template) b.template = v.template;
  if (v.image.trim()) b.image = v.image.trim();
  if (v.runtime) b.runtime = v.runtime;
  if (v.gpus.trim()) b.gpus = int(v.gpus);
  if (v.gpu_fraction.trim()) b.gpu_fraction = num(v.gpu_fraction);
  if (v.vcpus.trim()) b.vcpus = int(v.vcpus);
  if (v.memory.trim()) b.memory = parseSize(v.memory) ?? v.memory.trim();
  if (v.container_disk.trim()) b.container_disk = parseSize(v.container_disk) ?? v.container_disk.trim();
  const vols = splitList(v.volumes);
  if (vols.length) b.volumes = vols.map((x) => parseVolume(x) ?? x);
  const env = splitList(v.env, false);
  if (env.length) b.env = env;
  const ports = splitList(v.ports.replace(/\s+/g, ','));
  if (ports.length) b.ports = ports.map((x) => parsePort(x) ?? x);
  if (v.command.trim()) b.command = shellSplit(v.command);
  return b;
}

export function CreateForm(props: { onCreated: (i: Instance) => void; onCancel: () => void }) {
  const [v, setV] = useState<Values>(EMPTY);
  const [templates, setTemplates] = useState<Template[]>([]);
  const [errors, setErrors] = useState<Partial<Record<Field, string>>>({});
  const [formError, setFormError] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);

  useEffect(() => {
    get<Template[]>('/v1/templates')
      .then((t) => setTemplates(t.sort((a, b) => a.name.localeCompare(b.name))))
      .catch((e) => setFormError(`templates: ${errorMessage(e)}`));
  }, []);

  const tpl = templates.find((t) => t.name === v.template);
  const set = (f: Field) => (e: Event) => setV({ ...v, [f]: (e.target as HTMLInputElement).value });

  const submit = async (e: Event) => {
    e.preventDefault();
    setBusy(true);
    setErrors({});
    setFormError(null);
    try {
      const inst = await post<Instance>('/v1/instances', createBody(v));
      setV(EMPTY);
      props.onCreated(inst);
    } catch (err) {
      const msg = err instanceof ApiError ? err.message : errorMessage(err);
      const f = err instanceof ApiError ? fieldOf(msg) : null;
      if (f) {
        setErrors({ [f]: msg });
        requestAnimationFrame(() => document.getElementById(`cf-${f}`)?.focus());
      } else setFormError(msg);
    } finally {
      setBusy(false);
    }
  };

  const hint = (f: Field): string | undefined => {
    if (!tpl) return undefined;
    switch (f) {
      case 'image': return tpl.image;
      case 'gpus': return tpl.gpus != null ? String(tpl.gpus) : undefined;
      case 'gpu_fraction': return tpl.gpu_fraction != null ? String(tpl.gpu_fraction) : undefined;
      case 'vcpus': return tpl.vcpus != null ? String(tpl.vcpus) : undefined;
      case 'memory': return tpl.memory != null ? fmtBytes(tpl.memory).replace(' ', '') : undefined;
      case 'container_disk': return tpl.container_disk != null ? fmtBytes(tpl.container_disk).replace(' ', '') : undefined;
      case 'command': return tpl.command?.join(' ') || undefined;
      default: return undefined;
    }
  };

  const field = (f: Field, label: string, opts: { placeholder?: string; help?: string; area?: boolean; inputMode?: string } = {}) => {
    const err = errors[f];
    const ids = [err ? `cf-${f}-error` : '', opts.help ? `cf-${f}-help` : ''].filter(Boolean).join(' ') || undefined;
    const common = {
      id: `cf-${f}`,
      name: f,
      value: v[f],
      onInput: set(f),
      placeholder: hint(f) ?? opts.placeholder,
      'aria-invalid': err ? true : undefined,
      'aria-describedby': ids,
      'data-testid': `field-${f}`,
    };
    return (
      <div class={`field${err ? ' invalid' : ''}`}>
        <label for={`cf-${f}`}>{label}</label>
        {opts.area ? <textarea rows={2} {...common} /> : <input type="text" inputMode={opts.inputMode as any} {...common} />}
        {opts.help && (
          <small id={`cf-${f}-help`} class="muted">
            {opts.help}
          </small>
        )}
        {err && (
          <p id={`cf-${f}-error`} class="error field-error" data-testid={`error-${f}`}>
            {err}
          </p>
        )}
      </div>
    );
  };

  return (
    <form class="card create-form" onSubmit={submit} aria-labelledby="create-title" data-testid="create-form" noValidate>
      <h2 id="create-title">Create an instance</h2>
      {formError && (
        <p class="error" role="alert" data-testid="form-error">
          {formError}
        </p>
      )}
      {Object.keys(errors).length > 0 && (
        <p class="visually-hidden" role="alert">
          {Object.values(errors).join(' ')}
        </p>
      )}
      <div class="form-grid">
        <div class={`field${errors.template ? ' invalid' : ''}`}>
          <label for="cf-template">Template</label>
          <select id="cf-template" name="template" value={v.template} onChange={set('template')} data-testid="field-template"
            aria-invalid={errors.template ? true : undefined} aria-describedby={errors.template ? 'cf-template-error' : undefined}>
            <option value="">No template</option>
            {templates.map((t) => (
              <option key={t.name} value={t.name}>
                {t.name}
                {t.description ? ` — ${t.description}` : ''}
              </option>
            ))}
          </select>
          {errors.template && <p id="cf-template-error" class="error field-error" data-testid="error-template">{errors.template}</p>}
        </div>
        {field('name', 'Name', { placeholder: 'optional' })}
        {field('image', 'Image', { placeholder: 'busybox', help: 'Needed without a template.' })}
        <div class={`field${errors.runtime ? ' invalid' : ''}`}>
          <label for="cf-runtime">Runtime</label>
          <select id="cf-runtime" name="runtime" value={v.runtime} onChange={set('runtime')} data-testid="field-runtime"
            aria-invalid={errors.runtime ? true : undefined} aria-describedby={errors.runtime ? 'cf-runtime-error' : undefined}>
            <option value="">{tpl?.runtime ? `Template's (${tpl.runtime})` : 'Default (container)'}</option>
            <option value="container">Container</option>
            <option value="vm">VM</option>
          </select>
          {errors.runtime && <p id="cf-runtime-error" class="error field-error" data-testid="error-runtime">{errors.runtime}</p>}
        </div>
        {field('gpus', 'Whole GPUs', { placeholder: 'none', inputMode: 'numeric' })}
        {field('gpu_fraction', 'GPU fraction', { placeholder: 'e.g. 0.25', help: 'Instead of whole GPUs: a share of one GPU.', inputMode: 'decimal' })}
        {field('vcpus', 'vCPUs', { placeholder: '1', inputMode: 'numeric' })}
        {field('memory', 'Memory', { placeholder: '1GiB', help: 'e.g. 512MiB, 4GiB' })}
        {field('container_disk', 'Disk', { placeholder: '10GiB' })}
        {field('volumes', 'Volume', { placeholder: 'NAME:/path[:SIZE]', help: 'One per line, e.g. work:/workspace:1GiB' , area: true})}
        {field('env', 'Environment', { placeholder: 'KEY=VALUE', help: 'One KEY=VALUE per line.', area: true })}
        {field('ports', 'Ports', { placeholder: '8888/http, 22/tcp', help: 'PORT[/PROTOCOL][:public], separated by commas.' })}
        {field('command', 'Startup command', { placeholder: "sh -c 'sleep infinity'", help: "The image's command if empty." })}
      </div>
      <div class="buttons">
        <button type="submit" disabled={busy} data-testid="create-submit">
          {busy ? 'Creating…' : 'Create'}
        </button>
        <button type="button" class="secondary" onClick={props.onCancel}>
          Cancel
        </button>
      </div>
    </form>
  );
}
