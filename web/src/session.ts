import type { Session } from './types';

/** Roles that may change instances (viewers and metrics keys only read). */
export const canOperate = (s: Session) => s.role === 'admin' || s.role === 'tenant-admin' || s.role === 'member';
export const isAdmin = (s: Session) => s.role === 'admin';
