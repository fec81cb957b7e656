/**
 * The native TCP offload (native/src/tcp_offload.cc) with real bytes, no root and no TAP: a
 * FrameIO in datagram-socket mode over one end of a unix SOCK_DGRAM socketpair plays tender's
 * link, a second FrameIO on the other end plays the guest (it writes guest frames and reads
 * what the offload sends towards the guest), and a unix SOCK_STREAM socketpair plays the host
 * socket: one end is adopted (the offload duplicates it; the test keeps it as the engine
 * would), the other end is the host peer the test reads and writes.
 *
 * Every guest frame is followed by a sentinel (an experimental EtherType to the gateway MAC,
 * which the offload never takes): datagrams are read in order, so once the sentinel reached
 * onFrames the fate of everything before it is known — consumed (absent from onFrames, or
 * marked OFFLOADED) or delivered unchanged. The exit callback releases at once, as the
 * engine's TcpOffloader does, and the log records exits and delivered frames in call order.
 *
 * Two bugs this file found are regression tests now (a trusted frame's IPv4 header checksum,
 * an RTT sample from a tsecr ahead of our clock). TCP_OFFLOAD_FUZZ_RUNS=N runs the two
 * properties longer.
 */
import { closeSync, readSync, writeSync } from 'node:fs';
import { constants } from 'node:os';
import fc from 'fast-check';
import { afterEach, describe, expect, it } from 'vitest';
import { ip4, type Ip4, readIp4 } from '../../netstack/addr.js';
import { checksum } from '../../netstack/wire/checksum.js';
import { ETH_HLEN, EtherType, writeEthernetHeader } from '../../netstack/wire/ethernet.js';
import { IPV4_HLEN, IpProto } from '../../netstack/wire/ipv4.js';
import { emitTcp, newTcpRepr, parseTcp, readU32, type TcpRepr, tcpChecksumOk, tcpHeaderLen, TcpFlag, writeU32 } from '../../netstack/wire/tcp.js';
import { binding, FrameIO, offloadExitNames, sendSome, socketpair } from '../../native/index.js';
import { GUEST_MAC, GW_MAC, fixIpv4Checksum, ipv4Frame } from '../helpers/frames.js';
import { EXIT_REASONS, OFFLOAD_PARAM, OFFLOAD_STATE } from '../../netstack/tcp/offload.js';

// ---- layouts (native/src/tcp_offload.h, mirrored by netstack/tcp/offload.ts) ----

const P = OFFLOAD_PARAM;
const S = OFFLOAD_STATE;
type ParamName = Exclude<keyof typeof P, 'COUNT'>;

const EXITS = offloadExitNames();
const X = Object.fromEntries(EXITS.map((n, i) => [n, i])) as Record<string, number>;
/** offloadStats: flows, rx/tx segments, rx/tx payload bytes, rx/tx frame bytes, exits. */
const ST = { FLOWS: 0, RX_SEGS: 1, TX_SEGS: 2, RX_BYTES: 3, TX_BYTES: 4, RX_FRAME_BYTES: 5, TX_FRAME_BYTES: 6, EXITS: 7 } as const;

// ---- the connection every test adopts ----

const GUEST_IP = ip4('192.168.127.2');
const REMOTE_IP = ip4('192.168.127.254');
const GUEST_PORT = 40000;
const REMOTE_PORT = 5000;
const RCV_NXT = 0xfffffff0; // the guest's next byte: wraps within the first test's bytes
const SND_UNA = 0x7ffffff0;
const SND_WSCALE = 7;
const GUEST_WINDOW = 502; // the guest's window field; sndWnd = 502 << 7
const RCV_WND_FIELD = 1000;
const TS_RECENT = 7000; // the guest's last tsval
const TS_NOW = 100_000; // our clock at adoption
const SLOT = 2048;
const SENTINEL_TYPE = 0x88b5; // local experimental EtherType
const SENTINEL_MAGIC = new Uint8Array(Buffer.from('tender-offload-test-sentinel'));

function defaults(): Record<ParamName, number> {
  return {
    GUEST_IP, REMOTE_IP, GUEST_PORT, REMOTE_PORT,
    RCV_NXT, SND_UNA, SND_NXT: SND_UNA, SND_WND: GUEST_WINDOW << SND_WSCALE, SND_WL1: RCV_NXT, SND_WL2: SND_UNA,
    SND_WSCALE, RCV_WSCALE: 7, RCV_WND_FIELD,
    TS_OK: 1, TS_RECENT, TS_NOW, LAST_ACK_SENT: RCV_NXT,
    MSS: 1448, CWND: 1 << 20, RTO_MS: 200, DELACK_MS: 40, ACK_OWED: 0, TTL: 64, SMALL_MAX: 512, MAX_AGE_MS: 60_000,
  };
}

function params(o: Partial<Record<ParamName, number>>): Uint32Array {
  const p = new Uint32Array(binding().OFFLOAD_PARAMS);
  for (const [k, v] of Object.entries({ ...defaults(), ...o })) p[P[k as ParamName]] = v >>> 0;
  return p;
}

const u32 = (n: number): number => n >>> 0;

// ---- frames ----

interface SegOpts {
  seq: number;
  ack: number;
  flags?: number;
  window?: number;
  ts?: { val: number; ecr: number } | null;
  payload?: Uint8Array;
  srcMac?: Uint8Array;
  dstMac?: Uint8Array;
  src?: Ip4;
  dst?: Ip4;
  sport?: number;
  dport?: number;
}

/** A guest segment as Linux builds it: DF, TTL 64, options NOP NOP TS when timestamps are on. */
function guestSeg(o: SegOpts): Uint8Array {
  const r: TcpRepr = newTcpRepr();
  r.srcPort = o.sport ?? GUEST_PORT;
  r.dstPort = o.dport ?? REMOTE_PORT;
  r.seq = u32(o.seq);
  r.ack = u32(o.ack);
  r.flags = o.flags ?? (o.payload?.length ? TcpFlag.ACK | TcpFlag.PSH : TcpFlag.ACK);
  r.window = o.window ?? GUEST_WINDOW;
  if (o.ts) {
    r.tsPresent = true;
    r.tsval = u32(o.ts.val);
    r.tsecr = u32(o.ts.ecr);
  }
  const payload = o.payload ?? new Uint8Array(0);
  const src = o.src ?? GUEST_IP;
  const dst = o.dst ?? REMOTE_IP;
  const t = new Uint8Array(tcpHeaderLen(r) + payload.length);
  emitTcp(r, payload, t, 0, src, dst);
  return ipv4Frame(o.dstMac ?? GW_MAC, o.srcMac ?? GUEST_MAC, { src, dst, protocol: IpProto.TCP, ttl: 64, ident: 0x4242, dontFragment: true }, t);
}

/** What a frame towards the guest says, with every check the guest's kernel would make. */
interface OutSeg {
  dstMac: string;
  srcMac: string;
  ipChecksumOk: boolean;
  tcpChecksumOk: boolean;
  src: Ip4;
  dst: Ip4;
  ttl: number;
  tcp: TcpRepr;
  optionBytes: number[];
  payload: Uint8Array;
}

function parseOut(f: Uint8Array): OutSeg {
  expect((f[12]! << 8) | f[13]!).toBe(EtherType.IPv4);
  const ip = f.subarray(ETH_HLEN);
  expect(ip[0]).toBe(0x45);
  const tot = (ip[2]! << 8) | ip[3]!;
  expect(ETH_HLEN + tot).toBe(f.length);
  const src = readIp4(ip, 12);
  const dst = readIp4(ip, 16);
  const seg = ip.subarray(IPV4_HLEN, tot);
  const tcp = parseTcp(seg);
  expect(tcp).not.toBeNull();
  return {
    dstMac: hexOf(f.subarray(0, 6)),
    srcMac: hexOf(f.subarray(6, 12)),
    ipChecksumOk: checksum(ip, 0, IPV4_HLEN) === 0,
    tcpChecksumOk: tcpChecksumOk(seg, src, dst),
    src,
    dst,
    ttl: ip[8]!,
    tcp: tcp!,
    optionBytes: [...seg.subarray(20, tcp!.headerLen)],
    payload: seg.slice(tcp!.headerLen),
  };
}

const hexOf = (b: Uint8Array): string => Buffer.from(b).toString('hex');
const bytes = (s: string): Uint8Array => new Uint8Array(Buffer.from(s));

