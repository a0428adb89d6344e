#!/usr/bin/env bash
# Prints the URI this machine's apt uses for Debian suite $1 (e.g. bookworm), read from its
# own sources (deb822 *.sources stanzas and one-line *.list entries). No host is named here.
set -euo pipefail
suite="${1:?usage: apt-mirror.sh SUITE}"
python3 - "$suite" <<'PY'
import glob, sys
suite = sys.argv[1]
for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    for stanza in open(path, encoding="utf-8").read().split("\n\n"):
        fields = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line:
                continue
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.split()
        if "deb" in fields.get("types", []) and suite in fields.get("suites", []) \
                and "main" in fields.get("components", []) and fields.get("uris"):
            print(fields["uris"][0].rstrip("/"))
            sys.exit(0)
for path in ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*.list")):
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except OSError:
        continue
    for line in lines:
        words = line.split("#", 1)[0].split()
        if words[:1] != ["deb"]:
            continue
        words = [w for w in words[1:] if not w.startswith("[")]
        if len(words) >= 3 and words[1] == suite and "main" in words[2:]:
            print(words[0].rstrip("/"))
            sys.exit(0)
sys.exit(1)
PY
