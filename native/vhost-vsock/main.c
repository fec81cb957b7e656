/*
 * tender-vhost-vsock: a vhost-user virtio-vsock device for QEMU, with Firecracker's "hybrid
 * vsock" on the host side, so guests get AF_VSOCK without /dev/vhost-vsock or privileges.
 *
 *   tender-vhost-vsock --socket VU_SOCK --uds BASE [--cid N] [-v]
 *   tender-vhost-vsock --selftest
 *
 * QEMU connects to VU_SOCK (`-chardev socket,id=vv,path=VU_SOCK -device
 * vhost-user-vsock-device,chardev=vv`) and hands over guest RAM (memfd, share=on) and the
 * rings. Host side, as in Firecracker and cloud-hypervisor:
 * - guest connects to (CID 2, port P): we connect to the unix socket BASE_P;
 * - a host client connects to BASE and writes "CONNECT <port>\n": we send the guest a
 *   REQUEST for <port>; on its RESPONSE the client reads "OK <hostport>\n", then bytes.
 * One QEMU connection per process: when QEMU hangs up (it exited, or the guest powered off)
 * we exit 0 and the supervisor starts a fresh helper for the next boot.
 *
 * Single-threaded and poll()-driven: the vhost-user socket, the tx/rx kick eventfds, the host
 * listener and every host connection are in one pollfd set rebuilt each round; a host
 * connection is polled for input only while the guest has given us credit and rx buffers,
 * so nothing spins. Prints "READY" on stdout once both sockets listen.
 */

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "vhost_user.h"
#include "virtq.h"

int selftest(void);

#define RXQ 0
#define TXQ 1
#define EVQ 2
#define NQ 3

/* What we advertise as our receive buffer per connection (buf_alloc, 5.10.6.3). */
#define BUF_ALLOC (256u * 1024u)
#define MAX_PKT (64u * 1024u)
#define MAX_CONNS 1024
#define MAX_PENDING 64
#define CTRLQ_LEN 1024
/* Host-initiated connections get local ports from here, like Firecracker (1 << 30). */
#define LOCAL_PORT_BASE (1u << 30)

static int verbose;
static void logf_(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fprintf(stderr, "tender-vhost-vsock: ");
  vfprintf(stderr, fmt, ap);
  fputc('\n', stderr);
  va_end(ap);
}
#define LOG(...) logf_(__VA_ARGS__)
#define DBG(...) do { if (verbose) logf_(__VA_ARGS__); } while (0)

/*
 * Every packet, descriptor chain or host request the helper drops or refuses counts here, by
 * name, so "why did that connection die" has an answer without -v. Read live with `STATS\n`
 * on the host socket; printed to stderr (vhost-vsock.log) when the helper exits. Names are
 * stable (docs/vsock.md lists them).
 */
#define DROP_COUNTERS(X)                                                                          \
  X(tx_bad_chain)         /* tx chain refused by the ring walk (loop, indirect, outside memory) */ \
  X(tx_short_packet)      /* tx chain shorter than the 44-byte header */                         \
  X(tx_bad_cid)           /* not from the guest's CID to CID 2: dropped */                       \
  X(tx_not_stream)        /* SEQPACKET or another type: reset */                                 \
  X(tx_unknown_conn)      /* a packet for no connection of ours: reset (RST itself: dropped) */  \
  X(tx_bad_state)         /* RESPONSE or RW where the connection state allows none: reset */    \
  X(tx_bad_op)            /* an op virtio-vsock does not define: reset */                        \
  X(tx_credit_overrun)    /* the guest sent beyond the credit we gave: reset */                  \
  X(tx_duplicate_request) /* REQUEST for a connection that exists: reset */                      \
  X(tx_request_refused)   /* REQUEST to a port nobody listens on (BASE_P), or no free slot: RST */ \
  X(rx_bad_chain)         /* rx buffer refused (bad chain, or too small for a header) */         \
  X(ctrl_queue_full)      /* a control packet (RST, RESPONSE, credit) not sent: queue full */    \
  X(host_write_failed)    /* writing the guest's bytes to the host socket failed: reset */       \
  X(host_pending_full)    /* a host client closed: too many waiting for their CONNECT line */   \
  X(host_bad_line)        /* a host client's line was not CONNECT <port> or STATS */             \
  X(host_conn_table_full) /* CONNECT refused: no free connection slot */                         \
  X(vu_unsupported)       /* a vhost-user request we do not serve (ignored) */

static struct {
#define X(name) uint64_t name;
  DROP_COUNTERS(X)
#undef X
} drops;

/* Count a drop; evaluates to the count before (so `if (!DROP(x)) LOG(...)` logs the first). */
static int stats_dirty;
#define DROP(name) (stats_dirty = 1, drops.name++)
static char stats_path[112];

/* "STATS name=N name=N ...\n" */
static int format_stats(char *out, size_t size) {
  int n = snprintf(out, size, "STATS");
#define X(name) if (n >= 0 && (size_t)n < size) n += snprintf(out + n, size - (size_t)n, " %s=%" PRIu64, #name, drops.name);
  DROP_COUNTERS(X)
#undef X
  if (n >= 0 && (size_t)n < size) n += snprintf(out + n, size - (size_t)n, "\n");
  return n;
}

