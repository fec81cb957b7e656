/**
 * vfkit's REST control API (doc/usage.md "RESTful API"), served on a unix socket given as
 * `--restful-uri unix:///abs/path`:
 *   GET  /vm/state  → {"state": "VirtualMachineStateRunning", "canStart", "canPause", "canResume", "canStop", "canHardStop"}
 *   POST /vm/state  {"state": "Stop" | "HardStop" | "Pause" | "Resume"} → 202 Accepted (errors: 400/500 {"error"})
 *   GET  /vm/inspect → {"cpus", "memory", "devices"}
 * "Stop" asks the guest to stop (VZVirtualMachine requestStop: a power-button press);
 * "HardStop" ends the VM at once (macOS 12+).
 */
import * as http from 'node:http';

export type VfkitStateChange = 'Stop' | 'HardStop' | 'Pause' | 'Resume';

export interface VfkitVmState {
  state: string;
  canStart?: boolean;
  canPause?: boolean;
  canResume?: boolean;
  canStop?: boolean;
  canHardStop?: boolean;
}

export class VfkitRestError extends Error {
  constructor(
    readonly status: number,
    message: string,
  ) {
    super(message);
    this.name = 'VfkitRestError';
  }
}

/** `--restful-uri` for a socket path: vfkit wants the path in the URI's path, no host. */
export function restfulUri(socketPath: string): string {
  return `unix://${socketPath.startsWith('/') ? '' : '/'}${socketPath}`;
}

export class VfkitRest {
  constructor(
    readonly socketPath: string,
    private readonly timeoutMs = 5000,
  ) {}

  getState(): Promise<VfkitVmState> {
    return this.request('GET', '/vm/state') as Promise<VfkitVmState>;
  }

  async setState(state: VfkitStateChange): Promise<void> {
    await this.request('POST', '/vm/state', { state });
  }

  inspect(): Promise<unknown> {
    return this.request('GET', '/vm/inspect');
  }

  private request(method: string, path: string, body?: unknown): Promise<unknown> {
    const payload = body === undefined ? undefined : JSON.stringify(body);
    return new Promise((resolve, reject) => {
      const req = http.request(
        {
          socketPath: this.socketPath,
          method,
          path,
          headers: payload ? { 'content-type': 'application/json', 'content-length': Buffer.byteLength(payload) } : {},
          timeout: this.timeoutMs,
        },
        (res) => {
          let text = '';
          res.setEncoding('utf8');
          res.on('data', (s: string) => {
            if (text.length < 1 << 20) text += s;
          });
          res.on('end', () => {
            const status = res.statusCode ?? 0;
            let json: unknown = undefined;
            try {
              json = text ? JSON.parse(text) : undefined;
            } catch {
              // not JSON (202 has an empty body)
            }
            if (status < 200 || status >= 300) {
              const msg = (json as { error?: string } | undefined)?.error ?? (text.trim() || `HTTP ${status}`);
              reject(new VfkitRestError(status, `vfkit ${method} ${path}: ${msg}`));
            } else resolve(json);
          });
          res.on('error', reject);
        },
      );
      req.on('timeout', () => req.destroy(new Error(`vfkit ${method} ${path}: no answer within ${this.timeoutMs} ms`)));
      req.on('error', reject);
      req.end(payload);
    });
  }
}
