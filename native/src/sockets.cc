// Socket families and calls Node lacks: AF_UNIX SOCK_DGRAM, socketpair, AF_VSOCK. Every
// descriptor is created non-blocking and close-on-exec; waiting happens in FdWatcher /
// FrameIO / FdStream. Policies (stale-socket unlink, fallbacks, retries) live in TypeScript.
#include "common.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#ifdef __linux__
#include <linux/vm_sockets.h>
#endif

namespace tender {

namespace {

[[maybe_unused]] int SetNonBlockCloexec(int fd) {
  int fl = fcntl(fd, F_GETFL);
  if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) return -1;
  return fcntl(fd, F_SETFD, FD_CLOEXEC);
}

int NewSocket(int domain, int type) {
#ifdef __linux__
  return socket(domain, type | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
#else
  int fd = socket(domain, type, 0);
  if (fd >= 0 && SetNonBlockCloexec(fd) < 0) {
    int e = errno;
    close(fd);
    errno = e;
    return -1;
  }
  return fd;
#endif
}

bool FdArg(const Napi::CallbackInfo& info, size_t i, int* fd) {
  if (!info[i].IsNumber()) return false;
  *fd = info[i].As<Napi::Number>().Int32Value();
  return *fd >= 0;
}

// Fills a sockaddr_un; false when the path does not fit (TS validates first, this is a guard).
bool UnixAddr(const std::string& path, sockaddr_un* sa, socklen_t* len) {
  memset(sa, 0, sizeof *sa);
  sa->sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof sa->sun_path) return false;
  memcpy(sa->sun_path, path.data(), path.size());
  *len = offsetof(sockaddr_un, sun_path) + path.size() + 1;
  return true;
}

// Raising the buffers matters for unixgram: on Linux the sender's SO_SNDBUF bounds the bytes
// of datagrams queued at the receiver but not yet read. SO_SNDBUFFORCE (root) ignores
// net.core.wmem_max; fall back to the capped option without it.
void SetBuf(int fd, int force, int plain, int size) {
  if (size <= 0) return;
#ifdef __linux__
  if (setsockopt(fd, SOL_SOCKET, force, &size, sizeof size) == 0) return;
#else
  (void)force;
#endif
  setsockopt(fd, SOL_SOCKET, plain, &size, sizeof size);
}

// unixDgramSocket(sndbuf, rcvbuf) -> fd
Napi::Value UnixDgramSocket(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = NewSocket(AF_UNIX, SOCK_DGRAM);
  if (fd < 0) return ThrowErrno(env, errno, "socket");
  int snd = info[0].IsNumber() ? info[0].As<Napi::Number>().Int32Value() : 0;
  int rcv = info[1].IsNumber() ? info[1].As<Napi::Number>().Int32Value() : 0;
#ifdef __linux__
  SetBuf(fd, SO_SNDBUFFORCE, SO_SNDBUF, snd);
  SetBuf(fd, SO_RCVBUFFORCE, SO_RCVBUF, rcv);
#else
  SetBuf(fd, 0, SO_SNDBUF, snd);
  SetBuf(fd, 0, SO_RCVBUF, rcv);
#endif
  return Napi::Number::New(env, fd);
}

Napi::Value UnixBindOrConnect(const Napi::CallbackInfo& info, bool doBind) {
  Napi::Env env = info.Env();
  int fd;
  if (!FdArg(info, 0, &fd) || !info[1].IsString()) return ThrowType(env, "(fd, path) expected");
  std::string path = info[1].As<Napi::String>().Utf8Value();
  sockaddr_un sa;
  socklen_t len;
  if (!UnixAddr(path, &sa, &len)) return ThrowErrno(env, ENAMETOOLONG, doBind ? "bind" : "connect", path);
  int r;
  do {
    r = doBind ? bind(fd, reinterpret_cast<sockaddr*>(&sa), len)
               : connect(fd, reinterpret_cast<sockaddr*>(&sa), len);
  } while (r < 0 && errno == EINTR);
  // A non-blocking stream connect may be in progress: report it instead of failing.
  if (r < 0 && !doBind && errno == EINPROGRESS) return Napi::Boolean::New(env, false);
  if (r < 0) return ThrowErrno(env, errno, doBind ? "bind" : "connect", path);
  return Napi::Boolean::New(env, true);
}

Napi::Value UnixBind(const Napi::CallbackInfo& info) { return UnixBindOrConnect(info, true); }
Napi::Value UnixConnect(const Napi::CallbackInfo& info) { return UnixBindOrConnect(info, false); }

// socketpair(stream: boolean) -> [fd, fd] (AF_UNIX)
Napi::Value SocketPair(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  bool stream = info[0].IsBoolean() ? info[0].As<Napi::Boolean>().Value() : true;
  int sv[2];
  int type = stream ? SOCK_STREAM : SOCK_DGRAM;
#ifdef __linux__
  if (socketpair(AF_UNIX, type | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) < 0)
    return ThrowErrno(env, errno, "socketpair");
#else
  if (socketpair(AF_UNIX, type, 0, sv) < 0) return ThrowErrno(env, errno, "socketpair");
  SetNonBlockCloexec(sv[0]);
  SetNonBlockCloexec(sv[1]);
#endif
  Napi::Array out = Napi::Array::New(env, 2);
  out.Set(0u, Napi::Number::New(env, sv[0]));
  out.Set(1u, Napi::Number::New(env, sv[1]));
  return out;
}

// socketError(fd, syscall): throws the pending SO_ERROR (e.g. of a non-blocking connect).
Napi::Value SocketError(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  if (!FdArg(info, 0, &fd)) return ThrowType(env, "fd expected");
  std::string syscall = info[1].IsString() ? info[1].As<Napi::String>().Utf8Value() : "connect";
  int err = 0;
  socklen_t len = sizeof err;
  if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) return ThrowErrno(env, errno, "getsockopt");
  if (err) return ThrowErrno(env, err, syscall.c_str());
  return env.Undefined();
}

