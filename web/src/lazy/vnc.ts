// The graphical console of a VM: noVNC's RFB client over the daemon's VNC WebSocket.
import RFB from '@novnc/novnc';

export interface VncHandle {
  dispose(): void;
}

export function openVnc(
  el: HTMLElement,
  url: string,
  onStatus: (s: 'connecting' | 'connected' | 'disconnected' | 'error', detail?: string) => void,
): VncHandle {
  onStatus('connecting');
  const rfb = new RFB(el, url, {});
  rfb.scaleViewport = true;
  rfb.resizeSession = false;
  rfb.background = '#101418';
  let connected = false;
  let ended = false;
  rfb.addEventListener('connect', () => {
    connected = true;
    onStatus('connected');
  });
  rfb.addEventListener('disconnect', (e: CustomEvent<{ clean: boolean }>) => {
    ended = true;
    onStatus(connected || e.detail?.clean ? 'disconnected' : 'error', connected ? undefined : 'the VNC endpoint did not answer');
  });
  rfb.addEventListener('securityfailure', (e: CustomEvent<{ reason?: string }>) => onStatus('error', e.detail?.reason ?? 'security failure'));
  rfb.addEventListener('credentialsrequired', () => onStatus('error', 'the VNC server asks for credentials'));
  return {
    dispose() {
      if (ended) return;
      try {
        rfb.disconnect();
      } catch {
        /* already */
      }
    },
  };
}
