/*
 * The pure parts of tender-vhost-vsock: guest memory translation, split virtqueues and the
 * virtio-vsock packet header. No I/O here, so --selftest can drive them against hand-built
 * descriptor tables (virtio 1.2, 2.7 "Split Virtqueues"; 5.10 "Socket Device").
 */
#ifndef TENDER_VIRTQ_H
#define TENDER_VIRTQ_H

#include <stddef.h>
#include <stdint.h>

/* ---- guest memory (vhost-user SET_MEM_TABLE) ---- */

#define VQ_MAX_REGIONS 8

struct mem_region {
  uint64_t gpa;   /* guest physical address: what descriptors carry */
  uint64_t size;
  uint64_t uva;   /* QEMU's virtual address: what SET_VRING_ADDR carries */
  uint8_t *host;  /* our mapping of the region's first byte */
  void *map;      /* what munmap needs (mmap_offset included) */
  size_t map_len;
};

struct mem_table {
  unsigned n;
  struct mem_region r[VQ_MAX_REGIONS];
};

/* A pointer to [addr, addr+len) when it lies inside one region, NULL otherwise. */
void *mem_gpa(const struct mem_table *m, uint64_t gpa, uint64_t len);
void *mem_uva(const struct mem_table *m, uint64_t uva, uint64_t len);

/* ---- split virtqueue ---- */

#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define VRING_DESC_F_INDIRECT 4
#define VRING_AVAIL_F_NO_INTERRUPT 1

struct vring_desc { uint64_t addr; uint32_t len; uint16_t flags; uint16_t next; };
struct vring_avail { uint16_t flags; uint16_t idx; uint16_t ring[]; };
struct vring_used_elem { uint32_t id; uint32_t len; };
struct vring_used { uint16_t flags; uint16_t idx; struct vring_used_elem ring[]; };

struct vq {
  unsigned num;              /* queue size, a power of two <= 32768 */
  struct vring_desc *desc;
  struct vring_avail *avail;
  struct vring_used *used;
  uint16_t last_avail;       /* next avail entry we will take */
  uint16_t used_idx;         /* our copy of used->idx */
};

/* One buffer of a chain, already translated. */
struct vq_seg { uint8_t *p; uint32_t len; };

#define VQ_MAX_SEGS 64

struct vq_chain {
  uint16_t head;
  unsigned nr, nw;           /* readable segments first, then writable (2.7.4.2) */
  struct vq_seg rd[VQ_MAX_SEGS], wr[VQ_MAX_SEGS];
  uint64_t rd_len, wr_len;
};

/* 1: a chain was taken, 0: the ring is empty, -1: the chain is malformed (it is consumed and
 * returned with length 0 by the caller through vq_push, so the guest gets it back). */
int vq_pop(struct vq *q, const struct mem_table *m, struct vq_chain *c);
int vq_has_avail(const struct vq *q);
/* Put a chain on the used ring with `written` bytes; release-ordered. */
void vq_push(struct vq *q, uint16_t head, uint32_t written);
/* Whether the driver wants an interrupt now (VRING_AVAIL_F_NO_INTERRUPT; no EVENT_IDX). */
int vq_should_notify(const struct vq *q);

/* Copy out of a chain's readable part / into its writable part, from byte `off`. */
size_t chain_read(const struct vq_chain *c, size_t off, void *dst, size_t len);
size_t chain_write(const struct vq_chain *c, size_t off, const void *src, size_t len);

/* ---- virtio-vsock header: 44 bytes, little-endian (virtio 1.2, 5.10.6) ---- */

#define VSOCK_HDR_LEN 44
#define VSOCK_TYPE_STREAM 1
enum {
  VSOCK_OP_INVALID = 0, VSOCK_OP_REQUEST = 1, VSOCK_OP_RESPONSE = 2, VSOCK_OP_RST = 3,
  VSOCK_OP_SHUTDOWN = 4, VSOCK_OP_RW = 5, VSOCK_OP_CREDIT_UPDATE = 6, VSOCK_OP_CREDIT_REQUEST = 7,
};
#define VSOCK_SHUTDOWN_RCV 1
#define VSOCK_SHUTDOWN_SEND 2
#define VSOCK_HOST_CID 2

struct vsock_hdr {
  uint64_t src_cid, dst_cid;
  uint32_t src_port, dst_port, len;
  uint16_t type, op;
  uint32_t flags, buf_alloc, fwd_cnt;
};

void vsock_hdr_parse(const uint8_t b[VSOCK_HDR_LEN], struct vsock_hdr *h);
void vsock_hdr_emit(const struct vsock_hdr *h, uint8_t b[VSOCK_HDR_LEN]);

#endif
