/* vhost-user messages (QEMU docs/interop/vhost-user.rst) that tender-vhost-vsock serves. */
#ifndef TENDER_VHOST_USER_H
#define TENDER_VHOST_USER_H

#include <stdint.h>

enum {
  VHOST_USER_GET_FEATURES = 1, VHOST_USER_SET_FEATURES = 2, VHOST_USER_SET_OWNER = 3,
  VHOST_USER_RESET_OWNER = 4, VHOST_USER_SET_MEM_TABLE = 5, VHOST_USER_SET_LOG_BASE = 6,
  VHOST_USER_SET_LOG_FD = 7, VHOST_USER_SET_VRING_NUM = 8, VHOST_USER_SET_VRING_ADDR = 9,
  VHOST_USER_SET_VRING_BASE = 10, VHOST_USER_GET_VRING_BASE = 11, VHOST_USER_SET_VRING_KICK = 12,
  VHOST_USER_SET_VRING_CALL = 13, VHOST_USER_SET_VRING_ERR = 14,
  VHOST_USER_GET_PROTOCOL_FEATURES = 15, VHOST_USER_SET_PROTOCOL_FEATURES = 16,
  VHOST_USER_GET_QUEUE_NUM = 17, VHOST_USER_SET_VRING_ENABLE = 18,
  VHOST_USER_GET_CONFIG = 24, VHOST_USER_SET_CONFIG = 25,
};

#define VHOST_USER_VERSION 0x1
#define VHOST_USER_REPLY_MASK (1u << 2)
#define VHOST_USER_NEED_REPLY_MASK (1u << 3)
#define VHOST_USER_VRING_IDX_MASK 0xffu
#define VHOST_USER_VRING_NOFD_MASK (1u << 8)

#define VIRTIO_F_VERSION_1 32
#define VHOST_USER_F_PROTOCOL_FEATURES 30
#define VHOST_USER_PROTOCOL_F_REPLY_ACK 3
#define VHOST_USER_PROTOCOL_F_CONFIG 9

#define VHOST_USER_HDR_SIZE 12
#define VHOST_USER_MAX_FDS 8

struct vu_hdr { uint32_t request, flags, size; };
struct vu_state { uint32_t index, num; };
struct vu_addr { uint32_t index, flags; uint64_t desc, used, avail, log; };
struct vu_region { uint64_t gpa, size, uva, mmap_offset; };
struct vu_mem { uint32_t nregions, padding; struct vu_region r[8]; };
struct vu_config { uint32_t offset, size, flags; uint8_t region[256]; };

#endif
