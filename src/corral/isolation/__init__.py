"""Kernel-facing setup of one sandbox: plan (pure), mounts, cgroups, seccomp, Landlock; the zygote that forks
each sandbox (`zygote`), the set-up in its processes (`child`), its init (`init`), and every message
between them (`protocol`).
"""
