/**
 * The daemon's API under hostile input: any JSON, wrong types, unknown routes, oversized or
 * mislabelled bodies get a 4xx with a stable code — never a 500, never a crash. In-process
 * with fastify's inject (no socket), with a stand-in VMM driver (no machine is started).
 */
import fc from 'fast-check';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { networkConfig } from '../../netstack/config.js';
import { Network } from '../../netstack/network.js';
import { registerMachineRoutes } from '../../src/api/machine-routes.js';
import { registerNetworkRoutes } from '../../src/api/network-routes.js';
import { type Api, createApi } from '../../src/api/server.js';
import { EventBus } from '../../src/daemon/events.js';
import { MachineManager } from '../../src/daemon/machines.js';
import { paths } from '../../src/daemon/paths.js';
import { ERRORS } from '../../src/errors.js';
import { createLogger } from '../../src/log.js';
import type { VmmDriver } from '../../src/vmm/driver.js';

const driver: VmmDriver = {
  name: 'none',
  commandLine: () => ({ cmd: 'false', args: [] }),
  resolveAccel: async () => ({ accel: 'tcg' }),
  start: async () => {
    throw new Error('no VMM in this test');
  },
  adopt: async () => null,
};

describe('API under hostile input', () => {
  let app: Api;
  let network: Network;
  let mm: MachineManager;
  const home = mkdtempSync(join(tmpdir(), 'tender-api-'));

  beforeAll(async () => {
    const log = createLogger('silent');
    network = new Network({ config: networkConfig({ dnsUpstreams: [{ host: '127.0.0.1', port: 9 }] }), log });
    const events = new EventBus();
    mm = new MachineManager({ paths: paths(home), network, driver, images: { resolve: async () => ({ kernel: '/dev/null' }) }, events, log });
    await mm.load();
    app = await createApi({ log, title: 'test' });
    registerNetworkRoutes(app, network, { v1Prefix: '/v1/network' });
    registerMachineRoutes(app, mm, events);
    await app.ready();
  });

  afterAll(async () => {
    await app.close();
    network.close();
    rmSync(home, { recursive: true, force: true });
  });

  const codes = new Set(Object.keys(ERRORS));
  const expectClientError = (res: { statusCode: number; body: string }) => {
    expect(res.statusCode, res.body).toBeGreaterThanOrEqual(400);
    expect(res.statusCode, res.body).toBeLessThan(500);
    const b = JSON.parse(res.body);
    expect(codes.has(b.code), b.code).toBe(true);
    expect(typeof b.message).toBe('string');
  };

  it.each([
    ['POST', '/v1/machines', '{not json'],
    ['POST', '/v1/machines', '[]'],
    ['POST', '/v1/machines', '{"name": 42}'],
    ['POST', '/v1/machines', '{"name": "Bad Name"}'],
    ['POST', '/v1/machines', '{"name": "ok", "cpus": "two"}'],
    ['POST', '/v1/machines', '{"name": "ok", "extra": true}'],
    ['POST', '/v1/machines', '{"name": "ok", "net": "wifi"}'],
    ['POST', '/v1/machines/nosuch/start', '{}'],
    ['PATCH', '/v1/machines/nosuch', '{"settings": ["cpus=1"]}'],
    ['DELETE', '/v1/machines/nosuch', undefined],
    ['GET', '/v1/machines/nosuch', undefined],
    ['POST', '/v1/machines/nosuch/forwards', '{"spec": "80"}'],
    ['PUT', '/v1/machines/nosuch/net', '{"net": "nat"}'],
    ['GET', '/v1/nothing-here', undefined],
    ['POST', '/v1/network/forwards', '{"spec": "99999:1"}'],
    ['DELETE', '/v1/network/forwards/tcp/127.0.0.1/1', undefined],
    ['POST', '/v1/network/dns/records', '{"name": "x", "address": "not-ip"}'],
    ['POST', '/services/forwarder/expose', '{"local": "nonsense", "remote": "1.2.3.4:5"}'],
    ['POST', '/services/forwarder/unexpose', '{"local": "127.0.0.1:1"}'],
  ])('%s %s %s → 4xx with a code', async (method, url, payload) => {
    const res = await app.inject({ method: method as 'GET', url, payload, headers: payload ? { 'content-type': 'application/json' } : {} });
    expectClientError(res);
  });

  it('refuses bodies over 64 KiB', async () => {
    const res = await app.inject({ method: 'POST', url: '/v1/machines', payload: JSON.stringify({ name: 'x'.repeat(70000) }), headers: { 'content-type': 'application/json' } });
    expectClientError(res);
  });

  it('never answers 5xx to arbitrary JSON on any route', async () => {
    const routes: [string, string][] = [
      ['POST', '/v1/machines'],
      ['PATCH', '/v1/machines/a'],
      ['POST', '/v1/machines/a/forwards'],
      ['PUT', '/v1/machines/a/net'],
      ['POST', '/v1/network/forwards'],
      ['POST', '/v1/network/dns/records'],
      ['POST', '/services/forwarder/expose'],
      ['POST', '/services/forwarder/unexpose'],
    ];
    await fc.assert(
      fc.asyncProperty(fc.constantFrom(...routes), fc.jsonValue(), async ([method, url], body) => {
        const res = await app.inject({ method: method as 'POST', url, payload: JSON.stringify(body), headers: { 'content-type': 'application/json' } });
        expect(res.statusCode, `${method} ${url} ${JSON.stringify(body)} → ${res.body}`).toBeLessThan(500);
      }),
      { numRuns: 300 },
    );
    // Whatever was accepted (e.g. a machine created by a valid random body) is cleaned up.
    for (const n of mm.names()) await mm.remove(n, { force: true });
  });
});
