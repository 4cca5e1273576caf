#!/usr/bin/env bash
# Debian packages the project needs: fluidsynth + the General MIDI sound font (MIT) for the built-in demo dataset's
# instrument notes, espeak-ng for its spoken words; with `test`, also Chromium and its WebDriver, which the MLflow UI
# browser test drives (headless, through Selenium).
# Installs them when running as root; otherwise says exactly what to run.
set -euo pipefail
missing=()
command -v fluidsynth >/dev/null 2>&1 || missing+=(fluidsynth)
[ -f /usr/share/sounds/sf2/FluidR3_GM.sf2 ] || missing+=(fluid-soundfont-gm)
command -v espeak-ng >/dev/null 2>&1 || missing+=(espeak-ng)
if [ "${1:-}" = test ]; then
    command -v chromium >/dev/null 2>&1 || missing+=(chromium)
    command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
fi
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
else
    echo "Missing Debian packages: ${missing[*]}" >&2
    echo "  Debian/Ubuntu: sudo apt-get install -y ${missing[*]}" >&2
    echo "  macOS (Homebrew): brew install fluid-synth espeak-ng, and a GM sound font at /usr/share/sounds/sf2/FluidR3_GM.sf2" >&2
    exit 1
fi