/*
 * `<uds>.stats`: the STATS line as a file, rewritten (through a rename) at most once a second
 * while counters change, so the daemon reads it without a round trip (`machine inspect`).
 */
static void write_stats_file(void) {
  char line[1024], tmp[sizeof stats_path + 8];
  int n = format_stats(line, sizeof line);
  snprintf(tmp, sizeof tmp, "%s.tmp", stats_path);
  int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return;
  int ok = n > 0 && write(fd, line, (size_t)n) == n;
  close(fd);
  if (ok) rename(tmp, stats_path);
  else unlink(tmp);
  stats_dirty = 0;
}

/* ---- device state ---- */

struct vring {
  struct vq q;
  uint64_t desc_uva, avail_uva, used_uva;
  int addr_set, enabled, started;
  int kick, call, err;
};

static struct {
  uint64_t features, protocol_features;
  struct mem_table mem;
  struct vring vr[NQ];
  uint64_t cid;
} dev;

enum { C_FREE = 0, C_CONNECTING, C_ESTABLISHED, C_CLOSING };

struct conn {
  int state;
  int fd;
  uint32_t host_port, guest_port;
  /* guest's receive side, from the headers it sends */
  uint32_t peer_buf_alloc, peer_fwd_cnt;
  uint32_t tx_cnt;           /* bytes we sent the guest */
  /* our receive side */
  uint32_t rx_cnt;           /* bytes the guest sent us */
  uint32_t fwd_cnt;          /* of those, written to the host socket */
  uint32_t fwd_cnt_sent;     /* fwd_cnt the guest last heard from us */
  uint8_t *pend;             /* rx_cnt - fwd_cnt bytes waiting for the host socket */
  size_t pend_len;
  uint32_t peer_shut;        /* VSOCK_SHUTDOWN_* the guest sent */
  int host_eof;              /* host socket hit EOF; we sent SHUTDOWN(SEND) */
  int wr_shut;               /* shutdown(SHUT_WR) done */
};

static struct conn conns[MAX_CONNS];

struct pending { int fd; char line[48]; size_t n; };
static struct pending pend_clients[MAX_PENDING];

static struct vsock_hdr ctrlq[CTRLQ_LEN];
static unsigned ctrl_head, ctrl_len;

static int vu_listen = -1, vu_conn = -1, host_listen = -1;
static char uds_base[100];
static uint32_t next_local_port = LOCAL_PORT_BASE;
static int rx_dirty, tx_dirty;
static volatile sig_atomic_t stop;

static uint32_t conn_credit(const struct conn *c) {
  // 5.10.6.3: what the peer can still take = its buf_alloc - (what we sent - what it consumed).
  uint32_t in_flight = c->tx_cnt - c->peer_fwd_cnt;
  return in_flight >= c->peer_buf_alloc ? 0 : c->peer_buf_alloc - in_flight;
}

static struct conn *conn_find(uint32_t host_port, uint32_t guest_port) {
  for (int i = 0; i < MAX_CONNS; i++)
    if (conns[i].state != C_FREE && conns[i].host_port == host_port && conns[i].guest_port == guest_port) return &conns[i];
  return NULL;
}

static struct conn *conn_new(int fd, uint32_t host_port, uint32_t guest_port) {
  for (int i = 0; i < MAX_CONNS; i++) {
    struct conn *c = &conns[i];
    if (c->state != C_FREE) continue;
    uint8_t *pend = malloc(BUF_ALLOC);
    if (!pend) return NULL;
    memset(c, 0, sizeof *c);
    c->fd = fd;
    c->host_port = host_port;
    c->guest_port = guest_port;
    c->pend = pend;
    c->state = C_ESTABLISHED;
    return c;
  }
  return NULL;
}

static void conn_free(struct conn *c) {
  if (c->fd >= 0) close(c->fd);
  free(c->pend);
  memset(c, 0, sizeof *c);
  c->fd = -1;
}

static void ctrl_push(uint32_t src_port, uint32_t dst_port, uint16_t op, uint32_t flags, const struct conn *c) {
  if (ctrl_len == CTRLQ_LEN) {
    if (!DROP(ctrl_queue_full)) LOG("control queue full: dropping op %u (counted in ctrl_queue_full)", op);
    return;
  }
  struct vsock_hdr *h = &ctrlq[(ctrl_head + ctrl_len++) % CTRLQ_LEN];
  memset(h, 0, sizeof *h);
  h->src_cid = VSOCK_HOST_CID;
  h->dst_cid = dev.cid;
  h->src_port = src_port;
  h->dst_port = dst_port;
  h->type = VSOCK_TYPE_STREAM;
  h->op = op;
  h->flags = flags;
  h->buf_alloc = c ? BUF_ALLOC : 0;
  h->fwd_cnt = c ? c->fwd_cnt : 0;
}

static void conn_ctrl(struct conn *c, uint16_t op, uint32_t flags) {
  ctrl_push(c->host_port, c->guest_port, op, flags, c);
  c->fwd_cnt_sent = c->fwd_cnt;
}

/* Tear down from the host side: RST to the guest, close the socket. */
static void conn_reset(struct conn *c) {
  ctrl_push(c->host_port, c->guest_port, VSOCK_OP_RST, 0, NULL);
  conn_free(c);
}

