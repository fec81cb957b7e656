/**
 * The default image's scripts, kept as strings so the compiled package needs no data files.
 * INIT_SCRIPT is /init (busybox sh, PID 1); UDHCPC_SCRIPT is udhcpc's event script. Both are
 * hashed into the image's recipe, so editing them rebuilds the image on next use.
 */

export const INIT_SCRIPT = `#!/bin/busybox sh
# /init of tender's default image: busybox, the modules the guest needs, DHCP, the guest agent.
# Lines starting with TENDER- on the serial console are for tender (boot probe, tests,
# \`tender machine logs\`); everything else is for people.
#
# Kernel command line (words with a dot are not passed to init: read /proc/cmdline):
#   tender.hostname=NAME   hostname, also sent in DHCP (option 12) so DNS can publish it
#   tender.agent=serial|vsock:PORT|none
#                          the agent's channel (default serial: the virtio-serial port named
#                          org.tender.agent.0)
#   tender.net=dhcp|none   configure eth0 by DHCP (default) or leave it down
#   tender.console=0       no shell on the serial console
#   tender.probe=1         print TENDER-BOOT and power off at once (the KVM boot probe)
#   root=DEV [rootfstype=T] [rootflags=O] [ro] [init=PATH]
#                          mount DEV (/dev/vda, LABEL=, UUID=) and switch_root to its init;
#                          the disk's own system then owns the network; the agent runs
#                          inside it (copied to its /run/tender)
/bin/busybox mkdir -p /proc /sys /dev /run /tmp
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin
export PATH=/sbin:/bin:/usr/sbin:/usr/bin HOME=/root TERM=linux
mount -t sysfs sysfs /sys
mount -t devtmpfs -o mode=0755 devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
# The agent opens PTYs for \`tender machine shell\`: /dev/ptmx resolves to this devpts.
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /tmp
echo "TENDER-BOOT uptime=$(cut -d' ' -f1 /proc/uptime)"

# busybox poweroff/halt/reboot (without -f) signal PID 1: USR2, USR1, TERM. Set early: the
# kernel drops signals to PID 1 that have no handler, so a press before this would be lost.
AGENT_PID=
down() {
  echo "TENDER-DOWN $1"
  [ -n "$AGENT_PID" ] && kill "$AGENT_PID" 2>/dev/null
  kill -TERM -1 2>/dev/null
  sync
  umount -a -r 2>/dev/null
  sync
  if [ "$1" = reboot ]; then reboot -f; else poweroff -f; fi
}
trap 'down poweroff' USR2
trap 'down poweroff' USR1
trap 'down reboot' TERM

HN= AGENT=serial NET=dhcp CONSOLE=1 PROBE= ROOT= ROOTFSTYPE= ROOTFLAGS= RO= ROOTINIT=/sbin/init
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    tender.hostname=*) HN=\${arg#*=} ;;
    tender.agent=*) AGENT=\${arg#*=} ;;
    tender.net=*) NET=\${arg#*=} ;;
    tender.console=0) CONSOLE= ;;
    tender.probe=1) PROBE=1 ;;
    root=*) ROOT=\${arg#root=} ;;
    rootfstype=*) ROOTFSTYPE=\${arg#*=} ;;
    rootflags=*) ROOTFLAGS=\${arg#*=} ;;
    ro) RO=1 ;;
    init=*) ROOTINIT=\${arg#*=} ;;
  esac
done

if [ -n "$PROBE" ]; then
  echo "TENDER-PROBE ok"
  poweroff -f
fi

# Modules in dependency order. The boot set (virtio, vsock, power button) is what the
# network, the agent and poweroff need; the rest (USB/IP, storage, 9p, ext4) loads after
# DHCP, off the critical path (about 1 s of a TCG boot), unless a root disk needs it now.
load_modules() {
  for m in $(cat "$1"); do
    insmod "/lib/modules/$m.ko" 2>/dev/null || grep -q "^$m " /proc/modules || echo "TENDER-ERROR insmod $m"
  done
}
load_modules /etc/tender-modules.boot

if [ -n "$HN" ]; then
  hostname "$HN"
  echo "$HN" > /etc/hostname
  echo "127.0.1.1 $HN" >> /etc/hosts
fi
ip link set lo up

agent_args() {
  case "$AGENT" in
    vsock:*) echo "--vsock \${AGENT#vsock:}" ;;
  esac
}

# A root disk's own system knows nothing of tender: run the agent inside it anyway, so exec,
# shell, automatic forwards and USB work as on the default image. The agent and a busybox for
# its restart loop are copied to the new root's /run (our tmpfs, moved there), and the loop is
# chrooted into the new root before switch_root: after the switch the initramfs is emptied,
# and the chroot's root is the same mount that becomes /.
start_agent_in() {
  [ -x /sbin/tender-agent ] && [ "$AGENT" != none ] || return 0
  mkdir -p "$1/run/tender" && cp /sbin/tender-agent /bin/busybox "$1/run/tender/" || return 0
  chroot "$1" /run/tender/busybox sh -c "while :; do /run/tender/tender-agent $(agent_args) </dev/null >/dev/console 2>&1; echo 'TENDER-AGENT exited status='\$? >/dev/console; /run/tender/busybox sleep 1; done" &
  echo "TENDER-AGENT started $AGENT (in the root disk)"
}

if [ -n "$ROOT" ]; then
  load_modules /etc/tender-modules.later
  dev=$ROOT
  i=0
  while [ $i -lt 100 ]; do
    case "$ROOT" in
      LABEL=*|UUID=*) dev=$(findfs "$ROOT" 2>/dev/null) ;;
    esac
    [ -n "$dev" ] && [ -b "$dev" ] && break
    usleep 50000
    i=$((i+1))
  done
  opts=\${RO:+ro}
  [ -n "$ROOTFLAGS" ] && opts=\${opts:+$opts,}$ROOTFLAGS
  mkdir -p /newroot
  if [ -b "$dev" ] && mount \${ROOTFSTYPE:+-t "$ROOTFSTYPE"} \${opts:+-o "$opts"} "$dev" /newroot; then
    if [ -x "/newroot$ROOTINIT" ] || [ -L "/newroot$ROOTINIT" ]; then
      echo "TENDER-ROOT dev=$dev init=$ROOTINIT"
      for d in dev proc sys run; do
        mkdir -p "/newroot/$d" 2>/dev/null
        mount --move "/$d" "/newroot/$d"
      done
      umount /tmp 2>/dev/null
      start_agent_in /newroot
      exec switch_root /newroot "$ROOTINIT"
    fi
    echo "TENDER-ERROR root: no $ROOTINIT on $dev"
    umount /newroot
  else
    echo "TENDER-ERROR root: cannot mount $ROOT"
  fi
  echo "TENDER-ERROR root: staying in the initramfs"
fi

if [ -x /sbin/tender-agent ] && [ "$AGENT" != none ]; then
  AARGS=$(agent_args)
  # The agent never exits because the host went away; if it dies anyway, start it again.
  ( while :; do
      /sbin/tender-agent $AARGS </dev/null >/dev/console 2>&1
      echo "TENDER-AGENT exited status=$?"
      sleep 1
    done ) &
  AGENT_PID=$!
  echo "TENDER-AGENT started $AGENT"
else
  echo "TENDER-AGENT none"
fi

# QMP system_powerdown on microvm raises the ACPI GED power-down event, which the kernel's
# button driver turns into a KEY_POWER input event; nothing acts on it unless someone reads
# the event device, so do that here (one event is enough) and power off as init would.
for ev in /sys/class/input/event*; do
  [ "$(cat "$ev/device/name" 2>/dev/null)" = "Power Button" ] || continue
  ( dd if="/dev/input/\${ev##*/}" of=/dev/null bs=24 count=1 2>/dev/null && kill -USR2 1 ) &
done

if [ "$NET" = dhcp ]; then
  # virtio_net probes asynchronously after insmod: wait (bounded) for the interface.
  i=0
  while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do usleep 50000; i=$((i+1)); done
  if [ -e /sys/class/net/eth0 ]; then
    ip link set eth0 up
    # MTU (26) and the search list (119) must be asked for (RFC 2132 9.8); the hostname is
    # sent so the network's DNS can publish <name>.tender.internal. udhcpc stays in the
    # background to renew; with -b it also goes there after 5 failed tries and keeps trying.
    udhcpc -i eth0 -b -t 5 -T 1 -A 2 -O mtu -O search \${HN:+-x "hostname:$HN"} -s /etc/udhcpc.script -p /run/udhcpc.eth0.pid
  else
    echo "TENDER-NET no eth0"
  fi
fi

# Then a shell on the serial console (after the modules, so its prompt does not land in the
# middle of the lines above).
(
  if [ -z "$ROOT" ]; then
    load_modules /etc/tender-modules.later
    echo "TENDER-MODULES loaded"
  fi
  if [ -n "$CONSOLE" ]; then
    while :; do setsid cttyhack sh -l; sleep 1; done
  fi
) </dev/console >/dev/console 2>&1 &
echo "TENDER-READY uptime=$(cut -d' ' -f1 /proc/uptime)"
while :; do
  sleep 3600 &
  wait $!
done
`;

