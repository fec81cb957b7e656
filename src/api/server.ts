/**
 * The HTTP API on a unix socket (mode 0600: only the owner may drive the network).
 *
 * Every error leaves as `{ "code": "STABLE_CODE", "message": "..." }` with a 4xx status
 * for anything the client did (bad JSON, schema violations, unknown routes, conflicts); a
 * 500 would mean a bug, and the handler below logs it with the stack.
 */
import { chmodSync, existsSync, lstatSync, unlinkSync } from 'node:fs';
import fastifySwagger from '@fastify/swagger';
import type { TypeBoxTypeProvider } from '@fastify/type-provider-typebox';
import Fastify, { type FastifyError, type FastifyInstance } from 'fastify';
import { ERRORS, TenderError } from '../errors.js';
import type { Logger } from '../log.js';

export type Api = FastifyInstance<any, any, any, any, TypeBoxTypeProvider>;

export interface ApiOptions {
  log?: Logger;
  title: string;
}

/** Create the fastify instance with the error handling and OpenAPI document in place. */
export async function createApi(o: ApiOptions): Promise<Api> {
  const app = Fastify({
    // Requests are logged at info; the API's own logger keeps warnings and errors only.
    loggerInstance: o.log?.child({ component: 'api' }, { level: 'warn' }),
    bodyLimit: 64 * 1024,
    ajv: { customOptions: { removeAdditional: false, coerceTypes: false, allErrors: false } },
  }).withTypeProvider<TypeBoxTypeProvider>();

  await app.register(fastifySwagger, {
    openapi: {
      openapi: '3.1.0',
      info: { title: o.title, version: '1' },
    },
  });

  app.setErrorHandler((err: FastifyError | TenderError | Error, req, reply) => {
    const coded = err as { code?: string; statusCode?: number; validation?: unknown };
    if (err instanceof TenderError) {
      return reply.status(err.status).send({ code: err.code, message: err.message });
    }
    if (typeof coded.code === 'string' && coded.code in ERRORS) {
      const e = ERRORS[coded.code as keyof typeof ERRORS];
      return reply.status(e.status).send({ code: coded.code, message: err.message });
    }
    if (coded.validation) {
      return reply.status(400).send({ code: 'BAD_REQUEST', message: err.message });
    }
    const status = coded.statusCode ?? 500;
    if (status >= 400 && status < 500) {
      const code =
        status === 413 ? 'PAYLOAD_TOO_LARGE' : status === 415 ? 'UNSUPPORTED_MEDIA_TYPE' : status === 404 ? 'NOT_FOUND' : 'BAD_REQUEST';
      return reply.status(status).send({ code, message: err.message });
    }
    req.log.error({ err }, 'internal error');
    return reply.status(500).send({ code: 'INTERNAL', message: 'internal error; see the log' });
  });
  app.setNotFoundHandler((req, reply) => {
    reply.status(404).send({ code: 'NOT_FOUND', message: `no route ${req.method} ${req.url}` });
  });
  // gvisor-tap-vsock's documented usage is `curl -X POST -d '{...}'`, which labels the body
  // application/x-www-form-urlencoded: every body is JSON here, whatever its label says.
  app.addContentTypeParser('*', { parseAs: 'string' }, (req, body, done) => {
    try {
      done(null, body === '' ? undefined : JSON.parse(body as string));
    } catch (err) {
      (err as { statusCode?: number }).statusCode = 400;
      done(err as Error, undefined);
    }
  });
  app.get('/openapi.json', { schema: { hide: true } }, async () => app.swagger());
  return app;
}

/** Listen on a unix socket path, replacing a stale socket, with mode 0600. */
export async function listenUnix(app: Api, path: string): Promise<void> {
  if (existsSync(path)) {
    if (!lstatSync(path).isSocket()) throw new TenderError('BAD_ARGUMENT', `${path} exists and is not a socket`);
    unlinkSync(path);
  }
  const old = process.umask(0o177);
  try {
    await app.listen({ path });
  } finally {
    process.umask(old);
  }
  chmodSync(path, 0o600);
}
