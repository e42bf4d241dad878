// Hash routing: the daemon serves only `/` and `/assets/*`; everything else is after the `#`.
import { useEffect, useState } from 'preact/hooks';

export interface Route {
  /** First path segment: `instances`, `gpus`, `usage`, `endpoints`, `login`. */
  page: string;
  /** Further segments (`#/instances/<id>` → [id]). */
  params: string[];
  query: URLSearchParams;
}

export function parseHash(hash: string): Route {
  const h = hash.replace(/^#\/?/, '');
  const [path, qs] = h.split('?', 2);
  const segs = path.split('/').filter(Boolean).map((s) => decodeURIComponent(s));
  return { page: segs[0] ?? '', params: segs.slice(1), query: new URLSearchParams(qs ?? '') };
}

export function useRoute(): Route {
  const [route, setRoute] = useState(() => parseHash(location.hash));
  useEffect(() => {
    const on = () => setRoute(parseHash(location.hash));
    addEventListener('hashchange', on);
    return () => removeEventListener('hashchange', on);
  }, []);
  return route;
}

export function navigate(to: string) {
  if (location.hash !== to) location.hash = to;
}

export const href = {
  instances: '#/instances',
  instance: (id: string) => `#/instances/${encodeURIComponent(id)}`,
  gpus: '#/gpus',
  endpoints: '#/endpoints',
  usage: '#/usage',
  login: '#/login',
};
