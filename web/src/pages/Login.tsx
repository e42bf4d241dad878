import { useState } from 'preact/hooks';
import { api, errorMessage } from '../api';
import type { Session } from '../types';
import { ErrorText } from '../ui';

export function Login(props: { onLogin: (s: Session) => void; notice?: string | null }) {
  const [key, setKey] = useState('');
  const [error, setError] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);

  const submit = async (e: Event) => {
    e.preventDefault();
    setBusy(true);
    setError(null);
    try {
      const s = await api<Session>('/v1/sessions', { method: 'POST', body: { api_key: key.trim() }, quiet401: true });
      setKey('');
      props.onLogin(s);
    } catch (err) {
      setError(errorMessage(err));
    } finally {
      setBusy(false);
    }
  };

  return (
    <section class="card login" aria-labelledby="login-title">
      <h1 id="login-title">gpuvisor console</h1>
      <p class="muted">Log in with an API key. The key is exchanged for a session cookie and not kept by the page.</p>
      {props.notice && <p class="error">{props.notice}</p>}
      <form onSubmit={submit} data-testid="login-form">
        <div class="field">
          <label for="api-key">API key</label>
          <input
            id="api-key"
            name="api_key"
            type="password"
            autocomplete="off"
            spellcheck={false}
            placeholder="gv_…"
            required
            value={key}
            onInput={(e) => setKey((e.target as HTMLInputElement).value)}
          />
        </div>
        <ErrorText error={error} testid="login-error" />
        <button type="submit" disabled={busy || !key.trim()}>
          {busy ? 'Logging in…' : 'Log in'}
        </button>
      </form>
    </section>
  );
}
