/**
 * USB routes under /v1/usb: devices (host and virtual), virtual devices, attach and detach,
 * sharing (bind/unbind) for `usb serve` clients, auto-attach rules, and the USB/IP upgrade
 * that carries a `tender usb serve` client's connection to the daemon's server.
 */
import type { IncomingMessage } from 'node:http';
import type { Duplex } from 'node:stream';
import { Type } from '@sinclair/typebox';
import type { UsbManager } from '../daemon/usb.js';
import type { Api } from './server.js';

// A virtual id or name, a busid ("1-2.3.4"), or a VID:PID: short printable strings.
const DeviceString = Type.String({ minLength: 1, maxLength: 64, pattern: '^[\\x21-\\x7e]+$' });
const Dev = Type.Object({ device: DeviceString });
const MachineName = Type.String({ minLength: 1, maxLength: 253 });

export function registerUsbRoutes(app: Api, usb: UsbManager): void {
  app.get('/v1/usb/devices', { schema: { tags: ['usb'] } }, async () => usb.list());

  app.post(
    '/v1/usb/virtual',
    {
      schema: {
        tags: ['usb'],
        body: Type.Union([
          Type.Object(
            {
              kind: Type.Literal('storage'),
              image: Type.String({ minLength: 1, maxLength: 4096 }),
              readOnly: Type.Optional(Type.Boolean()),
              name: Type.Optional(Type.String({ maxLength: 64 })),
            },
            { additionalProperties: false },
          ),
          Type.Object(
            {
              kind: Type.Literal('serial'),
              // sun_path holds 108 bytes on Linux, 104 on macOS.
              socket: Type.String({ minLength: 1, maxLength: 4096 }),
              name: Type.Optional(Type.String({ maxLength: 64 })),
            },
            { additionalProperties: false },
          ),
        ]),
      },
    },
    async (req, reply) => {
      const b = req.body;
      const d = b.kind === 'serial' ? await usb.addSerial({ socket: b.socket, name: b.name }) : await usb.addStorage({ image: b.image, readOnly: b.readOnly ?? false, name: b.name });
      return reply.status(201).send(d);
    },
  );

  app.delete('/v1/usb/virtual/:device', { schema: { tags: ['usb'], params: Dev } }, async (req, reply) => {
    await usb.removeDevice(req.params.device);
    return reply.status(204).send();
  });

  const Attach = Type.Object({ machine: MachineName, device: DeviceString, auto: Type.Optional(Type.Boolean()) }, { additionalProperties: false });
  const Detach = Type.Object({ machine: MachineName, device: DeviceString }, { additionalProperties: false });
  app.post('/v1/usb/attach', { schema: { tags: ['usb'], body: Attach } }, async (req) => usb.attach(req.body.machine, req.body.device, { auto: req.body.auto ?? false }));
  app.post('/v1/usb/detach', { schema: { tags: ['usb'], body: Detach } }, async (req, reply) => {
    await usb.detach(req.body.machine, req.body.device);
    return reply.status(204).send();
  });

  const Bind = Type.Object({ device: DeviceString }, { additionalProperties: false });
  app.post('/v1/usb/bind', { schema: { tags: ['usb'], body: Bind } }, async (req) => usb.bind(req.body.device));
  app.post('/v1/usb/unbind', { schema: { tags: ['usb'], body: Bind } }, async (req, reply) => {
    await usb.unbind(req.body.device);
    return reply.status(204).send();
  });

  app.get('/v1/usb/policies', { schema: { tags: ['usb'] } }, async () => usb.listPolicies());
  const Policy = Type.Object({ machine: MachineName, match: DeviceString }, { additionalProperties: false });
  app.post('/v1/usb/policies', { schema: { tags: ['usb'], body: Policy } }, async (req, reply) => reply.status(201).send(await usb.addPolicy(req.body.machine, req.body.match)));
  app.delete('/v1/usb/policies/:id', { schema: { tags: ['usb'], params: Type.Object({ id: Type.String({ minLength: 1, maxLength: 32 }) }) } }, async (req, reply) => {
    usb.removePolicy(req.params.id);
    return reply.status(204).send();
  });

  // The daemon's own listener for shared devices (config.json usb.serve), if any.
  app.get('/v1/usb/serve', { schema: { tags: ['usb'] } }, async () => usb.serving());
}

/** The request that `handleUsbUpgrade` takes: `GET /v1/usb/serve` with `Upgrade: tender-usbip`. */
export function isUsbUpgrade(req: IncomingMessage): boolean {
  return req.method === 'GET' && /^\/v1\/usb\/serve(\?.*)?$/.test(req.url ?? '') && String(req.headers.upgrade).toLowerCase() === 'tender-usbip';
}

/**
 * After the 101, the connection carries plain USB/IP (OP_REQ_DEVLIST or OP_REQ_IMPORT, then
 * URBs) to the shared devices only: `tender usb serve` relays its TCP clients through here, so
 * the devices stay with the daemon (one owner for each host device and virtual backend).
 */
export function handleUsbUpgrade(usb: UsbManager, sock: Duplex, head: Buffer): void {
  sock.write('HTTP/1.1 101 Switching Protocols\r\nUpgrade: tender-usbip\r\nConnection: Upgrade\r\n\r\n');
  if (head.length > 0) sock.unshift(head);
  usb.serveShared(sock);
}
