import { defineConfig } from 'vite';

// The console is served by the daemon at `/` of its API origin under a strict CSP
// (script-src 'self'; style-src 'self'): no inline script or style may end up in index.html.
export default defineConfig({
  base: '/',
  esbuild: {
    jsx: 'automatic',
    jsxImportSource: 'preact',
  },
  build: {
    outDir: 'dist',
    assetsDir: 'assets',
    emptyOutDir: true,
    // noVNC's core/util/browser.js uses top-level await.
    target: 'es2022',
    // The polyfill is an inline script; every browser the console supports has modulepreload.
    modulePreload: { polyfill: false },
    // Inlined assets become data: URLs; keep fonts/images as files (img-src allows data:, but
    // font-src does not).
    assetsInlineLimit: 0,
    cssCodeSplit: true,
    sourcemap: false,
    reportCompressedSize: false,
    chunkSizeWarningLimit: 600,
  },
  server: {
    // `npm run dev` against a running daemon: GV_DEV_API=https://127.0.0.1:7171 npm run dev
    proxy: process.env.GV_DEV_API
      ? { '/v1': { target: process.env.GV_DEV_API, secure: false, ws: true, changeOrigin: false } }
      : undefined,
  },
});