/** The payload the offload would see in a frame: IPv4 total length and TCP data offset. */
function framePayload(f: Uint8Array): Uint8Array {
  const tot = (f[ETH_HLEN + 2]! << 8) | f[ETH_HLEN + 3]!;
  const hl = (f[ETH_HLEN + IPV4_HLEN + 12]! >> 4) * 4;
  return f.slice(ETH_HLEN + IPV4_HLEN + hl, ETH_HLEN + tot);
}

// ---- the rig ----

function isSentinel(f: Uint8Array): boolean {
  if (f.length < 14 + SENTINEL_MAGIC.length + 4 || ((f[12]! << 8) | f[13]!) !== SENTINEL_TYPE) return false;
  return hexOf(f.subarray(14, 14 + SENTINEL_MAGIC.length)) === hexOf(SENTINEL_MAGIC);
}

type LogEntry = { kind: 'exit'; id: number } | { kind: 'frame'; bytes: Uint8Array };
interface Released {
  state: Uint32Array;
  sent: Uint8Array;
  unsent: Uint8Array;
}

const cleanups: (() => void)[] = [];
afterEach(() => {
  for (const c of cleanups.splice(0).reverse()) {
    try {
      c();
    } catch {
      /* already closed by the test */
    }
  }
});

async function until<T>(f: () => T, what: string, ms = 3000): Promise<NonNullable<T>> {
  const end = Date.now() + ms;
  for (;;) {
    const v = f();
    if (v) return v as NonNullable<T>;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 1));
  }
}

class Rig {
  readonly tender: FrameIO;
  readonly guest: FrameIO;
  /** Exits and frames delivered to onFrames (sentinels excluded), in call order. */
  readonly log: LogEntry[] = [];
  /** Frames the offload sent towards the guest. */
  readonly toGuest: Uint8Array[] = [];
  readonly released = new Map<number, Released>();
  offloadedMarks = 0;
  /** Called after the release in onExit. */
  exitHook: ((id: number) => void) | null = null;
  readonly errors: Error[] = [];
  private sentinels = 0;
  private sentinelSeen = 0;
  private readonly stateBuf = new Uint32Array(binding().OFFLOAD_STATE);
  private readonly dataBuf = new Uint8Array(2 * 65536);

  /** `vnet`: 10 to read guest frames behind a virtio-net header, as on a TAP with IFF_VNET_HDR
   * (in socket mode the frames towards the guest still go out without one). */
  constructor(readonly vnet = 0) {
    const [t, g] = socketpair('dgram');
    this.tender = new FrameIO({
      fd: t,
      socket: true,
      slots: 16,
      slotSize: SLOT,
      onFrames: (buf, n, lens) => {
        for (let i = 0; i < n; i++) {
          const len = lens[i]!;
          if (len === FrameIO.OFFLOADED) {
            this.offloadedMarks++;
            continue;
          }
          const f = buf.slice(i * SLOT, i * SLOT + len);
          if (isSentinel(f.subarray(this.vnet))) this.sentinelSeen = readU32(f, this.vnet + 14 + SENTINEL_MAGIC.length);
          else this.log.push({ kind: 'frame', bytes: f });
        }
      },
      onError: (e) => {
        this.errors.push(e);
      },
    });
    this.guest = new FrameIO({
      fd: g,
      socket: true,
      slots: 16,
      slotSize: SLOT,
      onFrames: (buf, n, lens) => {
        for (let i = 0; i < n; i++) this.toGuest.push(buf.slice(i * SLOT, i * SLOT + lens[i]!));
      },
      onError: (e) => {
        this.errors.push(e);
      },
    });
    cleanups.push(() => this.tender.close(), () => this.guest.close());
    this.tender.offloadEnable(GW_MAC, vnet, (id) => {
      this.log.push({ kind: 'exit', id });
      // As the engine does (TcpOffloader.exited -> reclaim): release inside the callback.
      this.release(id);
      this.exitHook?.(id);
    });
  }

  /** Release `id` and keep what came back; false when there was no such flow. */
  release(id: number): boolean {
    if (!this.tender.offloadRelease(id, this.stateBuf, this.dataBuf)) return false;
    const st = this.stateBuf.slice();
    const s = st[S.SENT_LEN]!;
    const u = st[S.UNSENT_LEN]!;
    this.released.set(id, { state: st, sent: this.dataBuf.slice(0, s), unsent: this.dataBuf.slice(s, s + u) });
    return true;
  }

  adopt(id: number, o: Partial<Record<ParamName, number>> = {}, sent: Uint8Array = new Uint8Array(0)): Flow {
    const [engineFd, peerFd] = socketpair('stream');
    const flow = new Flow(this, id, engineFd, peerFd);
    cleanups.push(() => flow.closeFds());
    const p = params({ SND_NXT: (o.SND_UNA ?? SND_UNA) + sent.length, ...o });
    expect(this.tender.offloadAdopt(id, engineFd, p, GUEST_MAC, sent)).toBe(0);
    return flow;
  }

  /** Write one frame as the guest. */
  send(f: Uint8Array): void {
    const n = this.guest.writeBatch(f, Uint32Array.of(0), Uint32Array.of(f.length), 1);
    expect(n).toBe(1);
  }

  /** Wait until every frame written so far went through tender's read path. */
  async settle(): Promise<void> {
    const mark = ++this.sentinels;
    const f = new Uint8Array(this.vnet + 60);
    writeEthernetHeader(f, this.vnet, GW_MAC, GUEST_MAC, SENTINEL_TYPE);
    f.set(SENTINEL_MAGIC, this.vnet + 14);
    writeU32(f, this.vnet + 14 + SENTINEL_MAGIC.length, mark);
    this.send(f);
    await until(() => this.sentinelSeen >= mark, `sentinel ${mark}`);
  }

  /** Send `f` and report whether tender's engine side got it (unchanged) or the offload kept it. */
  async offer(f: Uint8Array): Promise<'delivered' | 'consumed'> {
    const before = this.log.length;
    this.send(f);
    await this.settle();
    const frames = this.log.slice(before).filter((e) => e.kind === 'frame');
    if (frames.length === 0) return 'consumed';
    expect(frames).toHaveLength(1);
    expect(hexOf((frames[0] as { bytes: Uint8Array }).bytes)).toBe(hexOf(f));
    return 'delivered';
  }

  exits(): number[] {
    return this.log.flatMap((e) => (e.kind === 'exit' ? [e.id] : []));
  }

  stats(): Float64Array {
    const s = new Float64Array(7 + EXITS.length);
    this.tender.offloadStats(s);
    return s;
  }

  /** The next frame towards the guest after index `from`. */
  async nextToGuest(from: number): Promise<OutSeg> {
    await until(() => this.toGuest.length > from, 'a frame towards the guest');
    return parseOut(this.toGuest[from]!);
  }
}

class Flow {
  private peerOpen = true;
  /** Bookkeeping for tests: guest bytes the host should have. */
  hostBytes = 0;
  constructor(
    readonly rig: Rig,
    readonly id: number,
    /** The engine's own descriptor of the host socket (the offload holds a duplicate). */
    readonly engineFd: number,
    /** The host peer. */
    readonly peerFd: number,
  ) {}

  /** Host peer writes. */
  hostWrite(b: Uint8Array): void {
    expect(writeSync(this.peerFd, b)).toBe(b.length);
  }

  /** What the host peer has received so far (non-blocking). */
  hostRead(fd = this.peerFd): Uint8Array {
    const out: Buffer[] = [];
    const buf = Buffer.alloc(65536);
    for (;;) {
      let n: number;
      try {
        n = readSync(fd, buf);
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code === 'EAGAIN') break;
        throw e;
      }
      if (n === 0) break;
      out.push(Buffer.from(buf.subarray(0, n)));
    }
    return new Uint8Array(Buffer.concat(out));
  }

  closePeer(): void {
    this.peerOpen = false;
    closeSync(this.peerFd);
  }

  closeFds(): void {
    closeSync(this.engineFd);
    if (this.peerOpen) closeSync(this.peerFd);
  }
}

/** Waits for the exit of `id` and returns what its release gave back. */
async function exitOf(rig: Rig, id: number): Promise<Released> {
  await until(() => rig.exits().includes(id), `exit of flow ${id}`);
  return rig.released.get(id)!;
}

function reasonOf(r: Released): string {
  return EXITS[r.state[S.REASON]!]!;
}

// -------------------------------------------------------------------------------------------