static void drop_all_conns(void) {
  for (int i = 0; i < MAX_CONNS; i++)
    if (conns[i].state != C_FREE) conn_free(&conns[i]);
  for (int i = 0; i < MAX_PENDING; i++)
    if (pend_clients[i].fd >= 0) { close(pend_clients[i].fd); pend_clients[i].fd = -1; }
  ctrl_len = 0;
}

/* ---- rings ---- */

static int ring_live(int i) {
  struct vring *r = &dev.vr[i];
  return r->started && r->enabled && r->addr_set;
}

static void notify(int i) {
  struct vring *r = &dev.vr[i];
  if (r->call >= 0 && vq_should_notify(&r->q)) {
    uint64_t one = 1;
    if (write(r->call, &one, 8) < 0 && errno != EAGAIN) LOG("call eventfd: %s", strerror(errno));
  }
}

/* Send control packets, then data, into the guest's rx buffers. */
static void rx_ctrl(void) {
  struct vring *r = &dev.vr[RXQ];
  struct vq_chain ch;
  while (ctrl_len && ring_live(RXQ)) {
    int got = vq_pop(&r->q, &dev.mem, &ch);
    if (got == 0) return;
    if (got < 0 || ch.wr_len < VSOCK_HDR_LEN) {
      if (!DROP(rx_bad_chain)) LOG("rx: bad chain from the guest (counted in rx_bad_chain)");
      vq_push(&r->q, ch.head, 0);
      rx_dirty = 1;
      continue;
    }
    uint8_t b[VSOCK_HDR_LEN];
    vsock_hdr_emit(&ctrlq[ctrl_head], b);
    ctrl_head = (ctrl_head + 1) % CTRLQ_LEN;
    ctrl_len--;
    chain_write(&ch, 0, b, VSOCK_HDR_LEN);
    vq_push(&r->q, ch.head, VSOCK_HDR_LEN);
    rx_dirty = 1;
  }
}

static int conn_wants_input(const struct conn *c) {
  return c->state == C_ESTABLISHED && !c->host_eof && conn_credit(c) > 0 && ring_live(RXQ) && vq_has_avail(&dev.vr[RXQ].q);
}

/* Host socket readable: move bytes into rx buffers while credit and buffers last. */
static void conn_pump_in(struct conn *c) {
  static uint8_t buf[MAX_PKT];
  struct vring *r = &dev.vr[RXQ];
  for (int n = 0; n < 64 && conn_wants_input(c) && !ctrl_len; n++) {
    struct vq_chain ch;
    int got = vq_pop(&r->q, &dev.mem, &ch);
    if (got == 0) return;
    if (got < 0 || ch.wr_len <= VSOCK_HDR_LEN) {
      DROP(rx_bad_chain);
      vq_push(&r->q, ch.head, 0);
      rx_dirty = 1;
      continue;
    }
    size_t want = ch.wr_len - VSOCK_HDR_LEN;
    if (want > MAX_PKT) want = MAX_PKT;
    if (want > conn_credit(c)) want = conn_credit(c);
    ssize_t got_n = read(c->fd, buf, want);
    if (got_n < 0 && (errno == EAGAIN || errno == EINTR)) {
      r->q.last_avail--; /* not consumed: the avail entry is still the guest's */
      return;
    }
    struct vsock_hdr h = {.src_cid = VSOCK_HOST_CID, .dst_cid = dev.cid, .src_port = c->host_port,
                          .dst_port = c->guest_port, .type = VSOCK_TYPE_STREAM, .buf_alloc = BUF_ALLOC, .fwd_cnt = c->fwd_cnt};
    int gone = 0;
    if (got_n > 0) {
      h.op = VSOCK_OP_RW;
      h.len = (uint32_t)got_n;
      c->tx_cnt += (uint32_t)got_n;
    } else if (got_n == 0) {
      // The host will send no more: the guest reads EOF, and may still write to us.
      h.op = VSOCK_OP_SHUTDOWN;
      h.flags = VSOCK_SHUTDOWN_SEND;
      c->host_eof = 1;
    } else {
      h.op = VSOCK_OP_RST;
      h.buf_alloc = h.fwd_cnt = 0;
      gone = 1;
    }
    c->fwd_cnt_sent = c->fwd_cnt;
    uint8_t b[VSOCK_HDR_LEN];
    vsock_hdr_emit(&h, b);
    chain_write(&ch, 0, b, VSOCK_HDR_LEN);
    if (got_n > 0) chain_write(&ch, VSOCK_HDR_LEN, buf, (size_t)got_n);
    vq_push(&r->q, ch.head, VSOCK_HDR_LEN + (got_n > 0 ? (uint32_t)got_n : 0));
    rx_dirty = 1;
    if (gone) { conn_free(c); return; }
    if (got_n == 0) return;
  }
}

