"""Tripwire rulesets: corral's rules plus a policy's, compiled once per set of file versions (a
sandbox start must not pay for parsing YAML). Each `Host` keeps its own cache; the CLI validates a
policy's rules with a cache of its own."""

from __future__ import annotations

import os
import threading

from corral._errors import PolicyError
from corral.detect import rules as detect_rules
from corral.policy import Policy


def rule_files(policy: Policy) -> list[str]:
    """The policy's extra rule files, relative paths taken from the policy file's directory."""
    base = os.path.dirname(os.path.abspath(policy.source)) if os.path.isfile(policy.source) else os.getcwd()
    return [p if os.path.isabs(p) else os.path.join(base, p) for p in policy.tripwires.rules]


class RulesetCache:
    def __init__(self) -> None:
        self._rulesets: dict[tuple[object, ...], detect_rules.Ruleset] = {}
        self._lock = threading.Lock()

    def load(self, policy: Policy) -> detect_rules.Ruleset:
        """The policy's ruleset; a PolicyError if its responses name no rule or category."""
        # corral's own files are part of the installed package: they change with an upgrade, which
        # restarts the process. The policy's files are checked at every start.
        files = rule_files(policy)
        key: list[object] = ["builtin"]
        for f in files:
            try:
                st = os.stat(f)
                key.append((f, st.st_mtime_ns, st.st_size))
            except OSError:
                key.append((f, None))  # the loader reports it, naming the file
        k = tuple(key)
        with self._lock:
            ruleset = self._rulesets.get(k)
        if ruleset is None:
            ruleset = detect_rules.load(files)
            with self._lock:
                self._rulesets[k] = ruleset
        bad = [
            k
            for k in policy.tripwires.responses
            if k not in ruleset.names and k not in detect_rules.CATEGORIES
        ]
        if bad:
            raise PolicyError(
                [
                    f"{policy.source}: tripwires.responses.{k}: no rule or category of that name; use a "
                    f"category ({', '.join(detect_rules.CATEGORIES)}) or a rule name (`corral rules list`)"
                    for k in bad
                ]
            )
        return ruleset
