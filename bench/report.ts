/**
 * Results of one bench run and their rendering: the markdown table, a Unicode bar chart, and
 * the block between the markers in docs/benchmarks.md. Pure functions, no I/O (unit-tested).
 */

export type Kind = 'up' | 'down' | 'rr';

export interface Cell {
  stack: string;
  mtu: number;
  kind: Kind;
  /** Gbit/s for up/down (median of the runs), median µs for rr; null when it failed. */
  value: number | null;
  /** Why the cell has no value (first failure), kept short. */
  error?: string;
  /** Every run's value (Gbit/s or µs), in order; a failed run is null. */
  runs: (number | null)[];
  /** Per-run details: iperf3 retransmits and intervals, or the RR statistics. */
  detail?: unknown[];
}

export interface BenchResults {
  version: 1;
  date: string;
  durationSeconds: number;
  machine: { kernel: string; cpu: string; cores: number; node: string; /** The kernel's default TCP congestion control (the guest's and the host sockets'). */ tcpCongestion?: string };
  /** Stack (or tool) name -> version string. */
  tools: Record<string, string>;
  options: { stacks: string[]; mtus: number[]; seconds: number; omit: number; repeat: number; rrCount: number; /** Absent in results from before it was an option (100). */ rrWarmup?: number; quick: boolean };
  /** Stack name -> the command lines that set it up, at the first MTU (the MTU is a flag in each). */
  commands: Record<string, string[]>;
  cells: Cell[];
}

export const BEGIN = '<!-- bench:begin -->';
export const END = '<!-- bench:end -->';

export function findCell(r: BenchResults, stack: string, mtu: number, kind: Kind): Cell | undefined {
  return r.cells.find((c) => c.stack === stack && c.mtu === mtu && c.kind === kind);
}

export function median(xs: number[]): number | null {
  if (!xs.length) return null;
  const s = [...xs].sort((a, b) => a - b);
  const n = s.length;
  return n % 2 ? s[(n - 1) / 2] : (s[n / 2 - 1] + s[n / 2]) / 2;
}

export function formatGbps(v: number): string {
  // Three decimals below 0.1 so a collapsed stream (a few Mbit/s) does not read as zero.
  return v >= 10 ? v.toFixed(1) : v >= 0.1 ? v.toFixed(2) : v.toFixed(3);
}

export function formatUs(v: number): string {
  return v >= 100 ? v.toFixed(0) : v.toFixed(1);
}

/** `n/a (reason)` with the reason cut to fit a table cell and made safe for markdown. */
export function naText(error: string | undefined, max = 60): string {
  let e = (error ?? 'not measured').replace(/\s+/g, ' ').trim();
  if (e.length > max) e = `${e.slice(0, max - 1)}…`;
  return `n/a (${e.replace(/\|/g, '\\|')})`;
}

function cellText(c: Cell | undefined): string {
  if (!c) return '–';
  if (c.value === null) return naText(c.error);
  const v = c.kind === 'rr' ? formatUs(c.value) : formatGbps(c.value);
  const failed = c.runs.filter((x) => x === null).length;
  return failed ? `${v} (${failed}/${c.runs.length} runs failed)` : v;
}

/** The MTU whose round-trip numbers the table shows: 1500 when measured, else the smallest. */
export function rrMtu(r: BenchResults): number {
  return r.options.mtus.includes(1500) ? 1500 : Math.min(...r.options.mtus);
}

/**
 * Rows: stacks in run order; columns: per MTU (largest first, as in the field notes) upload and
 * download Gbit/s, then the 1-byte round trip in µs.
 */
export function renderTable(r: BenchResults): string {
  const mtus = [...r.options.mtus].sort((a, b) => b - a);
  const rr = rrMtu(r);
  const head = ['stack', ...mtus.flatMap((m) => [`MTU ${m} up, Gbit/s`, `MTU ${m} down, Gbit/s`]), `1-byte TCP_RR, median µs (MTU ${rr})`];
  const align = ['---', ...mtus.flatMap(() => ['---:', '---:']), '---:'];
  const rows = r.options.stacks.map((s) => [
    s,
    ...mtus.flatMap((m) => [cellText(findCell(r, s, m, 'up')), cellText(findCell(r, s, m, 'down'))]),
    cellText(findCell(r, s, rr, 'rr')),
  ]);
  return [head, align, ...rows].map((cols) => `| ${cols.join(' | ')} |`).join('\n');
}