/* Write what the guest sent to the host socket; returns -1 when the connection is gone. */
static int conn_flush_out(struct conn *c) {
  while (c->pend_len) {
    ssize_t n = write(c->fd, c->pend, c->pend_len);
    if (n < 0) {
      if (errno == EAGAIN || errno == EINTR) break;
      DROP(host_write_failed);
      conn_reset(c);
      return -1;
    }
    memmove(c->pend, c->pend + n, c->pend_len - (size_t)n);
    c->pend_len -= (size_t)n;
    c->fwd_cnt += (uint32_t)n;
  }
  if (!c->pend_len && c->state == C_CLOSING) {
    // The guest shut down both ways (and waits for our RST, 5.10.6.6) and everything it sent is out.
    conn_reset(c);
    return -1;
  }
  if (!c->pend_len && (c->peer_shut & VSOCK_SHUTDOWN_SEND) && !c->wr_shut) {
    shutdown(c->fd, SHUT_WR);
    c->wr_shut = 1;
  }
  // Tell the guest about freed space before it runs dry (the Linux driver waits for an
  // update rather than asking when its credit is 0).
  uint32_t unseen = c->fwd_cnt - c->fwd_cnt_sent;
  uint32_t guest_view = BUF_ALLOC - (c->rx_cnt - c->fwd_cnt_sent);
  if (unseen && (unseen >= BUF_ALLOC / 4 || guest_view < MAX_PKT)) conn_ctrl(c, VSOCK_OP_CREDIT_UPDATE, 0);
  return 0;
}

static void guest_request(const struct vsock_hdr *h) {
  if (conn_find(h->dst_port, h->src_port)) {
    DROP(tx_duplicate_request);
    ctrl_push(h->dst_port, h->src_port, VSOCK_OP_RST, 0, NULL);
    return;
  }
  char path[sizeof(((struct sockaddr_un *)0)->sun_path)];
  struct sockaddr_un sa = {.sun_family = AF_UNIX};
  int fd = -1;
  if ((size_t)snprintf(path, sizeof path, "%s_%" PRIu32, uds_base, h->dst_port) < sizeof path) {
    memcpy(sa.sun_path, path, strlen(path) + 1);
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    // Unix stream connect is immediate, or EAGAIN when the listener's backlog is full.
    if (fd >= 0 && connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
      DBG("connect %s: %s", path, strerror(errno));
      close(fd);
      fd = -1;
    }
  }
  struct conn *c = fd >= 0 ? conn_new(fd, h->dst_port, h->src_port) : NULL;
  if (!c) {
    if (fd >= 0) close(fd);
    DROP(tx_request_refused);
    ctrl_push(h->dst_port, h->src_port, VSOCK_OP_RST, 0, NULL);
    return;
  }
  c->peer_buf_alloc = h->buf_alloc;
  c->peer_fwd_cnt = h->fwd_cnt;
  DBG("guest port %u -> %s", h->src_port, path);
  conn_ctrl(c, VSOCK_OP_RESPONSE, 0);
}

/* One packet from the guest's tx queue. */
static void guest_packet(const struct vsock_hdr *h, const struct vq_chain *ch) {
  if (h->src_cid != dev.cid || h->dst_cid != VSOCK_HOST_CID) {
    DBG("tx: drop cid %" PRIu64 " -> %" PRIu64, h->src_cid, h->dst_cid);
    DROP(tx_bad_cid);
    return;
  }
  if (h->type != VSOCK_TYPE_STREAM) {
    DROP(tx_not_stream);
    if (h->op != VSOCK_OP_RST) ctrl_push(h->dst_port, h->src_port, VSOCK_OP_RST, 0, NULL);
    return;
  }
  if (h->op == VSOCK_OP_REQUEST) {
    guest_request(h);
    return;
  }
  struct conn *c = conn_find(h->dst_port, h->src_port);
  if (!c) {
    // 5.10.6.4: anything but RST for a connection we do not know is answered with RST.
    DROP(tx_unknown_conn);
    if (h->op != VSOCK_OP_RST) ctrl_push(h->dst_port, h->src_port, VSOCK_OP_RST, 0, NULL);
    return;
  }
  c->peer_buf_alloc = h->buf_alloc;
  c->peer_fwd_cnt = h->fwd_cnt;
  switch (h->op) {
  case VSOCK_OP_RESPONSE:
    if (c->state != C_CONNECTING) { DROP(tx_bad_state); conn_reset(c); return; }
    c->state = C_ESTABLISHED;
    {
      char ok[32];
      int n = snprintf(ok, sizeof ok, "OK %" PRIu32 "\n", c->host_port);
      // A fresh socket's buffer always takes these few bytes.
      if (write(c->fd, ok, (size_t)n) != n) conn_reset(c);
    }
    return;
  case VSOCK_OP_RST:
    conn_free(c);
    return;
  case VSOCK_OP_SHUTDOWN:
    c->peer_shut |= h->flags & (VSOCK_SHUTDOWN_RCV | VSOCK_SHUTDOWN_SEND);
    if (c->peer_shut == (VSOCK_SHUTDOWN_RCV | VSOCK_SHUTDOWN_SEND)) c->state = C_CLOSING;
    conn_flush_out(c);
    return;
  case VSOCK_OP_RW: {
    if (c->state == C_CONNECTING) { DROP(tx_bad_state); conn_reset(c); return; }
    uint32_t len = h->len;
    if (len > ch->rd_len - VSOCK_HDR_LEN) len = (uint32_t)(ch->rd_len - VSOCK_HDR_LEN);
    if (c->pend_len + len > BUF_ALLOC) {
      LOG("guest port %u overran its credit: reset", h->src_port);
      DROP(tx_credit_overrun);
      conn_reset(c);
      return;
    }
    chain_read(ch, VSOCK_HDR_LEN, c->pend + c->pend_len, len);
    c->pend_len += len;
    c->rx_cnt += len;
    conn_flush_out(c);
    return;
  }
  case VSOCK_OP_CREDIT_UPDATE:
    return; /* the credit fields were taken above */
  case VSOCK_OP_CREDIT_REQUEST:
    conn_ctrl(c, VSOCK_OP_CREDIT_UPDATE, 0);
    return;
  default:
    DROP(tx_bad_op);
    conn_reset(c);
  }
}

