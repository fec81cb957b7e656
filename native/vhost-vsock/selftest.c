/*
 * --selftest: the ring walk and the header codec against hand-built descriptor tables in a
 * fake guest memory, TAP-like output ("ok N - what" / "not ok N - what"), exit status 1 on
 * any failure. Run by test/unit/vhost-vsock-selftest.test.ts.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "virtq.h"

static int failures, count;

static void check(int cond, const char *what) {
  count++;
  printf("%s %d - %s\n", cond ? "ok" : "not ok", count, what);
  if (!cond) failures++;
}

#define QN 8
#define GPA_BASE 0x100000ull
#define MEM_SIZE 0x10000ull

/* Guest memory: descriptor table, avail and used rings at fixed offsets, buffers after. */
static uint8_t *guest;
static struct mem_table mt;
static struct vq q;

static struct vring_desc *desc_at(void) { return (struct vring_desc *)guest; }

static void setup(uint16_t start_idx) {
  memset(guest, 0, MEM_SIZE);
  mt.n = 1;
  mt.r[0] = (struct mem_region){.gpa = GPA_BASE, .size = MEM_SIZE, .uva = 0x7f0000000000ull, .host = guest};
  memset(&q, 0, sizeof q);
  q.num = QN;
  q.desc = mem_uva(&mt, 0x7f0000000000ull, 16 * QN);
  q.avail = mem_uva(&mt, 0x7f0000000000ull + 0x100, 4 + 2 * QN);
  q.used = mem_uva(&mt, 0x7f0000000000ull + 0x200, 4 + 8 * QN);
  q.avail->idx = start_idx;
  q.used->idx = start_idx;
  q.last_avail = start_idx;
  q.used_idx = start_idx;
}

static void put_desc(unsigned i, uint64_t gpa, uint32_t len, uint16_t flags, uint16_t next) {
  desc_at()[i] = (struct vring_desc){gpa, len, flags, next};
}

static void offer(uint16_t head) {
  q.avail->ring[q.avail->idx % QN] = head;
  q.avail->idx++;
}

/* The header of a REQUEST from guest CID 3 port 1025 to host port 1024, as the Linux
 * driver fills struct virtio_vsock_hdr (buf_alloc 256 KiB, fwd_cnt 0). */
static const uint8_t REQUEST_BYTES[VSOCK_HDR_LEN] = {
  0x03, 0, 0, 0, 0, 0, 0, 0,   /* src_cid 3 */
  0x02, 0, 0, 0, 0, 0, 0, 0,   /* dst_cid 2 */
  0x01, 0x04, 0, 0,            /* src_port 1025 */
  0x00, 0x04, 0, 0,            /* dst_port 1024 */
  0, 0, 0, 0,                  /* len 0 */
  0x01, 0x00,                  /* type STREAM */
  0x01, 0x00,                  /* op REQUEST */
  0, 0, 0, 0,                  /* flags */
  0x00, 0x00, 0x04, 0x00,      /* buf_alloc 262144 */
  0, 0, 0, 0,                  /* fwd_cnt */
};