const BLOCKS = ['', '▏', '▎', '▍', '▌', '▋', '▊', '▉'];

/** A bar of `width` full cells for `max`, with eighth-cell resolution. */
export function bar(value: number, max: number, width = 40): string {
  if (!(max > 0) || !(value > 0)) return '';
  const eighths = Math.round((Math.min(value, max) / max) * width * 8);
  return '█'.repeat(Math.floor(eighths / 8)) + BLOCKS[eighths % 8];
}

/** One group of bars per (MTU, direction) and one for the round trip, scaled within the group. */
export function renderChart(r: BenchResults, width = 40): string {
  const mtus = [...r.options.mtus].sort((a, b) => b - a);
  const nameW = Math.max(...r.options.stacks.map((s) => s.length));
  const groups: { title: string; mtu: number; kind: Kind }[] = [
    ...mtus.flatMap((m) => [
      { title: `MTU ${m}, upload (guest → host), Gbit/s — longer is better`, mtu: m, kind: 'up' as Kind },
      { title: `MTU ${m}, download (host → guest), Gbit/s — longer is better`, mtu: m, kind: 'down' as Kind },
    ]),
    { title: `1-byte TCP round trip (MTU ${rrMtu(r)}), median µs — shorter is better`, mtu: rrMtu(r), kind: 'rr' },
  ];
  const out: string[] = [];
  for (const g of groups) {
    const cells = r.options.stacks.map((s) => ({ s, c: findCell(r, s, g.mtu, g.kind) }));
    const max = Math.max(0, ...cells.map(({ c }) => c?.value ?? 0));
    out.push(g.title);
    for (const { s, c } of cells) {
      const label = s.padEnd(nameW);
      if (!c) out.push(`  ${label}  –`);
      else if (c.value === null) out.push(`  ${label}  ${naText(c.error, 70)}`);
      else out.push(`  ${label}  ${bar(c.value, max, width)} ${g.kind === 'rr' ? formatUs(c.value) : formatGbps(c.value)}`);
    }
    out.push('');
  }
  return out.join('\n').trimEnd();
}

/**
 * The round trip's details per stack (medians over the runs): the measured median, the
 * warm-up's median (a JIT-compiled stack starts slower) and the CPU time the stack's own
 * process spent per round trip. Empty when no run recorded them (results from older runs).
 */
export function renderRrDetail(r: BenchResults): string {
  const mtu = rrMtu(r);
  const rows: string[] = [];
  for (const s of r.options.stacks) {
    const c = findCell(r, s, mtu, 'rr');
    const d = (c?.detail ?? []).filter((x): x is Partial<RrDetail> => typeof x === 'object' && x !== null);
    const pick = (k: keyof RrDetail) => median(d.map((x) => x[k]).filter((v): v is number => typeof v === 'number' && Number.isFinite(v)));
    const warm = pick('warmupMedianUs');
    const cpu = pick('stackCpuUs');
    if (c?.value == null && warm === null && cpu === null) continue;
    const f = (v: number | null) => (v === null ? '–' : formatUs(v));
    rows.push(`| ${s} | ${f(c?.value ?? null)} | ${f(warm)} | ${f(cpu)} |`);
  }
  if (!rows.some((x) => !x.endsWith('| – | – |'))) return '';
  return [
    `| stack (TCP_RR, MTU ${mtu}) | median µs | warm-up median µs | stack CPU µs per round trip |`,
    '| --- | ---: | ---: | ---: |',
    ...rows,
  ].join('\n');
}

/** The fields of a TCP_RR run's detail that renderRrDetail reads (see rr-stats.ts). */
interface RrDetail {
  warmupMedianUs: number;
  stackCpuUs: number;
}

const USER_MODE = ['slirp4netns', 'pasta'];

/**
 * Issue 3's targets for tender, cell by cell: at least slirp4netns; ahead of every other
 * user-mode stack; within half of veth. Empty when tender or the references were not measured.
 */