static void tx_process(void) {
  struct vring *r = &dev.vr[TXQ];
  struct vq_chain ch;
  while (ring_live(TXQ)) {
    int got = vq_pop(&r->q, &dev.mem, &ch);
    if (got == 0) break;
    if (got > 0 && ch.rd_len >= VSOCK_HDR_LEN) {
      uint8_t b[VSOCK_HDR_LEN];
      struct vsock_hdr h;
      chain_read(&ch, 0, b, VSOCK_HDR_LEN);
      vsock_hdr_parse(b, &h);
      guest_packet(&h, &ch);
    } else if (got < 0) {
      if (!DROP(tx_bad_chain)) LOG("tx: bad chain from the guest (counted in tx_bad_chain)");
    } else {
      DROP(tx_short_packet);
    }
    vq_push(&r->q, ch.head, 0);
    tx_dirty = 1;
  }
}

/* ---- vhost-user ---- */

static void mem_unmap(void) {
  for (unsigned i = 0; i < dev.mem.n; i++) munmap(dev.mem.r[i].map, dev.mem.r[i].map_len);
  dev.mem.n = 0;
}

static void vring_stop(struct vring *r) {
  if (r->kick >= 0) close(r->kick);
  r->kick = -1;
  r->started = 0;
}

static void vring_reset(struct vring *r) {
  vring_stop(r);
  if (r->call >= 0) close(r->call);
  if (r->err >= 0) close(r->err);
  memset(r, 0, sizeof *r);
  r->kick = r->call = r->err = -1;
}

static void dev_reset(void) {
  for (int i = 0; i < NQ; i++) vring_reset(&dev.vr[i]);
  mem_unmap();
  drop_all_conns();
  dev.features = dev.protocol_features = 0;
}

static int vring_map(struct vring *r) {
  unsigned num = r->q.num;
  r->q.desc = mem_uva(&dev.mem, r->desc_uva, 16ull * num);
  r->q.avail = mem_uva(&dev.mem, r->avail_uva, 4 + 2ull * num);
  r->q.used = mem_uva(&dev.mem, r->used_uva, 4 + 8ull * num);
  if (!r->q.desc || !r->q.avail || !r->q.used) return -1;
  // Continue from where the used ring is (a restarted ring keeps its index).
  r->q.used_idx = r->q.used->idx;
  return 0;
}

static int vu_send(const struct vu_hdr *req, const void *payload, uint32_t size) {
  uint8_t buf[VHOST_USER_HDR_SIZE + sizeof(struct vu_config)];
  struct vu_hdr h = {req->request, VHOST_USER_VERSION | VHOST_USER_REPLY_MASK, size};
  memcpy(buf, &h, sizeof h);
  memcpy(buf + VHOST_USER_HDR_SIZE, payload, size);
  size_t len = VHOST_USER_HDR_SIZE + size;
  return send(vu_conn, buf, len, MSG_NOSIGNAL) == (ssize_t)len ? 0 : -1;
}

static int vu_reply_u64(const struct vu_hdr *req, uint64_t v) { return vu_send(req, &v, 8); }

