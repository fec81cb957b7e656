/** The process logger: pino, to stderr, so stdout stays for command output. */
import { pino, type Logger } from 'pino';

export type { Logger };

export function createLogger(level = process.env.TENDER_LOG ?? 'info'): Logger {
  return pino({ level, base: undefined, timestamp: pino.stdTimeFunctions.isoTime }, pino.destination(2));
}
