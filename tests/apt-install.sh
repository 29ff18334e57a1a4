#!/usr/bin/env bash
# apt-install.sh COMMAND PACKAGE: installs Debian's PACKAGE unless COMMAND (a path or a
# name on PATH) is already there. As root, or through sudo. For the test runners, which
# install what they need on a fresh machine (chromium, mosquitto-clients, prometheus for
# promtool).
set -euo pipefail
command="$1"
package="$2"
if [ -x "$command" ] || command -v "$command" >/dev/null 2>&1; then
  exit 0
fi
echo "-- installing Debian's $package"
sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$package" >/dev/null
