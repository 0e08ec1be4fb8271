"""Kernel-facing setup of one sandbox: plan (pure), mounts, cgroups, seccomp, Landlock, launcher."""
