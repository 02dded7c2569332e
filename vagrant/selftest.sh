#!/usr/bin/env bash
# Inside the local VM image (installed as /usr/local/sbin/tapstack-selftest by
# build-image.sh, started once at boot when the kernel command line has
# tapstack.selftest=1): run `make test` as CI does (or VM_TEST_CMD, see test-image.sh),
# then show `tapstack run --no-netns` answering curl and ping from the VM's own shell,
# print one result line on the serial console for test-image.sh, and power off.
set -uo pipefail
exec >/dev/ttyS0 2>&1
repo=/vagrant
echo "TAPSTACK-SELFTEST start: $(uname -sr), $(nproc) CPUs, $(free -m | awk '/Mem:/ {print $2}') MiB"
if ! cd "$repo"; then
    echo "TAPSTACK-SELFTEST rc=1 seconds=0 (no $repo)"
    systemctl poweroff
    exit 1
fi

# test-image.sh may hand over another command on a second disk (VM_TEST_CMD).
cmd="CI=true make test"
if [ -b /dev/vdb ]; then
    given=$(head -c 4096 /dev/vdb | tr -d '\0')
    [ -n "$given" ] && cmd=$given
fi
echo "TAPSTACK-SELFTEST running: $cmd"
start=$(date +%s)
bash -c "$cmd"
rc=$?
tests_s=$(($(date +%s) - start))
echo "TAPSTACK-SELFTEST exit $rc after ${tests_s} s: $cmd"
grep -q -v '^ *$' /proc/net/softnet_stat \
    && echo "TAPSTACK-SELFTEST softnet_stat (processed dropped squeezed, per CPU):" \
    && while read -r done_ dropped squeezed _; do
        echo "  $((16#$done_)) $((16#$dropped)) $((16#$squeezed))"
    done </proc/net/softnet_stat

# The VM's own namespace: tap0 with 10.77.0.1 on this side, tapstack at 10.77.0.2.
demo=fail
tapstack run --no-netns >/tmp/tapstack-run.log 2>&1 &
pid=$!
for _ in $(seq 50); do
    grep -q 'tapstack ready' /tmp/tapstack-run.log && break
    sleep 0.2
done
if curl -sS --max-time 5 http://10.77.0.2/ | grep -q 'your address.*10.77.0.1' \
        && ping -c 3 -W 2 -q 10.77.0.2 >/tmp/ping.log; then
    demo=ok
    tail -1 /tmp/ping.log
fi
kill -INT "$pid" 2>/dev/null
wait "$pid"
echo "TAPSTACK-SELFTEST --no-netns: curl and ping from the VM shell: $demo"
if [ "$demo" != ok ]; then
    cat /tmp/tapstack-run.log
    [ "$rc" -ne 0 ] || rc=1
fi

echo "TAPSTACK-SELFTEST rc=$rc seconds=$(($(date +%s) - start))"
sync
systemctl poweroff
