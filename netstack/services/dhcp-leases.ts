/**
 * The DHCP server's address book: which client holds which address, in what state, until
 * when. Protocol decisions (what to answer) live in dhcp.ts; this file only knows
 * addresses, clients and time.
 *
 * One record per address ever handed out, keyed both by address and by client. A record
 * outlives its lease: when an offer times out, a lease expires or the client releases it,
 * the record turns `free` but stays, so the same client gets the same address back next
 * time (RFC 2131 §4.3.1: "the client's current address ... or the client's previous
 * address"). Free records are reclaimed least-recently-freed first, and only once no
 * never-used address is left. Records are bounded by the pool size plus the static leases.
 */
import { type Ip4, type Mac, type Subnet, inSubnet, macEq, macStr, subnetBroadcast } from '../addr.js';
import type { Clock, Timer } from '../time.js';

export type LeaseState = 'offered' | 'bound' | 'free';

export interface LeaseRecord {
  /** `id:<hex client id>` or `mac:<aa:bb:..>` (RFC 2131 §4.2: client id, else chaddr). */
  key: string;
  mac: Mac;
  ip: Ip4;
  hostname: string | undefined;
  state: LeaseState;
  /** Clock ms when the offer / lease ends (meaningless when free). */
  expiresAt: number;
  /** Clock ms when the record last became free (LRU reclaim order). */
  freedAt: number;
  isStatic: boolean;
  timer: Timer;
}

export interface StaticLease {
  mac: Mac;
  ip: Ip4;
  hostname?: string;
}

export interface PoolConfig {
  subnet: Subnet;
  poolStart: Ip4;
  poolEnd: Ip4;
  /** Never handed out dynamically: the server, the router, the host alias, static leases... */
  excluded: Set<Ip4>;
  staticLeases: StaticLease[];
}

export class LeaseTable {
  private readonly byIp = new Map<Ip4, LeaseRecord>();
  private readonly byKey = new Map<string, LeaseRecord>();
  /** Declined addresses (RFC 2131 §4.3.3) and the clock ms until which they stay unused. */
  private readonly declined = new Map<Ip4, number>();
  private readonly staticByMac = new Map<string, StaticLease>();
  /** Where the scan for a never-used address resumes, so filling the pool stays linear. */
  private cursor: Ip4;

  /** Called when a record leaves `bound` because its time ran out. */
  onExpire: ((r: LeaseRecord) => void) | null = null;

  constructor(private readonly cfg: PoolConfig, private readonly clock: Clock) {
    this.cursor = cfg.poolStart;
    for (const s of cfg.staticLeases) this.staticByMac.set(macStr(s.mac), s);
  }

  staticFor(mac: Mac): StaticLease | undefined {
    return this.staticByMac.get(macStr(mac));
  }

  byClient(key: string): LeaseRecord | undefined {
    return this.byKey.get(key);
  }

  byAddress(ip: Ip4): LeaseRecord | undefined {
    return this.byIp.get(ip);
  }

  /** Records currently bound, for the API and DNS. */
  bound(): LeaseRecord[] {
    const out: LeaseRecord[] = [];
    for (const r of this.byIp.values()) if (r.state === 'bound') out.push(r);
    return out.sort((a, b) => a.ip - b.ip);
  }

  /** Offered or bound records of hardware address `mac` under client keys other than `key`. */
  othersOfMac(mac: Mac, key: string): number {
    let n = 0;
    for (const r of this.byIp.values()) {
      if (r.state !== 'free' && r.key !== key && macEq(r.mac, mac)) n++;
    }
    return n;
  }

  isDeclined(ip: Ip4): boolean {
    const until = this.declined.get(ip);
    if (until === undefined) return false;
    if (until > this.clock.now()) return true;
    this.declined.delete(ip);
    return false;
  }

  /** In the dynamic pool and not excluded (ignores who holds it). */
  inPool(ip: Ip4): boolean {
    const c = this.cfg;
    if (ip < c.poolStart || ip > c.poolEnd) return false;
    if (!inSubnet(c.subnet, ip) || ip === c.subnet.network || ip === subnetBroadcast(c.subnet)) return false;
    return !c.excluded.has(ip);
  }

  /**
   * May `key` (with hardware address `mac`) have `ip`? True for its own static address, or
   * a pool address that nobody else holds (a free record of another client may be taken:
   * RFC 2131 lets the server reuse any address not currently allocated).
   */
  available(ip: Ip4, key: string, mac: Mac): boolean {
    const st = this.staticFor(mac);
    if (st) return st.ip === ip;
    if (!this.inPool(ip) || this.isDeclined(ip)) return false;
    const r = this.byIp.get(ip);
    return !r || r.key === key || r.state === 'free';
  }

  /** A never-used pool address, else the least recently freed record's; null when full. */
  pickFree(): Ip4 | null {
    const { poolStart, poolEnd } = this.cfg;
    if (poolEnd < poolStart) return null;
    const size = poolEnd - poolStart + 1;
    let ip = this.cursor;
    for (let n = 0; n < size; n++, ip = ip >= poolEnd ? poolStart : ip + 1) {
      if (!this.byIp.has(ip) && this.inPool(ip) && !this.isDeclined(ip)) {
        this.cursor = ip >= poolEnd ? poolStart : ip + 1;
        return ip;
      }
    }
    let best: LeaseRecord | null = null;
    for (const r of this.byIp.values()) {
      if (r.state !== 'free' || r.isStatic || this.isDeclined(r.ip) || !this.inPool(r.ip)) continue;
      if (!best || r.freedAt < best.freedAt) best = r;
    }
    return best ? best.ip : null;
  }

  /**
   * Give `ip` to `key` in `state` for `ms`. Detaches the client from any other address it
   * held, and any other client (necessarily `free`, see `available`) from this address.
   */
  assign(key: string, mac: Mac, ip: Ip4, state: 'offered' | 'bound', ms: number, hostname?: string): LeaseRecord {
    const mine = this.byKey.get(key);
    if (mine && mine.ip !== ip) this.drop(mine);
    const other = this.byIp.get(ip);
    if (other && other.key !== key) this.drop(other);
    let r = this.byIp.get(ip);
    if (!r) {
      const rec: LeaseRecord = {
        key, mac: mac.slice(0, 6), ip, hostname, state, expiresAt: 0, freedAt: 0,
        isStatic: this.staticFor(mac)?.ip === ip,
        timer: this.clock.timer(() => this.timeout(rec)),
      };
      r = rec;
      this.byIp.set(ip, r);
      this.byKey.set(key, r);
    }
    r.mac = mac.slice(0, 6);
    if (hostname !== undefined) r.hostname = hostname;
    r.state = state;
    r.expiresAt = this.clock.now() + ms;
    r.timer.armAt(r.expiresAt);
    return r;
  }

  /** Back to free, remembered for the same client (RELEASE, offer taken elsewhere). */
  free(r: LeaseRecord): void {
    r.state = 'free';
    r.freedAt = this.clock.now();
    r.timer.cancel();
  }

  /** Forget the record and keep the address out of use for `ms` (DECLINE). */
  decline(r: LeaseRecord, ms: number): void {
    this.drop(r);
    this.declined.set(r.ip, this.clock.now() + ms);
  }

  private drop(r: LeaseRecord): void {
    r.timer.cancel();
    if (this.byIp.get(r.ip) === r) this.byIp.delete(r.ip);
    if (this.byKey.get(r.key) === r) this.byKey.delete(r.key);
  }

  private timeout(r: LeaseRecord): void {
    const wasBound = r.state === 'bound';
    this.free(r);
    if (wasBound) this.onExpire?.(r);
  }
}
