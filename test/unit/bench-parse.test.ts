/**
 * The bench's pure parts: iperf3 JSON parsing and the markdown/chart rendering. No network.
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { parseIperfJson } from '../../bench/iperf.js';
import { BEGIN, END, bar, formatGbps, median, naText, renderBlock, renderChart, renderRrDetail, renderTable, renderTargets, replaceBlock, type BenchResults } from '../../bench/report.js';
import { summarize } from '../../bench/rr-stats.js';

// `iperf3 -c 127.0.0.1 -p 5998 -t 1 -O 1 -J -R` (iperf 3.12, loopback, this machine), trimmed to
// the keys the parser reads: "start", per-stream arrays and CPU figures removed, values untouched.
const DOWNLOAD_JSON = `{"intervals": [{"sum": {"start": 0, "end": 1.000007, "seconds": 1.0000070333480835, "bytes": 2893152256, "bits_per_second": 23145055260.76994, "omitted": true, "sender": false}}, {"sum": {"start": 1.5e-05, "end": 0.999988, "seconds": 1.0000029802322388, "bytes": 3067215872, "bits_per_second": 24537653848.092937, "omitted": false, "sender": false}}], "end": {"sum_sent": {"start": 0, "end": 1.00375, "seconds": 1.00375, "bytes": 3077570560, "bits_per_second": 24528582296.388546, "retransmits": 0, "sender": false}, "sum_received": {"start": 0, "end": 0.999988, "seconds": 0.999988, "bytes": 3067215872, "bits_per_second": 24538021432.257187, "sender": false}}}`;

// `iperf3 -c 127.0.0.1 -p 5997 -t 1 -J` with nothing listening on 5997 (iperf 3.12), complete.
const REFUSED_JSON = `{"start": {"connected": [], "version": "iperf 3.12", "system_info": "Linux vm 6.18.44-fc-v669 #1 SMP PREEMPT_DYNAMIC @0 x86_64"}, "intervals": [], "end": {}, "error": "unable to connect to server: Connection refused"}`;

describe('parseIperfJson', () => {
  it('reads the receiver-side throughput, sender figures and intervals', () => {
    const r = parseIperfJson(DOWNLOAD_JSON);
    expect(r.bitsPerSecond).toBe(24538021432.257187);
    expect(r.senderBitsPerSecond).toBe(24528582296.388546);
    expect(r.retransmits).toBe(0);
    expect(r.seconds).toBe(0.999988);
    expect(r.intervals).toEqual([
      { bitsPerSecond: 23145055260.76994, omitted: true },
      { bitsPerSecond: 24537653848.092937, omitted: false },
    ]);
  });

  it("turns iperf3's error field into an error with its message", () => {
    expect(() => parseIperfJson(REFUSED_JSON)).toThrow('iperf3: unable to connect to server: Connection refused');
  });

  it('rejects empty, non-JSON and incomplete output with a reason', () => {
    expect(() => parseIperfJson('')).toThrow(/not JSON \(empty\)/);
    expect(() => parseIperfJson('iperf3: error - unable to connect')).toThrow(/not JSON: iperf3: error/);
    expect(() => parseIperfJson('null')).toThrow(/not a JSON object/);
    expect(() => parseIperfJson('{"end": {}}')).toThrow(/sum_received/);
  });

  it('never throws anything but an Error, whatever the text', () => {
    fc.assert(
      fc.property(fc.oneof(fc.string(), fc.json()), (s) => {
        try {
          parseIperfJson(s);
        } catch (err) {
          expect(err).toBeInstanceOf(Error);
        }
      }),
    );
  });
});

function results(): BenchResults {
  const cell = (stack: string, mtu: number, kind: 'up' | 'down' | 'rr', value: number | null, error?: string) => ({
    stack, mtu, kind, value, runs: [value], ...(error ? { error } : {}),
  });
  return {
    version: 1,
    date: '2026-11-29T15:00:00.000Z',
    durationSeconds: 150.4,
    machine: { kernel: '6.18.44', cpu: 'AMD EPYC', cores: 2, node: 'v20.20.2' },
    tools: { iperf3: 'iperf 3.12', tender: 'tender 0.1.0' },
    options: { stacks: ['veth', 'tender'], mtus: [1500, 65520], seconds: 5, omit: 1, repeat: 1, rrCount: 2000, quick: false },
    commands: { veth: ['ip link add x type veth'], tender: ['node dist/src/cli.js netns NS --configure --mtu 1500'] },
    cells: [
      cell('veth', 1500, 'up', 18.04), cell('veth', 1500, 'down', 17.5), cell('veth', 1500, 'rr', 61.23),
      cell('veth', 65520, 'up', 20.4), cell('veth', 65520, 'down', 9.876), cell('veth', 65520, 'rr', 55),
      cell('tender', 1500, 'up', null, 'iperf3: unable to connect | refused'), cell('tender', 1500, 'down', 1.2),
      cell('tender', 1500, 'rr', 150.6), cell('tender', 65520, 'up', 2), cell('tender', 65520, 'down', 0.5),
      cell('tender', 65520, 'rr', null, 'TCP_RR: ECONNREFUSED'),
    ],
  };
}

describe('renderTable', () => {
  it('renders stacks as rows, largest MTU first, RR at MTU 1500, failures as n/a with the reason', () => {
    expect(renderTable(results())).toBe(
      [
        '| stack | MTU 65520 up, Gbit/s | MTU 65520 down, Gbit/s | MTU 1500 up, Gbit/s | MTU 1500 down, Gbit/s | 1-byte TCP_RR, median µs (MTU 1500) |',
        '| --- | ---: | ---: | ---: | ---: | ---: |',
        '| veth | 20.4 | 9.88 | 18.0 | 17.5 | 61.2 |',
        '| tender | 2.00 | 0.50 | n/a (iperf3: unable to connect \\| refused) | 1.20 | 151 |',
      ].join('\n'),
    );
  });

  it('shows how many runs failed when others succeeded', () => {
    const r = results();
    r.cells[0].runs = [18.04, null, 17];
    expect(renderTable(r).split('\n')[2]).toContain('18.0 (1/3 runs failed)');
  });

  it('uses the smallest MTU for the round trip when 1500 was not measured', () => {
    const r = results();
    r.options.mtus = [65520];
    const t = renderTable(r);
    expect(t.split('\n')[0]).toBe('| stack | MTU 65520 up, Gbit/s | MTU 65520 down, Gbit/s | 1-byte TCP_RR, median µs (MTU 65520) |');
    expect(t).toContain('| tender | 2.00 | 0.50 | n/a (TCP_RR: ECONNREFUSED) |');
  });
});

describe('renderRrDetail', () => {
  it('shows the median, the warm-up median and the stack CPU per round trip, medians over runs', () => {
    const r = results();
    const rr = r.cells.find((c) => c.stack === 'tender' && c.mtu === 1500 && c.kind === 'rr')!;
    rr.detail = [
      { medianUs: 150, warmupMedianUs: 300, stackCpuUs: 40 },
      { medianUs: 151, warmupMedianUs: 250, stackCpuUs: 42.5 },
      null,
    ];
    expect(renderRrDetail(r)).toBe(
      [
        '| stack (TCP_RR, MTU 1500) | median µs | warm-up median µs | stack CPU µs per round trip |',
        '| --- | ---: | ---: | ---: |',
        '| veth | 61.2 | – | – |',
        '| tender | 151 | 275 | 41.3 |',
      ].join('\n'),
    );
    expect(renderBlock(r)).toContain('| tender | 151 | 275 | 41.3 |');
  });

  it('is empty for results that carry no details (older runs)', () => {
    expect(renderRrDetail(results())).toBe('');
    expect(renderBlock(results())).not.toContain('warm-up median');
  });
});

describe('chart and document', () => {
  it('scales bars within each group, with eighth-cell resolution', () => {
    expect(bar(10, 10, 4)).toBe('████');
    expect(bar(5, 10, 4)).toBe('██');
    expect(bar(1, 8, 1)).toBe('▏');
    expect(bar(0, 10, 4)).toBe('');
    expect(bar(3, 0, 4)).toBe('');
    const chart = renderChart(results(), 10);
    expect(chart).toContain('MTU 65520, upload (guest → host), Gbit/s — longer is better\n  veth    ██████████ 20.4\n  tender  █ 2.00');
    expect(chart).toContain('  tender  n/a (iperf3: unable to connect \\| refused)');
  });

  it('replaces only the text between the markers, or appends a marked block', () => {
    const doc = `# Benchmarks\n\nintro\n\n${BEGIN}\nold\n${END}\n\nafter\n`;
    expect(replaceBlock(doc, 'new')).toBe(`# Benchmarks\n\nintro\n\n${BEGIN}\nnew\n${END}\n\nafter\n`);
    expect(replaceBlock('# Benchmarks', 'new')).toBe(`# Benchmarks\n\n${BEGIN}\nnew\n${END}\n`);
    const block = renderBlock(results());
    expect(block).toContain('AMD EPYC, 2 cores, Linux 6.18.44');
    expect(block).toContain('iperf3: iperf 3.12; tender: tender 0.1.0');
    expect(block).toContain('  - `node dist/src/cli.js netns NS --configure --mtu 1500`');
  });

  it("states issue 3's targets for tender cell by cell", () => {
    const r = results();
    r.options.stacks = ['veth', 'slirp4netns', 'tender'];
    r.cells.push(
      { stack: 'slirp4netns', mtu: 65520, kind: 'up', value: 1, runs: [1] },
      { stack: 'slirp4netns', mtu: 65520, kind: 'down', value: 1, runs: [1] },
      { stack: 'slirp4netns', mtu: 1500, kind: 'rr', value: 75.3, runs: [75.3] },
    );
    expect(renderTargets(r).split('\n')).toEqual([
      '- MTU 65520 up: ✔ 2.00× slirp4netns; ✘ 10% of veth (aim: 50%)',
      '- MTU 65520 down: ✘ 0.50× slirp4netns; ✘ 5% of veth (aim: 50%)',
      '- MTU 1500 up: tender not measured',
      '- MTU 1500 down: vs slirp4netns: n/a; ✘ 7% of veth (aim: 50%)',
      '- TCP_RR (MTU 1500): ✘ 0.50× slirp4netns; ✘ 41% of veth (aim: 50%)',
    ]);
    expect(renderTargets({ ...r, options: { ...r.options, stacks: ['veth'] } })).toBe('');
  });

  it('formats throughput with enough digits that a collapsed stream is not zero', () => {
    expect([formatGbps(21.34), formatGbps(4.756), formatGbps(0.5), formatGbps(0.00224)]).toEqual(['21.3', '4.76', '0.50', '0.002']);
  });

  it('cuts long reasons and collapses whitespace', () => {
    expect(naText('a\n  b')).toBe('n/a (a b)');
    expect(naText('x'.repeat(100), 10)).toBe(`n/a (${'x'.repeat(9)}…)`);
  });
});

describe('statistics', () => {
  it('median and round-trip summary', () => {
    expect(median([])).toBeNull();
    expect(median([3, 1, 2])).toBe(2);
    expect(median([4, 1, 2, 3])).toBe(2.5);
    expect(summarize([30, 10, 20, 1000])).toEqual({ count: 4, meanUs: 265, medianUs: 25, p99Us: 1000, minUs: 10 });
  });

  it('the median lies between the smallest and largest sample', () => {
    fc.assert(
      fc.property(fc.array(fc.double({ min: 0, max: 1e6, noNaN: true }), { minLength: 1 }), (xs) => {
        const m = median(xs)!;
        expect(m).toBeGreaterThanOrEqual(Math.min(...xs));
        expect(m).toBeLessThanOrEqual(Math.max(...xs));
      }),
    );
  });
});
