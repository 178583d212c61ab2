#!/usr/bin/env bash
# The system packages the tests need, from Debian's packages, installed only when missing: team mode's
# PostgreSQL 15 server and OpenSSH's sshd (docs/team.md), and Chromium, which draws `dvc plots show`'s page
# offline (tests/test_plots.py). `make test` and `make team-server` call this; CI runs as root on a
# fresh machine, so it installs there. Without root it only says what is missing (the tests then name it).
set -euo pipefail

missing=()
[ -x /usr/lib/postgresql/15/bin/postgres ] && [ -x /usr/lib/postgresql/15/bin/initdb ] || missing+=(postgresql-15)
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
command -v chromium >/dev/null || missing+=(chromium)
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  echo "system_deps: missing ${missing[*]}; install them as root (apt-get install ${missing[*]})" >&2
  exit 0
fi

# Debian's postinst scripts would start sshd on port 22 and a PostgreSQL cluster on 5432 for every
# interface: a policy-rc.d that answers 101 keeps them from starting any service (docker images ship one).
added_policy=
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && added_policy=1
fi
trap 'if [ -n "$added_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi' EXIT
echo "system_deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
