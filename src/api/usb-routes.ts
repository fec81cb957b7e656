/** USB routes under /v1/usb: devices, virtual devices, attach and detach. */
import { Type } from '@sinclair/typebox';
import type { UsbManager } from '../daemon/usb.js';
import type { Api } from './server.js';

const Dev = Type.Object({ device: Type.String({ minLength: 1, maxLength: 64 }) });

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

  const Attach = Type.Object({ machine: Type.String({ minLength: 1, maxLength: 253 }), device: Type.String({ minLength: 1, maxLength: 64 }) }, { additionalProperties: false });
  app.post('/v1/usb/attach', { schema: { tags: ['usb'], body: Attach } }, async (req) => usb.attach(req.body.machine, req.body.device));
  app.post('/v1/usb/detach', { schema: { tags: ['usb'], body: Attach } }, async (req, reply) => {
    await usb.detach(req.body.machine, req.body.device);
    return reply.status(204).send();
  });
}