/* Returns -1 when QEMU hung up or spoke nonsense: the helper then exits. */
static int vu_handle(void) {
  struct vu_hdr h;
  union { uint64_t u64; struct vu_state st; struct vu_addr addr; struct vu_mem mem; struct vu_config cfg; uint8_t raw[512]; } p;
  int fds[VHOST_USER_MAX_FDS];
  int nfds = 0;
  char cbuf[CMSG_SPACE(sizeof fds)];
  struct iovec iov = {&h, sizeof h};
  struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof cbuf};
  ssize_t n = recvmsg(vu_conn, &mh, MSG_CMSG_CLOEXEC);
  if (n == 0) { DBG("QEMU hung up"); return -1; }
  if (n != sizeof h) { LOG("vhost-user: short header (%zd)", n); return -1; }
  for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm)) {
    if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_RIGHTS) {
      nfds = (int)((cm->cmsg_len - CMSG_LEN(0)) / sizeof(int));
      memcpy(fds, CMSG_DATA(cm), (size_t)nfds * sizeof(int));
    }
  }
  int rc = 0;
  if (h.size > sizeof p) { LOG("vhost-user: request %u too big (%u)", h.request, h.size); rc = -1; goto out; }
  if (h.size && recv(vu_conn, &p, h.size, MSG_WAITALL) != (ssize_t)h.size) { LOG("vhost-user: short payload"); rc = -1; goto out; }
  DBG("vhost-user request %u size %u fds %d", h.request, h.size, nfds);
  int replied = 0;
  switch (h.request) {
  case VHOST_USER_GET_FEATURES:
    rc = vu_reply_u64(&h, (1ull << VIRTIO_F_VERSION_1) | (1ull << VHOST_USER_F_PROTOCOL_FEATURES));
    replied = 1;
    break;
  case VHOST_USER_SET_FEATURES:
    dev.features = p.u64;
    // Without protocol features, rings are enabled as soon as they start (vhost-user.rst, "Ring states").
    if (!(dev.features & (1ull << VHOST_USER_F_PROTOCOL_FEATURES)))
      for (int i = 0; i < NQ; i++) dev.vr[i].enabled = 1;
    break;
  case VHOST_USER_GET_PROTOCOL_FEATURES:
    rc = vu_reply_u64(&h, (1ull << VHOST_USER_PROTOCOL_F_CONFIG) | (1ull << VHOST_USER_PROTOCOL_F_REPLY_ACK));
    replied = 1;
    break;
  case VHOST_USER_SET_PROTOCOL_FEATURES:
    dev.protocol_features = p.u64;
    break;
  case VHOST_USER_SET_OWNER:
    break;
  case VHOST_USER_RESET_OWNER:
    dev_reset();
    break;
  case VHOST_USER_SET_MEM_TABLE: {
    if (h.size < 8 || p.mem.nregions > VQ_MAX_REGIONS || h.size < 8 + 32 * p.mem.nregions || (int)p.mem.nregions != nfds) { rc = -1; break; }
    mem_unmap();
    for (uint32_t i = 0; i < p.mem.nregions; i++) {
      struct vu_region *vr = &p.mem.r[i];
      size_t len = vr->size + vr->mmap_offset;
      void *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fds[i], 0);
      if (m == MAP_FAILED) { LOG("mmap region %u: %s", i, strerror(errno)); rc = -1; break; }
      dev.mem.r[i] = (struct mem_region){vr->gpa, vr->size, vr->uva, (uint8_t *)m + vr->mmap_offset, m, len};
      dev.mem.n = i + 1;
      DBG("region %u gpa %#" PRIx64 " size %#" PRIx64 " uva %#" PRIx64, i, vr->gpa, vr->size, vr->uva);
    }
    // Ring pointers were into the old mappings: translate again.
    for (int i = 0; i < NQ; i++)
      if (dev.vr[i].addr_set && vring_map(&dev.vr[i]) < 0) dev.vr[i].addr_set = 0;
    break;
  }
  case VHOST_USER_SET_VRING_NUM:
    if (p.st.index >= NQ || !p.st.num || p.st.num > 32768 || (p.st.num & (p.st.num - 1))) { rc = -1; break; }
    dev.vr[p.st.index].q.num = p.st.num;
    break;
  case VHOST_USER_SET_VRING_BASE:
    if (p.st.index >= NQ) { rc = -1; break; }
    dev.vr[p.st.index].q.last_avail = (uint16_t)p.st.num;
    break;
  case VHOST_USER_SET_VRING_ADDR: {
    if (p.addr.index >= NQ) { rc = -1; break; }
    struct vring *r = &dev.vr[p.addr.index];
    r->desc_uva = p.addr.desc;
    r->avail_uva = p.addr.avail;
    r->used_uva = p.addr.used;
    r->addr_set = vring_map(r) == 0;
    if (!r->addr_set) LOG("ring %u: addresses outside guest memory", p.addr.index);
    break;
  }
  case VHOST_USER_GET_VRING_BASE: {
    if (p.st.index >= NQ) { rc = -1; break; }
    struct vring *r = &dev.vr[p.st.index];
    // Stopping a ring: the driver is resetting the device (reboot, QEMU stopping). Host
    // connections do not survive a device reset (the guest's sockets are gone too).
    vring_stop(r);
    if (p.st.index == RXQ) drop_all_conns();
    struct vu_state st = {p.st.index, r->q.last_avail};
    rc = vu_send(&h, &st, sizeof st);
    replied = 1;
    break;
  }
  case VHOST_USER_SET_VRING_KICK:
  case VHOST_USER_SET_VRING_CALL:
  case VHOST_USER_SET_VRING_ERR: {
    unsigned idx = p.u64 & VHOST_USER_VRING_IDX_MASK;
    int nofd = (p.u64 & VHOST_USER_VRING_NOFD_MASK) != 0;
    if (idx >= NQ || (!nofd && nfds != 1)) { rc = -1; break; }
    struct vring *r = &dev.vr[idx];
    int fd = nofd ? -1 : fds[0];
    nfds = 0; /* kept */
    if (h.request == VHOST_USER_SET_VRING_KICK) {
      if (r->kick >= 0) close(r->kick);
      r->kick = fd;
      // A ring starts on its kick fd (vhost-user.rst, "Starting and stopping rings").
      r->started = fd >= 0;
      if (fd < 0) LOG("ring %u: polling mode (no kick fd) is not supported", idx);
    } else if (h.request == VHOST_USER_SET_VRING_CALL) {
      if (r->call >= 0) close(r->call);
      r->call = fd;
    } else {
      if (r->err >= 0) close(r->err);
      r->err = fd;
    }
    break;
  }
  case VHOST_USER_SET_VRING_ENABLE:
    if (p.st.index >= NQ) { rc = -1; break; }
    dev.vr[p.st.index].enabled = p.st.num != 0;
    break;
  case VHOST_USER_GET_CONFIG: {
    // struct virtio_vsock_config { le64 guest_cid; } (5.10.4)
    uint8_t cfg[8];
    memcpy(cfg, &dev.cid, 8);
    if (h.size < 12 || p.cfg.size > sizeof p.cfg.region || 12 + p.cfg.size > h.size) { rc = -1; break; }
    memset(p.cfg.region, 0, p.cfg.size);
    for (uint32_t i = 0; i < p.cfg.size; i++)
      if (p.cfg.offset + i < sizeof cfg) p.cfg.region[i] = cfg[p.cfg.offset + i];
    rc = vu_send(&h, &p, h.size);
    replied = 1;
    break;
  }
  case VHOST_USER_SET_CONFIG:
    break; /* guest_cid is read-only for the driver */
  default:
    LOG("vhost-user: unsupported request %u (ignored)", h.request);
    DROP(vu_unsupported);
    break;
  }
  // REPLY_ACK: a request flagged need_reply that has no reply of its own gets a u64 status.
  if (!replied && rc == 0 && (h.flags & VHOST_USER_NEED_REPLY_MASK) &&
      (dev.protocol_features & (1ull << VHOST_USER_PROTOCOL_F_REPLY_ACK)))
    rc = vu_reply_u64(&h, 0);