int selftest(void) {
  guest = calloc(1, MEM_SIZE);
  if (!guest) return 2;

  /* header codec */
  struct vsock_hdr h;
  vsock_hdr_parse(REQUEST_BYTES, &h);
  check(h.src_cid == 3 && h.dst_cid == 2 && h.src_port == 1025 && h.dst_port == 1024 && h.len == 0 &&
            h.type == VSOCK_TYPE_STREAM && h.op == VSOCK_OP_REQUEST && h.flags == 0 && h.buf_alloc == 262144 && h.fwd_cnt == 0,
        "header parse: a Linux REQUEST");
  uint8_t out[VSOCK_HDR_LEN];
  vsock_hdr_emit(&h, out);
  check(memcmp(out, REQUEST_BYTES, VSOCK_HDR_LEN) == 0, "header emit: round trip is byte-identical");
  struct vsock_hdr big = {0xfffffffffffffffeull, 0x0123456789abcdefull, 0xffffffffu, 0x80000000u, 65536, 1, 7, 3, 0xdeadbeefu, 0xcafef00du};
  struct vsock_hdr back;
  vsock_hdr_emit(&big, out);
  vsock_hdr_parse(out, &back);
  check(back.src_cid == big.src_cid && back.dst_cid == big.dst_cid && back.src_port == big.src_port &&
            back.dst_port == big.dst_port && back.len == big.len && back.type == big.type && back.op == big.op &&
            back.flags == big.flags && back.buf_alloc == big.buf_alloc && back.fwd_cnt == big.fwd_cnt && out[8] == 0xef && out[15] == 0x01 && out[36] == 0xef && out[39] == 0xde,
        "header: extreme values, little-endian on the wire");

  /* memory translation */
  check(mem_gpa(&mt, 0, 1) == NULL, "gpa: before the region is refused");
  setup(0);
  check(mem_gpa(&mt, GPA_BASE, MEM_SIZE) == guest, "gpa: the whole region");
  check(mem_gpa(&mt, GPA_BASE + 1, MEM_SIZE) == NULL, "gpa: one byte past the end is refused");
  check(mem_gpa(&mt, 0xffffffffffffff00ull, 0x200) == NULL, "gpa: a wrapping address is refused");
  check(mem_gpa(&mt, GPA_BASE + 16, 0xfffffffffffffff8ull) == NULL, "gpa: a huge length is refused");

  /* a tx-style chain: 44-byte header + 2 payload buffers, all readable */
  struct vq_chain c;
  setup(0);
  check(vq_pop(&q, &mt, &c) == 0 && !vq_has_avail(&q), "ring: empty");
  memcpy(guest + 0x1000, REQUEST_BYTES, VSOCK_HDR_LEN);
  memcpy(guest + 0x2000, "hello ", 6);
  memcpy(guest + 0x3000, "world", 5);
  put_desc(5, GPA_BASE + 0x1000, VSOCK_HDR_LEN, VRING_DESC_F_NEXT, 2);
  put_desc(2, GPA_BASE + 0x2000, 6, VRING_DESC_F_NEXT, 7);
  put_desc(7, GPA_BASE + 0x3000, 5, 0, 0);
  offer(5);
  check(vq_has_avail(&q), "ring: has avail after an offer");
  int r = vq_pop(&q, &mt, &c);
  check(r == 1 && c.head == 5 && c.nr == 3 && c.nw == 0 && c.rd_len == VSOCK_HDR_LEN + 11, "ring: three readable descriptors, in next order");
  char text[16] = {0};
  check(chain_read(&c, VSOCK_HDR_LEN, text, 11) == 11 && !memcmp(text, "hello world", 11), "chain_read: across descriptors");
  check(chain_read(&c, VSOCK_HDR_LEN + 4, text, 100) == 7 && !memcmp(text, "o world", 7), "chain_read: clipped at the end");
  vq_push(&q, c.head, 0);
  check(q.used->idx == 1 && q.used->ring[0].id == 5 && q.used->ring[0].len == 0, "used: element and index");

  /* an rx-style chain: two writable buffers (header, payload) */
  put_desc(0, GPA_BASE + 0x4000, VSOCK_HDR_LEN, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1);
  put_desc(1, GPA_BASE + 0x5000, 4096, VRING_DESC_F_WRITE, 0);
  offer(0);
  r = vq_pop(&q, &mt, &c);
  check(r == 1 && c.nr == 0 && c.nw == 2 && c.wr_len == VSOCK_HDR_LEN + 4096, "ring: two writable descriptors");
  uint8_t pkt[VSOCK_HDR_LEN + 3];
  memcpy(pkt, REQUEST_BYTES, VSOCK_HDR_LEN);
  memcpy(pkt + VSOCK_HDR_LEN, "abc", 3);
  check(chain_write(&c, 0, pkt, sizeof pkt) == sizeof pkt && !memcmp(guest + 0x4000, REQUEST_BYTES, VSOCK_HDR_LEN) &&
            !memcmp(guest + 0x5000, "abc", 3),
        "chain_write: header into the first buffer, payload into the second");

  /* malformed chains */
  setup(0);
  put_desc(0, GPA_BASE, 16, VRING_DESC_F_NEXT, 1);
  put_desc(1, GPA_BASE, 16, VRING_DESC_F_NEXT, 0); /* 0 -> 1 -> 0 ... */
  offer(0);
  check(vq_pop(&q, &mt, &c) == -1 && q.last_avail == 1, "ring: a descriptor loop is refused (and consumed)");
  put_desc(2, GPA_BASE, 16, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 3);
  put_desc(3, GPA_BASE, 16, 0, 0);
  offer(2);
  check(vq_pop(&q, &mt, &c) == -1, "ring: readable after writable is refused");
  put_desc(4, GPA_BASE + MEM_SIZE - 8, 16, 0, 0);
  offer(4);
  check(vq_pop(&q, &mt, &c) == -1, "ring: a buffer outside guest memory is refused");
  offer(QN + 3);
  check(vq_pop(&q, &mt, &c) == -1, "ring: a head index past the table is refused");
  put_desc(5, GPA_BASE, 16, VRING_DESC_F_NEXT, QN);
  offer(5);
  check(vq_pop(&q, &mt, &c) == -1, "ring: a next index past the table is refused");
  put_desc(6, GPA_BASE, 16, VRING_DESC_F_INDIRECT, 0);
  offer(6);
  check(vq_pop(&q, &mt, &c) == -1, "ring: indirect (not negotiated) is refused");

  /* index wrap: 16-bit indices run past 65535 */
  setup(65534);
  for (int i = 0; i < 4; i++) {
    put_desc((unsigned)i, GPA_BASE + 0x1000, VSOCK_HDR_LEN, 0, 0);
    offer((uint16_t)i);
  }
  int ok = 1;
  for (int i = 0; i < 4; i++) {
    r = vq_pop(&q, &mt, &c);
    ok = ok && r == 1 && c.head == i;
    vq_push(&q, c.head, (uint32_t)i);
  }
  check(ok && vq_pop(&q, &mt, &c) == 0, "ring: avail index wraps 65534 -> 2");
  check(q.used->idx == 2 && q.used->ring[65534 % QN].id == 0 && q.used->ring[1].id == 3 && q.used->ring[1].len == 3,
        "used: index wraps, slots are index mod size");

  /* notification suppression */
  q.avail->flags = VRING_AVAIL_F_NO_INTERRUPT;
  check(!vq_should_notify(&q), "notify: suppressed by VRING_AVAIL_F_NO_INTERRUPT");
  q.avail->flags = 0;
  check(vq_should_notify(&q), "notify: wanted otherwise");

  free(guest);
  printf("1..%d\n", count);
  return failures ? 1 : 0;
}
