import { render } from 'preact';
import { useEffect, useState } from 'preact/hooks';
import './styles.css';
import { api, errorMessage, setUnauthorizedHandler } from './api';
import { href, navigate, useRoute } from './router';
import type { Session } from './types';
import { Login } from './pages/Login';
import { Instances } from './pages/Instances';
import { InstancePage } from './pages/InstancePage';
import { Gpus } from './pages/Gpus';
import { Endpoints } from './pages/Endpoints';
import { Usage } from './pages/Usage';
import { Loading } from './ui';

function App() {
  const route = useRoute();
  // undefined: not known yet; null: logged out.
  const [session, setSession] = useState<Session | null | undefined>(undefined);
  const [bootError, setBootError] = useState<string | null>(null);

  useEffect(() => {
    setUnauthorizedHandler(() => setSession(null));
    api<Session>('/v1/sessions/current', { quiet401: true })
      .then(setSession)
      .catch((e) => {
        if (e?.status !== 401) setBootError(errorMessage(e));
        setSession(null);
      });
  }, []);

  // The session ends at its expiry: back to the login page then.
  useEffect(() => {
    if (!session) return;
    const left = session.expires_at - Date.now();
    if (left <= 0) {
      setSession(null);
      return;
    }
    const t = setTimeout(() => setSession(null), Math.min(left, 2 ** 31 - 1));
    return () => clearTimeout(t);
  }, [session]);

  useEffect(() => {
    if (session === null && route.page !== 'login') navigate(href.login);
    else if (session && (route.page === 'login' || route.page === '')) navigate(href.instances);
  }, [session, route.page]);

  useEffect(() => {
    const names: Record<string, string> = {
      login: 'Log in',
      instances: route.params[0] ? `Instance ${route.params[0]}` : 'Instances',
      gpus: 'GPUs',
      endpoints: 'Endpoints',
      usage: 'Usage',
    };
    document.title = `${names[route.page] ?? 'gpuvisor'} · gpuvisor console`;
  }, [route.page, route.params[0]]);

  if (session === undefined) {
    return (
      <main id="main" class="content">
        <Loading />
      </main>
    );
  }
  if (session === null) {
    return (
      <main id="main" class="content narrow">
        <Login onLogin={setSession} notice={bootError} />
      </main>
    );
  }

  const logout = async () => {
    try {
      await api('/v1/sessions/current', { method: 'DELETE', quiet401: true });
    } catch {
      /* gone already */
    }
    setSession(null);
  };

  let page;
  switch (route.page) {
    case 'instances':
      page = route.params[0] ? (
        <InstancePage key={route.params[0]} id={route.params[0]} session={session} />
      ) : (
        <Instances session={session} />
      );
      break;
    case 'gpus':
      page = <Gpus session={session} />;
      break;
    case 'endpoints':
      page = <Endpoints />;
      break;
    case 'usage':
      page = <Usage session={session} />;
      break;
    default:
      page = <Loading />;
  }
  const link = (to: string, label: string, active: boolean) => (
    <li>
      <a href={to} aria-current={active ? 'page' : undefined}>
        {label}
      </a>
    </li>
  );
  return (
    <>
      <a class="skip" href="#main" onClick={(e) => { e.preventDefault(); document.getElementById('main')?.focus(); }}>
        Skip to content
      </a>
      <header class="top">
        <span class="brand">gpuvisor</span>
        <nav aria-label="Main">
          <ul>
            {link(href.instances, 'Instances', route.page === 'instances')}
            {session.role === 'admin' && link(href.gpus, 'GPUs', route.page === 'gpus')}
            {link(href.endpoints, 'Endpoints', route.page === 'endpoints')}
            {link(href.usage, 'Usage', route.page === 'usage')}
          </ul>
        </nav>
        <span class="who" data-testid="who">
          {session.tenant} · {session.role}
        </span>
        <button type="button" class="secondary" onClick={logout} data-testid="logout">
          Log out
        </button>
      </header>
      <main id="main" class="content" tabIndex={-1}>
        {page}
      </main>
    </>
  );
}

render(<App />, document.getElementById('app')!);
