// Prints the gzipped size of every file of dist/ and of the first load: index.html and what it
// loads before any lazy chunk (its scripts, stylesheets and modulepreloads, and their static
// imports). Fails when the first load is over the budget.
import { readFileSync, readdirSync, statSync } from 'node:fs';
import { gzipSync } from 'node:zlib';
import { join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';

const BUDGET = 300 * 1024;
const dist = fileURLToPath(new URL('../dist/', import.meta.url));
const gz = (p) => gzipSync(readFileSync(p), { level: 9 }).length;
const kb = (n) => `${(n / 1024).toFixed(1)} KB`;

const files = [];
const walk = (d) => {
  for (const f of readdirSync(d)) {
    const p = join(d, f);
    if (statSync(p).isDirectory()) walk(p);
    else files.push(p);
  }
};
walk(dist);

const html = readFileSync(join(dist, 'index.html'), 'utf8');
if (/<script(?![^>]*\bsrc=)[^>]*>/i.test(html)) {
  console.error('index.html has an inline <script>: the CSP (script-src \'self\') refuses it');
  process.exit(1);
}
if (/\sstyle=|<style/i.test(html)) {
  console.error('index.html has inline style: the CSP (style-src \'self\') refuses it');
  process.exit(1);
}
const first = new Set();
const add = (url) => {
  const p = join(dist, url.replace(/^\//, ''));
  if (first.has(p)) return;
  first.add(p);
  if (p.endsWith('.js')) {
    // Static imports of a chunk load with it; `import(` ones are lazy.
    const src = readFileSync(p, 'utf8');
    for (const m of src.matchAll(/(?:^|[;\s}])import\s*(?:[\w$*{}\s,]+from\s*)?["']\.\/([^"']+)["']/g)) add(`assets/${m[1]}`);
  }
};
add('index.html');
for (const m of html.matchAll(/(?:src|href)="(\/assets\/[^"]+)"/g)) add(m[1]);

let total = 0;
console.log('gzipped sizes of dist/:');
for (const f of files.sort()) {
  const g = gz(f);
  const tag = first.has(f) ? ' (first load)' : '';
  console.log(`  ${relative(dist, f).padEnd(48)} ${kb(statSync(f).size).padStart(10)} ${kb(g).padStart(10)} gz${tag}`);
}
for (const f of first) total += gz(f);
console.log(`first load: ${kb(total)} gzipped (budget ${kb(BUDGET)})`);
if (total > BUDGET) {
  console.error('first load over budget');
  process.exit(1);
}
