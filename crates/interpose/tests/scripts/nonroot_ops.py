#!/usr/bin/env python3
"""Operations an unprivileged user tries on a tree prepared by root (see nonroot.rs).

Usage: nonroot_ops.py BASE PHASE     (PHASE: "user" or "group")

Prints one JSON object: operation name -> "ok" or the errno name. Does not judge the
results: the caller compares them with the same run on a plain directory.
"""

import errno
import json
import os
import sys


def attempt(fn):
    try:
        res = fn()
        return res if isinstance(res, str) else "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))


def create(path, mode=0o644, flags=0):
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY | flags, mode))


def read(path):
    with open(path, "rb") as f:
        f.read()


def write(path, flags=0):
    fd = os.open(path, os.O_WRONLY | flags)
    try:
        os.write(fd, b"x")
    finally:
        os.close(fd)


def mode_after(path, change):
    """The mode a stat right after `change` shows, with the attributes cached before."""
    os.stat(path)
    change()
    return "%o" % os.stat(path).st_mode


def setfacl(path, spec):
    """setfacl -m SPEC PATH (the access ACL, as the user)."""
    import subprocess
    r = subprocess.run(["setfacl", "-m", spec, path], capture_output=True)
    if r.returncode != 0:
        raise OSError(errno.EPERM, r.stderr.decode())


def access(path, mode):
    """access(2) as an operation: EACCES when it says no."""
    if not os.access(path, mode):
        raise OSError(errno.EACCES, "access(2) denied")


def replace(new, target):
    """Creates `new` and renames it over `target`."""
    create(new)
    os.rename(new, target)


