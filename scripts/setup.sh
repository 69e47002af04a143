#!/usr/bin/env bash
# rankpilot set-up: installs everything the project needs, idempotently.
#
#   1. Debian packages: libopenblas-dev (LAPACK for ndarray-linalg in envs/).
#   2. A Python virtual environment in a cache outside the checkout
#      ($RANKPILOT_CACHE, default ~/.cache/rankpilot/venv) with scripts/requirements.txt:
#      torch==2.13.0 (libtorch for tch 0.26), tensorboard, transformers, peft.
#      A version marker (hash of requirements.txt + python version) makes a stale cache reinstall.
#   3. .cargo/config.toml (git-ignored) pointing torch-sys at that venv, so a plain `cargo build`
#      finds libtorch without the user exporting anything.
#   4. The Python package `rankpilot` (python/, maturin + PyO3) built from this checkout and
#      installed into the venv, with scripts/requirements-python.txt (gymnasium, SB3, pytest).
#      Rebuilt only when a Rust or Python source changed (a hash of them is its marker).
#
# When everything is present this finishes in well under a second.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${RANKPILOT_CACHE:-$HOME/.cache/rankpilot}
venv=$cache/venv
req=$root/scripts/requirements.txt
say() { printf '[setup] %s\n' "$*" >&2; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

# ---- 1. Debian packages -------------------------------------------------------------------
debs=(libopenblas-dev)
missing=()
for p in "${debs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  sudo=""; [[ $(id -u) == 0 ]] || sudo="sudo"
  say "installing Debian packages: ${missing[*]}"
  mkdir -p "$cache"
  apt_log=$cache/apt-install.log
  if ! { $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } >"$apt_log" 2>&1; then
    tail -n 5 "$apt_log" >&2
    die "could not install Debian packages: ${missing[*]} (needs root or sudo and a reachable Debian mirror). Full log: $apt_log"
  fi
fi

# ---- 2. Python venv with torch ------------------------------------------------------------
py=${PYTHON:-python3}
command -v "$py" >/dev/null || die "python3 not found; rankpilot needs CPython >= 3.10 with venv and pip"
want="$(sha256sum "$req" | cut -c1-16) $("$py" -c 'import sys; print("py%d.%d" % sys.version_info[:2])')"
marker=$venv/.rankpilot-version
if [[ ! -f $marker || $(cat "$marker") != "$want" ]]; then
  [[ -d $venv ]] && say "cache at $venv is stale (marker '$( [[ -f $marker ]] && cat "$marker")' != '$want'): reinstalling"
  rm -rf "$venv"
  mkdir -p "$cache"
  "$py" -m venv "$venv" || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
  say "installing $(grep -vc '^\s*\(#\|$\)' "$req") Python packages into $venv (torch is ~2.6 GB download, ~5 GB installed; a few minutes)"
  pip_log=$cache/pip-install.log
  if ! "$venv/bin/pip" install --disable-pip-version-check --retries "${PIP_RETRIES:-5}" --timeout "${PIP_TIMEOUT:-60}" \
        -r "$req" >"$pip_log" 2>&1; then
    tail -n 5 "$pip_log" >&2
    pkgs=$(grep -v '^\s*\(#\|$\)' "$req" | tr '\n' ' ')
    rm -rf "$venv"
    die "could not install the Python packages from PyPI (no network to the package index?). Missing: ${pkgs}. Full log: $pip_log"
  fi
  echo "$want" >"$marker"
fi

# ---- 3. Cargo configuration ---------------------------------------------------------------
torch_dir=$("$venv/bin/python" - <<'PY'
import os, importlib.util
spec = importlib.util.find_spec("torch")
print(os.path.dirname(spec.origin))
PY
)
[[ -f $torch_dir/lib/libtorch_cpu.so ]] || die "torch in $venv has no lib/libtorch_cpu.so; delete $venv and rerun"
mkdir -p "$root/.cargo"
cfg=$root/.cargo/config.toml
new_cfg="# Written by scripts/setup.sh; do not edit (git-ignored).
[env]
LIBTORCH = \"$torch_dir\"
LIBTORCH_CXX11_ABI = \"1\"
RANKPILOT_PYTHON = \"$venv/bin/python\"
PYO3_PYTHON = \"$venv/bin/python\"
"
if [[ ! -f $cfg || $(cat "$cfg") != "$new_cfg" ]]; then
  printf '%s' "$new_cfg" >"$cfg"
fi
say "ok: libtorch at $torch_dir"

# ---- 4. The Python package ----------------------------------------------------------------
# RANKPILOT_SKIP_WHEEL=1 skips it (e.g. a build that only needs the CLI).
if [[ ${RANKPILOT_SKIP_WHEEL:-0} != 1 ]]; then
  preq=$root/scripts/requirements-python.txt
  pwant=$(sha256sum "$preq" | cut -c1-16)
  pmarker=$venv/.rankpilot-python-version
  if [[ ! -f $pmarker || $(cat "$pmarker") != "$pwant" ]]; then
    say "installing the Python package's tools: $(grep -v '^\s*\(#\|$\)' "$preq" | tr '\n' ' ')"
    if ! "$venv/bin/pip" install --disable-pip-version-check --retries "${PIP_RETRIES:-5}" --timeout "${PIP_TIMEOUT:-60}" \
          -r "$preq" >>"$cache/pip-install.log" 2>&1; then
      tail -n 5 "$cache/pip-install.log" >&2
      die "could not install scripts/requirements-python.txt from PyPI. Full log: $cache/pip-install.log"
    fi
    echo "$pwant" >"$pmarker"
  fi
  # Every source the extension is compiled from, and the package's own files.
  wwant=$(cd "$root" && find Cargo.toml Cargo.lock build.rs config envs policies runio tune src python \
            -type f \( -name '*.rs' -o -name '*.toml' -o -name '*.py' -o -name '*.pyi' -o -name '*.json' -o -name 'Cargo.lock' \) \
            -not -path '*/__pycache__/*' -not -path 'python/tests/*' -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)
  wmarker=$venv/.rankpilot-wheel-version
  if [[ ! -f $wmarker || $(cat "$wmarker") != "$wwant" ]] || ! compgen -G "$venv/lib/python3*/site-packages/rankpilot/_native*.so" >/dev/null; then
    say "building the Python package (maturin; shares target/ with cargo, a minute when only rankpilot changed)"
    wlog=$cache/wheel-build.log
    rm -rf "$root/target/wheels"
    if ! (cd "$root" && "$venv/bin/maturin" build --release --strip --auditwheel skip -m python/Cargo.toml \
            -i "$venv/bin/python" -o target/wheels) >"$wlog" 2>&1; then
      tail -n 20 "$wlog" >&2
      die "could not build the Python package. Full log: $wlog"
    fi
    if ! "$venv/bin/pip" install --disable-pip-version-check --no-deps --force-reinstall "$root"/target/wheels/rankpilot-*.whl >>"$wlog" 2>&1; then
      tail -n 5 "$wlog" >&2
      die "could not install the Python package. Full log: $wlog"
    fi
    echo "$wwant" >"$wmarker"
  fi
fi
