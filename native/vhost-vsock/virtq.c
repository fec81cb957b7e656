/* Guest memory translation, split virtqueues, the vsock header codec (see virtq.h). */
#include "virtq.h"

#include <string.h>

/* x86-64 and aarch64 Linux hosts only: little-endian, so ring fields are read as is. */
#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "tender-vhost-vsock assumes a little-endian host"
#endif

void *mem_gpa(const struct mem_table *m, uint64_t gpa, uint64_t len) {
  for (unsigned i = 0; i < m->n; i++) {
    const struct mem_region *r = &m->r[i];
    // Written so that no sum can overflow: a hostile addr near 2^64 must not wrap into range.
    if (gpa >= r->gpa && gpa - r->gpa <= r->size && len <= r->size - (gpa - r->gpa)) return r->host + (gpa - r->gpa);
  }
  return NULL;
}

void *mem_uva(const struct mem_table *m, uint64_t uva, uint64_t len) {
  for (unsigned i = 0; i < m->n; i++) {
    const struct mem_region *r = &m->r[i];
    if (uva >= r->uva && uva - r->uva <= r->size && len <= r->size - (uva - r->uva)) return r->host + (uva - r->uva);
  }
  return NULL;
}

int vq_has_avail(const struct vq *q) {
  if (!q->avail) return 0;
  return __atomic_load_n(&q->avail->idx, __ATOMIC_ACQUIRE) != q->last_avail;
}

int vq_pop(struct vq *q, const struct mem_table *m, struct vq_chain *c) {
  if (!q->avail || !q->desc || !q->used) return 0;
  // Acquire: the ring entry and the descriptors it names were written before avail->idx
  // (virtio 1.2, 2.7.13: the driver's write barrier before the index update pairs with this).
  uint16_t avail_idx = __atomic_load_n(&q->avail->idx, __ATOMIC_ACQUIRE);
  if (avail_idx == q->last_avail) return 0;
  // 16-bit indices wrap freely; the ring slot is the index modulo the (power of two) size.
  uint16_t head = q->avail->ring[q->last_avail & (q->num - 1)];
  q->last_avail++;
  c->head = head;
  c->nr = c->nw = 0;
  c->rd_len = c->wr_len = 0;
  if (head >= q->num) return -1;
  uint16_t i = head;
  for (unsigned n = 0;; n++) {
    // A chain longer than the ring is a loop (2.7.5.3.2: the device must not loop forever).
    if (n >= q->num) return -1;
    struct vring_desc d = q->desc[i];
    if (d.flags & VRING_DESC_F_INDIRECT) return -1; /* not offered: VIRTIO_RING_F_INDIRECT_DESC */
    uint8_t *p = d.len ? mem_gpa(m, d.addr, d.len) : NULL;
    if (d.len && !p) return -1;
    if (d.flags & VRING_DESC_F_WRITE) {
      if (c->nw == VQ_MAX_SEGS) return -1;
      c->wr[c->nw++] = (struct vq_seg){p, d.len};
      c->wr_len += d.len;
    } else {
      // 2.7.4.2: readable descriptors come before writable ones.
      if (c->nw || c->nr == VQ_MAX_SEGS) return -1;
      c->rd[c->nr++] = (struct vq_seg){p, d.len};
      c->rd_len += d.len;
    }
    if (!(d.flags & VRING_DESC_F_NEXT)) break;
    i = d.next;
    if (i >= q->num) return -1;
  }
  return 1;
}

void vq_push(struct vq *q, uint16_t head, uint32_t written) {
  struct vring_used_elem *e = &q->used->ring[q->used_idx & (q->num - 1)];
  e->id = head;
  e->len = written;
  q->used_idx++;
  // Release: the element (and the bytes written into the buffers) before the index.
  __atomic_store_n(&q->used->idx, q->used_idx, __ATOMIC_RELEASE);
}

int vq_should_notify(const struct vq *q) {
  // Full barrier: the used->idx store must be visible before we read the driver's flags,
  // or a driver that just re-enabled interrupts could miss this one (2.7.10).
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
  return !(__atomic_load_n(&q->avail->flags, __ATOMIC_RELAXED) & VRING_AVAIL_F_NO_INTERRUPT);
}

size_t chain_read(const struct vq_chain *c, size_t off, void *dst, size_t len) {
  size_t done = 0;
  for (unsigned i = 0; i < c->nr && done < len; i++) {
    const struct vq_seg *s = &c->rd[i];
    if (off >= s->len) { off -= s->len; continue; }
    size_t n = s->len - off;
    if (n > len - done) n = len - done;
    memcpy((uint8_t *)dst + done, s->p + off, n);
    done += n;
    off = 0;
  }
  return done;
}

size_t chain_write(const struct vq_chain *c, size_t off, const void *src, size_t len) {
  size_t done = 0;
  for (unsigned i = 0; i < c->nw && done < len; i++) {
    const struct vq_seg *s = &c->wr[i];
    if (off >= s->len) { off -= s->len; continue; }
    size_t n = s->len - off;
    if (n > len - done) n = len - done;
    memcpy(s->p + off, (const uint8_t *)src + done, n);
    done += n;
    off = 0;
  }
  return done;
}

static uint64_t ld64(const uint8_t *b) { uint64_t v; memcpy(&v, b, 8); return v; }
static uint32_t ld32(const uint8_t *b) { uint32_t v; memcpy(&v, b, 4); return v; }
static uint16_t ld16(const uint8_t *b) { uint16_t v; memcpy(&v, b, 2); return v; }

/* struct virtio_vsock_hdr (packed): src_cid@0 dst_cid@8 src_port@16 dst_port@20 len@24
 * type@28 op@30 flags@32 buf_alloc@36 fwd_cnt@40. */
void vsock_hdr_parse(const uint8_t b[VSOCK_HDR_LEN], struct vsock_hdr *h) {
  h->src_cid = ld64(b);
  h->dst_cid = ld64(b + 8);
  h->src_port = ld32(b + 16);
  h->dst_port = ld32(b + 20);
  h->len = ld32(b + 24);
  h->type = ld16(b + 28);
  h->op = ld16(b + 30);
  h->flags = ld32(b + 32);
  h->buf_alloc = ld32(b + 36);
  h->fwd_cnt = ld32(b + 40);
}

void vsock_hdr_emit(const struct vsock_hdr *h, uint8_t b[VSOCK_HDR_LEN]) {
  memcpy(b, &h->src_cid, 8);
  memcpy(b + 8, &h->dst_cid, 8);
  memcpy(b + 16, &h->src_port, 4);
  memcpy(b + 20, &h->dst_port, 4);
  memcpy(b + 24, &h->len, 4);
  memcpy(b + 28, &h->type, 2);
  memcpy(b + 30, &h->op, 2);
  memcpy(b + 32, &h->flags, 4);
  memcpy(b + 36, &h->buf_alloc, 4);
  memcpy(b + 40, &h->fwd_cnt, 4);
}
