#!/nix/bin/sh
# Stage 2 of the VM harness, run as init=/nix/init after switch-root. The root is whatever
# rasa left (blank after a rollback), so everything this needs lives on the nix subvolume.
# It reports what survived the boot as `RASA-VM:` lines for xtask to judge, runs `rasa prune`
# as a real host's rasa-prune.service would, leaves fresh state for the next boot to wipe,
# then powers off.
export PATH=/nix/bin
say() { echo "RASA-VM: $*"; }
cmdline_arg() {
  for word in $(cat /proc/cmdline); do
    case "$word" in "$1="*) echo "${word#*=}"; return ;; esac
  done
  echo "$2"
}
keep=$(cmdline_arg rasa_vm.keep 5)
keep_days=$(cmdline_arg rasa_vm.keep_days 7)
device=/dev/mapper/cryptroot

# rasa mounts the top level under /run; the fresh root has only an empty directory there.
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /run/top
say "STAGE2 reached"
boot=$(( $(cat /persist/boots 2>/dev/null || echo 0) + 1 ))
echo "$boot" > /persist/boots
say "BOOT $boot"

listing() { ls -A "$1" 2>/dev/null | tr '\n' ' '; }
subvolume_or_dir() {
  # A subvolume's root directory always has inode 256.
  if [ ! -e "$1" ]; then echo ABSENT
  elif [ "$(stat -c %i "$1")" = 256 ]; then echo SUBVOLUME
  else echo DIRECTORY; fi
}
old_roots() {
  mount -t btrfs -o subvolid=5,ro "$device" /run/top || { say "OLD_ROOTS $1 unreadable"; return; }
  names=$(ls /run/top/old_roots 2>/dev/null | tr '\n' ' ')
  say "OLD_ROOTS $1 count=$(ls /run/top/old_roots 2>/dev/null | wc -l) names=$names"
  say "TOP_LEVEL $1 $(listing /run/top)"
  for name in $names; do
    flag=$(cat "/run/top/old_roots/$name/test_flag" 2>/dev/null || echo none)
    say "OLD_ROOT $1 $name flag=$flag"
  done
  umount /run/top
}

# `rasa watch` at work (the watch scenario, rasa_vm.watch=1): a writer in a cgroup named like a
# systemd unit writes state on the root; the record must name that unit. This init is no
# systemd, so the cgroup is made by hand, as systemd would for vm-writer.service.
if [ "$(cmdline_arg rasa_vm.watch 0)" = 1 ]; then
  [ -e /sys/fs/cgroup/cgroup.procs ] || mount -t cgroup2 none /sys/fs/cgroup
  mkdir -p /run/rasa /sys/fs/cgroup/system.slice/vm-writer.service
  rasa watch --root / --record /run/rasa/watch.jsonl --flush-interval 1 &
  watcher=$!
  # The first write of the record means the mark is in place.
  for _ in $(seq 1 120); do [ -s /run/rasa/watch.jsonl ] && break; sleep 0.5; done
  # The shell itself writes the file (echo is a builtin), and stays alive while rasa looks up
  # who wrote it.
  sh -c 'echo $$ > /sys/fs/cgroup/system.slice/vm-writer.service/cgroup.procs
         mkdir -p /var/lib/vm-writer
         echo "written by vm-writer.service" > /var/lib/vm-writer/state
         sleep 3'
  kill -TERM "$watcher"; wait "$watcher"
  say "WATCH_EXIT $?"
  say "WATCH_STATE $(grep -F '"/var/lib/vm-writer/state"' /run/rasa/watch.jsonl | head -n 1)"
  say "WATCH_DIFF $(rasa diff --long --watch-record /run/rasa/watch.jsonl 2>/dev/null | grep -F /var/lib/vm-writer/state | head -n 1)"
fi

say "LS_ROOT start $(listing /)"
say "LS_PERSIST start $(listing /persist)"
if [ -e /test_flag ]; then say "FLAG EXISTS $(cat /test_flag)"; else say "FLAG ABSENT"; fi
say "NESTED $(subvolume_or_dir /var/lib/machines)"
for note in /persist/note-*; do
  [ -e "$note" ] && say "PERSIST_NOTE $(basename "$note") $(cat "$note")"
done
old_roots before-prune

# Pruning is deferred to stage 2, with the same layout flags as the rollback unit.
rasa prune --device "$device" --root root --blank root-blank --old-roots old_roots \
  --persist persist --keep "$keep" --keep-days "$keep_days"
say "PRUNE exit=$?"
old_roots after-prune

# State for the next boot to wipe (/ and a nested subvolume) or keep (/persist).
echo "written in boot $boot" > /test_flag
mkdir -p /var/lib
btrfs -q subvolume create /var/lib/machines && echo "inside the nested subvolume" > /var/lib/machines/inside
echo "written in boot $boot" > "/persist/note-$boot"
say "LS_ROOT end $(listing /)"
say "LS_PERSIST end $(listing /persist)"
sync
say "POWEROFF"
poweroff -f
