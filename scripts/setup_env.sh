#!/usr/bin/env bash
# Set up (once) and activate megahf's test environment.
#
#   source scripts/setup_env.sh     # from scripts/test.sh, scripts/demo.sh, or your shell
#   bash scripts/setup_env.sh       # only build/refresh .venv
#
# What it does:
#   * creates .venv in the repository root if it is missing (python3 -m venv);
#   * installs, when .venv/.megahf-stamp does not hold the sha256 of
#     scripts/requirements-test.txt + setup.cfg:
#       1. a quiet pip upgrade,
#       2. torch==2.13.0 (a CPU wheel when `nvidia-smi` is absent),
#       3. scripts/requirements-test.txt (exact pins),
#       4. megahf itself, editable, with --no-deps (the pins cover its dependencies);
#       5. bytecode for the modules a run imports (pip writes none: --no-compile);
#     then writes the stamp, so the next runs skip all of this;
#   * with MEGAHF_EXTENDED_TESTS=1 only (the extended tier), installs scripts/requirements-extended.txt (Ray) when
#     .venv/.megahf-extended-stamp does not hold its sha256, then writes that stamp: the default tier never pays for
#     it, and the second extended run skips it;
#   * restores transformers' common model tests from its pinned sdist (scripts/fetch_transformers_tests.py:
#     PyPI, sha256-checked, into .venv/transformers-tests/; a no-op once done). Offline, it warns and goes on:
#     the tests in tests/hf_common then fail with the command that fetches them;
#   * exports HF_HUB_OFFLINE=1, TRANSFORMERS_OFFLINE=1, HF_DATASETS_OFFLINE=1,
#     TOKENIZERS_PARALLELISM=false and activates .venv.
#
# Settings (environment):
#   MEGAHF_PYTHON           interpreter used to create .venv (default: python3)
#   MEGAHF_EXTENDED_TESTS   1: also install scripts/requirements-extended.txt (see above)
#
# It does not use `set -e` (it is sourced into other shells); every step checks its own errors.

