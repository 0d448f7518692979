#!/usr/bin/env bash
# What tests/test_browser.py needs besides the test extra (which holds selenium): Debian's chromium and
# chromium-driver, from apt. .ci/run runs this before the tests. It never fails: where apt-get is missing,
# or this is neither root nor allowed sudo, or the install fails, it says so and the browser test skips,
# naming this script.
set -u
if command -v chromedriver >/dev/null && { command -v chromium >/dev/null || command -v chromium-browser >/dev/null; }; then
    echo "browser: chromium and chromedriver found ($(command -v chromium || command -v chromium-browser), $(command -v chromedriver))"
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    echo "browser: no apt-get here: install chromium and chromedriver yourself, or tests/test_browser.py skips"
    exit 0
fi
if [ "$(id -u)" = 0 ]; then
    sudo=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    sudo=(sudo -n)
else
    echo "browser: not root and no password-less sudo: run 'apt-get install chromium chromium-driver' as root, or tests/test_browser.py skips"
    exit 0
fi
echo "browser: installing chromium and chromium-driver with apt-get"
if "${sudo[@]}" apt-get update -qq && DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends chromium chromium-driver; then
    echo "browser: installed ($(chromium --version 2>/dev/null))"
else
    echo "browser: apt-get could not install chromium and chromium-driver: tests/test_browser.py skips"
fi
exit 0