describe('TCP offload over a datagram socket, real bytes', () => {
  it('exposes its layouts as the engine mirrors them', () => {
    expect(binding().OFFLOAD_PARAMS).toBe(P.COUNT);
    expect(binding().OFFLOAD_STATE).toBe(S.COUNT);
    expect(EXITS).toEqual(['released', 'segment', 'host_eof', 'host_error', 'host_full', 'window', 'bulk', 'rto', 'device_full', 'max_age']);
    expect([...EXIT_REASONS]).toEqual(EXITS);
  });

  it('guest data goes to the host socket; host bytes come back as one checked segment carrying the ACK (TS on)', async () => {
    const rig = new Rig();
    // Delayed ACK and RTO far away: the reply must carry the ACK, nothing may time out here.
    const fl = rig.adopt(1, { DELACK_MS: 10_000, RTO_MS: 10_000 });

    // 1. One byte, ACK|PSH, NOP NOP TS: consumed, and on the host socket.
    const req = guestSeg({ seq: RCV_NXT, ack: SND_UNA, payload: bytes('q'), ts: { val: TS_RECENT + 1, ecr: TS_NOW } });
    expect([...req.subarray(ETH_HLEN + IPV4_HLEN + 20, ETH_HLEN + IPV4_HLEN + 24)]).toEqual([1, 1, 8, 10]);
    expect(await rig.offer(req)).toBe('consumed');
    expect(Buffer.from(fl.hostRead()).toString()).toBe('q');
    expect(rig.toGuest).toHaveLength(0); // the ACK is owed, not sent yet
    // The segment and the sentinel came in one recvmmsg batch: JS saw the segment's slot
    // marked OFFLOADED.
    expect(rig.offloadedMarks).toBe(1);

    // 2. The host answers: one segment towards the guest.
    fl.hostWrite(bytes('hello'));
    const out = await rig.nextToGuest(0);
    expect(out.dstMac).toBe(hexOf(GUEST_MAC));
    expect(out.srcMac).toBe(hexOf(GW_MAC));
    expect(out.ipChecksumOk).toBe(true);
    expect(out.tcpChecksumOk).toBe(true);
    expect(out.src).toBe(REMOTE_IP);
    expect(out.dst).toBe(GUEST_IP);
    expect(out.ttl).toBe(64);
    expect(out.tcp.srcPort).toBe(REMOTE_PORT);
    expect(out.tcp.dstPort).toBe(GUEST_PORT);
    expect(out.tcp.seq).toBe(SND_UNA);
    expect(out.tcp.ack).toBe(u32(RCV_NXT + 1));
    expect(out.tcp.flags).toBe(TcpFlag.ACK | TcpFlag.PSH);
    expect(out.tcp.window).toBe(RCV_WND_FIELD);
    expect(out.optionBytes.slice(0, 4)).toEqual([1, 1, 8, 10]);
    expect(out.tcp.tsPresent).toBe(true);
    expect(out.tcp.tsecr).toBe(TS_RECENT + 1);
    expect(out.tcp.tsval - TS_NOW).toBeGreaterThanOrEqual(0); // our clock continues from TS_NOW
    expect(out.tcp.tsval - TS_NOW).toBeLessThan(60_000);
    expect(Buffer.from(out.payload).toString()).toBe('hello');

    // The guest acknowledges the reply (a pure ACK): consumed, nothing comes back.
    const ack = guestSeg({ seq: RCV_NXT + 1, ack: SND_UNA + 5, ts: { val: TS_RECENT + 2, ecr: out.tcp.tsval } });
    expect(await rig.offer(ack)).toBe('consumed');

    // Another exchange, wrapping the guest's sequence space (0xfffffff1 + 15 bytes).
    const big = bytes('0123456789abcdef');
    expect(await rig.offer(guestSeg({ seq: RCV_NXT + 1, ack: SND_UNA + 5, payload: big, ts: { val: TS_RECENT + 3, ecr: out.tcp.tsval } }))).toBe('consumed');
    expect(Buffer.from(fl.hostRead()).toString()).toBe('0123456789abcdef');
    fl.hostWrite(bytes('!'));
    const out2 = await rig.nextToGuest(1);
    expect(out2.tcp.seq).toBe(SND_UNA + 5);
    expect(out2.tcp.ack).toBe(u32(RCV_NXT + 17));
    expect(out2.tcp.tsecr).toBe(TS_RECENT + 3); // its seq was at the last ACK we sent: TS.Recent taken
    expect(out2.tcpChecksumOk && out2.ipChecksumOk).toBe(true);

    expect(rig.exits()).toEqual([]);
    expect(rig.log).toEqual([]);
    // The engine takes it back: everything that happened is in the state.
    expect(rig.release(1)).toBe(true);
    const r = rig.released.get(1)!;
    expect(reasonOf(r)).toBe('released');
    expect(r.state[S.RCV_NXT]).toBe(u32(RCV_NXT + 17));
    expect(r.state[S.SND_UNA]).toBe(SND_UNA + 5);
    expect(r.state[S.SND_NXT]).toBe(SND_UNA + 6);
    expect(r.state[S.SENT_LEN]).toBe(1);
    expect(Buffer.from(r.sent).toString()).toBe('!');
    expect(r.state[S.UNSENT_LEN]).toBe(0);
    expect(r.state[S.TS_RECENT]).toBe(TS_RECENT + 3);
    expect(r.state[S.LAST_ACK_SENT]).toBe(u32(RCV_NXT + 17));
    expect(r.state[S.ACK_OWED]).toBe(0);
    expect(r.state[S.BYTES_IN]).toBe(17);
    expect(r.state[S.BYTES_OUT]).toBe(5);
    expect(r.state[S.SEGS_IN]).toBe(3);
    expect(r.state[S.SEGS_OUT]).toBe(2);
    expect(r.state[S.RTT_MS]).toBeLessThan(60_000); // sampled from the pure ACK's tsecr
    expect(rig.release(1)).toBe(false);
  });

  it('TS off: 20-byte headers both ways, a padded pure ACK is taken, a TS option is not', async () => {
    const rig = new Rig();
    const fl = rig.adopt(2, { TS_OK: 0, DELACK_MS: 10_000, RTO_MS: 10_000 });
    const req = guestSeg({ seq: RCV_NXT, ack: SND_UNA, payload: bytes('ab') });
    expect(await rig.offer(req)).toBe('consumed');
    expect(Buffer.from(fl.hostRead()).toString()).toBe('ab');
    fl.hostWrite(bytes('xyz'));
    const out = await rig.nextToGuest(0);
    expect(out.tcp.headerLen).toBe(20);
    expect(out.tcp.tsPresent).toBe(false);
    expect(out.tcpChecksumOk && out.ipChecksumOk).toBe(true);
    expect(out.tcp.seq).toBe(SND_UNA);
    expect(out.tcp.ack).toBe(u32(RCV_NXT + 2));
    expect(Buffer.from(out.payload).toString()).toBe('xyz');
    // A pure ACK is 54 bytes: a NIC pads it to 60. The padding is not payload.
    const ack = guestSeg({ seq: RCV_NXT + 2, ack: SND_UNA + 3 });
    const padded = new Uint8Array(60);
    padded.set(ack);
    padded.fill(0xee, ack.length);
    expect(await rig.offer(padded)).toBe('consumed');
    expect(fl.hostRead()).toHaveLength(0);
    // Timestamps were not negotiated: a segment carrying them is the engine's.
    const withTs = guestSeg({ seq: RCV_NXT + 2, ack: SND_UNA + 3, payload: bytes('c'), ts: { val: 1, ecr: 1 } });
    expect(await rig.offer(withTs)).toBe('delivered');
    const r = await exitOf(rig, 2);
    expect(reasonOf(r)).toBe('segment');
    expect(r.state[S.RCV_NXT]).toBe(u32(RCV_NXT + 2));
    expect(r.state[S.SND_UNA]).toBe(SND_UNA + 3);
    expect(r.state[S.SENT_LEN]).toBe(0);
  });

  it('acks every second segment at once (echoing the first tsval), and a lone one after the delayed-ACK timer', async () => {
    const rig = new Rig();
    // Delayed ACK far away: the ACK can only come from the second segment.
    const fl = rig.adopt(3, { DELACK_MS: 10_000, RTO_MS: 10_000 });
    expect(await rig.offer(guestSeg({ seq: RCV_NXT, ack: SND_UNA, payload: bytes('a'), ts: { val: TS_RECENT + 1, ecr: TS_NOW } }))).toBe('consumed');
    expect(rig.toGuest).toHaveLength(0);
    expect(await rig.offer(guestSeg({ seq: RCV_NXT + 1, ack: SND_UNA, payload: bytes('b'), ts: { val: TS_RECENT + 2, ecr: TS_NOW } }))).toBe('consumed');
    const ack = await rig.nextToGuest(0);
    expect(ack.tcp.flags).toBe(TcpFlag.ACK);
    expect(ack.payload).toHaveLength(0);
    expect(ack.tcp.seq).toBe(SND_UNA);
    expect(ack.tcp.ack).toBe(u32(RCV_NXT + 2));
    expect(ack.tcp.window).toBe(RCV_WND_FIELD);
    // RFC 7323 §4.3: the second segment starts after the last ACK sent: TS.Recent stays the first's.
    expect(ack.tcp.tsecr).toBe(TS_RECENT + 1);
    expect(ack.tcpChecksumOk && ack.ipChecksumOk).toBe(true);
    expect(Buffer.from(fl.hostRead()).toString()).toBe('ab');

    // One segment and a silent host: a pure ACK once the delayed-ACK timer (40 ms) fires.
    const fl2 = rig.adopt(30, { RTO_MS: 10_000, GUEST_PORT: GUEST_PORT + 1 });
    expect(await rig.offer(guestSeg({ seq: RCV_NXT, ack: SND_UNA, sport: GUEST_PORT + 1, payload: bytes('c'), ts: { val: TS_RECENT + 1, ecr: TS_NOW } }))).toBe('consumed');
    const late = await rig.nextToGuest(1);
    expect(late.tcp.dstPort).toBe(GUEST_PORT + 1);
    expect(late.tcp.flags).toBe(TcpFlag.ACK);
    expect(late.tcp.ack).toBe(u32(RCV_NXT + 1));
    expect(late.tcp.tsecr).toBe(TS_RECENT + 1);
    expect(late.payload).toHaveLength(0);
    expect(late.tcpChecksumOk && late.ipChecksumOk).toBe(true);
    expect(Buffer.from(fl2.hostRead()).toString()).toBe('c');
    expect(rig.exits()).toEqual([]);
    expect(rig.toGuest).toHaveLength(2);
  });

  it('an owed ACK at adoption goes out on the delayed-ACK timer', async () => {
    const rig = new Rig();
    rig.adopt(4, { ACK_OWED: 1, DELACK_MS: 5, RTO_MS: 10_000 });
    const a = await rig.nextToGuest(0);
    expect(a.tcp.flags).toBe(TcpFlag.ACK);
    expect(a.tcp.ack).toBe(RCV_NXT);
    expect(a.tcp.tsecr).toBe(TS_RECENT);
  });

  describe('exits: onExit before the frame reaches onFrames, state as processed so far', () => {
    // Each flow adopts with 3 bytes in flight; a first, valid segment acknowledges two of them
    // and carries one byte; then the segment under test. What the release returns must be the
    // state after the first segment only.
    const cases: { name: string; reason: string; seg: (rcv: number, una: number, ts: number) => Uint8Array }[] = [
      { name: 'FIN', reason: 'segment', seg: (rcv, una, ts) => guestSeg({ seq: rcv, ack: una, flags: TcpFlag.ACK | TcpFlag.FIN, ts: { val: ts, ecr: TS_NOW } }) },
      { name: 'RST', reason: 'segment', seg: (rcv, una, ts) => guestSeg({ seq: rcv, ack: una, flags: TcpFlag.ACK | TcpFlag.RST, ts: { val: ts, ecr: TS_NOW } }) },
      { name: 'SYN', reason: 'segment', seg: (rcv, una, ts) => guestSeg({ seq: rcv, ack: una, flags: TcpFlag.SYN, ts: { val: ts, ecr: 0 } }) },
      { name: 'out-of-order seq', reason: 'segment', seg: (rcv, una, ts) => guestSeg({ seq: rcv + 10, ack: una, payload: bytes('z'), ts: { val: ts, ecr: TS_NOW } }) },
      { name: 'old seq (retransmission)', reason: 'segment', seg: (rcv, una, ts) => guestSeg({ seq: rcv - 1, ack: una, payload: bytes('x'), ts: { val: ts, ecr: TS_NOW } }) },
      { name: 'old timestamp (PAWS)', reason: 'segment', seg: (rcv, una) => guestSeg({ seq: rcv, ack: una, payload: bytes('z'), ts: { val: TS_RECENT - 5, ecr: TS_NOW } }) },
      { name: 'segment above smallMax', reason: 'bulk', seg: (rcv, una, ts) => guestSeg({ seq: rcv, ack: una, payload: new Uint8Array(513).fill(7), ts: { val: ts, ecr: TS_NOW } }) },
      { name: 'ACK beyond sndNxt', reason: 'segment', seg: (rcv, una, ts) => guestSeg({ seq: rcv, ack: una + 2, payload: bytes('z'), ts: { val: ts, ecr: TS_NOW } }) },
      { name: 'ACK below sndUna', reason: 'segment', seg: (rcv, una, ts) => guestSeg({ seq: rcv, ack: una - 1, payload: bytes('z'), ts: { val: ts, ecr: TS_NOW } }) },
      { name: 'duplicate ACK with data outstanding', reason: 'segment', seg: (rcv, una, ts) => guestSeg({ seq: rcv, ack: una, ts: { val: ts, ecr: TS_NOW } }) },
      { name: 'URG', reason: 'segment', seg: (rcv, una, ts) => guestSeg({ seq: rcv, ack: una, flags: TcpFlag.ACK | TcpFlag.URG, payload: bytes('u'), ts: { val: ts, ecr: TS_NOW } }) },
      { name: 'no ACK flag', reason: 'segment', seg: (rcv, una, ts) => guestSeg({ seq: rcv, ack: 0, flags: TcpFlag.PSH, payload: bytes('n'), ts: { val: ts, ecr: TS_NOW } }) },
      { name: 'timestamps missing (TS on)', reason: 'segment', seg: (rcv, una) => guestSeg({ seq: rcv, ack: una, payload: bytes('m') }) },
      { name: 'payload beyond the receive window', reason: 'segment', seg: (rcv, una, ts) => guestSeg({ seq: rcv, ack: una, payload: new Uint8Array(300), ts: { val: ts, ecr: TS_NOW } }) },
    ];

    for (const [i, c] of cases.entries()) {
      it(c.name, async () => {
        const rig = new Rig();
        const id = 100 + i;
        // Window of 256 bytes (2 << 7) for the 'beyond the receive window' case; 300 < smallMax.
        const fl = rig.adopt(id, { DELACK_MS: 10_000, RTO_MS: 10_000, RCV_WND_FIELD: 2 }, bytes('ABC'));
        const first = guestSeg({ seq: RCV_NXT, ack: SND_UNA + 2, payload: bytes('1'), ts: { val: TS_RECENT + 1, ecr: TS_NOW } });
        expect(await rig.offer(first)).toBe('consumed');
        expect(Buffer.from(fl.hostRead()).toString()).toBe('1');
        const bad = c.seg(RCV_NXT + 1, SND_UNA + 2, TS_RECENT + 2);
        expect(await rig.offer(bad)).toBe('delivered');
        const exitAt = rig.log.findIndex((e) => e.kind === 'exit' && e.id === id);
        const frameAt = rig.log.findIndex((e) => e.kind === 'frame' && hexOf(e.bytes) === hexOf(bad));
        expect(exitAt).toBeGreaterThanOrEqual(0);
        expect(exitAt).toBeLessThan(frameAt);
        expect(rig.exits()).toEqual([id]);
        const r = rig.released.get(id)!;
        expect(reasonOf(r)).toBe(c.reason);
        expect(r.state[S.RCV_NXT]).toBe(u32(RCV_NXT + 1));
        expect(r.state[S.SND_UNA]).toBe(SND_UNA + 2);
        expect(r.state[S.SND_NXT]).toBe(SND_UNA + 3);
        expect(r.state[S.TS_RECENT]).toBe(TS_RECENT + 1);
        expect(r.state[S.ACK_OWED]).toBe(1);
        expect(r.state[S.LAST_ACK_SENT]).toBe(RCV_NXT);
        expect(r.state[S.SENT_LEN]).toBe(1);
        expect(Buffer.from(r.sent).toString()).toBe('C');
        expect(r.state[S.UNSENT_LEN]).toBe(0);
        expect(r.state[S.SEGS_IN]).toBe(1);
        expect(r.state[S.BYTES_IN]).toBe(1);
        expect(r.state[S.BYTES_OUT]).toBe(2);
        // Nothing of the bad segment reached the host; the flow is gone from the fast path:
        // a valid segment now is the engine's too.
        expect(fl.hostRead()).toHaveLength(0);
        expect(await rig.offer(guestSeg({ seq: RCV_NXT + 1, ack: SND_UNA + 3, payload: bytes('2'), ts: { val: TS_RECENT + 3, ecr: TS_NOW } }))).toBe('delivered');
        expect(rig.exits()).toEqual([id]);
        const st = rig.stats();
        expect(st[ST.EXITS + X[c.reason]!]).toBe(1);
        expect(st[ST.FLOWS]).toBe(0);
      });
    }
  });

  it('release returns unacknowledged bytes; a host read above smallMax exits bulk with them unsent, the rest stays in the socket', async () => {
    const rig = new Rig();
    const fl = rig.adopt(5, { DELACK_MS: 10_000, RTO_MS: 10_000 });
    fl.hostWrite(bytes('abc'));
    const out = await rig.nextToGuest(0);
    expect(Buffer.from(out.payload).toString()).toBe('abc');
    const big = new Uint8Array(600);
    for (let i = 0; i < big.length; i++) big[i] = (i * 7 + 3) & 0xff;
    fl.hostWrite(big);
    const r = await exitOf(rig, 5);
    expect(reasonOf(r)).toBe('bulk');
    expect(rig.toGuest).toHaveLength(1); // nothing of the bulk data went out natively
    expect(r.state[S.SND_UNA]).toBe(SND_UNA);
    expect(r.state[S.SND_NXT]).toBe(SND_UNA + 3);
    expect(r.state[S.SENT_LEN]).toBe(3);
    expect(Buffer.from(r.sent).toString()).toBe('abc');
    // smallMax + 1 bytes were read to tell bulk from small; the engine's socket has the rest.
    expect(r.state[S.UNSENT_LEN]).toBe(513);
    expect(hexOf(r.unsent)).toBe(hexOf(big.subarray(0, 513)));
    expect(hexOf(fl.hostRead(fl.engineFd))).toBe(hexOf(big.subarray(513)));
  });

  it('release (by the engine) of a flow with a segment in flight returns it; release of an unknown id is false', async () => {
    const rig = new Rig();
    const fl = rig.adopt(6, { DELACK_MS: 10_000, RTO_MS: 10_000 });
    fl.hostWrite(bytes('pong'));
    await rig.nextToGuest(0);
    expect(rig.release(6)).toBe(true);
    const r = rig.released.get(6)!;
    expect(reasonOf(r)).toBe('released');
    expect(r.state[S.SENT_LEN]).toBe(4);
    expect(Buffer.from(r.sent).toString()).toBe('pong');
    expect(r.state[S.SEGS_OUT]).toBe(1);
    expect(rig.release(6)).toBe(false);
    expect(rig.release(999)).toBe(false);
    expect(rig.exits()).toEqual([]); // the engine's own release is not reported back
    // The offload no longer reads the host socket: the engine's descriptor gets what follows.
    fl.hostWrite(bytes('more'));
    await until(() => fl.hostRead(fl.engineFd).length === 4, 'bytes on the engine descriptor');
  });

  it('host EOF exits host_eof without consuming it; RTO and max age exit by themselves', async () => {
    const rig = new Rig();
    const a = rig.adopt(7, { RTO_MS: 10_000 });
    a.closePeer();
    const ra = await exitOf(rig, 7);
    expect(reasonOf(ra)).toBe('host_eof');
    expect(ra.state[S.UNSENT_LEN]).toBe(0);
    expect(readSync(a.engineFd, Buffer.alloc(8))).toBe(0); // the EOF is still there for the engine's read

    const b = rig.adopt(8, { RTO_MS: 30, GUEST_PORT: GUEST_PORT + 1 });
    b.hostWrite(bytes('x'));
    const rb = await exitOf(rig, 8);
    expect(reasonOf(rb)).toBe('rto');
    expect(rb.state[S.SENT_LEN]).toBe(1);
    expect(Buffer.from(rb.sent).toString()).toBe('x');
    expect(rig.toGuest.filter((f) => parseOut(f).tcp.dstPort === GUEST_PORT + 1)).toHaveLength(1); // no native retransmission

    rig.adopt(9, { MAX_AGE_MS: 20, GUEST_PORT: GUEST_PORT + 2 });
    const rc = await exitOf(rig, 9);
    expect(reasonOf(rc)).toBe('max_age');
  });

  it('a closed guest window exits window; the device pushing back exits device_full with the bytes unsent', async () => {
    const rig = new Rig();
    const a = rig.adopt(10, { DELACK_MS: 10_000, RTO_MS: 10_000 });
    // The guest closes its window with a pure ACK (a window update, not a duplicate ACK).
    expect(await rig.offer(guestSeg({ seq: RCV_NXT, ack: SND_UNA, window: 0, ts: { val: TS_RECENT + 1, ecr: TS_NOW } }))).toBe('consumed');
    a.hostWrite(bytes('w'));
    const ra = await exitOf(rig, 10);
    expect(reasonOf(ra)).toBe('window');
    expect(ra.state[S.SND_WND]).toBe(0);
    expect(rig.toGuest).toHaveLength(0);

    const b = rig.adopt(11, { DELACK_MS: 10_000, RTO_MS: 10_000, GUEST_PORT: GUEST_PORT + 1 });
    rig.tender.offloadHold(true);
    b.hostWrite(bytes('zz'));
    const rb = await exitOf(rig, 11);
    rig.tender.offloadHold(false);
    expect(reasonOf(rb)).toBe('device_full');
    expect(rb.state[S.SENT_LEN]).toBe(0);
    expect(Buffer.from(rb.unsent).toString()).toBe('zz');
    expect(rb.state[S.SND_NXT]).toBe(SND_UNA);
    expect(rig.toGuest).toHaveLength(0);
  });

  it('a second segment whose immediate ACK the device refuses is still taken; the ACK stays owed', async () => {
    const rig = new Rig();
    const fl = rig.adopt(12, { DELACK_MS: 10_000, RTO_MS: 10_000 });
    expect(await rig.offer(guestSeg({ seq: RCV_NXT, ack: SND_UNA, payload: bytes('a'), ts: { val: TS_RECENT + 1, ecr: TS_NOW } }))).toBe('consumed');
    rig.tender.offloadHold(true);
    expect(await rig.offer(guestSeg({ seq: RCV_NXT + 1, ack: SND_UNA, payload: bytes('b'), ts: { val: TS_RECENT + 2, ecr: TS_NOW } }))).toBe('consumed');
    rig.tender.offloadHold(false);
    const r = await exitOf(rig, 12);
    expect(reasonOf(r)).toBe('device_full');
    expect(Buffer.from(fl.hostRead()).toString()).toBe('ab');
    expect(r.state[S.RCV_NXT]).toBe(u32(RCV_NXT + 2));
    expect(r.state[S.ACK_OWED]).toBe(1);
    expect(r.state[S.LAST_ACK_SENT]).toBe(RCV_NXT);
  });

  it('a full host socket exits host_full; what the socket took is accounted, the segment goes to the engine', async () => {
    const rig = new Rig();
    const fl = rig.adopt(41, { DELACK_MS: 10_000, RTO_MS: 10_000 });
    // Fill the host socket through the engine's descriptor (the peer does not read).
    const filler = new Uint8Array(4096).fill(0x5a);
    let filled = 0;
    for (let n = 0; n >= 0; ) {
      n = sendSome(fl.engineFd, filler);
      if (n > 0) filled += n;
    }
    const payload = new Uint8Array(200).map((_, i) => i);
    const seg = guestSeg({ seq: RCV_NXT, ack: SND_UNA, payload, ts: { val: TS_RECENT + 1, ecr: TS_NOW } });
    expect(await rig.offer(seg)).toBe('delivered');
    const r = await exitOf(rig, 41);
    expect(reasonOf(r)).toBe('host_full');
    expect(rig.log.findIndex((e) => e.kind === 'exit')).toBeLessThan(rig.log.findIndex((e) => e.kind === 'frame'));
    // Whatever part the socket took (usually none) is in rcvNxt, and is exactly a prefix.
    const took = u32(r.state[S.RCV_NXT]! - RCV_NXT);
    expect(took).toBeLessThan(200);
    const got = fl.hostRead();
    expect(got.length).toBe(filled + took);
    expect(hexOf(got.subarray(filled))).toBe(hexOf(payload.subarray(0, took)));
  });

  it('closing the link inside onExit (from a frame, a host read, a timer) is safe', async () => {
    for (const trigger of ['frame', 'host_eof', 'rto'] as const) {
      const rig = new Rig();
      rig.exitHook = () => rig.tender.close();
      const fl = rig.adopt(50, { DELACK_MS: 10_000, RTO_MS: trigger === 'rto' ? 5 : 10_000 });
      if (trigger === 'frame') rig.send(guestSeg({ seq: RCV_NXT, ack: SND_UNA, flags: TcpFlag.ACK | TcpFlag.RST, ts: { val: TS_RECENT + 1, ecr: TS_NOW } }));
      else if (trigger === 'host_eof') fl.closePeer();
      else fl.hostWrite(bytes('r'));
      await until(() => rig.tender.closed, `close inside onExit (${trigger})`);
      expect(rig.exits()).toEqual([50]);
      expect(reasonOf(rig.released.get(50)!)).toBe(trigger === 'frame' ? 'segment' : trigger);
      // The loop goes on: the closed link's handles are gone, nothing fires later.
      await new Promise((res) => setTimeout(res, 20));
      expect(rig.log.filter((e) => e.kind === 'frame')).toEqual([]);
    }
  });

  describe('behind a virtio-net header (the TAP path of OnFrame)', () => {
    /** virtio_net_hdr: flags (1 NEEDS_CSUM, 2 DATA_VALID), gso_type, then 8 bytes we leave 0. */
    const withHdr = (flags: number, gso: number, f: Uint8Array): Uint8Array => {
      const out = new Uint8Array(10 + f.length);
      out[0] = flags;
      out[1] = gso;
      out.set(f, 10);
      return out;
    };
    const T = ETH_HLEN + IPV4_HLEN;

    it('checksums the device vouched for are not verified; others are; a GSO frame exits bulk', async () => {
      const rig = new Rig(10);
      const fl = rig.adopt(60, { DELACK_MS: 10_000, RTO_MS: 10_000 });
      let ts = TS_RECENT;
      const seg = (p: string): Uint8Array => guestSeg({ seq: RCV_NXT + fl.hostBytes, ack: SND_UNA, payload: bytes(p), ts: { val: ++ts, ecr: TS_NOW } });
      // NEEDS_CSUM: the TCP checksum field holds only the pseudo-header sum (here: garbage).
      const partial = seg('a');
      partial[T + 16] = 0x12;
      partial[T + 17] = 0x34;
      expect(await rig.offer(withHdr(1, 0, partial))).toBe('consumed');
      fl.hostBytes += 1;
      const valid = seg('b');
      valid[T + 16] ^= 0xff;
      expect(await rig.offer(withHdr(2, 0, valid))).toBe('consumed');
      fl.hostBytes += 1;
      // No flag: verified, and a bad checksum is the engine's to count and drop.
      const bad = seg('c');
      bad[T + 16] ^= 0xff;
      expect(await rig.offer(withHdr(0, 0, bad))).toBe('delivered');
      expect(await rig.offer(Uint8Array.of(1, 2, 3))).toBe('delivered'); // shorter than the header
      expect(rig.exits()).toEqual([]);
      expect(Buffer.from(fl.hostRead()).toString()).toBe('ab');
      // GSO (VIRTIO_NET_HDR_GSO_TCPV4): bulk data, the engine's.
      const gso = withHdr(1, 1, seg('d'));
      expect(await rig.offer(gso)).toBe('delivered');
      const r = await exitOf(rig, 60);
      expect(reasonOf(r)).toBe('bulk');
      expect(r.state[S.RCV_NXT]).toBe(u32(RCV_NXT + 2));
      expect(fl.hostRead()).toHaveLength(0);
    });

    // virtio-net's NEEDS_CSUM/DATA_VALID speak of the L4 checksum only: the IPv4 header is
    // always verified (Linux's ip_rcv and the engine drop such a frame).
    it('a trusted frame with a bad IPv4 header checksum is not consumed', async () => {
      const rig = new Rig(10);
      const fl = rig.adopt(61, { DELACK_MS: 10_000, RTO_MS: 10_000 });
      const f = guestSeg({ seq: RCV_NXT, ack: SND_UNA, payload: bytes('x'), ts: { val: TS_RECENT + 1, ecr: TS_NOW } });
      f[ETH_HLEN + 10] ^= 0xff; // header checksum
      const fate = await rig.offer(withHdr(1, 0, f));
      expect(fl.hostRead()).toHaveLength(0);
      expect(fate).toBe('delivered');
    });
  });

  // An ACK whose tsecr is ahead of our clock (a guest echoing a value we never sent) must not
  // give an RTT sample: in uint32 arithmetic it was ~4.29e9 ms, and the engine's RTO went to
  // its maximum (120 s). The engine's own path (input.ts) ignores a negative sample too.
  it('an ACK whose tsecr is ahead of our clock gives no RTT sample', async () => {
    const rig = new Rig();
    rig.adopt(42, { DELACK_MS: 10_000, RTO_MS: 10_000 }, bytes('AB'));
    const ack = guestSeg({ seq: RCV_NXT, ack: SND_UNA + 2, ts: { val: TS_RECENT + 1, ecr: TS_NOW + 5000 } });
    expect(await rig.offer(ack)).toBe('consumed');
    expect(rig.release(42)).toBe(true);
    const rtt = rig.released.get(42)!.state[S.RTT_MS]!;
    // Today: 4294962298 (2^32 - 4998).
    expect(rtt === 0xffffffff || rtt < 60_000).toBe(true);
  });

  it('frames not for an adopted flow are never consumed and never end it', async () => {
    const rig = new Rig();
    const fl = rig.adopt(13, { DELACK_MS: 10_000, RTO_MS: 10_000 });
    const ts = { val: TS_RECENT + 1, ecr: TS_NOW };
    const base = { seq: RCV_NXT, ack: SND_UNA, payload: bytes('k'), ts };
    const others: [string, Uint8Array][] = [
      ['other destination MAC', guestSeg({ ...base, dstMac: Uint8Array.of(2, 0, 0, 0, 0, 9) })],
      ['broadcast MAC', guestSeg({ ...base, dstMac: new Uint8Array(6).fill(0xff) })],
      ['other guest port', guestSeg({ ...base, sport: GUEST_PORT + 7 })],
      ['other remote port', guestSeg({ ...base, dport: REMOTE_PORT + 1 })],
      ['other remote IP, same ports', guestSeg({ ...base, dst: ip4('10.0.0.9') })],
      ['other guest IP', guestSeg({ ...base, src: ip4('192.168.127.3') })],
    ];
    // ARP request, IPv6 and a fragment of the flow.
    const arp = new Uint8Array(42);
    writeEthernetHeader(arp, 0, GW_MAC, GUEST_MAC, EtherType.ARP);
    arp.set([0, 1, 8, 0, 6, 4, 0, 1], 14);
    others.push(['ARP', arp]);
    const v6 = new Uint8Array(14 + 40 + 20);
    writeEthernetHeader(v6, 0, GW_MAC, GUEST_MAC, EtherType.IPv6);
    v6.set([0x60, 0, 0, 0, 0, 20, 6, 64], 14);
    others.push(['IPv6 TCP', v6]);
    const mf = guestSeg(base);
    mf[ETH_HLEN + 6] = 0x20; // MF
    fixIpv4Checksum(mf);
    others.push(['first fragment (MF)', mf]);
    const off = guestSeg(base);
    off[ETH_HLEN + 6] = 0x40;
    off[ETH_HLEN + 7] = 0x01; // DF + offset 8
    fixIpv4Checksum(off);
    others.push(['later fragment', off]);
    const badTcp = guestSeg(base);
    badTcp[badTcp.length - 1]! ^= 0x01; // payload bit flip: TCP checksum fails
    others.push(['bad TCP checksum', badTcp]);
    const badIp = guestSeg(base);
    badIp[ETH_HLEN + 8] = 63; // TTL changed, header checksum not updated
    others.push(['bad IPv4 header checksum', badIp]);
    const ipOpts = guestSeg(base);
    ipOpts[ETH_HLEN] = 0x46;
    others.push(['IPv4 header with options', ipOpts]);
    const shortOff = guestSeg(base);
    shortOff[ETH_HLEN + IPV4_HLEN + 12] = 0x40; // data offset 4 words
    others.push(['TCP data offset below 5', shortOff]);
    const longOff = guestSeg(base);
    longOff[ETH_HLEN + IPV4_HLEN + 12] = 0xf0; // 60 bytes: past the segment
    others.push(['TCP data offset past the segment', longOff]);
    const trunc = guestSeg(base);
    others.push(['truncated below the IPv4 total length', trunc.subarray(0, trunc.length - 1)]);
    others.push(['runt', guestSeg(base).subarray(0, 40)]);
    const udp = guestSeg(base);
    udp[ETH_HLEN + 9] = IpProto.UDP;
    fixIpv4Checksum(udp);
    others.push(['UDP with the same ports', udp]);

    for (const [name, f] of others) {
      expect(await rig.offer(f), name).toBe('delivered');
    }
    expect(rig.exits()).toEqual([]);
    expect(fl.hostRead()).toHaveLength(0);
    expect(rig.stats()[ST.RX_SEGS]).toBe(0);
    // Still adopted, at the same place: the valid segment is taken.
    expect(await rig.offer(guestSeg(base))).toBe('consumed');
    expect(Buffer.from(fl.hostRead()).toString()).toBe('k');
  });

  it('counts segments, bytes and exits per reason in offloadExitNames() order', async () => {
    const rig = new Rig();
    expect(rig.stats()).toEqual(new Float64Array(7 + EXITS.length));
    const fl = rig.adopt(14, { DELACK_MS: 10_000, RTO_MS: 10_000 });
    const req = guestSeg({ seq: RCV_NXT, ack: SND_UNA, payload: bytes('ping'), ts: { val: TS_RECENT + 1, ecr: TS_NOW } });
    expect(await rig.offer(req)).toBe('consumed');
    fl.hostWrite(bytes('pong!'));
    const out = await rig.nextToGuest(0);
    const ack = guestSeg({ seq: RCV_NXT + 4, ack: SND_UNA + 5, ts: { val: TS_RECENT + 2, ecr: out.tcp.tsval } });
    expect(await rig.offer(ack)).toBe('consumed');
    let st = rig.stats();
    expect(st[ST.FLOWS]).toBe(1);
    expect(st[ST.RX_SEGS]).toBe(2);
    expect(st[ST.TX_SEGS]).toBe(1);
    expect(st[ST.RX_BYTES]).toBe(4);
    expect(st[ST.TX_BYTES]).toBe(5);
    expect(st[ST.RX_FRAME_BYTES]).toBe(req.length + ack.length);
    expect(st[ST.TX_FRAME_BYTES]).toBe(rig.toGuest[0]!.length);
    expect([...st.subarray(ST.EXITS)]).toEqual(EXITS.map(() => 0));

    // One exit of each of three kinds: segment (FIN), host_eof, released.
    expect(await rig.offer(guestSeg({ seq: RCV_NXT + 4, ack: SND_UNA + 5, flags: TcpFlag.ACK | TcpFlag.FIN, ts: { val: TS_RECENT + 3, ecr: TS_NOW } }))).toBe('delivered');
    const b = rig.adopt(15, { GUEST_PORT: GUEST_PORT + 1 });
    b.closePeer();
    await exitOf(rig, 15);
    rig.adopt(16, { GUEST_PORT: GUEST_PORT + 2 });
    st = rig.stats();
    expect(st[ST.FLOWS]).toBe(1);
    expect(rig.release(16)).toBe(true);
    st = rig.stats();
    const want = EXITS.map((n) => (n === 'segment' || n === 'host_eof' || n === 'released' ? 1 : 0));
    expect([...st.subarray(ST.EXITS)]).toEqual(want);
    expect(st[ST.FLOWS]).toBe(0);
    expect(st[ST.RX_SEGS]).toBe(2);
  });

  it('refuses bad adoptions: a taken id or tuple, inconsistent in-flight bytes, out-of-range fields', () => {
    const rig = new Rig();
    rig.adopt(20);
    const [e, p] = socketpair('stream');
    cleanups.push(() => closeSync(e), () => closeSync(p));
    const none = new Uint8Array(0);
    const { EEXIST, EINVAL } = constants.errno;
    expect(rig.tender.offloadAdopt(20, e, params({ GUEST_PORT: 1 }), GUEST_MAC, none)).toBe(EEXIST);
    expect(rig.tender.offloadAdopt(21, e, params({}), GUEST_MAC, none)).toBe(EEXIST);
    expect(rig.tender.offloadAdopt(21, e, params({ GUEST_PORT: 2, SND_NXT: SND_UNA + 2 }), GUEST_MAC, bytes('a'))).toBe(EINVAL);
    expect(rig.tender.offloadAdopt(21, e, params({ GUEST_PORT: 2, MSS: 10 }), GUEST_MAC, none)).toBe(EINVAL);
    expect(rig.tender.offloadAdopt(21, e, params({ GUEST_PORT: 70000 }), GUEST_MAC, none)).toBe(EINVAL);
    expect(rig.tender.offloadAdopt(21, e, params({ GUEST_PORT: 2, SND_WSCALE: 15 }), GUEST_MAC, none)).toBe(EINVAL);
    expect(rig.tender.offloadAdopt(21, e, params({ GUEST_PORT: 2, TTL: 0 }), GUEST_MAC, none)).toBe(EINVAL);
    expect(rig.tender.offloadAdopt(21, e, params({ GUEST_PORT: 2, SMALL_MAX: 16385 }), GUEST_MAC, none)).toBe(EINVAL);
    expect(rig.tender.offloadAdopt(21, e, params({ GUEST_PORT: 2 }), GUEST_MAC, none)).toBe(0);
    expect(rig.stats()[ST.FLOWS]).toBe(2);
  });

  it('property: random frames and mutations of valid ones are consumed (payload to the host, in order) or delivered unchanged', async () => {
    const rig = new Rig();
    let nextId = 1000;
    const T = ETH_HLEN + IPV4_HLEN;
    // Header fields a mutation may set: [offset, width in bytes].
    const FIELDS: Record<string, [number, number]> = {
      ipTotLen: [ETH_HLEN + 2, 2], ipFrag: [ETH_HLEN + 6, 2], ipTtl: [ETH_HLEN + 8, 1], ipProto: [ETH_HLEN + 9, 1],
      seq: [T + 4, 4], ack: [T + 8, 4], doff: [T + 12, 1], flags: [T + 13, 1], window: [T + 14, 2], urgent: [T + 18, 2],
      opt0: [T + 20, 1], optLen: [T + 22, 1], tsval: [T + 24, 4], tsecr: [T + 28, 4],
    };
    const op = fc.oneof(
      { arbitrary: fc.constant({ t: 'none' as const }), weight: 2 },
      { arbitrary: fc.array(fc.record({ at: fc.nat(), xor: fc.integer({ min: 1, max: 255 }) }), { minLength: 1, maxLength: 3 }).map((flips) => ({ t: 'flip' as const, flips })), weight: 2 },
      { arbitrary: fc.nat().map((n) => ({ t: 'cut' as const, n })), weight: 1 },
      { arbitrary: fc.uint8Array({ minLength: 1, maxLength: 8 }).map((b) => ({ t: 'extend' as const, b })), weight: 1 },
      {
        arbitrary: fc.record({
          field: fc.constantFrom(...Object.keys(FIELDS)),
          // A small step either way, half the space, or any value.
          v: fc.oneof(fc.integer({ min: -3, max: 3 }), fc.constant(0x80000000), fc.nat()),
          add: fc.boolean(),
        }).map((x) => ({ t: 'field' as const, ...x })),
        weight: 4,
      },
    );
    const mutation = fc.record({
      payloadLen: fc.oneof(fc.integer({ min: 0, max: 40 }), fc.constantFrom(511, 512, 513)),
      seqDelta: fc.constantFrom(0, 0, 0, 0, -1, 1),
      op,
      fix: fc.oneof({ arbitrary: fc.constant(true), weight: 3 }, { arbitrary: fc.constant(false), weight: 1 }),
    });
    const step = fc.oneof(
      { arbitrary: mutation.map((m) => ({ kind: 'mutate' as const, m })), weight: 6 },
      { arbitrary: fc.uint8Array({ minLength: 0, maxLength: 120 }).map((b) => ({ kind: 'random' as const, b })), weight: 1 },
      // Random bytes behind headers that reach the tuple lookup.
      { arbitrary: fc.uint8Array({ minLength: 16, maxLength: 80 }).map((b) => ({ kind: 'tail' as const, b })), weight: 1 },
    );
    const fates: Record<string, number> = {};
    await fc.assert(
      fc.asyncProperty(fc.boolean(), fc.array(step, { minLength: 1, maxLength: 10 }), async (tsOn, steps) => {
        const id = nextId++;
        const sport = 1024 + id;
        const fl = rig.adopt(id, { DELACK_MS: 10_000, RTO_MS: 10_000, GUEST_PORT: sport, TS_OK: tsOn ? 1 : 0 });
        let rcv = RCV_NXT;
        let tsval = TS_RECENT;
        const expected: number[] = [];
        for (const s of steps) {
          let f: Uint8Array;
          if (s.kind === 'random') {
            f = s.b;
          } else if (s.kind === 'tail') {
            const head = guestSeg({ seq: rcv, ack: SND_UNA, sport }).subarray(0, T + 4);
            f = new Uint8Array(head.length + s.b.length);
            f.set(head);
            f.set(s.b, head.length);
          } else {
            const m = s.m;
            const payload = new Uint8Array(m.payloadLen).map((_, i) => (i * 13 + rcv) & 0xff);
            f = guestSeg({ seq: rcv + m.seqDelta, ack: SND_UNA, sport, payload, ts: tsOn ? { val: tsval + 1, ecr: TS_NOW } : null });
            const o = m.op;
            if (o.t === 'flip') {
              for (const x of o.flips) f[x.at % f.length]! ^= x.xor;
            } else if (o.t === 'cut') {
              f = f.subarray(0, o.n % (f.length + 1));
            } else if (o.t === 'extend') {
              const g = new Uint8Array(f.length + o.b.length);
              g.set(f);
              g.set(o.b, f.length);
              f = g;
            } else if (o.t === 'field') {
              const [at, w] = FIELDS[o.field]!;
              if (at + w <= f.length) {
                let cur = 0;
                for (let i = 0; i < w; i++) cur = cur * 256 + f[at + i]!;
                let v = (o.add ? cur + o.v : o.v) % 2 ** (8 * w);
                if (v < 0) v += 2 ** (8 * w);
                for (let i = w - 1; i >= 0; i--) {
                  f[at + i] = v % 256;
                  v = Math.floor(v / 256);
                }
              }
            }
            if (m.fix && f.length >= T + 20 && f[ETH_HLEN] === 0x45) fixChecksums(f);
          }
          f = f.slice();
          const rxBefore = rig.stats()[ST.RX_SEGS]!;
          const fate = await rig.offer(f);
          fates[`${s.kind}:${fate}`] = (fates[`${s.kind}:${fate}`] ?? 0) + 1;
          if (fate === 'consumed') {
            // Only an in-order segment of this flow: counted, from the guest, at rcvNxt.
            expect(rig.stats()[ST.RX_SEGS]).toBe(rxBefore + 1);
            expect(readIp4(f, ETH_HLEN + 12)).toBe(GUEST_IP);
            expect(readIp4(f, ETH_HLEN + 16)).toBe(REMOTE_IP);
            expect((f[T]! << 8) | f[T + 1]!).toBe(sport);
            expect(readU32(f, T + 4)).toBe(u32(rcv));
            const p = framePayload(f);
            expected.push(...p);
            rcv = u32(rcv + p.length);
            if (tsOn) tsval = readU32(f, T + 24);
          }
        }
        // The offload writes to the host socket before it returns: everything is there already.
        expect(hexOf(fl.hostRead())).toBe(hexOf(Uint8Array.from(expected)));
        // Still adopted, or released on its exit: either way rcvNxt is where the host bytes end.
        if (!rig.released.has(id)) expect(rig.release(id)).toBe(true);
        expect(rig.released.get(id)!.state[S.RCV_NXT]).toBe(u32(rcv));
        expect(rig.errors).toEqual([]);
      }),
      { numRuns: Number(process.env.TCP_OFFLOAD_FUZZ_RUNS ?? 80) },
    );
    // The generators reach both outcomes (not a vacuous property).
    expect(fates['mutate:consumed'] ?? 0).toBeGreaterThan(10);
    expect(fates['mutate:delivered'] ?? 0).toBeGreaterThan(10);
  });

  it('property: host bytes are never lost or reordered: guest segments + released sent/unsent + what the socket still holds = what the host wrote', async () => {
    const rig = new Rig();
    let nextId = 5000;
    const step = fc.oneof(
      { arbitrary: fc.oneof(fc.integer({ min: 1, max: 40 }), fc.integer({ min: 500, max: 520 }), fc.integer({ min: 1, max: 2000 })).map((n) => ({ kind: 'write' as const, n })), weight: 3 },
      { arbitrary: fc.constant({ kind: 'ack' as const }), weight: 2 },
    );
    await fc.assert(
      fc.asyncProperty(fc.array(step, { minLength: 1, maxLength: 8 }), fc.integer({ min: 0, max: 255 }), async (steps, salt) => {
        const id = nextId++;
        const sport = 1024 + id;
        const fl = rig.adopt(id, { DELACK_MS: 10_000, RTO_MS: 10_000, GUEST_PORT: sport });
        const written: number[] = [];
        let from = rig.toGuest.length;
        const guest: number[] = [];
        let ts = TS_RECENT;
        const take = (): void => {
          for (; from < rig.toGuest.length; from++) {
            const o = parseOut(rig.toGuest[from]!);
            if (o.tcp.dstPort !== sport) continue;
            expect(o.tcpChecksumOk && o.ipChecksumOk).toBe(true);
            if (o.payload.length === 0) continue;
            expect(o.tcp.seq).toBe(u32(SND_UNA + guest.length)); // contiguous, in order
            guest.push(...o.payload);
          }
        };
        const exited = (): boolean => rig.released.has(id);
        for (const s of steps) {
          if (exited()) break;
          if (s.kind === 'write') {
            const b = new Uint8Array(s.n).map((_, i) => (written.length + i + salt) & 0xff);
            written.push(...b);
            fl.hostWrite(b);
            // Processed: it all reached the guest, or the flow left (bulk, window).
            await until(() => (take(), guest.length === written.length || exited()), 'host bytes handled');
          } else {
            await rig.offer(guestSeg({ seq: RCV_NXT, ack: SND_UNA + guest.length, sport, ts: { val: ++ts, ecr: TS_NOW } }));
          }
        }
        take();
        if (!exited()) expect(rig.release(id)).toBe(true);
        const r = rig.released.get(id)!;
        expect(r.state[S.SND_NXT]).toBe(u32(SND_UNA + guest.length));
        const una = u32(r.state[S.SND_UNA]! - SND_UNA);
        expect(hexOf(r.sent)).toBe(hexOf(Uint8Array.from(guest.slice(una))));
        const rest = fl.hostRead(fl.engineFd);
        const all = [...guest, ...r.unsent, ...rest];
        expect(hexOf(Uint8Array.from(all))).toBe(hexOf(Uint8Array.from(written)));
        expect(rig.errors).toEqual([]);
      }),
      { numRuns: Number(process.env.TCP_OFFLOAD_FUZZ_RUNS ?? 40) },
    );
  });
});

