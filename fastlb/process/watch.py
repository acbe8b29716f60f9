"""`[server] watch = true`: reload when a file the config was read from changes.

The master runs no event loop, only select(2) on its wake pipe, so the watcher is an inotify(7)
descriptor it adds to that select: inotify_simple (a maintained ctypes wrapper of the three syscalls)
gives exactly that, with no thread and no polling.  watchfiles would need a thread of its own next to
a master that forks, and its Rust watcher adds nothing on Linux, where it also uses inotify.

What is watched is each input's directory, not the file: an editor or certbot replaces a file by
rename(2), and Kubernetes updates a mounted ConfigMap or Secret by writing a new timestamped directory
and renaming a `..data_tmp` symlink over `..data` (the kubelet's AtomicWriter), so the files the config
names (`fastlb.toml -> ..data/fastlb.toml`) never change themselves: only `..data` is moved in their
directory.  A watch on an inode would stay on the old one.  So an event counts when its name is one of
the inputs' names or `..data`.

Changes are debounced: the reload starts once DEBOUNCE has passed without another relevant event, so
a save in several writes, or a ConfigMap and a Secret updated together, make one reload.  The reload
is the normal one (master.handle_hup): a broken update is refused and logged the same way.
"""

import dataclasses
import os

from inotify_simple import INotify, flags

DEBOUNCE = 1.0
_KUBERNETES_DATA = "..data"
_MASK = flags.CLOSE_WRITE | flags.MOVED_TO | flags.MOVED_FROM | flags.CREATE | flags.DELETE


def input_files(cfg, ingress_files=()) -> list[str]:
    """The files cfg was built from: the config file, every file a setting names for reading
    (certificates and keys, also those an Ingress manifest brought in) and the Ingress manifests."""
    found = [cfg.source] if cfg.source else []
    found += [os.path.abspath(path) for path in ingress_files]

    def walk(value):
        if dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                item = getattr(value, f.name)
                if getattr(f.metadata.get("kind"), "readable", False) and item:
                    found.append(item)
                else:
                    walk(item)
        elif isinstance(value, tuple | list):
            for item in value:
                walk(item)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)

    walk(cfg)
    return list(dict.fromkeys(found))


class Watcher:
    def __init__(self, files, log):
        self.log = log
        self.files = files
        self.inotify = INotify(nonblocking=True)
        self.names: dict[int, set[str]] = {}   # watch descriptor -> names that matter in its directory
        self.changed: set[str] = set()         # since the last reload started
        self.due = None                        # time.monotonic() when the debounced reload is due
        by_dir: dict[str, set[str]] = {}
        for path in files:
            by_dir.setdefault(os.path.dirname(path), {_KUBERNETES_DATA}).add(os.path.basename(path))
            # A symlink to a file kept elsewhere (/etc/fastlb/site.pem -> /srv/certs/site.pem) is
            # edited there.  Not under Kubernetes' ..data: that directory is replaced on each update.
            real = os.path.realpath(path)
            if real != path and f"{os.sep}.." not in real:
                by_dir.setdefault(os.path.dirname(real), {_KUBERNETES_DATA}).add(os.path.basename(real))
        for directory, names in by_dir.items():
            try:
                self.names[self.inotify.add_watch(directory, _MASK)] = names
            except OSError as exc:
                log.warning("watch: cannot watch %s: %s", directory, exc)
        self.directories = sorted(by_dir)

    def fileno(self) -> int:
        return self.inotify.fileno()

    def read(self, now: float) -> None:
        """Take the pending events; a relevant one (re)starts the debounce."""
        try:
            events = self.inotify.read(timeout=0)
        except BlockingIOError:
            return
        for event in events:
            # Q_OVERFLOW (wd -1): events were lost, so something may have changed.
            if event.mask & flags.Q_OVERFLOW or event.name in self.names.get(event.wd, ()):
                self.changed.add(event.name or "(queue overflow)")
                self.due = now + DEBOUNCE

    def take(self, now: float) -> list[str] | None:
        """The changed names once the debounce has passed (then forgotten), else None."""
        if self.due is None or now < self.due:
            return None
        changed, self.changed, self.due = sorted(self.changed), set(), None
        return changed

    def close(self) -> None:
        self.inotify.close()
