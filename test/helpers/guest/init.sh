#!/bin/busybox sh
# /init of the tender test guest: a busybox userland that brings up eth0 as the kernel
# command line says, runs /tender/test.sh (appended per boot as a second cpio archive) and
# powers off. Everything a test needs to read is printed on the serial console as lines
# starting with TENDER- (the harness parses those and ignores everything else).
#
# Kernel command line (parameters with a dot are not passed to init, so read /proc/cmdline):
#   tender.ip=dhcp | tender.ip=ADDR/PREFIX[,gw=GW]   how to configure eth0 (default: leave it down)
#   tender.mtu=N                                      eth0 MTU
#   tender.shell=1                                    no test script: drop to a shell (debugging)
/bin/busybox mkdir -p /proc /sys /dev /tmp /run /bin /sbin /usr/bin /usr/sbin
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
echo "TENDER-BOOT uptime=$(cut -d' ' -f1 /proc/uptime)"

for m in $(cat /etc/tender-modules); do
  insmod "/lib/modules/$m.ko" || echo "TENDER-ERROR insmod $m"
done

IPCFG=
MTU=
SHELL_WANTED=
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    tender.ip=*) IPCFG=${arg#tender.ip=} ;;
    tender.mtu=*) MTU=${arg#tender.mtu=} ;;
    tender.shell=1) SHELL_WANTED=1 ;;
  esac
done

ip link set lo up
if [ -n "$IPCFG" ]; then
  # virtio_net probes asynchronously after insmod: wait (bounded) for the interface.
  i=0
  while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do usleep 50000; i=$((i+1)); done
  if [ ! -e /sys/class/net/eth0 ]; then
    echo "TENDER-ERROR no eth0"
  else
    [ -n "$MTU" ] && ip link set eth0 mtu "$MTU"
    ip link set eth0 up
    case "$IPCFG" in
      dhcp)
        # udhcpc asks only for subnet/router/dns/hostname/domain/broadcast by default;
        # MTU (26) and the search list (119) must be requested to be sent (RFC 2132 9.8).
        if udhcpc -i eth0 -f -q -n -t 5 -T 1 -O mtu -O search -s /etc/udhcpc.script; then
          echo "TENDER-NET dhcp=ok"
        else
          echo "TENDER-NET dhcp=fail"
        fi
        ;;
      *)
        addr=${IPCFG%%,*}
        ip addr add "$addr" dev eth0
        case "$IPCFG" in
          *,gw=*) gw=${IPCFG#*,gw=}; gw=${gw%%,*}; ip route add default via "$gw" dev eth0 ;;
        esac
        echo "TENDER-NET static=$addr"
        ;;
    esac
  fi
fi
echo "TENDER-READY uptime=$(cut -d' ' -f1 /proc/uptime)"

if [ -f /tender/test.sh ]; then
  sh /tender/test.sh
  echo "TENDER-EXIT status=$?"
elif [ -n "$SHELL_WANTED" ]; then
  setsid cttyhack sh
fi
echo "TENDER-DONE"
sync
# poweroff works on microvm through ACPI (GED); reboot with -no-reboot is the fallback.
poweroff -f
reboot -f