/** Recompute the IPv4 header and TCP checksums of a (mutated) frame, as far as it allows. */
function fixChecksums(f: Uint8Array): void {
  fixIpv4Checksum(f);
  const tot = (f[ETH_HLEN + 2]! << 8) | f[ETH_HLEN + 3]!;
  if (tot < IPV4_HLEN + 20 || ETH_HLEN + tot > f.length) return;
  const seg = f.subarray(ETH_HLEN + IPV4_HLEN, ETH_HLEN + tot);
  seg[16] = 0;
  seg[17] = 0;
  const src = readIp4(f, ETH_HLEN + 12);
  const dst = readIp4(f, ETH_HLEN + 16);
  // Same sum tcpChecksumOk checks: pseudo-header + segment.
  const c = tcpChecksum(seg, src, dst);
  seg[16] = c >> 8;
  seg[17] = c & 0xff;
}

function tcpChecksum(seg: Uint8Array, src: Ip4, dst: Ip4): number {
  let s = (src >>> 16) + (src & 0xffff) + (dst >>> 16) + (dst & 0xffff) + IpProto.TCP + seg.length;
  for (let i = 0; i + 1 < seg.length; i += 2) s += (seg[i]! << 8) | seg[i + 1]!;
  if (seg.length & 1) s += seg[seg.length - 1]! << 8;
  while (s > 0xffff) s = (s & 0xffff) + Math.floor(s / 0x10000);
  return ~s & 0xffff;
}
