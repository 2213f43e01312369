#!/usr/bin/env bash
# Set up everything headwatch needs on a Debian machine, and nothing twice:
#   (a) Debian packages: Java, Maven, Prometheus, Alertmanager (apt-get only when one is missing)
#   (b) .venv with `pip install -e '.[dev]'` (skipped while pyproject.toml is unchanged)
#   (c) the pinned Apache Kafka jars from Maven Central into .cache/kafka/ (skipped once there)
# Run as root, or as a user with sudo, for (a). A second run takes about a second.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
did_something=0

say() { echo "setup: $*"; }
fail() { echo "setup: error: $*" >&2; exit 1; }
have() { command -v "$1" >/dev/null 2>&1; }

# (a) Debian packages ---------------------------------------------------------------------------
packages=()
have java || packages+=(default-jre-headless)
have mvn || packages+=(maven)
have prometheus || packages+=(prometheus)
have prometheus-alertmanager || have alertmanager || packages+=(prometheus-alertmanager)
# Public-domain text for the demo's haystacks (KJV, Jargon File); see headwatch/model/MODEL_CARD.md.
{ [ -d /usr/share/doc/bible-kjv ] && [ -d /usr/share/doc/bible-kjv-text ]; } || packages+=(bible-kjv-text bible-kjv)
[ -d /usr/share/doc/jargon-text ] || packages+=(jargon-text)
if ! have "$PYTHON"; then
    packages+=(python3 python3-venv)
    PYTHON=python3
elif ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    packages+=(python3-venv)  # Debian's python3 ships venv without ensurepip
fi

if ((${#packages[@]})); then
    sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        have sudo || fail "missing ${packages[*]}; as root run: apt-get install -y --no-install-recommends ${packages[*]}"
        sudo=(sudo)
    fi
    have apt-get || fail "missing ${packages[*]} and no apt-get to install them (headwatch's scripts expect Debian)"
    say "installing Debian packages ${packages[*]}"
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -qq || fail "apt-get update failed: is a Debian mirror reachable?"
    "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null \
        || fail "apt-get install ${packages[*]} failed"
    did_something=1
fi

# (b) Python virtual environment ----------------------------------------------------------------
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || fail "$PYTHON is $("$PYTHON" -V 2>&1); headwatch needs Python 3.10 or newer"
mkdir -p .cache/setup
stamp=.cache/setup/venv.sha256
wanted="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ -x .venv/bin/python ] && .venv/bin/python -c '' 2>/dev/null && [ "$(cat "$stamp" 2>/dev/null)" = "$wanted" ]; then
    :
else
    if ! { [ -x .venv/bin/python ] && .venv/bin/python -c '' 2>/dev/null; }; then
        say "creating .venv with $("$PYTHON" -V 2>&1)"
        rm -rf .venv
        "$PYTHON" -m venv .venv
    fi
    say "installing Python dependencies into .venv (pip install -e '.[dev]'; the first time takes minutes)"
    .venv/bin/python -m pip install -q -e '.[dev]' || fail "pip install -e '.[dev]' failed (see above)"
    echo "$wanted" > "$stamp"
    did_something=1
fi

# (c) Apache Kafka jars -------------------------------------------------------------------------
if ! .venv/bin/headwatch stack fetch --cached >/dev/null 2>&1; then
    say "fetching the pinned Apache Kafka jars from Maven Central (mvn)"
    .venv/bin/headwatch stack fetch || fail "fetching Kafka failed (see above)"
    did_something=1
fi

if ((did_something)); then
    say "ok"
else
    say "ok (nothing to do)"
fi