// shutdown(fd, how: 0 rd, 1 wr, 2 both)
Napi::Value Shutdown(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  if (!FdArg(info, 0, &fd)) return ThrowType(env, "fd expected");
  int how = info[1].IsNumber() ? info[1].As<Napi::Number>().Int32Value() : SHUT_WR;
  if (shutdown(fd, how) < 0) return ThrowErrno(env, errno, "shutdown");
  return env.Undefined();
}

// sendSome(fd, buf: Uint8Array) -> bytes the kernel took (maybe fewer than buf.length), or -1
// when the socket buffer is full (EAGAIN). Other errors throw. For stream sockets Node also
// watches (the NAT's host sockets): one non-blocking send, without fs.writeSync's validation
// and request setup, which cost ~1 µs of a 1-byte round trip. The caller keeps ordering with
// Node's own write queue (it only calls this while that queue is empty).
Napi::Value SendSome(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  if (!FdArg(info, 0, &fd) || !info[1].IsTypedArray()) return ThrowType(env, "sendSome(fd, buf) expected");
  Napi::TypedArray ta = info[1].As<Napi::TypedArray>();
  if (ta.TypedArrayType() != napi_uint8_array) return ThrowType(env, "sendSome: Uint8Array expected");
  Napi::Uint8Array buf = ta.As<Napi::Uint8Array>();
  int flags = MSG_DONTWAIT;
#ifdef MSG_NOSIGNAL
  flags |= MSG_NOSIGNAL;  // a closed peer is EPIPE, never SIGPIPE
#endif
  ssize_t n;
  do n = send(fd, buf.Data(), buf.ByteLength(), flags);
  while (n < 0 && errno == EINTR);
  if (n < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK) return Napi::Number::New(env, -1);
    return ThrowErrno(env, errno, "send");
  }
  return Napi::Number::New(env, double(n));
}

Napi::Value Listen(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  if (!FdArg(info, 0, &fd)) return ThrowType(env, "fd expected");
  int backlog = info[1].IsNumber() ? info[1].As<Napi::Number>().Int32Value() : 128;
  if (listen(fd, backlog) < 0) return ThrowErrno(env, errno, "listen");
  return env.Undefined();
}

#ifdef __linux__
bool CidPortArgs(const Napi::CallbackInfo& info, int* fd, sockaddr_vm* sa) {
  if (!FdArg(info, 0, fd) || !info[1].IsNumber() || !info[2].IsNumber()) return false;
  memset(sa, 0, sizeof *sa);
  sa->svm_family = AF_VSOCK;
  sa->svm_cid = info[1].As<Napi::Number>().Uint32Value();
  sa->svm_port = info[2].As<Napi::Number>().Uint32Value();
  return true;
}

Napi::Object VsockAddr(Napi::Env env, const sockaddr_vm& sa) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("cid", Napi::Number::New(env, sa.svm_cid));
  o.Set("port", Napi::Number::New(env, sa.svm_port));
  return o;
}
#endif

