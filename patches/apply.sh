#!/usr/bin/env bash
# Apply (or revert) the MiLe patch to a Megatron-LM checkout's pretrain_gpt.py.
#
#   patches/apply.sh MEGATRON_LM_DIR            apply; exit 0 if already applied
#   patches/apply.sh --revert MEGATRON_LM_DIR   restore the upstream file
#   patches/apply.sh --check MEGATRON_LM_DIR    report the file's state, change nothing
#
# Only the exact upstream file the patch was made for is touched: its SHA-256 must equal
# ORIGINAL_SHA256 from manifest.env (tag MEGATRON_TAG). The patch is applied to a temporary copy,
# the copy's hash is checked against PATCHED_SHA256, and only then is the file replaced (atomic
# rename in the same directory), so a failure never leaves a half-patched file behind.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
prog="patches/apply.sh"

die() { echo "$prog: error: $*" >&2; exit 1; }
usage() {
    echo "usage: $prog [--check|--revert] MEGATRON_LM_DIR" >&2
    echo "  MEGATRON_LM_DIR: a Megatron-LM checkout at tag ${MEGATRON_TAG:-core_v0.19.0} (contains pretrain_gpt.py)" >&2
    exit 2
}

# manifest.env holds KEY=value lines; read them without executing anything.
manifest="$here/manifest.env"
[[ -f "$manifest" ]] || die "manifest $manifest is missing; reinstall the patches/ folder"
while IFS='=' read -r key value; do
    [[ -z "$key" || "$key" == \#* ]] && continue
    case "$key" in
        MEGATRON_TAG|MEGATRON_COMMIT|TARGET_FILE|PATCH_FILE|ORIGINAL_SHA256|PATCHED_SHA256)
            printf -v "$key" '%s' "$value" ;;
        *) die "unknown key '$key' in $manifest" ;;
    esac
done < "$manifest"
for key in MEGATRON_TAG MEGATRON_COMMIT TARGET_FILE PATCH_FILE ORIGINAL_SHA256 PATCHED_SHA256; do
    [[ -n "${!key:-}" ]] || die "$manifest does not define $key"
done

mode=apply
case "${1:-}" in
    --check) mode=check; shift ;;
    --revert) mode=revert; shift ;;
    -h|--help) usage ;;
    -*) echo "$prog: unknown option '$1'" >&2; usage ;;
esac
[[ $# -eq 1 ]] || usage
megatron_dir="$1"

[[ -d "$megatron_dir" ]] || die "MEGATRON_LM_DIR '$megatron_dir' is not a directory"
target="$megatron_dir/$TARGET_FILE"
[[ -f "$target" ]] || die "'$target' does not exist: MEGATRON_LM_DIR must be the root of a Megatron-LM checkout (git checkout $MEGATRON_TAG)"
patch_path="$here/$PATCH_FILE"
[[ -f "$patch_path" ]] || die "patch file $patch_path is missing; reinstall the patches/ folder"

sha256_of() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | cut -d' ' -f1
    elif command -v shasum >/dev/null 2>&1; then
        shasum -a 256 "$1" | cut -d' ' -f1
    else
        die "neither sha256sum nor shasum found; install coreutils"
    fi
}

# Apply the patch (forward or reverse) to the single file $1 inside directory $2.
run_patch() {
    local direction="$1" dir="$2"
    if command -v patch >/dev/null 2>&1; then
        local reverse=()
        [[ "$direction" == reverse ]] && reverse=(--reverse)
        patch --batch --silent --no-backup-if-mismatch "${reverse[@]}" -p1 -d "$dir" -i "$patch_path"
    elif command -v git >/dev/null 2>&1; then
        local reverse=()
        [[ "$direction" == reverse ]] && reverse=(--reverse)
        # --directory is not needed: $dir is a fresh temporary directory outside any repository.
        (cd "$dir" && GIT_CEILING_DIRECTORIES="$(dirname "$dir")" git apply "${reverse[@]}" -p1 "$patch_path")
    else
        die "neither 'patch' nor 'git' is installed; install one of them"
    fi
}

found="$(sha256_of "$target")"
state=other
[[ "$found" == "$ORIGINAL_SHA256" ]] && state=original
[[ "$found" == "$PATCHED_SHA256" ]] && state=patched

refuse() {
    cat >&2 <<EOF
$prog: error: refusing to modify $target
  it is not Megatron-LM's $TARGET_FILE at tag $MEGATRON_TAG (commit $MEGATRON_COMMIT)
  expected sha256 $ORIGINAL_SHA256 (upstream) or $PATCHED_SHA256 (already patched)
  found    sha256 $found
  Check out the tag ('git -C $megatron_dir checkout $MEGATRON_TAG -- $TARGET_FILE'), or port the
  patch by hand: $patch_path
EOF
    exit 1
}

case "$mode:$state" in
    check:original) echo "$prog: $target is the unpatched $MEGATRON_TAG file"; exit 0 ;;
    check:patched) echo "$prog: $target already has the MiLe patch"; exit 0 ;;
    check:other) refuse ;;
    apply:patched) echo "$prog: $target already has the MiLe patch; nothing to do"; exit 0 ;;
    revert:original) echo "$prog: $target is already the unpatched $MEGATRON_TAG file; nothing to do"; exit 0 ;;
    *:other) refuse ;;
esac

if [[ "$mode" == apply ]]; then
    direction=forward; want="$PATCHED_SHA256"
else
    direction=reverse; want="$ORIGINAL_SHA256"
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/mile-patch.XXXXXX")"
staged=""
cleanup() { rm -rf "$work"; [[ -z "$staged" ]] || rm -f "$staged"; }
trap cleanup EXIT

cp "$target" "$work/$TARGET_FILE"
run_patch "$direction" "$work" || die "the patch did not apply to $target; the file was not changed"
got="$(sha256_of "$work/$TARGET_FILE")"
[[ "$got" == "$want" ]] || die "patched result has sha256 $got, expected $want; the file was not changed"

# Stage next to the target (same file system), keep its permissions, then rename atomically.
staged="$(mktemp "$target.mile-tmp.XXXXXX")"
cp "$work/$TARGET_FILE" "$staged"
chmod "$(stat -c '%a' "$target" 2>/dev/null || stat -f '%Lp' "$target")" "$staged"
mv -f "$staged" "$target"
staged=""

if [[ "$mode" == apply ]]; then
    echo "$prog: patched $target (sha256 $want)"
    echo "$prog: run it with mile_megatron importable (pip install -e /path/to/mile-megatron), e.g."
    echo "        torchrun ... $TARGET_FILE <Megatron flags> --loss mile --calculate-per-token-loss"
else
    echo "$prog: restored the upstream $MEGATRON_TAG $target (sha256 $want)"
fi