out:
  for (int i = 0; i < nfds; i++) close(fds[i]);
  return rc;
}

/* ---- host side ---- */

static int listen_unix(const char *path) {
  struct sockaddr_un sa = {.sun_family = AF_UNIX};
  if (strlen(path) >= sizeof sa.sun_path) { LOG("socket path too long: %s", path); return -1; }
  strcpy(sa.sun_path, path);
  unlink(path);
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(fd, 64) < 0) {
    LOG("listen %s: %s", path, strerror(errno));
    if (fd >= 0) close(fd);
    return -1;
  }
  return fd;
}

static void host_accept(void) {
  int fd = accept4(host_listen, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
  if (fd < 0) return;
  for (int i = 0; i < MAX_PENDING; i++) {
    if (pend_clients[i].fd < 0) {
      pend_clients[i].fd = fd;
      pend_clients[i].n = 0;
      return;
    }
  }
  DROP(host_pending_full);
  close(fd);
}

/* A host client's "CONNECT <port>\n". Read a byte at a time so nothing after the line is
 * taken from the socket before the connection is up. */
static void pending_read(struct pending *pc) {
  for (;;) {
    char ch;
    ssize_t n = read(pc->fd, &ch, 1);
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
    if (n <= 0) break;
    if (ch != '\n') {
      if (pc->n + 1 >= sizeof pc->line) { DROP(host_bad_line); break; }
      pc->line[pc->n++] = ch;
      continue;
    }
    pc->line[pc->n] = 0;
    if (pc->n && pc->line[pc->n - 1] == '\r') pc->line[pc->n - 1] = 0;
    char *end;
    if (strcmp(pc->line, "STATS") == 0) {
      // The counters, one line, then the socket closes (a fresh socket's buffer takes it).
      char out[1024];
      int len = format_stats(out, sizeof out);
      if (len > 0 && write(pc->fd, out, (size_t)len) < 0) DBG("STATS: %s", strerror(errno));
      close(pc->fd);
      pc->fd = -1;
      return;
    }
    if (strncmp(pc->line, "CONNECT ", 8) != 0) { DROP(host_bad_line); break; }
    unsigned long port = strtoul(pc->line + 8, &end, 10);
    if (*end || end == pc->line + 8 || port > UINT32_MAX) { DROP(host_bad_line); break; }
    uint32_t local = next_local_port++;
    if (next_local_port == 0) next_local_port = LOCAL_PORT_BASE;
    struct conn *c = conn_new(pc->fd, local, (uint32_t)port);
    if (!c) { DROP(host_conn_table_full); break; }
    c->state = C_CONNECTING;
    conn_ctrl(c, VSOCK_OP_REQUEST, 0);
    DBG("host CONNECT %lu (local port %u)", port, local);
    pc->fd = -1;
    return;
  }
  close(pc->fd);
  pc->fd = -1;
}

/* ---- main loop ---- */

enum { K_VU_LISTEN, K_VU, K_KICK, K_HOST_LISTEN, K_PENDING, K_CONN };
struct slot { int kind, idx; };

static void on_signal(int sig) { (void)sig; stop = 1; }

static int64_t mono_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int run(void) {
  int64_t stats_written = 0;
  static struct pollfd pfd[4 + NQ + MAX_PENDING + MAX_CONNS];
  static struct slot slot[4 + NQ + MAX_PENDING + MAX_CONNS];
  while (!stop) {
    int n = 0;
#define ADD(fd_, ev_, kind_, idx_) do { pfd[n] = (struct pollfd){(fd_), (ev_), 0}; slot[n] = (struct slot){(kind_), (idx_)}; n++; } while (0)
    if (vu_conn < 0) ADD(vu_listen, POLLIN, K_VU_LISTEN, 0);
    else ADD(vu_conn, POLLIN, K_VU, 0);
    for (int i = 0; i < NQ; i++)
      if (dev.vr[i].kick >= 0) ADD(dev.vr[i].kick, POLLIN, K_KICK, i);
    ADD(host_listen, POLLIN, K_HOST_LISTEN, 0);
    for (int i = 0; i < MAX_PENDING; i++)
      if (pend_clients[i].fd >= 0) ADD(pend_clients[i].fd, POLLIN, K_PENDING, i);
    for (int i = 0; i < MAX_CONNS; i++) {
      struct conn *c = &conns[i];
      if (c->state == C_FREE) continue;
      short ev = 0;
      if (conn_wants_input(c)) ev |= POLLIN;
      if (c->pend_len) ev |= POLLOUT;
      // Not polled at all when we want nothing from it: POLLHUP is reported regardless of
      // events, and a hung-up peer we cannot read from yet (no credit, no rx buffers) would
      // spin the loop. Its EOF is read once we want input again.
      if (ev) ADD(c->fd, ev, K_CONN, i);
    }
    if (stats_dirty) {
      int64_t now = mono_ms();
      if (now - stats_written >= 1000) { write_stats_file(); stats_written = now; }
    }
    if (poll(pfd, (nfds_t)n, stats_dirty ? 1000 : -1) < 0) {
      if (errno == EINTR) continue;
      LOG("poll: %s", strerror(errno));
      return 1;
    }
    for (int i = 0; i < n; i++) {
      short re = pfd[i].revents;
      if (!re) continue;
      switch (slot[i].kind) {
      case K_VU_LISTEN: {
        int fd = accept4(vu_listen, NULL, NULL, SOCK_CLOEXEC);
        if (fd >= 0) { vu_conn = fd; DBG("QEMU connected"); }
        break;
      }
      case K_VU:
        if (vu_handle() < 0) return 0; /* QEMU gone: this boot is over */
        break;
      case K_KICK: {
        uint64_t v;
        struct vring *r = &dev.vr[slot[i].idx];
        if (r->kick >= 0 && read(r->kick, &v, 8) < 0 && errno != EAGAIN) LOG("kick read: %s", strerror(errno));
        if (slot[i].idx == TXQ) tx_process();
        /* rx kick: new buffers; they are used below. event queue: nothing to send. */
        break;
      }
      case K_HOST_LISTEN:
        host_accept();
        break;
      case K_PENDING:
        pending_read(&pend_clients[slot[i].idx]);
        break;
      case K_CONN: {
        struct conn *c = &conns[slot[i].idx];
        if (c->state == C_FREE || c->fd != pfd[i].fd) break;
        if ((re & POLLOUT) && conn_flush_out(c) < 0) break;
        if ((re & (POLLIN | POLLHUP | POLLERR)) && conn_wants_input(c)) conn_pump_in(c);
        break;
      }
      }
    }
    // A kick can be read before the vhost-user messages that make its ring live (they
    // arrive on another fd, and one message is handled per round): look at the tx ring
    // every round, so no kick is lost. Cheap: one index compare when there is nothing.
    if (ring_live(TXQ) && vq_has_avail(&dev.vr[TXQ].q)) tx_process();
    // Control packets first (responses, credit updates, resets), then data.
    rx_ctrl();
    if (rx_dirty) { notify(RXQ); rx_dirty = 0; }
    if (tx_dirty) { notify(TXQ); tx_dirty = 0; }
  }
  return 0;
}

static void usage(void) {
  fprintf(stderr, "usage: tender-vhost-vsock --socket VHOST_USER_SOCK --uds BASE [--cid N] [-v]\n"
                  "       tender-vhost-vsock --selftest\n");
  exit(2);
}

int main(int argc, char **argv) {
  const char *vu_path = NULL, *uds = NULL;
  dev.cid = 3;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--selftest")) return selftest();
    else if (!strcmp(argv[i], "--socket") && i + 1 < argc) vu_path = argv[++i];
    else if (!strcmp(argv[i], "--uds") && i + 1 < argc) uds = argv[++i];
    else if (!strcmp(argv[i], "--cid") && i + 1 < argc) dev.cid = strtoull(argv[++i], NULL, 10);
    else if (!strcmp(argv[i], "-v")) verbose = 1;
    else usage();
  }
  if (!vu_path || !uds || dev.cid < 3 || dev.cid > 0xffffffffu) usage();
  // BASE_<port> must still fit in sun_path.
  if (strlen(uds) + 12 > sizeof uds_base) { LOG("--uds path too long"); return 2; }
  strcpy(uds_base, uds);
  snprintf(stats_path, sizeof stats_path, "%s.stats", uds);
  write_stats_file(); /* zeros: this helper's counts (the last one's are in the log) */
  for (int i = 0; i < NQ; i++) vring_reset(&dev.vr[i]);
  for (int i = 0; i < MAX_CONNS; i++) conns[i].fd = -1;
  for (int i = 0; i < MAX_PENDING; i++) pend_clients[i].fd = -1;
  signal(SIGPIPE, SIG_IGN);
  struct sigaction sa = {.sa_handler = on_signal};
  sigaction(SIGTERM, &sa, NULL);
  sigaction(SIGINT, &sa, NULL);
  vu_listen = listen_unix(vu_path);
  host_listen = vu_listen >= 0 ? listen_unix(uds) : -1;
  if (vu_listen < 0 || host_listen < 0) return 1;
  printf("READY\n");
  fflush(stdout);
  int rc = run();
  char line[1024];
  if (format_stats(line, sizeof line) > 0) fprintf(stderr, "tender-vhost-vsock: exit: %s", line);
  if (stats_dirty) write_stats_file();
  dev_reset();
  unlink(vu_path);
  unlink(uds);
  return rc;
}
