// Linux TAP creation, optionally inside another network namespace.
//
// setns(CLONE_NEWNET) changes the namespace of the calling *thread* only, so the whole
// creation runs on a dedicated short-lived std::thread: it enters the namespace, opens
// /dev/net/tun (the device is created in the opener's namespace), TUNSETIFF, then sets the
// MTU, MAC and IFF_UP through an AF_INET socket made on that thread (interface ioctls address
// the socket's namespace). The tun fd stays valid after the thread exits. No netlink needed.
// Never run this on the libuv thread pool: its threads would be left in the other namespace.
#include "common.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>

#include <thread>

#ifdef __linux__
#include <linux/if.h>
#include <linux/if_arp.h>
#include <linux/if_tun.h>
#include <sched.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#endif

namespace tender {

namespace {

struct TapArgs {
  std::string name;
  std::string nsPath;
  int mtu = 0;
  bool hasMac = false;
  unsigned char mac[6] = {0};
  bool up = true;
  bool vnetHdr = false;
  // TUN_F_* bits for TUNSETOFFLOAD (only with vnetHdr): what the kernel may hand us.
  unsigned int offload = 0;
};

struct TapResult {
  int fd = -1;
  int err = 0;
  const char* syscall = "";
  std::string path;
  std::string name;
  int ifindex = 0;
};

#ifdef __linux__
void CreateTapOnThisThread(const TapArgs& a, TapResult* r) {
  auto fail = [&](const char* syscall, int fd1, int fd2, const std::string& path = "") {
    r->err = errno;
    r->syscall = syscall;
    r->path = path;
    if (fd1 >= 0) close(fd1);
    if (fd2 >= 0) close(fd2);
  };
  if (!a.nsPath.empty()) {
    int ns = open(a.nsPath.c_str(), O_RDONLY | O_CLOEXEC);
    if (ns < 0) return fail("open", -1, -1, a.nsPath);
    if (setns(ns, CLONE_NEWNET) < 0) return fail("setns", ns, -1, a.nsPath);
    close(ns);
  }
  int fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) return fail("open", -1, -1, "/dev/net/tun");
  struct ifreq ifr;
  memset(&ifr, 0, sizeof ifr);
  ifr.ifr_flags = IFF_TAP | IFF_NO_PI | (a.vnetHdr ? IFF_VNET_HDR : 0);
  strncpy(ifr.ifr_name, a.name.c_str(), IFNAMSIZ - 1);
  if (ioctl(fd, TUNSETIFF, &ifr) < 0) return fail("ioctl(TUNSETIFF)", fd, -1);
  std::string name(ifr.ifr_name);
  if (a.vnetHdr) {
    // The 10-byte struct virtio_net_hdr (no num_buffers): the layout the TS side expects.
    int hdrSize = 10;
    if (ioctl(fd, TUNSETVNETHDRSZ, &hdrSize) < 0) return fail("ioctl(TUNSETVNETHDRSZ)", fd, -1);
    if (ioctl(fd, TUNSETOFFLOAD, (unsigned long)a.offload) < 0) return fail("ioctl(TUNSETOFFLOAD)", fd, -1);
  }

  int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (s < 0) return fail("socket", fd, -1);
  if (a.mtu > 0) {
    memset(&ifr, 0, sizeof ifr);
    strncpy(ifr.ifr_name, name.c_str(), IFNAMSIZ - 1);
    ifr.ifr_mtu = a.mtu;
    if (ioctl(s, SIOCSIFMTU, &ifr) < 0) return fail("ioctl(SIOCSIFMTU)", fd, s);
  }
  if (a.hasMac) {
    memset(&ifr, 0, sizeof ifr);
    strncpy(ifr.ifr_name, name.c_str(), IFNAMSIZ - 1);
    ifr.ifr_hwaddr.sa_family = ARPHRD_ETHER;
    memcpy(ifr.ifr_hwaddr.sa_data, a.mac, 6);
    if (ioctl(s, SIOCSIFHWADDR, &ifr) < 0) return fail("ioctl(SIOCSIFHWADDR)", fd, s);
  }
  memset(&ifr, 0, sizeof ifr);
  strncpy(ifr.ifr_name, name.c_str(), IFNAMSIZ - 1);
  if (ioctl(s, SIOCGIFINDEX, &ifr) < 0) return fail("ioctl(SIOCGIFINDEX)", fd, s);
  r->ifindex = ifr.ifr_ifindex;
  if (a.up) {
    memset(&ifr, 0, sizeof ifr);
    strncpy(ifr.ifr_name, name.c_str(), IFNAMSIZ - 1);
    if (ioctl(s, SIOCGIFFLAGS, &ifr) < 0) return fail("ioctl(SIOCGIFFLAGS)", fd, s);
    ifr.ifr_flags |= IFF_UP;
    if (ioctl(s, SIOCSIFFLAGS, &ifr) < 0) return fail("ioctl(SIOCSIFFLAGS)", fd, s);
  }
  close(s);
  r->fd = fd;
  r->name = name;
}
#endif

// createTap({ name, nsPath, mtu, mac, up, vnetHdr }) -> { fd, name, ifindex }
// Validation of names, MTU and MAC is done in TypeScript; this only checks types.
Napi::Value CreateTap(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
#ifndef __linux__
  return ThrowErrno(env, ENOSYS, "createTap");
#else
  if (!info[0].IsObject()) return ThrowType(env, "createTap: options object expected");
  Napi::Object o = info[0].As<Napi::Object>();
  TapArgs a;
  Napi::Value v = o.Get("name");
  if (v.IsString()) a.name = v.As<Napi::String>().Utf8Value();
  v = o.Get("nsPath");
  if (v.IsString()) a.nsPath = v.As<Napi::String>().Utf8Value();
  v = o.Get("mtu");
  if (v.IsNumber()) a.mtu = v.As<Napi::Number>().Int32Value();
  v = o.Get("mac");
  if (v.IsTypedArray()) {
    auto m = v.As<Napi::Uint8Array>();
    if (m.ElementLength() != 6) return ThrowType(env, "createTap: mac must be 6 bytes");
    memcpy(a.mac, m.Data(), 6);
    a.hasMac = true;
  }
  v = o.Get("up");
  if (v.IsBoolean()) a.up = v.As<Napi::Boolean>().Value();
  v = o.Get("vnetHdr");
  if (v.IsBoolean()) a.vnetHdr = v.As<Napi::Boolean>().Value();
  v = o.Get("offload");
  if (v.IsNumber()) a.offload = v.As<Napi::Number>().Uint32Value();

  TapResult r;
  if (a.nsPath.empty()) {
    CreateTapOnThisThread(a, &r);
  } else {
    // A few ioctls: joining synchronously costs well under a millisecond.
    std::thread t(CreateTapOnThisThread, std::cref(a), &r);
    t.join();
  }
  if (r.err) return ThrowErrno(env, r.err, r.syscall, r.path);
  Napi::Object out = Napi::Object::New(env);
  out.Set("fd", Napi::Number::New(env, r.fd));
  out.Set("name", Napi::String::New(env, r.name));
  out.Set("ifindex", Napi::Number::New(env, r.ifindex));
  return out;
#endif
}

}  // namespace

void InitTap(Napi::Env env, Napi::Object exports) {
  exports.Set("createTap", Napi::Function::New(env, CreateTap, "createTap"));
}

}  // namespace tender
