/** Plain-text tables for list commands (every list command also has --json). */
export function table(headers: string[], rows: (string | number | null | undefined)[][]): string {
  const cells = [headers, ...rows.map((r) => r.map((c) => (c === null || c === undefined || c === '' ? '-' : String(c))))];
  const widths = headers.map((_, i) => Math.max(...cells.map((r) => (r[i] ?? '').length)));
  return cells.map((r) => r.map((c, i) => (i === r.length - 1 ? c : (c ?? '').padEnd(widths[i]!))).join('  ')).join('\n') + '\n';
}

/** Progress lines on a TTY (overwritten in place), nothing otherwise. */
export function progress(): { update(msg: string): void; done(): void } {
  const tty = process.stderr.isTTY;
  let last = '';
  return {
    update(msg: string) {
      if (!tty) return;
      process.stderr.write(`\r\x1b[2K${msg}…`);
      last = msg;
    },
    done() {
      if (tty && last) process.stderr.write('\r\x1b[2K');
    },
  };
}
