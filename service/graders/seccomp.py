"""The seccomp filter python-grader sandboxes run under: a classic-BPF program that bubblewrap loads
(`bwrap --seccomp FD`) just before it starts the sandbox's interpreter.

It refuses, with EPERM, the system calls a grader never needs and that widen what a process can reach:
mounting and namespaces (mount, the new mount API, pivot_root, chroot, unshare, setns, clone with any
CLONE_NEW* flag), other processes' memory (ptrace, process_vm_*, pidfd_getfd, kcmp), the kernel's own
state (kexec, module loading, bpf, perf_event_open, keyctl and the keyrings, syslog, clocks, swap,
reboot, quotas, acct), io_uring (whose requests bypass seccomp), userfaultfd and file handles
(open_by_handle_at walks past mount boundaries). clone3 answers ENOSYS, as Docker's default profile
does: its flags sit behind a pointer seccomp cannot read, and glibc falls back to clone on ENOSYS.
A system call of another ABI (x32, or a foreign audit arch) kills the process. The default is allow: a
denylist the size of Docker's, not an allowlist, because Python, numpy and pandas use a wide and
changing set of calls and a missing one would fail graders in ways their authors cannot debug.

Numbers come from the kernel's uapi headers (asm/unistd_64.h for x86_64, asm-generic/unistd.h for
aarch64); `filter_for_machine` refuses other architectures, so a grader never runs unfiltered.
"""

from __future__ import annotations

import errno
import os
import struct

# Classic BPF opcodes (linux/filter.h) and seccomp return values (linux/seccomp.h).
_LD_W_ABS, _JEQ_K, _JGE_K, _JSET_K, _RET_K = 0x20, 0x15, 0x35, 0x45, 0x06
_RET_KILL_PROCESS, _RET_ERRNO, _RET_ALLOW = 0x80000000, 0x00050000, 0x7FFF0000
_NR, _ARCH, _ARG0 = 0, 4, 16  # offsets in struct seccomp_data (args[0]'s low word: little-endian only)
X32_SYSCALL_BIT = 0x40000000
CLONE_NAMESPACES = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000
# NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET

SYSCALLS = {
    "x86_64": {
        "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161, "unshare": 272, "setns": 308,
        "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
        "mount_setattr": 442, "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311,
        "pidfd_getfd": 438, "kcmp": 312, "process_madvise": 440, "kexec_load": 246, "kexec_file_load": 320,
        "init_module": 175, "finit_module": 313, "delete_module": 176, "bpf": 321, "perf_event_open": 298,
        "keyctl": 250, "add_key": 248, "request_key": 249, "syslog": 103, "swapon": 167, "swapoff": 168,
        "reboot": 169, "sethostname": 170, "setdomainname": 171, "settimeofday": 164, "clock_settime": 227,
        "clock_adjtime": 305, "adjtimex": 159, "quotactl": 179, "quotactl_fd": 443, "acct": 163,
        "lookup_dcookie": 212, "vhangup": 153, "fanotify_init": 300, "io_uring_setup": 425,
        "io_uring_enter": 426, "io_uring_register": 427, "userfaultfd": 323, "open_by_handle_at": 304,
        "name_to_handle_at": 303, "nfsservctl": 180, "iopl": 172, "ioperm": 173, "uselib": 134, "_sysctl": 156,
        "create_module": 174, "get_kernel_syms": 177, "query_module": 178, "clone": 56, "clone3": 435,
    },
    "aarch64": {
        "mount": 40, "umount2": 39, "pivot_root": 41, "chroot": 51, "unshare": 97, "setns": 268,
        "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
        "mount_setattr": 442, "ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271,
        "pidfd_getfd": 438, "kcmp": 272, "process_madvise": 440, "kexec_load": 104, "kexec_file_load": 294,
        "init_module": 105, "finit_module": 273, "delete_module": 106, "bpf": 280, "perf_event_open": 241,
        "keyctl": 219, "add_key": 217, "request_key": 218, "syslog": 116, "swapon": 224, "swapoff": 225,
        "reboot": 142, "sethostname": 161, "setdomainname": 162, "settimeofday": 170, "clock_settime": 112,
        "clock_adjtime": 266, "adjtimex": 171, "quotactl": 60, "quotactl_fd": 443, "acct": 89,
        "lookup_dcookie": 18, "vhangup": 58, "fanotify_init": 262, "io_uring_setup": 425,
        "io_uring_enter": 426, "io_uring_register": 427, "userfaultfd": 282, "open_by_handle_at": 265,
        "name_to_handle_at": 264, "nfsservctl": 42, "clone": 220, "clone3": 435,
    },
}  # fmt: skip
# Every name but clone and clone3 is refused outright (iopl and the other x86-only ones exist only there).
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}


def _insn(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("<HBBI", code, jt, jf, k)  # struct sock_filter, in this (little-endian) machine's order


def denied_syscalls(machine: str) -> list[str]:
    """The names the filter refuses with EPERM on `machine`; clone only with a CLONE_NEW* flag, and clone3
    answers ENOSYS."""
    return [name for name in SYSCALLS[machine] if name not in ("clone", "clone3")]


def build_filter(machine: str) -> bytes:
    """The BPF program for `machine` ("x86_64" or "aarch64"), as the bytes `bwrap --seccomp` reads."""
    if machine not in SYSCALLS:
        raise ValueError(f"no seccomp filter for the {machine} architecture (supported: {', '.join(SYSCALLS)})")
    numbers = SYSCALLS[machine]
    deny = _RET_ERRNO | errno.EPERM
    program = [_insn(_LD_W_ABS, _ARCH), _insn(_JEQ_K, AUDIT_ARCH[machine], jt=1), _insn(_RET_K, _RET_KILL_PROCESS)]
    program.append(_insn(_LD_W_ABS, _NR))
    if machine == "x86_64":  # the x32 ABI reaches the same kernel code under other numbers
        program += [_insn(_JGE_K, X32_SYSCALL_BIT, jf=1), _insn(_RET_K, _RET_KILL_PROCESS)]
    for name in denied_syscalls(machine):
        program += [_insn(_JEQ_K, numbers[name], jf=1), _insn(_RET_K, deny)]
    program += [_insn(_JEQ_K, numbers["clone3"], jf=1), _insn(_RET_K, _RET_ERRNO | errno.ENOSYS)]
    program += [
        _insn(_JEQ_K, numbers["clone"], jf=4),
        _insn(_LD_W_ABS, _ARG0),
        _insn(_JSET_K, CLONE_NAMESPACES, jf=1),
        _insn(_RET_K, deny),
        _insn(_RET_K, _RET_ALLOW),
        _insn(_RET_K, _RET_ALLOW),
    ]
    return b"".join(program)


def filter_for_machine() -> bytes:
    return build_filter(os.uname().machine)
