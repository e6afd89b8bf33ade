"""Run a command as an ordinary user (uid 65534), the way rft runs when nobody gave it root: a program of its
own, started by root, that steps down and execs the command.

    python -m tests.support.unprivileged [--no-userns] [--bind SRC DST] -- COMMAND...

--bind SRC DST  first bind-mounts SRC at DST in a mount namespace of its own, so the command can reach a
                checkout that sits under a folder the user cannot enter (/root, a CI runner's home).
--no-userns     runs the command where the kernel allows no further user namespaces (a host with
                user.max_user_namespaces = 0, or a container runtime's seccomp profile that forbids them):
                it enters a user namespace of its own that maps every uid to itself and sets that
                namespace's limit to 0. The host's own setting is never touched.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
MS_BIND, MS_REC, MS_PRIVATE = 0x1000, 0x4000, 0x40000
NOBODY = 65534

libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _bind(source: str, target: str) -> None:
    _check(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "making / private")
    _check(libc.mount(source.encode(), target.encode(), None, MS_BIND | MS_REC, None), f"binding {source}")


def _enter_userns_without_nesting() -> None:
    """A user namespace mapping all uids and gids to themselves, whose limit on nested ones is 0."""
    ready_r, ready_w = os.pipe()
    mapped_r, mapped_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child enters the namespace; its parent (still in the host's) writes the maps
        os.close(ready_r)
        os.close(mapped_w)
        _check(libc.unshare(CLONE_NEWUSER), "unshare(CLONE_NEWUSER)")
        os.write(ready_w, b"x")
        if os.read(mapped_r, 1) != b"x":
            os._exit(70)
        with open("/proc/sys/user/max_user_namespaces", "w") as f:
            f.write("0")
        return
    os.close(ready_w)
    os.close(mapped_r)
    if os.read(ready_r, 1) == b"x":
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{pid}/{name}", "w") as f:
                f.write("0 0 4294967295")
        os.write(mapped_w, b"x")
    _, status = os.waitpid(pid, 0)
    os._exit(os.waitstatus_to_exitcode(status))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-userns", action="store_true")
    parser.add_argument("--bind", nargs=2, metavar=("SRC", "DST"))
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if os.geteuid() != 0:
        sys.exit("tests.support.unprivileged must start as root, to step down from it")
    if args.bind:
        _bind(*args.bind)
    if args.no_userns:
        _enter_userns_without_nesting()
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    os.chdir("/")  # the caller's folder may be one this user cannot enter
    os.execv(command[0], command)


if __name__ == "__main__":
    main()