export function renderTargets(r: BenchResults, subject = 'tender'): string {
  if (!r.options.stacks.includes(subject)) return '';
  const mtus = [...r.options.mtus].sort((a, b) => b - a);
  const cols: { label: string; mtu: number; kind: Kind }[] = [
    ...mtus.flatMap((m) => [
      { label: `MTU ${m} up`, mtu: m, kind: 'up' as Kind },
      { label: `MTU ${m} down`, mtu: m, kind: 'down' as Kind },
    ]),
    { label: `TCP_RR (MTU ${rrMtu(r)})`, mtu: rrMtu(r), kind: 'rr' as Kind },
  ];
  const lines: string[] = [];
  for (const col of cols) {
    const t = findCell(r, subject, col.mtu, col.kind)?.value ?? null;
    if (t === null) {
      lines.push(`- ${col.label}: ${subject} not measured`);
      continue;
    }
    // Throughput: higher is better; round trip: lower is better. ratio > 1 means subject is better.
    const better = (ref: number) => (col.kind === 'rr' ? ref / t : t / ref);
    const fmt = (x: number) => `${x >= 10 ? x.toFixed(0) : x.toFixed(2)}×`;
    const parts: string[] = [];
    for (const s of USER_MODE.filter((x) => r.options.stacks.includes(x))) {
      const ref = findCell(r, s, col.mtu, col.kind)?.value ?? null;
      if (ref === null || ref <= 0) parts.push(`vs ${s}: n/a`);
      else parts.push(`${better(ref) >= 1 ? '✔' : '✘'} ${fmt(better(ref))} ${s}`);
    }
    const veth = r.options.stacks.includes('veth') ? (findCell(r, 'veth', col.mtu, col.kind)?.value ?? null) : null;
    if (veth !== null && veth > 0) parts.push(`${better(veth) >= 0.5 ? '✔' : '✘'} ${Math.round(better(veth) * 100)}% of veth (aim: 50%)`);
    lines.push(`- ${col.label}: ${parts.join('; ')}`);
  }
  return lines.join('\n');
}

/** The generated block for docs/benchmarks.md (without the markers). */
export function renderBlock(r: BenchResults): string {
  const o = r.options;
  const tools = Object.entries(r.tools).map(([k, v]) => `${k}: ${v}`).join('; ');
  const cmds = o.stacks
    .filter((s) => r.commands[s]?.length)
    .map((s) => `- ${s}:\n${r.commands[s].map((c) => `  - \`${c}\``).join('\n')}`)
    .join('\n');
  return [
    `Run on ${r.date} (${Math.round(r.durationSeconds)} s in all). Machine: ${r.machine.cpu}, ${r.machine.cores} cores, Linux ${r.machine.kernel}${r.machine.tcpCongestion ? ` (TCP congestion control ${r.machine.tcpCongestion})` : ''}, Node ${r.machine.node}.`,
    `Tools: ${tools}.`,
    `iperf3 \`-t ${o.seconds} -O ${o.omit}\`, ${o.repeat} run${o.repeat > 1 ? 's' : ''} per cell${o.repeat > 1 ? ' (median shown)' : ''}; TCP_RR: ${o.rrCount} sequential 1-byte round trips after ${o.rrWarmup ?? 100} warm-up round trips${r.cells.some((c) => c.kind === 'rr' && (c.detail ?? []).some((d) => (d as { roundMediansUs?: unknown } | null)?.roundMediansUs !== undefined)) ? ', all stacks running at once, in alternating rounds' : ''}.${o.quick ? ' **Quick run (1-second iperf3 tests): a sanity check, not a measurement.**' : ''}`,
    'Numbers are noisy on this shared 2-core machine: compare stacks only within one run.',
    '',
    renderTable(r),
    '',
    '```text',
    renderChart(r),
    '```',
    '',
    ...(renderRrDetail(r) ? [renderRrDetail(r), ''] : []),
    ...(renderTargets(r) ? ["Issue 3 targets for tender in this run (N× = tender's throughput over the other stack's, or the other's round trip over tender's: above 1× tender is ahead; ✔ met, ✘ not yet):", '', renderTargets(r), ''] : []),
    'How each stack was started (`NS` is the bench\'s namespace; the MTU differs per run):',
    '',
    cmds,
  ].join('\n');
}

/** Replace the text between the markers, or append a marked block when the markers are missing. */
export function replaceBlock(doc: string, block: string): string {
  const b = doc.indexOf(BEGIN);
  const e = doc.indexOf(END);
  const marked = `${BEGIN}\n${block}\n${END}`;
  if (b >= 0 && e > b) return doc.slice(0, b) + marked + doc.slice(e + END.length);
  return `${doc.replace(/\n*$/, '\n\n')}${marked}\n`;
}