def user_phase(b):
    j = lambda *p: os.path.join(b, *p)  # noqa: E731
    ops = {
        "create_in_writable_dir": lambda: create(j("pub", "new")),
        "mkdir_in_writable_dir": lambda: os.mkdir(j("pub", "dir")),
        "mkfifo_in_writable_dir": lambda: os.mkfifo(j("pub", "fifo")),
        "symlink_in_writable_dir": lambda: os.symlink("new", j("pub", "sl")),
        "link_own_file": lambda: os.link(j("pub", "new"), j("pub", "new-link")),
        "rename_own_file": lambda: os.rename(j("pub", "new-link"), j("pub", "new-renamed")),
        "create_setgid_mode_own_group": lambda: create(j("pub", "sgidfile"), 0o2755),
        "read_root_0644": lambda: read(j("rootfile")),
        "write_root_0644": lambda: write(j("rootfile")),
        "append_root_0644": lambda: write(j("rootfile"), os.O_APPEND),
        "trunc_open_root_0644": lambda: write(j("rootfile"), os.O_TRUNC),
        "truncate_root_0644": lambda: os.truncate(j("rootfile"), 0),
        "read_root_0600": lambda: read(j("secret")),
        "chmod_root_file": lambda: os.chmod(j("rootfile"), 0o666),
        "chown_root_file": lambda: os.chown(j("rootfile"), 65534, 65534),
        "chown_own_file_to_root": lambda: os.chown(j("pub", "new"), 0, -1),
        "chgrp_own_file_to_nonmember_group": lambda: os.chown(j("pub", "new"), -1, 1234),
        "chmod_setgid_nonmember_group": lambda: os.chmod(j("own", "g1234"), 0o2755),
        "utime_now_root_0666": lambda: os.utime(j("sticky", "rootf")),
        "utime_explicit_root_0666": lambda: os.utime(j("sticky", "rootf"), ns=(1, 1)),
        "setxattr_root_0644": lambda: os.setxattr(j("rootfile"), "user.x", b"1"),
        "setxattr_own_file": lambda: os.setxattr(j("pub", "new"), "user.x", b"1"),
        "getxattr_root_0600": lambda: os.getxattr(j("secret"), "user.tag"),
        "getxattr_root_0644": lambda: os.getxattr(j("rootfile"), "user.tag"),
        "hardlink_root_file": lambda: os.link(j("rootfile"), j("pub", "stolen")),
        "mkdir_in_root_0755": lambda: os.mkdir(j("ro_dir", "d")),
        "create_in_root_0755": lambda: create(j("ro_dir", "f")),
        "unlink_in_root_0755": lambda: os.unlink(j("ro_dir", "existing")),
        "rename_into_root_0755": lambda: os.rename(j("pub", "new-renamed"), j("ro_dir", "moved")),
        "stat_through_0744_dir": lambda: os.stat(j("dirnox", "f")),
        "list_0744_dir": lambda: os.listdir(j("dirnox")),
        "unlink_root_file_in_0777_dir": lambda: os.unlink(j("pub", "rootowned")),
        "create_excl_existing": lambda: create(j("pub", "rootowned2"), flags=os.O_EXCL),
        "create_in_group_dir": lambda: create(j("grp", "f")),
        "read_group_file": lambda: read(j("gfile")),
        # In a setgid directory of a group the user is not in, new files get that group,
        # so a set-group-ID bit asked for must be dropped.
        "create_setgid_mode_in_foreign_setgid_dir": lambda: create(j("sgid_open", "f"), 0o2755),
        "mknod_setgid_mode_in_foreign_setgid_dir": lambda: os.mknod(j("sgid_open", "n"), 0o2755),
        "mkdir_in_foreign_setgid_dir": lambda: os.mkdir(j("sgid_open", "d"), 0o2755),
        "chmod_setgid_in_foreign_setgid_dir": lambda: (create(j("sgid_open", "chmodded")),
                                                       os.chmod(j("sgid_open", "chmodded"), 0o2755)),
        "sticky_write_root_0666": lambda: write(j("sticky", "rootf")),
        "sticky_unlink_root_file": lambda: os.unlink(j("sticky", "rootf")),
        "sticky_unlink_other_users_file": lambda: os.unlink(j("sticky", "other")),
        "sticky_rename_other_users_file": lambda: os.rename(j("sticky", "other"), j("sticky", "mine")),
        "sticky_replace_other_users_file": lambda: replace(j("sticky", "mine2"), j("sticky", "other")),
        "sticky_create_own": lambda: create(j("sticky", "own")),
        "sticky_unlink_own": lambda: os.unlink(j("sticky", "own")),
        "read_acl_granted": lambda: read(j("aclfile")),
        "read_acl_denied": lambda: read(j("denyacl")),
        "create_in_acl_dir": lambda: create(j("acldir", "f")),
        "write_own_setuid_file": lambda: write(j("own", "suid"), os.O_APPEND),
        "write_file_with_capability": lambda: write(j("capfile"), os.O_APPEND),
        "chown_noop_root_setuid_file": lambda: os.chown(j("setid", "root_suid"), -1, -1),
        "chown_noop_own_setuid_file": lambda: os.chown(j("setid", "own_suid"), -1, -1),
        "mode_right_after_write_setuid": lambda: mode_after(
            j("setid", "writable_suid"), lambda: write(j("setid", "writable_suid"))),
        "mode_right_after_append_own_setuid": lambda: mode_after(
            j("setid", "own_suid_appended"),
            lambda: write(j("setid", "own_suid_appended"), os.O_APPEND)),
        "mode_right_after_truncate_setuid": lambda: mode_after(
            j("setid", "truncated_suid"), lambda: os.truncate(j("setid", "truncated_suid"), 0)),
        # A truncating open alone: the truncation drops the bit, not a write after it.
        "mode_right_after_open_trunc_setuid": lambda: mode_after(
            j("setid", "otrunc_suid"),
            lambda: os.close(os.open(j("setid", "otrunc_suid"), os.O_WRONLY | os.O_TRUNC))),
        "write_acl_writable_setuid": lambda: write(j("setid", "acl_writable_suid"), os.O_APPEND),
        "write_setgid_nogx_nonmember": lambda: write(j("setid", "sgid_nogx_user"), os.O_APPEND),
        "setfacl_own_setgid_file_outside_its_group": lambda: setfacl(
            j("setid", "own_sgid_foreign_group"), "u:2000:r"),
        "access_w_root_0644": lambda: access(j("rootfile"), os.W_OK),
        "access_r_acl_granted": lambda: access(j("aclfile"), os.R_OK),
        "access_r_acl_denied": lambda: access(j("denyacl"), os.R_OK),
    }
    return {name: attempt(fn) for name, fn in ops.items()}


def group_phase(b):
    j = lambda *p: os.path.join(b, *p)  # noqa: E731
    ops = {
        "create_in_group_dir": lambda: create(j("grp", "f")),
        "mkdir_in_group_dir": lambda: os.mkdir(j("grp", "d")),
        "create_setgid_mode_in_group_dir": lambda: create(j("grp", "sgidfile"), 0o2755),
        "create_in_setgid_dir": lambda: create(j("sgid", "f")),
        "mkdir_in_setgid_dir": lambda: os.mkdir(j("sgid", "d")),
        "create_setgid_mode_in_setgid_dir": lambda: create(j("sgid", "sgidfile"), 0o2755),
        "read_group_file": lambda: read(j("gfile")),
        "write_group_file": lambda: write(j("gfile"), os.O_APPEND),
        "chgrp_own_file_to_member_group": lambda: os.chown(j("grp", "f"), -1, 1234),
        "chmod_setgid_member_group": lambda: os.chmod(j("grp", "f"), 0o2755),
        "read_root_0600": lambda: read(j("secret")),
        "write_setgid_nogx_member": lambda: write(j("setid", "sgid_nogx_member"), os.O_APPEND),
    }
    return {name: attempt(fn) for name, fn in ops.items()}


def main():
    base, phase = sys.argv[1], sys.argv[2]
    os.umask(0o022)
    res = {"user": user_phase, "group": group_phase}[phase](base)
    json.dump(res, sys.stdout, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
