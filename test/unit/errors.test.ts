import { readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { ERRORS } from '../../src/errors.js';

describe('error codes', () => {
  const doc = readFileSync(new URL('../../docs/errors.md', import.meta.url), 'utf8');
  const rows = new Map<string, { exit: number; status: number }>();
  for (const m of doc.matchAll(/^\| `([A-Z_]+)` \| (\d+) \| (\d+) \|/gm)) rows.set(m[1]!, { exit: Number(m[2]), status: Number(m[3]) });

  it('documents every code with its exit and HTTP status', () => {
    for (const [code, e] of Object.entries(ERRORS)) {
      expect(rows.get(code), `${code} missing from docs/errors.md`).toEqual({ exit: e.exit, status: e.status });
    }
  });

  it('documents no code that does not exist', () => {
    for (const code of rows.keys()) expect(ERRORS).toHaveProperty(code);
  });
});