// vsockSocket() -> fd (SOCK_STREAM)
Napi::Value VsockSocket(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
#ifdef __linux__
  int fd = NewSocket(AF_VSOCK, SOCK_STREAM);
  if (fd < 0) return ThrowErrno(env, errno, "socket");
  return Napi::Number::New(env, fd);
#else
  return ThrowErrno(env, EAFNOSUPPORT, "socket");
#endif
}

// vsockConnect(fd, cid, port) -> true when connected, false when in progress (wait writable,
// then socketError).
Napi::Value VsockConnect(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
#ifdef __linux__
  int fd;
  sockaddr_vm sa;
  if (!CidPortArgs(info, &fd, &sa)) return ThrowType(env, "(fd, cid, port) expected");
  int r;
  do r = connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa);
  while (r < 0 && errno == EINTR);
  if (r < 0 && errno == EINPROGRESS) return Napi::Boolean::New(env, false);
  if (r < 0) return ThrowErrno(env, errno, "connect");
  return Napi::Boolean::New(env, true);
#else
  return ThrowErrno(env, EAFNOSUPPORT, "connect");
#endif
}

// vsockBind(fd, cid, port)
Napi::Value VsockBind(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
#ifdef __linux__
  int fd;
  sockaddr_vm sa;
  if (!CidPortArgs(info, &fd, &sa)) return ThrowType(env, "(fd, cid, port) expected");
  if (bind(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa) < 0) return ThrowErrno(env, errno, "bind");
  return env.Undefined();
#else
  return ThrowErrno(env, EAFNOSUPPORT, "bind");
#endif
}

// vsockAccept(fd) -> { fd, cid, port } | null when nothing is pending (EAGAIN).
Napi::Value VsockAccept(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
#ifdef __linux__
  int fd;
  if (!FdArg(info, 0, &fd)) return ThrowType(env, "fd expected");
  sockaddr_vm sa;
  socklen_t len = sizeof sa;
  int c;
  do c = accept4(fd, reinterpret_cast<sockaddr*>(&sa), &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
  while (c < 0 && errno == EINTR);
  if (c < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return env.Null();
  if (c < 0) return ThrowErrno(env, errno, "accept");
  Napi::Object o = VsockAddr(env, sa);
  o.Set("fd", Napi::Number::New(env, c));
  return o;
#else
  return ThrowErrno(env, EAFNOSUPPORT, "accept");
#endif
}

// vsockAddress(fd, peer: boolean) -> { cid, port }
Napi::Value VsockAddress(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
#ifdef __linux__
  int fd;
  if (!FdArg(info, 0, &fd)) return ThrowType(env, "fd expected");
  bool peer = info[1].IsBoolean() && info[1].As<Napi::Boolean>().Value();
  sockaddr_vm sa;
  socklen_t len = sizeof sa;
  memset(&sa, 0, sizeof sa);
  int r = peer ? getpeername(fd, reinterpret_cast<sockaddr*>(&sa), &len)
               : getsockname(fd, reinterpret_cast<sockaddr*>(&sa), &len);
  if (r < 0) return ThrowErrno(env, errno, peer ? "getpeername" : "getsockname");
  return VsockAddr(env, sa);
#else
  return ThrowErrno(env, EAFNOSUPPORT, "getsockname");
#endif
}

}  // namespace

void InitSockets(Napi::Env env, Napi::Object exports) {
  exports.Set("unixDgramSocket", Napi::Function::New(env, UnixDgramSocket, "unixDgramSocket"));
  exports.Set("unixBind", Napi::Function::New(env, UnixBind, "unixBind"));
  exports.Set("unixConnect", Napi::Function::New(env, UnixConnect, "unixConnect"));
  exports.Set("socketpair", Napi::Function::New(env, SocketPair, "socketpair"));
  exports.Set("socketError", Napi::Function::New(env, SocketError, "socketError"));
  exports.Set("shutdown", Napi::Function::New(env, Shutdown, "shutdown"));
  exports.Set("listen", Napi::Function::New(env, Listen, "listen"));
  exports.Set("sendSome", Napi::Function::New(env, SendSome, "sendSome"));
  exports.Set("vsockSocket", Napi::Function::New(env, VsockSocket, "vsockSocket"));
  exports.Set("vsockConnect", Napi::Function::New(env, VsockConnect, "vsockConnect"));
  exports.Set("vsockBind", Napi::Function::New(env, VsockBind, "vsockBind"));
  exports.Set("vsockAccept", Napi::Function::New(env, VsockAccept, "vsockAccept"));
  exports.Set("vsockAddress", Napi::Function::New(env, VsockAddress, "vsockAddress"));
}

}  // namespace tender
