#!/usr/bin/env bash
# Release one package of the workspace on its own: check, build, tag.
#
#   scripts/release.sh <package> [--skip-tests]
#
# 1. the tree is clean, uv.lock is current, the tag <package>-v<version> does not exist yet, and
#    CHANGELOG.md has a "## <version>" section;
# 2. the package's quick tests pass (unless --skip-tests);
# 3. `uv build --package <package> --no-sources` writes the wheel and sdist to dist/ (no workspace
#    sources: exactly what a user installing from an index gets);
# 4. an annotated tag <package>-v<version> is created (push it with `git push origin <tag>`;
#    upload with `uv publish dist/<package>-<version>*`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

package="${1:?usage: scripts/release.sh <core|summarization|lora_llm|qwen_vl> [--skip-tests]}"
skip_tests="${2:-}"
dir="packages/$package"
[[ -d "$dir" ]] || { echo "error: no package '$package' under packages/" >&2; exit 2; }

version=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$dir/src/$package/__init__.py")
[[ -n "$version" ]] || { echo "error: no __version__ in $dir/src/$package/__init__.py" >&2; exit 2; }
tag="$package-v$version"

if [[ -n "$(git status --porcelain)" ]]; then
    echo "error: the working tree has uncommitted changes; commit or stash them first" >&2; exit 2
fi
if git rev-parse -q --verify "refs/tags/$tag" >/dev/null; then
    echo "error: tag $tag exists already; bump __version__ in $dir/src/$package/__init__.py" >&2; exit 2
fi
grep -q "^## $version" "$dir/CHANGELOG.md" || { echo "error: $dir/CHANGELOG.md has no '## $version' section" >&2; exit 2; }
uv lock --check

if [[ "$skip_tests" != "--skip-tests" ]]; then
    uv run --frozen --package "$package" pytest "$dir/tests" -m "not slow and not gpu" -q
fi

out="dist/$package-$version"
rm -rf "$out"
uv build --package "$package" --no-sources --out-dir "$out"
git tag -a "$tag" -m "$package $version"
echo "built $(ls "$out" | tr '\n' ' ')"
echo "tagged $tag — push with: git push origin $tag; publish with: uv publish $out/*"