export const UDHCPC_SCRIPT = `#!/bin/sh
# busybox udhcpc event script: apply the lease (address, router, DNS, MTU, search list).
case "$1" in
  deconfig)
    ip -4 addr flush dev "$interface"
    ip link set "$interface" up
    ;;
  bound|renew)
    if [ "$1" = bound ] || ! ip -4 addr show dev "$interface" | grep -q "inet $ip/"; then
      ip -4 addr flush dev "$interface"
      ip addr add "$ip/\${mask:-24}" \${broadcast:+broadcast "$broadcast"} dev "$interface"
    fi
    [ -n "$mtu" ] && ip link set "$interface" mtu "$mtu"
    if [ -n "$router" ]; then
      ip route del default dev "$interface" 2>/dev/null
      for r in $router; do ip route add default via "$r" dev "$interface" && break; done
    fi
    : > /etc/resolv.conf.new
    [ -n "$domain" ] && echo "domain $domain" >> /etc/resolv.conf.new
    [ -n "$search" ] && echo "search $search" >> /etc/resolv.conf.new
    for d in $dns; do echo "nameserver $d" >> /etc/resolv.conf.new; done
    mv /etc/resolv.conf.new /etc/resolv.conf
    echo "TENDER-LEASE ip=$ip mask=$mask router=$router dns=$dns domain=$domain search=$search mtu=$mtu lease=$lease" > /dev/console
    ;;
esac
exit 0
`;