_megahf_setup() {
    local root venv stamp_file want have py t0 torch_version log extended_stamp extended_want
    local torch_pin="2.13.0"
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)" || return 1
    venv="$root/.venv"
    stamp_file="$venv/.megahf-stamp"
    extended_stamp="$venv/.megahf-extended-stamp"
    log="$venv/.megahf-install.log"
    t0=$SECONDS

    _megahf_say() { printf '[setup_env] %s\n' "$*" >&2; }

    if [[ ! -f "$root/scripts/requirements-test.txt" || ! -f "$root/setup.cfg" ]]; then
        _megahf_say "error: $root does not look like the megahf repository"
        return 1
    fi

    # sha256 of the files that decide what gets installed
    _megahf_sha256() {
        if command -v sha256sum >/dev/null 2>&1; then
            cat "$@" | sha256sum | cut -d' ' -f1
        else
            cat "$@" | shasum -a 256 | cut -d' ' -f1
        fi
    }
    want="$(_megahf_sha256 "$root/scripts/requirements-test.txt" "$root/setup.cfg")" || return 1

    if [[ ! -x "$venv/bin/python" ]]; then
        py="${MEGAHF_PYTHON:-python3}"
        if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
            _megahf_say "error: megahf needs Python >= 3.10 ('$py' is missing or older); set MEGAHF_PYTHON"
            return 1
        fi
        _megahf_say "creating $venv with $("$py" --version 2>&1)"
        "$py" -m venv "$venv" || { _megahf_say "error: python -m venv failed"; return 1; }
        rm -f "$stamp_file" "$extended_stamp"
    fi

    # pip's (and setuptools') chatter goes to the log; its tail is shown when a step fails
    # --no-compile: no bytecode for every file of every package at install time (torch and transformers hold
    # thousands); the modules a run imports are compiled below
    _megahf_pip() {
        local t=$SECONDS
        if ! "$venv/bin/python" -m pip "$@" --no-compile >>"$log" 2>&1; then
            tail -n 30 "$log" >&2
            _megahf_say "error: 'pip $*' failed (full log: $log)"
            return 1
        fi
        _megahf_say "  done in $((SECONDS - t))s"
    }

    have=""
    [[ -f "$stamp_file" ]] && have="$(cat "$stamp_file")"
    if [[ "$have" == "$want" ]]; then
        _megahf_say "environment up to date (stamp matches), skipping installs"
    else
        rm -f "$stamp_file"
        : >"$log" || return 1

        _megahf_say "upgrading pip"
        _megahf_pip install -q --upgrade pip || return 1

        torch_version="$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null)" || true
        if [[ "${torch_version%%+*}" == "$torch_pin" ]]; then
            _megahf_say "torch $torch_version already installed"
        else
            # pip's configured index gives the CPU wheel on megahf's machines (it lies on disk there);
            # installing it first keeps accelerate's bare torch requirement from pulling a CUDA build.
            _megahf_say "installing torch==$torch_pin"
            _megahf_pip install -q "torch==$torch_pin" || return 1
        fi

        _megahf_say "installing scripts/requirements-test.txt"
        _megahf_pip install -q -r "$root/scripts/requirements-test.txt" || return 1

        _megahf_say "installing megahf (editable, --no-deps)"
        _megahf_pip install -q --no-deps -e "$root" || return 1

        # bytecode for what a run imports (the pip steps wrote none), even where PYTHONDONTWRITEBYTECODE is set:
        # without it every new process compiles torch's and transformers' modules again
        _megahf_say "compiling the modules a run imports"
        if ! env -u PYTHONDONTWRITEBYTECODE "$venv/bin/python" -c \
                "import megahf.cli, megahf.training.pretrain, megahf.training.finetune, megahf.tasks.run" >>"$log" 2>&1; then
            tail -n 30 "$log" >&2
            _megahf_say "error: importing megahf failed (full log: $log)"
            return 1
        fi

        printf '%s\n' "$want" >"$stamp_file" || return 1
        torch_version="$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null)" || true
        _megahf_say "installed (torch $torch_version) in $((SECONDS - t0))s"
    fi

    # the extended tier's additions, on their own stamp: the default tier neither installs nor checks them
    if [[ "${MEGAHF_EXTENDED_TESTS:-}" == "1" ]]; then
        extended_want="$(_megahf_sha256 "$root/scripts/requirements-extended.txt")" || return 1
        have=""
        [[ -f "$extended_stamp" ]] && have="$(cat "$extended_stamp")"
        if [[ "$have" != "$extended_want" ]]; then
            rm -f "$extended_stamp"
            _megahf_say "installing scripts/requirements-extended.txt (MEGAHF_EXTENDED_TESTS=1)"
            _megahf_pip install -q -r "$root/scripts/requirements-extended.txt" || return 1
            printf '%s\n' "$extended_want" >"$extended_stamp" || return 1
        fi
    fi

    if ! "$venv/bin/python" "$root/scripts/fetch_transformers_tests.py"; then
        _megahf_say "warning: transformers' common model tests are not restored; tests/hf_common will fail until" \
            "'python scripts/fetch_transformers_tests.py' runs with access to PyPI"
    fi

    export HF_HUB_OFFLINE=1
    export TRANSFORMERS_OFFLINE=1
    export HF_DATASETS_OFFLINE=1
    export TOKENIZERS_PARALLELISM=false

    # shellcheck disable=SC1091
    source "$venv/bin/activate" || { _megahf_say "error: cannot activate $venv"; return 1; }
    _megahf_say "ready: $(python --version 2>&1) at $venv ($((SECONDS - t0))s)"
}

_megahf_setup
_megahf_status=$?
unset -f _megahf_setup _megahf_say _megahf_pip _megahf_sha256
if [[ "${BASH_SOURCE[0]}" != "$0" ]]; then
    # sourced
    return "$_megahf_status"
else
    exit "$_megahf_status"
fi
