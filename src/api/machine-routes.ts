/**
 * Machine routes under /v1/machines, the event stream, and machine forwards. Long operations
 * (start with its image build and boot wait) stream progress as NDJSON when the client asks
 * for `application/x-ndjson`: `{"progress": "..."}` lines, then `{"result": ...}` or
 * `{"error": {"code", "message"}}`.
 */
import { Type } from '@sinclair/typebox';
import { createReadStream, existsSync, statSync, watch } from 'node:fs';
import { TenderError } from '../errors.js';
import type { EventBus } from '../daemon/events.js';
import { parseNet } from '../daemon/machine-config.js';
import type { MachineManager } from '../daemon/machines.js';
import type { Api } from './server.js';

// Names are checked by the manager, so a bad one gets BAD_MACHINE_NAME (or MACHINE_NOT_FOUND)
// rather than a generic schema error.
const AnyName = Type.String({ minLength: 1, maxLength: 253 });
const Name = Type.Object({ name: AnyName });

const Create = Type.Object(
  {
    name: AnyName,
    cpus: Type.Optional(Type.Integer({ minimum: 1, maximum: 64 })),
    memoryMiB: Type.Optional(Type.Integer({ minimum: 64, maximum: 1024 * 1024 })),
    image: Type.Optional(Type.String({ maxLength: 4096 })),
    kernel: Type.Optional(Type.String({ maxLength: 4096 })),
    initrd: Type.Optional(Type.String({ maxLength: 4096 })),
    disk: Type.Optional(Type.String({ maxLength: 4096 })),
    net: Type.Optional(Type.String({ maxLength: 40 })),
    forwards: Type.Optional(Type.Array(Type.String({ maxLength: 200 }), { maxItems: 256 })),
    accel: Type.Optional(Type.Union([Type.Literal('auto'), Type.Literal('kvm'), Type.Literal('tcg')])),
    autoForward: Type.Optional(Type.Boolean()),
    agent: Type.Optional(Type.Union([Type.Literal('serial'), Type.Literal('vsock')])),
  },
  { additionalProperties: false },
);

function wantsStream(accept: string | undefined): boolean {
  return (accept ?? '').includes('application/x-ndjson');
}

export function registerMachineRoutes(app: Api, m: MachineManager, events: EventBus): void {
  app.get('/v1/machines', { schema: { tags: ['machines'] } }, async () => m.list());

  app.post('/v1/machines', { schema: { tags: ['machines'], body: Create } }, async (req, reply) => {
    const b = req.body;
    const info = m.create({ ...b, net: b.net ? parseNet(b.net) : undefined });
    return reply.status(201).send(info);
  });

  app.get('/v1/machines/:name', { schema: { tags: ['machines'], params: Name } }, async (req) => m.inspect(req.params.name));

  app.patch(
    '/v1/machines/:name',
    { schema: { tags: ['machines'], params: Name, body: Type.Object({ settings: Type.Array(Type.String({ maxLength: 100 }), { minItems: 1, maxItems: 20 }) }, { additionalProperties: false }) } },
    async (req) => m.set(req.params.name, req.body.settings),
  );

  app.delete(
    '/v1/machines/:name',
    { schema: { tags: ['machines'], params: Name, querystring: Type.Object({ force: Type.Optional(Type.String({ enum: ['true', 'false', '1', '0'] })) }) } },
    async (req, reply) => {
      await m.remove(req.params.name, { force: req.query.force === 'true' || req.query.force === '1' });
      return reply.status(204).send();
    },
  );

  const Lifecycle = Type.Object({ wait: Type.Optional(Type.Boolean()), force: Type.Optional(Type.Boolean()) }, { additionalProperties: false });
  for (const action of ['start', 'stop', 'restart'] as const) {
    app.post(`/v1/machines/:name/${action}`, { schema: { tags: ['machines'], params: Name, body: Type.Optional(Lifecycle) } }, async (req, reply) => {
      const body = req.body ?? {};
      const run = (onProgress?: (msg: string) => void) =>
        action === 'start'
          ? m.start(req.params.name, { wait: body.wait !== false, onProgress })
          : action === 'stop'
            ? m.stop(req.params.name, { force: body.force })
            : m.restart(req.params.name, { wait: body.wait !== false });
      if (!wantsStream(req.headers.accept)) return run();
      reply.raw.writeHead(200, { 'content-type': 'application/x-ndjson' });
      const line = (o: unknown) => reply.raw.write(JSON.stringify(o) + '\n');
      try {
        line({ result: await run((progress) => line({ progress })) });
      } catch (err) {
        const e = err as TenderError;
        line({ error: { code: e.code ?? 'INTERNAL', message: e.message } });
      }
      reply.raw.end();
      return reply;
    });
  }

  app.put(
    '/v1/machines/:name/net',
    { schema: { tags: ['machines'], params: Name, body: Type.Object({ net: Type.String({ maxLength: 40 }) }, { additionalProperties: false }) } },
    async (req) => m.setNet(req.params.name, parseNet(req.body.net)),
  );

  app.get(
    '/v1/machines/:name/logs',
    { schema: { tags: ['machines'], params: Name, querystring: Type.Object({ follow: Type.Optional(Type.String()) }) } },
    async (req, reply) => {
      const info = m.inspect(req.params.name);
      const file = `${info.dir}/serial.log`;
      if (!existsSync(file)) return reply.type('text/plain').send('');
      const follow = req.query.follow === '1' || req.query.follow === 'true';
      if (!follow) return reply.type('text/plain').send(createReadStream(file));
      // Follow: the current contents, then appended bytes as they come, until the client goes.
      reply.raw.writeHead(200, { 'content-type': 'text/plain' });
      let pos = 0;
      const pump = () => {
        const size = statSync(file).size;
        if (size <= pos) return;
        createReadStream(file, { start: pos, end: size - 1 }).on('data', (d) => reply.raw.write(d));
        pos = size;
      };
      pump();
      const w = watch(file, () => pump());
      const iv = setInterval(pump, 1000);
      req.raw.on('close', () => {
        w.close();
        clearInterval(iv);
      });
      return reply;
    },
  );

  // Forwards of machines.
  app.get('/v1/machines/:name/forwards', { schema: { tags: ['forwards'], params: Name } }, async (req) => m.listForwards(req.params.name));
  app.get('/v1/machine-forwards', { schema: { tags: ['forwards'] } }, async () => m.listForwards());
  const Spec = Type.Object({ spec: Type.String({ minLength: 1, maxLength: 200 }) }, { additionalProperties: false });
  app.post('/v1/machines/:name/forwards', { schema: { tags: ['forwards'], params: Name, body: Spec } }, async (req, reply) =>
    reply.status(201).send(await m.addForward(req.params.name, req.body.spec)),
  );
  app.delete('/v1/machines/:name/forwards', { schema: { tags: ['forwards'], params: Name, body: Spec } }, async (req, reply) => {
    m.removeForward(req.params.name, req.body.spec);
    return reply.status(204).send();
  });

  // Events as newline-delimited JSON, until the client disconnects.
  app.get('/v1/events', { schema: { tags: ['events'] } }, async (req, reply) => {
    reply.raw.writeHead(200, { 'content-type': 'application/x-ndjson' });
    const on = (e: unknown) => reply.raw.write(JSON.stringify(e) + '\n');
    events.on('event', on);
    req.raw.on('close', () => events.off('event', on));
    return reply;
  });
}
